#!/usr/bin/env bash
# Start the daemons cloudctl talks to, when they are not running already. No systemd needed.
# Usage: tools/services.sh start [--postgres] [--redis-only]     (idempotent)
#        tools/services.sh status
#
# libvirtd runs in a PID namespace whose PID 1 is tini: libvirt waits for a dead QEMU to be
# reaped, and a slow-reaping PID 1 (as in containers) makes every `destroy` cost ~2 s.
#
# Redis (127.0.0.1:${REDIS_PORT:-6379}) requires a password: REDIS_PASSWORD, else the one generated
# once into $CLOUDCTL_STATE_DIR/redis.password (mode 0600; default state dir var/), which cloudctl's
# settings and tools/run.sh, tools/test.sh read. The password reaches redis-server on its standard
# input (a config read from stdin) and redis-cli through REDISCLI_AUTH: never in a command line
# that `ps` shows. A Redis already running without a password gets it (CONFIG SET requirepass).
#
# The broker keeps its queues across a restart: redis-server runs with AOF persistence (appendonly
# yes, appendfsync everysec) in $CLOUDCTL_STATE_DIR/redis/ (0700, the starting user's), no RDB
# snapshots. A Redis this script did not start is left as it is, with a warning when it keeps its
# queues in memory only.
set -euo pipefail
cmd=${1:-start}
shift || true
want_postgres=0
redis_only=0
for arg in "$@"; do
  case "$arg" in
    --postgres) want_postgres=1 ;;
    --redis-only) redis_only=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
log_dir=${CLOUDCTL_LOG_DIR:-/var/log/cloudctl}
mkdir -p "$log_dir"
state_dir=${CLOUDCTL_STATE_DIR:-$(cd "$(dirname "$0")/.." && pwd)/var}
redis_port=${REDIS_PORT:-6379}
redis_password_file=$state_dir/redis.password
redis_data_dir=$state_dir/redis

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

# The password every cloudctl process uses: REDIS_PASSWORD, else the state dir's file (made once).
redis_password() {
  if [ -n "${REDIS_PASSWORD:-}" ]; then
    printf '%s' "$REDIS_PASSWORD"
    return
  fi
  if [ ! -s "$redis_password_file" ]; then
    (umask 077
     mkdir -p "$state_dir"
     head -c 32 /dev/urandom | sha256sum | cut -c1-48 > "$redis_password_file.$$"
     mv "$redis_password_file.$$" "$redis_password_file")
  fi
  tr -d '[:space:]' < "$redis_password_file"
}
# redis_cli <password|""> <args...>: redis-cli on our port, authenticated when a password is given.
redis_cli() {
  local password=$1; shift
  if [ -n "$password" ]; then
    REDISCLI_AUTH=$password redis-cli -h 127.0.0.1 -p "$redis_port" "$@" 2>/dev/null
  else
    env -u REDISCLI_AUTH redis-cli -h 127.0.0.1 -p "$redis_port" "$@" 2>/dev/null
  fi
}
# redis_state <password>: down | open (no password) | ours (requires this password) | foreign
redis_state() {
  local answer
  answer=$(redis_cli "" ping || true)
  case "$answer" in
    PONG) echo open ;;
    *NOAUTH*) if redis_cli "$1" ping | grep -q PONG; then echo ours; else echo foreign; fi ;;
    *) echo down ;;
  esac
}
redis_up() { [ "$(redis_state "$(redis_password)")" = ours ]; }
known_redis_password() {  # as redis_password, without making the file
  if [ -n "${REDIS_PASSWORD:-}" ]; then printf '%s' "$REDIS_PASSWORD"
  elif [ -s "$redis_password_file" ]; then tr -d '[:space:]' < "$redis_password_file"
  fi
}
# `virsh version` waits on libvirtd, which can hang in a QEMU capability probe (a stuck
# `qemu-system-x86_64 -machine none,accel=kvm:tcg` on a host whose /dev/kvm cannot run guests):
# bound every probe so a hang is reported instead of blocking forever.
libvirt_up() { timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; }
virtlogd_up() { pgrep -x virtlogd >/dev/null; }
postgres_up() { pg_isready -q -h 127.0.0.1 2>/dev/null; }

