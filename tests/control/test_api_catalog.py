"""Flavors, images, hosts: who may read and change what."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from cloudctl.compute.models import Flavor
from cloudctl.images.models import Visibility
from cloudctl.images.services import ImageRejected, image_import
from tests.control.conftest import heartbeat

pytestmark = pytest.mark.django_db


def test_flavors_are_readable_and_admin_managed(api, admin_api, flavors):
    listed = api.get("/api/v1/flavors/").json()
    assert [f["name"] for f in listed][:2] == ["m1.nano", "m1.tiny"]
    nano = api.get(f"/api/v1/flavors/{flavors['m1.nano'].pk}/").json()
    assert (nano["vcpus"], nano["memory_mb"], nano["root_gb"]) == (1, 128, 1)

    body = {"name": "c1.big", "vcpus": 2, "memory_mb": 1024, "root_gb": 5}
    assert api.post("/api/v1/flavors/", body, format="json").status_code == 403
    created = admin_api.post("/api/v1/flavors/", body, format="json")
    assert created.status_code == 201, created.content
    duplicate = admin_api.post("/api/v1/flavors/", body, format="json")
    assert duplicate.status_code == 400 and "already exists" in duplicate.json()["name"][0]
    bad = admin_api.post("/api/v1/flavors/", {**body, "name": "x", "vcpus": 0}, format="json")
    assert bad.status_code == 400 and "vcpus" in bad.json()
    flavor_id = created.json()["id"]
    assert api.delete(f"/api/v1/flavors/{flavor_id}/").status_code == 403
    assert admin_api.delete(f"/api/v1/flavors/{flavor_id}/").status_code == 204
    assert not Flavor.objects.filter(pk=flavor_id).exists()


def test_a_flavor_in_use_is_disabled_not_deleted(api, admin_api, flavors, image):
    api.post("/api/v1/servers/", {"name": "a", "flavor": "m1.nano", "image": "tiny"},
             format="json")
    nano = flavors["m1.nano"]
    assert admin_api.delete(f"/api/v1/flavors/{nano.pk}/").status_code == 204
    nano.refresh_from_db()
    assert nano.disabled
    assert "m1.nano" not in [f["name"] for f in api.get("/api/v1/flavors/").json()]


def test_image_download_for_users_and_compute_workers(api, image, small_qcow2):
    listed = api.get("/api/v1/images/").json()
    assert [i["name"] for i in listed] == ["tiny"]
    assert listed[0]["status"] == "active" and len(listed[0]["sha256"]) == 64
    data = b"".join(api.get(f"/api/v1/images/{image.id}/file").streaming_content)
    assert data == small_qcow2.read_bytes()

    service = APIClient()
    service.credentials(HTTP_AUTHORIZATION="Token service-secret")
    response = service.get(f"/api/v1/images/{image.id}/file")
    assert response.status_code == 200
    assert response["X-Image-Sha256"] == image.sha256
    assert int(response["Content-Length"]) == small_qcow2.stat().st_size
    # The service credential downloads images and does nothing else.
    assert service.get("/api/v1/images/").status_code == 403
    assert service.get(f"/api/v1/images/{image.id}/").status_code == 403
    assert service.get("/api/v1/servers/").status_code == 403
    assert service.post("/api/v1/servers/", {}, format="json").status_code == 403
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Token not-the-secret")
    assert wrong.get(f"/api/v1/images/{image.id}/file").status_code == 401


def test_private_images_stay_in_their_project(api, other_project, small_qcow2):
    private = image_import(name="secret", source=small_qcow2, disk_format="qcow2",
                           visibility=Visibility.PRIVATE, owner=other_project)
    assert api.get(f"/api/v1/images/{private.id}/").status_code == 404
    assert api.get(f"/api/v1/images/{private.id}/file").status_code == 404
    refused = api.post("/api/v1/servers/", {"name": "a", "flavor": "m1.nano",
                                            "image": str(private.id)}, format="json")
    assert refused.status_code == 400 and "image" in refused.json()


def test_image_import_rejects_lies_and_backing_files(db, tmp_path, small_qcow2):
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(ImageRejected, match="declared disk_format qcow2 but the data is raw"):
        image_import(name="liar", source=raw, disk_format="qcow2")
    import subprocess

    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd",
                    str(backed)], check=True)
    with pytest.raises(ImageRejected, match="backing file"):
        image_import(name="sneaky", source=backed, disk_format="qcow2")
    assert image_import(name="ok", source=small_qcow2, disk_format="qcow2").status == "active"


def test_hosts_are_for_admins(api, admin_api):
    heartbeat("hv1", vcpus=8, memory_mb=16384, disk_gb=200)
    assert api.get("/api/v1/hosts/").status_code == 403
    [host] = admin_api.get("/api/v1/hosts/").json()
    assert host["name"] == "hv1" and host["state"] == "up"
    assert (host["vcpus"], host["memory_mb"], host["disk_gb"], host["vcpus_used"],
            host["instance_count"]) == (8, 16384, 200, 0, 0)
    assert host["hypervisor_type"] == "QEMU" and host["availability_zone"] == "nova"
    assert admin_api.get("/api/v1/hosts/hv1/").json()["name"] == "hv1"
