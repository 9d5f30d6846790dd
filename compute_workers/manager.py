"""The compute manager: what every operation of a compute host shares, in plain Python.

The manager holds the host's config, driver, reporter, image cache, per-instance locks and journals,
and does the host's own work: init, host_init and the heartbeat (resources), power-state watching,
image cache cleanup, close. The operations live in families (:mod:`compute_workers.operations`), one
constructed per manager: ``manager.family(Lifecycle).reboot_instance(...)``; tasks (``tasks.py``) only
unpack their arguments and call one method of one family.

No operation raises for its failure (that is reported), so a task is acknowledged once its outcome has
been sent. Operations on one instance are serialized within the process (a terminate that arrives
during a spawn waits for it), and every operation is safe to run twice: Redis redelivers
unacknowledged tasks. Spawn and terminate converge by the domain's name; lifecycle operations also
converge (starting a running domain does nothing) and a completed action is never run again (see
:mod:`compute_workers.journal`): a second reboot is not a no-op, so convergence alone is not enough.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

from compute_workers import contract, shared_storage
from compute_workers.config import ComputeConfig
from compute_workers.images import ImageCache, qcow2_backing_file
from compute_workers.journal import ActionJournal, MigrationJournal
from compute_workers.locks import KeyedLock
from compute_workers.network.firewall import Firewall, HostFirewall, RecordedFirewall
from compute_workers.network.linuxbridge import CommandRunner, HostBridges, LinuxBridges, RecordedBridges
from compute_workers.operations import FAMILIES, OperationFamily
from compute_workers.operations.base import HostContext
from compute_workers.power_events import PowerStateEvents
from compute_workers.reporter import Reporter
from compute_workers.virt.driver import ComputeDriver

LOG = logging.getLogger(__name__)

Family = TypeVar("Family", bound=OperationFamily)


def host_bridges(config: ComputeConfig, driver: ComputeDriver) -> HostBridges:
    """The host's Linux bridges when the driver's guests are taps on them, else a record of them."""
    if driver.capabilities.get("plugs_host_bridges"):
        return LinuxBridges(CommandRunner(config.network_namespace or None), config.tunnel_ip,
                            config.flat_interface)

    def in_use() -> set[str]:
        return {bridge for instance_uuid in driver.list_instances()
                for bridge in driver.instance_bridges(instance_uuid)}
    return RecordedBridges(in_use)


def host_firewall(driver: ComputeDriver, bridges: HostBridges) -> HostFirewall:
    """The host's iptables firewall, in the bridges' network namespace, when the driver's guests are taps
    on them (and the bridges run real commands); else a record of what it would apply."""
    if driver.capabilities.get("plugs_host_bridges") and isinstance(bridges, LinuxBridges) and \
            isinstance(bridges.runner, CommandRunner):
        return Firewall(bridges.runner)
    return RecordedFirewall()


class ComputeManager:
    def __init__(self, config: ComputeConfig, driver: ComputeDriver, reporter: Reporter,
                 families: Iterable[type[OperationFamily]] = FAMILIES,
                 bridges: HostBridges | None = None, firewall: HostFirewall | None = None) -> None:
        images = ImageCache(config.instances_path / "_base", token=config.service_token,
                            timeout=config.image_download_timeout, api_url=config.api_url)
        bridges = bridges or host_bridges(config, driver)
        self.context = HostContext(config=config, driver=driver, reporter=reporter, images=images,
                                   instance_locks=KeyedLock(), journal=ActionJournal(config.instances_path),
                                   migration_journal=MigrationJournal(config.instances_path),
                                   bridges=bridges, firewall=firewall or host_firewall(driver, bridges))
        self._power_events: PowerStateEvents | None = None
        self._owns_power_events = False
        self._next_cache_cleanup = 0.0  # monotonic; the first heartbeat cleans up
        self._families: dict[type[OperationFamily], OperationFamily] = {
            family: family(self.context) for family in families}

    # The host's parts, shared with every family (read-only: the families hold the same ones).

    @property
    def config(self) -> ComputeConfig:
        return self.context.config

    @property
    def host(self) -> str:
        return self.context.host

    @property
    def driver(self) -> ComputeDriver:
        return self.context.driver

    @property
    def reporter(self) -> Reporter:
        return self.context.reporter

    @property
    def images(self) -> ImageCache:
        return self.context.images

    @property
    def instance_locks(self) -> KeyedLock:
        return self.context.instance_locks

    @property
    def journal(self) -> ActionJournal:
        return self.context.journal

    @property
    def migration_journal(self) -> MigrationJournal:
        return self.context.migration_journal

    def family(self, family: type[Family]) -> Family:
        """This host's instance of the operation family ``family`` (e.g. ``Lifecycle``)."""
        try:
            return cast(Family, self._families[family])
        except KeyError:
            raise LookupError(f"the manager of host {self.host} has no {family.__name__} operations"
                              ) from None

    def init_host(self) -> None:
        """Connect the driver and log what the host runs; raises if the hypervisor is unusable."""
        self.driver.init_host()
        instances = self.driver.list_instances()
        LOG.info("host %s ready: driver %s, %d instance(s) found", self.host, self.driver.name,
                 len(instances))
        if self.driver.capabilities["needs_base_image"] and not self.config.service_token:
            LOG.warning("CLOUDCTL_SERVICE_TOKEN is not set: spawns that need to download an image "
                        "will fail")

    # Host ------------------------------------------------------------------------------------------

    def watch_power_states(self, events: PowerStateEvents | None = None) -> None:
        """Send ``conductor.power_state_update`` on every lifecycle event of an instance's domain.

        ``events``: a sender thread shared by several hosts (a fleet), which its owner starts and
        stops; without it the manager runs its own, stopped by :meth:`close`.
        """
        if self._power_events is not None:
            return
        if not self.driver.capabilities["supports_lifecycle_events"]:
            LOG.warning("driver %s has no lifecycle events: power states reach the conductor only with "
                        "the heartbeat", self.driver.name)
            return
        self._owns_power_events = events is None
        if events is None:
            events = PowerStateEvents(self.reporter)
            events.start()
        events.watch(self.host, self.driver)
        self._power_events = events

    def close(self) -> None:
        """Stop the power-state events and release the hypervisor connection."""
        if self._power_events is not None:
            self._power_events.unwatch(self.host)
            if self._owns_power_events:
                self._power_events.stop()
            self._power_events = None
        self.driver.close()

    def host_init(self) -> None:
        """``conductor.host_init``: what this host runs, once at start, before any task is consumed."""
        self.reporter.report(contract.CONDUCTOR_HOST_INIT, host=self.host, resources=self.resources())

    def resources(self) -> dict[str, Any]:
        """The heartbeat's resources: the driver's totals plus what only the worker knows."""
        resources = self.driver.get_available_resource()
        observed_at = time.time()  # before reading the domains: the list is at least this fresh
        # Read before the domains: an operation that ends meanwhile is still named busy (the safe side:
        # the conductor completes no build of a busy instance from this heartbeat).
        busy = self.instance_locks.held()
        resources.update({
            "libvirt_uri": self.config.libvirt_uri,
            "driver": self.driver.name,
            "memory_mb_reserved": self.config.reserved_host_memory_mb,
            "disk_gb_reserved": self.config.reserved_host_disk_gb,
            "instances": self.driver.list_instances(),
            "observed_at": observed_at,
            "busy": busy,
            # The other hosts' VXLAN flood entries point here (the control plane's HostNetwork.peers).
            "tunnel_ip": self.config.tunnel_ip,
            # Hosts reporting the same id share INSTANCES_PATH: an evacuation between them keeps the disk.
            "storage_id": shared_storage.storage_id(self.config.instances_path),
        })
        return resources

    def heartbeat(self) -> None:
        """Report the heartbeat, then clean the image cache when COMPUTE_IMAGE_CACHE_CLEANUP_INTERVAL
        has passed (a failing cleanup is logged, never fails the heartbeat)."""
        self.reporter.report(contract.CONDUCTOR_HOST_HEARTBEAT, host=self.host, resources=self.resources())
        if not self.driver.capabilities["needs_base_image"] or time.monotonic() < self._next_cache_cleanup:
            return
        self._next_cache_cleanup = time.monotonic() + self.config.image_cache_cleanup_interval
        try:
            self.cleanup_image_cache()
        except Exception:
            LOG.exception("image cache cleanup failed")

    def images_in_use(self) -> set[str]:
        """Ids of the cached images some instance disk of this host is backed by."""
        base_dir = self.images.base_dir.resolve()
        used = set()
        for disk in self.config.instances_path.glob("*/disk"):
            backing = qcow2_backing_file(disk)
            if backing and Path(backing).resolve().parent == base_dir:
                used.add(Path(backing).name)
        return used

    def cleanup_image_cache(self) -> list[str]:
        """Remove the cached images no instance uses and no spawn used for COMPUTE_IMAGE_CACHE_MAX_AGE
        seconds; returns their ids."""
        removed = self.images.cleanup(self.config.image_cache_max_age, self.images_in_use())
        if removed:
            LOG.info("image cache cleanup removed %d image(s): %s", len(removed), ", ".join(removed))
        return removed

