"""The network node's namespaces and the veth pairs that join them to the host's bridges: what the DHCP
servers (``qdhcp-``) and the routers (``qrouter-``) share.

A namespace device is a veth pair: its host end enslaved to a bridge of :class:`LinuxBridges` (up, the
leg's MTU), its namespace end with a given MAC, MTU and set of IPv4 addresses. Everything is read before
it is made (``ip -j``), and only what differs is done, so converging twice does nothing the second time.

Two runners, as :class:`~compute_workers.network.dhcp.DhcpServers` explains: ``runner`` acts on the host's
devices, ``namespaces`` names the namespaces (``ip netns add/del/list/exec``, ``ip -n``). They differ only
in a test whose "host" is itself a namespace: a namespace added from inside ``ip netns exec`` would be
mounted in that command's private mount namespace only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from compute_workers.network.linuxbridge import CommandError, Runner, _missing


@dataclasses.dataclass(frozen=True)
class Veth:
    """A veth pair from a bridge into a namespace. ``mac`` is the namespace end's (lower case)."""

    netns: str
    host_end: str
    ns_end: str
    bridge: str
    mtu: int
    mac: str


def ipv4_addresses(link: dict[str, Any]) -> set[str]:
    """The IPv4 addresses (``ip/prefix``) of an ``ip -j addr show`` entry."""
    return {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", ()) if a.get("family") == "inet"}


class Namespaces:
    """The namespaces of this node (or of a test's "host" namespace) and the veths into them."""

    def __init__(self, runner: Runner, namespaces: Runner | None = None) -> None:
        self.runner = runner
        self.ns_runner = namespaces or runner

    def ip(self, netns: str, *argv: str) -> str:
        """``ip -n <netns> argv...``."""
        return self.ns_runner.run("ip", "-n", netns, *argv)

    def exec(self, netns: str, *argv: str) -> str:
        """``argv`` run inside ``netns`` (``ip netns exec``)."""
        return self.ns_runner.run("ip", "netns", "exec", netns, *argv)

    # Namespaces -----------------------------------------------------------------------------------

    def names(self) -> set[str]:
        listing = self.ns_runner.run("ip", "netns", "list")
        return {line.split()[0] for line in listing.splitlines() if line.strip()}

    def ensure(self, netns: str) -> list[str]:
        """Make ``netns`` unless it exists, with ``lo`` up; what was made."""
        done = []
        if netns not in self.names():
            self.ns_runner.run("ip", "netns", "add", netns)
            done.append(f"namespace {netns}")
        lo = self.link("lo", netns)
        if lo is None or "UP" not in lo.get("flags", ()):
            self.ip(netns, "link", "set", "dev", "lo", "up")
        return done

    def delete(self, netns: str) -> bool:
        """Delete ``netns`` (its devices go with it: a veth pair with its namespace end); False when it
        was not there."""
        if netns not in self.names():
            return False
        self.ns_runner.run("ip", "netns", "del", netns)
        return True

    # Devices --------------------------------------------------------------------------------------

    def link(self, name: str, netns: str | None = None) -> dict[str, Any] | None:
        """``ip -j addr show`` of device ``name`` (on the host, or in ``netns``); None when it is not
        there."""
        try:
            if netns:
                out = self.ip(netns, "-j", "addr", "show", "dev", name)
            else:
                out = self.runner.run("ip", "-j", "addr", "show", "dev", name)
            links = json.loads(out or "[]")
        except CommandError as exc:
            if _missing(exc):
                return None
            raise
        return links[0] if links else None

    def links(self, netns: str) -> list[dict[str, Any]]:
        """``ip -j addr show`` of every device in ``netns``."""
        return list(json.loads(self.ip(netns, "-j", "addr", "show") or "[]"))

    def delete_link(self, name: str, netns: str | None = None) -> bool:
        """Delete device ``name`` (a veth: both ends); False when it was not there."""
        try:
            if netns:
                self.ip(netns, "link", "del", "dev", name)
            else:
                self.runner.run("ip", "link", "del", "dev", name)
        except CommandError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def plug_veth(self, veth: Veth) -> tuple[list[str], set[str]]:
        """Converge ``veth``: both ends there (half a pair is made again), the host end up on its
        bridge, the namespace end up with its MAC, both with its MTU. Returns what was made and the
        namespace end's IPv4 addresses now (for :meth:`set_addresses`)."""
        mtu = str(veth.mtu)
        done = []
        inside = self.link(veth.ns_end, veth.netns)
        outside = self.link(veth.host_end)
        if inside is None or outside is None:
            if outside is not None:
                self.runner.run("ip", "link", "del", "dev", veth.host_end)  # half a pair: make it again
            if inside is not None:
                self.ip(veth.netns, "link", "del", "dev", veth.ns_end)
            self.runner.run("ip", "link", "add", veth.host_end, "mtu", mtu, "type", "veth", "peer", "name",
                            veth.ns_end, "mtu", mtu, "netns", veth.netns)
            done.append(f"veth {veth.host_end}/{veth.ns_end}")
            inside, outside = {}, {}
        if outside.get("master") != veth.bridge or "UP" not in outside.get("flags", ()) or \
                outside.get("mtu") != veth.mtu:
            self.runner.run("ip", "link", "set", "dev", veth.host_end, "mtu", mtu, "master", veth.bridge,
                            "up")
        if str(inside.get("address", "")).lower() != veth.mac or "UP" not in inside.get("flags", ()) or \
                inside.get("mtu") != veth.mtu:
            self.ip(veth.netns, "link", "set", "dev", veth.ns_end, "address", veth.mac, "mtu", mtu, "up")
        return done, ipv4_addresses(inside)

    def set_addresses(self, netns: str, device: str, have: set[str], wanted: set[str]
                      ) -> tuple[list[str], list[str]]:
        """Give ``device`` in ``netns`` exactly the IPv4 addresses ``wanted`` (``ip/prefix``; ``have``:
        those it has). Returns the addresses added and removed, sorted."""
        removed = sorted(have - wanted)
        added = sorted(wanted - have)
        for address in removed:
            self.ip(netns, "addr", "del", address, "dev", device)
        for address in added:
            self.ip(netns, "addr", "add", address, "dev", device)
        return added, removed
