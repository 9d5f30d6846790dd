"""The message contract between the control plane and the compute workers.

Both sides import this module (and only this module of each other), so it must stay pure
standard-library Python: no Django, no libvirt, no Celery.

Queues
    ``scheduler``         scheduler tasks (run by a Django-enabled Celery worker)
    ``conductor``         conductor tasks: the only writer of what compute workers report
    ``compute.<host>``    one queue per hypervisor host, consumed by that host's compute worker

Every task carries plain JSON: ids, the versioned instance spec, or small dicts.

Compute tasks (sent to ``compute_queue(host)``):

``compute.spawn(spec)``
    Build the instance described by ``spec`` (see :func:`validate_spec`). Idempotent by domain name
    ``instance-<uuid>``: a redelivered spawn of a running instance only reports it again. Reports
    progress with ``conductor.instance_update`` and failure with ``conductor.build_failed``.
``compute.terminate(instance_uuid)``
    Destroy and undefine the domain, delete ``INSTANCES_PATH/<uuid>``. Succeeds when nothing is
    there. Reports ``conductor.instance_destroyed`` (or ``conductor.instance_update`` with a fault).
``compute.get_console_output(instance_uuid, lines)``
    Synchronous call (the caller waits on the RPC result backend). Returns the last ``lines`` lines
    (``None``: all the worker keeps, the last 100 KiB) as
    ``{"output": str}`` or ``{"error": "InstanceNotFound"|"ConsoleUnavailable", "message": str}``.

Lifecycle tasks (sent to ``compute_queue(host)``), each carrying the id of the InstanceAction
that asked for it. A task whose ``action_id`` this host already completed is a logged no-op (a
redelivery); every task converges to its target state (starting a running domain does nothing):

``compute.reboot_instance(instance_uuid, action_id, reboot_type, spec)``
    ``reboot_type`` "SOFT": ACPI shutdown, wait up to ``COMPUTE_CLEAN_SHUTDOWN_TIMEOUT``, start
    again; a guest that does not shut down in time gets a hard reboot and the event
    ``fallback_to_hard_reboot`` says so. "HARD": destroy, regenerate the definition from ``spec``
    (the spawn spec, v1), start; disks kept. Expected task_state "rebooting" / "rebooting_hard".
``compute.power_off_instance(instance_uuid, action_id, timeout)``
    ACPI shutdown, wait up to ``timeout`` seconds, then forced off. Expected "powering_off".
``compute.power_on_instance(instance_uuid, action_id, spec)``
    Start from the definition regenerated from ``spec``. Expected "powering_on".
``compute.pause_instance`` / ``compute.unpause_instance(instance_uuid, action_id)``
    libvirt suspend/resume of the vCPUs. Expected "pausing" / "unpausing".
``compute.suspend_instance`` / ``compute.resume_instance(instance_uuid, action_id)``
    libvirt managed save (RAM to disk, domain not running) and restore. Expected "suspending" /
    "resuming".

``compute.snapshot_instance(instance_uuid, action_id, image_id, upload_url, image_name)``
    Snapshot the instance's root disk into a standalone qcow2 and upload it with
    ``PUT upload_url`` (streamed, ``Authorization: Token <CLOUDCTL_SERVICE_TOKEN>``, body = the
    qcow2 bytes). Live when the domain runs (the guest keeps running: libvirt block copy, paused at
    most briefly), cold when it is shut off. Expected task_state "image_snapshot"; when the copy is
    made it reports values ``{"task_state": "image_uploading"}`` (expected "image_snapshot"), and
    at the end ``{"task_state": None}`` plus the truthful vm_state/power_state (expected
    "image_uploading"). Progress goes in events with result "progress" (message e.g. "copied
    12.0 of 33.0 MiB"), which update the open event without closing it. On failure the server is
    left as it was (running or stopped) and the report carries ``fault``; the image service marks
    the image killed when its upload fails, and the conductor does when no upload was made. At
    most ``COMPUTE_MAX_CONCURRENT_SNAPSHOTS`` run at once on a host; the others wait.

Each reports ``conductor.instance_update`` with the expected task_state and ``action_id``: on
success ``values`` = the target (vm_state, task_state None, power_state) and an event named
``compute_<operation>_instance`` (e.g. ``compute_reboot_instance``), opened with result "start"
and closed with "success"; on failure ``values`` = the truth read from the hypervisor (vm_state
derived from the domain's real power state: running→active, paused→paused, suspended→suspended,
shutdown/crashed→stopped, no domain→error), task_state None, plus the event closed with "error"
and a ``fault``.

Conductor tasks (sent to ``conductor``):

``conductor.instance_update(instance_uuid, host, expected_task_state, values, event=None, fault=None,
action_id=None)``
    Compare-and-swap: applied only when the instance's ``task_state`` still equals
    ``expected_task_state`` and it lives on ``host``; otherwise dropped and logged. ``values`` may hold
    ``vm_state``, ``task_state``, ``power_state``. ``event`` is ``{"name", "result", "message"}``
    appended to the action ``action_id`` (else the instance's running action); ``fault`` is
    ``{"message", "code", "details"}``.
``conductor.power_state_update(host, instance_uuid, power_state, observed_at)``
    What the hypervisor says now (sent on every libvirt lifecycle event of a cloudctl domain;
    ``observed_at`` is the host's ``time.time()`` when it read the state). The conductor ignores
    observations older than the instance's last state change and instances with a task in flight.
``conductor.host_stopping(host)``
    Sent when a compute worker shuts down cleanly: the host is down from now on (no new servers,
    actions refused) instead of after ``SERVICE_DOWN_TIME`` without heartbeats.
``conductor.host_init(host, resources)``
    Sent once when a compute worker starts, before it consumes tasks: the same ``resources`` as a
    heartbeat (``instances`` lists every cloudctl domain with its power state). The conductor
    finishes or repeats what the restart interrupted (Nova's ``_init_instance``).
``conductor.build_failed(instance_uuid, host, fault, reschedule)``
    The spawn on ``host`` failed and everything it made there is cleaned up. ``reschedule`` is False
    when retrying elsewhere cannot help (for example a corrupt image).
``conductor.instance_destroyed(instance_uuid, host)``
    ``compute.terminate`` finished: the domain and its files are gone.
``conductor.host_heartbeat(host, resources)``
    Sent every ``COMPUTE_HEARTBEAT_INTERVAL`` seconds; see :data:`HEARTBEAT_RESOURCE_KEYS`.
"""

