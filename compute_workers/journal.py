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

import os
from pathlib import Path

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
