"""The libvirt domain XML of an instance, built with ElementTree (user data is escaped, never pasted)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from compute_workers import contract

METADATA_NS = "urn:cloudctl:instance:1"
ET.register_namespace("cloudctl", METADATA_NS)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _metadata(parent: ET.Element, spec: dict[str, Any]) -> None:
    def ns(tag: str) -> str:
        return f"{{{METADATA_NS}}}{tag}"

    instance = _sub(_sub(parent, "metadata"), ns("instance"))
    _sub(instance, ns("name"), spec["name"])
    flavor = spec["flavor"]
    _sub(instance, ns("flavor"), name=str(flavor.get("name", "")), vcpus=str(flavor["vcpus"]),
         memory_mb=str(flavor["memory_mb"]), root_gb=str(flavor["root_gb"]))
    _sub(instance, ns("image"), id=spec["image"]["id"], name=str(spec["image"].get("name", "")))
    if spec.get("request_id"):
        _sub(instance, ns("request_id"), str(spec["request_id"]))


def _file_chardev(parent: ET.Element, kind: str, path: Path) -> ET.Element:
    chardev = _sub(parent, kind, type="file")
    # append='on': without it QEMU truncates the log whenever it (re)opens it, e.g. on a restart.
    _sub(chardev, "source", path=str(path), append="on")
    return chardev


def _interface(devices: ET.Element, network: contract.NetworkSpec) -> None:
    """The guest's NIC of one port: libvirt creates the tap ``network["tap"]`` and enslaves it to the
    Linux bridge ``network["bridge"]``, which the compute worker made before (compute_workers.network)."""
    interface = _sub(devices, "interface", type="bridge")
    _sub(interface, "mac", address=network["mac_address"])
    _sub(interface, "source", bridge=network["bridge"])
    _sub(interface, "target", dev=network["tap"])
    _sub(interface, "model", type="virtio")
    _sub(interface, "mtu", size=str(network["mtu"]))


def bridges_of(xml: str) -> list[str]:
    """The bridges the ``<interface type='bridge'>`` of a domain definition are plugged into, in order."""
    devices = ET.fromstring(xml).find("devices")
    if devices is None:
        return []
    return [source.get("bridge", "") for interface in devices.findall("interface")
            if interface.get("type") == "bridge" and (source := interface.find("source")) is not None
            and source.get("bridge")]


def taps_of(xml: str) -> list[str]:
    """The target devices (taps) of the ``<interface type='bridge'>`` of a domain definition, in order."""
    devices = ET.fromstring(xml).find("devices")
    if devices is None:
        return []
    return [target.get("dev", "") for interface in devices.findall("interface")
            if interface.get("type") == "bridge" and (target := interface.find("target")) is not None
            and target.get("dev")]


def build_domain_xml(spec: dict[str, Any], *, virt_type: str, machine_type: str, disk_path: Path,
                     console_path: Path, disk_cache: str) -> str:
    """The domain definition of a validated spec. ``virt_type`` is kvm, qemu (TCG) or test. Each
    entry of ``spec["networks"]`` is an ``<interface type='bridge'>``, in the given order (eth0 first)."""
    instance_uuid = spec["instance_uuid"]
    domain = ET.Element("domain", type=virt_type)
    _sub(domain, "name", contract.domain_name(instance_uuid))
    _sub(domain, "uuid", instance_uuid)
    _metadata(domain, spec)
    _sub(domain, "memory", str(spec["flavor"]["memory_mb"]), unit="MiB")
    _sub(domain, "currentMemory", str(spec["flavor"]["memory_mb"]), unit="MiB")
    _sub(domain, "vcpu", str(spec["flavor"]["vcpus"]))

    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64", machine=machine_type)
    _sub(os_element, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")  # without ACPI, shutdown and soft reboot requests are silently ignored
    _sub(features, "apic")
    if virt_type == "kvm":
        _sub(domain, "cpu", mode="host-model")
    # Under TCG no <cpu>: QEMU's default model works everywhere, while -cpu host aborts without KVM.
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache=disk_cache)
    _sub(disk, "source", file=str(disk_path))
    _sub(disk, "target", dev="vda", bus="virtio")
    for network in spec.get("networks") or ():
        _interface(devices, network)
    _sub(_file_chardev(devices, "serial", console_path), "target", port="0")
    _sub(_file_chardev(devices, "console", console_path), "target", type="serial", port="0")
    _sub(devices, "memballoon", model="virtio")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")
