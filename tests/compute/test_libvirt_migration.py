"""The libvirt side of live migration without a second host: flags and parameters, the CPU XML and
libvirt's comparison, the job's progress and abort read from stub domains (libvirt's test:// driver
has no migration jobs), and the destination's steps on test:///default."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from compute_workers import contract
from compute_workers.exception import (
    CPUIncompatible,
    HypervisorError,
    InstanceExists,
    InstanceInvalidState,
    PostCopyUnsupported,
)
from compute_workers.virt.libvirt import migration
from compute_workers.virt.libvirt.driver import LibvirtDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import SpecFactory

BASE = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[LibvirtTestDriver]:
    driver = LibvirtTestDriver("test:///default", tmp_path / "instances")
    driver.init_host()
    yield driver
    driver.close()


def test_flags_incremental_block_migration_and_unsafe_only_when_asked() -> None:
    assert migration.migration_flags(False) == BASE
    assert migration.migration_flags(True) == BASE | libvirt.VIR_MIGRATE_NON_SHARED_INC
    assert not migration.migration_flags(True) & libvirt.VIR_MIGRATE_NON_SHARED_DISK  # never the full chain
    assert migration.migration_flags(False, unsafe=True) == BASE | libvirt.VIR_MIGRATE_UNSAFE
    assert migration.migration_flags(False, post_copy=True) == BASE | libvirt.VIR_MIGRATE_POSTCOPY
    assert migration.migration_flags(False, auto_converge=True) == BASE | libvirt.VIR_MIGRATE_AUTO_CONVERGE


def test_params_carry_the_data_uri_and_a_bandwidth_only_when_configured() -> None:
    assert migration.migration_params("tcp://10.0.0.2") == {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2"}
    assert migration.migration_params(None) == {}
    assert migration.migration_params("tcp://b", 100) == {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://b",
                                                           libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 100}


def test_cpu_xml_requires_every_feature_of_the_source() -> None:
    xml = migration.cpu_xml({"arch": "x86_64", "model": "EPYC", "vendor": "AMD",
                             "features": ["avx2", "aes", "avx2", "<bad>"]})
    assert xml is not None
    cpu = ET.fromstring(xml)  # escaped, parseable
    assert (cpu.findtext("arch"), cpu.findtext("model"), cpu.findtext("vendor")) == ("x86_64", "EPYC", "AMD")
    assert [(f.get("name"), f.get("policy")) for f in cpu.findall("feature")] == [
        ("<bad>", "require"), ("aes", "require"), ("avx2", "require")]
    assert migration.cpu_xml({"arch": "i686", "model": "", "features": []}) is None  # test:// says no more


class StubDomain:
    """What the monitor calls on a domain, answering as libvirt 9.0 does."""

    def __init__(self, stats: dict[str, Any] | None = None, abort_error: int | None = None,
                 job_stats_error: int | None = None, job_info: list[int] | None = None) -> None:
        self.stats = stats or {"type": libvirt.VIR_DOMAIN_JOB_NONE}
        self.abort_error, self.job_stats_error, self.job_info = abort_error, job_stats_error, job_info
        self.aborts = 0
        self.calls: list[str] = []

    @staticmethod
    def _error(code: int) -> libvirt.libvirtError:
        error = libvirt.libvirtError("stub")
        error.err = (code, 0, "stub message", 0, "", None, None, 0, 0)
        return error

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if self.job_stats_error is not None:
            raise self._error(self.job_stats_error)
        return self.stats

    def jobInfo(self) -> list[int]:
        return self.job_info or [0] * 12

    def abortJob(self) -> None:
        self.aborts += 1
        if self.abort_error is not None:
            raise self._error(self.abort_error)

    def migrateStartPostCopy(self, flags: int = 0) -> None:
        self.calls.append("migrateStartPostCopy")
        if self.stats.get("type") == libvirt.VIR_DOMAIN_JOB_NONE:
            raise self._error(libvirt.VIR_ERR_OPERATION_INVALID)

    def suspend(self) -> None:
        self.calls.append("suspend")


def test_job_progress_reads_the_contract_counters_and_none_without_a_job() -> None:
    assert migration.job_progress(StubDomain()) is None
    running = StubDomain({"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "memory_total": 100,
                          "memory_processed": 40, "memory_remaining": 60, "downtime": 5})
    assert migration.job_progress(running) == {
        "memory_total": 100, "memory_processed": 40, "memory_remaining": 60, "disk_total": 0,
        "disk_processed": 0, "disk_remaining": 0}
    old = StubDomain(job_stats_error=libvirt.VIR_ERR_NO_SUPPORT,
                     job_info=[libvirt.VIR_DOMAIN_JOB_UNBOUNDED, 1, 0, 9, 9, 9, 10, 4, 6, 20, 5, 15])
    assert migration.job_progress(old) == {
        "memory_total": 10, "memory_processed": 4, "memory_remaining": 6, "disk_total": 20,
        "disk_processed": 5, "disk_remaining": 15}
    with pytest.raises(libvirt.libvirtError):
        migration.job_progress(StubDomain(job_stats_error=libvirt.VIR_ERR_SYSTEM_ERROR))


def test_abort_job_is_false_when_no_job_runs() -> None:
    assert migration.abort_job(StubDomain()) is True
    assert migration.abort_job(StubDomain(abort_error=libvirt.VIR_ERR_OPERATION_INVALID)) is False
    with pytest.raises(libvirt.libvirtError):
        migration.abort_job(StubDomain(abort_error=libvirt.VIR_ERR_INTERNAL_ERROR))


def test_switch_over_starts_post_copy_or_pauses_only_a_migrating_guest() -> None:
    migrating = StubDomain({"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED})
    assert migration.switch_over(migrating, post_copy=True) == "post-copy"
    assert migration.switch_over(migrating, post_copy=False) == "paused"
    assert migrating.calls == ["migrateStartPostCopy", "suspend"]
    idle = StubDomain()
    assert migration.switch_over(idle, post_copy=False) is None  # never pauses a guest no job migrates
    with pytest.raises(libvirt.libvirtError):
        migration.switch_over(idle, post_copy=True)
    assert idle.calls == ["migrateStartPostCopy"]


def test_the_driver_reports_a_refused_switch_over_and_a_destination_without_post_copy(
        driver: LibvirtTestDriver, make_spec: SpecFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    instance_uuid = spec["instance_uuid"]
    with pytest.raises(HypervisorError, match=r"cannot pause the guest .*: no migration job runs"):
        driver.live_migration_force_complete(instance_uuid, post_copy=False)
    assert driver.get_info(instance_uuid) == contract.POWER_RUNNING
    with pytest.raises(HypervisorError, match="libvirt cannot switch to post-copy in the migration of"):
        driver.live_migration_force_complete(instance_uuid, post_copy=True)  # test:// has no jobs

    def no_userfaultfd(*args: Any, **kwargs: Any) -> None:
        error = libvirt.libvirtError("stub")
        error.err = (libvirt.VIR_ERR_OPERATION_FAILED, 0, "operation failed: job 'migration out' failed: "
                     "Postcopy is not supported", 0, "", None, None, 0, 0)
        raise error

    monkeypatch.setattr(migration, "live_migrate", no_userfaultfd)
    with pytest.raises(PostCopyUnsupported, match="Postcopy is not supported"):
        driver.live_migration(instance_uuid, "qemu+tcp://b/system", "tcp://b", True, post_copy=True)
    with pytest.raises(HypervisorError) as raised:  # the same words without post-copy asked: not ours
        driver.live_migration(instance_uuid, "qemu+tcp://b/system", "tcp://b", True)
    assert not isinstance(raised.value, PostCopyUnsupported)
    driver.destroy(instance_uuid)


def test_completed_job_figures() -> None:
    done = StubDomain({"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, "downtime": 196, "time_elapsed": 1380,
                       "data_processed": 5 << 20, "memory_total": 128 << 20, "memory_processed": 4 << 20,
                       "memory_remaining": 0, "setup_time": 3})
    assert migration.completed_job(done) == {
        "downtime_ms": 196, "elapsed_ms": 1380, "transferred_bytes": 5 << 20, "memory_total": 128 << 20,
        "memory_processed": 4 << 20, "memory_remaining": 0}
    assert migration.completed_job(StubDomain()) == {}


def test_test_driver_cannot_compare_cpus_so_it_skips(driver: LibvirtTestDriver) -> None:
    source = {"arch": "x86_64", "model": "qemu64", "vendor": "AMD", "features": []}
    assert driver.compare_cpu(source) == "skipped"
    assert driver.compare_cpu({}) == "skipped"


@pytest.mark.libvirt
def test_compare_cpu_with_the_real_host(tmp_path: Path) -> None:
    """libvirt's compareCPU on qemu:///system: this host's own CPU is compatible; another vendor's
    server CPU is refused with libvirt's reason."""
    real = LibvirtDriver("qemu:///system", tmp_path, virt_type="qemu")
    real.init_host()
    try:
        own = real.get_available_resource()["cpu_info"]
        assert real.compare_cpu(own) in ("identical", "superset")
        vendor = "Intel" if own["vendor"] == "AMD" else "AMD"
        foreign = {"arch": "x86_64", "model": "Skylake-Server" if vendor == "Intel" else "EPYC",
                   "vendor": vendor, "features": ["avx512f"]}
        with pytest.raises(CPUIncompatible, match=r"(?i)incompatible|vendor"):
            real.compare_cpu(foreign)
    finally:
        real.close()


