"""A DHCP-served network in a network namespace of its own, for guests that a test boots with QEMU.

Everything lives in the namespace: a Linux bridge holding the gateway address, dnsmasq serving the
subnet on it, and the guests' tap devices on the bridge. QEMU runs in the namespace too
(:meth:`DhcpNetwork.command`) and opens its tap there. So the root namespace gets no interface, address
or route, and nothing a guest sends can leave the machine (the workplace rule: traffic only to loopback
or to namespaces the test made itself); the test reaches the guests from inside the namespace.

dnsmasq answers only the MACs it was given (:meth:`DhcpNetwork.add_host`, as Neutron's hosts file),
forwards no DNS (``--no-resolv``) and offers the gateway as the router unless ``router=False``.

:meth:`DhcpNetwork.stop` kills every process in the namespace (dnsmasq, and any QEMU still running),
deletes taps, bridge and namespace. A namespace whose test process died without stopping it (its pid is
in the name) is removed by the next :meth:`DhcpNetwork.start` on this machine.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.hosts import delete_netns, missing_netns_features, run_command

PREFIX = "ccdhcp-"  # namespaces: ccdhcp-<pid of the test process>-<random>
DEFAULT_SUBNET = ipaddress.IPv4Network("10.253.200.0/24")
BRIDGE = "br0"


def missing_capabilities() -> str | None:
    """Why this machine cannot host a :class:`DhcpNetwork`, or None. Makes and deletes one namespace."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, tap devices)"
    for tool, package in (("ip", "iproute2"), ("dnsmasq", "dnsmasq-base")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian package {package}; tools/install-system.sh installs it)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun: the kernel lacks tun/tap"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    return missing_netns_features(probe, (
        (["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], "Linux bridges"),
        (["ip", "-n", probe, "tuntap", "add", "dev", "tap0", "mode", "tap"], "tap devices"),
    ))


