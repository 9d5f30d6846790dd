"""``manage.py host_credentials <host>``: the key a compute host signs its reports with.

Prints the lines to put in the host's compute worker environment (``COMPUTE_HOST=...``,
``COMPUTE_HOST_KEY=...``) on stdout, and how to use them on stderr (not with ``-v 0``): ``tools/run.sh``
reads the key of the host it starts from stdout. ``--rotate`` issues a new key (the old one is refused
from now on); ``--revoke`` refuses the current key and disables the host, printing no new key.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cloudctl.compute.host_keys import host_credentials
from cloudctl.errors import InvalidRequest


class Command(BaseCommand):
    help = "Print (or rotate, or revoke) the key of a compute host: its COMPUTE_HOST_KEY."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("host", help="the compute host's name (its COMPUTE_HOST)")
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--rotate", action="store_true",
                            help="issue a new key; the current one is refused from now on")
        action.add_argument("--revoke", action="store_true",
                            help="refuse the current key and disable the host; prints no key")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            issued = host_credentials(name=options["host"], rotate=options["rotate"],
                                      revoke=options["revoke"])
        except InvalidRequest as exc:
            raise CommandError(exc.message) from None
        if options["revoke"]:
            self.stderr.write(f"host {issued.host}: key revoked and host disabled; `host_credentials "
                              f"{issued.host} --rotate` issues a new key, the admin API enables it again")
            return
        if options["verbosity"] > 0:
            self.stderr.write(
                f"host {issued.host}: key generation {issued.generation}"
                f"{'' if issued.registered else ' (the host has not joined yet)'}. Put these lines in the "
                "environment of its compute worker (`python -m compute_workers`), with CELERY_BROKER_URL "
                "and REDIS_PASSWORD; keep them secret:")
        self.stdout.write(f"COMPUTE_HOST={issued.host}")
        self.stdout.write(f"COMPUTE_HOST_KEY={issued.key}")
