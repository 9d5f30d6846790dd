"""The capacity dashboard: hosts, zones, servers per status, trouble, migrations in progress, last
scheduling failures, address use of each subnet.

Server-side rendered from the same selectors as the API; the page refreshes itself."""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from cloudctl.compute import selectors
from cloudctl.compute.models import Host
from cloudctl.compute.states import VmState
from cloudctl.network import selectors as network_selectors

REFRESH_SECONDS = 10


def _bar(used: float, total: float, ratio: float) -> dict[str, Any]:
    capacity = total * ratio
    percent = 100 * used / capacity if capacity else 0.0
    return {"used": used, "capacity": capacity, "ratio": ratio, "percent": round(percent, 1),
            "width": round(min(100.0, percent), 1),  # a lowered ratio can leave a host over 100%
            "level": "high" if percent >= 90 else "mid" if percent >= 70 else "low"}


def usage_bars(host: Host) -> dict[str, dict[str, Any]]:
    """vCPU, RAM and disk use of a host from ``selectors.hosts_with_usage()``, against ratio x capacity."""
    ratios = host.ratios
    return {
        "vcpu": _bar(host.vcpus_used, host.vcpus, ratios["cpu"]),
        "ram": _bar(host.memory_mb_used, host.memory_mb - host.memory_mb_reserved, ratios["ram"]),
        "disk": _bar(host.disk_gb_used, host.disk_gb - host.disk_gb_reserved, ratios["disk"]),
    }


def host_rows(hosts: list[Host]) -> list[dict[str, Any]]:
    return [{"host": host, "up": host.is_up, "zone": host.zone, **usage_bars(host)}
            for host in hosts]


def subnet_rows() -> list[dict[str, Any]]:
    """Each subnet's address use (one query for them all), with a bar of used against pool size."""
    return [{"usage": usage, "bar": _bar(usage.used, usage.pool_size, 1.0)}
            for usage in network_selectors.subnets_usage()]


def zone_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    zones: dict[str, dict[str, Any]] = {}
    for row in rows:
        zone = zones.setdefault(row["zone"], {"name": row["zone"], "hosts": 0, "up": 0,
                                              "vcpu": [0.0, 0.0], "ram": [0.0, 0.0],
                                              "disk": [0.0, 0.0]})
        zone["hosts"] += 1
        zone["up"] += 1 if row["up"] and row["host"].enabled else 0
        for key in ("vcpu", "ram", "disk"):
            zone[key][0] += row[key]["used"]
            zone[key][1] += row[key]["capacity"]
    return [{**zone, **{key: _bar(zone[key][0], zone[key][1], 1.0)
                        for key in ("vcpu", "ram", "disk")}}
            for zone in sorted(zones.values(), key=lambda z: z["name"])]


@staff_member_required
def capacity_dashboard(request: HttpRequest) -> HttpResponse:
    rows = host_rows(list(selectors.hosts_with_usage()))
    live = list(selectors.servers_live())
    now = timezone.now()
    troubled = []
    for server in live:
        if server.vm_state == VmState.ERROR or server.task_state:
            deadline = settings.TASK_DEADLINES.get(server.task_state or "",
                                                   settings.INSTANCE_BUILD_TIMEOUT)
            age = (now - server.task_state_since).total_seconds()
            troubled.append({"server": server, "age": int(age),
                             "late": bool(server.task_state) and age > deadline})
    failures = selectors.scheduling_failures_recent(limit=10)
    migrations = selectors.migrations_in_progress()
    return render(request, "dashboard.html", {
        "title": "Capacity", "hosts": rows, "zones": zone_rows(rows), "migrations": migrations,
        "status_counts": sorted(Counter(s.status for s in live).items()),
        "troubled": troubled, "failures": failures, "subnets": subnet_rows(),
        "refresh": REFRESH_SECONDS,
        "generated": now,
    })