start_redis() {
  local password
  password=$(redis_password)
  case "$(redis_state "$password")" in
    ours) ;;
    down)
      local data_dir
      data_dir=$(redis_data_dir) || return 1
      echo "==> starting redis-server (port $redis_port, password required, AOF in $data_dir)"
      # umask 077: its AOF files (every queued task) are 0600, as its directory is 0700.
      printf 'requirepass %s\n' "$password" | (umask 077; exec redis-server - --daemonize yes \
        --bind 127.0.0.1 --port "$redis_port" --dir "$data_dir" --appendonly yes --appendfsync everysec \
        --save '' --logfile "$log_dir/redis.log")
      # Replaying a long AOF takes a while: LOADING answers until it is done.
      wait_for 60 redis redis_up ;;
    open)
      echo "==> redis-server on port $redis_port runs without a password: setting it (CONFIG SET requirepass)"
      printf 'CONFIG SET requirepass %s\n' "$password" | redis_cli "" >/dev/null
      redis_up || { echo "could not set the password of the Redis on port $redis_port" >&2; return 1; } ;;
    foreign)
      local source=$redis_password_file
      [ -n "${REDIS_PASSWORD:-}" ] && source=REDIS_PASSWORD
      echo "redis-server on port $redis_port requires a password that is not the one of $source:" \
           "set REDIS_PASSWORD to its password (or stop it)" >&2
      return 1 ;;
  esac
  if [ "$(redis_persistence "$password")" != "appendonly yes, appendfsync everysec" ]; then
    echo "WARNING: redis-server on port $redis_port keeps its queues with $(redis_persistence "$password"):" \
         "a crash or restart loses the tasks waiting in them. Restart it through this script for AOF" \
         "(once its queues are empty: redis-cli -p $redis_port shutdown; tools/services.sh start)." >&2
  fi
}
# redis_data_dir: the directory (absolute) AOF files go to, made 0700; refused when it is a symlink or
# not the starting user's (root's Redis must not write where another user points it).
redis_data_dir() {
  (umask 077; mkdir -p "$redis_data_dir")
  if [ -L "$redis_data_dir" ] || [ ! -O "$redis_data_dir" ]; then
    echo "$redis_data_dir is a symlink or not $(id -un)'s: refusing to keep Redis data there" >&2
    return 1
  fi
  chmod 700 "$redis_data_dir"
  (cd "$redis_data_dir" && pwd -P)
}
# redis_persistence <password>: "appendonly yes, appendfsync everysec" (or what the Redis has instead)
redis_persistence() {
  local aof fsync
  aof=$(redis_cli "$1" config get appendonly | sed -n 2p)
  fsync=$(redis_cli "$1" config get appendfsync | sed -n 2p)
  printf 'appendonly %s, appendfsync %s' "${aof:-?}" "${fsync:-?}"
}

start() {
  start_redis
  [ "$redis_only" = 1 ] && return 0
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
  echo "redis: $(redis_state "$(known_redis_password)" | sed 's/^ours$/up (password required)/;
    s/^open$/up WITHOUT a password (start sets it)/; s/^foreign$/up, with another password/')"
  if [ -n "$(known_redis_password)" ] && [ "$(redis_state "$(known_redis_password)")" = ours ]; then
    echo "redis persistence: $(redis_persistence "$(known_redis_password)")"
  fi
  virtlogd_up && echo "virtlogd: up" || echo "virtlogd: down"
  libvirt_up && echo "libvirtd: up" || echo "libvirtd: down"
  postgres_up && echo "postgresql: up" || echo "postgresql: down"
}

case "$cmd" in
  start) start ;;
  status) status ;;
  *) echo "usage: $0 start [--postgres] [--redis-only] | status" >&2; exit 2 ;;
esac
