#!/usr/bin/env bash
# Create the unprivileged system user `cloudctl` when missing and give it the state directory
# (0700). Web, scheduler, conductor, beat and Flower run as it (tools/run.sh's Procfile lines, the
# units of deploy/systemd/); the compute worker stays root.
# Usage: tools/cloudctl-user.sh [STATE_DIR]     (as root; idempotent)
set -euo pipefail
if ! getent passwd cloudctl >/dev/null; then
  echo "==> creating the system user cloudctl"
  useradd --system --user-group --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin --comment "cloudctl control plane" cloudctl
fi
state=${1:-}
if [ -n "$state" ]; then
  mkdir -p "$state"
  # Only what is not cloudctl's yet (files root made: the demo image, an older installation's). Not
  # redis/: the broker's AOF files stay with the user who runs redis-server (tools/services.sh).
  find "$state" -path "$state/redis" -prune -o \( ! -user cloudctl -o ! -group cloudctl \) \
    -exec chown -h cloudctl:cloudctl {} +
  chmod 700 "$state"
fi
