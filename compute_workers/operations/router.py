"""Router: the network node's routers (``compute.network_router_sync``), one namespace each, converged by
:mod:`compute_workers.network.router` to the whole state each call carries.

The task goes to the network node's queue (``NETWORK_NODE_HOST``): any compute worker can be that node.
A driver whose guests are taps on the host's bridges (``plugs_host_bridges``) gets real namespaces,
veths and NAT, on the same bridges object the guests' plugs and the DHCP servers use (a bridge a router
leg is on is held, never removed as unused); a driver without host devices (fake, libvirt's test driver)
records the desired state only. A failure is logged, never reported: there is no report, and the next
sync carries the whole state again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Task

from compute_workers import contract
from compute_workers.network.linuxbridge import LinuxBridges, namespaces_runner
from compute_workers.network.router import RecordedRouters, Routers
from compute_workers.operations.base import HostContext, OperationFamily

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)


class Router(OperationFamily):
    """compute.network_router_sync."""

    def __init__(self, context: HostContext) -> None:
        super().__init__(context)
        self.routers: Routers | RecordedRouters
        if self.driver.capabilities.get("plugs_host_bridges") and isinstance(self.bridges, LinuxBridges):
            self.routers = Routers(self.bridges.runner, self.bridges,
                                   namespaces=namespaces_runner(self.bridges.runner))
        else:
            self.routers = RecordedRouters(self.bridges)

    def network_router_sync(self, router: Any) -> list[str]:
        """Converge one router; what was done. Failures are logged, never raised."""
        router_id = router.get("router_id") if isinstance(router, dict) else None
        try:
            return self.routers.sync(router)
        except Exception as exc:
            LOG.error("sync of router %r failed on %s: %s", router_id, self.host, exc,
                      exc_info=not isinstance(exc, contract.SpecError))
            return []

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        @tasks.task(contract.COMPUTE_NETWORK_ROUTER_SYNC, ignore_result=True)
        def network_router_sync(self: Task, router: dict[str, Any]) -> None:
            if family := tasks.family(self, cls):
                family.network_router_sync(router)
