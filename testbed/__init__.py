"""The test bed: what starts a whole cloudctl on this machine, shared by the end-to-end and multi-host
tests (``tests/``) and the benchmarks (``bench/``).

Runs with ``requirements.txt`` alone: nothing here imports pytest or ``tests`` (an import-linter
contract holds it), and nothing in cloudctl, scheduler or compute_workers imports this package.
Where the tests skip (say the machine cannot make namespaces), this package answers why, and the
fixtures in ``tests/`` turn the answer into a skip.

- :mod:`testbed.stack`: every process of the Procfile under honcho, on a database and Redis DBs of
  their own (:func:`~testbed.stack.run_stack`, :class:`~testbed.stack.Stack`).
- :mod:`testbed.hosts`: independent libvirt hosts in network namespaces, and a compute worker on one.
- :mod:`testbed.cloud`: the control plane plus a compute worker on each of those hosts.
- :mod:`testbed.images`: the demo guest image.
- :mod:`testbed.dhcpnet`: a network for guests booted with QEMU directly: bridge, taps and dnsmasq in a
  network namespace of its own.
- :mod:`testbed.domains`: removing leftover guests from a libvirt connection.
- :mod:`testbed.broker`: the Redis URLs, carrying cloudctl's one Redis password.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
