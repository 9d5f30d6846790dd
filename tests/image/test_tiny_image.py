"""Boot the demo guest image (tools/build-tiny-image.sh) under QEMU TCG and check its contract.

Contract exercised here (what the compute workers rely on):
  * the serial console shows ``cloudctl-guest: ready`` shortly after power-on,
  * an ACPI power-button press (QMP ``system_powerdown``) makes the guest power
    off by itself, leaving its root filesystem clean,
  * ``cloudctl-guest: boot-count N`` counts boots persistently on the disk,
  * Ctrl-Alt-Del reboots the guest cleanly.

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
from pathlib import Path

import pytest

READY = "cloudctl-guest: ready"
QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")

pytestmark = [
    pytest.mark.skipif(not (QEMU and QEMU_IMG), reason="needs qemu-system-x86 and qemu-utils"),
    pytest.mark.timeout(180),
]

READY_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 30.0


def _boot_count(n: int) -> str:
    return f"cloudctl-guest: boot-count {n}"


class Guest:
    """One QEMU process (TCG, 128 MiB, 1 vCPU, virtio disk, serial console to a file, QMP socket)."""

    def __init__(self, overlay: Path, workdir: Path, name: str) -> None:
        self.overlay = overlay
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

    def _launch(disk: Path) -> Guest:
        guest = Guest(disk, tmp_path, f"boot{len(guests) + 1}")
        guests.append(guest)
        guest.start()
        return guest

    yield _launch
    for guest in guests:
        guest.kill()


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
