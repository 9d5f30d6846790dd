"""Reads: what each user may see, and the views of hosts, zones and migrations the API, the admin and
the dashboard show. No writes here (those are services); every interface reads through these."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from cloudctl.compute.models import Migration
from cloudctl.identity.services import is_admin, project_id_of


def migrations_visible_to(user: Any) -> QuerySet[Migration]:
    migrations = Migration.objects.select_related("instance", "source_host", "dest_host", "old_flavor",
                                                  "new_flavor")
    if is_admin(user):
        return migrations
    return migrations.filter(instance__project_id=project_id_of(user))
