"""A host's Linux bridges and VXLAN devices: the job of Neutron's linuxbridge agent, done by the compute
worker.

Each network with a port on this host gets a bridge ``brq<network id[:11]>`` (up, no IP address, no
IPv6 link-local either, STP off, forwarding delay 0). A ``vxlan`` network adds a VXLAN device
``vxlan-<vni>`` (``id <vni> dstport 4789 local <COMPUTE_TUNNEL_IP> nolearning``, the network's MTU)
enslaved to the bridge; the other hosts of the network are reached through all-zeros forwarding
entries (:meth:`LinuxBridges.add_fdb_peer`: head-end replication of broadcast and unknown unicast, as
Neutron's ``l2population`` does), which the control plane will keep in step with the ports. A ``flat``
network's uplink is the physical interface ``COMPUTE_FLAT_INTERFACE``; unset, a flat network's bridge
has no uplink and connects only the guests of this host (what the tests use). The guests' taps are made
by libvirt from the domain's ``<interface type='bridge'>``: this module never makes a tap.

Why here and not a network worker daemon of its own (issue 12 leaves it open): one compute worker
process runs per host, so in-process bookkeeping is enough to keep a bridge that a spawn just made from
being removed by a concurrent terminate (:meth:`LinuxBridges.plugged`); the bridges must exist before
a domain is defined and started (libvirt enslaves the tap to a bridge that must be there), and on a live
migration's destination before the guest moves there (``pre_live_migration``) — both points are inside
the compute worker's own tasks, so a second daemon would only add a round trip and a failure mode
(plugged or not?) to the spawn's critical path. The control plane's later network tasks (forwarding
entries, security groups) can still be a family of their own in this process.

Why not in ``compute_workers/virt``: the bridges belong to the host, not to a hypervisor; every driver
whose guests have taps uses the same ones, and a driver that needs none (libvirt's test driver, the
fake) says so with the capability ``plugs_host_bridges`` and gets :class:`RecordedBridges` instead.

Every command goes through one :class:`CommandRunner` (``ip``, ``bridge``), optionally inside a network
namespace (``ip netns exec``): unit tests give a fake runner, the namespace tests the real one in a
namespace they made. The functions are idempotent: what exists is read, not made again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from compute_workers import contract
from compute_workers.exception import ComputeError
from compute_workers.locks import KeyedLock

LOG = logging.getLogger(__name__)

VXLAN_PORT = 4789  # IANA's; Linux's default (8472) is the pre-standard one
VXLAN_PREFIX = "vxlan-"
FLOOD_MAC = "00:00:00:00:00:00"
# Only bridges of this prefix are ever removed: an operator's own bridges are not ours to delete.
BRIDGE_PREFIX = contract.bridge_name("")
IFNAMSIZ = 15
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


class CommandError(Exception):
    """A command exited non-zero; ``stderr`` is what it said."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr.strip()
        super().__init__(f"`{' '.join(argv)}` exited {returncode}: {self.stderr}")


class PlugError(ComputeError):
    """A bridge or VXLAN device could not be made (or removed) on this host; the message says which and
    what ``ip`` answered. Another host may do better."""


class Runner(Protocol):
    def run(self, *argv: str) -> str:
        """Run ``argv``; its standard output. Raises :class:`CommandError`."""
        ...


class CommandRunner:
    """Runs ``ip``/``bridge`` (and the firewall's) commands, in network namespace ``netns`` when given."""

    def __init__(self, netns: str | None = None, timeout: float = 30.0) -> None:
        self.netns, self.timeout = netns, timeout

    def run(self, *argv: str, stdin: str | None = None) -> str:
        """Run ``argv`` (fed ``stdin``, e.g. an ``iptables-restore`` transaction); its standard output."""
        full = ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)
        try:
            result = subprocess.run(full, capture_output=True, text=True, timeout=self.timeout, check=False,
                                    input=stdin)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(argv, -1, str(exc)) from exc
        if result.returncode != 0:
            raise CommandError(argv, result.returncode, result.stderr)
        return result.stdout


