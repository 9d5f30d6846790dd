"""The demo guest image (``tools/build-tiny-image.sh``), shared by the tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from testbed import REPO

TINY_IMAGE = Path(os.environ.get("CLOUDCTL_TINY_IMAGE", REPO / "var" / "images" / "tiny.qcow2"))


def tiny_image() -> Path:
    """The demo guest image, built once by tools/build-tiny-image.sh (cached in var/images)."""
    if not TINY_IMAGE.exists():
        subprocess.run([str(REPO / "tools" / "build-tiny-image.sh"), str(TINY_IMAGE)], check=True)
    return TINY_IMAGE
