"""What tenants see of the hypervisors: a host id per project, never a host's name.

As Nova's ``hostId``: ``sha224(project id + host name)`` in hex, empty without a host. Two servers of
one project on one host share it (the owner can check its anti-affinity); another project's id for
the same host differs, so tenants cannot map the cloud nor find a neighbour's host. Administrators
see the names (``host``) as well.

The API's fields that hold a host name show it to administrators only; messages written for
everyone (action events, faults, migration errors, error answers) may still name a host, so the
views that serve tenants pass their answer through :class:`HostNameRedactor`, which puts the host id
in place of every known host name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

from cloudctl.compute.models import Host

# Keys whose values are the tenant's own words (a server named like a host stays as its owner named
# it) or identifiers.
UNREDACTED_KEYS = frozenset({"id", "name"})


def host_id(project_id: object, host_name: str | None) -> str:
    """Nova's hostId: sha224 hex digest of the project id followed by the host name; "" without a
    host."""
    if not host_name:
        return ""
    return hashlib.sha224(f"{project_id}{host_name}".encode()).hexdigest()


class HostNameRedactor:
    """Replaces host names in text (a whole word: ``hv1`` in ``on hv1.`` but not in ``hv10``) with
    their host id for ``project_id``."""

    def __init__(self, project_id: object, names: Iterable[str]) -> None:
        self.project_id = project_id
        ordered = sorted({name for name in names if name}, key=len, reverse=True)
        self._pattern = (re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, ordered)) + r")(?![\w-])")
                         if ordered else None)

    @classmethod
    def for_project(cls, project_id: object) -> HostNameRedactor:
        return cls(project_id, Host.objects.values_list("name", flat=True))

    def text(self, value: str) -> str:
        if self._pattern is None:
            return value
        return self._pattern.sub(lambda match: host_id(self.project_id, match.group(1)), value)

    def data(self, value: Any) -> Any:
        """``value`` (an answer's data: dicts, lists, strings, ...) with host names replaced in
        every string but those of :data:`UNREDACTED_KEYS`."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: item if key in UNREDACTED_KEYS else self.data(item)
                    for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(item) for item in value]
        return value
