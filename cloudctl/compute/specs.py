"""The spawn spec: everything a compute worker needs to build (or rebuild) an instance."""

from __future__ import annotations

from django.conf import settings

from cloudctl.compute.models import Flavor, Instance, InstanceAction
from cloudctl.compute.ports import network_specs
from compute_workers import contract


def spawn_spec(instance: Instance, host_name: str, flavor: Flavor | None = None) -> contract.SpawnSpec:
    """The self-contained, versioned spec a compute worker builds the instance from; ``flavor``
    instead of the instance's own (a resize defines the domain with the new flavor on the
    destination, a revert with the old one)."""
    image = instance.image
    if image is None:
        raise ValueError(f"instance {instance.uuid} has no image")
    action = (InstanceAction.objects.filter(instance=instance, finish_time__isnull=True)
              .order_by("-start_time", "-id").first())
    return contract.validate_spec({
        "version": contract.SPEC_VERSION,
        "instance_uuid": str(instance.uuid),
        "name": instance.name,
        "host": host_name,
        "request_id": action.request_id if action else "",
        "flavor": ({"name": instance.flavor.name, "vcpus": instance.vcpus,
                    "memory_mb": instance.memory_mb, "root_gb": instance.root_gb} if flavor is None else
                   {"name": flavor.name, "vcpus": flavor.vcpus, "memory_mb": flavor.memory_mb,
                    "root_gb": flavor.root_gb}),
        "image": {"id": str(image.id), "name": image.name,
                  "url": f"{settings.CLOUDCTL_API_URL}/api/v1/images/{image.id}/file",
                  "sha256": image.sha256, "size": image.size or 0,
                  "disk_format": image.disk_format, "properties": dict(image.properties)},
        "networks": network_specs(instance.uuid),
        "key_data": None,
        "user_data": None,
    })
