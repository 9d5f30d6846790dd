"""How each resource is counted, declared by the app that owns it.

The quotas app sits below the apps whose resources it limits (compute, images, network import it,
never the other way round): each of them registers, in its ``AppConfig.ready``, a counter for its
resources and, where it has one, a drift check for ``manage.py quota_audit``. Counting is always
done from the resources themselves (as Nova's counting quotas since Pike), never from a stored
usage figure that could drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cloudctl.quotas.resources import BY_NAME

# project id -> {resource: in use} for the resources the counter was registered for.
Counter = Callable[[int], Mapping[str, int]]
# () -> one line per problem found (empty: no drift).
DriftCheck = Callable[[], list[str]]


@dataclass(frozen=True)
class _Registered:
    resources: tuple[str, ...]
    counter: Counter


_counters: dict[str, _Registered] = {}
_drift_checks: dict[str, DriftCheck] = {}


def register_counter(resources: Iterable[str], counter: Counter) -> None:
    """``counter`` counts ``resources`` (names of :data:`cloudctl.quotas.resources.RESOURCES`)."""
    entry = _Registered(tuple(resources), counter)
    for name in entry.resources:
        if name not in BY_NAME:
            raise ValueError(f"no quota resource {name!r}")
        _counters[name] = entry


def register_drift_check(name: str, check: DriftCheck) -> None:
    _drift_checks[name] = check


def drift_checks() -> dict[str, DriftCheck]:
    return dict(_drift_checks)


def count(project_id: int, resources: Iterable[str]) -> dict[str, int]:
    """What ``project_id`` uses of each of ``resources``, each counter called once; 0 for a resource
    no app counts (yet). Per-owner resources (``per`` not "project") give their largest owner."""
    wanted = list(resources)
    found: dict[str, int] = {}
    for name in wanted:
        if name in found:
            continue
        entry = _counters.get(name)
        if entry is None:
            found[name] = 0
            continue
        counted = entry.counter(project_id)
        for counted_name in entry.resources:
            found[counted_name] = int(counted.get(counted_name, 0))
    return {name: found[name] for name in wanted}
