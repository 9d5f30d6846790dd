"""An in-memory hypervisor: the driver of benchmarks that simulate hundreds of hosts, and of tests.

It keeps the same contract as the libvirt driver (the same contract tests run against both) with
configurable sizes and delays. Failures are injected by tiny subclasses, as Nova's fake driver does.

Live migration works between fake drivers of one process (a fleet, a test): a driver given a
``migration_uri`` is found at it by the others; the migration takes ``migration_delay`` seconds, its
progress counts the flavor's memory, and it can be aborted until its last moment. A switch-over (to
post-copy, or pausing the guest) ends it ``switch_over_delay`` seconds later, unless it would end
sooner; in post-copy it can no longer be aborted, and with ``post_copy_failure`` set it then fails as
libvirt's does, leaving the guest paused here and nowhere else. ``post_copy_refusals`` switches to
post-copy are refused first, as libvirt refuses them while a block migration copies the disk.

Given a ``state_file`` (``COMPUTE_FAKE_STATE_DIR``), the domains outlive the worker's process as libvirt's
do: every change is written there durably and a new driver on the same file starts with them. The
kill -9 tests and the chaos bench need it; without it a killed fake worker is a host that rebooted.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.durable import replace_durably
from compute_workers.exception import (
    CPUIncompatible,
    HypervisorError,
    InstanceExists,
    InstanceInvalidState,
    InstanceNotFound,
    MigrationAborted,
)
from compute_workers.virt.driver import (
    SWITCHED_BY_PAUSING,
    SWITCHED_TO_POST_COPY,
    ComputeDriver,
    DiskMigration,
    checked_uuid,
)

# The disks "copied" by fake cold migrations, by instance uuid: the boot count each one carries.
# Shared by every FakeDriver of the process, as a network is: fake hosts of one fleet migrate to each
# other, and a same-host resize works as it does on one libvirt host.
_COPIED_DISKS: dict[str, int] = {}
_COPIED_DISKS_LOCK = threading.Lock()

# The instances' "disks" (libvirt: INSTANCES_PATH/<uuid>/disk), by (storage, instance uuid): the instance
# whose disk it is (its boot count is the disk's). A driver's storage is its ``instances_path`` (fake
# hosts given the same path share it, as hosts mounting one share do), else its own. What an evacuation
# on shared storage finds, or does not; a live migration or a cold one moves it to the destination's.
_DISKS: dict[tuple[str, str], FakeInstance] = {}
_DISKS_LOCK = threading.Lock()


@dataclasses.dataclass
class FakeInstance:
    spec: dict[str, Any]
    power_state: str
    console: list[str]
    boots: int = 1

    @property
    def interfaces(self) -> list[dict[str, Any]]:
        """The guest's NICs as the libvirt driver defines them (``<interface type='bridge'>``), one per
        entry of the spec's networks, in order: ``{"type", "mac", "bridge", "tap", "model", "mtu"}``."""
        return [{"type": "bridge", "mac": network["mac_address"], "bridge": network["bridge"],
                 "tap": network["tap"], "model": "virtio", "mtu": network["mtu"]}
                for network in self.spec.get("networks") or ()]


@dataclasses.dataclass
class _FakeMigrationJob:
    total: int
    seconds: float
    post_copy: bool = False  # started with post-copy permitted
    started: float = dataclasses.field(default_factory=time.monotonic)
    aborted: threading.Event = dataclasses.field(default_factory=threading.Event)
    changed: threading.Event = dataclasses.field(default_factory=threading.Event)  # abort or switch-over
    committed: bool = False  # past the point where an abort can stop it (completing, or in post-copy)
    switched: str | None = None  # SWITCHED_TO_POST_COPY or SWITCHED_BY_PAUSING
    ends_at: float = 0.0  # monotonic

    def __post_init__(self) -> None:
        self.ends_at = self.started + self.seconds

    def processed(self) -> int:
        span = self.ends_at - self.started
        done = 1.0 if span <= 0 else min(1.0, (time.monotonic() - self.started) / span)
        return int(self.total * done)


# migration URI -> the fake driver that answers there (in this process).
_MIGRATION_PEERS: weakref.WeakValueDictionary[str, FakeDriver] = weakref.WeakValueDictionary()
_PEERS_LOCK = threading.Lock()


