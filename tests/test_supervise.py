"""tools/supervise.py, what `make run` starts the Procfile with: a process that dies is restarted with a
growing delay while the others keep running, a configuration error (exit 78) is not retried, SIGTERM or
SIGINT stops every process (their children too), and every line is shown behind its process's name.
Each test runs the real script on a Procfile of its own (sh one-liners and Python)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "supervise.py"

_spec = importlib.util.spec_from_file_location("supervise", SCRIPT)
assert _spec is not None and _spec.loader is not None
supervise = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("supervise", supervise)  # dataclasses look their module up there
_spec.loader.exec_module(supervise)


class Run:
    """A running supervisor: its output lines, read as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self.consumed: set[int] = set()
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first line not returned yet that matches ``pattern`` (waiting for it to come)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for index, line in enumerate(self.lines):
                    match = regex.search(line) if index not in self.consumed else None
                    if match:
                        self.consumed.add(index)
                        return match
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n"
                                         + "\n".join(self.lines))
                self.changed.wait(left)

    def started(self, name: str, timeout: float = 10.0) -> int:
        return int(self.wait_for(rf"\| {name} started \(pid=(\d+)\)", timeout).group(1))

    def matching(self, pattern: str) -> list[str]:
        with self.changed:
            return [line for line in self.lines if re.search(pattern, line)]


