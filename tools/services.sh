#!/usr/bin/env bash
# Start the daemons cloudctl talks to, when they are not running already. No systemd needed.
# Usage: tools/services.sh start [--postgres]     (idempotent)
#        tools/services.sh status
#
# libvirtd runs in a PID namespace whose PID 1 is tini: libvirt waits for a dead QEMU to be
# reaped, and a slow-reaping PID 1 (as in containers) makes every `destroy` cost ~2 s.
set -euo pipefail
cmd=${1:-start}
shift || true
want_postgres=0
for arg in "$@"; do
  case "$arg" in
    --postgres) want_postgres=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
log_dir=${CLOUDCTL_LOG_DIR:-/var/log/cloudctl}
mkdir -p "$log_dir"

wait_for() {  # wait_for <seconds> <description> <command...>
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  while [ "$SECONDS" -lt "$deadline" ]; do  # by the clock: one probe may itself take seconds
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$what did not come up within ${limit}s" >&2
  return 1
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
# `virsh version` waits on libvirtd, which can hang in a QEMU capability probe (a stuck
# `qemu-system-x86_64 -machine none,accel=kvm:tcg` on a host whose /dev/kvm cannot run guests):
# bound every probe so a hang is reported instead of blocking forever.
libvirt_up() { timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; }
virtlogd_up() { pgrep -x virtlogd >/dev/null; }
postgres_up() { pg_isready -q -h 127.0.0.1 2>/dev/null; }

start() {
  if ! redis_up; then
    echo "==> starting redis-server"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' \
      --logfile "$log_dir/redis.log"
    wait_for 10 redis redis_up
  fi
  if ! virtlogd_up; then
    echo "==> starting virtlogd"
    virtlogd -d
  fi
  if ! libvirt_up; then
    echo "==> starting libvirtd"
    mkdir -p /run/libvirt /var/lib/libvirt
    setsid nohup unshare --pid --fork --mount-proc tini -s -- libvirtd \
      >>"$log_dir/libvirtd.log" 2>&1 </dev/null &
    if ! wait_for 60 libvirtd libvirt_up; then
      echo "libvirtd does not answer; a stuck QEMU capability probe is the usual cause:" >&2
      pgrep -af 'qemu-system.*-machine none' >&2 || true
      echo "kill it (kill -9 <pid>) and run this again" >&2
      return 1
    fi
  fi
  if [ "$want_postgres" = 1 ] && ! postgres_up; then
    echo "==> starting postgresql"
    cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
    if [ -z "$cluster" ]; then
      pg_createcluster 15 main >/dev/null
      cluster="15 main"
    fi
    # shellcheck disable=SC2086
    pg_ctlcluster $cluster start
    wait_for 30 postgresql postgres_up
  fi
}

status() {
  redis_up && echo "redis: up" || echo "redis: down"
  virtlogd_up && echo "virtlogd: up" || echo "virtlogd: down"
  libvirt_up && echo "libvirtd: up" || echo "libvirtd: down"
  postgres_up && echo "postgresql: up" || echo "postgresql: down"
}

case "$cmd" in
  start) start ;;
  status) status ;;
  *) echo "usage: $0 start [--postgres] | status" >&2; exit 2 ;;
esac
