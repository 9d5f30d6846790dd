"""Malformed environment values stop start-up with a message naming the variable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("SCHEDULER_MAX_ATTEMPTS", "three", "SCHEDULER_MAX_ATTEMPTS='three' is invalid: expected an integer"),
    ("SCHEDULER_MAX_ATTEMPTS", "0", "expected an integer >= 1"),
    ("RAM_ALLOCATION_RATIO", "lots", "RAM_ALLOCATION_RATIO='lots' is invalid: expected a number"),
    ("CLOUDCTL_DEBUG", "maybe", "CLOUDCTL_DEBUG='maybe' is invalid"),
    ("DATABASE_URL", "nonsense://x", "DATABASE_URL='nonsense://x' is invalid"),
    ("SCHEDULER_ENABLED_FILTERS", "RamFilter,NoSuchFilter", "unknown scheduler filter(s) NoSuchFilter"),
    ("NETWORK_VNI_RANGE", "1000-1999", "NETWORK_VNI_RANGE='1000-1999' is invalid: expected first:last"),
    ("NETWORK_VNI_RANGE", "2000:1000", "expected 1 <= first <= last <= 16777215"),
    ("TOKEN_TTL", "12h", "TOKEN_TTL='12h' is invalid: expected an integer"),
    ("TOKEN_TTL", "10", "expected an integer >= 60"),
    ("LOGIN_FAILURE_LIMIT", "0", "expected an integer >= 1"),
    ("API_LIST_MAX_LIMIT", "0", "API_LIST_MAX_LIMIT='0' is invalid: expected an integer >= 1"),
    ("API_LIST_DEFAULT_LIMIT", "all", "API_LIST_DEFAULT_LIMIT='all' is invalid: expected an integer"),
    ("API_MAX_BODY_BYTES", "1MiB", "API_MAX_BODY_BYTES='1MiB' is invalid: expected an integer"),
    ("IMAGE_SIZE_CAP", "20G", "IMAGE_SIZE_CAP='20G' is invalid: expected an integer"),
    ("TASK_DEADLINE_IMAGE_SAVING", "60", "expected an integer >= 180"),
])
def test_bad_values_name_the_variable(tmp_path, name, value, expected):
    env = {**os.environ, "CLOUDCTL_STATE_DIR": str(tmp_path), name: value}
    env.pop("DATABASE_URL", None) if name != "DATABASE_URL" else None
    code = "import django; django.setup(); import scheduler.tasks"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**env, "DJANGO_SETTINGS_MODULE": "cloudctl.settings"})
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(("extra", "expected"), [
    ({"NETWORK_NODE_HOST": "net1"}, "net1 net1"),
    ({"NETWORK_NODE_HOST": "net1", "NETWORK_DHCP_HOST": "dhcp1"}, "net1 dhcp1"),
    # The Procfile's compute worker is --host ${COMPUTE_HOST:-$(hostname)}: the network node follows it.
    ({"COMPUTE_HOST": "hv1"}, "hv1 hv1"),
    ({"COMPUTE_HOST": "hv1", "NETWORK_NODE_HOST": "net1"}, "net1 net1"),
    ({}, f"{socket.gethostname()} {socket.gethostname()}"),
])
def test_the_dhcp_host_defaults_to_the_network_node(tmp_path, extra, expected):
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "NETWORK_NODE_HOST", "NETWORK_DHCP_HOST", "COMPUTE_HOST")}
    code = ("import django; django.setup(); from django.conf import settings; "
            "print(settings.NETWORK_NODE_HOST, settings.NETWORK_DHCP_HOST)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**env, **extra, "CLOUDCTL_STATE_DIR": str(tmp_path),
                                 "DJANGO_SETTINGS_MODULE": "cloudctl.settings"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected
