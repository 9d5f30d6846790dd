"""The image service: create, streamed upload with inspection, ranged download, visibility."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from cloudctl.images.models import Image

pytestmark = pytest.mark.django_db


def new_image(client: APIClient, **body) -> dict:
    response = client.post("/api/v1/images/", {"name": "up", "disk_format": "qcow2", **body},
                           format="json")
    assert response.status_code == 201, response.content
    return response.json()


def upload(client: APIClient, image_id: str, data: bytes, **extra):
    return client.put(f"/api/v1/images/{image_id}/file", data,
                      content_type="application/octet-stream", **extra)


def test_upload_download_round_trip(api, small_qcow2: Path):
    created = new_image(api, properties={"architecture": "x86_64"})
    assert (created["status"], created["visibility"], created["owner"]) == ("queued", "private",
                                                                           "blue")
    data = small_qcow2.read_bytes()
    uploaded = upload(api, created["id"], data)
    assert uploaded.status_code == 200, uploaded.content
    body = uploaded.json()
    assert body["status"] == "active" and body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["virtual_size"] == 64 * 1024 * 1024
    download = api.get(f"/api/v1/images/{created['id']}/file")
    assert b"".join(download.streaming_content) == data
    assert download["X-Image-Sha256"] == body["sha256"]
    again = upload(api, created["id"], data)
    assert again.status_code == 409 and again.json()["status"] == "active"


def test_ranged_download(api, small_qcow2: Path):
    image_id = new_image(api)["id"]
    data = small_qcow2.read_bytes()
    upload(api, image_id, data)
    part = api.get(f"/api/v1/images/{image_id}/file", HTTP_RANGE="bytes=4-15")
    assert part.status_code == 206
    assert part["Content-Range"] == f"bytes 4-15/{len(data)}"
    assert b"".join(part.streaming_content) == data[4:16]
    tail = api.get(f"/api/v1/images/{image_id}/file", HTTP_RANGE="bytes=-10")
    assert b"".join(tail.streaming_content) == data[-10:]
    beyond = api.get(f"/api/v1/images/{image_id}/file", HTTP_RANGE=f"bytes={len(data)}-")
    assert beyond.status_code == 416 and beyond["Content-Range"] == f"bytes */{len(data)}"


def test_backing_file_qcow2_is_rejected_and_killed(api, tmp_path: Path):
    sneaky = tmp_path / "sneaky.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow",
                    str(sneaky)], check=True)
    image_id = new_image(api)["id"]
    response = upload(api, image_id, sneaky.read_bytes())
    assert response.status_code == 400
    assert "backing file" in response.json()["file"][0]
    image = Image.objects.get(pk=image_id)
    assert image.status == "killed" and "backing file" in image.properties["failure"]
    assert api.get(f"/api/v1/images/{image_id}/file").status_code == 404


def test_a_file_that_is_not_what_it_claims_is_rejected(api, small_qcow2: Path):
    raw_id = new_image(api, disk_format="raw")["id"]
    response = upload(api, raw_id, small_qcow2.read_bytes())
    assert response.status_code == 400
    assert response.json()["file"][0] == "declared disk_format raw but the data is qcow2"
    garbage_id = new_image(api)["id"]
    garbage = upload(api, garbage_id, b"this is not a disk image at all" * 100)
    assert garbage.status_code == 400 and Image.objects.get(pk=garbage_id).status == "killed"


def test_a_truncated_upload_is_rejected(api, small_qcow2: Path):
    """A client that stops sending before Content-Length: the server's stream ends early."""
    import io

    from cloudctl.images.services import ImageRejected, image_upload

    image = Image.objects.get(pk=new_image(api)["id"])
    data = small_qcow2.read_bytes()
    with pytest.raises(ImageRejected, match=f"upload truncated: received {len(data) // 2} of "
                                            f"{len(data)} bytes"):
        image_upload(image=image, stream=io.BytesIO(data[: len(data) // 2]),
                     expected_size=len(data))
    assert Image.objects.get(pk=image.pk).status == "killed"


def test_visibility_and_ownership(api, admin_api, other_project, small_qcow2: Path):
    from tests.control.conftest import client_for, make_user

    public = api.post("/api/v1/images/", {"name": "p", "disk_format": "qcow2",
                                          "visibility": "public"}, format="json")
    assert public.status_code == 400 and "administrators" in public.json()["visibility"][0]
    mine = new_image(api)
    stranger = client_for(make_user("bob", other_project))
    assert stranger.get(f"/api/v1/images/{mine['id']}/").status_code == 404
    assert upload(stranger, mine["id"], small_qcow2.read_bytes()).status_code == 404
    assert stranger.delete(f"/api/v1/images/{mine['id']}/").status_code == 404
    assert admin_api.post("/api/v1/images/", {"name": "p", "disk_format": "qcow2",
                                              "visibility": "public"},
                          format="json").status_code == 201
    assert api.delete(f"/api/v1/images/{mine['id']}/").status_code == 204
    assert api.get(f"/api/v1/images/{mine['id']}/").status_code == 404
    assert Image.objects.get(pk=mine["id"]).status == "deleted"


def test_compute_workers_may_upload_but_not_list(api, small_qcow2: Path):
    image_id = new_image(api)["id"]
    service = APIClient()
    service.credentials(HTTP_AUTHORIZATION="Token service-secret")
    assert service.get("/api/v1/images/").status_code == 403
    assert upload(service, image_id, small_qcow2.read_bytes()).status_code == 200


def test_min_ram_and_min_disk_fit_the_database(api):
    """Beyond 2**31 - 1 (the column's range on PostgreSQL) a 400 naming the field, not a 500."""
    for field in ("min_ram", "min_disk"):
        answer = api.post("/api/v1/images/", {"name": "big", "disk_format": "qcow2", field: 2**31},
                          format="json")
        assert answer.status_code == 400 and field in answer.json()
    fits = api.post("/api/v1/images/", {"name": "big", "disk_format": "qcow2", "min_ram": 2**31 - 1},
                    format="json")
    assert fits.status_code == 201 and fits.json()["min_ram"] == 2**31 - 1
