"""LibvirtTestDriver on libvirt's test:///default driver (fast, no daemon, no QEMU), and the real
LibvirtDriver refusing test: URIs."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from compute_workers import contract
from compute_workers.config import ComputeConfig
from compute_workers.exception import ConsoleUnavailable, HypervisorError, InstanceNotFound
from compute_workers.virt import load_driver
from compute_workers.virt.libvirt import connection, host
from compute_workers.virt.libvirt.domain import METADATA_NS, build_domain_xml
from compute_workers.virt.libvirt.driver import LibvirtDriver
from compute_workers.virt.libvirt.testdriver import LibvirtTestDriver

from .conftest import SpecFactory, make_manager
from .test_driver_contract import wait_until


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[LibvirtTestDriver]:
    driver = LibvirtTestDriver("test:///default", tmp_path / "instances")
    driver.init_host()
    yield driver
    driver.close()


def domain_xml(driver: LibvirtTestDriver, instance_uuid: str) -> ET.Element:
    return ET.fromstring(driver.conn.lookupByName(contract.domain_name(instance_uuid)).XMLDesc())


def test_spawn_defines_and_starts_instance_domain(driver: LibvirtTestDriver, make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    domain = driver.conn.lookupByName(f"instance-{spec['instance_uuid']}")
    assert domain.UUIDString() == spec["instance_uuid"]
    assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    directory = driver.instance_dir(spec["instance_uuid"])
    written = ET.fromstring((directory / "libvirt.xml").read_text())
    assert written.get("type") == "test" and written.findtext("name") == domain.name()
    assert (directory / "console.log").exists()


def test_list_instances_ignores_domains_that_are_not_cloudctl_ones(driver: LibvirtTestDriver,
                                                                 make_spec: SpecFactory) -> None:
    assert "test" in [d.name() for d in driver.conn.listAllDomains()]  # the test driver's own domain
    assert driver.list_instances() == {}
    spec = make_spec()
    driver.spawn(spec, None)
    assert driver.list_instances() == {spec["instance_uuid"]: contract.POWER_RUNNING}


def test_destroy_removes_domain_definition_and_files(driver: LibvirtTestDriver,
                                                     make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    driver.destroy(spec["instance_uuid"])
    assert contract.domain_name(spec["instance_uuid"]) not in driver.conn.listDefinedDomains()
    assert not driver.instance_dir(spec["instance_uuid"]).exists()
    assert [d.name() for d in driver.conn.listAllDomains()] == ["test"]


def test_destroy_removes_a_shut_off_domain_with_managed_save(driver: LibvirtTestDriver,
                                                             make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    driver.suspend(spec["instance_uuid"])
    assert driver.conn.lookupByUUIDString(spec["instance_uuid"]).hasManagedSaveImage(0)
    driver.destroy(spec["instance_uuid"])
    assert driver.list_instances() == {}


def test_domain_xml_has_acpi_serial_log_in_append_mode_and_virtio_disk(driver: LibvirtTestDriver,
                                                                         make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    xml = domain_xml(driver, spec["instance_uuid"])
    directory = driver.instance_dir(spec["instance_uuid"])
    assert xml.find("features/acpi") is not None and xml.find("features/apic") is not None
    for kind in ("serial", "console"):
        source = xml.find(f"devices/{kind}[@type='file']/source")
        assert source is not None
        assert source.get("path") == str(directory / "console.log")
        assert source.get("append") == "on"
    disk = xml.find("devices/disk[@device='disk']")
    assert disk is not None
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert disk.find("source").get("file") == str(directory / "disk")  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert xml.find("devices/memballoon").get("model") == "virtio"  # type: ignore[union-attr]
    assert xml.find("devices/interface") is None
    assert xml.findtext("on_poweroff") == "destroy" and xml.findtext("on_reboot") == "restart"
    assert xml.findtext("on_crash") == "destroy"
    assert int(xml.findtext("memory")) == 128 * 1024  # type: ignore[arg-type]  # libvirt says KiB
    assert xml.findtext("vcpu") == "1"


def test_display_name_is_escaped_metadata(driver: LibvirtTestDriver, make_spec: SpecFactory) -> None:
    name = "</name><devices><disk type='file'/></devices> & co"
    spec = make_spec(name=name)
    driver.spawn(spec, None)
    xml = domain_xml(driver, spec["instance_uuid"])
    metadata = xml.find(f"metadata/{{{METADATA_NS}}}instance")
    assert metadata is not None
    assert metadata.findtext(f"{{{METADATA_NS}}}name") == name
    assert metadata.find(f"{{{METADATA_NS}}}flavor").get("name") == "m1.nano"  # type: ignore[union-attr]
    assert metadata.find(f"{{{METADATA_NS}}}image").get("id") == spec["image"]["id"]  # type: ignore[union-attr]
    assert len(xml.findall("devices/disk")) == 1


@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_cpu_model_is_host_model_under_kvm_only(virt_type: str, make_spec: SpecFactory,
                                                tmp_path: Path) -> None:
    xml = ET.fromstring(build_domain_xml(make_spec(), virt_type=virt_type, machine_type="pc",
                                         disk_path=tmp_path / "disk", console_path=tmp_path / "log",
                                         disk_cache="none"))
    assert xml.get("type") == virt_type
    assert xml.find("os/type").attrib == {"arch": "x86_64", "machine": "pc"}  # type: ignore[union-attr]
    assert xml.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    cpu = xml.find("cpu")
    if virt_type == "kvm":
        assert cpu is not None and cpu.get("mode") == "host-model"
    else:
        assert cpu is None  # -cpu host aborts under TCG


def test_console_output_returns_the_last_lines_of_the_log(driver: LibvirtTestDriver,
                                                          make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    log = driver.instance_dir(spec["instance_uuid"]) / "console.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert driver.get_console_output(spec["instance_uuid"], 3) == "line 997\nline 998\nline 999\n"


def test_console_output_reads_at_most_the_last_100_kib(driver: LibvirtTestDriver,
                                                       make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    log = driver.instance_dir(spec["instance_uuid"]) / "console.log"
    log.write_bytes(b"x" * 300_000 + b"\n" + b"".join(b"%06d\n" % i for i in range(20_000)))
    output = driver.get_console_output(spec["instance_uuid"], 100_000)
    assert len(output.encode()) <= 100 * 1024
    assert output.endswith("019999\n")
    assert all(len(line) == 6 for line in output.splitlines())  # no cut line at the start


def test_console_output_without_log_is_unavailable(driver: LibvirtTestDriver, make_spec: SpecFactory) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    (driver.instance_dir(spec["instance_uuid"]) / "console.log").unlink()
    with pytest.raises(ConsoleUnavailable):
        driver.get_console_output(spec["instance_uuid"], 10)


def test_failed_start_leaves_nothing_behind(driver: LibvirtTestDriver, make_spec: SpecFactory,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec()

    def refuse(self: libvirt.virDomain) -> int:
        raise libvirt.libvirtError("simulated start failure")

    monkeypatch.setattr(libvirt.virDomain, "create", refuse)
    with pytest.raises(HypervisorError, match="cannot start"):
        driver.spawn(spec, None)
    assert driver.list_instances() == {}
    assert contract.domain_name(spec["instance_uuid"]) not in driver.conn.listDefinedDomains()
    assert not driver.instance_dir(spec["instance_uuid"]).exists()


def test_heartbeat_resources_have_every_contract_key(tmp_path: Path, make_spec: SpecFactory) -> None:
    driver = LibvirtTestDriver("test:///default", tmp_path / "instances")
    manager, _ = make_manager(driver, tmp_path / "instances", COMPUTE_LIBVIRT_URI="test:///default")
    spec = make_spec()
    driver.spawn(spec, None)
    resources = manager.resources()
    assert set(resources) == set(contract.HEARTBEAT_RESOURCE_KEYS)
    assert resources["virt_type"] == "test" and resources["hypervisor_type"] == "TEST"
    assert resources["vcpus"] == 16 and resources["memory_mb"] == 3072  # test:///default's host
    assert resources["libvirt_uri"] == "test:///default" and resources["driver"] == "libvirt"
    assert resources["memory_mb_reserved"] == 512 and resources["disk_gb_reserved"] == 0
    assert resources["instances"] == {spec["instance_uuid"]: contract.POWER_RUNNING}


def test_power_state_mapping_is_novas() -> None:
    assert host.power_state(libvirt.VIR_DOMAIN_RUNNING) == contract.POWER_RUNNING
    assert host.power_state(libvirt.VIR_DOMAIN_BLOCKED) == contract.POWER_RUNNING
    assert host.power_state(libvirt.VIR_DOMAIN_PAUSED) == contract.POWER_PAUSED
    assert host.power_state(libvirt.VIR_DOMAIN_SHUTDOWN) == contract.POWER_SHUTDOWN
    assert host.power_state(libvirt.VIR_DOMAIN_SHUTOFF) == contract.POWER_SHUTDOWN
    assert host.power_state(libvirt.VIR_DOMAIN_CRASHED) == contract.POWER_CRASHED
    assert host.power_state(libvirt.VIR_DOMAIN_PMSUSPENDED) == contract.POWER_SUSPENDED
    assert host.power_state(libvirt.VIR_DOMAIN_NOSTATE) == contract.POWER_NOSTATE
    assert set(host.LIBVIRT_POWER_STATE.values()) == set(contract.POWER_STATES)


def test_lifecycle_events_are_registered_again_after_a_reconnect(
        driver: LibvirtTestDriver, make_spec: SpecFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[str] = []
    spec = make_spec()
    uuid = spec["instance_uuid"]
    driver.spawn(spec, None)
    driver.register_lifecycle_callback(heard.append)
    try:
        old = driver.conn
        driver.pause(uuid)
        wait_until(lambda: uuid in heard)
        alive = connection.alive
        monkeypatch.setattr(connection, "alive", lambda conn: conn is not old and alive(conn))
        heard.clear()
        driver.list_instances()  # the next call reconnects
        assert driver.conn is not old
        with pytest.raises(libvirt.libvirtError):
            old.isAlive()  # closed
        assert heard == [uuid]  # events may have been missed: every instance counts as changed
        heard.clear()
        driver.unpause(uuid)
        wait_until(lambda: uuid in heard)
    finally:
        driver.destroy(uuid)
        driver.close()


def test_a_suspended_domain_is_shut_off_with_a_save_image(driver: LibvirtTestDriver,
                                                          make_spec: SpecFactory) -> None:
    spec = make_spec()
    uuid = spec["instance_uuid"]
    driver.spawn(spec, None)
    driver.suspend(uuid)
    domain = driver.conn.lookupByName(contract.domain_name(uuid))
    assert domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF and domain.hasManagedSaveImage(0)
    assert driver.get_info(uuid) == contract.POWER_SUSPENDED
    domain.managedSaveRemove(0)  # libvirt keeps the shutoff reason "saved": the image decides
    assert domain.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED]
    assert driver.get_info(uuid) == contract.POWER_SHUTDOWN
    driver.destroy(uuid)


def test_recreating_a_lost_domain_needs_its_files(driver: LibvirtTestDriver, make_spec: SpecFactory) -> None:
    spec = make_spec()
    uuid = spec["instance_uuid"]
    driver.spawn(spec, None)
    domain = driver.conn.lookupByName(contract.domain_name(uuid))
    domain.destroy()
    domain.undefine()
    (driver.instance_dir(uuid) / "libvirt.xml").unlink()
    with pytest.raises(InstanceNotFound):
        driver.hard_reboot(uuid, spec)
    with pytest.raises(InstanceNotFound):
        driver.power_on(uuid, spec)
    with pytest.raises(InstanceNotFound):
        driver.power_on(uuid, None)  # without a spec nothing can be recreated
    assert driver.list_instances() == {}


def test_the_real_driver_refuses_test_uris_and_the_test_driver_real_ones(tmp_path: Path) -> None:
    """Nobody gets disks faked by accident: test: URIs are LibvirtTestDriver's alone."""
    with pytest.raises(ValueError, match="LibvirtTestDriver"):
        LibvirtDriver("test:///default", tmp_path)
    with pytest.raises(ValueError, match="use LibvirtDriver"):
        LibvirtTestDriver("qemu:///system", tmp_path)


