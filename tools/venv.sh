#!/usr/bin/env bash
# Create .venv and install the pinned requirements; a no-op when they have not changed.
# Usage: tools/venv.sh [requirements file, default requirements.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=${1:-requirements.txt}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.installed-$(basename "$reqs")
digest=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "==> installing $reqs into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r "$reqs"
  echo "$digest" > "$stamp"
fi
