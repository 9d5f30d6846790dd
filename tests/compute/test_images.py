"""The image cache: downloads once with the service token, and refuses bad images before QEMU sees them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_workers.exception import (
    ImageChecksumMismatch,
    ImageDownloadError,
    ImageFormatError,
    ImageNotFound,
    ImageSizeMismatch,
    ImageTooLarge,
    ImageURLRefused,
)
from compute_workers.images import ImageCache, create_overlay, qemu_img_info

from .conftest import TOKEN, ImageServer, image_api_url, qemu_img


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    return ImageCache(tmp_path / "_base", token=TOKEN, timeout=30, api_url=image_api_url())


def test_fetch_downloads_verifies_and_caches(cache: ImageCache, image_server: ImageServer,
                                             small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2)
    first = cache.fetch(image)
    assert first.path == cache.base_dir / "tiny"
    assert first.path.read_bytes() == small_qcow2
    assert first.downloaded_bytes == len(small_qcow2)
    assert first.path.stat().st_mode & 0o777 == 0o644
    second = cache.fetch(image)
    assert second.path == first.path and second.downloaded_bytes == 0
    assert image_server.requests == ["/images/tiny"]
    assert sorted(p.name for p in cache.base_dir.iterdir()) == [".tiny.lock", "tiny"]


def test_concurrent_fetches_download_once(cache: ImageCache, image_server: ImageServer,
                                          small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch(image).path)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [cache.base_dir / "tiny"] * 8
    assert image_server.requests == ["/images/tiny"]


def test_concurrent_fetches_from_two_processes_download_once(tmp_path: Path, image_server: ImageServer,
                                                             small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2)
    script = ("import sys, json; from pathlib import Path; from compute_workers.images import ImageCache; "
              f"print(ImageCache(Path(sys.argv[1]), token={TOKEN!r}, timeout=30, api_url={image_api_url()!r})"
              ".fetch(json.loads(sys.argv[2])).downloaded_bytes)")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "_base"), json.dumps(image)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(3)]
    downloaded = sorted(int(p.communicate(timeout=60)[0]) for p in processes)
    assert downloaded == [0, 0, len(small_qcow2)]
    assert image_server.requests == ["/images/tiny"]


def test_checksum_mismatch_is_refused_and_not_cached(cache: ImageCache, image_server: ImageServer,
                                                     small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2, sha256="ab" * 32)
    with pytest.raises(ImageChecksumMismatch) as error:
        cache.fetch(image)
    assert str(error.value).startswith(f"Image tiny checksum mismatch: expected sha256 {'ab' * 32}, got ")
    assert not error.value.reschedule
    assert [p.name for p in cache.base_dir.iterdir()] == [".tiny.lock"]  # no partial file left


def test_size_mismatch_is_refused(cache: ImageCache, image_server: ImageServer, small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2, size=1000)
    with pytest.raises(ImageSizeMismatch):
        cache.fetch(image)
    assert not (cache.base_dir / "tiny").exists()


def test_declared_format_must_match_the_content(cache: ImageCache, image_server: ImageServer,
                                                small_qcow2: bytes) -> None:
    # qcow2 bytes declared raw: QEMU would open them raw, the guest could write a qcow2 header...
    image = image_server.add("liar", small_qcow2, disk_format="raw")
    with pytest.raises(ImageFormatError, match="declared raw but its content is qcow2"):
        cache.fetch(image)
    assert not (cache.base_dir / "liar").exists()


def test_raw_image_is_accepted_as_raw(cache: ImageCache, image_server: ImageServer) -> None:
    image = image_server.add("rawdisk", b"\0" * 65536, disk_format="raw")
    assert cache.fetch(image).path.read_bytes() == b"\0" * 65536


def test_image_with_a_backing_file_is_refused(cache: ImageCache, image_server: ImageServer,
                                              tmp_path: Path) -> None:
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", str(evil), "1M")
    image = image_server.add("evil", evil.read_bytes())
    with pytest.raises(ImageFormatError, match="has a backing file"):
        cache.fetch(image)
    assert not (cache.base_dir / "evil").exists()


def test_image_with_an_external_data_file_is_refused(cache: ImageCache, image_server: ImageServer,
                                                     tmp_path: Path) -> None:
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data'}", str(evil), "1M")
    image = image_server.add("evil", evil.read_bytes())
    with pytest.raises(ImageFormatError, match="external data file"):
        cache.fetch(image)


def test_the_service_token_is_sent(tmp_path: Path, image_server: ImageServer, small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2)
    with pytest.raises(ImageDownloadError, match="HTTP 401") as error:
        ImageCache(tmp_path / "_base", token="wrong", timeout=30, api_url=image_api_url()).fetch(image)
    assert error.value.reschedule


def test_a_missing_token_is_a_clear_error(tmp_path: Path, image_server: ImageServer,
                                          small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2)
    with pytest.raises(ImageDownloadError, match="CLOUDCTL_SERVICE_TOKEN is not set"):
        ImageCache(tmp_path / "_base", token="", timeout=30, api_url=image_api_url()).fetch(image)
    assert image_server.requests == []


def test_missing_image_is_not_rescheduled(cache: ImageCache, image_server: ImageServer) -> None:
    image = image_server.add("gone", b"")
    del image_server.files["gone"]
    with pytest.raises(ImageNotFound) as error:
        cache.fetch(image)
    assert not error.value.reschedule


def test_unreachable_image_api_is_rescheduled(tmp_path: Path, small_qcow2: bytes) -> None:
    cache = ImageCache(tmp_path / "_base", token=TOKEN, timeout=30, api_url="http://127.0.0.1:9")
    image = {"id": "tiny", "name": "tiny", "url": "http://127.0.0.1:9/images/tiny", "sha256": "0" * 64,
             "size": None, "disk_format": "qcow2"}
    with pytest.raises(ImageDownloadError, match="cannot download image tiny") as error:
        cache.fetch(image)
    assert error.value.reschedule


@pytest.fixture
def listener() -> Iterator[tuple[str, list[object]]]:
    """A TCP port on 127.0.0.1 that records every connection made to it: (base URL, connections)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(connection)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("where", ["{other}/images/tiny", "{api}.evil.example/images/tiny",
                                   "https://{api_host}/images/tiny", "{api_scheme}://user@{api_host}/images/tiny",
                                   "file:///etc/passwd", "{api}/../images/tiny"])
