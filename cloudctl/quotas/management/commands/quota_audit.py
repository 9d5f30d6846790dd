"""manage.py quota_audit: each project's usage against its limits, the projects over a limit (an
administrator lowered it under the usage), and drift between what is counted and what the apps'
records say (placement claims without a live server, servers without their claim). Exit status 1
when drift is found; a project over its limit is reported, not an error (nothing is lost)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cloudctl.identity.models import Project
from cloudctl.quotas.resources import UNLIMITED
from cloudctl.quotas.services import quota_audit, quota_usage


class Command(BaseCommand):
    help = "Print every project's quota usage against its limits; exit 1 when usage and claims drift."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", help="only this project (its name) in the usage table")

    def handle(self, *args: Any, **options: Any) -> None:
        projects = Project.objects.order_by("name")
        if options["project"]:
            projects = projects.filter(name=options["project"])
            if not projects.exists():
                raise CommandError(f"no project {options['project']!r}")
        for project in projects:
            self.stdout.write(f"project {project.name}")
            for name, entry in quota_usage(project).items():
                limit = "unlimited" if entry["limit"] == UNLIMITED else str(entry["limit"])
                exceeded = entry["limit"] != UNLIMITED and entry["in_use"] > entry["limit"]
                self.stdout.write(f"  {name:<22} {entry['in_use']:>14} / {limit:<14}"
                                  f"{'  OVER LIMIT' if exceeded else ''}")
        over, drift = quota_audit()
        for line in over:
            self.stdout.write(self.style.WARNING(f"over limit: {line}"))
        for line in drift:
            self.stdout.write(self.style.ERROR(f"drift: {line}"))
        if drift:
            raise SystemExit(1)
        summary = f"no drift; {len(over)} limit(s) exceeded" if over else "no drift, no project over a limit"
        self.stdout.write(self.style.SUCCESS(summary))
