"""The libvirt driver: QEMU guests (KVM or TCG) on ``qemu:///system`` or another real hypervisor.

The class holds what is per instance and per host; the rest is split by role, each module a set of
functions on libvirt objects: ``connection`` (the one shared connection, reopened if libvirtd went
away, and its lifecycle events), ``guest`` (one domain: power state, shutdown, stop, undefine,
console), ``host`` (virt type, CPU, instances filesystem), ``snapshot`` (disk images, live block copy),
``resize`` (the source's saved state during a cold migration), ``volumes`` (disk copies between
daemons), ``migration`` (live migration and the CPU check), ``domain`` (the domain XML).

libvirt's ``test:`` URIs (``test:///default``) are driven by
:class:`~compute_workers.virt.libvirt.testdriver.LibvirtTestDriver`, a subclass that overrides the
disk and host hooks of this class (``_prepare_host``, ``_create_disk``, ...): test domains have no
disks. This class refuses ``test:`` URIs, so nothing here ever fakes an image or skips real work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import libvirt

from compute_workers import contract, images
from compute_workers.exception import (
    ConsoleUnavailable,
    HypervisorError,
    InstanceExists,
    InstanceInvalidState,
    InstanceNotFound,
)
from compute_workers.virt.driver import (
    ComputeDriver,
    DiskMigration,
    checked_uuid,
    instance_uuid_of,
)
from compute_workers.virt.libvirt import connection, guest, host, migration, resize, volumes
from compute_workers.virt.libvirt.domain import bridges_of, build_domain_xml, taps_of
from compute_workers.virt.libvirt.errors import cause, error_code, hypervisor_errors
from compute_workers.virt.libvirt.snapshot import snapshot_disk

LOG = logging.getLogger(__name__)

# A guest still booting (its ACPI daemon not yet listening) misses a power-button press: press again
# this often while waiting for a clean shutdown (Nova: every 10 s).
ACPI_RETRY_INTERVAL = 5.0
# How often a wait for shutoff looks at the domain: the measured shutdown time is this precise.
POLL_INTERVAL = 0.1
GiB = 1024 ** 3
# libvirt's test driver: in-memory domains that never run, driven by LibvirtTestDriver only.
TEST_URI_SCHEME = "test:"


def is_test_uri(uri: str) -> bool:
    """Whether ``uri`` names libvirt's test driver (``test:///default``): no QEMU, no disks."""
    return uri.startswith(TEST_URI_SCHEME)