def namespaces_runner(runner: Runner) -> Runner | None:
    """The runner for commands that name the node's ``qdhcp-``/``qrouter-`` namespaces, given the host's
    ``runner``: when the host's networking lives in another namespace (``COMPUTE_NETWORK_NAMESPACE``), they
    run in the worker's own, since a namespace ``ip netns add`` makes inside ``ip netns exec`` is mounted in
    that command's private mount namespace only and gone with it. None: ``runner`` itself will do."""
    if isinstance(runner, CommandRunner) and runner.netns:
        return CommandRunner(timeout=runner.timeout)
    return None


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


def _missing(exc: CommandError) -> bool:
    return "does not exist" in exc.stderr or "Cannot find device" in exc.stderr


def _checked_name(name: str, what: str) -> str:
    if not _IFNAME.match(name):
        raise PlugError(f"invalid {what} name {name!r}: at most {IFNAMSIZ} letters, digits, '_', '.', "
                        "':' or '-'")
    return name


class LinuxBridges:
    """The bridges and VXLAN devices of one host (or of one network namespace: the runner's)."""

    def __init__(self, runner: Runner, tunnel_ip: str = "", flat_interface: str = "") -> None:
        self.runner, self.tunnel_ip, self.flat_interface = runner, tunnel_ip, flat_interface
        self._locks = KeyedLock()  # one bridge at a time: a plug and a removal of it never interleave
        self._pending: Counter[str] = Counter()  # bridges a plug holds until its domain's taps exist
        self._held: dict[str, list[str]] = {}  # owner (an instance migrating here) -> its bridges
        self._pending_lock = threading.Lock()

    # Reads ----------------------------------------------------------------------------------------

    def _link(self, name: str) -> dict[str, Any] | None:
        """``ip -d -j link show`` of ``name``; None when there is no such device."""
        try:
            links = json.loads(self.runner.run("ip", "-d", "-j", "link", "show", "dev", name) or "[]")
        except CommandError as exc:
            if _missing(exc):
                return None
            raise
        return links[0] if links else None

    def ports(self, bridge: str) -> list[str] | None:
        """The devices enslaved to ``bridge``; None when the bridge does not exist."""
        try:
            links = json.loads(self.runner.run("ip", "-j", "link", "show", "master", bridge) or "[]")
        except CommandError as exc:
            if _missing(exc):
                return None
            raise
        return [str(link["ifname"]) for link in links]

    # Plug -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def plugged(self, networks: Iterable[contract.NetworkSpec]) -> Iterator[list[str]]:
        """Ensure the bridges of ``networks`` and keep them from being removed as unused until the block
        ends (the domain started inside it: its taps are on them by then). Yields what was made."""
        networks = list(networks)
        bridges = [network["bridge"] for network in networks]
        with self._pending_lock:
            self._pending.update(bridges)
        try:
            made = [what for network in networks for what in self.ensure_bridge(network)]
            yield made
        finally:
            with self._pending_lock:
                self._pending.subtract(bridges)
                self._pending += Counter()  # drop the zeros

    def hold(self, owner: str, networks: Iterable[contract.NetworkSpec]) -> list[str]:
        """Ensure the bridges of ``networks`` and keep them from removal until :meth:`release` of
        ``owner``: a live migration's destination plugs them before the guest arrives, and no terminate
        of another guest may take them away meanwhile. Holding again replaces the owner's hold."""
        networks = list(networks)
        self.release(owner)
        bridges = [network["bridge"] for network in networks]
        with self._pending_lock:
            self._held[owner] = bridges
            self._pending.update(bridges)
        try:
            return [what for network in networks for what in self.ensure_bridge(network)]
        except BaseException:
            self.release(owner)
            raise

    def release(self, owner: str) -> list[str]:
        """End ``owner``'s hold; the bridges it held (none: [])."""
        with self._pending_lock:
            bridges = self._held.pop(owner, [])
            self._pending.subtract(bridges)
            self._pending += Counter()
        return bridges

    def ensure_bridge(self, network: contract.NetworkSpec) -> list[str]:
        """Make the network's bridge (and VXLAN device, or flat uplink) unless they exist; converge what
        exists (up, enslaved). Returns what it made, e.g. ``["bridge brq…", "VXLAN vxlan-1001"]``.
        Raises :class:`PlugError`."""
        bridge = _checked_name(network["bridge"], "bridge")
        mtu = int(network["mtu"])
        with self._locks.hold(bridge):
            made = []
            try:
                link = self._link(bridge)
                if link is None:
                    self.runner.run("ip", "link", "add", "name", bridge, "type", "bridge", "stp_state", "0",
                                    "forward_delay", "0")
                    # No IPv6 link-local address either: the host has no address on a tenant network.
                    self.runner.run("ip", "link", "set", "dev", bridge, "addrgenmode", "none")
                    self.runner.run("ip", "link", "set", "dev", bridge, "mtu", str(mtu), "up")
                    made.append(f"bridge {bridge}")
                elif "UP" not in link.get("flags", ()):
                    self.runner.run("ip", "link", "set", "dev", bridge, "up")
            except CommandError as exc:
                raise PlugError(f"cannot create bridge {bridge} of network {network['network_id']}: "
                                f"{exc.stderr}") from exc
            if network["provider_type"] == "vxlan":
                made += self._ensure_vxlan(network, bridge, mtu)
            elif network["provider_type"] == "flat":
                made += self._ensure_flat_uplink(network, bridge)
            else:
                raise PlugError(f"network {network['network_id']} has provider type "
                                f"{network['provider_type']!r}: this host plugs only vxlan and flat networks")
        if made:
            LOG.info("network %s: made %s", network["network_id"], ", ".join(made))
        return made

    def _ensure_vxlan(self, network: contract.NetworkSpec, bridge: str, mtu: int) -> list[str]:
        vni = network["segmentation_id"]
        if not isinstance(vni, int) or isinstance(vni, bool) or not 0 < vni < 2 ** 24:
            raise PlugError(f"network {network['network_id']} is a vxlan network without a valid VNI "
                            f"(segmentation_id {vni!r})")
        device = vxlan_name(vni)
        try:
            link = self._link(device)
            if link is None:
                if not self.tunnel_ip:
                    raise PlugError(f"cannot create VXLAN {device} of network {network['network_id']}: "
                                    "COMPUTE_TUNNEL_IP (this host's tunnel endpoint address) is not set")
                self.runner.run("ip", "link", "add", device, "type", "vxlan", "id", str(vni), "dstport",
                                str(VXLAN_PORT), "local", self.tunnel_ip, "nolearning")
                self.runner.run("ip", "link", "set", "dev", device, "mtu", str(mtu), "master", bridge, "up")
                return [f"VXLAN {device}"]
            if link.get("master") != bridge or "UP" not in link.get("flags", ()):
                self.runner.run("ip", "link", "set", "dev", device, "master", bridge, "up")
        except CommandError as exc:
            raise PlugError(f"cannot create VXLAN {device} of network {network['network_id']} on bridge "
                            f"{bridge}: {exc.stderr}") from exc
        return []

    def _ensure_flat_uplink(self, network: contract.NetworkSpec, bridge: str) -> list[str]:
        interface = self.flat_interface
        if not interface:
            return []  # no uplink: the bridge joins this host's guests only
        try:
            link = self._link(interface)
            if link is None:
                raise PlugError(f"cannot plug flat network {network['network_id']}: COMPUTE_FLAT_INTERFACE "
                                f"{interface} does not exist on this host")
            master = link.get("master")
            if master == bridge:
                if "UP" not in link.get("flags", ()):
                    self.runner.run("ip", "link", "set", "dev", interface, "up")
                return []
            if master:
                raise PlugError(f"cannot plug flat network {network['network_id']}: COMPUTE_FLAT_INTERFACE "
                                f"{interface} is already in bridge {master} (one flat network per "
                                "physical interface)")
            self.runner.run("ip", "link", "set", "dev", interface, "master", bridge, "up")
        except CommandError as exc:
            raise PlugError(f"cannot add {interface} to bridge {bridge} of flat network "
                            f"{network['network_id']}: {exc.stderr}") from exc
        return [f"uplink {interface}"]

    # Unplug ---------------------------------------------------------------------------------------

    def remove_bridge_if_unused(self, bridge: str) -> bool:
        """Delete ``bridge`` and its VXLAN device when no tap (nor anything but them and the flat
        uplink) is left on it and no plug holds it; True when it was removed. Nothing there: False.
        Raises :class:`PlugError`."""
        if not bridge.startswith(BRIDGE_PREFIX):
            raise PlugError(f"{bridge} is not a cloudctl bridge ({BRIDGE_PREFIX}…): not removed")
        _checked_name(bridge, "bridge")
        with self._locks.hold(bridge):
            with self._pending_lock:
                if self._pending[bridge]:
                    return False
            try:
                ports = self.ports(bridge)
                if ports is None:
                    return False
                in_use = [port for port in ports
                          if not port.startswith(VXLAN_PREFIX) and port != self.flat_interface]
                if in_use:
                    return False
                for port in ports:
                    if port.startswith(VXLAN_PREFIX):
                        self.runner.run("ip", "link", "del", "dev", port)
                self.runner.run("ip", "link", "del", "dev", bridge)  # releases the flat uplink
            except CommandError as exc:
                raise PlugError(f"cannot remove unused bridge {bridge}: {exc.stderr}") from exc
        LOG.info("removed unused bridge %s (and %s)", bridge,
                 ", ".join(port for port in ports if port.startswith(VXLAN_PREFIX)) or "no VXLAN")
        return True

    # The overlay's flood entries (kept by the control plane as ports come and go) ------------------

    def add_fdb_peer(self, vni: int, peer_ip: str) -> None:
        """Send broadcast and unknown unicast of VNI ``vni`` to the tunnel endpoint ``peer_ip`` too."""
        try:
            self.runner.run("bridge", "fdb", "append", FLOOD_MAC, "dev", vxlan_name(vni), "dst", peer_ip)
        except CommandError as exc:
            if "File exists" not in exc.stderr:
                raise PlugError(f"cannot add VXLAN peer {peer_ip} to {vxlan_name(vni)}: "
                                f"{exc.stderr}") from exc

    def fdb_peers(self, vni: int) -> set[str] | None:
        """The tunnel endpoints broadcast and unknown unicast of VNI ``vni`` are flooded to (its all-zeros
        entries); None when there is no such VXLAN device."""
        try:
            shown = self.runner.run("bridge", "-j", "fdb", "show", "dev", vxlan_name(vni))
            entries = json.loads(shown or "[]")
        except CommandError as exc:
            if _missing(exc):
                return None
            raise PlugError(f"cannot read the flood entries of {vxlan_name(vni)}: {exc.stderr}") from exc
        return {str(entry["dst"]) for entry in entries if entry.get("mac") == FLOOD_MAC and entry.get("dst")}

    def set_fdb_peers(self, vni: int, peers: Iterable[str]) -> list[str]:
        """Converge the flood entries of VNI ``vni`` to exactly ``peers`` (the other hosts of the network):
        the missing ones are appended, the others deleted. What changed, e.g. ``["peer 10.0.0.2 of
        vxlan-1001"]``; [] without a VXLAN device (nothing to flood from). Raises :class:`PlugError`."""
        wanted = set(peers)
        if self.tunnel_ip:
            wanted.discard(self.tunnel_ip)  # never flood to ourselves
        with self._locks.hold(vxlan_name(vni)):
            present = self.fdb_peers(vni)
            if present is None:
                return []
            for peer in sorted(wanted - present):
                self.add_fdb_peer(vni, peer)
            for peer in sorted(present - wanted):
                self.remove_fdb_peer(vni, peer)
        return ([f"peer {peer} of {vxlan_name(vni)}" for peer in sorted(wanted - present)]
                + [f"peer {peer} of {vxlan_name(vni)} removed" for peer in sorted(present - wanted)])

    def cloudctl_bridges(self) -> set[str]:
        """The bridges of this host that are cloudctl's (``brq…``)."""
        try:
            links = json.loads(self.runner.run("ip", "-j", "link", "show", "type", "bridge") or "[]")
        except CommandError as exc:
            raise PlugError(f"cannot list the bridges: {exc.stderr}") from exc
        names = (str(link.get("ifname", "")) for link in links)
        return {name for name in names if name.startswith(BRIDGE_PREFIX)}

    def taps(self) -> set[str]:
        """The guests' taps (and other ``tap…`` devices: a router's host ends) on this host now."""
        try:
            links = json.loads(self.runner.run("ip", "-j", "link", "show") or "[]")
        except CommandError as exc:
            raise PlugError(f"cannot list the devices: {exc.stderr}") from exc
        names = (str(link.get("ifname", "")) for link in links)
        return {name for name in names if name.startswith(contract.tap_name(""))}

    def remove_fdb_peer(self, vni: int, peer_ip: str) -> None:
        """Undo :meth:`add_fdb_peer`; an entry (or device) already gone is success."""
        try:
            self.runner.run("bridge", "fdb", "del", FLOOD_MAC, "dev", vxlan_name(vni), "dst", peer_ip)
        except CommandError as exc:
            if "No such file" not in exc.stderr and not _missing(exc):
                raise PlugError(f"cannot remove VXLAN peer {peer_ip} from {vxlan_name(vni)}: "
                                f"{exc.stderr}") from exc


