"""Boot the demo guest image (tools/build-tiny-image.sh) under QEMU TCG and check its contract.

Contract exercised here (what the compute workers rely on):
  * the serial console shows ``cloudctl-guest: ready`` shortly after power-on,
  * an ACPI power-button press (QMP ``system_powerdown``) makes the guest power
    off by itself, leaving its root filesystem clean,
  * ``cloudctl-guest: boot-count N`` counts boots persistently on the disk,
  * Ctrl-Alt-Del reboots the guest cleanly,
  * with a virtio NIC the guest takes a DHCP lease on eth0 and prints
    ``cloudctl-guest: ip <addr>/<prefix> gw <gw|none>`` (or ``no lease on eth0``),
    answers ping and serves a page on TCP port 80; without a NIC it prints no ip
    line, and ``ready`` never waits for DHCP.

The NIC is a tap on a bridge inside a network namespace the test creates, with
dnsmasq serving the subnet there (testbed.dhcpnet.DhcpNetwork); QEMU runs in that
namespace, so no address or route is added to the machine's own namespace.

Always TCG (never KVM), always on a throw-away qcow2 overlay (the base image
is never written), and every QEMU started here is killed at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import dhcpnet

READY = "cloudctl-guest: ready"
QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")

pytestmark = [
    pytest.mark.skipif(not (QEMU and QEMU_IMG), reason="needs qemu-system-x86 and qemu-utils"),
    pytest.mark.timeout(180),
]

READY_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 30.0
LEASE_TIMEOUT = 60.0  # from power-on; the guest itself gives up (no lease) after ~10 s of DHCP
IP_LINE = re.compile(r"^cloudctl-guest: ip (\S+) gw (\S+)$", re.MULTILINE)
NO_LEASE = "cloudctl-guest: no lease on eth0"


def _boot_count(n: int) -> str:
    return f"cloudctl-guest: boot-count {n}"


@dataclass
class Nic:
    """A virtio NIC on tap ``tap`` of ``network``; QEMU then runs in the network's namespace."""

    network: dhcpnet.DhcpNetwork
    tap: str
    mac: str


