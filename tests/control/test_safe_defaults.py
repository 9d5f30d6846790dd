"""Safe defaults of an installation: the state directory and its secrets are private (0700/0600),
Flower never starts without a login, the Procfile runs the control plane as the unprivileged user.

The scripts and the settings run for real, into a temporary state directory."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloudctl.flower import EXIT_NO_AUTH, basic_auth_problem

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def env_without_database(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CLOUDCTL_SECRET_KEY")}
    return {**env, "DJANGO_SETTINGS_MODULE": "cloudctl.settings", **extra}


def test_state_dir_script_creates_private_secrets_under_a_wide_umask(tmp_path):
    state = tmp_path / "var"
    # umask 022, as a login shell: the old redirect created cloudctl.env 0644 under it.
    result = subprocess.run(["bash", "-c", 'umask 022; exec tools/state-dir.sh "$1"', "-", str(state)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert mode(state) == 0o700
    env_file = state / "cloudctl.env"
    assert mode(env_file) == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert len(values["CLOUDCTL_SERVICE_TOKEN"]) == 64
    user, _, password = values["FLOWER_BASIC_AUTH"].partition(":")
    assert user == "admin" and len(password) == 20


def test_state_dir_script_narrows_an_older_installation_and_keeps_its_secrets(tmp_path):
    state = tmp_path / "var"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    env_file = state / "cloudctl.env"
    env_file.write_text("CLOUDCTL_SERVICE_TOKEN=kept\n")  # an older file: no Flower login yet
    for name in ("cloudctl.env", "secret_key", "cloudctl.sqlite3"):
        (state / name).touch()
        (state / name).chmod(0o644)
    result = subprocess.run(["tools/state-dir.sh", str(state)], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert mode(state) == 0o700
    for name in ("cloudctl.env", "secret_key", "cloudctl.sqlite3"):
        assert mode(state / name) == 0o600, name
    lines = env_file.read_text().splitlines()
    assert lines[0] == "CLOUDCTL_SERVICE_TOKEN=kept"
    assert [line.split("=")[0] for line in lines] == ["CLOUDCTL_SERVICE_TOKEN", "FLOWER_BASIC_AUTH"]


def test_settings_create_the_secret_key_and_database_private(tmp_path):
    state = tmp_path / "var"
    # Django opens the database (WAL: -wal and -shm appear) and writes to it.
    code = ("import django; django.setup(); from django.db import connection; "
            "cursor = connection.cursor(); cursor.execute('create table t (x int)'); "
            "cursor.execute('insert into t values (1)')")
    result = subprocess.run(["bash", "-c", f'umask 022; exec "{sys.executable}" -c "$1"', "-", code],
                            cwd=REPO, capture_output=True, text=True,
                            env=env_without_database(CLOUDCTL_STATE_DIR=str(state)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert mode(state) == 0o700
    assert mode(state / "secret_key") == 0o600
    assert len((state / "secret_key").read_text().strip()) > 40
    database = state / "cloudctl.sqlite3"
    assert mode(database) == 0o600
    assert sqlite3.connect(database).execute("select x from t").fetchall() == [(1,)]
    for companion in state.glob("cloudctl.sqlite3-*"):
        assert mode(companion) == 0o600, companion.name


def test_settings_narrow_the_files_of_an_older_installation(tmp_path):
    state = tmp_path / "var"
    state.mkdir()
    state.chmod(0o755)
    for name, text in (("secret_key", "an-older-key-" * 4), ("cloudctl.env", "X=1\n"),
                       ("cloudctl.sqlite3", "")):
        (state / name).write_text(text)
        (state / name).chmod(0o644)
    code = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env=env_without_database(CLOUDCTL_STATE_DIR=str(state)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "an-older-key-" * 4
    assert mode(state) == 0o700
    for name in ("secret_key", "cloudctl.env", "cloudctl.sqlite3"):
        assert mode(state / name) == 0o600, name


# --- Flower -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "", "admin", "admin:", ":secret", "a:b,broken"])
def test_flower_refuses_to_start_without_a_login(value):
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if value is not None:
        env["FLOWER_BASIC_AUTH"] = value
    result = subprocess.run([sys.executable, "-m", "cloudctl.flower", "--port=1"], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == EXIT_NO_AUTH
    assert "Flower not started: FLOWER_BASIC_AUTH" in result.stderr
    assert basic_auth_problem(env) is not None


def test_flower_starts_with_a_login_and_keeps_the_password_off_its_command_line():
    env = {**os.environ, "FLOWER_BASIC_AUTH": "admin:s3cret,ops:other"}
    assert basic_auth_problem(env) is None
    # --help: the wrapper handed over to Celery's Flower command (nothing is served).
    result = subprocess.run([sys.executable, "-m", "cloudctl.flower", "--help"], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "celery flower" in result.stdout
    procfile = (REPO / "Procfile").read_text()
    flower_line = next(line for line in procfile.splitlines() if line.startswith("flower:"))
    assert "${CLOUDCTL_PYTHON:-python} -m cloudctl.flower" in flower_line
    assert "FLOWER_BASIC_AUTH" not in flower_line  # the password stays out of `ps`


def test_run_banner_names_the_env_file_instead_of_printing_the_flower_password():
    banner = (REPO / "tools" / "run.sh").read_text()
    assert "login: $FLOWER_BASIC_AUTH" not in banner
    assert "FLOWER_BASIC_AUTH in $env_file" in banner


def test_procfile_runs_the_control_plane_unprivileged_and_only_compute_as_root():
    lines = dict(line.split(":", 1) for line in (REPO / "Procfile").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    for process in ("web", "scheduler", "conductor", "beat", "flower"):
        assert lines[process].strip().startswith("${CLOUDCTL_RUN_AS} "), process
    assert "CLOUDCTL_RUN_AS" not in lines["compute"]


@pytest.mark.parametrize(("value", "expected"), [
    ("1", "('HTTP_X_FORWARDED_PROTO', 'https') True True"),
    ("", "None False False"),
])
def test_behind_a_tls_proxy_the_forwarded_scheme_is_trusted_and_cookies_are_secure(tmp_path, value,
                                                                                  expected):
    code = ("import django; django.setup(); from django.conf import settings as s; "
            "print(s.SECURE_PROXY_SSL_HEADER, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env=env_without_database(CLOUDCTL_STATE_DIR=str(tmp_path),
                                                     CLOUDCTL_TLS_PROXY=value))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected
