"""Prepare a fresh installation: admin user (the ``admin`` role in the ``admin`` project), default
flavors, the demo image, (``--demo-user``, as ``make run`` asks) a ``demo`` user with the ``member``
role in a ``demo`` project, and (``--demo-network``) the demo networks: ``public``, ``private``,
``router1``.

Safe to run again: everything that exists is kept.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from cloudctl.compute.services import flavors_seed
from cloudctl.identity.models import Project, Role
from cloudctl.identity.services import role_assign
from cloudctl.images.services import image_import
from cloudctl.network.demo import demo_networks_seed


class Command(BaseCommand):
    help = "Create the admin user and project, default flavors and (optionally) the demo image."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--image", type=Path, help="qcow2 file to register as image 'tiny'")
        parser.add_argument("--image-name", default="tiny")
        parser.add_argument("--demo-user", action="store_true",
                            help="a user 'demo' with the member role in a project 'demo' (password: "
                                 "CLOUDCTL_DEMO_PASSWORD, else generated and shown once)")
        parser.add_argument("--demo-network", action="store_true",
                            help="the external network 'public' (172.24.4.0/24), 'private' "
                                 "(10.0.0.0/24, DHCP) and 'router1' joining them; private and router1 "
                                 "belong to the demo project with --demo-user, else to admin")

    def handle(self, *args: Any, **options: Any) -> None:
        username = os.environ.get("CLOUDCTL_ADMIN_USER") or "admin"
        with transaction.atomic():
            project, _ = Project.objects.get_or_create(
                name="admin", defaults={"description": "the operators' project"})
            user = self._user(username, os.environ.get("CLOUDCTL_ADMIN_PASSWORD") or "",
                              "CLOUDCTL_ADMIN_PASSWORD", superuser=True)
            role_assign(user=user, project=project, role=Role.ADMIN)
            demo_project = None
            if options["demo_user"]:
                demo_project, _ = Project.objects.get_or_create(
                    name="demo", defaults={"description": "the demo user's project"})
                demo_user = self._user("demo", os.environ.get("CLOUDCTL_DEMO_PASSWORD") or "",
                                  "CLOUDCTL_DEMO_PASSWORD", superuser=False)
                role_assign(user=demo_user, project=demo_project, role=Role.MEMBER)
            flavors = flavors_seed()
        self.stdout.write(f"flavors: {', '.join(f.name for f in flavors)}")
        if options["demo_network"]:
            demo = demo_networks_seed(user=user, project=project, tenant_project=demo_project)
            self.stdout.write(f"demo networks: {', '.join(demo.created) or 'all there already'} "
                              f"({demo.public.name}, {demo.private.name}, {demo.router.name})")
        if options["image"]:
            image = image_import(name=options["image_name"], source=options["image"],
                                 disk_format="qcow2", min_ram=128,
                                 properties={"architecture": "x86_64", "os_distro": "busybox"})
            self.stdout.write(f"image {image.name}: {image.id} ({image.size} bytes, "
                              f"sha256 {image.sha256[:12]}...)")

    def _user(self, username: str, password: str, variable: str, *, superuser: bool) -> Any:
        """The user ``username``, created when missing (with ``password``, else a generated one shown
        once); an existing user gets ``password`` when it is set and differs. A chosen password
        passes the password validators (AUTH_PASSWORD_VALIDATORS) or the command stops."""
        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        if password:
            try:
                validate_password(password, user=user or user_model(username=username))
            except ValidationError as exc:
                raise CommandError(f"{variable}: {' '.join(exc.messages)}") from None
        if user is None:
            generated = not password
            password = password or secrets.token_urlsafe(12)
            if superuser:
                user = user_model.objects.create_superuser(username=username, password=password,
                                                           email="")
            else:
                user = user_model.objects.create_user(username=username, password=password)
            shown = password if generated else f"(from {variable})"
            self.stdout.write(f"created user {username!r}, password: {shown}")
            if generated:
                self.stdout.write(f"  (generated: shown this once; set {variable} to choose it)")
        elif password and not user.check_password(password):
            user.set_password(password)
            user.save(update_fields=["password"])
            self.stdout.write(f"user {username!r}: password set from {variable}")
        return user
