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
    ("DATABASE_RETRY_AFTER", "0", "DATABASE_RETRY_AFTER='0' is invalid: expected an integer >= 1"),
    # A signed report retried past REPORT_MAX_SKEW would be dropped as a replay.
    ("TASK_DATABASE_MAX_RETRIES", "20", "expected retries that end within REPORT_MAX_SKEW (300 s"),
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


def _settings_of(tmp_path: Path, names: str, **env: str) -> list[str]:
    """The values of settings ``names`` (space-separated) in a process with ``env`` and its own state dir."""
    unset = ("REDIS_PASSWORD", "CELERY_BROKER_URL", "CELERY_RPC_BACKEND", "CLOUDCTL_HOST_KEY_SECRET")
    base = {k: v for k, v in os.environ.items() if k not in unset}
    code = ("import django; django.setup(); from django.conf import settings; "
            f"print('\\n'.join(str(getattr(settings, name)) for name in {names.split()!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True, env={**base, "CLOUDCTL_STATE_DIR": str(tmp_path),
                                             "DJANGO_SETTINGS_MODULE": "cloudctl.settings", **env})
    return result.stdout.splitlines()


def test_every_redis_url_carries_the_one_password(tmp_path):
    """REDIS_PASSWORD, else the state dir's redis.password (tools/services.sh), goes into both URLs;
    a URL that names its own password keeps it."""
    names = "CELERY_BROKER_URL CELERY_RPC_BACKEND"
    assert _settings_of(tmp_path, names) == ["redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"]
    (tmp_path / "redis.password").write_text("f1le\n")
    assert _settings_of(tmp_path, names) == ["redis://:f1le@127.0.0.1:6379/0", "redis://:f1le@127.0.0.1:6379/1"]
    assert _settings_of(tmp_path, names, REDIS_PASSWORD="env", CELERY_BROKER_URL="redis://10.0.0.1:6379/3",
                        CELERY_RPC_BACKEND="redis://:own@10.0.0.1/4") == [
        "redis://:env@10.0.0.1:6379/3", "redis://:own@10.0.0.1/4"]


def test_the_host_key_secret_is_generated_once_and_private(tmp_path):
    [first] = _settings_of(tmp_path, "CLOUDCTL_HOST_KEY_SECRET")
    assert len(first) >= 40 and (tmp_path / "host_key_secret").stat().st_mode & 0o777 == 0o600
    assert _settings_of(tmp_path, "CLOUDCTL_HOST_KEY_SECRET") == [first]
    assert _settings_of(tmp_path, "CLOUDCTL_HOST_KEY_SECRET", CLOUDCTL_HOST_KEY_SECRET="set") == ["set"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_control_planes_celery_connects_with_the_password_despite_the_environment(tmp_path):
    """Celery prefers the environment's CELERY_BROKER_URL (here without the password) to its setting:
    the scheduler, conductor and beat connect with the URL that carries it all the same."""
    (tmp_path / "redis.password").write_text("f1le\n")
    code = ("import django; django.setup(); from cloudctl.celery import app; "
            "print(app.connection_for_read().as_uri(include_password=True)); "
            "print(app.connection_for_write().as_uri(include_password=True))")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    env.update(CLOUDCTL_STATE_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="cloudctl.settings",
               CELERY_BROKER_URL="redis://127.0.0.1:6379/5")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True, env=env)
    assert result.stdout.splitlines() == ["redis://:f1le@127.0.0.1:6379/5"] * 2


def test_postgresql_connections_are_health_checked_and_time_out(tmp_path):
    """A persistent connection a database restart closed is replaced before use; connecting gives up
    after DATABASE_CONNECT_TIMEOUT (libpq would wait forever)."""
    url = "postgres://u:p@db.invalid:5432/cloudctl"
    [configured] = _settings_of(tmp_path, "DATABASES", DATABASE_URL=url, DATABASE_CONNECT_TIMEOUT="7")
    assert "'CONN_HEALTH_CHECKS': True" in configured and "'connect_timeout': 7" in configured
    [given] = _settings_of(tmp_path, "DATABASES", DATABASE_URL=url + "?connect_timeout=2")
    assert "'connect_timeout': 2}" in given  # the URL's own wins
