"""Network: a host's own networking (``compute.network_host_sync``): the bridges and VXLAN flood entries
of the networks with a port here, the ports' security-group chains and anti-spoofing, converged by
:mod:`compute_workers.network.host` to the whole state each call carries.

A driver whose guests are taps on the host's bridges (``plugs_host_bridges``) gets the real bridges and
iptables firewall the other families plug with (one bridges object, one firewall: a bridge a spawn, a
DHCP namespace or a router holds is never removed, and a spawn's chains and the sync's are the same
chains); a driver without host devices (fake, libvirt's test driver) records the desired state only
(:class:`RecordedBridges`, :class:`RecordedFirewall`). A failure is logged, never reported: there is no
report, and the next sync carries the whole state again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Task

from compute_workers import contract
from compute_workers.network.host import STATE_DIRECTORY, HostNetworkError, HostNetworking
from compute_workers.network.linuxbridge import LinuxBridges
from compute_workers.operations.base import HostContext, OperationFamily

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)


class Network(OperationFamily):
    """compute.network_host_sync."""

    def __init__(self, context: HostContext) -> None:
        super().__init__(context)
        taps = self.bridges.taps if self.driver.capabilities.get("plugs_host_bridges") and \
            isinstance(self.bridges, LinuxBridges) else set
        self.networking = HostNetworking(self.bridges, self.firewall,
                                         self.config.instances_path / STATE_DIRECTORY, taps=taps,
                                         applied=context.applied_ports)

    def network_host_sync(self, state: Any) -> list[str]:
        """Converge this host's networking to ``state``; what was done. Failures are logged, never
        raised; a malformed state (or one for another host) changes nothing."""
        generation = state.get("generation") if isinstance(state, dict) else None
        try:
            if isinstance(state, dict) and state.get("host") != self.host:
                raise HostNetworkError(f"state is for host {state.get('host')!r}, not {self.host}")
            return self.networking.sync(state)
        except Exception as exc:
            LOG.error("host network sync (generation %r) failed on %s: %s", generation, self.host, exc,
                      exc_info=not isinstance(exc, HostNetworkError))
            return []

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        @tasks.task(contract.COMPUTE_NETWORK_HOST_SYNC, ignore_result=True)
        def network_host_sync(self: Task, state: dict[str, Any]) -> None:
            if family := tasks.family(self, cls):
                family.network_host_sync(state)
