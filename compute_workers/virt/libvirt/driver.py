"""The libvirt driver: QEMU guests (KVM or TCG) on ``qemu:///system`` or another real hypervisor.

One libvirt connection is shared by every worker thread (libvirt connections are thread-safe and
libvirt-python releases the GIL during calls); it is reopened if libvirtd went away.

libvirt's ``test:`` URIs (``test:///default``) are driven by
:class:`~compute_workers.virt.libvirt.testdriver.LibvirtTestDriver`, a subclass that overrides the
disk and host hooks of this class (``_prepare_host``, ``_create_disk``, ...): test domains have no
disks. This class refuses ``test:`` URIs, so nothing here ever fakes an image or skips real work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import libvirt

from compute_workers import contract, images
from compute_workers.exception import (
    ComputeError,
    ConsoleUnavailable,
    CPUIncompatible,
    HypervisorError,
    InstanceExists,
    InstanceInvalidState,
    InstanceNotFound,
    MigrationAborted,
    PostCopyUnsupported,
)
from compute_workers.virt.driver import (
    ComputeDriver,
    DiskMigration,
    checked_uuid,
    instance_uuid_of,
)
from compute_workers.virt.libvirt import host, migration, volumes
from compute_workers.virt.libvirt.domain import build_domain_xml

LOG = logging.getLogger(__name__)

CONSOLE_MAX_BYTES = 100 * 1024
# A guest still booting (its ACPI daemon not yet listening) misses a power-button press: press again
# this often while waiting for a clean shutdown (Nova: every 10 s).
ACPI_RETRY_INTERVAL = 5.0
# How often a wait for shutoff looks at the domain: the measured shutdown time is this precise.
POLL_INTERVAL = 0.1
GiB = 1024 ** 3
# A block copy must reach "ready" (the copy in sync with the disk) within this many seconds.
BLOCK_COPY_TIMEOUT = 900.0
# qemu-img convert of a snapshot (whole chain flattened) within this many seconds.
CONVERT_TIMEOUT = 900.0
BLOCK_JOB_POLL_INTERVAL = 0.1
# TRANSIENT_JOB: libvirt refuses a block copy of a persistent domain otherwise (the job would not
# survive a restart of the domain); with it the domain stays persistent throughout.
_BLOCK_COPY_FLAGS = (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
                     | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
_UNDEFINE_FLAGS_MINIMAL = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                           | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
# A resize's source saves here, before undefining the domain, what putting it back needs: the
# definition and the power state. It travels with the directory to <uuid>_resize.
RESIZE_STATE_FILE = "resize-source.json"
# libvirt's test driver: in-memory domains that never run, driven by LibvirtTestDriver only.
TEST_URI_SCHEME = "test:"


def is_test_uri(uri: str) -> bool:
    """Whether ``uri`` names libvirt's test driver (``test:///default``): no QEMU, no disks."""
    return uri.startswith(TEST_URI_SCHEME)


def _ignore_libvirt_errors(_ctx: object, _error: object) -> None:
    """libvirt prints every error on stderr by default; ours are raised and logged instead."""


def _error_code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:  # closed
        return False


_event_loop_lock = threading.Lock()
_event_loop_running = False


def _run_event_loop() -> None:
    while True:
        try:
            if libvirt.virEventRunDefaultImpl() < 0:
                LOG.error("libvirt event loop iteration failed")
                time.sleep(1)
        except Exception:
            LOG.exception("libvirt event loop iteration failed")
            time.sleep(1)


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per process.

    Lifecycle events (and keepalives) of a connection are dispatched by the event loop registered
    when it was opened: this must come before :func:`libvirt.open`.
    """
    global _event_loop_running
    with _event_loop_lock:
        if _event_loop_running:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_running = True


@contextlib.contextmanager
def _hypervisor_errors(what: str, instance_uuid: str | None = None) -> Iterator[None]:
    """Turn libvirt errors into the worker's exceptions (no domain -> InstanceNotFound)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        if instance_uuid and _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host") from exc
        raise HypervisorError(f"{what}: {exc.get_error_message() or exc}") from exc


