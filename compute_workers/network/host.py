"""A host's networking converged to the whole :class:`HostNetworkState` a ``compute.network_host_sync``
carries (the job of Neutron's linuxbridge agent loop with l2population and its security-group RPC).

Each sync, in this order, each step on its own (a failure is logged and the others still run):

- every network listed (and every listed port's network) gets its bridge and VXLAN device
  (:meth:`LinuxBridges.ensure_bridge`), held by the sync (owner ``host-sync:<bridge>``) so that the
  terminate of its last guest leaves it to the sync that no longer lists the network;
- a vxlan network's flood entries are made exactly its ``peers`` (:meth:`LinuxBridges.set_fdb_peers`);
- the firewall (:mod:`compute_workers.network.firewall`) gets exactly the listed ports' chains, with one
  exception: a port not listed whose tap still exists on this host keeps its chains. Such a guest runs
  here and the state predates it (a spawn whose port was bound after the state was built); dropping its
  chains would leave it unfiltered until the next sync, keeping them leaves it as filtered as it was.
  Terminate and a live migration's source remove a guest's chains themselves once its taps are gone;
- the hold of networks no longer listed ends, and every ``brq`` bridge of the host that is not listed
  is removed if nothing uses it (:meth:`LinuxBridges.remove_bridge_if_unused`: a tap, a DHCP namespace's
  or a router's veth, a spawn's or a live migration's hold keep it).

A state older than the last applied (``generation``) is ignored. The last generation is kept in memory
and in ``INSTANCES_PATH/_network/generation`` (written atomically), so that a stale state redelivered
after a restart (Redis redelivers unacknowledged tasks) cannot undo a newer one. Delete that file if the
control plane's generations ever start again from 0.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.exception import ComputeError
from compute_workers.network.firewall import FirewallError, HostFirewall, checked_security
from compute_workers.network.linuxbridge import HostBridges

LOG = logging.getLogger(__name__)

STATE_DIRECTORY = "_network"
GENERATION_FILE = "generation"
HOLD_PREFIX = "host-sync:"


class HostNetworkError(ComputeError):
    """A host network state is malformed (nothing of it is applied); the message says what."""


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def checked_state(state: Any, host: str | None = None) -> contract.HostNetworkState:
    """``state`` if it is a well-formed :class:`HostNetworkState` (for ``host`` when given); raises
    :class:`HostNetworkError` naming what is wrong. Everything that reaches a command line is checked."""
    if not isinstance(state, dict):
        raise HostNetworkError(f"host network state is not an object: {type(state).__name__}")
    if not isinstance(state.get("host"), str) or (host is not None and state["host"] != host):
        raise HostNetworkError(f"host network state is for host {state.get('host')!r}, not {host}")
    if not _integer(state.get("generation"), 0, 2 ** 63):
        raise HostNetworkError(f"generation must be a non-negative integer, not {state.get('generation')!r}")
    networks, ports = state.get("networks"), state.get("ports")
    if not isinstance(networks, list) or not isinstance(ports, list):
        raise HostNetworkError("networks and ports must be lists")
    try:
        for i, network in enumerate(networks):
            contract.check_bridge_network(network, f"networks[{i}]")
            peers = network.get("peers")
            if not isinstance(peers, list):
                raise contract.SpecError(f"networks[{i}].peers must be a list")
            for peer in peers:
                try:
                    ipaddress.ip_address(peer)
                except (TypeError, ValueError):
                    raise contract.SpecError(f"networks[{i}].peers: invalid address {peer!r}") from None
        contract.check_networks(ports, "ports")  # the spawn spec's own check of a NetworkSpec
    except contract.SpecError as exc:
        raise HostNetworkError(str(exc)) from None
    for i, port in enumerate(ports):
        if "security" in port:
            try:
                checked_security(port["security"], f"ports[{i}]")
            except FirewallError as exc:
                raise HostNetworkError(str(exc)) from None
    return state  # type: ignore[return-value]  # its shape is what was just checked


def bridge_network(network: contract.HostNetwork) -> contract.NetworkSpec:
    """The :class:`NetworkSpec` whose bridge :class:`HostBridges` makes for a network of the state."""
    return {"port_id": network["network_id"], "network_id": network["network_id"], "mac_address": "",
            "fixed_ips": [], "mtu": network["mtu"], "provider_type": network["provider_type"],
            "segmentation_id": network["segmentation_id"], "bridge": network["bridge"],
            "tap": contract.tap_name(network["network_id"])}


class AppliedPorts:
    """The ports of the last host network state applied here. A live migration's destination waits for its
    incoming ports to be among them (:meth:`wait`) before it reports itself prepared: the state that
    carries them (``Port.migrating_to``) is sent at the same commit as ``pre_live_migration`` but runs as
    a task of its own, and only it sets the networks' flood peers; a guest switched over before that
    could not reach the hosts of its network (its replies flood nowhere)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._ports: frozenset[str] = frozenset()

    def set(self, ports: Iterable[str]) -> None:
        with self._changed:
            self._ports = frozenset(ports)
            self._changed.notify_all()

    def wait(self, ports: Iterable[str], timeout: float) -> bool:
        """True once every port of ``ports`` is in an applied state; False after ``timeout`` seconds."""
        wanted = set(ports)
        with self._changed:
            return self._changed.wait_for(lambda: wanted <= self._ports, timeout)


