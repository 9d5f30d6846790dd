#!/usr/bin/env python3
"""``tools/supervise.py [-f Procfile] [-d DIR]``: run every process of a Procfile, restart the ones that die.

What ``make run`` starts its processes with (it used honcho). honcho stops every process as soon as one
exits, so one broker blip that crashed the scheduler took the whole control plane down; it has no
restart policy. supervisord and circus have one, but each wants its own configuration file (a second
list of the processes beside the Procfile, which the test bed also reads) and is one more daemon
to install. This is the small supervisor the Procfile needs, on the standard library alone:

- each ``name: command`` line runs as ``sh -c command`` in a process group (session) of its own, its
  output (stdout and stderr) printed line by line behind ``HH:MM:SS name |`` as honcho does;
- a process that fails (a non-zero exit, or killed by a signal) is restarted after 1 s, then 2, 4, 8,
  16 and 30 s at most between attempts; the delay starts again from 1 s once a run lasted 60 s. What
  remains of its process group (a Celery worker's pool, gunicorn's workers, the command itself when
  only its ``sh`` died) is sent SIGTERM at once and SIGKILL after ``--grace`` seconds; the next run
  starts once it is gone;
- a process that exits with 78 (EX_CONFIG: e.g. Flower without ``FLOWER_BASIC_AUTH``) is not restarted,
  with that said: its configuration must change first. One that exits with 0 ended on purpose (a
  Celery worker told to shut down) and stays down too. The units of ``deploy/systemd`` follow the same
  rule (``Restart=on-failure``, ``RestartPreventExitStatus=78``);
- SIGINT (Ctrl-C) or SIGTERM stops them all: SIGTERM to every process group, SIGKILL to what is still
  there after ``--grace`` seconds (or at a second Ctrl-C): a Celery worker under ``sh`` gets its warm
  shutdown although ``sh`` dies at once. It exits with 128 + the signal's number; or,
  when no process is left to run, with 0 if every one exited with 0, else 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

EX_CONFIG = 78
PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")  # honcho's
SYSTEM = "system"
COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)


class ProcfileError(ValueError):
    pass


def parse_procfile(text: str) -> dict[str, str]:
    """The processes (name -> command) of a Procfile; blank lines and ``#`` comments are skipped."""
    processes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PROCFILE_LINE.match(line)
        if match is None:
            raise ProcfileError(f"line {number}: not 'name: command': {line!r}")
        name, command = match.group(1), match.group(2).strip()
        if name in processes:
            raise ProcfileError(f"line {number}: process {name!r} is named twice")
        processes[name] = command
    if not processes:
        raise ProcfileError("no process in it")
    return processes


def backoff_delay(failures: int, initial: float = 1.0, maximum: float = 30.0) -> float:
    """Seconds before a restart after ``failures`` earlier failures in a row: initial, 2x, 4x, ... maximum."""
    return float(min(maximum, initial * 2 ** min(failures, 32)))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    if returncode > 128:  # sh's status of a command a signal killed
        return f"exited with code {returncode} (its command was killed by {signal_name(returncode - 128)})"
    return f"exited with code {returncode}"


class Printer:
    """One line at a time to the output, behind ``HH:MM:SS name |`` (coloured on a terminal)."""

    def __init__(self, output: IO[str], names: Sequence[str]) -> None:
        self.output = output
        self.width = max(len(name) for name in [SYSTEM, *names])
        self.lock = threading.Lock()
        self.colours = dict(zip(names, itertools.cycle(COLOURS), strict=False))
        try:
            self.tty = output.isatty()
        except (AttributeError, ValueError):
            self.tty = False

    def line(self, name: str, text: str) -> None:
        prefix = f"{time.strftime('%H:%M:%S')} {name.ljust(self.width)} | "
        colour = self.colours.get(name)
        if self.tty and colour is not None:
            prefix = f"\033[0m\033[{colour}m{prefix}\033[0m"
        with self.lock:
            try:
                self.output.write(prefix + text + "\n")
                self.output.flush()
            except (BrokenPipeError, ValueError):  # nobody reads any more: keep supervising
                pass


