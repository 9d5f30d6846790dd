"""Virt type detection: a KVM probe guest decides, not the existence of /dev/kvm."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute_workers.virt.libvirt import host


def test_probe_boot_sector_is_a_bootable_mbr() -> None:
    sector = host.PROBE_BOOT_SECTOR
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert host.PROBE_MARKER in sector
    assert sector[0] == 0xFA  # cli


@pytest.mark.libvirt
def test_probe_guest_prints_its_marker_under_tcg() -> None:
    """The boot sector really runs: real mode -> protected mode -> long mode -> marker."""
    result = host.run_probe(accel="tcg", timeout=20.0)
    assert result.ok, result.reason
    assert result.seconds < 20.0


def fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_probe_reports_a_failing_guest(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, 'echo "KVM internal error. Suberror: 1" >&2; exit 1')
    result = host.run_probe(qemu=qemu, timeout=5.0)
    assert not result.ok
    assert "KVM internal error" in result.reason and "exit 1" in result.reason


def test_probe_times_out_on_a_guest_that_is_too_slow(tmp_path: Path) -> None:
    # Reaches long mode, then never prints the marker: the nested-KVM case.
    qemu = fake_qemu(tmp_path, 'for a in "$@"; do case $a in file:*) printf RPL > "${a#file:}";; esac; done\n'
                               "exec sleep 30")
    result = host.run_probe(qemu=qemu, timeout=0.5)
    assert not result.ok
    assert result.reason == "probe guest did not finish in 0.5 s (reached: long mode)"
    assert result.seconds < 5


def test_probe_reports_a_missing_qemu(tmp_path: Path) -> None:
    result = host.run_probe(qemu=str(tmp_path / "nowhere"))
    assert not result.ok and "cannot run" in result.reason


def test_no_kvm_device_means_qemu_without_probing(tmp_path: Path) -> None:
    assert host.detect_virt_type(str(tmp_path / "kvm")) == ("qemu", f"{tmp_path / 'kvm'} does not exist")


def test_configured_virt_types_are_taken_as_they_are() -> None:
    assert host.resolve_virt_type("kvm") == "kvm"
    assert host.resolve_virt_type("qemu") == "qemu"
