"""The redelivery journal: which lifecycle actions this host already completed.

Redis redelivers a task whose worker died before acknowledging it (at once on a clean stop, after
``visibility_timeout`` otherwise), so a reboot could run twice, hours apart. Each lifecycle task
carries the id of its InstanceAction; when the operation has completed, successfully or not, the id
is appended to ``INSTANCES_PATH/<uuid>/actions.done`` and fsync'd *before* the outcome is reported.
A task whose id is there is a redelivery and does nothing.

Journal first, report second: a crash between the two loses the report (the conductor's restart
handling and reaper end the operation truthfully) instead of running the operation again.

The file lives and dies with the instance's directory (terminate deletes it). One line per action,
``<id> <result>`` (result ``success`` or ``error``: the journal also tells an admin what happened); a
line cut short by a crash is never read as a completed action.

Migration steps are journaled by :class:`MigrationJournal` instead (contract key
``migration-<id>-<step>``): the instance directory is no place for them, since it leaves the source
when a live migration succeeds (a redelivered ``compute.live_migration`` must still learn it
migrated) and on shared storage it is the destination's too. Their files are
``INSTANCES_PATH/_migrations/<host>/migration-<id>``, one line ``<step> <status>`` per completed step.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from compute_workers.virt.driver import checked_uuid

FILENAME = "actions.done"
RESULTS = ("success", "error")


class ActionJournal:
    def __init__(self, instances_path: Path) -> None:
        self.instances_path = instances_path

    def path(self, instance_uuid: str) -> Path:
        return self.instances_path / checked_uuid(instance_uuid) / FILENAME

    def done(self, instance_uuid: str, action_id: int) -> bool:
        wanted = str(action_id)
        return any(len(fields) == 2 and fields[0] == wanted and fields[1] in RESULTS
                   for fields in _complete_lines(self.path(instance_uuid)))

    def record(self, instance_uuid: str, action_id: int, result: str) -> None:
        """Append ``action_id`` and its ``result`` durably (file and, when new, its directory entry
        fsync'd)."""
        if result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}")
        _append_line(self.path(instance_uuid), f"{int(action_id)} {result}")


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` durably: the file and, when new, its directory entry fsync'd; a line a crash
    cut short is ended first, so that it never runs into this one."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        cut = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        data = f"{line}\n".encode("ascii")
        os.write(fd, b"\n" + data if cut else data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _complete_lines(path: Path) -> list[list[str]]:
    """The fields of every complete line of ``path`` (none when it does not exist)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return []
    return [line.split() for line in text.split("\n")[:-1]]  # the last piece is "" or a line cut short


MIGRATIONS_DIR = "_migrations"
_WORD = re.compile(r"[a-z_]{1,64}")


class MigrationJournal:
    """Which steps of which migrations this host completed, and with which status.

    ``host`` names this host's own directory: on shared storage several hosts share INSTANCES_PATH,
    and each step runs on one host only.
    """

    def __init__(self, instances_path: Path, host: str) -> None:
        self.directory = instances_path / MIGRATIONS_DIR / re.sub(r"[^A-Za-z0-9._-]", "_", host)

    def path(self, migration_id: int) -> Path:
        if isinstance(migration_id, bool) or not isinstance(migration_id, int) or migration_id < 0:
            raise ValueError(f"invalid migration id {migration_id!r}")
        return self.directory / f"migration-{migration_id}"

    def status(self, migration_id: int, step: str) -> str | None:
        """The status ``step`` of the migration ended with here, None when it did not end here."""
        found = None
        for fields in _complete_lines(self.path(migration_id)):
            if len(fields) == 2 and fields[0] == step:
                found = fields[1]
        return found

    def record(self, migration_id: int, step: str, status: str) -> None:
        """Append that ``step`` ended with ``status``, durably (before it is reported)."""
        if not _WORD.fullmatch(step) or not _WORD.fullmatch(status):
            raise ValueError(f"invalid step or status {step!r} {status!r}")
        _append_line(self.path(migration_id), f"{step} {status}")

    def prune(self, max_age: float) -> int:
        """Remove the files of migrations untouched for ``max_age`` seconds; returns how many.
        Redis redelivers within COMPUTE_VISIBILITY_TIMEOUT: anything much older is history."""
        removed = 0
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        now = time.time()
        for entry in entries:
            try:
                if entry.name.startswith("migration-") and now - entry.stat().st_mtime > max_age:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


STEP_RECORDS_DIR = ".migrations"
# A migration step's record is kept this long: far beyond any redelivery (COMPUTE_VISIBILITY_TIMEOUT).
MIGRATION_RECORD_MAX_AGE = 30 * 86400.0


class MigrationStepRecords:
    """The cold-migration and resize steps completed here, each with what a later step must know:
    ``INSTANCES_PATH/.migrations/migration-<id>-<step>`` (:class:`MigrationJournal` records only a
    status per step; a resize's steps also pass details on, such as the destination host).

    Not in the instance's directory, as :class:`ActionJournal` is: a cold migration renames and removes
    that directory, and a same-host resize runs the source's and the destination's steps in one.
    Same rule: written durably (a complete file renamed into place, fsync'd) before the outcome is
    reported, so a redelivered step finds it and does nothing. A record is a small JSON object
    (``instance_uuid``, ``result``, ``at``, plus what the step wants a later step to know, such as the
    destination host); records older than 30 days are removed when a new one is written.
    """

    def __init__(self, instances_path: Path) -> None:
        self.directory = instances_path / STEP_RECORDS_DIR

    def path(self, migration_id: int, step: str) -> Path:
        if not step.isidentifier():
            raise ValueError(f"invalid migration step {step!r}")
        return self.directory / f"migration-{int(migration_id)}-{step}"

    def done(self, migration_id: int, step: str) -> dict[str, Any] | None:
        """The record of that step, None when this host has not completed it."""
        try:
            record = json.loads(self.path(migration_id, step).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # cannot be written half (renamed whole); count it as done all the same
            return {"result": "error"}
        return record if isinstance(record, dict) else {"result": "error"}

    def record(self, migration_id: int, step: str, instance_uuid: str, result: str, **details: Any) -> None:
        if result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}")
        path = self.path(migration_id, step)
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        temporary = self.directory / f".{path.name}.{os.getpid()}.{threading.get_ident()}"
        data = {"instance_uuid": instance_uuid, "result": result, "at": time.time(), **details}
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(data, out)
            out.flush()
            os.fsync(out.fileno())
        temporary.rename(path)
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - MIGRATION_RECORD_MAX_AGE
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith("migration-"):
                    try:
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                    except FileNotFoundError:
                        pass
