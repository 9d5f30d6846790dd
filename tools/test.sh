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
exec .venv/bin/pytest "$@"
