#!/usr/bin/env bash
# `make run`: install what is missing, start the daemons, prepare the database and the demo
# image, then start every Procfile process under tools/supervise.py: a process that dies is restarted
# (1 s, 2 s, ... 30 s apart), the others keep running; Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

tools/install-system.sh
tools/venv.sh requirements.txt
export CLOUDCTL_STATE_DIR=${CLOUDCTL_STATE_DIR:-$repo/var}
# var/ (0700) holds the secret key, the database and cloudctl.env (0600): the installation's
# secrets, generated once by tools/state-dir.sh; a value set in the environment wins.
tools/state-dir.sh "$CLOUDCTL_STATE_DIR"
tools/services.sh start
# Redis requires the password services.sh generated (var/redis.password): every process gets it.
export REDIS_PASSWORD=${REDIS_PASSWORD:-$(cat "$CLOUDCTL_STATE_DIR/redis.password")}
# The compute host this machine runs (the Procfile's compute worker): trusted, so it joins enabled
# (COMPUTE_TRUSTED_HOSTS defaults to it), and given its host key below.
export COMPUTE_HOST=${COMPUTE_HOST:-$(hostname)}
env_file=$CLOUDCTL_STATE_DIR/cloudctl.env
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

# Web, scheduler, conductor, beat and Flower run as the unprivileged system user `cloudctl`, owner
# of the state directory; only the compute worker stays root: it drives libvirt and plugs the
# network (bridges, namespaces, iptables), as Nova's compute does through privsep. Started by
# another user than root, everything runs as that user.
export CLOUDCTL_RUN_AS=""
control_user=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
  tools/cloudctl-user.sh "$CLOUDCTL_STATE_DIR"
  as_cloudctl="setpriv --reuid=cloudctl --regid=cloudctl --init-groups --no-new-privs --"
  # cloudctl must run the venv's own interpreter (same version as root gets) and read the code.
  probe='import sys, django, celery, redis; print(sys.version)'
  if [ "$($as_cloudctl "$repo/.venv/bin/python" -c "$probe" 2>/dev/null)" = \
       "$("$repo/.venv/bin/python" -c "$probe")" ] &&
     $as_cloudctl test -r "$repo/manage.py"; then
    CLOUDCTL_RUN_AS=$as_cloudctl
    control_user=cloudctl
  else
    # Still up, but say loudly why the control plane runs as root.
    interpreter=$(readlink -f "$repo/.venv/bin/python")
    echo "WARNING: the user cloudctl cannot run $interpreter (the .venv's Python) or read $repo:" \
         "every parent directory of both must be traversable (a Python under /root is not)." \
         "The control plane runs as root this time; check the code out elsewhere (e.g." \
         "/opt/cloudctl) with a venv from /usr/bin/python3 (PYTHON=/usr/bin/python3 tools/venv.sh)." >&2
  fi
fi

export PATH="$repo/.venv/bin:$PATH"
# The venv's interpreter by its path (the Procfile's flower line too): a bare `python` finds its venv
# through PATH and the interpreter's real path, which another user may not be allowed to resolve.
export CLOUDCTL_PYTHON="$repo/.venv/bin/python"
$CLOUDCTL_RUN_AS "$CLOUDCTL_PYTHON" manage.py migrate --noinput
$CLOUDCTL_RUN_AS "$CLOUDCTL_PYTHON" manage.py collectstatic --noinput -v0
$CLOUDCTL_RUN_AS "$CLOUDCTL_PYTHON" manage.py bootstrap --image "$image" --demo-network --demo-user
# The key the compute worker signs its reports with (see `manage.py host_credentials`).
if [ -z "${COMPUTE_HOST_KEY:-}" ]; then
  COMPUTE_HOST_KEY=$($CLOUDCTL_RUN_AS "$CLOUDCTL_PYTHON" manage.py host_credentials -v 0 "$COMPUTE_HOST" |
                     sed -n 's/^COMPUTE_HOST_KEY=//p')
  export COMPUTE_HOST_KEY
fi

cat <<MSG

==> cloudctl is starting:
    API     http://127.0.0.1:8000/api/v1/   (token: POST /api/v1/auth/token/)
    admin   http://127.0.0.1:8000/admin/
    Flower  http://127.0.0.1:${FLOWER_PORT:-5555}/   (login: FLOWER_BASIC_AUTH in $env_file)
    users   ${CLOUDCTL_ADMIN_USER:-admin} (admin role), demo (member role): passwords printed above
            when they were created (POST /api/v1/auth/token/ {"username", "password"})
    runs as web, scheduler, conductor, beat, Flower: $control_user; compute worker: $(id -un)
MSG
exec "$CLOUDCTL_PYTHON" tools/supervise.py -f Procfile