class HostNetworking:
    """Converges this host's bridges, flood entries and firewall to host network states.

    ``taps``: the taps that exist on this host now (a port not listed keeps its chains while its tap
    does); ``state_directory``: where the last generation is kept (None: in memory only)."""

    def __init__(self, bridges: HostBridges, firewall: HostFirewall, state_directory: Path | None,
                 taps: Callable[[], set[str]] = set, applied: AppliedPorts | None = None) -> None:
        self.bridges, self.firewall, self.taps = bridges, firewall, taps
        self.applied = applied or AppliedPorts()
        self.state_directory = state_directory
        self._lock = threading.Lock()
        self._held: set[str] = set()  # the bridges the last sync holds
        self._generation = self._load_generation()
        self.errors: list[str] = []  # the failures of the last sync

    @property
    def generation(self) -> int | None:
        """The generation of the last state applied (None: none yet)."""
        return self._generation

    def sync(self, state: Any) -> list[str]:
        """Converge to ``state``; what was done ([]: nothing). A malformed state raises
        :class:`HostNetworkError` before anything is done; a failing step is logged (and kept in
        :attr:`errors`) and the next one runs."""
        checked = checked_state(state)
        with self._lock:
            generation = checked["generation"]
            if self._generation is not None and generation < self._generation:
                LOG.warning("host network state of generation %d ignored: generation %d was applied "
                            "already (%s)", generation, self._generation,
                            self._generation_path() or "kept in memory")
                return []
            self.errors = []
            bridges = self._wanted_bridges(checked)
            done = self._ensure_networks(checked, bridges)
            done += self._step("firewall",
                               lambda: self.firewall.sync(checked["ports"], self._kept_taps(checked)))
            done += self._release(set(bridges))
            self._save_generation(generation)
            self.applied.set(port["port_id"] for port in checked["ports"])
        if done or self.errors:
            LOG.info("host network state %d applied: %s%s", generation, ", ".join(done) or "no change",
                     f"; {len(self.errors)} step(s) failed" if self.errors else "")
        return done

    def _step(self, what: str, run: Callable[[], list[str]]) -> list[str]:
        try:
            return run()
        except Exception as exc:
            message = f"{what}: {exc}"
            self.errors.append(message)
            LOG.error("host network sync, %s", message, exc_info=not isinstance(exc, ComputeError))
            return []

    @staticmethod
    def _wanted_bridges(state: contract.HostNetworkState) -> dict[str, contract.NetworkSpec]:
        """The bridges of the state: its networks' and its ports' (a port carries its network's too)."""
        wanted: dict[str, contract.NetworkSpec] = {}
        for port in state["ports"]:
            wanted.setdefault(port["bridge"], port)
        for network in state["networks"]:
            wanted[network["bridge"]] = bridge_network(network)
        return wanted

    def _ensure_networks(self, state: contract.HostNetworkState,
                         bridges: dict[str, contract.NetworkSpec]) -> list[str]:
        done: list[str] = []
        for bridge, spec in bridges.items():
            hold = functools.partial(self.bridges.hold, f"{HOLD_PREFIX}{bridge}", [spec])
            done += self._step(f"bridge {bridge}", hold)
        for network in state["networks"]:
            vni = network["segmentation_id"]
            if network["provider_type"] == "vxlan" and vni is not None:
                done += self._step(f"peers of {network['bridge']}",
                                   functools.partial(self.bridges.set_fdb_peers, vni, network["peers"]))
        return done

    def _kept_taps(self, state: contract.HostNetworkState) -> set[str]:
        """Taps with chains that the state does not list but exist here: they keep their filtering."""
        listed = {port["tap"] for port in state["ports"]}
        kept = (self.firewall.applied() - listed) & self.taps()
        if kept:
            LOG.warning("host network state: taps %s are not listed but exist on this host; their filtering "
                        "is kept until they are gone", ", ".join(sorted(kept)))
        return kept

    def _release(self, wanted: set[str]) -> list[str]:
        """End the holds of bridges no longer listed; remove every unlisted bridge nothing uses."""
        done = []
        for bridge in sorted(self._held - wanted):
            self.bridges.release(f"{HOLD_PREFIX}{bridge}")
        self._held = wanted
        present = self._step("bridges", lambda: sorted(self.bridges.cloudctl_bridges()))
        for bridge in present:
            if bridge in wanted:
                continue
            try:
                if self.bridges.remove_bridge_if_unused(bridge):
                    done.append(f"bridge {bridge} removed")
            except Exception as exc:
                self.errors.append(f"bridge {bridge}: {exc}")
                LOG.error("host network sync: cannot remove unused bridge %s: %s", bridge, exc)
        return done

    # The last generation ------------------------------------------------------------------------------

    def _generation_path(self) -> Path | None:
        return self.state_directory / GENERATION_FILE if self.state_directory is not None else None

    def _load_generation(self) -> int | None:
        path = self._generation_path()
        if path is None:
            return None
        try:
            return int(path.read_text().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            LOG.warning("cannot read the last host network generation from %s (%s): the next state is "
                        "applied whatever its generation", path, exc)
            return None

    def _save_generation(self, generation: int) -> None:
        self._generation = generation
        path = self._generation_path()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_text(f"{generation}\n")
            temporary.replace(path)
        except OSError as exc:
            LOG.error("cannot keep host network generation %d in %s (%s): kept in memory only", generation,
                      path, exc)
