"""Live migration of a running domain with libvirt peer-to-peer migration, and what goes with it:
the job's progress, its abort and switch-over, the completed job's figures, the CPU comparison of the
pre-checks.

The source daemon connects to the destination daemon itself (``dest_uri``, e.g.
``qemu+tcp://<dest>/system``) and QEMU streams memory (and, for block migration, the disk) to
``dest_migrate_uri`` (e.g. ``tcp://<dest>``). The domain is persisted on the destination and
undefined here only when libvirt reports success; on failure it keeps running here.

Block migration is ``NON_SHARED_INC``: the destination holds the instance's qcow2 overlay over the
same cached base image at the same path (the destination worker's ``pre_live_migration`` creates it as
spawn does), and QEMU copies only the overlay, the layer the guest writes; the base image never
travels. ``UNSAFE`` lets libvirt migrate disks it believes unshared although they are shared (a
directory shared by bind mounts: libvirt only recognises network and cluster filesystems).

``migrateToURI3`` blocks until the migration ends, so the compute manager calls it in a thread of its
own and meanwhile reads :func:`job_progress` and may call :func:`abort_job` or :func:`switch_over`,
from other threads: one libvirt connection serves them all (libvirt connections are thread-safe and a
domain's migration job allows queries, abort, suspend and the start of post-copy while it runs).

Converging (Nova's ``live_migration_permit_post_copy`` / ``_auto_converge``): a job started with
``POSTCOPY`` can be switched to post-copy (``migrateStartPostCopy``): the guest then runs on the
destination, which fetches the pages not copied yet from the source; from then on the job cannot be
aborted, and if it fails the guest's memory is split between the hosts. The destination's QEMU needs
userfaultfd for it (``vm.unprivileged_userfaultfd=1`` for a QEMU that does not run as root), else libvirt
fails the migration as it starts ("Postcopy is not supported"). Without post-copy, pausing the guest
(``suspend``) stops its memory changing so that the copy converges; libvirt resumes it on the
destination. ``AUTO_CONVERGE`` has QEMU throttle the vCPUs of a guest whose copy does not converge.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import libvirt

from compute_workers import contract
from compute_workers.exception import (
    ComputeError,
    CPUIncompatible,
    HypervisorError,
    InstanceNotFound,
    MigrationAborted,
    PostCopyUnsupported,
)
from compute_workers.virt.driver import SWITCHED_BY_PAUSING, SWITCHED_TO_POST_COPY

LOG = logging.getLogger(__name__)

BASE_FLAGS: int = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
              | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


@dataclass(frozen=True)
class MigrationResult:
    seconds: float  # wall-clock time of the migration call


# Where libvirt relays the destination QEMU's refusal of a job started with POSTCOPY (no userfaultfd).
POST_COPY_UNSUPPORTED = "Postcopy is not supported"


def migration_flags(block_migration: bool, unsafe: bool = False, *, post_copy: bool = False,
                    auto_converge: bool = False) -> int:
    flags = BASE_FLAGS
    if block_migration:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
    if unsafe:
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    if post_copy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    return flags


def migration_params(dest_migrate_uri: str | None, bandwidth_mib: int = 0) -> dict[str, Any]:
    """``migrateToURI3`` parameters; the bandwidth only when one is configured (without it libvirt uses
    the domain's own migration speed, by default unlimited)."""
    params: dict[str, Any] = {}
    if dest_migrate_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = dest_migrate_uri
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    return params


def live_migrate(domain: libvirt.virDomain, dest_uri: str, dest_migrate_uri: str | None,
                 block_migration: bool, *, unsafe: bool = False, bandwidth_mib: int = 0,
                 post_copy: bool = False, auto_converge: bool = False) -> MigrationResult:
    """Migrate ``domain`` (running) to ``dest_uri``; raises libvirtError when libvirt refuses or fails."""
    started = time.monotonic()
    domain.migrateToURI3(dest_uri, migration_params(dest_migrate_uri, bandwidth_mib),
                         migration_flags(block_migration, unsafe, post_copy=post_copy,
                                         auto_converge=auto_converge))
    return MigrationResult(seconds=time.monotonic() - started)


def migration_error(exc: libvirt.libvirtError, instance_uuid: str, dest_uri: str,
                    post_copy: bool) -> ComputeError:
    """The worker's exception for libvirt's failure of :func:`live_migrate` (the domain still runs
    here): an aborted job, a vanished domain, a destination without post-copy, anything else."""
    message = exc.get_error_message() or str(exc)
    code = int(exc.get_error_code() or 0)
    if code == libvirt.VIR_ERR_OPERATION_ABORTED:
        return MigrationAborted(f"libvirt aborted the migration job: {message}")
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return InstanceNotFound(f"instance {instance_uuid} not found on this host")
    if post_copy and POST_COPY_UNSUPPORTED in message:
        return PostCopyUnsupported(f"libvirt could not migrate it to {dest_uri}: {message}")
    return HypervisorError(f"libvirt could not migrate it to {dest_uri}: {message}")


# jobInfo()'s list, for daemons without jobStats(): type, time elapsed, time remaining, data
# total/processed/remaining, memory total/processed/remaining, file total/processed/remaining.
_JOB_INFO_INDEX = {"memory_total": 6, "memory_processed": 7, "memory_remaining": 8,
                   "disk_total": 9, "disk_processed": 10, "disk_remaining": 11}


def job_progress(domain: libvirt.virDomain) -> dict[str, int] | None:
    """The running job's counters (``contract.MIGRATION_PROGRESS_KEYS``, bytes), None when no job runs.

    ``jobStats`` names them as the contract does; libvirt leaves out what it does not know yet (0)."""
    try:
        stats = domain.jobStats(0)
    except libvirt.libvirtError as exc:
        if int(exc.get_error_code() or 0) != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        info = domain.jobInfo()
        if not info or info[0] == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        return {key: int(info[index]) for key, index in _JOB_INFO_INDEX.items()}
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return {key: int(stats.get(key, 0)) for key in contract.MIGRATION_PROGRESS_KEYS}


def abort_job(domain: libvirt.virDomain) -> bool:
    """Abort the domain's running job; False when none runs. Raises libvirtError otherwise."""
    try:
        domain.abortJob()
    except libvirt.libvirtError as exc:
        if int(exc.get_error_code() or 0) == libvirt.VIR_ERR_OPERATION_INVALID:  # "no job is active"
            return False
        raise
    return True


def switch_over(domain: libvirt.virDomain, post_copy: bool,
                progress: Callable[[libvirt.virDomain], dict[str, int] | None] = job_progress) -> str | None:
    """Make the domain's running migration job converge: switch it to post-copy (a job started with
    ``POSTCOPY``), else pause the guest. Returns :data:`SWITCHED_TO_POST_COPY` or
    :data:`SWITCHED_BY_PAUSING`; None when no job runs to pause the guest for. Raises libvirtError
    when libvirt refuses (no job; a job still copying the disk: "post-copy can only be started while
    outgoing migration is in progress").

    ``suspend`` would pause a guest that no job migrates, for good: the job is checked first (one that
    ends in between leaves the guest running on the destination, libvirt resumes it there, or paused
    here after a failure, which the caller resumes as after any failed migration). ``progress`` reads
    the job (the driver's own reader: a hypervisor without jobs has none to pause the guest for)."""
    if post_copy:
        domain.migrateStartPostCopy(0)  # libvirt refuses it without a job
        return SWITCHED_TO_POST_COPY
    if progress(domain) is None:
        return None
    domain.suspend()
    return SWITCHED_BY_PAUSING


def completed_job(domain: libvirt.virDomain) -> dict[str, int]:
    """What libvirt says of the domain's last completed job (on the destination of a migration:
    the migration, whose statistics the source sends with it): ``downtime_ms``, ``elapsed_ms``,
    ``transferred_bytes`` and the final ``contract.MIGRATION_PROGRESS_KEYS``, those it knows."""
    try:
        stats = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return {}
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return {}
    figures = {"downtime_ms": stats.get("downtime"), "elapsed_ms": stats.get("time_elapsed"),
               "transferred_bytes": stats.get("data_processed")}
    figures.update({key: stats.get(key) for key in contract.MIGRATION_PROGRESS_KEYS})
    return {key: int(value) for key, value in figures.items() if value is not None}


def cpu_xml(cpu_info: Mapping[str, Any]) -> str | None:
    """The ``<cpu>`` of a heartbeat's ``cpu_info`` (as Nova's ``_compare_cpu`` builds it: every
    feature required), for ``compareCPU``; None when it names no model to compare."""
    arch, model = cpu_info.get("arch"), cpu_info.get("model")
    if not isinstance(model, str) or not model:
        return None
    cpu = ET.Element("cpu")
    if isinstance(arch, str) and arch:
        ET.SubElement(cpu, "arch").text = arch
    ET.SubElement(cpu, "model").text = model
    vendor = cpu_info.get("vendor")
    if isinstance(vendor, str) and vendor:
        ET.SubElement(cpu, "vendor").text = vendor
    features = cpu_info.get("features") or []
    for name in sorted({f for f in features if isinstance(f, str) and f}):
        ET.SubElement(cpu, "feature", policy="require", name=name)
    return ET.tostring(cpu, encoding="unicode")


def compare_cpu(conn: libvirt.virConnect, cpu_info: Mapping[str, Any]) -> str:
    """Whether this host (``conn``) can run a guest of the source's ``cpu_info``: ``identical``,
    ``superset``, or ``skipped`` when the source names no CPU model; raises CPUIncompatible with
    libvirt's reason, or HypervisorError when libvirt cannot compare."""
    xml = cpu_xml(cpu_info) if isinstance(cpu_info, Mapping) else None
    if xml is None:
        LOG.info("source CPU %r names no model: CPU comparison skipped", cpu_info)
        return "skipped"
    try:
        # FAIL_INCOMPATIBLE: an incompatible CPU is an error that says why.
        result = conn.compareCPU(xml, libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE)
    except libvirt.libvirtError as exc:
        if int(exc.get_error_code() or 0) == libvirt.VIR_ERR_CPU_INCOMPATIBLE:
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
