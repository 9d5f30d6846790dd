"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_IMAGE = Path(os.environ.get("CLOUDCTL_TINY_IMAGE", REPO / "var" / "images" / "tiny.qcow2"))


@pytest.fixture(scope="session")
def tiny_image_path() -> Path:
    """The demo guest image, built once by tools/build-tiny-image.sh (cached in var/images)."""
    if not TINY_IMAGE.exists():
        subprocess.run([str(REPO / "tools" / "build-tiny-image.sh"), str(TINY_IMAGE)], check=True)
    return TINY_IMAGE