class Guest:
    """One QEMU process (TCG, 128 MiB, 1 vCPU, virtio disk, serial console to a file, QMP socket;
    optionally a virtio NIC)."""

    def __init__(self, overlay: Path, workdir: Path, name: str, nic: Nic | None = None) -> None:
        self.overlay = overlay
        self.nic = nic
        self.console = workdir / f"{name}.console.log"
        # unix socket paths are limited to ~107 bytes: keep the socket in a short directory
        self._sockdir = tempfile.mkdtemp(prefix="ccqmp")
        self.qmp_path = os.path.join(self._sockdir, "qmp.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""

    def start(self) -> None:
        self.console.write_bytes(b"")
        cmd = [
            QEMU, "-machine", "pc,accel=tcg", "-m", "128", "-smp", "1",
            "-nographic", "-nodefaults",
            "-serial", f"file:{self.console}",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2",
            "-qmp", f"unix:{self.qmp_path},server,nowait",
        ]  # fmt: skip
        if self.nic is not None:
            cmd += [
                "-netdev",
                f"tap,id=net0,ifname={self.nic.tap},script=no,downscript=no",
                "-device",
                f"virtio-net-pci,netdev=net0,mac={self.nic.mac}",
            ]
            cmd = self.nic.network.command(*cmd)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    # ---- console
    def log(self) -> str:
        try:
            return self.console.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25) -> str:
        text = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", self.log())  # terminal escapes
        out = "\n".join(text.splitlines()[-lines:])
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout is not None:
            out += f"\n--- qemu exited with {self.proc.returncode}: {self.proc.stdout.read().decode()!r}"
        return out

    def wait_for(self, text: str, timeout: float, count: int = 1) -> float:
        """Wait until ``text`` has appeared ``count`` times on the console; returns seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return time.monotonic() - self.started_at
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"QEMU exited before {text!r} appeared; console tail:\n{self.tail()}")
            time.sleep(0.05)
        pytest.fail(
            f"{text!r} (x{count}) not on the console within {timeout:.0f} s; console tail:\n{self.tail()}"
        )

    # ---- QMP
    def _qmp_read(self, timeout: float = 10.0) -> dict:
        assert self._qmp is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._qmp_buf:
            self._qmp.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self._qmp.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._qmp_buf += chunk
        line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
        return json.loads(line)

    def qmp(self, command: str, **arguments) -> dict:
        if self._qmp is None:
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(self.qmp_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    sock.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._qmp = sock
            assert "QMP" in self._qmp_read()
            self.qmp("qmp_capabilities")
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._qmp_read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command} failed: {reply['error']}")
            # else: an asynchronous event, e.g. POWERDOWN - skip it

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running {timeout:.0f} s after the request; console tail:\n{self.tail()}")

    def kill(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)


@pytest.fixture
def overlay(tiny_image_path: Path, tmp_path: Path) -> Path:
    """A fresh copy-on-write overlay on top of the (never booted) base image."""
    base = Path(tiny_image_path).resolve()
    assert base.is_file(), f"missing image {base}"
    path = tmp_path / "disk.qcow2"
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)], check=True
    )
    return path


@pytest.fixture
def launch(tmp_path: Path):
    """Factory booting a Guest on a disk; every QEMU it started is killed at teardown."""
    guests: list[Guest] = []

    def _launch(disk: Path, nic: Nic | None = None) -> Guest:
        guest = Guest(disk, tmp_path, f"boot{len(guests) + 1}", nic)
        guests.append(guest)
        guest.start()
        return guest

    yield _launch
    for guest in guests:
        guest.kill()


@pytest.fixture(scope="module")
def network_support() -> None:
    reason = dhcpnet.missing_capabilities()
    if reason:
        pytest.skip(f"guest network tests: {reason}")


@pytest.fixture
def dhcp_network(request, network_support):
    """A fresh DhcpNetwork (with a router, unless parametrized indirectly with False); removed with
    everything in it (dnsmasq, QEMU, tap, bridge, namespace) at teardown, whatever the test did."""
    network = dhcpnet.DhcpNetwork(router=getattr(request, "param", True))
    request.addfinalizer(network.stop)  # before start(): a half-made network is removed too
    network.start()
    return network


def _report(capsys, message: str) -> None:
    with capsys.disabled():
        print(f"\n[tiny-image] {message}")


def _ext4_needs_recovery(disk: Path, workdir: Path) -> tuple[bool, bool]:
    """(needs_recovery, state_valid) of the ext4 root partition (MBR partition 2) of a qcow2 disk."""
    raw = workdir / "disk.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(disk), str(raw)], check=True)
    with raw.open("rb") as f:
        mbr = f.read(512)
        assert mbr[510:512] == b"\x55\xaa", "no MBR signature"
        entry = mbr[446 + 16 : 446 + 32]  # partition 2
        (start_lba,) = struct.unpack_from("<I", entry, 8)
        f.seek(start_lba * 512 + 1024)
        sb = f.read(1024)
    raw.unlink()
    (magic,) = struct.unpack_from("<H", sb, 0x38)
    assert magic == 0xEF53, "partition 2 is not ext2/3/4"
    (state,) = struct.unpack_from("<H", sb, 0x3A)
    (incompat,) = struct.unpack_from("<I", sb, 0x60)
    return bool(incompat & 0x4), bool(state & 0x1)


def test_image_shape(tiny_image_path: Path) -> None:
    info = json.loads(
        subprocess.run(
            [QEMU_IMG, "info", "--output=json", str(tiny_image_path)], check=True, capture_output=True
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info, "the base image must be standalone"
    assert 24 * 2**20 <= info["virtual-size"] <= 64 * 2**20, info["virtual-size"]
    assert os.path.getsize(tiny_image_path) < 32 * 2**20


def test_boots_to_ready_and_acpi_powerdown_is_clean(overlay: Path, launch, tmp_path: Path, capsys) -> None:
    guest = launch(overlay)
    boot_s = guest.wait_for(READY, READY_TIMEOUT)
    lines = guest.log().splitlines()
    # the markers are whole console lines, boot counter first
    assert _boot_count(1) in lines, f"first boot must report boot-count 1; console tail:\n{guest.tail()}"
    assert READY in lines, f"{READY!r} is not a line of its own; console tail:\n{guest.tail()}"
    assert lines.index(_boot_count(1)) < lines.index(READY)

    requested = time.monotonic()
    guest.qmp("system_powerdown")
    rc = guest.wait_exit(POWEROFF_TIMEOUT)
    off_s = time.monotonic() - requested
    _report(capsys, f"power-on -> '{READY}': {boot_s:.2f} s; ACPI powerdown -> QEMU exit: {off_s:.2f} s")

    assert rc == 0, f"QEMU exit status {rc}; console tail:\n{guest.tail()}"
    log = guest.log()
    assert "cloudctl-guest: poweroff (clean)" in log, f"power button not handled:\n{guest.tail()}"
    assert "warning" not in log.split(READY, 1)[1], f"unclean shutdown:\n{guest.tail()}"
    assert not IP_LINE.search(log) and NO_LEASE not in log, f"no NIC, yet an ip line:\n{guest.tail()}"
    needs_recovery, valid = _ext4_needs_recovery(overlay, tmp_path)
    assert not needs_recovery and valid, "root filesystem was not left clean (journal needs recovery)"


def test_boot_count_persists_across_power_cycles(overlay: Path, launch, capsys) -> None:
    first = launch(overlay)
    first.wait_for(READY, READY_TIMEOUT)
    assert _boot_count(1) in first.log(), first.tail()
    first.qmp("system_powerdown")
    assert first.wait_exit(POWEROFF_TIMEOUT) == 0
    first.kill()

    second = launch(overlay)
    boot_s = second.wait_for(READY, READY_TIMEOUT)
    _report(capsys, f"second boot of the same disk -> ready: {boot_s:.2f} s")
    log = second.log()
    assert _boot_count(2) in log, f"boot counter did not persist; console tail:\n{second.tail()}"
    assert _boot_count(1) not in log


def test_ctrl_alt_del_reboots_cleanly(overlay: Path, launch) -> None:
    guest = launch(overlay)
    guest.wait_for(READY, READY_TIMEOUT)
    guest.qmp(
        "send-key",
        keys=[{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")],
    )
    guest.wait_for(READY, READY_TIMEOUT, count=2)
    log = guest.log()
    assert "cloudctl-guest: reboot (clean)" in log, f"reboot was not clean:\n{guest.tail()}"
    assert _boot_count(2) in log, f"reboot did not increment the counter:\n{guest.tail()}"
    assert guest.proc is not None and guest.proc.poll() is None, "a guest reboot must not stop QEMU"


# ---------------------------------------------------------------- networking
GUEST_MAC = "52:54:00:c1:0c:17"


def _lease(guest: Guest) -> tuple[str, str, float]:
    """(address/prefix, gateway, seconds from power-on) of the guest's ip console line."""
    lease_s = guest.wait_for("cloudctl-guest: ip ", LEASE_TIMEOUT)
    match = IP_LINE.search(guest.log())
    assert match, f"the ip line is not a line of its own; console tail:\n{guest.tail()}"
    return match[1], match[2], lease_s


