"""The operations of a compute host, one module per family (build, lifecycle, snapshot, resize, live
migration); what they share is in :mod:`compute_workers.operations.base`.

:data:`FAMILIES` is the one plug-in point: a family listed here is constructed by every
:class:`~compute_workers.manager.ComputeManager` (``manager.family(Lifecycle)``) and registers its tasks
with :func:`compute_workers.tasks.register_tasks`. A new family (volumes, consoles) is
a new module with an :class:`~compute_workers.operations.base.OperationFamily` subclass, added here.
"""

from __future__ import annotations

from compute_workers.operations.base import OperationFamily
from compute_workers.operations.build import Build
from compute_workers.operations.dhcp import Dhcp
from compute_workers.operations.evacuate import Evacuate
from compute_workers.operations.lifecycle import Lifecycle
from compute_workers.operations.live_migration import LiveMigration
from compute_workers.operations.network import Network
from compute_workers.operations.resize import Resize
from compute_workers.operations.router import Router
from compute_workers.operations.snapshot import Snapshot

FAMILIES: tuple[type[OperationFamily], ...] = (Build, Lifecycle, Snapshot, Resize, LiveMigration, Evacuate,
                                               Dhcp, Router, Network)

__all__ = ["FAMILIES", "Build", "Dhcp", "Evacuate", "Lifecycle", "LiveMigration", "Network",
           "OperationFamily", "Resize", "Router", "Snapshot"]
