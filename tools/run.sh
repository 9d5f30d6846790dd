#!/usr/bin/env bash
# `make run`: install what is missing, start the daemons, prepare the database and the demo
# image, then start every Procfile process with honcho (Ctrl-C stops them all).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

tools/install-system.sh
tools/venv.sh requirements.txt
export CLOUDCTL_STATE_DIR=${CLOUDCTL_STATE_DIR:-$repo/var}
mkdir -p "$CLOUDCTL_STATE_DIR"
tools/services.sh start
# Redis requires the password services.sh generated (var/redis.password): every process gets it.
export REDIS_PASSWORD=${REDIS_PASSWORD:-$(cat "$CLOUDCTL_STATE_DIR/redis.password")}
# The compute host this machine runs (the Procfile's compute worker): trusted, so it joins enabled
# (COMPUTE_TRUSTED_HOSTS defaults to it), and given its host key below.
export COMPUTE_HOST=${COMPUTE_HOST:-$(hostname)}
# Secrets generated once per installation, kept in var/cloudctl.env (mode 600); a value set in
# the environment wins.
env_file=$CLOUDCTL_STATE_DIR/cloudctl.env
random_hex() { head -c 32 /dev/urandom | sha256sum | cut -c1-"$1"; }
if [ ! -f "$env_file" ]; then
  (umask 077
   printf 'CLOUDCTL_SERVICE_TOKEN=%s\n' "$(random_hex 64)"
   printf 'FLOWER_BASIC_AUTH=admin:%s\n' "$(random_hex 20)") > "$env_file"
fi
for name in CLOUDCTL_SERVICE_TOKEN FLOWER_BASIC_AUTH; do
  if [ -z "${!name:-}" ]; then
    export "$name=$(sed -n "s/^$name=//p" "$env_file")"
  fi
done

# The outside world of the flat external network `public` (tools/public-net.sh): a namespace with
# 172.24.4.1 whose veth end cc-public is the compute worker's flat interface, and a VXLAN endpoint for
# tenant networks on this one host. An operator's own COMPUTE_FLAT_INTERFACE (a physical interface: then
# no namespace is made) or COMPUTE_TUNNEL_IP wins.
if [ -z "${COMPUTE_FLAT_INTERFACE:-}" ]; then
  tools/public-net.sh up
  export COMPUTE_FLAT_INTERFACE=${CLOUDCTL_PUBLIC_INTERFACE:-cc-public}
fi
export COMPUTE_TUNNEL_IP=${COMPUTE_TUNNEL_IP:-127.0.0.1}

image=$CLOUDCTL_STATE_DIR/images/tiny.qcow2
[ -f "$image" ] || tools/build-tiny-image.sh "$image"

export PATH="$repo/.venv/bin:$PATH"
python manage.py migrate --noinput
python manage.py collectstatic --noinput -v0
python manage.py bootstrap --image "$image" --demo-network
# The key the compute worker signs its reports with (see `manage.py host_credentials`).
if [ -z "${COMPUTE_HOST_KEY:-}" ]; then
  COMPUTE_HOST_KEY=$(python manage.py host_credentials -v 0 "$COMPUTE_HOST" |
                     sed -n 's/^COMPUTE_HOST_KEY=//p')
  export COMPUTE_HOST_KEY
fi

cat <<MSG

==> cloudctl is starting:
    API     http://127.0.0.1:8000/api/v1/   (token: POST /api/v1/auth/token/)
    admin   http://127.0.0.1:8000/admin/
    Flower  http://127.0.0.1:${FLOWER_PORT:-5555}/   (login: $FLOWER_BASIC_AUTH)
    user    ${CLOUDCTL_ADMIN_USER:-admin} (password printed above when it was created)
MSG
exec honcho start -f Procfile
