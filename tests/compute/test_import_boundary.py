"""compute_workers runs on hypervisor hosts without the control plane: it never imports Django, DRF,
cloudctl or scheduler. Checked in a fresh interpreter (nothing this test run imported counts) where
those packages cannot be imported at all, as on a compute host that does not have them installed."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import compute_workers

FORBIDDEN = ("django", "rest_framework", "cloudctl", "scheduler")
REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, importlib.abc, json, sys

FORBIDDEN = {forbidden!r}

class Forbid(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (forbidden in compute_workers)")
        return None

if {block!r}:
    sys.meta_path.insert(0, Forbid())
for name in {modules!r}:
    importlib.import_module(name)

# Build and finalize the app as the worker does: Celery imports lazily.
from compute_workers.app import create_app
from compute_workers.config import ComputeConfig
from compute_workers.manager import ComputeManager
from compute_workers.reporter import ListReporter
from compute_workers.tasks import register_tasks
from compute_workers.virt.fake import FakeDriver
config = ComputeConfig.from_env(environ={{}})
app = create_app(config)
register_tasks(app, ComputeManager(config, FakeDriver(), ListReporter()))
app.finalize(auto=True)
assert "compute.spawn" in app.tasks
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)))

"""


def all_modules() -> list[str]:
    return ["compute_workers"] + [m.name for m in pkgutil.walk_packages(compute_workers.__path__,
                                                                       "compute_workers.")]


def imported_forbidden_modules(block: bool) -> list[str]:
    """Import every compute_workers module and build the worker's app in a fresh interpreter; return
    the forbidden modules loaded. ``block``: make the forbidden packages unimportable."""
    modules = all_modules()
    assert {"compute_workers.app", "compute_workers.tasks", "compute_workers.manager",
            "compute_workers.__main__", "compute_workers.virt.libvirt.driver",
            "compute_workers.virt.fake", "compute_workers.operations.build"} <= set(modules)
    # DJANGO_SETTINGS_MODULE is set for the control plane's processes; it must not drag Django in.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
           "DJANGO_SETTINGS_MODULE": "cloudctl.settings"}
    script = SCRIPT.format(forbidden=FORBIDDEN, modules=modules, block=block)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_compute_workers_works_where_the_control_plane_is_not_installed() -> None:
    assert imported_forbidden_modules(block=True) == []


def test_compute_workers_loads_no_control_plane_code_where_it_is_installed() -> None:
    # kombu imports django.utils.functional when Django happens to be installed (JSON support for
    # lazy strings); that is a library's optional import. Django's settings, the ORM, DRF, cloudctl
    # and scheduler must never be loaded.
    loaded = imported_forbidden_modules(block=False)
    assert [m for m in loaded if not (m == "django" or m.startswith("django.utils"))] == []
