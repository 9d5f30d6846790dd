"""Fixtures of the multi-host tests: independent libvirt hosts on this machine (see hosts.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from .hosts import NamespaceHost, NamespaceHosts, missing_capabilities


def skip_unless_capable() -> None:
    """Skip, saying why, where the machine lacks what the harness needs (never silently)."""
    if os.environ.get("CLOUDCTL_SKIP_LIBVIRT") == "1":
        pytest.skip("CLOUDCTL_SKIP_LIBVIRT=1: real-libvirt tests skipped on purpose")
    reason = missing_capabilities()
    if reason is not None:
        pytest.skip(reason)


@contextmanager
def running_hosts(count: int, shared: Sequence[Sequence[str]] = ()) -> Iterator[NamespaceHosts]:
    """Started harness hosts, torn down (no daemon, guest, worker or netns left) whatever happened."""
    skip_unless_capable()
    hosts = NamespaceHosts(count=count, shared=shared)
    started = time.monotonic()
    try:
        hosts.start()
        print(f"\nmulti-host harness: {len(hosts.hosts)} hosts up in {time.monotonic() - started:.2f} s")
        yield hosts
    finally:
        stopping = time.monotonic()
        hosts.stop()
        print(f"\nmulti-host harness: torn down in {time.monotonic() - stopping:.2f} s")


@pytest.fixture(scope="module")
def libvirt_hosts() -> Iterator[list[NamespaceHost]]:
    """Two libvirt hosts, each in its own namespaces, for the module."""
    with running_hosts(2) as hosts:
        yield hosts.hosts


@pytest.fixture(scope="module")
def shared_hosts() -> Iterator[NamespaceHosts]:
    """Three libvirt hosts for the module: host-a with private storage, host-b and host-c sharing
    their instances directory."""
    with running_hosts(3, shared=(("host-b", "host-c"),)) as hosts:
        yield hosts
