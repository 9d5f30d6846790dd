"""Every refusal a request can meet is a CloudctlError that renders its own answer: the API's
exception handler has one branch, and each body below is the one the API has always given."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from cloudctl.api import exception_handler
from cloudctl.compute.errors import (
    ComputeUnavailable,
    HostUnavailable,
    InvalidRequest,
    MigrationInvalidState,
    ServerConsoleUnavailable,
    ServerInvalidState,
)
from cloudctl.compute.models import Instance, Migration
from cloudctl.errors import CloudctlError
from cloudctl.images.models import Image
from cloudctl.images.services import ImageConflict, ImageDataTooLarge, ImageRejected

SERVER = Instance(uuid=uuid.UUID(int=7), vm_state="active", task_state="migrating")
SERVER_STATE = {"status": "MIGRATING", "vm_state": "active", "task_state": "migrating"}


@pytest.mark.parametrize(("error", "status_code", "body"), [
    (ServerInvalidState(SERVER, "live-migration"), 409,
     {"detail": f"cannot live-migrate server {SERVER.uuid} while vm_state=active task_state=migrating",
      "code": "conflict", **SERVER_STATE}),
    (HostUnavailable(SERVER, "its host is down"), 409,
     {"detail": "its host is down", "code": "host_unavailable", **SERVER_STATE}),
    (MigrationInvalidState(Migration(status="completed"), "it is over"), 409,
     {"detail": "it is over", "code": "conflict", "status": "completed"}),
    (ServerConsoleUnavailable("not on a host"), 409, {"detail": "not on a host", "code": "conflict"}),
    (InvalidRequest("flavor", "too small"), 400, {"flavor": ["too small"]}),
    (ImageConflict(Image(status="active"), "already uploaded"), 409,
     {"detail": "already uploaded", "code": "conflict", "status": "active"}),
    (ImageRejected("upload is empty"), 400, {"file": ["upload is empty"]}),
    (ImageDataTooLarge("image data is 3 bytes; IMAGE_SIZE_CAP is 2 bytes"), 413,
     {"detail": "image data is 3 bytes; IMAGE_SIZE_CAP is 2 bytes", "code": "image_too_large"}),
    (ComputeUnavailable("no answer"), 503, {"detail": "no answer", "code": "compute_unavailable"}),
])
def test_each_error_answers_as_it_always_did(error: CloudctlError, status_code: int,
                                             body: dict[str, Any]) -> None:
    assert isinstance(error, CloudctlError)
    response = exception_handler(error, {})
    assert response is not None
    assert (response.status_code, response.data) == (status_code, body)
    assert list(response.data) == list(body)  # the keys in the same order too


def test_no_error_class_shares_a_name_with_a_compute_worker_exception() -> None:
    import inspect

    import cloudctl.compute.errors
    import cloudctl.errors
    import cloudctl.images.services
    import compute_workers.exception

    def errors(module: Any) -> set[str]:
        return {name for name, value in vars(module).items()
                if inspect.isclass(value) and issubclass(value, Exception)
                and value.__module__ == module.__name__}

    control = errors(cloudctl.errors) | errors(cloudctl.compute.errors) | errors(cloudctl.images.services)
    assert not control & errors(compute_workers.exception)
