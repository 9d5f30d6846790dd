"""An entire cloudctl, started from the real Procfile with honcho, on a database of its own (the
launcher itself is testbed.stack, which the benchmarks use too)."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from testbed import REPO
from testbed.dhcpnet import missing_capabilities
from testbed.outside import OutsideWorld
from testbed.stack import ExtraWorker, Stack, remove_leftover_domains, run_stack

# The VNIs of this run's vxlan networks: a block of 100 of its own (the `vxlan-<VNI>` devices live in the
# root namespace, so two stacks on this machine, or `make run`'s 1000:1999, must not share a VNI).
VNI_BLOCK = 100


@pytest.fixture(scope="session")
def outside_world() -> Iterator[OutsideWorld | None]:
    """The outside world of the stack's external network (testbed.outside); None (and no uplink in
    the stack) on a machine without namespaces, bridges or veths."""
    if missing_capabilities():
        yield None
        return
    world = OutsideWorld.unique()
    try:
        world.up()
        yield world
    finally:
        world.down()


@pytest.fixture(scope="session")
def stack(tiny_image_path: Path, tmp_path_factory: pytest.TempPathFactory,
          outside_world: OutsideWorld | None) -> Iterator[Stack]:
    """Every process of the real Procfile, one compute worker on qemu:///system. That host is the
    network node too (``NETWORK_NODE_HOST``, ``NETWORK_DHCP_HOST``): its worker runs the DHCP servers of
    the stack's networks, in ``qdhcp-`` namespaces, and the routers, in ``qrouter-`` ones (the default,
    the machine's host name, has no worker in this stack). Its tunnel endpoint is 127.0.0.1 (vxlan
    networks, VNIs from a block of this run's own), and its flat uplink the root end of the
    ``outside_world``'s veth: a flat network is the external one, reaching only that namespace. Its
    workers deliver every task twice (``COMPUTE_TEST_DUPLICATE_DELIVERY=1``)."""
    host = f"e2e-{secrets.token_hex(3)}"
    vni = 10_000 + secrets.randbelow((16_000_000 - 10_000) // VNI_BLOCK) * VNI_BLOCK
    # Every compute and network task of the stack's workers is run twice (README: Duplicate delivery):
    # each e2e test proves, besides its own point, that a redelivery changes nothing.
    extra_env = {"COMPUTE_HOST": host, "NETWORK_DHCP_HOST": host, "NETWORK_NODE_HOST": host,
                 "COMPUTE_TUNNEL_IP": "127.0.0.1", "NETWORK_VNI_RANGE": f"{vni}:{vni + VNI_BLOCK - 1}",
                 "COMPUTE_TEST_DUPLICATE_DELIVERY": "1"}
    if outside_world is not None:
        extra_env["COMPUTE_FLAT_INTERFACE"] = outside_world.interface
    with run_stack(tiny_image_path, tmp_path_factory.mktemp("stack"), procfile=REPO / "Procfile",
                   hosts=[host], redis_dbs=(13, 12), extra_env=extra_env) as running:
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


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    """A connection to the libvirtd the e2e stack's worker uses (qemu:///system), errors not printed."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    connection = libvirt.open("qemu:///system")
    yield connection
    connection.close()