@dataclass
class Child:
    name: str
    command: str
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0  # failed runs in a row, each shorter than --stable-after
    restart_at: float | None = 0.0  # monotonic time of the next start; None: not to be started again
    # The process group of the last run once its first process (``sh``) is gone: what remains of it (a
    # Celery worker finishing its tasks after SIGTERM, a pool, gunicorn's workers) gets until
    # ``leftover_until`` to end before SIGKILL, and the next run waits for it.
    leftover: int | None = None
    leftover_until: float = 0.0
    exits: list[int] = field(default_factory=list)
    relays: list[threading.Thread] = field(default_factory=list)  # readers of its runs' output

    @property
    def running(self) -> bool:
        return self.process is not None


@dataclass(frozen=True)
class Policy:
    initial: float = 1.0
    maximum: float = 30.0
    stable_after: float = 60.0
    grace: float = 10.0


def signal_group(group: int | None, signum: int) -> bool:
    """Send ``signum`` to process group ``group``; False when the group is gone (or not ours to signal).
    Signal 0 tells whether any process of the group is left."""
    if group is None:
        return False
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return signum == 0  # it exists, as another user's
    return True


class Supervisor:
    def __init__(self, processes: Mapping[str, str], *, cwd: Path, env: Mapping[str, str], policy: Policy,
                 output: IO[str]) -> None:
        self.children = [Child(name, command) for name, command in processes.items()]
        self.cwd, self.env, self.policy = cwd, dict(env), policy
        self.printer = Printer(output, list(processes))
        self.stop_signal: int | None = None
        self.signals_received = 0

    def say(self, text: str) -> None:
        self.printer.line(SYSTEM, text)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = self.stop_signal or signum
        self.signals_received += 1

    # one process ------------------------------------------------------------------------------------
    def start(self, child: Child) -> None:
        try:
            child.process = subprocess.Popen(["sh", "-c", child.command], cwd=self.cwd, env=self.env,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            now = time.monotonic()
            self._failed(child, now, 0.0)
            assert child.restart_at is not None
            self.say(f"{child.name} could not start: {exc}; trying again in {child.restart_at - now:g} s")
            return
        child.started = time.monotonic()
        child.restart_at = None
        self.say(f"{child.name} started (pid={child.process.pid})")
        relay = threading.Thread(target=self._relay, args=(child.name, child.process), daemon=True)
        relay.start()
        child.relays = [*(thread for thread in child.relays if thread.is_alive()), relay]

    def _relay(self, name: str, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            self.printer.line(name, raw.decode("utf-8", "replace").rstrip("\r\n"))
        process.stdout.close()

    def reap(self, child: Child) -> None:
        """Handle the exit of ``child``'s process, if it exited: restart it later, or give it up."""
        process = child.process
        if process is None or process.poll() is None:
            return
        now = time.monotonic()
        returncode = process.returncode
        child.process = None
        child.exits.append(returncode)
        # Whatever of its group is left (its command, when sh did not exec it; a pool) is stopped too.
        child.leftover, child.leftover_until = process.pid, now + self.policy.grace
        signal_group(process.pid, signal.SIGTERM)
        ran = now - child.started
        what = f"{child.name} {describe_exit(returncode)} after {ran:.1f} s"
        if self.stop_signal is not None:
            self.say(what)
        elif returncode == EX_CONFIG:
            child.restart_at = None
            self.say(f"{what} (EX_CONFIG: its configuration is wrong, see its last lines above): not "
                     "restarted; fix the configuration and start again")
        elif returncode == 0:
            child.restart_at = None
            self.say(f"{what}: ended on purpose, not restarted")
        else:
            self._failed(child, now, ran)
            assert child.restart_at is not None
            self.say(f"{what}; restarting in {child.restart_at - now:g} s")

    def _failed(self, child: Child, now: float, ran: float) -> None:
        if ran >= self.policy.stable_after:
            child.failures = 0
        child.restart_at = now + backoff_delay(child.failures, self.policy.initial, self.policy.maximum)
        child.failures += 1

    def leftover_gone(self, child: Child, now: float) -> bool:
        """Whether nothing of ``child``'s last run is left; SIGKILL to what is, past its grace."""
        if not signal_group(child.leftover, 0):
            child.leftover = None
            return True
        if now < child.leftover_until:
            return False
        self.say(f"what is left of {child.name}'s last run (process group {child.leftover}) still runs "
                 f"{self.policy.grace:g} s after SIGTERM: SIGKILL")
        signal_group(child.leftover, signal.SIGKILL)
        child.leftover = None
        return True

    # all of them ------------------------------------------------------------------------------------
    def run(self) -> int:
        for handled in (signal.SIGINT, signal.SIGTERM):
            signal.signal(handled, self._on_signal)
        while self.stop_signal is None:
            now = time.monotonic()
            for child in self.children:
                self.reap(child)
                if child.leftover is not None:
                    self.leftover_gone(child, now)
                if (self.stop_signal is None and not child.running and child.restart_at is not None
                        and now >= child.restart_at and child.leftover is None):
                    self.start(child)
            if not any(child.running or child.restart_at is not None for child in self.children):
                self.say("no process left to run")
                self._stop_all()
                return 0 if all(child.exits[-1:] == [0] for child in self.children) else 1
            time.sleep(0.05)
        signum: int = self.stop_signal
        self.say(f"{signal.Signals(signum).name} received: stopping every process (SIGTERM, SIGKILL after "
                 f"{self.policy.grace:g} s or at a second signal)")
        self._stop_all()
        return 128 + signum

    def _stop_all(self) -> None:
        """SIGTERM to every process group, SIGKILL to what is left of them after the grace."""
        now = time.monotonic()
        for child in self.children:
            if child.process is not None:
                signal_group(child.process.pid, signal.SIGTERM)
            child.leftover_until = min(child.leftover_until, now + self.policy.grace)
        deadline = now + self.policy.grace
        signals_then = self.signals_received
        while True:
            for child in self.children:
                self.reap(child)
                child.leftover_until = min(child.leftover_until, deadline)
            now = time.monotonic()
            if self.signals_received > signals_then:  # a second Ctrl-C: no more waiting
                deadline = now
                for child in self.children:
                    child.leftover_until = now
            if now >= deadline:
                for child in self.children:
                    if child.process is not None:
                        self.say(f"{child.name} still runs: SIGKILL")
                        signal_group(child.process.pid, signal.SIGKILL)
                        child.process.wait()
                        self.reap(child)
            pending = [child for child in self.children if child.running
                       or (child.leftover is not None and not self.leftover_gone(child, now))]
            if not pending:
                for child in self.children:  # their last lines
                    for thread in child.relays:
                        thread.join(timeout=1)
                return
            time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-f", "--procfile", type=Path, default=Path("Procfile"))
    parser.add_argument("-d", "--directory", type=Path, default=None,
                        help="where the processes run (default: the Procfile's directory)")
    parser.add_argument("--backoff-initial", type=float, default=1.0, help="seconds before the first restart")
    parser.add_argument("--backoff-max", type=float, default=30.0, help="most seconds between restarts")
    parser.add_argument("--stable-after", type=float, default=60.0,
                        help="a run this long resets the delay to --backoff-initial")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping")
    args = parser.parse_args(argv)
    try:
        processes = parse_procfile(args.procfile.read_text())
    except (OSError, ProcfileError) as exc:
        print(f"supervise: {args.procfile}: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines as they are written, not when a buffer fills
    policy = Policy(initial=args.backoff_initial, maximum=args.backoff_max, stable_after=args.stable_after,
                    grace=args.grace)
    cwd = args.directory or args.procfile.resolve().parent
    return Supervisor(processes, cwd=cwd, env=env, policy=policy, output=sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
