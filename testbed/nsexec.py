"""Run a command inside a harness host's mount, UTS and PID namespaces, in the caller's network
namespace, and stand in for it: signals sent to this process reach the command, and its exit status
is this process's.

    python testbed/nsexec.py --target <PID> [--wd DIR] [--setenv NAME=VALUE]... -- COMMAND...

``<PID>`` is a process of the host (its PID 1) as the caller's PID namespace numbers it. A compute
worker started this way sees the host's private ``/run/libvirt`` (so ``qemu:///system`` is that host's
daemon), its instances directory and its hostname, lives in its PID namespace (so it dies with the
host), yet reaches Redis and the API on 127.0.0.1 and the other hosts over the root namespace's veth.

Why not ``nsenter --mount --uts --pid``: entering a PID namespace only moves the children, so nsenter
forks, and (util-linux 2.38) it forwards no signal to that child: SIGTERM ends nsenter at once and
leaves the command running, reparented to the root namespace's init. Here the command also gets a
process group of its own (so a signal to this process's group, as honcho sends, reaches it once, by
forwarding) and dies with SIGKILL if this process dies (``PR_SET_PDEATHSIG``).

Standard library only, single-threaded: ``setns`` into a mount namespace refuses threaded callers.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from typing import NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
# Mount last: once in the host's mount namespace, /proc is the host's and <PID> means nothing there.
NAMESPACES = (("uts", CLONE_NEWUTS), ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter(target: int) -> None:
    """Join the UTS, PID (for children to come) and mount namespaces of process ``target``."""
    descriptors = [(os.open(f"/proc/{target}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), name, flag)
                   for name, flag in NAMESPACES]
    try:
        for fd, name, flag in descriptors:
            _check(_libc.setns(fd, flag), f"setns({name} of {target})")
    finally:
        for fd, _name, _flag in descriptors:
            os.close(fd)


def _child(argv: list[str], wd: str, mask: set[int | signal.Signals]) -> NoReturn:
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        # The parent lives outside this PID namespace, so it reads as 0; anything else means it died
        # before PR_SET_PDEATHSIG took effect and this process was reparented.
        if os.getppid() != 0:
            os._exit(1)
        os.setpgid(0, 0)
        os.chdir(wd)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.execvp(argv[0], argv)
    except BaseException as exc:
        print(f"nsexec: cannot run {argv[0]}: {exc}", file=sys.stderr, flush=True)
    os._exit(127)


def run(target: int, argv: list[str], wd: str, env: dict[str, str]) -> NoReturn:
    os.environ.update(env)
    enter(target)
    # Signals wait (blocked) until the parent forwards them, so none is lost around the fork.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:
        _child(argv, wd, mask)
    for signum in FORWARDED:
        signal.signal(signum, lambda received, _frame: os.kill(pid, received))
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _pid, status = os.waitpid(pid, 0)  # retried after each forwarded signal (PEP 475)
    if os.WIFSIGNALED(status):
        received = os.WTERMSIG(status)
        if received != signal.SIGKILL:
            signal.signal(received, signal.SIG_DFL)
        os.kill(os.getpid(), received)  # end the way the command ended
        sys.exit(128 + received)
    sys.exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="nsexec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, required=True, help="a PID of the host (root numbering)")
    parser.add_argument("--wd", default=os.getcwd(), help="working directory of the command")
    parser.add_argument("--setenv", action="append", default=[], metavar="NAME=VALUE",
                        help="set an environment variable of the command")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    env = dict(item.split("=", 1) for item in args.setenv)
    run(args.target, command, args.wd, env)


if __name__ == "__main__":
    main()