@contextmanager
def supervisor(tmp_path: Path, procfile: str, *options: str) -> Iterator[Run]:
    (tmp_path / "Procfile").write_text(procfile)
    process = subprocess.Popen([sys.executable, str(SCRIPT), "-f", str(tmp_path / "Procfile"), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = Run(process)
    try:
        yield run
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped yet, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.05)


FAST = ("--backoff-initial", "0.2", "--backoff-max", "1", "--grace", "2")


def test_a_killed_process_is_restarted_while_the_others_keep_running(tmp_path: Path) -> None:
    procfile = (f"worker: exec {sys.executable} -c 'import time; print(\"worker up\", flush=True); "
                "time.sleep(300)'\n"
                "other: echo other up; exec sleep 300\n")
    with supervisor(tmp_path, procfile, *FAST) as run:
        first = run.started("worker")
        other = run.started("other")
        run.wait_for(r"^\d\d:\d\d:\d\d worker +\| worker up$")
        run.wait_for(r"^\d\d:\d\d:\d\d other +\| other up$")
        os.kill(first, signal.SIGKILL)
        run.wait_for(r"\| worker was killed by SIGKILL after [\d.]+ s; restarting in 0.2 s$")
        second = run.started("worker")
        assert second != first and alive(second)
        run.wait_for(r"^\d\d:\d\d:\d\d worker +\| worker up$")
        assert alive(other)
        assert run.matching(r"\| other started") == [run.matching(r"\| other started")[0]]  # started once
        # Killed again: restarted again, the delay doubled (the first run was short).
        os.kill(second, signal.SIGKILL)
        run.wait_for(r"\| worker was killed by SIGKILL after [\d.]+ s; restarting in 0.4 s$")
        assert alive(run.started("worker")) and alive(other)


def test_the_delay_grows_to_its_maximum_and_starts_again_after_a_long_run(tmp_path: Path) -> None:
    with supervisor(tmp_path, "flaky: echo try; exit 3\n", *FAST) as run:
        delays = [float(run.wait_for(r"\| flaky exited with code 3 after [\d.]+ s; restarting in ([\d.]+) s$")
                        .group(1)) for _ in range(6)]
        assert delays == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
        starts = [line[:8] for line in run.matching(r"\| flaky started")]
        assert len(starts) >= 6
    # A run longer than --stable-after resets the delay: each restart waits the initial delay.
    with supervisor(tmp_path, "slow: sleep 0.6; exit 3\n", *FAST, "--stable-after", "0.5") as run:
        delays = [float(run.wait_for(r"\| slow exited with code 3 after [\d.]+ s; restarting in ([\d.]+) s$")
                        .group(1)) for _ in range(3)]
        assert delays == [0.2, 0.2, 0.2]


def test_an_exit_with_78_is_not_restarted_and_the_others_run_on(tmp_path: Path) -> None:
    procfile = ("flower: echo 'Flower not started: FLOWER_BASIC_AUTH is not set' >&2; exit 78\n"
                "web: exec sleep 300\n")
    with supervisor(tmp_path, procfile, *FAST) as run:
        web = run.started("web")
        run.wait_for(r"^\d\d:\d\d:\d\d flower +\| Flower not started: FLOWER_BASIC_AUTH is not set$")
        run.wait_for(r"\| flower exited with code 78 after [\d.]+ s \(EX_CONFIG.*not restarted")
        time.sleep(1.5)  # far longer than the first delay (0.2 s)
        assert len(run.matching(r"\| flower started")) == 1 and alive(web)
    # Nothing left to run: the supervisor ends, with a failure.
    (tmp_path / "only").mkdir()
    with supervisor(tmp_path / "only", "flower: exit 78\n", *FAST) as run:
        assert run.process.wait(10) == 1
        run.wait_for(r"\| no process left to run$")


def test_sigterm_stops_every_process_and_their_children(tmp_path: Path) -> None:
    procfile = ("parent: sleep 300 & echo child=$!; wait\n"
                "plain: exec sleep 300\n"
                "backoff: exit 1\n")
    with supervisor(tmp_path, procfile, *FAST) as run:
        parent, plain = run.started("parent"), run.started("plain")
        grandchild = int(run.wait_for(r"\| child=(\d+)$").group(1))
        assert all(alive(pid) for pid in (parent, plain, grandchild))
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(10) == 128 + signal.SIGTERM
        run.wait_for(r"\| SIGTERM received: stopping every process")
        for pid in (parent, plain, grandchild):
            wait_gone(pid)


def test_a_command_that_finishes_its_work_after_sigterm_gets_the_grace(tmp_path: Path) -> None:
    """``sh`` runs a command without exec'ing it (here `; true`, in the Procfile `${CLOUDCTL_RUN_AS} celery`)
    and dies at SIGTERM at once: the command itself (a Celery worker's warm shutdown) still gets its time."""
    script = tmp_path / "worker.py"
    script.write_text("import signal, sys, time\n"
                      "def finish(*_):\n"
                      "    print('finishing', flush=True)\n"
                      "    time.sleep(1)\n"
                      "    print('done', flush=True)\n"
                      "    sys.exit(0)\n"
                      "signal.signal(signal.SIGTERM, finish)\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(300)\n")
    procfile = f"celery: {sys.executable} {script}; true\n"
    with supervisor(tmp_path, procfile, "--grace", "5") as run:
        run.started("celery")
        run.wait_for(r"\| ready$")
        began = time.monotonic()
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(10) == 128 + signal.SIGTERM
        assert 1 <= time.monotonic() - began < 4
        run.wait_for(r"celery +\| finishing$")
        run.wait_for(r"celery +\| done$")
        assert not run.matching(": SIGKILL$")


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    procfile = (f"stubborn: exec {sys.executable} -c 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(\"ready\", flush=True); "
                "time.sleep(300)'\n")
    with supervisor(tmp_path, procfile, "--grace", "1") as run:
        pid = run.started("stubborn")
        run.wait_for(r"\| ready$")
        began = time.monotonic()
        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(10) == 128 + signal.SIGINT
        assert 0.9 <= time.monotonic() - began < 5
        run.wait_for(r"\| stubborn still runs: SIGKILL$")
        wait_gone(pid)


def test_what_a_dead_process_leaves_behind_is_stopped_before_it_starts_again(tmp_path: Path) -> None:
    """A Celery worker killed with -9 leaves its pool: the rest of its process group goes with it."""
    procfile = "pool: sleep 300 & echo child=$!; exec sleep 300\n"
    with supervisor(tmp_path, procfile, *FAST) as run:
        leader = run.started("pool")
        orphan = int(run.wait_for(r"\| child=(\d+)$").group(1))
        os.kill(leader, signal.SIGKILL)
        run.started("pool")
        wait_gone(orphan)


def test_procfile_parsing() -> None:
    text = "# the processes\n\nweb: gunicorn app --bind ${BIND:-127.0.0.1:8000}\nworker:celery worker\n"
    assert supervise.parse_procfile(text) == {"web": "gunicorn app --bind ${BIND:-127.0.0.1:8000}",
                                              "worker": "celery worker"}
    with pytest.raises(supervise.ProcfileError, match="line 2: process 'web' is named twice"):
        supervise.parse_procfile("web: a\nweb: b\n")
    with pytest.raises(supervise.ProcfileError, match="line 1: not 'name: command'"):
        supervise.parse_procfile("just a command\n")
    # The real Procfile parses, with the processes the README lists.
    assert set(supervise.parse_procfile((REPO / "Procfile").read_text())) == {
        "web", "scheduler", "conductor", "compute", "beat", "flower"}


def test_backoff_delay() -> None:
    assert [supervise.backoff_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert supervise.backoff_delay(1000) == 30


def test_a_bad_procfile_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("no colon here\n")
    result = subprocess.run([sys.executable, str(SCRIPT), "-f", str(tmp_path / "Procfile")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "line 1: not 'name: command'" in result.stderr