def test_pre_live_migration_makes_the_directory_and_console(driver: LibvirtTestDriver,
                                                            make_spec: SpecFactory) -> None:
    spec = make_spec()
    directory = driver.instance_dir(spec["instance_uuid"])
    directory.mkdir(parents=True)
    (directory / "stale").write_text("left by a failed attempt")
    driver.pre_live_migration(spec, None, block_migration=True, shared_storage=False)
    assert sorted(p.name for p in directory.iterdir()) == ["console.log"]


def test_pre_live_migration_on_shared_storage_creates_nothing(driver: LibvirtTestDriver,
                                                              make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.pre_live_migration(spec, None, block_migration=False, shared_storage=True)
    assert not driver.instance_dir(spec["instance_uuid"]).exists()


def test_pre_live_migration_refuses_an_instance_defined_here(driver: LibvirtTestDriver,
                                                             make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    with pytest.raises(InstanceExists):
        driver.pre_live_migration(spec, None, block_migration=True, shared_storage=False)
    driver.destroy(spec["instance_uuid"])


def test_post_at_destination_records_the_definition(driver: LibvirtTestDriver,
                                                    make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)  # as if it had arrived
    xml = driver.instance_dir(spec["instance_uuid"]) / "libvirt.xml"
    xml.unlink()
    assert driver.post_live_migration_at_destination(spec["instance_uuid"], spec) == {}  # test:// has no jobs
    assert ET.fromstring(xml.read_text()).findtext("uuid") == spec["instance_uuid"]
    driver.power_off(spec["instance_uuid"], 0)
    with pytest.raises(InstanceInvalidState):
        driver.post_live_migration_at_destination(spec["instance_uuid"], spec)
    driver.destroy(spec["instance_uuid"])


def test_rollback_at_destination_removes_a_stopped_domain_never_a_running_one(
        driver: LibvirtTestDriver, make_spec: SpecFactory) -> None:
    spec = make_spec()
    instance_uuid = spec["instance_uuid"]
    driver.spawn(spec, None)
    with pytest.raises(InstanceInvalidState, match="went through"):
        driver.rollback_live_migration_at_destination(instance_uuid, destroy_disks=True)
    assert driver.get_info(instance_uuid) == contract.POWER_RUNNING
    assert driver.instance_dir(instance_uuid).exists()
    driver.power_off(instance_uuid, 0)
    assert driver.rollback_live_migration_at_destination(instance_uuid, destroy_disks=False) is True
    assert instance_uuid not in driver.list_instances()
    assert driver.instance_dir(instance_uuid).exists()  # shared storage: the source's directory
    assert driver.rollback_live_migration_at_destination(instance_uuid, destroy_disks=True) is False
    assert not driver.instance_dir(instance_uuid).exists()


def test_post_at_source_undefines_leftovers_and_keeps_shared_directories(driver: LibvirtTestDriver,
                                                                         make_spec: SpecFactory) -> None:
    spec = make_spec()
    instance_uuid = spec["instance_uuid"]
    driver.spawn(spec, None)
    with pytest.raises(InstanceInvalidState):
        driver.post_live_migration_at_source(instance_uuid, shared_storage=False)
    driver.power_off(instance_uuid, 0)
    driver.post_live_migration_at_source(instance_uuid, shared_storage=True)
    assert instance_uuid not in driver.list_instances()
    assert driver.instance_dir(instance_uuid).exists()
    driver.post_live_migration_at_source(instance_uuid, shared_storage=False)
    assert not driver.instance_dir(instance_uuid).exists()


def test_live_migration_failure_names_the_destination_and_libvirt(driver: LibvirtTestDriver,
                                                                 make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    refused = r"libvirt could not migrate it to qemu\+tcp://nowhere/system: .*not supported"
    with pytest.raises(HypervisorError, match=refused):
        driver.live_migration(spec["instance_uuid"], "qemu+tcp://nowhere/system", "tcp://nowhere", True)
    assert driver.get_info(spec["instance_uuid"]) == contract.POWER_RUNNING
    assert driver.live_migration_progress(spec["instance_uuid"]) is None  # test:// has no jobs
    driver.destroy(spec["instance_uuid"])


def test_remote_state_of_an_unreachable_hypervisor_is_an_error(driver: LibvirtTestDriver) -> None:
    with pytest.raises(HypervisorError, match="cannot reach the hypervisor at"):
        driver.instance_power_state_at("qemu+unix:///system?socket=/nonexistent", str(uuid.uuid4()))
