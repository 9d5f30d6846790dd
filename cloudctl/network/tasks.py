"""Network tasks of the control plane's Celery app (thin: the work is in the network services)."""

from __future__ import annotations

from celery import shared_task

from cloudctl.network import hostsync

# Periodic (beat, every NETWORK_RESYNC_INTERVAL): run by the conductor, whose queue ``conductor.*``
# names are routed to.
NETWORK_RESYNC = "conductor.network_resync"


@shared_task(name=NETWORK_RESYNC, ignore_result=True)
def network_resync() -> int:
    """Send every up host that holds a port its whole network state; returns how many."""
    return len(hostsync.resync())
