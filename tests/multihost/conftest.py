"""Fixtures of the multi-host tests: independent libvirt hosts on this machine (see hosts.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from .hosts import NamespaceHost, NamespaceHosts, missing_capabilities


@pytest.fixture(scope="module")
def libvirt_hosts() -> Iterator[list[NamespaceHost]]:
    """Two libvirt hosts, each in its own namespaces; torn down (no daemon, guest or netns left) after
    the module, whatever happened. Skips, saying why, where the machine lacks what they need."""
    if os.environ.get("CLOUDCTL_SKIP_LIBVIRT") == "1":
        pytest.skip("CLOUDCTL_SKIP_LIBVIRT=1: real-libvirt tests skipped on purpose")
    reason = missing_capabilities()
    if reason is not None:
        pytest.skip(reason)
    hosts = NamespaceHosts(count=2)
    started = time.monotonic()
    try:
        hosts.start()
        print(f"\nmulti-host harness: {len(hosts.hosts)} hosts up in {time.monotonic() - started:.2f} s")
        yield hosts.hosts
    finally:
        stopping = time.monotonic()
        hosts.stop()
        print(f"\nmulti-host harness: torn down in {time.monotonic() - stopping:.2f} s")