def test_an_image_url_outside_the_api_gets_no_request_and_no_token(
        tmp_path: Path, image_server: ImageServer, small_qcow2: bytes,
        listener: tuple[str, list[object]], where: str) -> None:
    """The service token goes to the configured API URL only: an image URL from a message pointing
    anywhere else (another port, another host, another scheme, credentials, a path escaping the
    prefix) fails at once with the reason, no connection made."""
    other, connections = listener
    api = image_api_url()
    url = where.format(other=other, api=api, api_host=api.split("//")[1], api_scheme="http")
    image = {**image_server.add("tiny", small_qcow2), "url": url}
    cache = ImageCache(tmp_path / "_base", token=TOKEN, timeout=30, api_url=api)
    with pytest.raises(ImageURLRefused, match=r"is not under the configured API URL") as error:
        cache.fetch(image)
    assert not error.value.reschedule, "every host refuses it: no point rescheduling"
    assert connections == [] and image_server.requests == []
    assert not (cache.base_dir / "tiny").exists()


def test_an_api_url_with_a_path_prefix_admits_only_urls_below_it(tmp_path: Path, image_server: ImageServer,
                                                                  small_qcow2: bytes) -> None:
    image = image_server.add("tiny", small_qcow2)
    below = ImageCache(tmp_path / "a", token=TOKEN, timeout=30, api_url=f"{image_api_url()}/images/")
    assert below.fetch(image).downloaded_bytes == len(small_qcow2)
    beside = ImageCache(tmp_path / "b", token=TOKEN, timeout=30, api_url=f"{image_api_url()}/img")
    with pytest.raises(ImageURLRefused):
        beside.fetch(image)
    assert image_server.requests == ["/images/tiny"]


@pytest.mark.parametrize("image_id", ["../etc", ".hidden", "a/b", ""])
def test_image_ids_that_are_not_file_names_are_refused(cache: ImageCache, image_id: str) -> None:
    with pytest.raises(Exception, match="invalid image id"):
        cache.path(image_id)


def test_overlay_is_a_qcow2_on_the_base(tmp_path: Path, small_qcow2: bytes) -> None:
    base = tmp_path / "base"
    base.write_bytes(small_qcow2)
    create_overlay(base, "qcow2", tmp_path / "disk", 1, "tiny")
    info = qemu_img_info(tmp_path / "disk")
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 1024 ** 3


def test_overlay_refuses_an_image_larger_than_the_root_disk(tmp_path: Path) -> None:
    base = tmp_path / "base"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "3G")
    message = r"Image big virtual size 3\.00 GiB exceeds flavor root disk 2 GiB"
    with pytest.raises(ImageTooLarge, match=message):
        create_overlay(base, "qcow2", tmp_path / "disk", 2, "big")
    assert not (tmp_path / "disk").exists()


def test_overlay_of_a_zero_root_disk_takes_the_image_size(tmp_path: Path, small_qcow2: bytes) -> None:
    base = tmp_path / "base"
    base.write_bytes(small_qcow2)
    create_overlay(base, "qcow2", tmp_path / "disk", 0, "tiny")
    assert qemu_img_info(tmp_path / "disk")["virtual-size"] == 16 * 1024 ** 2
