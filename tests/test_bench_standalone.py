"""The benchmarks run with requirements.txt alone: each bench/ script starts in a Python where pytest
(and the tests package) cannot be imported, from a directory outside the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = sorted((REPO / "bench").glob("*.py"))

# Blocks what requirements-dev.txt brings (an entry of None in sys.modules makes `import` raise
# ImportError), then runs the script as `python <script> <args>` would.
WRAPPER = """
import runpy, sys
for name in ("pytest", "_pytest", "tests"):
    sys.modules[name] = None
script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""

# What each script is run with, and what its output then says. A script with a command line answers
# --help after its imports; scheduler_select.py has none and runs in well under a second.
INVOCATIONS = {
    "boot_throughput.py": (["--help"], "usage: boot_throughput.py"),
    "chaos.py": (["--help"], "usage: chaos.py"),
    "migration.py": (["--help"], "usage: migration.py"),
    "scheduler.py": (["--help"], "usage: scheduler.py"),
    "scheduler_select.py": ([], "us/decision"),
}


def test_every_bench_script_is_covered() -> None:
    assert {path.name for path in BENCH} == set(INVOCATIONS)


@pytest.mark.parametrize("script", BENCH, ids=lambda path: path.name)
def test_runs_without_pytest(script: Path, tmp_path: Path) -> None:
    args, expected = INVOCATIONS[script.name]
    # -I: no PYTHONPATH, no user site, no current directory on sys.path; the script finds the
    # repository's packages itself, as it does when run from anywhere.
    result = subprocess.run([sys.executable, "-I", "-c", WRAPPER, str(script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout, result.stdout + result.stderr
