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
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from compute_workers.durable import replace_durably
from compute_workers.virt.driver import checked_uuid

FILENAME = "actions.done"
RESULTS = ("success", "error")


class ActionJournal:
    def __init__(self, instances_path: Path) -> None:
        self.instances_path = instances_path

    def path(self, instance_uuid: str) -> Path:
        return self.instances_path / checked_uuid(instance_uuid) / FILENAME

    def done(self, instance_uuid: str, action_id: int) -> bool:
        try:
            text = self.path(instance_uuid).read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return False
        wanted = str(action_id)
        for line in text.split("\n")[:-1]:  # the last piece is "" or a line cut short
            fields = line.split()
            if len(fields) == 2 and fields[0] == wanted and fields[1] in RESULTS:
                return True
        return False

    def record(self, instance_uuid: str, action_id: int, result: str) -> None:
        """Append ``action_id`` and its ``result`` durably (file and, when new, its directory entry
        fsync'd)."""
        if result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}")
        path = self.path(instance_uuid)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            cut = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # end the line a crash cut
            line = f"{int(action_id)} {result}\n".encode("ascii")
            os.write(fd, b"\n" + line if cut else line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0:
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


MIGRATIONS_DIR = ".migrations"
# A migration step's record is kept this long: far beyond any redelivery (COMPUTE_VISIBILITY_TIMEOUT).
MIGRATION_RECORD_MAX_AGE = 30 * 86400.0


class MigrationJournal:
    """The migration steps this host completed: ``INSTANCES_PATH/.migrations/migration-<id>-<step>``.

    Not in the instance's directory, as :class:`ActionJournal` is: a cold migration renames and removes
    that directory, and a same-host resize runs the source's and the destination's steps in one.
    Same rule: written durably (a complete file renamed into place, fsync'd) before the outcome is
    reported, so a redelivered step finds it and does nothing. A record is a small JSON object
    (``instance_uuid``, ``result``, ``at``, plus what the step wants a later step to know, such as the
    destination host); records older than 30 days are removed when a new one is written.
    """

    def __init__(self, instances_path: Path) -> None:
        self.directory = instances_path / MIGRATIONS_DIR

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
        data = {"instance_uuid": instance_uuid, "result": result, "at": time.time(), **details}
        replace_durably(path, json.dumps(data).encode(), mode=0o644)
        prune(self.directory, "migration-")


def prune(directory: Path, prefix: str, max_age: float = MIGRATION_RECORD_MAX_AGE) -> None:
    """Remove the records (files named ``prefix…``) of ``directory`` older than ``max_age`` seconds."""
    cutoff = time.time() - max_age
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass


SPAWNS_DIR = ".spawns"


class SpawnJournal:
    """The spawns this host completed: ``INSTANCES_PATH/.spawns/spawn-<uuid>@<host>``.

    A spawn's message can be delivered again long after it ran (a worker that died before acknowledging
    it: at its restart, or after ``visibility_timeout``): by then the server may have been stopped,
    paused, moved or deleted, and finding (or not finding) its domain no longer says whether this spawn
    ran. So its outcome is journaled, written durably before it is reported; a redelivered spawn whose
    record is here does nothing to the hypervisor. Not in the instance's directory (terminate and the
    cleanup of a failed spawn remove it); named after the host, as INSTANCES_PATH may be shared by
    several. A record names the spawn's ``request_id`` (the request of the action that asked for it):
    a later spawn of the same instance for another request (a rebuild) is not a redelivery. Records
    older than 30 days are removed when a new one is written.
    """

    def __init__(self, instances_path: Path, host: str) -> None:
        self.directory = instances_path / SPAWNS_DIR
        self.host = host

    def path(self, instance_uuid: str) -> Path:
        return self.directory / f"spawn-{checked_uuid(instance_uuid)}@{self.host}"

    def done(self, instance_uuid: str, request_id: str) -> dict[str, Any] | None:
        """The record of the spawn of ``instance_uuid`` for ``request_id`` on this host; None when this
        host has not completed one."""
        try:
            record = json.loads(self.path(instance_uuid).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # cannot be written half (renamed whole); count it as done all the same
            return {"result": "error", "request_id": request_id}
        if not isinstance(record, dict):
            return {"result": "error", "request_id": request_id}
        return record if record.get("request_id", "") == request_id else None

    def record(self, instance_uuid: str, request_id: str, result: str) -> None:
        if result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}")
        path = self.path(instance_uuid)
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        data = {"instance_uuid": instance_uuid, "request_id": request_id, "result": result, "at": time.time()}
        replace_durably(path, json.dumps(data).encode(), mode=0o644)
        prune(self.directory, "spawn-")
