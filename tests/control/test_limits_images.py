"""Image data that cannot exhaust the service: IMAGE_SIZE_CAP (413), uploads that end however they
end (never ``saving`` forever, never a staging file left), the reaper of stalled uploads, and
``qemu-img`` under resource limits refusing crafted images in bounded time."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from cloudctl.compute import recovery
from cloudctl.images import services
from cloudctl.images.models import Image, ImageStatus
from cloudctl.images.services import ImageDataTooLarge, ImageRejected, image_upload

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024


def new_image(client: APIClient, disk_format: str = "qcow2") -> str:
    response = client.post("/api/v1/images/", {"name": "up", "disk_format": disk_format}, format="json")
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def upload(client: APIClient, image_id: str, data: bytes) -> Any:
    return client.put(f"/api/v1/images/{image_id}/file", data, content_type="application/octet-stream")


def staging_files(settings: Any) -> list[Path]:
    root = Path(settings.IMAGES_PATH)
    return list(root.glob(".upload-*")) if root.exists() else []


def killed_because(image_id: str) -> str:
    image = Image.objects.get(pk=image_id)
    assert image.status == ImageStatus.KILLED, image.status
    return str(image.properties["failure"])


# --- IMAGE_SIZE_CAP --------------------------------------------------------------------------------

def test_an_upload_over_the_cap_is_413_and_the_image_killed(api: APIClient, settings: Any) -> None:
    settings.IMAGE_SIZE_CAP = MiB
    image_id = new_image(api, "raw")
    response = upload(api, image_id, b"\0" * (2 * MiB))
    assert response.status_code == 413
    assert response.json() == {"detail": f"image data is {2 * MiB} bytes; IMAGE_SIZE_CAP is {MiB} bytes",
                               "code": "image_too_large"}
    assert "IMAGE_SIZE_CAP" in killed_because(image_id)
    assert staging_files(settings) == [] and services.image_path(Image.objects.get(pk=image_id)) is None
    at_cap = new_image(api, "raw")
    assert upload(api, at_cap, b"\0" * MiB).status_code == 200  # the cap itself is allowed


class Endless(io.RawIOBase):
    """A body without a length (chunked) that never ends; counts what is read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        assert size is not None and 0 < size <= services.UPLOAD_CHUNK
        self.read_bytes += size
        return b"\0" * size


def test_a_body_without_length_stops_at_the_cap(api: APIClient, settings: Any) -> None:
    settings.IMAGE_SIZE_CAP = 3 * MiB + 5
    image = Image.objects.get(pk=new_image(api, "raw"))
    stream = Endless()
    with pytest.raises(ImageDataTooLarge, match=f"image data is more than {3 * MiB + 5} bytes"):
        image_upload(image=image, stream=stream, expected_size=None)  # type: ignore[arg-type]
    assert stream.read_bytes == 3 * MiB + 6  # the cap and one byte, never more
    assert "IMAGE_SIZE_CAP" in killed_because(str(image.pk)) and staging_files(settings) == []


# --- interrupted uploads ---------------------------------------------------------------------------

class Breaking(io.RawIOBase):
    """Sends ``good`` bytes, then raises ``error`` (the client went away, the worker is told to die)."""

    def __init__(self, good: int, error: BaseException) -> None:
        self.good, self.error = good, error

    def read(self, size: int = -1) -> bytes:
        if self.good <= 0:
            raise self.error
        chunk = b"\0" * min(size, self.good)
        self.good -= len(chunk)
        return chunk


@pytest.mark.parametrize("error", [OSError("client disconnected"), SystemExit(1), KeyboardInterrupt()])
def test_an_interrupted_upload_ends_killed_without_its_staging_file(
        api: APIClient, settings: Any, error: BaseException) -> None:
    image = Image.objects.get(pk=new_image(api, "raw"))
    with pytest.raises(type(error)):
        image_upload(image=image, stream=Breaking(2 * MiB, error),  # type: ignore[arg-type]
                     expected_size=4 * MiB)
    reason = killed_because(str(image.pk))
    assert reason.startswith(f"upload interrupted after {2 * MiB} bytes: {type(error).__name__}")
    assert staging_files(settings) == []


def test_a_short_body_ends_killed_without_its_staging_file(api: APIClient, settings: Any,
                                                           small_qcow2: Path) -> None:
    image = Image.objects.get(pk=new_image(api))
    data = small_qcow2.read_bytes()
    with pytest.raises(ImageRejected, match="upload truncated"):
        image_upload(image=image, stream=io.BytesIO(data[:100]), expected_size=len(data))
    assert "truncated" in killed_because(str(image.pk)) and staging_files(settings) == []


