"""Prepare a fresh installation: admin user, admin project, default flavors, the demo image and
(``--demo-network``, as ``make run`` asks) the demo networks: ``public``, ``private``, ``router1``.

Safe to run again: everything that exists is kept.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from cloudctl.compute.services import flavors_seed
from cloudctl.identity.models import Project
from cloudctl.identity.services import membership_set
from cloudctl.images.services import image_import
from cloudctl.network.demo import demo_networks_seed


class Command(BaseCommand):
    help = "Create the admin user and project, default flavors and (optionally) the demo image."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--image", type=Path, help="qcow2 file to register as image 'tiny'")
        parser.add_argument("--image-name", default="tiny")
        parser.add_argument("--demo-network", action="store_true",
                            help="the external network 'public' (172.24.4.0/24), the admin project's "
                                 "'private' (10.0.0.0/24, DHCP) and 'router1' joining them")

    def handle(self, *args: Any, **options: Any) -> None:
        username = os.environ.get("CLOUDCTL_ADMIN_USER") or "admin"
        password = os.environ.get("CLOUDCTL_ADMIN_PASSWORD") or ""
        with transaction.atomic():
            project, _ = Project.objects.get_or_create(
                name="admin", defaults={"description": "the operators' project"})
            user_model = get_user_model()
            user = user_model.objects.filter(username=username).first()
            if user is None:
                generated = not password
                password = password or secrets.token_urlsafe(12)
                user = user_model.objects.create_superuser(username=username, password=password,
                                                           email="")
                shown = password if generated else "(from CLOUDCTL_ADMIN_PASSWORD)"
                self.stdout.write(f"created admin user {username!r}, password: {shown}")
                if generated:
                    self.stdout.write("  (generated: shown this once; set CLOUDCTL_ADMIN_PASSWORD "
                                      "to choose it)")
            elif password and not user.check_password(password):
                user.set_password(password)
                user.save(update_fields=["password"])
                self.stdout.write(f"admin user {username!r}: password set from "
                                  "CLOUDCTL_ADMIN_PASSWORD")
            membership_set(user=user, project=project)
            flavors = flavors_seed()
        self.stdout.write(f"flavors: {', '.join(f.name for f in flavors)}")
        if options["demo_network"]:
            demo = demo_networks_seed(user=user, project=project)
            self.stdout.write(f"demo networks: {', '.join(demo.created) or 'all there already'} "
                              f"({demo.public.name}, {demo.private.name}, {demo.router.name})")
        if options["image"]:
            image = image_import(name=options["image_name"], source=options["image"],
                                 disk_format="qcow2", min_ram=128,
                                 properties={"architecture": "x86_64", "os_distro": "busybox"})
            self.stdout.write(f"image {image.name}: {image.id} ({image.size} bytes, "
                              f"sha256 {image.sha256[:12]}...)")
