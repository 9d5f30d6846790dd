"""JSON bodies are bounded (API_MAX_BODY_BYTES, 413 above it) whatever the headers say; image data
has its own endpoint and cap."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.test import RequestFactory
from rest_framework.test import APIClient

from cloudctl.api import BoundedJSONParser, RequestBodyTooLarge
from cloudctl.images.models import Image

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024


def json_of_size(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes."""
    frame = json.dumps({"name": "x", "padding": ""}).encode()
    body = json.dumps({"name": "x", "padding": "p" * (size - len(frame))}).encode()
    assert len(body) == size
    return body


def test_a_json_body_over_one_mib_is_413_before_it_is_read(api: APIClient) -> None:
    body = json_of_size(2 * MiB)
    response = api.post("/api/v1/servers/", body, content_type="application/json")
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body is {2 * MiB} bytes; the limit is 1048576"}
    # Any endpoint that parses JSON: a network, a port, an image record.
    for path in ("/api/v1/networks/", "/api/v1/images/", "/api/v1/security-groups/"):
        assert api.post(path, body, content_type="application/json").status_code == 413, path


def test_a_body_at_the_limit_is_parsed(api: APIClient) -> None:
    response = api.post("/api/v1/servers/", json_of_size(MiB), content_type="application/json")
    assert response.status_code == 400  # parsed, then refused for its content
    assert "padding" not in response.json() and "flavor" in response.json()


def test_the_limit_is_a_setting(api: APIClient, settings: Any) -> None:
    settings.API_MAX_BODY_BYTES = 4096
    response = api.post("/api/v1/networks/", json_of_size(5000), content_type="application/json")
    assert response.status_code == 413 and response.json()["detail"].endswith("the limit is 4096")


class CountingStream(io.RawIOBase):
    """An endless body (a chunked request without Content-Length), counting what is read of it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        assert size is not None and size >= 0, "the parser must never read an unbounded body"
        self.read_bytes += size
        return b" " * size


@pytest.mark.parametrize("declared", [None, "10"])
def test_a_body_without_or_below_its_content_length_is_read_to_the_limit_only(declared: str | None) -> None:
    """No Content-Length (chunked), or one that lies: at most limit + 1 bytes are read, then 413."""
    request = RequestFactory().post("/api/v1/servers/", content_type="application/json")
    request.META.pop("CONTENT_LENGTH", None)
    if declared is not None:
        request.META["CONTENT_LENGTH"] = declared
    stream = CountingStream()
    with pytest.raises(RequestBodyTooLarge, match="more than 1048576 bytes; the limit is 1048576"):
        BoundedJSONParser().parse(stream, "application/json", {"request": request})
    assert stream.read_bytes == MiB + 1


def test_a_small_body_parses_as_before() -> None:
    request = RequestFactory().post("/api/v1/servers/", content_type="application/json")
    parsed = BoundedJSONParser().parse(io.BytesIO(b'{"a": [1, 2]}'), "application/json",
                                       {"request": request})
    assert parsed == {"a": [1, 2]}


def test_image_data_is_not_a_json_body(api: APIClient) -> None:
    """Raw image bytes over API_MAX_BODY_BYTES go to the upload endpoint, which streams them."""
    created = api.post("/api/v1/images/", {"name": "big-raw", "disk_format": "raw"}, format="json")
    data = b"\0" * (3 * MiB)
    uploaded = api.put(f"/api/v1/images/{created.json()['id']}/file", data,
                       content_type="application/octet-stream")
    assert uploaded.status_code == 200, uploaded.content
    assert uploaded.json()["status"] == "active" and uploaded.json()["size"] == 3 * MiB


@pytest.mark.parametrize("body", [
    {"name": "a\u0000b"},
    {"name": "n", "properties": {"k": "v\u0000"}},
    {"name": "n", "properties": {"k\u0000": "v"}},
    {"name": "n", "tags": [["deep", "x\u0000"]]},
])
def test_a_nul_character_anywhere_in_a_json_string_is_400(api: APIClient, body: Any) -> None:
    """PostgreSQL cannot store NUL in text or jsonb: refused at parsing, for every field, not a 500."""
    response = api.post("/api/v1/images/", json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"detail": "JSON strings may not contain the NUL character (\\u0000)"}
    assert not Image.objects.filter(name__startswith="n").exists()


def test_an_id_or_name_field_refuses_nul_for_callers_that_bypass_the_json_parser() -> None:
    from rest_framework.exceptions import ValidationError

    from cloudctl.api import IdOrNameField

    with pytest.raises(ValidationError):
        IdOrNameField().run_validation("sub\x00net")
    assert IdOrNameField().run_validation("subnet") == "subnet"