def test_the_reaper_kills_a_stalled_upload_and_removes_its_staging_file(
        api: APIClient, settings: Any) -> None:
    """The web process died mid-upload (SIGKILL): nothing ran its cleanup; the reaper does."""
    settings.IMAGE_SAVING_DEADLINE = 600
    stalled, fresh = (Image.objects.get(pk=new_image(api, "raw")) for _ in range(2))
    Image.objects.filter(pk__in=[stalled.pk, fresh.pk]).update(status=ImageStatus.SAVING)
    Image.objects.filter(pk=stalled.pk).update(updated=timezone.now() - timedelta(seconds=601))
    Image.objects.filter(pk=fresh.pk).update(updated=timezone.now() - timedelta(seconds=300))
    root = Path(settings.IMAGES_PATH)
    root.mkdir(parents=True, exist_ok=True)
    left = root / f".upload-{stalled.pk}-abc123"
    left.write_bytes(b"partial")
    other = root / f".upload-{fresh.pk}-def456"
    other.write_bytes(b"still coming")

    assert recovery.reap_expired_tasks() == 1  # the periodic reaper (conductor.reap_expired_tasks)
    assert killed_because(str(stalled.pk)).startswith("upload stalled: no data for 600 s")
    assert not left.exists() and other.exists()
    assert Image.objects.get(pk=fresh.pk).status == ImageStatus.SAVING
    assert recovery.reap_expired_tasks() == 0


def test_an_upload_that_resumes_after_the_reaper_stops(api: APIClient, settings: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A silent client the reaper gave up on sends again: the upload stops, the image stays killed
    with the reaper's reason."""
    monkeypatch.setattr(services, "UPLOAD_PROGRESS_SECONDS", 0.0)
    image = Image.objects.get(pk=new_image(api, "raw"))

    class Silent(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls == 2:  # while the client is silent, the reaper passes
                Image.objects.filter(pk=image.pk).update(updated=timezone.now() - timedelta(days=1))
                assert services.image_uploads_reap() == 1
            return b"\0" * MiB

    with pytest.raises(ImageRejected, match="the upload was stopped: the image is killed"):
        image_upload(image=image, stream=Silent(), expected_size=8 * MiB)  # type: ignore[arg-type]
    assert killed_because(str(image.pk)).startswith("upload stalled") and staging_files(settings) == []


def test_a_long_upload_that_keeps_receiving_is_not_reaped(api: APIClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "UPLOAD_PROGRESS_SECONDS", 0.0)
    image = Image.objects.get(pk=new_image(api, "raw"))
    seen: list[Any] = []

    class Slow(io.RawIOBase):
        def __init__(self) -> None:
            self.left = 3

        def read(self, size: int = -1) -> bytes:
            seen.append(Image.objects.get(pk=image.pk).updated)
            if not self.left:
                return b""
            self.left -= 1
            return b"\0" * MiB

    done = image_upload(image=image, stream=Slow(), expected_size=3 * MiB)  # type: ignore[arg-type]
    assert done.status == ImageStatus.ACTIVE
    assert seen == sorted(seen) and seen[-1] > seen[0]  # each chunk said so on the record


# --- qemu-img under limits -------------------------------------------------------------------------

def qcow2(tmp_path: Path, name: str, *args: str) -> Path:
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), "64M"], check=True)
    return path


def refused_quickly(api: APIClient, data: bytes, settings: Any) -> tuple[str, str]:
    image_id = new_image(api)
    started = time.monotonic()
    response = upload(api, image_id, data)
    assert time.monotonic() - started < 20
    assert response.status_code == 400, response.content
    assert staging_files(settings) == []
    return response.json()["file"][0], killed_because(image_id)


def test_a_qcow2_declaring_a_huge_l1_table_is_refused(api: APIClient, settings: Any,
                                                      tmp_path: Path) -> None:
    crafted = bytearray(qcow2(tmp_path, "huge-l1.qcow2").read_bytes())
    crafted[36:40] = struct.pack(">I", 0x7FFFFFFF)  # l1_size: 16 GiB of L1 table
    said, reason = refused_quickly(api, bytes(crafted), settings)
    assert said.startswith("not a readable disk image") and "L1" in said and reason == said


def test_a_backing_file_loop_is_refused_without_following_it(api: APIClient, settings: Any,
                                                             tmp_path: Path) -> None:
    loop = qcow2(tmp_path, "loop.qcow2", "-u", "-F", "qcow2", "-b", "loop.qcow2")
    said, _ = refused_quickly(api, loop.read_bytes(), settings)
    assert said == "qcow2 images with a backing file are not accepted"


def test_a_json_pseudo_protocol_backing_file_is_refused(api: APIClient, settings: Any,
                                                        tmp_path: Path) -> None:
    target = json.dumps({"driver": "file", "filename": "/etc/passwd"})
    sneaky = qcow2(tmp_path, "json.qcow2", "-u", "-F", "raw", "-b", f"json:{target}")
    said, reason = refused_quickly(api, sneaky.read_bytes(), settings)
    assert said == "qcow2 images with a backing file are not accepted" and reason == said


