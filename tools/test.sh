#!/usr/bin/env bash
# `make test`: install what is missing, start the daemons, lint, then run the whole suite.
# Extra arguments go to pytest (e.g. `make test ARGS="-k scheduler"`).
set -euo pipefail
cd "$(dirname "$0")/.."

tools/install-system.sh --browser
tools/venv.sh requirements-dev.txt
tools/services.sh start
# Redis requires the password services.sh generated: the tests' URLs and processes carry it.
export REDIS_PASSWORD=${REDIS_PASSWORD:-$(cat "${CLOUDCTL_STATE_DIR:-var}/redis.password")}

echo "==> ruff"
.venv/bin/ruff check .
echo "==> import boundaries"
.venv/bin/lint-imports --no-cache
echo "==> types (mypy)"
.venv/bin/mypy
echo "==> pytest (database: ${DATABASE_URL:-SQLite})"
if [ "$#" -gt 0 ] || [ "${CLOUDCTL_TEST_SERIAL:-}" = 1 ]; then
  exec .venv/bin/pytest "$@"
fi

# The whole suite runs as two pytest processes at once: the control plane's and the scheduler's
# tests (database and CPU, no daemons) beside everything else (libvirt, guests, whole stacks, which
# spend much of their time waiting on guests and processes). They share nothing: the control group
# gets a database of its own (test_<name>_ctl on PostgreSQL, cloudctl-ctl.test.sqlite3 on SQLite) and
# uses no Redis. CLOUDCTL_TEST_SERIAL=1 runs one process instead.
control_log=$(mktemp /tmp/cloudctl-test-control.XXXXXX)
state_dir=$(realpath -m "${CLOUDCTL_STATE_DIR:-var}")
case "${DATABASE_URL:-}" in
  "") control_url="sqlite:///$state_dir/cloudctl-ctl.sqlite3" ;;  # its test file: cloudctl-ctl.test.sqlite3
  *\?*) echo "DATABASE_URL with a query string: set CLOUDCTL_TEST_SERIAL=1" >&2; exit 2 ;;
  *) control_url="${DATABASE_URL}_ctl" ;;
esac
echo "==> pytest tests/control tests/scheduler in the background (output: $control_log, shown at the end)"
DATABASE_URL=$control_url .venv/bin/pytest -p no:cacheprovider tests/control tests/scheduler \
  > "$control_log" 2>&1 &
control_pid=$!
trap 'kill "$control_pid" 2>/dev/null || true' EXIT
rest_status=0
.venv/bin/pytest --ignore=tests/control --ignore=tests/scheduler || rest_status=$?
control_status=0
wait "$control_pid" || control_status=$?
trap - EXIT
echo "==> pytest tests/control tests/scheduler (exit status $control_status)"
cat "$control_log"
rm -f "$control_log"
if [ "$rest_status" -ne 0 ] || [ "$control_status" -ne 0 ]; then
  echo "FAILED: tests/control + tests/scheduler exit $control_status, the rest exit $rest_status" >&2
  exit 1
fi
