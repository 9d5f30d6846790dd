"""Images that servers boot from. Bytes live under IMAGES_PATH/<id>; the row is the record."""

from __future__ import annotations

import uuid

from django.db import models

from cloudctl.identity.models import Project


class ImageStatus(models.TextChoices):
    QUEUED = "queued"
    SAVING = "saving"
    ACTIVE = "active"
    KILLED = "killed"
    DELETED = "deleted"


class DiskFormat(models.TextChoices):
    QCOW2 = "qcow2"
    RAW = "raw"


class Visibility(models.TextChoices):
    PUBLIC = "public"
    PRIVATE = "private"


class Image(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    status = models.CharField(max_length=16, choices=ImageStatus.choices, default=ImageStatus.QUEUED)
    disk_format = models.CharField(max_length=16, choices=DiskFormat.choices)
    container_format = models.CharField(max_length=16, default="bare")
    size = models.BigIntegerField(null=True, blank=True)
    virtual_size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    min_ram = models.PositiveIntegerField(default=0, help_text="MiB")
    min_disk = models.PositiveIntegerField(default=0, help_text="GiB")
    visibility = models.CharField(max_length=16, choices=Visibility.choices,
                                  default=Visibility.PRIVATE)
    owner = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="images")
    properties = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("name", "created")

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"
