"""``python -m testbed.fence <host>``: fence a harness host (cut its power), as ``HOST_FENCE_COMMAND``.

For tests of evacuation on the multi-host harness (:mod:`testbed.hosts`): the control plane runs its
fencing command in a process of its own, which finds the run through the state file named by
``$CLOUDCTL_HARNESS_STATE`` (:meth:`~testbed.hosts.NamespaceHosts.fence_env`, or ``--state``) and SIGKILLs
every process of the host's PID namespace (its libvirtd, its guests' QEMU, its compute worker) as
:meth:`~testbed.hosts.NamespaceHosts.power_off` does.

Exit status 0 only when no process of the host is left (its QEMU processes above all: a fenced host
writes to no disk any more), also when it was off already; 1 when some survive; 2 when the host or the
run cannot be found. The test brings the host back with :meth:`~testbed.hosts.NamespaceHosts.power_on`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed.hosts import STATE_ENV, host_processes, load_state, power_off


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.fence", description=__doc__.split("\n\n")[0])
    parser.add_argument("host", help="the harness host's name (host-a, host-b, ...)")
    parser.add_argument("--state", type=Path, help=f"the run's state file (default: ${STATE_ENV})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the processes")
    args = parser.parse_args(argv)
    try:
        state = load_state(args.state)
        init_pid = int(state["hosts"][args.host]["init_pid"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        print(f"testbed.fence: cannot find harness host {args.host!r}: {exc!r}", file=sys.stderr)
        return 2
    try:
        killed = power_off(init_pid, args.timeout)
        left = host_processes(init_pid)
    except RuntimeError as exc:
        print(f"testbed.fence: {args.host}: {exc}", file=sys.stderr)
        return 1
    if left:
        print(f"testbed.fence: {args.host}: processes still run: {left}", file=sys.stderr)
        return 1
    print(f"testbed.fence: {args.host} powered off ({len(killed)} process(es) killed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