class LibvirtDriver(ComputeDriver):
    """A real hypervisor through libvirt. Subclasses for hypervisors without disks
    (:class:`~compute_workers.virt.libvirt.testdriver.LibvirtTestDriver`) override the hooks: the
    URI check, ``_prepare_host``, ``_create_disk``, ``_recreatable``, ``_copy_disk``,
    ``_remove_disk_copy``, ``_prepare_migrated_disk``, ``_snapshot_disk`` and ``_job_progress``, and
    declare their own :attr:`CAPABILITIES`."""

    name = "libvirt"
    #: What this driver supports, as data (Nova's drivers declare theirs so); names not given are False.
    CAPABILITIES: Mapping[str, bool] = MappingProxyType({
        "needs_base_image": True, "supports_reboot": True, "supports_power_ops": True,
        "supports_pause": True, "supports_suspend": True, "supports_lifecycle_events": True,
        "supports_snapshot": True, "supports_live_migration": True,
        "plugs_host_bridges": True})

    def __init__(self, uri: str, instances_path: Path, virt_type: str = "auto",
                 machine_type: str = "pc") -> None:
        super().__init__()
        self._check_uri(uri)
        self.uri = uri
        self.instances_path = instances_path
        self.requested_virt_type = virt_type
        self.machine_type = machine_type
        self.capabilities = {**self.capabilities, **self.CAPABILITIES}
        self.virt_type = virt_type
        self.disk_cache = "none"
        self._cpu_info: dict[str, Any] = {}
        self._connection = connection.Connection(uri)

    @classmethod
    def _check_uri(cls, uri: str) -> None:
        """Refuse a URI this class must not drive: libvirt's test driver has no disks, and a real
        driver that silently skipped the disk work for it would fake what it reports."""
        if is_test_uri(uri):
            raise ValueError(f"{uri} is libvirt's test driver, which has no disks: use "
                             "compute_workers.virt.libvirt.testdriver.LibvirtTestDriver (load_driver "
                             "picks it for test: URIs)")

    # Connection and host --------------------------------------------------------------------------

    @property
    def conn(self) -> libvirt.virConnect:
        """The shared connection, reopened if libvirtd went away."""
        return self._connection.get()

    def init_host(self) -> None:
        libvirt.registerErrorHandler(connection.ignore_libvirt_errors, None)
        connection.start_event_loop()  # before the connection: its events are dispatched by this loop
        conn = self.conn
        self.instances_path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._prepare_host()
        with hypervisor_errors("cannot read the host capabilities"):
            self._cpu_info = host.cpu_info(conn.getCapabilities())

    def _prepare_host(self) -> None:
        """Hook of init_host: the virt type guests really get, the disk cache mode the instances'
        filesystem allows, and a warning if QEMU cannot reach the disks."""
        self.virt_type = host.resolve_virt_type(self.requested_virt_type)
        self.disk_cache = "none" if host.supports_direct_io(self.instances_path) else "writeback"
        LOG.info("disk cache mode %s (O_DIRECT %s in %s)", self.disk_cache,
                 "works" if self.disk_cache == "none" else "unsupported", self.instances_path)
        host.warn_if_not_traversable(self.instances_path)

    def get_available_resource(self) -> dict[str, Any]:
        conn = self.conn
        with hypervisor_errors("cannot read the host resources"):
            _model, memory_mb, cpus, *_ = conn.getInfo()
            hypervisor_type, hypervisor_version = conn.getType(), conn.getVersion()
        fs = os.statvfs(self.instances_path)
        return {
            "virt_type": self.virt_type,
            "hypervisor_type": hypervisor_type,
            "hypervisor_version": hypervisor_version,
            "vcpus": cpus,
            "memory_mb": memory_mb,
            "disk_gb": fs.f_frsize * fs.f_blocks // GiB,
            "cpu_info": self._cpu_info,
        }

    def list_instances(self) -> dict[str, str]:
        with hypervisor_errors("cannot list domains"):
            domains = self.conn.listAllDomains(0)
        instances = {}
        for domain in domains:
            instance_uuid = instance_uuid_of(domain.name())
            if instance_uuid is None:
                continue
            try:
                instances[instance_uuid] = guest.power_state(domain)
            except libvirt.libvirtError as exc:
                if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:  # vanished meanwhile: leave it out
                    raise HypervisorError(f"cannot read the state of {domain.name()}: {exc}") from exc
        return instances

    # One instance -----------------------------------------------------------------------------------

    def instance_dir(self, instance_uuid: str) -> Path:
        return self.instances_path / checked_uuid(instance_uuid)

    def _lookup(self, instance_uuid: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(contract.domain_name(checked_uuid(instance_uuid)))
        except libvirt.libvirtError as exc:
            if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot look up instance {instance_uuid}: {exc}") from exc

    def _domain(self, instance_uuid: str) -> libvirt.virDomain:
        domain = self._lookup(instance_uuid)
        if domain is None:
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
        return domain

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        self._build_from_image(spec, base_image, power_on=True, what="spawn")

    def rebuild(self, spec: dict[str, Any], base_image: Path | None, on_shared_storage: bool,
                power_on: bool) -> None:
        if not on_shared_storage:
            self._build_from_image(spec, base_image, power_on=power_on, what="rebuild")
            return
        instance_uuid = checked_uuid(spec["instance_uuid"])
        if self._lookup(instance_uuid) is not None:
            raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        directory = self.instance_dir(instance_uuid)
        if not self._recreatable(instance_uuid):
            raise InstanceNotFound(f"the disk of instance {instance_uuid} is not in {directory} on this "
                                   "host, which should share it with the host that died: nothing was "
                                   "created in its place")
        (directory / "console.log").touch(mode=0o600, exist_ok=True)
        with self._undefined_on_failure(instance_uuid, "rebuild"):  # the directory is never touched
            self._define_and_start(instance_uuid, spec, power_on)

    def _build_from_image(self, spec: dict[str, Any], base_image: Path | None, *, power_on: bool,
                          what: str) -> None:
        """A new instance directory (:meth:`_make_instance_dir`), the domain defined from ``spec`` and
        started when ``power_on``; on failure nothing of it is left (no domain, no directory)."""
        instance_uuid = checked_uuid(spec["instance_uuid"])
        if self._lookup(instance_uuid) is not None:
            raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        directory = self.instance_dir(instance_uuid)
        try:
            self._make_instance_dir(spec, base_image, disk=True, missing_base=f"{what} needs the base image")
            self._define_and_start(instance_uuid, spec, power_on)
        except BaseException:
            LOG.warning("%s of %s failed; removing what it made", what, instance_uuid)
            with contextlib.suppress(Exception):
                self.destroy(instance_uuid)
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _make_instance_dir(self, spec: dict[str, Any], base_image: Path | None, *, disk: bool,
                           missing_base: str) -> None:
        """``INSTANCES_PATH/<uuid>`` as spawn makes it: a directory left by an attempt that died is
        replaced (no domain uses it: the callers checked), then the disk when ``disk`` (see
        :meth:`_create_disk`) and an empty console log. On failure nothing of it is left."""
        directory = self.instance_dir(spec["instance_uuid"])
        try:
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(mode=0o755, parents=True)
            if disk:
                self._create_disk(spec, base_image, directory / "disk", missing_base=missing_base)
            (directory / "console.log").touch(mode=0o600)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def _undefined_on_failure(self, instance_uuid: str, what: str) -> Iterator[None]:
        """Run the block; if it fails, stop and undefine any domain of the instance it left (its files
        are left alone), then let the error propagate."""
        try:
            yield
        except BaseException:
            LOG.warning("%s of %s failed; undefining its domain here", what, instance_uuid)
            with contextlib.suppress(Exception):
                domain = self._lookup(instance_uuid)
                if domain is not None:
                    guest.stop(domain)
                    guest.undefine(domain)
            raise

    def _create_disk(self, spec: dict[str, Any], base_image: Path | None, disk: Path, *,
                     missing_base: str) -> None:
        """Hook: the instance's disk, a qcow2 overlay of the cached base image of the flavor's size
        (what spawn boots; what a block migration's NON_SHARED_INC fills). ``missing_base`` is the
        error when there is no base image."""
        if base_image is None:
            raise HypervisorError(missing_base)
        image = spec["image"]
        images.create_overlay(base_image, image["disk_format"], disk, spec["flavor"]["root_gb"],
                              image.get("name") or image["id"])

    def destroy(self, instance_uuid: str, destroy_disks: bool = True) -> None:
        domain = self._lookup(instance_uuid)
        if domain is not None:
            guest.stop(domain)
            guest.undefine(domain)
        if destroy_disks:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.instance_dir(instance_uuid))

    def instance_bridges(self, instance_uuid: str) -> list[str]:
        return self._of_definition(instance_uuid, bridges_of)

    def instance_taps(self, instance_uuid: str) -> list[str]:
        return self._of_definition(instance_uuid, taps_of)

    def _of_definition(self, instance_uuid: str, read: Callable[[str], list[str]]) -> list[str]:
        domain = self._lookup(instance_uuid)
        if domain is None:
            return []
        try:
            return read(domain.XMLDesc(0))
        except libvirt.libvirtError as exc:
            if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return []
            raise HypervisorError(f"cannot read the definition of instance {instance_uuid}: {exc}") from exc

    def get_info(self, instance_uuid: str) -> str:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot read the state of instance {instance_uuid}", instance_uuid):
            return guest.power_state(domain)

    def get_console_output(self, instance_uuid: str, lines: int) -> str:
        self._domain(instance_uuid)
        try:
            return guest.console_tail(self.instance_dir(instance_uuid) / "console.log", lines)
        except FileNotFoundError:
            raise ConsoleUnavailable(f"instance {instance_uuid} has no console log") from None

    # Lifecycle --------------------------------------------------------------------------------------

    def _shutdown(self, domain: libvirt.virDomain, timeout: float) -> bool:
        return guest.shutdown(domain, timeout, retry_interval=ACPI_RETRY_INTERVAL,
                              poll_interval=POLL_INTERVAL)

    def shutdown(self, instance_uuid: str, timeout: float) -> bool:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot shut down instance {instance_uuid}", instance_uuid):
            return self._shutdown(domain, timeout)

    def power_off(self, instance_uuid: str, timeout: float) -> bool:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot power off instance {instance_uuid}", instance_uuid):
            clean = not domain.isActive() or (timeout > 0 and self._shutdown(domain, timeout))
            if not clean:
                LOG.info("forcing instance %s off", instance_uuid)
                guest.stop(domain)
            if domain.hasManagedSaveImage(0):
                LOG.info("discarding the saved memory state of instance %s", instance_uuid)
                domain.managedSaveRemove(0)
            return clean

    def _recreatable(self, instance_uuid: str) -> bool:
        """Hook: whether the instance's files are here to define its domain again (its disk)."""
        return (self.instance_dir(instance_uuid) / "disk").exists()

    def _define(self, instance_uuid: str, spec: dict[str, Any]) -> libvirt.virDomain:
        """(Re)define the domain from ``spec``: the one definition spawn would write today."""
        xml = self._write_definition(instance_uuid, spec)
        with hypervisor_errors(f"libvirt cannot define the domain of instance {instance_uuid}"):
            return self.conn.defineXML(xml)

    def _write_definition(self, instance_uuid: str, spec: dict[str, Any]) -> str:
        """The domain XML of ``spec`` on this host, also written to the instance's libvirt.xml."""
        directory = self.instance_dir(instance_uuid)
        xml = build_domain_xml(spec, virt_type=self.virt_type, machine_type=self.machine_type,
                               disk_path=directory / "disk", console_path=directory / "console.log",
                               disk_cache=self.disk_cache)
        (directory / "libvirt.xml").write_text(xml)
        return xml

    def _lookup_or_recreate(self, instance_uuid: str, spec: dict[str, Any] | None) -> libvirt.virDomain:
        domain = self._lookup(instance_uuid)
        if domain is not None:
            return domain
        if spec is None or not self._recreatable(instance_uuid):
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
        LOG.warning("the domain of instance %s is not defined but its disk is here; defining it again",
                    instance_uuid)
        return self._define(instance_uuid, spec)

    def power_on(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        domain = self._lookup_or_recreate(instance_uuid, spec)
        with hypervisor_errors(f"cannot power on instance {instance_uuid}", instance_uuid):
            if domain.isActive():
                if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    domain.resume()
                return
            if spec is not None and not domain.hasManagedSaveImage(0):
                # A saved memory state is restored as it is: a new definition could refuse it.
                domain = self._define(instance_uuid, spec)
            domain.create()

    def hard_reboot(self, instance_uuid: str, spec: dict[str, Any] | None = None) -> None:
        domain = self._lookup(instance_uuid)
        with hypervisor_errors(f"cannot reboot instance {instance_uuid}", instance_uuid):
            if domain is not None:
                guest.stop(domain)
                if domain.hasManagedSaveImage(0):
                    domain.managedSaveRemove(0)  # or create() would restore it: not a reboot
                if spec is not None:
                    domain = self._define(instance_uuid, spec)
            domain = self._lookup_or_recreate(instance_uuid, spec) if domain is None else domain
            domain.create()

    def pause(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot pause instance {instance_uuid}", instance_uuid):
            state = domain.state()[0]
            if state == libvirt.VIR_DOMAIN_PAUSED:
                return
            if not domain.isActive():
                raise InstanceInvalidState(f"instance {instance_uuid} is not running: cannot pause it")
            domain.suspend()  # libvirt's "suspend" freezes the vCPUs: our pause

    def unpause(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot unpause instance {instance_uuid}", instance_uuid):
            if not domain.isActive():
                raise InstanceInvalidState(f"instance {instance_uuid} is not running: cannot unpause it")
            if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                domain.resume()

    def suspend(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot suspend instance {instance_uuid}", instance_uuid):
            if domain.isActive():
                # SAVE_RUNNING: a guest saved while paused still comes back running on resume.
                domain.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)
            elif not domain.hasManagedSaveImage(0):
                raise InstanceInvalidState(f"instance {instance_uuid} is shut off: no memory to save")

    def resume(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot resume instance {instance_uuid}", instance_uuid):
            if domain.isActive():
                return
            if not domain.hasManagedSaveImage(0):
                raise InstanceInvalidState(f"instance {instance_uuid} has no saved memory state to "
                                           "resume from")
            domain.create()  # restores the managed save image, and removes it

    # Cold migration and resize ------------------------------------------------------------------------

    def resize_dir(self, instance_uuid: str) -> Path:
        """Where a resize's source keeps the instance's original files until confirmed or reverted."""
        return self.instances_path / (checked_uuid(instance_uuid) + contract.RESIZE_DIR_SUFFIX)

    def migrate_disk_and_power_off(self, instance_uuid: str, dest_uri: str, shutdown_timeout: float,
                                   progress: Callable[[int, int], None],
                                   copy_timeout: float) -> DiskMigration:
        directory, resize_dir = self.instance_dir(instance_uuid), self.resize_dir(instance_uuid)
        domain = self._lookup(instance_uuid)
        resize.check_source(instance_uuid, directory, resize_dir, domain_defined=domain is not None)
        resumed = domain is None
        if resumed:
            LOG.warning("resize of %s: its domain is already undefined and its files saved; resuming the "
                        "interrupted copy", instance_uuid)
        dest_conn: libvirt.virConnect | None = None
        if not resumed:
            # Reach the destination first: a wrong URI fails before the guest is stopped.
            try:
                dest_conn = self._open_destination(dest_uri)
            except HypervisorError as exc:
                raise HypervisorError(f"{exc}; nothing was changed on this host") from exc
        copy_started = False
        power_state = clean = None
        try:
            if dest_conn is None:
                dest_conn = self._open_destination(dest_uri)
            if domain is not None:
                with hypervisor_errors(f"cannot power off instance {instance_uuid}", instance_uuid):
                    power_state = guest.power_state(domain)
                clean = None if power_state == contract.POWER_SHUTDOWN else self.power_off(instance_uuid,
                                                                                            shutdown_timeout)
                resize.save_state(directory, domain, power_state)
                guest.undefine(domain)
            if not resize_dir.exists():
                os.rename(directory, resize_dir)
            power_state = power_state or resize.load_state(resize_dir)["power_state"]
            resize.refuse_domain_at(dest_conn, instance_uuid, dest_uri)
            copy_started = True
            copied = self._copy_disk(resize_dir, dest_conn, directory, dest_uri, progress, copy_timeout)
        except BaseException as exc:
            outcome = self._put_back_resize(instance_uuid, dest_conn, dest_uri, copy_started, power_state)
            if not isinstance(exc, Exception):
                raise
            raise HypervisorError(f"{cause(exc)}; {outcome}") from exc
        finally:
            if dest_conn is not None and dest_conn is not self._connection.current:
                with contextlib.suppress(libvirt.libvirtError):
                    dest_conn.close()
        LOG.info("resize of %s: disk copied to %s (%d bytes, %d sent as data%s) in %.2f s", instance_uuid,
                 dest_uri, copied.size, copied.sent, ", sparse" if copied.sparse else "", copied.seconds)
        return DiskMigration(power_state=power_state, clean_shutdown=clean, disk_bytes=copied.size,
                             sent_bytes=copied.sent, copy_seconds=copied.seconds, resumed=resumed)

    def _copy_disk(self, resize_dir: Path, dest_conn: libvirt.virConnect, directory: Path, dest_uri: str,
                   progress: Callable[[int, int], None], copy_timeout: float) -> volumes.VolumeCopy:
        """Hook: copy the disk in ``resize_dir`` to ``directory`` at the destination, through libvirt
        (the destination's daemon writes it: no shared filesystem or ssh needed)."""
        return volumes.copy_file(self.conn, resize_dir, dest_conn, directory, "disk", progress,
                                 copy_timeout, source_label=f"this host ({self.uri})", dest_label=dest_uri)

    def _remove_disk_copy(self, dest_conn: libvirt.virConnect, directory: Path, dest_uri: str) -> None:
        """Hook: remove what a failed :meth:`_copy_disk` left at the destination."""
        volumes.remove_copy(dest_conn, directory, "disk", where=dest_uri)

    def _open_destination(self, dest_uri: str) -> libvirt.virConnect:
        if dest_uri == self.uri:
            return self.conn
        with hypervisor_errors(f"cannot connect to the destination hypervisor at {dest_uri}"):
            return libvirt.open(dest_uri)

    def _put_back_resize(self, instance_uuid: str, dest_conn: libvirt.virConnect | None, dest_uri: str,
                         copy_started: bool, power_state: str | None) -> str:
        """Undo a failed migrate_disk_and_power_off (``power_state``: the one it found, if it got that
        far); says what it did, or could not do, for the error message."""
        directory, resize_dir = self.instance_dir(instance_uuid), self.resize_dir(instance_uuid)
        problems = []
        if copy_started and dest_conn is not None:
            try:
                self._remove_disk_copy(dest_conn, directory, dest_uri)
            except Exception as exc:
                problems.append(f"the partial copy at {dest_uri} was not removed ({cause(exc)})")
        try:
            resize.restore_directory(directory, resize_dir, copy_started)
            domain = self._lookup(instance_uuid)
            state_file = directory / resize.RESIZE_STATE_FILE
            if state_file.exists():
                state = resize.load_state(directory)
                power_state = state["power_state"]
                if domain is None:
                    with hypervisor_errors(f"libvirt cannot define instance {instance_uuid} again"):
                        domain = self.conn.defineXML(state["xml"])
            if domain is None:
                raise InstanceNotFound(f"instance {instance_uuid} has no domain and no saved definition")
            with hypervisor_errors(f"cannot start instance {instance_uuid} again", instance_uuid):
                if power_state in (contract.POWER_RUNNING, contract.POWER_PAUSED) and not domain.isActive():
                    domain.create()
                running = bool(domain.isActive())
            state_file.unlink(missing_ok=True)
            outcome = ("everything was put back: the instance runs on this host" if running
                       else "everything was put back: the instance is shut off on this host, as it was")
        except Exception as exc:
            LOG.exception("putting instance %s back after its failed resize failed", instance_uuid)
            problems.insert(0, f"putting the instance back failed: {cause(exc)}")
            outcome = ""
        return "; ".join(filter(None, [outcome, *problems]))

    def finish_migration(self, spec: dict[str, Any], power_on: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        directory = self.instance_dir(instance_uuid)
        self._prepare_migrated_disk(instance_uuid, directory, spec["flavor"]["root_gb"])
        (directory / "console.log").touch(mode=0o600, exist_ok=True)
        with self._undefined_on_failure(instance_uuid, "finish resize"):
            self._define_and_start(instance_uuid, spec, power_on)

    def _prepare_migrated_disk(self, instance_uuid: str, directory: Path, root_gb: int) -> None:
        """Hook of finish_migration: the copied disk must be here; it grows to the new flavor's size."""
        disk = directory / "disk"
        if not disk.exists():
            raise InstanceNotFound(f"the disk of instance {instance_uuid} is not on this host ({disk}): "
                                   "it was not copied here")
        if root_gb and images.grow_disk(disk, root_gb * GiB):
            LOG.info("finish resize of %s: disk grown to %d GiB", instance_uuid, root_gb)

    def confirm_migration(self, instance_uuid: str, instance_moved: bool | None) -> None:
        domain = self._lookup(instance_uuid)
        if domain is not None:
            leftover = (instance_moved if instance_moved is not None
                        else not self.instance_dir(instance_uuid).exists())
            if leftover:
                LOG.warning("confirm resize of %s: a definition of it was left on this host; removing it",
                            instance_uuid)
                guest.stop(domain)
                guest.undefine(domain)
        resize_dir = self.resize_dir(instance_uuid)
        try:
            shutil.rmtree(resize_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise HypervisorError(f"cannot remove {resize_dir}: {exc}") from exc

    def finish_revert_migration(self, spec: dict[str, Any], power_on: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        directory, resize_dir = self.instance_dir(instance_uuid), self.resize_dir(instance_uuid)
        if resize_dir.exists():
            if directory.exists():
                raise InstanceInvalidState(
                    f"cannot revert the resize of instance {instance_uuid}: {directory} (the resized copy) "
                    f"is still on this host beside {resize_dir}; the destination's revert must remove it "
                    "first")
            os.rename(resize_dir, directory)
        elif not directory.exists():
            raise InstanceNotFound(f"instance {instance_uuid} has neither {resize_dir.name} nor "
                                   f"{directory.name} on this host: nothing to revert to")
        (directory / resize.RESIZE_STATE_FILE).unlink(missing_ok=True)
        self._define_and_start(instance_uuid, spec, power_on)

    def _define_and_start(self, instance_uuid: str, spec: dict[str, Any], power_on: bool) -> None:
        """Define the domain from ``spec`` (the flavor the resize ends with) and, when ``power_on``,
        start it unless it already runs."""
        domain = self._define(instance_uuid, spec)
        if power_on:
            with hypervisor_errors(f"libvirt cannot start the domain of instance {instance_uuid}",
                                    instance_uuid):
                if not domain.isActive():
                    domain.create()

    # Snapshot -------------------------------------------------------------------------------------------

    def snapshot(self, instance_uuid: str, target_path: Path,
                 progress: Callable[[int, int], None]) -> None:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot snapshot instance {instance_uuid}", instance_uuid):
            active = bool(domain.isActive())
        self._snapshot_disk(domain, instance_uuid, active, target_path, progress)

    def _snapshot_disk(self, domain: libvirt.virDomain, instance_uuid: str, active: bool, target_path: Path,
                       progress: Callable[[int, int], None]) -> None:
        """Hook: the instance's disk as one standalone qcow2 image at ``target_path``; of a running
        guest through a live block copy."""
        snapshot_disk(domain, self.instance_dir(instance_uuid) / "disk", active, target_path, progress)

    # Migration ----------------------------------------------------------------------------------------

    def compare_cpu(self, cpu_info: Mapping[str, Any]) -> str:
        return migration.compare_cpu(self.conn, cpu_info)

    def pre_live_migration(self, spec: dict[str, Any], base_image: Path | None, block_migration: bool,
                           shared_storage: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        if self._lookup(instance_uuid) is not None:
            raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        if shared_storage:
            return
        # For block migration the overlay spawn creates: NON_SHARED_INC copies its contents into it.
        self._make_instance_dir(spec, base_image, disk=block_migration,
                                missing_base="block migration needs the base image on the destination")

    def live_migration(self, instance_uuid: str, dest_uri: str, dest_migrate_uri: str | None = None,
                       block_migration: bool = False, *, unsafe: bool = False, bandwidth_mib: int = 0,
                       post_copy: bool = False, auto_converge: bool = False) -> migration.MigrationResult:
        """Peer-to-peer live migration to the daemon at ``dest_uri`` (memory, and the disk's top layer
        too with ``block_migration``, streamed to ``dest_migrate_uri``). Afterwards the domain runs
        and is defined there and is gone here; on failure it keeps running here."""
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot live-migrate instance {instance_uuid} to {dest_uri}", instance_uuid):
            if domain.state()[0] not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
                raise InstanceInvalidState(f"instance {instance_uuid} is not running: "
                                           "nothing to live-migrate")
        try:
            return migration.live_migrate(domain, dest_uri, dest_migrate_uri, block_migration, unsafe=unsafe,
                                          bandwidth_mib=bandwidth_mib, post_copy=post_copy,
                                          auto_converge=auto_converge)
        except libvirt.libvirtError as exc:
            raise migration.migration_error(exc, instance_uuid, dest_uri, post_copy) from exc

    def live_migration_progress(self, instance_uuid: str) -> dict[str, int] | None:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot read the migration job of instance {instance_uuid}", instance_uuid):
            return self._job_progress(domain)

    def _job_progress(self, domain: libvirt.virDomain) -> dict[str, int] | None:
        """Hook: the counters of the domain's running job, None when none runs."""
        return migration.job_progress(domain)

    def abort_live_migration(self, instance_uuid: str) -> bool:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"libvirt cannot abort the migration job of instance {instance_uuid}",
                                instance_uuid):
            return migration.abort_job(domain)

    def live_migration_force_complete(self, instance_uuid: str, post_copy: bool) -> str:
        domain = self._domain(instance_uuid)
        how = "switch to post-copy" if post_copy else "pause the guest"
        with hypervisor_errors(f"libvirt cannot {how} in the migration of instance {instance_uuid}",
                                instance_uuid):
            switched = migration.switch_over(domain, post_copy, self._job_progress)
        if switched is None:
            raise HypervisorError(f"cannot {how} in the migration of instance {instance_uuid}: no migration "
                                  "job runs")
        return switched

    def post_live_migration_at_source(self, instance_uuid: str, shared_storage: bool) -> None:
        domain = self._lookup(instance_uuid)
        if domain is not None:
            with hypervisor_errors(f"cannot read the state of instance {instance_uuid}", instance_uuid):
                if domain.isActive():
                    raise InstanceInvalidState(f"instance {instance_uuid} still runs on this host after "
                                               "its migration")
            LOG.warning("instance %s migrated but its domain is still defined here; undefining it",
                        instance_uuid)
            guest.undefine(domain)
        if not shared_storage:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.instance_dir(instance_uuid))

    def post_live_migration_at_destination(self, instance_uuid: str, spec: dict[str, Any]) -> dict[str, Any]:
        domain = self._domain(instance_uuid)
        with hypervisor_errors(f"cannot read the migrated domain of instance {instance_uuid}",
                                instance_uuid):
            if not domain.isActive():
                raise InstanceInvalidState(f"the migrated domain of instance {instance_uuid} is not running "
                                           "on this host")
            if not domain.isPersistent():  # PERSIST_DEST asked for it; a migration without it left none
                LOG.warning("migrated domain of %s is transient here; defining it", instance_uuid)
                self.conn.defineXML(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
            figures = migration.completed_job(domain)
        self._write_definition(instance_uuid, spec)
        return figures

    def rollback_live_migration_at_destination(self, instance_uuid: str, destroy_disks: bool) -> bool:
        domain = self._lookup(instance_uuid)
        removed = False
        if domain is not None:
            with hypervisor_errors(f"cannot read the state of instance {instance_uuid}", instance_uuid):
                state, reason = domain.state()
                if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED) or (
                        state == libvirt.VIR_DOMAIN_PAUSED and reason != libvirt.VIR_DOMAIN_PAUSED_MIGRATION):
                    raise InstanceInvalidState(
                        f"instance {instance_uuid} is {host.power_state(state)} on this host: its migration "
                        "went through; nothing rolled back")
            # Shut off, or paused waiting for an incoming migration that will never finish.
            guest.stop(domain)
            domain = self._lookup(instance_uuid)  # a transient domain is gone once stopped
            if domain is not None:
                guest.undefine(domain)
            removed = True
        if destroy_disks:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.instance_dir(instance_uuid))
        return removed

    def instance_power_state_at(self, uri: str, instance_uuid: str) -> str | None:
        return connection.power_state_at(uri, instance_uuid)

    # Lifecycle events ---------------------------------------------------------------------------------

    def register_lifecycle_callback(self, callback: Callable[[str], None] | None) -> None:
        self._connection.register_lifecycle_callback(callback)

    def close(self) -> None:
        self._connection.close()