from __future__ import annotations

from typing import Any

SPEC_VERSION = 1

SCHEDULER_QUEUE = "scheduler"
CONDUCTOR_QUEUE = "conductor"
# Heartbeats and power-state observations travel on a queue of their own, so that a burst of them
# (1,000 hosts heartbeating) never delays an operation's report behind it; the conductor consumes
# both queues.
CONDUCTOR_STATUS_QUEUE = "conductor.status"
COMPUTE_QUEUE_PREFIX = "compute."

# Stable task names. Never rename one without keeping the old name registered.
SCHEDULE_INSTANCE = "scheduler.schedule_instance"

CONDUCTOR_INSTANCE_UPDATE = "conductor.instance_update"
CONDUCTOR_BUILD_FAILED = "conductor.build_failed"
CONDUCTOR_INSTANCE_DESTROYED = "conductor.instance_destroyed"
CONDUCTOR_HOST_HEARTBEAT = "conductor.host_heartbeat"
CONDUCTOR_POWER_STATE_UPDATE = "conductor.power_state_update"
CONDUCTOR_HOST_INIT = "conductor.host_init"
CONDUCTOR_HOST_STOPPING = "conductor.host_stopping"

COMPUTE_SPAWN = "compute.spawn"
COMPUTE_TERMINATE = "compute.terminate"
COMPUTE_CONSOLE_OUTPUT = "compute.get_console_output"
COMPUTE_REBOOT = "compute.reboot_instance"
COMPUTE_POWER_OFF = "compute.power_off_instance"
COMPUTE_POWER_ON = "compute.power_on_instance"
COMPUTE_PAUSE = "compute.pause_instance"
COMPUTE_UNPAUSE = "compute.unpause_instance"
COMPUTE_SUSPEND = "compute.suspend_instance"
COMPUTE_RESUME = "compute.resume_instance"
COMPUTE_SNAPSHOT = "compute.snapshot_instance"

