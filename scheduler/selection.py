"""Choosing hosts: filters, then weighers, over plain snapshots. Pure: no database, no Django."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.filters import BaseHostFilter
from scheduler.host_state import HostState, RequestSpec
from scheduler.weighers import BaseWeigher, weigh_hosts

log = logging.getLogger(__name__)


@dataclass
class FilterStep:
    name: str
    hosts_in: int
    hosts_out: int
    reason: str = ""  # names the hosts: for administrators
    tenant_reason: str = ""  # the same without host names


@dataclass
class NoValidHost(Exception):
    """Every host was filtered out; ``steps`` says which filter removed which."""

    steps: list[FilterStep] = field(default_factory=list)
    total_hosts: int = 0

    def _emptied(self) -> FilterStep | None:
        return next((s for s in self.steps if s.hosts_out == 0), None)

    @property
    def message(self) -> str:
        """For administrators: the filter that left no host, and which hosts it removed."""
        if self.total_hosts == 0:
            return "No valid host was found: no compute host has registered yet."
        emptied = self._emptied()
        if emptied is None:
            return "No valid host was found: every candidate host was claimed concurrently."
        return (f"No valid host was found: {emptied.name} left 0 of {emptied.hosts_in} "
                f"host(s): {emptied.reason}.")

    @property
    def tenant_message(self) -> str:
        """For the server's owner: the same filter and figures, no host name (as Nova's hostId,
        tenants do not learn the hypervisors' names)."""
        emptied = self._emptied()
        if self.total_hosts == 0 or emptied is None:
            return self.message
        return f"No valid host was found: {emptied.name}: {emptied.tenant_reason}."

    def as_fault(self) -> dict[str, Any]:
        """The server's fault: ``message`` for administrators, ``tenant_message`` for the others
        (the API shows one by the reader's role); the per-filter details are administrators'."""
        return {"message": self.message, "tenant_message": self.tenant_message, "code": 500,
                "details": {"total_hosts": self.total_hosts,
                            "filters": [s.__dict__ for s in self.steps]}}


def select_hosts(hosts: Sequence[HostState], spec: RequestSpec,
                 filters: Sequence[BaseHostFilter],
                 weighers: Sequence[tuple[BaseWeigher, float]],
                 subset_size: int = 1) -> list[HostState]:
    """Candidate hosts, best first. Raises NoValidHost with the per-filter breakdown."""
    if not hosts:
        raise NoValidHost(total_hosts=0)
    remaining = list(hosts)
    steps: list[FilterStep] = []
    if spec.force_host:
        pinned = [h for h in remaining if h.name == spec.force_host]
        steps.append(FilterStep("RequestedHost", len(remaining), len(pinned),
                                f"an administrator pinned host {spec.force_host}",
                                "the host an administrator pinned cannot take it"))
        if not pinned:
            raise NoValidHost(steps=steps, total_hosts=len(hosts))
        remaining = pinned
    for host_filter in filters:
        passed: list[HostState] = []
        rejected: list[HostState] = []
        for candidate in remaining:
            (passed if host_filter.host_passes(candidate, spec) else rejected).append(candidate)
        steps.append(FilterStep(host_filter.name, len(remaining), len(passed),
                                host_filter.explain(spec, rejected) if rejected else "",
                                host_filter.explain_for_tenant(spec, rejected) if rejected else ""))
        if not passed:
            log.info("Filter %s returned 0 hosts for %s: %s", host_filter.name,
                     spec.instance_uuid, steps[-1].reason)
            raise NoValidHost(steps=steps, total_hosts=len(hosts))
        remaining = passed
    ranked = [host for host, _ in weigh_hosts(remaining, spec, weighers)]
    if subset_size > 1:
        # Nova's host_subset_size: pick at random among the best few, so concurrent requests
        # that see the same weights do not all race for the same host.
        best = ranked[:subset_size]
        random.shuffle(best)
        ranked = best + ranked[subset_size:]
    return ranked