class FakeDriver(ComputeDriver):
    """Domains live in a dict; nothing touches the disk unless ``needs_base_image`` asks the manager
    to download images (to exercise the image cache without a hypervisor)."""

    name = "fake"

    def __init__(self, *, vcpus: int = 16, memory_mb: int = 32768, disk_gb: int = 500,
                 spawn_delay: float = 0.0, destroy_delay: float = 0.0,
                 needs_base_image: bool = False, migration_uri: str | None = None,
                 instances_path: Path | None = None, state_file: Path | None = None) -> None:
        super().__init__()
        self.storage = str(instances_path.absolute()) if instances_path is not None else f"fake-{id(self)}"
        self.capabilities = {**self.capabilities, "needs_base_image": needs_base_image,
                             "supports_reboot": True, "supports_power_ops": True,
                             "supports_pause": True, "supports_suspend": True,
                             "supports_lifecycle_events": True, "supports_snapshot": True,
                             "supports_live_migration": True}
        self.vcpus, self.memory_mb, self.disk_gb = vcpus, memory_mb, disk_gb
        self.spawn_delay, self.destroy_delay = spawn_delay, destroy_delay
        self.snapshot_delay = 0.0
        self.migration_delay = 0.0
        # What a migration still takes after its switch-over (post-copy, or the guest paused).
        self.switch_over_delay = 0.2
        # Set: a migration switched to post-copy fails with this message (the network broke, say).
        self.post_copy_failure: str | None = None
        # How many switches to post-copy libvirt refuses first, as it does while a block migration
        # still copies the disk.
        self.post_copy_refusals = 0
        # The flags the last live_migration() was called with, as a test reads them.
        self.last_migration_flags: dict[str, bool] = {}
        self.instances: dict[str, FakeInstance] = {}
        # What a resize's source keeps until confirmed or reverted (libvirt: <uuid>_resize/).
        self.resize_sources: dict[str, FakeInstance] = {}
        self._lock = threading.Lock()
        self._lifecycle_callback: Callable[[str], None] | None = None
        self._migrations: dict[str, _FakeMigrationJob] = {}
        self.state_file = state_file
        if state_file is not None and state_file.exists():
            saved = json.loads(state_file.read_text())
            self.instances = {uuid: FakeInstance(**fields) for uuid, fields in saved.items()}
        if migration_uri is not None:
            with _PEERS_LOCK:
                _MIGRATION_PEERS[migration_uri] = self

    def init_host(self) -> None:
        pass

    def get_available_resource(self) -> dict[str, Any]:
        return {
            "virt_type": "qemu",
            "hypervisor_type": "QEMU",
            "hypervisor_version": 7002000,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "disk_gb": self.disk_gb,
            "cpu_info": {"arch": "x86_64", "model": "fake", "vendor": "cloudctl", "features": []},
        }

    def list_instances(self) -> dict[str, str]:
        with self._lock:
            return {uuid: instance.power_state for uuid, instance in self.instances.items()}

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        with self._lock:
            if instance_uuid in self.instances:
                raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        time.sleep(self.spawn_delay)
        console = [f"cloudctl-fake: booting {contract.domain_name(instance_uuid)}",
                   "cloudctl-guest: boot-count 1", "cloudctl-guest: ready"]
        with self._lock:
            self.instances[instance_uuid] = instance = FakeInstance(spec, contract.POWER_RUNNING, console)
        self._disk_set(instance_uuid, instance)
        self._changed(instance_uuid)

    def destroy(self, instance_uuid: str, destroy_disks: bool = True) -> None:
        checked_uuid(instance_uuid)
        time.sleep(self.destroy_delay)
        with self._lock:
            gone = self.instances.pop(instance_uuid, None)
        if destroy_disks:
            self._disk_pop(instance_uuid)
        if gone is not None:
            self._changed(instance_uuid)

    def rebuild(self, spec: dict[str, Any], base_image: Path | None, on_shared_storage: bool,
                power_on: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        name = contract.domain_name(instance_uuid)
        with self._lock:
            if instance_uuid in self.instances:
                raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        if on_shared_storage:
            with _DISKS_LOCK:
                disk = _DISKS.get((self.storage, instance_uuid))
            if disk is None:
                raise InstanceNotFound(f"the disk of instance {instance_uuid} is not on this host's storage "
                                       f"({self.storage}), which should share it with the host that died: "
                                       "nothing was created in its place")
            console = [*disk.console, f"cloudctl-fake: {name} defined on the disk of a host that died"]
            instance = FakeInstance(spec, contract.POWER_SHUTDOWN, console, disk.boots)
        else:
            time.sleep(self.spawn_delay)
            instance = FakeInstance(spec, contract.POWER_SHUTDOWN,
                                    [f"cloudctl-fake: {name} rebuilt from its image"], 0)
        with self._lock:
            self.instances[instance_uuid] = instance
        self._disk_set(instance_uuid, instance)
        self._changed(instance_uuid)
        if power_on:
            self.power_on(instance_uuid)

    def has_disk(self, instance_uuid: str) -> bool:
        """Whether this host's storage holds the instance's disk (libvirt: ``<uuid>/disk`` exists)."""
        with _DISKS_LOCK:
            return (self.storage, checked_uuid(instance_uuid)) in _DISKS

    def _disk_set(self, instance_uuid: str, instance: FakeInstance, storage: str | None = None) -> None:
        with _DISKS_LOCK:
            _DISKS[(storage or self.storage, instance_uuid)] = instance

    def _disk_pop(self, instance_uuid: str, only: FakeInstance | None = None) -> None:
        """Remove the instance's disk from this host's storage (``only``: if it is still that one's)."""
        with _DISKS_LOCK:
            key = (self.storage, instance_uuid)
            if only is None or _DISKS.get(key) is only:
                _DISKS.pop(key, None)

    def _get(self, instance_uuid: str) -> FakeInstance:
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
        if instance is None:
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
        return instance

    def get_info(self, instance_uuid: str) -> str:
        return self._get(instance_uuid).power_state

    def instance_bridges(self, instance_uuid: str) -> list[str]:
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
        return [] if instance is None else [interface["bridge"] for interface in instance.interfaces]

    def instance_taps(self, instance_uuid: str) -> list[str]:
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
        return [] if instance is None else [interface["tap"] for interface in instance.interfaces]

    def get_console_output(self, instance_uuid: str, lines: int) -> str:
        console = self._get(instance_uuid).console
        return "".join(line + "\n" for line in console[-lines:]) if lines > 0 else ""

    # Lifecycle ---------------------------------------------------------------------------------------

    def register_lifecycle_callback(self, callback: Callable[[str], None] | None) -> None:
        self._lifecycle_callback = callback

    def close(self) -> None:
        self._lifecycle_callback = None

    def _save(self) -> None:
        """Write the domains to ``state_file`` (if any): what a new driver on it starts with."""
        if self.state_file is None:
            return
        with self._lock:
            data = json.dumps({uuid: dataclasses.asdict(instance)
                               for uuid, instance in self.instances.items()})
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            replace_durably(self.state_file, data.encode())

    def _changed(self, instance_uuid: str) -> None:
        self._save()
        callback = self._lifecycle_callback
        if callback is not None:
            callback(instance_uuid)

    def _set_state(self, instance_uuid: str, allowed_from: tuple[str, ...], target: str, *,
                   boot: bool = False, spec: dict[str, Any] | None = None) -> None:
        """Move to ``target`` from one of ``allowed_from`` (else InstanceInvalidState); already there
        is success. ``boot``: the guest boots (counted, and said on the console)."""
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
            if instance is None:
                raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
            if instance.power_state == target and not boot:
                return
            if instance.power_state not in allowed_from:
                raise InstanceInvalidState(f"instance {instance_uuid} is {instance.power_state}, "
                                           f"cannot become {target}")
            instance.power_state = target
            if spec is not None:
                instance.spec = spec
            if boot:
                instance.boots += 1
                instance.console += [f"cloudctl-guest: boot-count {instance.boots}", "cloudctl-guest: ready"]
        self._changed(instance_uuid)

    def guest_power_off(self, instance_uuid: str) -> None:
        """The guest powers itself off (``poweroff`` inside it): no call of the manager's made it."""
        self._set_state(instance_uuid, (contract.POWER_RUNNING,), contract.POWER_SHUTDOWN)

    def shutdown(self, instance_uuid: str, timeout: float) -> bool:
        state = self.get_info(instance_uuid)
        if state in (contract.POWER_SHUTDOWN, contract.POWER_SUSPENDED):
            return True
        if state != contract.POWER_RUNNING:
            return False
        self._set_state(instance_uuid, (contract.POWER_RUNNING,), contract.POWER_SHUTDOWN)
        return True

    def power_off(self, instance_uuid: str, timeout: float) -> bool:
        if self.get_info(instance_uuid) == contract.POWER_SHUTDOWN:
            return True
        clean = timeout > 0 and self.shutdown(instance_uuid, timeout)
        # Forced, or the saved memory state of a suspended instance discarded.
        self._set_state(instance_uuid, contract.POWER_STATES, contract.POWER_SHUTDOWN)
        return clean

    def power_on(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        state = self.get_info(instance_uuid)  # the fake keeps no disks: a lost domain stays lost
        if state == contract.POWER_RUNNING:
            return
        boots = state in (contract.POWER_SHUTDOWN, contract.POWER_CRASHED)  # not a restore nor unpause
        self._set_state(instance_uuid, (contract.POWER_SHUTDOWN, contract.POWER_CRASHED,
                                        contract.POWER_SUSPENDED, contract.POWER_PAUSED),
                        contract.POWER_RUNNING, boot=boots, spec=spec)

    def hard_reboot(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        self._set_state(instance_uuid, contract.POWER_STATES, contract.POWER_RUNNING, boot=True,
                        spec=spec)

    def pause(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_RUNNING,), contract.POWER_PAUSED)

    def unpause(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_PAUSED,), contract.POWER_RUNNING)

    def suspend(self, instance_uuid: str) -> None:
        # As libvirt's managed save: shut off with the memory saved, restored running.
        self._set_state(instance_uuid, (contract.POWER_RUNNING, contract.POWER_PAUSED),
                        contract.POWER_SUSPENDED)

    def resume(self, instance_uuid: str) -> None:
        self._set_state(instance_uuid, (contract.POWER_SUSPENDED,), contract.POWER_RUNNING)

    # Cold migration and resize --------------------------------------------------------------------------

    def migrate_disk_and_power_off(self, instance_uuid: str, dest_uri: str, shutdown_timeout: float,
                                   progress: Callable[[int, int], None],
                                   copy_timeout: float) -> DiskMigration:
        checked_uuid(instance_uuid)
        with self._lock:
            instance = self.instances.get(instance_uuid)
            resumed = instance is None and instance_uuid in self.resize_sources
            if instance is not None and instance_uuid in self.resize_sources:
                raise InstanceInvalidState(f"cannot resize instance {instance_uuid}: the files of an earlier "
                                           "resize are still on this host")
        if instance is None and not resumed:
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
        clean: bool | None = None
        if instance is not None:
            power_state = instance.power_state
            if power_state != contract.POWER_SHUTDOWN:
                clean = self.power_off(instance_uuid, shutdown_timeout)
            with self._lock:
                self.resize_sources[instance_uuid] = self.instances.pop(instance_uuid)
                self.resize_sources[instance_uuid].power_state = power_state  # what a revert returns to
            self._changed(instance_uuid)
        source = self.resize_sources[instance_uuid]
        started = time.monotonic()
        size = 20 * 1024 * 1024
        try:
            self._copy_disk(instance_uuid, source, dest_uri, progress, size)
        except BaseException:
            with self._lock:
                restored = self.resize_sources.pop(instance_uuid)
                before, restored.power_state = restored.power_state, contract.POWER_SHUTDOWN
                self.instances[instance_uuid] = restored
            if before in (contract.POWER_RUNNING, contract.POWER_PAUSED):
                self.power_on(instance_uuid)
            else:
                self._changed(instance_uuid)
            raise
        return DiskMigration(power_state=source.power_state, clean_shutdown=clean, disk_bytes=size,
                             sent_bytes=size, copy_seconds=time.monotonic() - started, resumed=resumed)

    def _copy_disk(self, instance_uuid: str, source: FakeInstance, dest_uri: str,
                   progress: Callable[[int, int], None], size: int) -> None:
        progress(0, size)
        with _COPIED_DISKS_LOCK:
            _COPIED_DISKS[instance_uuid] = source.boots
        progress(size, size)

    def finish_migration(self, spec: dict[str, Any], power_on: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        with _COPIED_DISKS_LOCK:
            boots = _COPIED_DISKS.get(instance_uuid)
        with self._lock:
            existing = self.instances.get(instance_uuid)
            if existing is None:
                if boots is None:
                    raise InstanceNotFound(f"the disk of instance {instance_uuid} is not on this host: it "
                                           "was not copied here")
                name = contract.domain_name(instance_uuid)
                console = [f"cloudctl-fake: {name} defined from a migrated disk"]
                self.instances[instance_uuid] = FakeInstance(spec, contract.POWER_SHUTDOWN, console, boots)
            else:
                existing.spec = spec
            instance = self.instances[instance_uuid]
        self._disk_set(instance_uuid, instance)
        self._changed(instance_uuid)
        if power_on:
            self.power_on(instance_uuid)

    def confirm_migration(self, instance_uuid: str, instance_moved: bool | None) -> None:
        checked_uuid(instance_uuid)
        with self._lock:
            original = self.resize_sources.pop(instance_uuid, None)
            leftover = self.instances.pop(instance_uuid, None) if instance_moved else None
        if original is not None:  # its <uuid>_resize goes (not the copy a same-host resize made)
            self._disk_pop(instance_uuid, only=original)
        with _COPIED_DISKS_LOCK:
            _COPIED_DISKS.pop(instance_uuid, None)
        if leftover is not None:
            self._changed(instance_uuid)

    def finish_revert_migration(self, spec: dict[str, Any], power_on: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        with self._lock:
            original = self.resize_sources.get(instance_uuid)
            if original is not None:
                if instance_uuid in self.instances:
                    raise InstanceInvalidState(f"cannot revert the resize of instance {instance_uuid}: the "
                                               "resized copy is still on this host")
                original.spec, original.power_state = spec, contract.POWER_SHUTDOWN
                self.instances[instance_uuid] = self.resize_sources.pop(instance_uuid)
            elif instance_uuid not in self.instances:
                raise InstanceNotFound(f"instance {instance_uuid} has nothing to revert to on this host")
            instance = self.instances[instance_uuid]
        self._disk_set(instance_uuid, instance)
        with _COPIED_DISKS_LOCK:
            _COPIED_DISKS.pop(instance_uuid, None)
        self._changed(instance_uuid)
        if power_on:
            self.power_on(instance_uuid, spec)

    def snapshot(self, instance_uuid: str, target_path: Path,
                 progress: Callable[[int, int], None]) -> None:
        instance = self._get(instance_uuid)
        kind = "live" if instance.power_state in (contract.POWER_RUNNING, contract.POWER_PAUSED) else "cold"
        data = f"cloudctl fake snapshot of {instance_uuid} ({kind}, boot {instance.boots})\n".encode()
        progress(0, len(data))
        time.sleep(self.snapshot_delay)
        target_path.write_bytes(data)
        progress(len(data), len(data))

    # Live migration ------------------------------------------------------------------------------------

    def compare_cpu(self, cpu_info: Mapping[str, Any]) -> str:
        own = self.get_available_resource()["cpu_info"]
        if cpu_info.get("arch") and cpu_info.get("arch") != own["arch"]:
            raise CPUIncompatible(f"host CPU architecture {own['arch']} differs from the source's "
                                  f"{cpu_info.get('arch')}")
        return "identical" if dict(cpu_info) == own else "skipped"

    def pre_live_migration(self, spec: dict[str, Any], base_image: Path | None, block_migration: bool,
                           shared_storage: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        with self._lock:
            if instance_uuid in self.instances:
                raise InstanceExists(f"instance {instance_uuid} already exists on this host")

    def live_migration(self, instance_uuid: str, dest_uri: str, dest_migrate_uri: str | None = None,
                       block_migration: bool = False, *, unsafe: bool = False, bandwidth_mib: int = 0,
                       post_copy: bool = False, auto_converge: bool = False) -> None:
        instance = self._get(instance_uuid)
        self.last_migration_flags = {"block_migration": block_migration, "unsafe": unsafe,
                                     "post_copy": post_copy, "auto_converge": auto_converge}
        if instance.power_state not in (contract.POWER_RUNNING, contract.POWER_PAUSED):
            raise InstanceInvalidState(f"instance {instance_uuid} is not running: nothing to live-migrate")
        with _PEERS_LOCK:
            peer = _MIGRATION_PEERS.get(dest_uri)
        if peer is None or peer is self:
            raise HypervisorError(f"the fake hypervisor could not migrate it to {dest_uri}: no other fake "
                                  "hypervisor of this process answers there")
        job = _FakeMigrationJob(total=int(instance.spec["flavor"]["memory_mb"]) * 1024 * 1024,
                                seconds=self.migration_delay, post_copy=post_copy)
        running_before = instance.power_state  # what the destination resumes a guest paused for it to
        with self._lock:
            self._migrations[instance_uuid] = job
        aborted = MigrationAborted("the fake hypervisor aborted the migration job: canceled by client")
        try:
            while True:
                with self._lock:
                    if job.aborted.is_set():
                        raise aborted
                    remaining = job.ends_at - time.monotonic()
                    if remaining <= 0:
                        job.committed = True
                        break
                    job.changed.clear()
                job.changed.wait(remaining)
            if job.switched == SWITCHED_TO_POST_COPY and self.post_copy_failure is not None:
                raise HypervisorError(f"the fake hypervisor's migration failed in post-copy: "
                                      f"{self.post_copy_failure}")
            with peer._lock:
                if instance_uuid in peer.instances:
                    raise HypervisorError(f"the fake hypervisor could not migrate it to {dest_uri}: a domain "
                                          "of that instance already exists there")
                peer.instances[instance_uuid] = arrived = dataclasses.replace(
                    instance, power_state=running_before,
                    console=[*instance.console, "cloudctl-fake: live-migrated here"])
            with self._lock:
                self.instances.pop(instance_uuid, None)
            self._disk_pop(instance_uuid)  # on shared storage: the same key, set again just below
            peer._disk_set(instance_uuid, arrived)
        finally:
            with self._lock:
                self._migrations.pop(instance_uuid, None)
        self._changed(instance_uuid)
        peer._changed(instance_uuid)

    def live_migration_progress(self, instance_uuid: str) -> dict[str, int] | None:
        self._get(instance_uuid)
        with self._lock:
            job = self._migrations.get(instance_uuid)
        if job is None:
            return None
        processed = job.processed()
        return {"memory_total": job.total, "memory_processed": processed,
                "memory_remaining": job.total - processed, "disk_total": 0, "disk_processed": 0,
                "disk_remaining": 0}

    def abort_live_migration(self, instance_uuid: str) -> bool:
        self._get(instance_uuid)
        with self._lock:
            job = self._migrations.get(instance_uuid)
            if job is None:
                return False
            if job.switched == SWITCHED_TO_POST_COPY:
                raise HypervisorError(f"cannot abort the migration of instance {instance_uuid}: it is in "
                                      "post-copy mode")
            if job.committed:
                raise HypervisorError(f"cannot abort the migration of instance {instance_uuid}: it is "
                                      "completing")
            job.aborted.set()
            job.changed.set()
        return True

    def live_migration_force_complete(self, instance_uuid: str, post_copy: bool) -> str:
        instance = self._get(instance_uuid)
        with self._lock:
            job = self._migrations.get(instance_uuid)
            if job is None or job.committed or job.aborted.is_set():
                raise HypervisorError(f"cannot switch the migration of instance {instance_uuid} over: no "
                                      "migration job is active")
            if post_copy and not job.post_copy:
                raise HypervisorError("switching to post-copy requires migration to be started with the "
                                      "post-copy flag")
            if post_copy and self.post_copy_refusals > 0:
                self.post_copy_refusals -= 1
                raise HypervisorError("Requested operation is not valid: post-copy can only be started while "
                                      "outgoing migration is in progress")
            # Either way the guest stops here: it runs on the destination (post-copy) or is paused.
            job.switched = SWITCHED_TO_POST_COPY if post_copy else SWITCHED_BY_PAUSING
            job.committed = post_copy
            job.ends_at = min(job.ends_at, time.monotonic() + self.switch_over_delay)
            instance.power_state = contract.POWER_PAUSED
            job.changed.set()
        self._changed(instance_uuid)
        return job.switched

    def post_live_migration_at_source(self, instance_uuid: str, shared_storage: bool) -> None:
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
            if instance is not None and instance.power_state in (contract.POWER_RUNNING,
                                                                 contract.POWER_PAUSED):
                raise InstanceInvalidState(f"instance {instance_uuid} still runs on this host after its "
                                           "migration")
            self.instances.pop(instance_uuid, None)
        self._save()

    def post_live_migration_at_destination(self, instance_uuid: str, spec: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
            if instance is None:
                raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
            if instance.power_state not in (contract.POWER_RUNNING, contract.POWER_PAUSED):
                raise InstanceInvalidState(f"the migrated domain of instance {instance_uuid} is not running "
                                           "on this host")
            instance.spec = spec
        memory = int(spec["flavor"]["memory_mb"]) * 2**20  # all of it copied, nothing left
        return {"downtime_ms": 0, "memory_total": memory, "memory_processed": memory, "memory_remaining": 0}

    def rollback_live_migration_at_destination(self, instance_uuid: str, destroy_disks: bool) -> bool:
        with self._lock:
            instance = self.instances.get(checked_uuid(instance_uuid))
            if instance is None:
                return False
            if instance.power_state in (contract.POWER_RUNNING, contract.POWER_PAUSED):
                raise InstanceInvalidState(f"instance {instance_uuid} is {instance.power_state} on this "
                                           "host: its migration went through; nothing rolled back")
            del self.instances[instance_uuid]
        self._changed(instance_uuid)
        return True


    def instance_power_state_at(self, uri: str, instance_uuid: str) -> str | None:
        with _PEERS_LOCK:
            peer = _MIGRATION_PEERS.get(uri)
        if peer is None:
            raise HypervisorError(f"cannot reach the hypervisor at {uri}: no fake hypervisor of this "
                                  "process answers there")
        with peer._lock:
            instance = peer.instances.get(checked_uuid(instance_uuid))
            return None if instance is None else instance.power_state

class FakeACPIIgnoringDriver(FakeDriver):
    """Its guests ignore ACPI requests, as a guest without an ACPI daemon (or a hung one) does:
    shutdown waits out its timeout and fails, so soft reboots fall back to hard ones and power offs
    are forced."""

    def shutdown(self, instance_uuid: str, timeout: float) -> bool:
        state = self.get_info(instance_uuid)
        if state in (contract.POWER_SHUTDOWN, contract.POWER_SUSPENDED):
            return True
        time.sleep(timeout)
        return False


class FakeBuildAbortDriver(FakeDriver):
    """Fails every spawn half-way, leaving a defined but broken domain behind (as a driver bug
    would): the manager must still clean up and report build_failed with reschedule."""

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        with self._lock:
            self.instances[spec["instance_uuid"]] = FakeInstance(spec, contract.POWER_SHUTDOWN, [])
        raise HypervisorError("fake hypervisor refused to start the domain")

    def rebuild(self, spec: dict[str, Any], base_image: Path | None, on_shared_storage: bool,
                power_on: bool) -> None:
        """Fails half-way too, and, unlike a driver keeping its post-conditions, leaves the domain
        defined: the manager must remove it without touching a shared disk."""
        with self._lock:
            self.instances[spec["instance_uuid"]] = FakeInstance(spec, contract.POWER_SHUTDOWN, [])
        raise HypervisorError("fake hypervisor refused to start the rebuilt domain")


class FakeMigrationCopyFailsDriver(FakeDriver):
    """The destination refuses the disk half-way through every cold migration's copy: the instance
    must be put back as it was."""

    def _copy_disk(self, instance_uuid: str, source: FakeInstance, dest_uri: str,
                   progress: Callable[[int, int], None], size: int) -> None:
        progress(size // 2, size)
        raise HypervisorError(f"fake destination {dest_uri} refused the disk half-way")
