"""Fixtures of the multi-host tests: independent libvirt hosts on this machine (see testbed/hosts.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed.cloud import Cloud, host_workers
from testbed.hosts import HostWorker, NamespaceHost, NamespaceHosts, missing_capabilities
from testbed.stack import procfile_processes, run_stack

# host-b and host-c share their instances directory through bind mounts, which libvirt cannot tell
# from local storage; a live migration whose deadline is short enough to test (20 s for the 128 MiB
# demo guest: an unthrottled migration takes ~2 s, one throttled to 1 MiB/s streams ~94 MiB);
# migration steps reaped quickly.
CLOUD_ENV = {"COMPUTE_MIGRATION_UNSAFE": "1", "LIVE_MIGRATION_COMPLETION_TIMEOUT": "160",
             "MIGRATION_STEP_TIMEOUT": "60", "COMPUTE_CONCURRENCY": "4",
             "COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY": "1"}
CLOUD_REDIS_DBS = (3, 2)  # broker, RPC backend: this fixture's alone (other suites use others at once)


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


@pytest.fixture(scope="session")
def cloud(tiny_image_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """A whole cloudctl on three harness hosts, for the session: host-a with private storage, host-b
    and host-c sharing theirs; web, scheduler, conductor and beat from the real Procfile under honcho;
    one compute worker per host (``cloud.workers``, see :class:`testbed.hosts.HostWorker`). Yields once the
    API answers and every host heartbeats. Tests leave no server behind."""
    with running_hosts(3, shared=(("host-b", "host-c"),)) as harness:
        workers: dict[str, HostWorker] = {}
        started = time.monotonic()
        with run_stack(tiny_image_path, tmp_path_factory.mktemp("cloud"),
                       procfile=procfile_processes(without=("compute", "flower")),
                       hosts=[host.name for host in harness.hosts], redis_dbs=CLOUD_REDIS_DBS,
                       extra_env=CLOUD_ENV,
                       companions=lambda stack: host_workers(harness, stack, workers)) as stack:
            print(f"\ncloudctl on {len(harness.hosts)} harness hosts: up in "
                  f"{time.monotonic() - started:.2f} s")
            yield Cloud(harness, stack, workers)
            stopping = time.monotonic()
        print(f"\ncloudctl on harness hosts: stopped in {time.monotonic() - stopping:.2f} s")
