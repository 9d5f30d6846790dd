"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.images import tiny_image


@pytest.fixture(scope="session")
def tiny_image_path() -> Path:
    """The demo guest image, built once by tools/build-tiny-image.sh (cached in var/images)."""
    return tiny_image()