@pytest.fixture
def fake_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Put a ``qemu-img`` of the test's on PATH (prlimit executes it by name, under the limits)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def install(script: str) -> None:
        path = bin_dir / "qemu-img"
        path.write_text(script)
        path.chmod(0o755)

    return install


def test_qemu_img_spinning_is_stopped_by_its_cpu_limit(api: APIClient, settings: Any, fake_qemu_img: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "QEMU_IMG_CPU_SECONDS", 1)
    fake_qemu_img("#!/bin/sh\nwhile :; do :; done\n")
    said, reason = refused_quickly(api, b"QFI\xfb" + b"\0" * 4096, settings)
    assert said == "qemu-img info used more than its 1 s of CPU time: refused" and reason == said


def test_qemu_img_growing_is_stopped_by_its_memory_limit(api: APIClient, settings: Any, fake_qemu_img: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A qemu-img that needs 2 GiB to read the header: without the limit it would answer (and the
    image be accepted); within 1 GiB of address space it cannot."""
    fake_qemu_img("#!/usr/bin/env python3\n"
                  "import sys\n"
                  "table = bytearray(2 * 1024 ** 3)\n"
                  "table[::4096] = b'x' * len(table[::4096])\n"
                  "print('{\"format\": \"qcow2\", \"virtual-size\": 1}')\n")
    said, reason = refused_quickly(api, b"QFI\xfb" + b"\0" * 4096, settings)
    assert said.startswith("not a readable disk image") and "MemoryError" in said and reason == said


def test_qemu_img_hanging_is_stopped_by_its_timeout(api: APIClient, settings: Any, fake_qemu_img: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "QEMU_IMG_TIMEOUT", 1.0)
    fake_qemu_img("#!/bin/sh\nexec sleep 60\n")
    said, reason = refused_quickly(api, b"QFI\xfb" + b"\0" * 4096, settings)
    assert said == "qemu-img info did not finish within 1 s: refused" and reason == said


def test_the_limits_are_the_compute_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """One definition for both sides (Nova's 1 GiB, 30 s)."""
    from compute_workers import images as worker_images
    from compute_workers import qemu_img_limits

    assert worker_images.QEMU_IMG_PRLIMIT == qemu_img_limits.prlimit_argv(
        services.QEMU_IMG_ADDRESS_SPACE, services.QEMU_IMG_CPU_SECONDS)
    assert qemu_img_limits.QEMU_IMG_PRLIMIT == ("prlimit", f"--as={1024 ** 3}", "--cpu=30", "--")


@pytest.mark.django_db(transaction=True)
def test_a_client_that_disconnects_mid_upload_leaves_the_image_killed(live_server: Any,
                                                                      settings: Any) -> None:
    """Over a real socket: the client declares 4 MiB, sends 1 MiB and hangs up."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    from cloudctl.identity.models import Project
    from tests.control.conftest import make_user

    project = Project.objects.create(name="sock")
    make_user("uploader", project)
    login = urllib.request.Request(f"{live_server.url}/api/v1/auth/token/", method="POST",
                                   data=json.dumps({"username": "uploader", "password": "pw"}).encode(),
                                   headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(login, timeout=10) as answer:
        token = json.load(answer)["token"]
    image = Image.objects.create(name="cut", disk_format="raw", owner=project)
    address = urlparse(live_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall((f"PUT /api/v1/images/{image.pk}/file HTTP/1.1\r\nHost: {address.netloc}\r\n"
                      f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {4 * MiB}\r\n\r\n").encode() + b"\0" * MiB)
    deadline = time.monotonic() + 30
    while Image.objects.get(pk=image.pk).status in (ImageStatus.QUEUED, ImageStatus.SAVING):
        assert time.monotonic() < deadline, "the upload stayed saving"
        time.sleep(0.1)
    assert killed_because(str(image.pk)).startswith(f"upload truncated: received {MiB} of {4 * MiB} bytes")
    assert staging_files(settings) == []


def test_the_reaper_deadline_cannot_be_shorter_than_an_inspection(tmp_path: Path) -> None:
    """A live upload says it is alive before qemu-img runs, then not until it ends: the smallest
    TASK_DEADLINE_IMAGE_SAVING must outlast both qemu-img calls."""
    import subprocess as sp
    import sys

    env = {**os.environ, "TASK_DEADLINE_IMAGE_SAVING": "179", "CLOUDCTL_STATE_DIR": str(tmp_path),
           "DJANGO_SETTINGS_MODULE": "cloudctl.settings"}
    refused = sp.run([sys.executable, "-c", "import django; django.setup()"], capture_output=True,
                     text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    assert refused.returncode != 0 and "TASK_DEADLINE_IMAGE_SAVING" in refused.stderr
    assert 2 * services.QEMU_IMG_TIMEOUT + services.UPLOAD_PROGRESS_SECONDS < 180
