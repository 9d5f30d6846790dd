"""The compute manager: every operation of a compute worker, in plain Python.

Tasks (``tasks.py``) only unpack their arguments and call one method here. The manager drives the
driver, classifies failures, and reports to the conductor through a :class:`Reporter`; it never
raises for an operation's failure (that is reported), so a task is acknowledged once its outcome has
been sent. Operations on one instance are serialized within the process (a terminate that arrives
during a spawn waits for it), and every operation is safe to run twice: Redis redelivers
unacknowledged tasks.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from compute_workers import contract
from compute_workers.config import ComputeConfig
from compute_workers.exception import (
    ComputeError,
    ConsoleUnavailable,
    InstanceNotFound,
    InvalidInstanceUUID,
)
from compute_workers.images import ImageCache
from compute_workers.locks import KeyedLock
from compute_workers.reporter import Reporter
from compute_workers.virt.driver import ComputeDriver, checked_uuid

LOG = logging.getLogger(__name__)

SPAWNING = "spawning"
DELETING = "deleting"
FAULT_DETAILS_MAX = 16 * 1024
MAX_CONSOLE_LINES = 10_000


def fault_from(exc: BaseException, host: str) -> dict[str, Any]:
    """The fault the conductor records: a message the user can act on, the traceback for admins."""
    if isinstance(exc, ComputeError | contract.SpecError):
        message = str(exc)
    else:
        message = f"unexpected error on host {host}: {type(exc).__name__}: {exc}"
    details = "".join(traceback.format_exception(exc))[-FAULT_DETAILS_MAX:]
    return {"message": message, "code": 500, "details": details}


def reschedule_after(exc: BaseException) -> bool:
    """Whether another host may succeed: not for a bad spec or a bad image, yes for host errors."""
    if isinstance(exc, contract.SpecError):
        return False
    if isinstance(exc, ComputeError):
        return exc.reschedule
    return True


class ComputeManager:
    def __init__(self, config: ComputeConfig, driver: ComputeDriver, reporter: Reporter) -> None:
        self.config = config
        self.host = config.host
        self.driver = driver
        self.reporter = reporter
        self.images = ImageCache(config.instances_path / "_base", token=config.service_token,
                                 timeout=config.image_download_timeout)
        self._instance_locks = KeyedLock()

    def init_host(self) -> None:
        """Connect the driver and log what the host runs; raises if the hypervisor is unusable."""
        self.driver.init_host()
        instances = self.driver.list_instances()
        LOG.info("host %s ready: driver %s, %d instance(s) found", self.host, self.driver.name,
                 len(instances))
        if self.driver.capabilities["needs_base_image"] and not self.config.service_token:
            LOG.warning("CLOUDCTL_SERVICE_TOKEN is not set: spawns that need to download an image "
                        "will fail")

    # Reports ---------------------------------------------------------------------------------------

    def _update(self, instance_uuid: str, expected_task_state: str | None, values: dict[str, Any], *,
                event: dict[str, Any] | None = None, fault: dict[str, Any] | None = None) -> None:
        self.reporter.report(contract.CONDUCTOR_INSTANCE_UPDATE, instance_uuid=instance_uuid, host=self.host,
                             expected_task_state=expected_task_state, values=values, event=event,
                             fault=fault)

    @staticmethod
    def _event(name: str, result: str, message: str) -> dict[str, Any]:
        return {"name": name, "result": result, "message": message}

    # Operations ------------------------------------------------------------------------------------

    def spawn(self, spec: dict[str, Any]) -> None:
        """Converge to "this instance runs here", then report active; or clean up and report
        build_failed. A redelivered spawn finds the domain and reports it again, never builds twice."""
        instance_uuid = spec.get("instance_uuid") if isinstance(spec, dict) else None
        try:
            contract.validate_spec(spec)
            checked_uuid(spec["instance_uuid"])
            if spec["host"] != self.host:
                raise contract.SpecError(f"spec is for host {spec['host']}, not {self.host}")
        except (contract.SpecError, InvalidInstanceUUID) as exc:
            LOG.error("refusing spawn of %r: %s", instance_uuid, exc)
            if isinstance(instance_uuid, str):
                self.reporter.report(contract.CONDUCTOR_BUILD_FAILED, instance_uuid=instance_uuid,
                                     host=self.host, fault=fault_from(exc, self.host), reschedule=False)
            return
        with self._instance_locks.hold(spec["instance_uuid"]):
            self._spawn_locked(spec)

    def _spawn_locked(self, spec: dict[str, Any]) -> None:
        instance_uuid = spec["instance_uuid"]
        started = time.monotonic()
        try:
            existing = self._power_state_or_none(instance_uuid)
        except Exception as exc:
            self._build_failed(spec, exc, cleanup=False)  # nothing was made
            return
        if existing is not None:
            self._spawn_existing(spec, existing)
            return
        driver_called = False
        try:
            base_image = self._prepare_image(spec)
            driver_called = True
            self.driver.spawn(spec, base_image)
            power_state = self.driver.get_info(instance_uuid)
        except Exception as exc:
            self._build_failed(spec, exc, cleanup=driver_called)
            return
        message = (f"domain {contract.domain_name(instance_uuid)} started on {self.host} in "
                   f"{time.monotonic() - started:.1f} s")
        self._spawned(instance_uuid, power_state, message)

    def _spawned(self, instance_uuid: str, power_state: str, message: str) -> None:
        LOG.info("spawn of %s: %s", instance_uuid, message)
        self._update(instance_uuid, SPAWNING,
                     {"vm_state": "active", "task_state": None, "power_state": power_state},
                     event=self._event("compute_spawn", "success", message))

    def _spawn_existing(self, spec: dict[str, Any], power_state: str) -> None:
        """The domain exists: this is a redelivered spawn. Never rebuild nor remove it (it may be an
        instance in use: the conductor drops our report if the instance moved on); start it if an
        earlier attempt died between defining and starting it."""
        instance_uuid = spec["instance_uuid"]
        try:
            if power_state == contract.POWER_PAUSED:
                self.driver.unpause(instance_uuid)
            elif power_state != contract.POWER_RUNNING:
                LOG.warning("spawn of %s: its domain exists but is %s; starting it", instance_uuid,
                            power_state)
                self.driver.power_on(instance_uuid)
            power_state = self.driver.get_info(instance_uuid)
        except Exception as exc:
            # Not build_failed: that would reschedule while the domain stays here.
            LOG.error("spawn of %s: cannot start its existing domain: %s", instance_uuid, exc)
            self._update(instance_uuid, SPAWNING, {"vm_state": "error", "task_state": None},
                         fault=fault_from(exc, self.host))
            return
        self._spawned(instance_uuid, power_state, f"domain {contract.domain_name(instance_uuid)} already "
                                                  f"exists on {self.host}; not rebuilt")

    def _power_state_or_none(self, instance_uuid: str) -> str | None:
        try:
            return self.driver.get_info(instance_uuid)
        except InstanceNotFound:
            return None

    def _prepare_image(self, spec: dict[str, Any]) -> Path | None:
        if not self.driver.capabilities["needs_base_image"]:
            return None
        image = spec["image"]
        label = image.get("name") or image["id"]
        self._update(spec["instance_uuid"], SPAWNING, {}, event=self._event(
            "compute_prep_image", "start", f"preparing image {label} on {self.host}"))
        fetched = self.images.fetch(image)
        message = (f"image {label} already cached on {self.host}" if not fetched.downloaded_bytes else
                   f"image {label} downloaded to {self.host}: {fetched.downloaded_bytes} bytes in "
                   f"{fetched.seconds:.1f} s")
        self._update(spec["instance_uuid"], SPAWNING, {},
                     event=self._event("compute_prep_image", "success", message))
        return fetched.path

    def _build_failed(self, spec: dict[str, Any], exc: Exception, *, cleanup: bool) -> None:
        """Report a failed build; ``cleanup``: this attempt called driver.spawn, make sure nothing of
        it is left (the driver cleans up after itself, this is the belt to its braces)."""
        instance_uuid = spec["instance_uuid"]
        reschedule = reschedule_after(exc)
        LOG.error("spawn of %s failed on %s (reschedule=%s): %s", instance_uuid, self.host, reschedule, exc,
                  exc_info=not isinstance(exc, ComputeError))
        if cleanup:
            try:
                self.driver.destroy(instance_uuid)
            except Exception:
                LOG.exception("cleanup after the failed spawn of %s failed", instance_uuid)
        self.reporter.report(contract.CONDUCTOR_BUILD_FAILED, instance_uuid=instance_uuid, host=self.host,
                             fault=fault_from(exc, self.host), reschedule=reschedule)

    def terminate(self, instance_uuid: str) -> None:
        """Destroy the instance (success when it is not here) and report instance_destroyed; on
        failure report the instance in error with the fault."""
        with self._instance_locks.hold(str(instance_uuid)):
            started = time.monotonic()
            try:
                self.driver.destroy(instance_uuid)
            except Exception as exc:
                LOG.error("terminate of %s failed on %s: %s", instance_uuid, self.host, exc,
                          exc_info=not isinstance(exc, ComputeError))
                self._update(instance_uuid, DELETING, {"vm_state": "error", "task_state": None},
                             fault=fault_from(exc, self.host))
                return
        LOG.info("terminated %s in %.1f s", instance_uuid, time.monotonic() - started)
        self.reporter.report(contract.CONDUCTOR_INSTANCE_DESTROYED, instance_uuid=instance_uuid,
                             host=self.host)

    def get_console_output(self, instance_uuid: str, lines: int | None) -> dict[str, str]:
        """``{"output": str}`` or ``{"error": "InstanceNotFound" | "ConsoleUnavailable", "message"}``.

        ``lines`` None means all the driver keeps (the last 100 KiB). Expected failures are answers,
        not exceptions: the caller waits on the result backend.
        """
        try:
            count = MAX_CONSOLE_LINES if lines is None else max(0, min(int(lines), MAX_CONSOLE_LINES))
            return {"output": self.driver.get_console_output(instance_uuid, count)}
        except (InstanceNotFound, InvalidInstanceUUID) as exc:
            return {"error": "InstanceNotFound", "message": str(exc)}
        except (ConsoleUnavailable, ValueError, TypeError) as exc:
            return {"error": "ConsoleUnavailable", "message": str(exc)}
        except (ComputeError, OSError) as exc:
            LOG.error("console output of %s failed: %s", instance_uuid, exc)
            return {"error": "ConsoleUnavailable", "message": str(exc)}

    def resources(self) -> dict[str, Any]:
        """The heartbeat's resources: the driver's totals plus what only the worker knows."""
        resources = self.driver.get_available_resource()
        resources.update({
            "libvirt_uri": self.config.libvirt_uri,
            "driver": self.driver.name,
            "memory_mb_reserved": self.config.reserved_host_memory_mb,
            "disk_gb_reserved": self.config.reserved_host_disk_gb,
            "instances": self.driver.list_instances(),
        })
        return resources

    def heartbeat(self) -> None:
        self.reporter.report(contract.CONDUCTOR_HOST_HEARTBEAT, host=self.host, resources=self.resources())