def _cause(exc: BaseException) -> str:
    """An error's message for a user: ours as they are, anything else with its type."""
    if isinstance(exc, ComputeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")


def supports_direct_io(directory: Path) -> bool:
    """Whether files in ``directory`` can be opened with O_DIRECT (what disk cache='none' needs)."""
    probe = directory / f".directio-test-{os.getpid()}-{threading.get_ident()}"
    buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
        try:
            os.write(fd, buffer)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        buffer.close()
        probe.unlink(missing_ok=True)


def _cpu_info(capabilities_xml: str) -> dict[str, Any]:
    cpu = ET.fromstring(capabilities_xml).find("./host/cpu")
    if cpu is None:
        return {"arch": "", "model": "", "vendor": "", "features": []}
    return {
        "arch": cpu.findtext("arch", ""),
        "model": cpu.findtext("model", ""),
        "vendor": cpu.findtext("vendor", ""),
        "features": sorted(f.get("name", "") for f in cpu.findall("feature") if f.get("name")),
    }


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
        "supports_snapshot": True, "supports_live_migration": True})

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
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self._lifecycle_callback: Callable[[str], None] | None = None
        self._events_conn: libvirt.virConnect | None = None
        self._event_callback_id = -1

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
        with self._conn_lock:
            if self._conn is not None and _alive(self._conn):
                return self._conn
            lost = self._conn
            if lost is not None:
                LOG.warning("libvirt connection to %s lost; reconnecting", self.uri)
            with _hypervisor_errors(f"cannot connect to libvirt at {self.uri}"):
                self._conn = libvirt.open(self.uri)
            if lost is not None:
                self._deregister_events(lost)
                with contextlib.suppress(libvirt.libvirtError):
                    lost.close()
            if self._lifecycle_callback is not None:
                try:
                    self._register_events(self._conn)
                except HypervisorError as exc:  # the caller's operation need not fail for it
                    LOG.error("%s: power states reach the conductor only with the heartbeat", exc)
                if lost is not None:
                    self._notify_all(self._conn)
            return self._conn

    def init_host(self) -> None:
        libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
        start_event_loop()  # before the connection: its events are dispatched by this loop
        conn = self.conn
        self.instances_path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._prepare_host()
        with _hypervisor_errors("cannot read the host capabilities"):
            self._cpu_info = _cpu_info(conn.getCapabilities())

    def _prepare_host(self) -> None:
        """Hook of init_host: the virt type guests really get, the disk cache mode the instances'
        filesystem allows, and a warning if QEMU cannot reach the disks."""
        self.virt_type = host.resolve_virt_type(self.requested_virt_type)
        self.disk_cache = "none" if supports_direct_io(self.instances_path) else "writeback"
        LOG.info("disk cache mode %s (O_DIRECT %s in %s)", self.disk_cache,
                 "works" if self.disk_cache == "none" else "unsupported", self.instances_path)
        self._warn_if_not_traversable()

    def _warn_if_not_traversable(self) -> None:
        for directory in (self.instances_path, *self.instances_path.parents):
            if not os.stat(directory).st_mode & 0o001:
                LOG.warning("%s is not traversable by other users: QEMU (running as the libvirt-qemu "
                            "user) cannot open instance disks below it", directory)
                return

    def get_available_resource(self) -> dict[str, Any]:
        conn = self.conn
        with _hypervisor_errors("cannot read the host resources"):
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
        with _hypervisor_errors("cannot list domains"):
            domains = self.conn.listAllDomains(0)
        instances = {}
        for domain in domains:
            instance_uuid = instance_uuid_of(domain.name())
            if instance_uuid is None:
                continue
            try:
                instances[instance_uuid] = self._power_state(domain)
            except libvirt.libvirtError as exc:
                if _error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:  # vanished meanwhile: leave it out
                    raise HypervisorError(f"cannot read the state of {domain.name()}: {exc}") from exc
        return instances

    # One instance -----------------------------------------------------------------------------------

    def instance_dir(self, instance_uuid: str) -> Path:
        return self.instances_path / checked_uuid(instance_uuid)

    def _lookup(self, instance_uuid: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(contract.domain_name(checked_uuid(instance_uuid)))
        except libvirt.libvirtError as exc:
            if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot look up instance {instance_uuid}: {exc}") from exc

    def _domain(self, instance_uuid: str) -> libvirt.virDomain:
        domain = self._lookup(instance_uuid)
        if domain is None:
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
        return domain

    def spawn(self, spec: dict[str, Any], base_image: Path | None) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        if self._lookup(instance_uuid) is not None:
            raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        directory = self.instance_dir(instance_uuid)
        disk, console = directory / "disk", directory / "console.log"
        try:
            if directory.exists():  # left by an attempt that died before cleaning up: no domain uses it
                shutil.rmtree(directory)
            directory.mkdir(mode=0o755, parents=True)
            self._create_disk(spec, base_image, disk, missing_base="spawn needs the base image")
            console.touch(mode=0o600)
            xml = build_domain_xml(spec, virt_type=self.virt_type, machine_type=self.machine_type,
                                   disk_path=disk, console_path=console, disk_cache=self.disk_cache)
            (directory / "libvirt.xml").write_text(xml)
            with _hypervisor_errors(f"libvirt cannot define the domain of instance {instance_uuid}"):
                domain = self.conn.defineXML(xml)
            with _hypervisor_errors(f"libvirt cannot start the domain of instance {instance_uuid}"):
                domain.create()
        except BaseException:
            LOG.warning("spawn of %s failed; removing what it made", instance_uuid)
            with contextlib.suppress(Exception):
                self.destroy(instance_uuid)
            shutil.rmtree(directory, ignore_errors=True)
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

    def destroy(self, instance_uuid: str) -> None:
        domain = self._lookup(instance_uuid)
        if domain is not None:
            self._stop(domain)
            self._undefine(domain)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.instance_dir(instance_uuid))

    def _stop(self, domain: libvirt.virDomain) -> None:
        """Hard stop; a domain already stopped or gone is fine. QEMU sometimes answers EBUSY while it
        is still flushing: retry a few times, as Nova does."""
        for attempt in range(3):
            try:
                if domain.isActive():
                    domain.destroy()
                return
            except libvirt.libvirtError as exc:
                code = _error_code(exc)
                if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    return
                if code == libvirt.VIR_ERR_SYSTEM_ERROR and exc.get_int1() == errno.EBUSY and attempt < 2:
                    time.sleep(1)
                    continue
                raise HypervisorError(f"libvirt cannot stop {domain.name()}: {exc}") from exc

    def _undefine(self, domain: libvirt.virDomain) -> None:
        for flags in (_UNDEFINE_FLAGS, _UNDEFINE_FLAGS_MINIMAL):
            try:
                domain.undefineFlags(flags)
                return
            except libvirt.libvirtError as exc:
                code = _error_code(exc)
                if code == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                if code not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
                    raise HypervisorError(f"libvirt cannot undefine {domain.name()}: {exc}") from exc
        with _hypervisor_errors(f"libvirt cannot undefine {domain.name()}"):
            domain.undefine()

    def get_info(self, instance_uuid: str) -> str:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot read the state of instance {instance_uuid}", instance_uuid):
            return self._power_state(domain)

    def get_console_output(self, instance_uuid: str, lines: int) -> str:
        self._domain(instance_uuid)
        path = self.instance_dir(instance_uuid) / "console.log"
        try:
            with open(path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                start = max(0, size - CONSOLE_MAX_BYTES)
                log.seek(start)
                data = log.read(CONSOLE_MAX_BYTES)
        except FileNotFoundError:
            raise ConsoleUnavailable(f"instance {instance_uuid} has no console log") from None
        text_lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
        if start > 0 and text_lines:
            text_lines = text_lines[1:]  # the first one was cut by the byte limit
        return "".join(text_lines[-lines:]) if lines > 0 else ""

    # Lifecycle --------------------------------------------------------------------------------------

    def _power_state(self, domain: libvirt.virDomain) -> str:
        """Power state of ``domain``; libvirt says shut off for a managed-saved domain, we say
        suspended (the save image decides, not the shutoff reason: that outlives a removed image)."""
        state = domain.state()[0]
        if state == libvirt.VIR_DOMAIN_SHUTOFF and domain.hasManagedSaveImage(0):
            return contract.POWER_SUSPENDED
        return host.power_state(state)

    def _shutdown(self, domain: libvirt.virDomain, timeout: float) -> bool:
        """ACPI power button, pressed again every ACPI_RETRY_INTERVAL, until shut off or ``timeout``."""
        if not domain.isActive():
            return True
        if domain.state()[0] not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            return False  # paused or crashed: nothing in the guest can act on the request
        deadline = time.monotonic() + timeout
        next_press = 0.0
        while True:
            now = time.monotonic()
            if now >= next_press:
                try:
                    domain.shutdown()
                except libvirt.libvirtError as exc:
                    if _error_code(exc) != libvirt.VIR_ERR_OPERATION_INVALID:  # "not running": done
                        raise
                next_press = now + ACPI_RETRY_INTERVAL
            if not domain.isActive():
                return True
            if now >= deadline:
                return False
            time.sleep(min(POLL_INTERVAL, max(deadline - now, 0.01)))

    def shutdown(self, instance_uuid: str, timeout: float) -> bool:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot shut down instance {instance_uuid}", instance_uuid):
            return self._shutdown(domain, timeout)

    def power_off(self, instance_uuid: str, timeout: float) -> bool:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot power off instance {instance_uuid}", instance_uuid):
            clean = not domain.isActive() or (timeout > 0 and self._shutdown(domain, timeout))
            if not clean:
                LOG.info("forcing instance %s off", instance_uuid)
                self._stop(domain)
            if domain.hasManagedSaveImage(0):
                LOG.info("discarding the saved memory state of instance %s", instance_uuid)
                domain.managedSaveRemove(0)
            return clean

    def _recreatable(self, instance_uuid: str) -> bool:
        """Hook: whether the instance's files are here to define its domain again (its disk)."""
        return (self.instance_dir(instance_uuid) / "disk").exists()

    def _define(self, instance_uuid: str, spec: dict[str, Any]) -> libvirt.virDomain:
        """(Re)define the domain from ``spec``: the one definition spawn would write today."""
        directory = self.instance_dir(instance_uuid)
        xml = build_domain_xml(spec, virt_type=self.virt_type, machine_type=self.machine_type,
                               disk_path=directory / "disk", console_path=directory / "console.log",
                               disk_cache=self.disk_cache)
        (directory / "libvirt.xml").write_text(xml)
        with _hypervisor_errors(f"libvirt cannot define the domain of instance {instance_uuid}"):
            return self.conn.defineXML(xml)

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
        with _hypervisor_errors(f"cannot power on instance {instance_uuid}", instance_uuid):
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
        with _hypervisor_errors(f"cannot reboot instance {instance_uuid}", instance_uuid):
            if domain is not None:
                self._stop(domain)
                if domain.hasManagedSaveImage(0):
                    domain.managedSaveRemove(0)  # or create() would restore it: not a reboot
                if spec is not None:
                    domain = self._define(instance_uuid, spec)
            domain = self._lookup_or_recreate(instance_uuid, spec) if domain is None else domain
            domain.create()

    def pause(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot pause instance {instance_uuid}", instance_uuid):
            state = domain.state()[0]
            if state == libvirt.VIR_DOMAIN_PAUSED:
                return
            if not domain.isActive():
                raise InstanceInvalidState(f"instance {instance_uuid} is not running: cannot pause it")
            domain.suspend()  # libvirt's "suspend" freezes the vCPUs: our pause

    def unpause(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot unpause instance {instance_uuid}", instance_uuid):
            if not domain.isActive():
                raise InstanceInvalidState(f"instance {instance_uuid} is not running: cannot unpause it")
            if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                domain.resume()

    def suspend(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot suspend instance {instance_uuid}", instance_uuid):
            if domain.isActive():
                # SAVE_RUNNING: a guest saved while paused still comes back running on resume.
                domain.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)
            elif not domain.hasManagedSaveImage(0):
                raise InstanceInvalidState(f"instance {instance_uuid} is shut off: no memory to save")

    def resume(self, instance_uuid: str) -> None:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot resume instance {instance_uuid}", instance_uuid):
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
        if domain is not None:
            if resize_dir.exists():
                raise InstanceInvalidState(
                    f"cannot resize instance {instance_uuid}: {resize_dir} of an earlier resize is still on "
                    "this host (that resize was neither confirmed nor reverted)")
            if not directory.is_dir():
                raise HypervisorError(f"the files of instance {instance_uuid} are not on this host "
                                      f"({directory} is missing)")
        elif not (resize_dir / RESIZE_STATE_FILE).exists() and not (directory / RESIZE_STATE_FILE).exists():
            raise InstanceNotFound(f"instance {instance_uuid} not found on this host")
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
                with _hypervisor_errors(f"cannot power off instance {instance_uuid}", instance_uuid):
                    power_state = self._power_state(domain)
                clean = None if power_state == contract.POWER_SHUTDOWN else self.power_off(instance_uuid,
                                                                                            shutdown_timeout)
                self._save_resize_state(directory, domain, power_state)
                self._undefine(domain)
            if not resize_dir.exists():
                os.rename(directory, resize_dir)
            power_state = power_state or self._load_resize_state(resize_dir)["power_state"]
            self._refuse_domain_at(dest_conn, instance_uuid, dest_uri)
            copy_started = True
            copied = self._copy_disk(resize_dir, dest_conn, directory, dest_uri, progress, copy_timeout)
        except BaseException as exc:
            outcome = self._put_back_resize(instance_uuid, dest_conn, dest_uri, copy_started, power_state)
            if not isinstance(exc, Exception):
                raise
            raise HypervisorError(f"{_cause(exc)}; {outcome}") from exc
        finally:
            if dest_conn is not None and dest_conn is not self._conn:
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
        with _hypervisor_errors(f"cannot connect to the destination hypervisor at {dest_uri}"):
            return libvirt.open(dest_uri)

    @staticmethod
    def _refuse_domain_at(dest_conn: libvirt.virConnect, instance_uuid: str, dest_uri: str) -> None:
        """The copy must never overwrite the disk of a domain the destination already has (this domain
        is undefined by now, so on a same-host resize there is none)."""
        try:
            dest_conn.lookupByName(contract.domain_name(instance_uuid))
        except libvirt.libvirtError as exc:
            if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise HypervisorError(f"cannot look up instance {instance_uuid} at {dest_uri}: {exc}") from exc
        raise InstanceExists(f"a domain of instance {instance_uuid} already exists at {dest_uri}: its disk "
                             "is not overwritten")

    @staticmethod
    def _save_resize_state(directory: Path, domain: libvirt.virDomain, power_state: str) -> None:
        with _hypervisor_errors(f"cannot read the definition of {domain.name()}"):
            xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        path = directory / RESIZE_STATE_FILE
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump({"power_state": power_state, "xml": xml}, out)
            out.flush()
            os.fsync(out.fileno())
        temporary.rename(path)

    @staticmethod
    def _load_resize_state(directory: Path) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((directory / RESIZE_STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HypervisorError(f"cannot read {directory / RESIZE_STATE_FILE}: {exc}") from exc
        return state

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
                problems.append(f"the partial copy at {dest_uri} was not removed ({_cause(exc)})")
        try:
            if resize_dir.exists():
                if directory.exists():  # the destination's copy, on this host or on shared storage
                    if not copy_started:  # not known to be ours: it may be a domain's disk there
                        raise InstanceInvalidState(f"{directory} exists beside {resize_dir}; both left as "
                                                   "they are")
                    shutil.rmtree(directory)
                os.rename(resize_dir, directory)
            domain = self._lookup(instance_uuid)
            state_file = directory / RESIZE_STATE_FILE
            if state_file.exists():
                state = self._load_resize_state(directory)
                power_state = state["power_state"]
                if domain is None:
                    with _hypervisor_errors(f"libvirt cannot define instance {instance_uuid} again"):
                        domain = self.conn.defineXML(state["xml"])
            if domain is None:
                raise InstanceNotFound(f"instance {instance_uuid} has no domain and no saved definition")
            with _hypervisor_errors(f"cannot start instance {instance_uuid} again", instance_uuid):
                if power_state in (contract.POWER_RUNNING, contract.POWER_PAUSED) and not domain.isActive():
                    domain.create()
                running = bool(domain.isActive())
            state_file.unlink(missing_ok=True)
            outcome = ("everything was put back: the instance runs on this host" if running
                       else "everything was put back: the instance is shut off on this host, as it was")
        except Exception as exc:
            LOG.exception("putting instance %s back after its failed resize failed", instance_uuid)
            problems.insert(0, f"putting the instance back failed: {_cause(exc)}")
            outcome = ""
        return "; ".join(filter(None, [outcome, *problems]))

    def finish_migration(self, spec: dict[str, Any], power_on: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        directory = self.instance_dir(instance_uuid)
        self._prepare_migrated_disk(instance_uuid, directory, spec["flavor"]["root_gb"])
        (directory / "console.log").touch(mode=0o600, exist_ok=True)
        try:
            self._define_and_start(instance_uuid, spec, power_on)
        except BaseException:
            LOG.warning("finish resize of %s failed; undefining its domain here", instance_uuid)
            domain = self._lookup(instance_uuid)
            if domain is not None:
                with contextlib.suppress(Exception):
                    self._stop(domain)
                    self._undefine(domain)
            raise

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
                self._stop(domain)
                self._undefine(domain)
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
        (directory / RESIZE_STATE_FILE).unlink(missing_ok=True)
        self._define_and_start(instance_uuid, spec, power_on)

    def _define_and_start(self, instance_uuid: str, spec: dict[str, Any], power_on: bool) -> None:
        """Define the domain from ``spec`` (the flavor the resize ends with) and, when ``power_on``,
        start it unless it already runs."""
        domain = self._define(instance_uuid, spec)
        if power_on:
            with _hypervisor_errors(f"libvirt cannot start the domain of instance {instance_uuid}",
                                    instance_uuid):
                if not domain.isActive():
                    domain.create()

    # Snapshot -------------------------------------------------------------------------------------------

    def snapshot(self, instance_uuid: str, target_path: Path,
                 progress: Callable[[int, int], None]) -> None:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot snapshot instance {instance_uuid}", instance_uuid):
            active = bool(domain.isActive())
        self._snapshot_disk(domain, instance_uuid, active, target_path, progress)

    def _snapshot_disk(self, domain: libvirt.virDomain, instance_uuid: str, active: bool, target_path: Path,
                       progress: Callable[[int, int], None]) -> None:
        """Hook: the instance's disk as one standalone qcow2 image at ``target_path``; of a running
        guest through a live block copy."""
        disk = self.instance_dir(instance_uuid) / "disk"
        if not active:
            size = disk.stat().st_size
            progress(0, size)
            images.convert_to_standalone(disk, "qcow2", target_path, CONVERT_TIMEOUT)
            progress(size, size)
            return
        delta = target_path.with_name(target_path.name + ".delta")
        try:
            self._live_copy(domain, disk, delta, progress)
            images.convert_to_standalone(delta, "qcow2", target_path, CONVERT_TIMEOUT)
        finally:
            delta.unlink(missing_ok=True)

    def _live_copy(self, domain: libvirt.virDomain, disk: Path, delta: Path,
                   progress: Callable[[int, int], None]) -> None:
        """Nova's live snapshot: ``delta`` (backed by the disk's own backing file) receives a shallow
        block copy of the disk's top layer; once the copy is in sync the job is aborted without pivot,
        so the guest keeps its disk and ``delta`` holds a consistent copy of it."""
        info = images.qemu_img_info(disk, "qcow2")  # --force-share: the running QEMU holds the lock
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        images.create_delta(Path(backing) if backing else None,
                            info.get("backing-filename-format") or "qcow2", delta,
                            int(info["virtual-size"]))
        delta.chmod(0o644)
        dest = (f"<disk type='file'><driver type='qcow2'/>"
                f"<source file='{_xml_escape(str(delta))}'/></disk>")
        with _hypervisor_errors(f"cannot start the block copy of instance {domain.name()}"):
            domain.blockCopy("vda", dest, None, _BLOCK_COPY_FLAGS)
        try:
            deadline = time.monotonic() + BLOCK_COPY_TIMEOUT
            while True:
                with _hypervisor_errors(f"cannot read the block copy of {domain.name()}"):
                    job = domain.blockJobInfo("vda", 0)
                if not job:
                    raise HypervisorError(f"the block copy of {domain.name()} ended before it was ready")
                cur, end = int(job.get("cur", 0)), int(job.get("end", 0))
                progress(cur, end)
                if end and cur == end and job.get("ready", 1):
                    break
                if time.monotonic() > deadline:
                    raise HypervisorError(f"the block copy of {domain.name()} was not ready within "
                                          f"{BLOCK_COPY_TIMEOUT:.0f} s")
                time.sleep(BLOCK_JOB_POLL_INTERVAL)
        finally:
            self._abort_block_job(domain)

    def _abort_block_job(self, domain: libvirt.virDomain) -> None:
        """Abort the copy without pivot (the guest keeps its disk) and wait until the job is gone."""
        try:
            domain.blockJobAbort("vda", 0)
        except libvirt.libvirtError as exc:
            LOG.warning("aborting the block copy of %s: %s", domain.name(), exc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if not domain.blockJobInfo("vda", 0):
                    return
            except libvirt.libvirtError:
                return
            time.sleep(BLOCK_JOB_POLL_INTERVAL)
        LOG.warning("the block copy job of %s is still there 30 s after its abort", domain.name())

    # Migration ----------------------------------------------------------------------------------------

    def compare_cpu(self, cpu_info: Mapping[str, Any]) -> str:
        xml = migration.cpu_xml(cpu_info) if isinstance(cpu_info, Mapping) else None
        if xml is None:
            LOG.info("source CPU %r names no model: CPU comparison skipped", cpu_info)
            return "skipped"
        try:
            # FAIL_INCOMPATIBLE: an incompatible CPU is an error that says why.
            result = self.conn.compareCPU(xml, libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE)
        except libvirt.libvirtError as exc:
            code = _error_code(exc)
            if code == libvirt.VIR_ERR_CPU_INCOMPATIBLE:
                raise CPUIncompatible(exc.get_error_message() or str(exc)) from exc
            raise HypervisorError(f"libvirt cannot compare the source's CPU with this host's: "
                                  f"{exc.get_error_message() or exc}") from exc
        if result == libvirt.VIR_CPU_COMPARE_IDENTICAL:
            return "identical"
        if result == libvirt.VIR_CPU_COMPARE_SUPERSET:
            return "superset"
        if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
            raise CPUIncompatible(f"the CPU of this host is incompatible with the source's "
                                  f"{cpu_info.get('model')}")
        raise HypervisorError(f"libvirt cannot compare the CPUs (compareCPU answered {result})")

    def pre_live_migration(self, spec: dict[str, Any], base_image: Path | None, block_migration: bool,
                           shared_storage: bool) -> None:
        instance_uuid = checked_uuid(spec["instance_uuid"])
        if self._lookup(instance_uuid) is not None:
            raise InstanceExists(f"instance {instance_uuid} already exists on this host")
        if shared_storage:
            return
        directory = self.instance_dir(instance_uuid)
        try:
            if directory.exists():  # left by an attempt that failed: no domain uses it
                shutil.rmtree(directory)
            directory.mkdir(mode=0o755, parents=True)
            if block_migration:  # the overlay spawn creates: NON_SHARED_INC copies its contents into it
                self._create_disk(spec, base_image, directory / "disk",
                                  missing_base="block migration needs the base image on the destination")
            (directory / "console.log").touch(mode=0o600)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def live_migration(self, instance_uuid: str, dest_uri: str, dest_migrate_uri: str | None = None,
                       block_migration: bool = False, *, unsafe: bool = False, bandwidth_mib: int = 0,
                       post_copy: bool = False, auto_converge: bool = False) -> migration.MigrationResult:
        """Peer-to-peer live migration to the daemon at ``dest_uri`` (memory, and the disk's top layer
        too with ``block_migration``, streamed to ``dest_migrate_uri``). Afterwards the domain runs
        and is defined there and is gone here; on failure it keeps running here."""
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot live-migrate instance {instance_uuid} to {dest_uri}", instance_uuid):
            if domain.state()[0] not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
                raise InstanceInvalidState(f"instance {instance_uuid} is not running: "
                                           "nothing to live-migrate")
        try:
            return migration.live_migrate(domain, dest_uri, dest_migrate_uri, block_migration, unsafe=unsafe,
                                          bandwidth_mib=bandwidth_mib, post_copy=post_copy,
                                          auto_converge=auto_converge)
        except libvirt.libvirtError as exc:
            message = exc.get_error_message() or str(exc)
            if _error_code(exc) == libvirt.VIR_ERR_OPERATION_ABORTED:
                raise MigrationAborted(f"libvirt aborted the migration job: {message}") from exc
            if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(f"instance {instance_uuid} not found on this host") from exc
            if post_copy and migration.POST_COPY_UNSUPPORTED in message:
                raise PostCopyUnsupported(f"libvirt could not migrate it to {dest_uri}: {message}") from exc
            raise HypervisorError(f"libvirt could not migrate it to {dest_uri}: {message}") from exc

    def live_migration_progress(self, instance_uuid: str) -> dict[str, int] | None:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot read the migration job of instance {instance_uuid}", instance_uuid):
            return self._job_progress(domain)

    def _job_progress(self, domain: libvirt.virDomain) -> dict[str, int] | None:
        """Hook: the counters of the domain's running job, None when none runs."""
        return migration.job_progress(domain)

    def abort_live_migration(self, instance_uuid: str) -> bool:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"libvirt cannot abort the migration job of instance {instance_uuid}",
                                instance_uuid):
            return migration.abort_job(domain)

    def live_migration_force_complete(self, instance_uuid: str, post_copy: bool) -> str:
        domain = self._domain(instance_uuid)
        how = "switch to post-copy" if post_copy else "pause the guest"
        with _hypervisor_errors(f"libvirt cannot {how} in the migration of instance {instance_uuid}",
                                instance_uuid):
            switched = migration.switch_over(domain, post_copy, self._job_progress)
        if switched is None:
            raise HypervisorError(f"cannot {how} in the migration of instance {instance_uuid}: no migration "
                                  "job runs")
        return switched

    def post_live_migration_at_source(self, instance_uuid: str, shared_storage: bool) -> None:
        domain = self._lookup(instance_uuid)
        if domain is not None:
            with _hypervisor_errors(f"cannot read the state of instance {instance_uuid}", instance_uuid):
                if domain.isActive():
                    raise InstanceInvalidState(f"instance {instance_uuid} still runs on this host after "
                                               "its migration")
            LOG.warning("instance %s migrated but its domain is still defined here; undefining it",
                        instance_uuid)
            self._undefine(domain)
        if not shared_storage:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.instance_dir(instance_uuid))

    def post_live_migration_at_destination(self, instance_uuid: str, spec: dict[str, Any]) -> dict[str, Any]:
        domain = self._domain(instance_uuid)
        with _hypervisor_errors(f"cannot read the migrated domain of instance {instance_uuid}",
                                instance_uuid):
            if not domain.isActive():
                raise InstanceInvalidState(f"the migrated domain of instance {instance_uuid} is not running "
                                           "on this host")
            if not domain.isPersistent():  # PERSIST_DEST asked for it; a migration without it left none
                LOG.warning("migrated domain of %s is transient here; defining it", instance_uuid)
                self.conn.defineXML(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
            figures = migration.completed_job(domain)
        directory = self.instance_dir(instance_uuid)
        xml = build_domain_xml(spec, virt_type=self.virt_type, machine_type=self.machine_type,
                               disk_path=directory / "disk", console_path=directory / "console.log",
                               disk_cache=self.disk_cache)
        (directory / "libvirt.xml").write_text(xml)
        return figures

    def rollback_live_migration_at_destination(self, instance_uuid: str, destroy_disks: bool) -> bool:
        domain = self._lookup(instance_uuid)
        removed = False
        if domain is not None:
            with _hypervisor_errors(f"cannot read the state of instance {instance_uuid}", instance_uuid):
                state, reason = domain.state()
                if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED) or (
                        state == libvirt.VIR_DOMAIN_PAUSED and reason != libvirt.VIR_DOMAIN_PAUSED_MIGRATION):
                    raise InstanceInvalidState(
                        f"instance {instance_uuid} is {host.power_state(state)} on this host: its migration "
                        "went through; nothing rolled back")
            # Shut off, or paused waiting for an incoming migration that will never finish.
            self._stop(domain)
            domain = self._lookup(instance_uuid)  # a transient domain is gone once stopped
            if domain is not None:
                self._undefine(domain)
            removed = True
        if destroy_disks:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.instance_dir(instance_uuid))
        return removed

    def instance_power_state_at(self, uri: str, instance_uuid: str) -> str | None:
        name = contract.domain_name(checked_uuid(instance_uuid))
        try:
            conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot reach the hypervisor at {uri}: "
                                  f"{exc.get_error_message() or exc}") from exc
        try:
            try:
                domain = conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise HypervisorError(f"cannot look up instance {instance_uuid} at {uri}: {exc}") from exc
            with _hypervisor_errors(f"cannot read the state of instance {instance_uuid} at {uri}"):
                return self._power_state(domain)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    # Lifecycle events ---------------------------------------------------------------------------------

    def register_lifecycle_callback(self, callback: Callable[[str], None] | None) -> None:
        start_event_loop()
        with self._conn_lock:
            self._lifecycle_callback = callback
            conn = self._conn
            if conn is None or not _alive(conn):
                return  # the next connection registers it
            if callback is None:
                self._deregister_events(conn)
            elif self._events_conn is not conn:
                self._register_events(conn)

    def _register_events(self, conn: libvirt.virConnect) -> None:
        """Called with _conn_lock held, on a connection opened after the event loop started."""
        with _hypervisor_errors("cannot register for libvirt lifecycle events"):
            self._event_callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle_event, None)
        self._events_conn = conn
        try:
            conn.registerCloseCallback(self._on_connection_closed, None)
        except libvirt.libvirtError as exc:  # only a log line is lost
            LOG.debug("no close callback on %s: %s", self.uri, exc)

    def _deregister_events(self, conn: libvirt.virConnect) -> None:
        registered = self._events_conn
        if registered is None or registered is not conn:
            return
        self._events_conn = None
        with contextlib.suppress(libvirt.libvirtError):
            registered.domainEventDeregisterAny(self._event_callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            registered.unregisterCloseCallback()

    def _on_lifecycle_event(self, _conn: libvirt.virConnect, domain: libvirt.virDomain, event: int,
                            detail: int, _opaque: object) -> None:
        """Runs on libvirt's event thread: hand the uuid over, never block, never raise."""
        try:
            instance_uuid = instance_uuid_of(domain.name())
            callback = self._lifecycle_callback
            if instance_uuid is None or callback is None:
                return
            LOG.debug("lifecycle event %s (detail %s) of instance %s", event, detail, instance_uuid)
            callback(instance_uuid)
        except Exception:
            LOG.exception("lifecycle event handler failed")

    def _on_connection_closed(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        LOG.warning("libvirt connection to %s closed (reason %s): events stop until the next call "
                    "reconnects (the heartbeat makes one every few seconds)", self.uri, reason)

    def _notify_all(self, conn: libvirt.virConnect) -> None:
        """After a reconnect: events may have been missed, so every instance counts as changed."""
        callback = self._lifecycle_callback
        if callback is None:
            return
        try:
            names = [domain.name() for domain in conn.listAllDomains(0)]
        except libvirt.libvirtError as exc:
            LOG.warning("cannot list domains after reconnecting: %s", exc)
            return
        for name in names:
            instance_uuid = instance_uuid_of(name)
            if instance_uuid is not None:
                callback(instance_uuid)

    def close(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
            self._lifecycle_callback = None
            if conn is None:
                return
            self._deregister_events(conn)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
