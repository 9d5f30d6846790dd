"""Dhcp: the network node's DHCP servers (``compute.network_dhcp_sync``), one per network, converged
by :mod:`compute_workers.network.dhcp` to the whole state each call carries.

The task goes to the network node's queue (``NETWORK_DHCP_HOST``): any compute worker can be that node.
A driver whose guests are taps on the host's bridges (``plugs_host_bridges``, as the build family's
bridges) gets real namespaces and dnsmasq, on the same bridges object the guests' plugs use (a bridge a
DHCP port is on is never removed as unused); a driver without host devices (fake, libvirt's test
driver) records the desired state only. A failure is logged, never reported: there is no report, and
the next sync carries the whole state again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Task

from compute_workers import contract
from compute_workers.network.dhcp import STATE_DIRECTORY, DhcpServers, RecordedDhcp
from compute_workers.network.linuxbridge import LinuxBridges, namespaces_runner
from compute_workers.operations.base import HostContext, OperationFamily

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)


class Dhcp(OperationFamily):
    """compute.network_dhcp_sync."""

    def __init__(self, context: HostContext) -> None:
        super().__init__(context)
        self.servers: DhcpServers | RecordedDhcp
        if self.driver.capabilities.get("plugs_host_bridges") and isinstance(self.bridges, LinuxBridges):
            self.servers = DhcpServers(self.bridges.runner, self.bridges,
                                       self.config.instances_path / STATE_DIRECTORY,
                                       namespaces=namespaces_runner(self.bridges.runner))
        else:
            self.servers = RecordedDhcp(self.bridges)

    def network_dhcp_sync(self, network: Any) -> list[str]:
        """Converge one network's DHCP server; what was done. Failures are logged, never raised."""
        network_id = network.get("network_id") if isinstance(network, dict) else None
        try:
            return self.servers.sync(network)
        except Exception as exc:
            LOG.error("DHCP sync of network %r failed on %s: %s", network_id, self.host, exc,
                      exc_info=not isinstance(exc, contract.SpecError))
            return []

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        @tasks.task(contract.COMPUTE_NETWORK_DHCP_SYNC, ignore_result=True)
        def network_dhcp_sync(self: Task, network: dict[str, Any]) -> None:
            if family := tasks.family(self, cls):
                family.network_dhcp_sync(network)