def test_dhcp_lease_ping_and_http(dhcp_network: dhcpnet.DhcpNetwork, overlay: Path, launch, capsys) -> None:
    address = str(dhcp_network.subnet[23])
    dhcp_network.add_host(GUEST_MAC, address)
    guest = launch(overlay, Nic(dhcp_network, dhcp_network.add_tap(), GUEST_MAC))
    ready_s = guest.wait_for(READY, READY_TIMEOUT)
    interface, gateway, lease_s = _lease(guest)
    assert (interface, gateway) == (f"{address}/24", dhcp_network.gateway), guest.tail()
    assert NO_LEASE not in guest.log()
    assert guest.log().count("cloudctl-guest: ip ") == 1, f"the ip line is printed once:\n{guest.tail()}"

    ping = dhcp_network.ping(address)
    assert ping.returncode == 0, f"no ping reply from {address}: {ping.stdout}{ping.stderr}\n{guest.tail()}"
    assert dhcp_network.http_get(address) == "cloudctl-guest\n"  # busybox httpd on port 80
    _report(
        capsys,
        f"with a NIC: power-on -> ready {ready_s:.2f} s, -> lease {lease_s:.2f} s ({interface} gw {gateway})",
    )

    # DHCP client and HTTP server do not get in the way of a clean power-off
    guest.qmp("system_powerdown")
    assert guest.wait_exit(POWEROFF_TIMEOUT) == 0
    log = guest.log()
    assert "cloudctl-guest: poweroff (clean)" in log and "warning" not in log, guest.tail()


@pytest.mark.parametrize("dhcp_network", [False], ids=["no-router"], indirect=True)
def test_lease_without_router_says_gw_none(dhcp_network: dhcpnet.DhcpNetwork, overlay: Path, launch) -> None:
    address = str(dhcp_network.subnet[42])
    dhcp_network.add_host(GUEST_MAC, address)
    guest = launch(overlay, Nic(dhcp_network, dhcp_network.add_tap(), GUEST_MAC))
    interface, gateway, _ = _lease(guest)
    assert (interface, gateway) == (f"{address}/24", "none"), guest.tail()
    assert dhcp_network.ping(address).returncode == 0, guest.tail()  # on-link: no route needed


def test_no_lease_is_reported_and_a_late_lease_still_taken(
    dhcp_network: dhcpnet.DhcpNetwork, overlay: Path, launch, capsys
) -> None:
    # dnsmasq ignores a MAC it has no host entry for: no answer, as with no DHCP server at all
    guest = launch(overlay, Nic(dhcp_network, dhcp_network.add_tap(), GUEST_MAC))
    ready_s = guest.wait_for(READY, READY_TIMEOUT)
    no_lease_s = guest.wait_for(NO_LEASE, LEASE_TIMEOUT)
    lines = guest.log().splitlines()
    assert NO_LEASE in lines, f"not a line of its own:\n{guest.tail()}"
    assert lines.index(READY) < lines.index(NO_LEASE), "ready must not wait for DHCP"
    assert not IP_LINE.search(guest.log())

    # udhcpc keeps trying in the background: a host entry added now still gets the guest its lease
    address = str(dhcp_network.subnet[77])
    dhcp_network.add_host(GUEST_MAC, address)
    added = time.monotonic()
    interface, gateway, _ = _lease(guest)
    late_s = time.monotonic() - added
    assert (interface, gateway) == (f"{address}/24", dhcp_network.gateway), guest.tail()
    assert guest.log().count(NO_LEASE) == 1, f"no-lease is said once:\n{guest.tail()}"
    _report(
        capsys,
        f"no DHCP answer: ready {ready_s:.2f} s, '{NO_LEASE}' {no_lease_s:.2f} s after "
        f"power-on; lease {late_s:.2f} s after the host entry was added",
    )
