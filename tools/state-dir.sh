#!/usr/bin/env bash
# Prepare the state directory: 0700, with cloudctl.env (the installation's generated secrets) 0600.
# Usage: tools/state-dir.sh STATE_DIR     (idempotent; tools/run.sh calls it)
#
# Each secret is generated once, under umask 077: a shell redirect creates its file with the
# umask before any chmod could narrow it. A variable missing from an older env file is added, and
# files of an older installation (0644 then) are narrowed; the settings do the same at every start.
set -euo pipefail
state=${1:?usage: $0 STATE_DIR}
umask 077
mkdir -p "$state"
chmod 700 "$state"
env_file=$state/cloudctl.env
touch "$env_file"
chmod 600 "$env_file"
random_hex() { head -c 32 /dev/urandom | sha256sum | cut -c1-"$1"; }
add_secret() {  # add_secret NAME VALUE: kept when the file has it already
  grep -q "^$1=" "$env_file" || printf '%s=%s\n' "$1" "$2" >> "$env_file"
}
add_secret CLOUDCTL_SERVICE_TOKEN "$(random_hex 64)"
add_secret FLOWER_BASIC_AUTH "admin:$(random_hex 20)"
for secret in secret_key cloudctl.sqlite3 cloudctl.sqlite3-wal cloudctl.sqlite3-shm; do
  [ ! -e "$state/$secret" ] || chmod 600 "$state/$secret"
done