class DhcpNetwork:
    """One /24-ish network: bridge ``br0`` with the gateway (the subnet's first address) in namespace
    :attr:`netns`, dnsmasq serving it. ``start()`` brings it up, ``stop()`` removes every trace."""

    def __init__(self, subnet: ipaddress.IPv4Network = DEFAULT_SUBNET, router: bool = True) -> None:
        self.subnet = subnet
        self.gateway = str(subnet[1])
        self.router = router
        self.netns = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.directory = Path(tempfile.mkdtemp(prefix="ccdhcp"))
        self.hosts_file = self.directory / "dhcp-hosts"
        self.log_path = self.directory / "dnsmasq.log"
        self.dnsmasq: subprocess.Popen[bytes] | None = None
        self.taps: list[str] = []
        self._hosts: dict[str, str] = {}
        self._netns_added = False

    # ---- set-up
    def start(self, timeout: float = 10) -> DhcpNetwork:
        remove_stale()
        run_command("ip", "netns", "add", self.netns)
        self._netns_added = True
        self._ip("link", "set", "lo", "up")
        self._ip("link", "add", BRIDGE, "type", "bridge")
        self._ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", BRIDGE)
        self._ip("link", "set", BRIDGE, "up")
        self.hosts_file.write_text("")
        self._start_dnsmasq(timeout)
        return self

    def _start_dnsmasq(self, timeout: float) -> None:
        pid_file = self.directory / "dnsmasq.pid"
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--user=root",
            "--no-resolv", "--no-hosts", f"--interface={BRIDGE}", "--bind-interfaces",
            "--except-interface=lo",
            # static: leases only for the MACs in the hosts file (dhcp-host entries)
            f"--dhcp-range={self.subnet.network_address},static,{self.subnet.netmask},1h",
            f"--dhcp-hostsfile={self.hosts_file}",
            f"--dhcp-leasefile={self.directory / 'leases'}",
            f"--pid-file={pid_file}", "--log-dhcp", f"--log-facility={self.log_path}",
            # an option without a value: send no router at all
            f"--dhcp-option=option:router{',' + self.gateway if self.router else ''}",
        ]  # fmt: skip
        self.dnsmasq = subprocess.Popen(self.command(*argv), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not pid_file.exists() or not pid_file.read_text().strip():  # written once it listens
            if self.dnsmasq.poll() is not None:
                assert self.dnsmasq.stderr is not None
                raise RuntimeError(f"dnsmasq exited ({self.dnsmasq.returncode}): "
                                   f"{self.dnsmasq.stderr.read().decode(errors='replace').strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start within {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def add_host(self, mac: str, ip: str) -> None:
        """Give ``mac`` a lease of ``ip`` (dnsmasq rereads its hosts file on SIGHUP)."""
        if ipaddress.IPv4Address(ip) not in self.subnet:
            raise ValueError(f"{ip} is not in {self.subnet}")
        self._hosts[mac.lower()] = ip
        self.hosts_file.write_text("".join(f"{m},{a}\n" for m, a in self._hosts.items()))
        if self.dnsmasq is not None and self.dnsmasq.poll() is None:
            self.dnsmasq.send_signal(signal.SIGHUP)

    def add_tap(self, name: str | None = None) -> str:
        """A tap device on the bridge, for ``-netdev tap,ifname=<name>,script=no,downscript=no`` of a
        QEMU started with :meth:`command`; its carrier comes up when QEMU opens it."""
        name = name or f"tap{len(self.taps)}"
        self._ip("tuntap", "add", "dev", name, "mode", "tap")
        self.taps.append(name)
        self._ip("link", "set", name, "master", BRIDGE, "up")
        return name

    # ---- use
    def command(self, *argv: str) -> list[str]:
        """``argv`` run in the namespace (``ip netns exec`` execs it: the pid is that of ``argv``)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout)

    def ping(self, address: str, count: int = 1, wait: float = 2) -> subprocess.CompletedProcess[str]:
        """``ping`` from the gateway's namespace (busybox's when iputils is not installed)."""
        tool: Sequence[str] = ("ping",) if shutil.which("ping") else ("busybox", "ping")
        return self.run(*tool, "-c", str(count), "-W", str(int(wait)), address, timeout=count * wait + 10)

    def http_get(self, address: str, port: int = 80, timeout: float = 10) -> str:
        """The body of ``GET /`` from ``address:port``, over a plain TCP connection made inside the
        namespace (no proxy settings apply); raises RuntimeError if it cannot be fetched."""
        result = self.run(sys.executable, "-c", _HTTP_GET, address, str(port), str(timeout),
                          timeout=timeout + 10)
        if result.returncode != 0:
            raise RuntimeError(f"GET http://{address}:{port}/ failed: {result.stderr.strip()}")
        return result.stdout

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---- tear-down
    def stop(self) -> None:
        errors: list[str] = []
        if self.dnsmasq is not None:
            if self.dnsmasq.poll() is None:
                self.dnsmasq.kill()
            self.dnsmasq.wait(10)
            if self.dnsmasq.stderr is not None:
                self.dnsmasq.stderr.close()
            self.dnsmasq = None
        if self._netns_added:
            # Deleting the namespace would take taps and bridge with it; say it explicitly anyway.
            for link in [*self.taps, BRIDGE]:
                result = self.run("ip", "link", "del", link)
                if result.returncode != 0 and "Cannot find device" not in result.stderr:
                    errors.append(f"ip link del {link}: {result.stderr.strip()}")
            errors += delete_netns(self.netns)  # also kills whatever still runs in it
            self._netns_added = False
        self.taps.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise RuntimeError(f"DHCP network tear-down incomplete: {'; '.join(errors)}")

    def _ip(self, *args: str) -> None:
        run_command("ip", "-n", self.netns, *args)


_HTTP_GET = """
import socket, sys
address, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with socket.create_connection((address, port), timeout) as conn:
    conn.sendall(b"GET / HTTP/1.0\\r\\nHost: " + address.encode() + b"\\r\\n\\r\\n")
    reply = b"".join(iter(lambda: conn.recv(65536), b""))
head, _, body = reply.partition(b"\\r\\n\\r\\n")
if not head.startswith(b"HTTP/1.") or head.split()[1] != b"200":
    sys.exit(f"unexpected reply: {head[:200]!r}")
sys.stdout.write(body.decode(errors="replace"))
"""


def remove_stale() -> list[str]:
    """Delete the namespaces (and whatever runs in them) of DhcpNetworks whose test process is gone."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    removed = []
    for name in (line.split()[0] for line in listing.splitlines() if line.startswith(PREFIX)):
        owner = name[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            delete_netns(name)
            removed.append(name)
    return removed
