"""An entire cloudctl, started from the real Procfile with honcho, on a database of its own (the
launcher itself is testbed.stack, which the benchmarks use too)."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import REPO
from testbed.stack import ExtraWorker, Stack, remove_leftover_domains, run_stack


@pytest.fixture(scope="session")
def stack(tiny_image_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Every process of the real Procfile, one compute worker on qemu:///system. That host is the
    network node too (``NETWORK_DHCP_HOST``): its worker runs the DHCP servers of the stack's
    networks, in ``qdhcp-`` namespaces of the root one (the default, the machine's host name, has no
    worker in this stack)."""
    host = f"e2e-{secrets.token_hex(3)}"
    with run_stack(tiny_image_path, tmp_path_factory.mktemp("stack"), procfile=REPO / "Procfile",
                   hosts=[host], redis_dbs=(13, 12),
                   extra_env={"COMPUTE_HOST": host, "NETWORK_DHCP_HOST": host}) as running:
        yield running


@pytest.fixture
def extra_worker(stack: Stack) -> Iterator[ExtraWorker]:
    name = f"{stack.host}-b"
    instances = Path("/var/lib/cloudctl-test") / name
    instances.mkdir(parents=True, exist_ok=True)
    worker = ExtraWorker(stack, name, instances)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        remove_leftover_domains(instances)
        shutil.rmtree(instances, ignore_errors=True)
