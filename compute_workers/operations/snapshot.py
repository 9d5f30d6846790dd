"""Snapshot: the root disk copied into a standalone qcow2 and uploaded to the image service.

A journaled action like the lifecycle operations (a redelivered snapshot does nothing); at most
COMPUTE_MAX_CONCURRENT_SNAPSHOTS run at once on a host, the others wait for a slot.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from celery import Task

from compute_workers import contract, credentials
from compute_workers.contract import EventResult, TaskState
from compute_workers.exception import ComputeError, ImageUploadError, InstanceNotFound
from compute_workers.operations.base import (
    PAUSED,
    RUNNING,
    HostContext,
    MiB,
    OperationFamily,
    fault_from,
    target_values,
)

if TYPE_CHECKING:
    from compute_workers.tasks import TaskRegistrar

LOG = logging.getLogger(__name__)

# A snapshot reports its copy's progress at most this often.
SNAPSHOT_PROGRESS_INTERVAL = 2.0
SNAPSHOTS_DIR = "snapshots"


class Snapshot(OperationFamily):
    """compute.snapshot_instance."""

    def __init__(self, context: HostContext) -> None:
        super().__init__(context)
        self._snapshot_slots = threading.BoundedSemaphore(context.config.max_concurrent_snapshots)

    def snapshot_instance(self, instance_uuid: str, action_id: int | None, image_id: str, upload_url: str,
                          image_name: str) -> None:
        """Snapshot the root disk into a standalone qcow2 (live when the domain runs, cold when it is
        shut off) and upload it with ``PUT upload_url``. task_state image_snapshot -> image_uploading
        -> None. At most COMPUTE_MAX_CONCURRENT_SNAPSHOTS at once; the others wait. Never raises."""
        event = "compute_snapshot_instance"
        checked_action = self.checked_action(event, instance_uuid, action_id)
        if checked_action is False:
            return
        action = None if checked_action is None else int(checked_action)
        label = image_name or image_id
        with self.instance_locks.hold(instance_uuid):
            if self.redelivered(event, instance_uuid, action):
                return
            phase = {"task_state": TaskState.IMAGE_SNAPSHOT, "upload_open": False}
            self.update(instance_uuid, TaskState.IMAGE_SNAPSHOT, {}, action_id=action, event=self.event(
                event, EventResult.START,
                f"snapshot of {contract.domain_name(instance_uuid)} on {self.host} as image {label}"))
            target: Path | None = None
            try:
                with self._snapshot_slot(instance_uuid):
                    target = self._snapshot_path(instance_uuid)
                    message = self._snapshot_and_upload(instance_uuid, action, target, upload_url, label,
                                                        phase)
                values = target_values(self.driver.get_info(instance_uuid))
            except Exception as exc:
                self._snapshot_failed(instance_uuid, action, event, phase, exc)
                return
            finally:
                if target is not None:
                    target.unlink(missing_ok=True)
                    target.with_name(target.name + ".delta").unlink(missing_ok=True)
            LOG.info("%s of %s: %s", event, instance_uuid, message)
            self.journal_action(instance_uuid, action, "success")
            self.update(instance_uuid, TaskState.IMAGE_UPLOADING, values, action_id=action,
                        event=self.event(event, EventResult.SUCCESS, message))

    @contextlib.contextmanager
    def _snapshot_slot(self, instance_uuid: str) -> Iterator[None]:
        if not self._snapshot_slots.acquire(blocking=False):
            LOG.info("snapshot of %s waits: %d snapshot(s) already run on this host (COMPUTE_MAX_CONCURRENT_"
                     "SNAPSHOTS)", instance_uuid, self.config.max_concurrent_snapshots)
            self._snapshot_slots.acquire()
        try:
            yield
        finally:
            self._snapshot_slots.release()

    def _snapshot_path(self, instance_uuid: str) -> Path:
        """A new file name under INSTANCES_PATH/snapshots/, a directory QEMU can traverse."""
        directory = self.config.instances_path / SNAPSHOTS_DIR
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        directory.chmod(0o755)
        return directory / f"{instance_uuid}-{secrets.token_hex(6)}.qcow2"

    def _snapshot_and_upload(self, instance_uuid: str, action_id: int | None, target: Path, upload_url: str,
                             label: str, phase: dict[str, Any]) -> str:
        event = "compute_snapshot_instance"
        self._checked_upload_url(upload_url, label)  # refused before any work, not after the copy
        state = self.driver.get_info(instance_uuid)
        kind = "live" if state in (RUNNING, PAUSED) else "cold"
        started = time.monotonic()
        last_report = [started]

        def progress(copied: int, total: int) -> None:
            now = time.monotonic()
            if now - last_report[0] < SNAPSHOT_PROGRESS_INTERVAL:
                return
            last_report[0] = now
            self.update(instance_uuid, TaskState.IMAGE_SNAPSHOT, {}, action_id=action_id, event=self.event(
                event, EventResult.PROGRESS, f"copied {copied / MiB:.1f} of {total / MiB:.1f} MiB"))

        self.driver.snapshot(instance_uuid, target, progress)
        copied = time.monotonic() - started
        size = target.stat().st_size
        self.update(instance_uuid, TaskState.IMAGE_SNAPSHOT, {"task_state": TaskState.IMAGE_UPLOADING},
                    action_id=action_id, event=self.event(event, EventResult.PROGRESS,
                                     f"{kind} snapshot made: {size / MiB:.1f} MiB in {copied:.1f} s; "
                                     "uploading"))
        phase["task_state"] = TaskState.IMAGE_UPLOADING
        upload_started = time.monotonic()
        self.update(instance_uuid, TaskState.IMAGE_UPLOADING, {}, action_id=action_id, event=self.event(
            "compute_upload_image", EventResult.START, f"uploading {size / MiB:.1f} MiB as image {label}"))
        phase["upload_open"] = True
        self._upload(target, upload_url, label)
        uploaded = time.monotonic() - upload_started
        phase["upload_open"] = False
        self.update(instance_uuid, TaskState.IMAGE_UPLOADING, {}, action_id=action_id, event=self.event(
            "compute_upload_image", EventResult.SUCCESS,
            f"uploaded {size / MiB:.1f} MiB in {uploaded:.1f} s"))
        return (f"{kind} snapshot of {contract.domain_name(instance_uuid)} uploaded as image {label}: "
                f"{size / MiB:.1f} MiB; copy and convert {copied:.1f} s, upload {uploaded:.1f} s, total "
                f"{time.monotonic() - started:.1f} s")

    def _checked_upload_url(self, upload_url: str, label: str) -> str:
        """``upload_url`` when it is under the API URL; the service token goes nowhere else."""
        try:
            return credentials.check_api_url(upload_url, self.config.api_url,
                                             f"the upload URL of image {label}")
        except credentials.UntrustedURL as exc:
            raise ImageUploadError(str(exc)) from None

    def _upload(self, path: Path, upload_url: str, label: str) -> None:
        """Stream ``path`` to the image service; a non-2xx answer is a failure with its message."""
        if not self.config.service_token:
            raise ImageUploadError(f"cannot upload image {label}: CLOUDCTL_SERVICE_TOKEN is not set on "
                                   f"host {self.host}")
        upload_url = self._checked_upload_url(upload_url, label)
        headers = {"Authorization": f"Token {self.config.service_token}",
                   "Content-Type": "application/octet-stream"}
        timeout = self.config.image_upload_timeout
        try:
            with open(path, "rb") as body:
                response = requests.put(upload_url, data=body, headers=headers,
                                        timeout=(min(10.0, timeout), timeout))
        except requests.RequestException as exc:
            raise ImageUploadError(f"cannot upload image {label} to the image service: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise ImageUploadError(f"the image service refused image {label}: HTTP {response.status_code}: "
                                   f"{_answer_message(response)}")

    def _snapshot_failed(self, instance_uuid: str, action_id: int | None, event: str, phase: dict[str, Any],
                         exc: Exception) -> None:
        fault = fault_from(exc, self.host)
        if isinstance(exc, InstanceNotFound):
            fault["message"] = (f"domain {contract.domain_name(instance_uuid)} does not exist on host "
                                f"{self.host}")
        LOG.error("%s of %s failed on %s: %s", event, instance_uuid, self.host, fault["message"],
                  exc_info=not isinstance(exc, ComputeError))
        task_state = phase["task_state"]
        if phase["upload_open"]:
            self.update(instance_uuid, task_state, {}, action_id=action_id,
                        event=self.event("compute_upload_image", EventResult.ERROR, fault["message"]))
        values = self.truth(instance_uuid)
        self.journal_action(instance_uuid, action_id, "error")
        self.update(instance_uuid, task_state, values, action_id=action_id, fault=fault,
                    event=self.event(event, EventResult.ERROR, fault["message"]))

    @classmethod
    def register_tasks(cls, tasks: TaskRegistrar) -> None:
        @tasks.task(contract.COMPUTE_SNAPSHOT, ignore_result=True)
        def snapshot_instance(self: Task, instance_uuid: str, action_id: int | None, image_id: str,
                              upload_url: str, image_name: str = "") -> None:
            if family := tasks.family(self, cls):
                family.snapshot_instance(instance_uuid, action_id, image_id, upload_url, image_name)


def _answer_message(response: requests.Response) -> str:
    """The message of an HTTP error answer: its JSON ``detail``/``error``/``message``, else its text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if isinstance(text := body.get(key), str):
                return text[:1000]
    return str(response.text or response.reason or "").strip()[:1000]