class RecordedBridges:
    """The bridges of a driver whose guests need no host device (libvirt's test driver, the fake): what
    would be made is recorded in :attr:`bridges` (bridge -> network), nothing runs. ``in_use`` says
    which bridges the host's instances still use (the driver's view; a Linux bridge's ports say it for
    :class:`LinuxBridges`)."""

    def __init__(self, in_use: Callable[[], set[str]] = set) -> None:
        self.in_use = in_use
        self.bridges: dict[str, contract.NetworkSpec] = {}
        self.removed: list[str] = []
        self.peers: dict[int, set[str]] = {}  # VNI -> its flood entries
        self._held: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def plugged(self, networks: Iterable[contract.NetworkSpec]) -> Iterator[list[str]]:
        yield [what for network in networks for what in self.ensure_bridge(network)]

    def hold(self, owner: str, networks: Iterable[contract.NetworkSpec]) -> list[str]:
        networks = list(networks)
        self._held[owner] = [network["bridge"] for network in networks]
        return [what for network in networks for what in self.ensure_bridge(network)]

    def release(self, owner: str) -> list[str]:
        return self._held.pop(owner, [])

    def ensure_bridge(self, network: contract.NetworkSpec) -> list[str]:
        with self._lock:
            if network["bridge"] in self.bridges:
                return []
            self.bridges[network["bridge"]] = network
        return [f"bridge {network['bridge']}"]

    def set_fdb_peers(self, vni: int, peers: Iterable[str]) -> list[str]:
        wanted, present = set(peers), self.peers.get(vni, set())
        self.peers[vni] = wanted
        return ([f"peer {peer} of {vxlan_name(vni)}" for peer in sorted(wanted - present)]
                + [f"peer {peer} of {vxlan_name(vni)} removed" for peer in sorted(present - wanted)])

    def cloudctl_bridges(self) -> set[str]:
        with self._lock:
            return set(self.bridges)

    def remove_bridge_if_unused(self, bridge: str) -> bool:
        """Forget ``bridge`` unless an instance here still uses it or it is held."""
        with self._lock:
            if any(bridge in held for held in self._held.values()):
                return False
        if bridge in self.in_use():
            return False
        with self._lock:
            network = self.bridges.pop(bridge, None)
            if network is None:
                return False
            if network["provider_type"] == "vxlan" and network["segmentation_id"] is not None:
                self.peers.pop(network["segmentation_id"], None)  # its VXLAN device goes with it
            self.removed.append(bridge)
        return True


class HostBridges(Protocol):
    """What the operation families use: :class:`LinuxBridges` or :class:`RecordedBridges`."""

    def plugged(self, networks: Iterable[contract.NetworkSpec]
                ) -> contextlib.AbstractContextManager[list[str]]:
        ...

    def ensure_bridge(self, network: contract.NetworkSpec) -> list[str]:
        ...

    def remove_bridge_if_unused(self, bridge: str) -> bool:
        ...

    def hold(self, owner: str, networks: Iterable[contract.NetworkSpec]) -> list[str]:
        ...

    def release(self, owner: str) -> list[str]:
        ...

    def set_fdb_peers(self, vni: int, peers: Iterable[str]) -> list[str]:
        ...

    def cloudctl_bridges(self) -> set[str]:
        ...