def test_load_driver_picks_the_test_driver_for_test_uris_only(tmp_path: Path) -> None:
    def load(uri: str) -> object:
        return load_driver(ComputeConfig.from_env(environ={"COMPUTE_LIBVIRT_URI": uri,
                                                           "INSTANCES_PATH": str(tmp_path)}))
    test = load("test:///default")
    assert type(test) is LibvirtTestDriver and test.uri == "test:///default"
    assert test.capabilities["needs_base_image"] is False and test.virt_type == "test"
    real = load("qemu:///system")  # not connected until init_host
    assert type(real) is LibvirtDriver
    assert all(real.capabilities.values())  # needs the image, migrates live, ...


def test_the_test_driver_snapshot_is_a_line_of_text(driver: LibvirtTestDriver, make_spec: SpecFactory,
                                                     tmp_path: Path) -> None:
    spec = make_spec()
    driver.spawn(spec, None)
    seen: list[tuple[int, int]] = []
    target = tmp_path / "snapshot"
    driver.snapshot(spec["instance_uuid"], target, lambda done, total: seen.append((done, total)))
    assert target.read_text() == f"cloudctl test:// snapshot of {spec['instance_uuid']} (live)\n"
    assert seen == [(len(target.read_bytes()),) * 2]
    driver.destroy(spec["instance_uuid"])
