"""Driving compute workers from tests without the control plane: spawn specs, a local image API
(what the control plane serves images and takes snapshot uploads with), and the conductor's queues
(what workers report to). Shared by tests/compute (its conftest wraps these in fixtures) and
tests/multihost (real workers on harness hosts)."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from kombu import Connection

from compute_workers import contract

HOST = "test-host"
TOKEN = "test-service-token"

SpecFactory = Callable[..., dict[str, Any]]


def new_spec(**changes: Any) -> dict[str, Any]:
    """A valid v1 spawn spec (host HOST, a fresh uuid); ``changes`` replace keys, dicts are merged."""
    spec: dict[str, Any] = {
        "version": contract.SPEC_VERSION,
        "instance_uuid": str(uuid.uuid4()),
        "name": "web <1> & \"friends\"",
        "host": HOST,
        "request_id": "req-" + uuid.uuid4().hex,
        "flavor": {"name": "m1.nano", "vcpus": 1, "memory_mb": 128, "root_gb": 1},
        "image": {"id": "img-" + uuid.uuid4().hex[:8], "name": "tiny", "url": "http://127.0.0.1:9/none",
                  "sha256": "0" * 64, "size": None, "disk_format": "qcow2", "properties": {}},
        "networks": [], "key_data": None, "user_data": None,
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@dataclass
class ImageServer:
    """A local image API: serves registered bytes at /images/<name>, only with the service token."""

    base_url: str
    token: str = TOKEN
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    # PUT /uploads/<name> (the image service's upload API): what was stored, and the answer to give
    # instead of storing, e.g. (413, '{"detail": "too large"}').
    uploads: dict[str, bytes] = field(default_factory=dict)
    upload_answer: tuple[int, str] | None = None

    def upload_url(self, name: str) -> str:
        return f"{self.base_url}/uploads/{name}"

    def add(self, name: str, data: bytes, disk_format: str = "qcow2", **image: Any) -> dict[str, Any]:
        """Serve ``data`` and return the spec's image dict for it (checksum and size true)."""
        self.files[name] = data
        return {"id": name, "name": name, "url": f"{self.base_url}/images/{name}",
                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "disk_format": disk_format,
                "properties": {}, **image}


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up early (a worker checking that an image is fetchable reads the headers
        only) is no error of the server: no traceback for it in the test output."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


_IMAGE_API: dict[str, Any] = {}  # "url": the one server's base URL, "state": the ImageServer serving now
_IMAGE_API_LOCK = threading.Lock()


def image_api_url() -> str:
    """The base URL of this process's one local image API (started at the first call): workers are
    configured with it as their CLOUDCTL_API_URL, the only place they send the service token to; each
    :func:`serve_images` serves its own files there."""
    with _IMAGE_API_LOCK:
        if "url" not in _IMAGE_API:
            httpd = _QuietHTTPServer(("127.0.0.1", 0), _ImageHandler)
            threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            _IMAGE_API["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
        return str(_IMAGE_API["url"])


class _ImageHandler(BaseHTTPRequestHandler):
    def _state(self) -> ImageServer | None:
        state = _IMAGE_API.get("state")
        if state is None:
            self._answer(503, '{"detail": "no image API is serving"}')
        return state

    def do_GET(self) -> None:
        state = self._state()
        if state is None:
            return
        state.requests.append(self.path)
        if self.headers.get("Authorization") != f"Token {state.token}":
            self.send_error(401, "missing or wrong service token")
            return
        data = state.files.get(self.path.removeprefix("/images/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        state = self._state()
        if state is None:
            return
        state.requests.append(f"PUT {self.path}")
        if self.headers.get("Authorization") != f"Token {state.token}":
            self._answer(401, '{"detail": "missing or wrong service token"}')
            return
        if self.headers.get("Content-Type") != "application/octet-stream":
            self._answer(415, '{"detail": "expected application/octet-stream"}')
            return
        body = self._read_body()
        if state.upload_answer is not None:
            self._answer(*state.upload_answer)
            return
        state.uploads[self.path.removeprefix("/uploads/")] = body
        self._answer(204, "")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_images(token: str = TOKEN) -> Iterator[ImageServer]:
    """The local image API (at :func:`image_api_url`) serving a fresh set of files, answering only
    requests carrying ``token``, until the block ends."""
    server = ImageServer(image_api_url(), token=token)
    previous = _IMAGE_API.get("state")
    _IMAGE_API["state"] = server
    try:
        yield server
    finally:
        _IMAGE_API["state"] = previous


class ConductorQueue:
    """Reads what workers send to the conductor's queues (``conductor`` and ``conductor.status``)
    of the test broker; each message is returned by at most one wait_for."""

    def __init__(self, broker: str) -> None:
        self.connection = Connection(broker)
        self.queues = [self.connection.SimpleQueue(name)
                       for name in (contract.CONDUCTOR_QUEUE, contract.CONDUCTOR_STATUS_QUEUE)]
        for queue in self.queues:
            queue.clear()
        self.unclaimed: list[tuple[str, dict[str, Any]]] = []

    def wait_for(self, task_name: str, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
        def matches(name: str, kwargs: dict[str, Any]) -> bool:
            return name == task_name and all(kwargs.get(k) == v for k, v in match.items())

        for index, (name, kwargs) in enumerate(self.unclaimed):
            if matches(name, kwargs):
                del self.unclaimed[index]
                return kwargs
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._next(timeout=0.25)
            if message is None:
                continue
            message.ack()
            _args, kwargs, _embed = message.decode()
            if matches(message.headers["task"], kwargs):
                return dict(kwargs)
            self.unclaimed.append((message.headers["task"], dict(kwargs)))
        raise AssertionError(f"no {task_name} {match} within {timeout} s; seen: {self.unclaimed}")

    def _next(self, timeout: float) -> Any:
        for queue in self.queues:
            try:
                return queue.get(block=True, timeout=timeout / len(self.queues))
            except queue.Empty:
                continue
        return None

    def close(self) -> None:
        for queue in self.queues:
            queue.close()
        self.connection.release()


def forget_queues(client: redis.Redis, queues: list[str]) -> None:
    """Delete what consuming ``queues`` left in the broker: their lists and kombu's binding tables."""
    client.delete(*queues, *(f"_kombu.binding.{q}" for q in queues),
                  *(f"_kombu.binding_permanent.{q}" for q in queues))
