"""A project's limits where an administrator changed them; every other limit is the default of the
settings. Usage is never stored: it is counted from the resources themselves (see
:mod:`cloudctl.quotas.services`)."""

from __future__ import annotations

from django.db import models

from cloudctl.identity.models import Project


class ProjectQuota(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="quotas")
    # A name of cloudctl.quotas.resources.RESOURCES (checked by the service, not as database choices:
    # a new resource needs no migration).
    resource = models.CharField(max_length=32)
    limit = models.BigIntegerField(help_text="-1: unlimited")

    class Meta:
        ordering = ("project", "resource")
        constraints = [
            models.UniqueConstraint(fields=["project", "resource"], name="one_limit_per_project_resource"),
            models.CheckConstraint(condition=models.Q(limit__gte=-1), name="quota_limit_at_least_minus_one"),
        ]

    def __str__(self) -> str:
        return f"{self.project}: {self.resource} <= {self.limit}"
