"""The image service over real HTTP: a 1 GiB upload streams through gunicorn without being held
in memory, and comes back byte for byte."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import requests

from testbed.stack import Stack

pytestmark = pytest.mark.e2e

GIB = 1024**3


def _peak_rss_mb(port: str) -> float:
    """The largest peak RSS (VmHWM) among the web processes listening on ``port``."""
    pids = subprocess.run(["pgrep", "-f", f"gunicorn cloudctl.wsgi --bind 127.0.0.1:{port}"],
                          capture_output=True, text=True).stdout.split()
    peaks = []
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
    assert peaks, "no web process found"
    return max(peaks)


def test_a_one_gib_upload_streams_and_round_trips(stack: Stack, tmp_path: Path) -> None:
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as handle:  # 1 GiB: a marker at each end, zeros between (sparse)
        handle.write(b"cloudctl-first-block")
        handle.seek(GIB - 16)
        handle.write(b"cloudctl-lastblk")
    digest = hashlib.sha256()
    with open(raw, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
    created = stack.api("POST", "/api/v1/images/", json={"name": "big", "disk_format": "raw"})
    assert created.status_code == 201, created.text
    image_id = created.json()["id"]
    with open(raw, "rb") as handle:
        uploaded = requests.put(f"{stack.url}/api/v1/images/{image_id}/file", data=handle,
                                headers={"Authorization": f"Token {stack.token}",
                                         "Content-Type": "application/octet-stream"},
                                timeout=300)
    assert uploaded.status_code == 200, uploaded.text
    body = uploaded.json()
    assert (body["status"], body["size"], body["sha256"]) == ("active", GIB, digest.hexdigest())
    port = stack.url.rsplit(":", 1)[1]
    peak = _peak_rss_mb(port)
    print(f"\n  1 GiB upload: web process peak RSS {peak:.0f} MiB")
    assert peak < 400, f"the web process grew to {peak:.0f} MiB: the upload was held in memory"
    tail = stack.api("GET", f"/api/v1/images/{image_id}/file",
                     headers={"Range": f"bytes={GIB - 16}-"})
    assert tail.status_code == 206 and tail.content == b"cloudctl-lastblk"
    head = stack.api("GET", f"/api/v1/images/{image_id}/file", headers={"Range": "bytes=0-19"})
    assert head.content == b"cloudctl-first-block"
    assert stack.api("DELETE", f"/api/v1/images/{image_id}/").status_code == 204