REBOOT_SOFT = "SOFT"
REBOOT_HARD = "HARD"

# Power states, as Nova names them (what the hypervisor says).
POWER_NOSTATE = "nostate"
POWER_RUNNING = "running"
POWER_PAUSED = "paused"
POWER_SHUTDOWN = "shutdown"
POWER_CRASHED = "crashed"
POWER_SUSPENDED = "suspended"
POWER_STATES = (POWER_NOSTATE, POWER_RUNNING, POWER_PAUSED, POWER_SHUTDOWN, POWER_CRASHED,
                POWER_SUSPENDED)

# Keys of the ``resources`` dict of a heartbeat.
HEARTBEAT_RESOURCE_KEYS = (
    "libvirt_uri",          # str
    "driver",               # "libvirt" | "fake"
    "virt_type",            # "kvm" | "qemu" (what guests actually run with); "test" on libvirt's test://
    "hypervisor_type",      # e.g. "QEMU"
    "hypervisor_version",   # int, libvirt's encoding (7002000 = 7.2.0)
    "vcpus",                # int, physical CPUs usable by guests
    "memory_mb",            # int, total RAM
    "memory_mb_reserved",   # int, kept for the host itself
    "disk_gb",              # int, total of the filesystem holding INSTANCES_PATH
    "disk_gb_reserved",     # int
    "cpu_info",             # dict: arch, model, vendor, features (list)
    "instances",            # dict: instance uuid -> power state, for every cloudctl domain on the host
    "observed_at",          # float, the host's time.time() just before it listed the domains
)


def conductor_queue(task_name: str) -> str:
    """The conductor queue a report travels on: status reports apart from operation reports."""
    if task_name in (CONDUCTOR_HOST_HEARTBEAT, CONDUCTOR_POWER_STATE_UPDATE):
        return CONDUCTOR_STATUS_QUEUE
    return CONDUCTOR_QUEUE


def compute_queue(host: str) -> str:
    """The queue a host's compute worker consumes. The one place this mapping is made."""
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"invalid host name {host!r}")
    return f"{COMPUTE_QUEUE_PREFIX}{host}"


def domain_name(instance_uuid: str) -> str:
    """libvirt domain name of an instance; spawn is idempotent by it."""
    return f"instance-{instance_uuid}"


class SpecError(ValueError):
    """An instance spec is malformed or of a version this worker does not understand."""


def validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Check a spawn spec's shape and return it. Raises :class:`SpecError`.

    Spec, version 1::

        {
          "version": 1,
          "instance_uuid": "…", "name": "display name", "host": "…", "request_id": "req-…",
          "flavor": {"name": "m1.nano", "vcpus": 1, "memory_mb": 128, "root_gb": 1},
          "image": {"id": "…", "name": "tiny", "url": "http://…/api/v1/images/<id>/file",
                    "sha256": "…", "size": 123, "disk_format": "qcow2", "properties": {}},
          "networks": [], "key_data": null, "user_data": null
        }
    """
    if not isinstance(spec, dict):
        raise SpecError("spec must be a JSON object")
    if spec.get("version") != SPEC_VERSION:
        raise SpecError(f"unsupported spec version {spec.get('version')!r}, expected {SPEC_VERSION}")
    for key, kind in (("instance_uuid", str), ("name", str), ("host", str), ("flavor", dict),
                      ("image", dict)):
        if not isinstance(spec.get(key), kind):
            raise SpecError(f"spec.{key} must be a {kind.__name__}")
    for key in ("vcpus", "memory_mb", "root_gb"):
        value = spec["flavor"].get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SpecError(f"spec.flavor.{key} must be a non-negative integer")
    for key in ("id", "url", "sha256", "disk_format"):
        if not isinstance(spec["image"].get(key), str):
            raise SpecError(f"spec.image.{key} must be a string")
    if spec["image"]["disk_format"] not in ("qcow2", "raw"):
        raise SpecError(f"unsupported disk_format {spec['image']['disk_format']!r}")
    return spec
