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

``compute.network_dhcp_sync(network)`` (sent to the network node's queue, ``NETWORK_DHCP_HOST``)
    Converge the DHCP server of one network to ``network`` (:class:`DhcpNetworkSpec`): bridge,
    ``qdhcp-<network id>`` namespace, veth, dnsmasq with the hosts it may lease to; or remove it all
    (``deleted``). Idempotent; no report (the next sync carries the whole state again).
``compute.network_host_sync(state)`` (sent to each host's own queue)
    Converge the host's networking to ``state`` (:class:`HostNetworkState`): every network with a
    port here has its bridge and VXLAN interface, whose flood entries point at exactly ``peers``
    (the other hosts' tunnel IPs); every port listed has its security-group chains and
    anti-spoofing rules (:class:`PortSecuritySpec`); chains of ports not listed are removed, and so
    are bridges nothing uses. A removed rule also ends the connections it allowed (conntrack).
    Sent when the control plane changes any of it, after a worker's ``conductor.host_init`` and
    every ``NETWORK_RESYNC_INTERVAL`` seconds. ``generation`` grows with each state the control plane
    builds: a worker ignores a state older than the last it applied. Idempotent; no report.
``compute.network_router_sync(router)`` (sent to the network node's queue, ``NETWORK_NODE_HOST``)
    Converge one router (:class:`RouterSpec`): namespace ``qrouter-<router id>``, a veth into each
    subnet's bridge (``qr-``) and into the external network's bridge (``qg-``), IP forwarding, SNAT
    of the subnets behind it to the gateway address, and for each floating IP its address on ``qg-``
    (announced with a gratuitous ARP), DNAT to the fixed IP and SNAT back; or remove it all
    (``deleted``). Idempotent; no report.

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
    qcow2 bytes); an ``upload_url`` (as an image's ``url``) not under the worker's CLOUDCTL_API_URL
    is refused before any work or connection. Live when the domain runs (the guest keeps running:
    libvirt block copy, paused at most briefly), cold when it is shut off. Expected task_state
    "image_snapshot"; when the copy is made it reports values ``{"task_state": "image_uploading"}``
    (expected "image_snapshot"), and at the end ``{"task_state": None}`` plus the truthful
    vm_state/power_state (expected "image_uploading"). Progress goes in events with result
    "progress" (message e.g. "copied 12.0 of 33.0 MiB"), which update the open event without
    closing it. On failure the server is left as it was (running or stopped) and the report carries
    ``fault``; the image service marks the image killed when its upload fails, and the conductor
    does when no upload was made. At most ``COMPUTE_MAX_CONCURRENT_SNAPSHOTS`` run at once on a
    host; the others wait.

Migration tasks. Every one carries ``migration_id`` (the control plane's Migration record) and
reports with ``conductor.migration_update`` (below) instead of ``conductor.instance_update``; a task
whose step this host already completed for that migration is a logged no-op (a redelivery; journal
key ``migration-<id>-<step>``). Paths are the same on every host: ``INSTANCES_PATH/<uuid>/disk``.

``compute.check_can_migrate_destination(instance_uuid, source_host, source_cpu_info, image, live)``
    Synchronous call to the destination from the pre-flight task (scheduler's worker, migration
    "checking"), before anything is claimed or moved. Checks: no domain of the instance
    here (check "instance_exists"), the hypervisor answers ("hypervisor"), for ``live`` the source's
    CPU (``source_cpu_info``, a heartbeat ``cpu_info`` dict) with libvirt ``compareCPU`` ("cpu",
    skipped by drivers that cannot compare), the base ``image`` (spec v1 image dict) cached here or
    fetchable from its url ("image"). Creates a marker file ``INSTANCES_PATH/.shared-<token>`` for
    the shared-storage test (markers older than 10 min are removed on every check). Answers
    ``{"ok": True, "migration_uri": "qemu+tcp://<COMPUTE_MIGRATION_ADDRESS>/system",
    "migration_data_uri": "tcp://<COMPUTE_MIGRATION_ADDRESS>", "shared_marker": ".shared-<token>",
    "disk_free_bytes": int, "image_cached": bool, "cpu": "identical"|"superset"|"skipped"}`` or
    ``{"ok": False, "check": <name>, "message": str}``.
``compute.check_can_migrate_source(instance_uuid, shared_marker)``
    Synchronous call to the source: the domain exists here ("source", else), whether the marker is
    visible here (storage shared with the destination; the source then deletes it), the bytes the
    disk occupies. Answers ``{"ok": True, "shared_storage": bool, "power_state": str,
    "disk_bytes": int}`` or ``{"ok": False, "check": "source", "message": str}``.

Live migration (task_state ``migrating``):

``compute.pre_live_migration(instance_uuid, migration_id, spec, block_migration, shared_storage,
shared_marker)`` (destination)
    Removes the marker; makes the instance directory and an empty ``console.log``; fetches the base
    image into the cache; for ``block_migration`` creates the disk as spawn would (a qcow2 overlay of
    the base image, the flavor's size): libvirt then copies only the top layer
    (``VIR_MIGRATE_NON_SHARED_INC``). With ``shared_storage`` the directory is the source's: nothing
    is created but the cached image. Reports status "prepared", or "error" with ``error``.
``compute.live_migration(instance_uuid, migration_id, dest_host, migration_uri, migration_data_uri,
block_migration, shared_storage, completion_timeout)`` (source)
    Peer-to-peer live migration (persist on the destination, undefine here; ``NON_SHARED_INC`` for
    block migration; ``UNSAFE`` added on shared storage when ``COMPUTE_MIGRATION_UNSAFE`` says so).
    Reports "running" when the job started, then ``conductor.migration_progress`` at least every
    second, then one of: "migrated" (libvirt finished: the domain is gone here; the instance
    directory here is removed unless ``shared_storage``), "cancelled" (aborted on request: the
    domain runs here as before), "failed" (libvirt failed, or ``completion_timeout`` seconds passed
    and the job was aborted; ``error`` says which; the domain runs here), with ``values`` =
    ``{"power_state": ...}`` read afterwards (``nostate`` if the domain is not here).
    Converging: with ``COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY`` the job is started with
    ``VIR_MIGRATE_POSTCOPY`` (else, with ``COMPUTE_LIVE_MIGRATION_PERMIT_AUTO_CONVERGE``,
    ``VIR_MIGRATE_AUTO_CONVERGE``: QEMU throttles the guest's vCPUs). A switch-over (asked for with
    ``compute.live_migration_force_complete``, or when ``completion_timeout`` passes and
    ``COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION`` is ``force_complete``) switches a post-copy job to
    post-copy (libvirt ``migrateStartPostCopy``: the guest runs on the destination from then on,
    fetching the pages not yet copied) and reports status "running (post-copy)"; otherwise it pauses
    the guest (its memory stops changing, so the copy converges; libvirt resumes it on the
    destination) and reports "running" again. Both reports carry the event
    ``compute_live_migration_force_complete`` ("success"). When libvirt refuses (post-copy while a block
    migration still copies the disk) the job goes on and the switch-over is retried every second until
    libvirt takes it or the job ends; the first refusal is reported as "running" with that event,
    "progress" for a request, "error" for the timeout's. In post-copy the job can no longer be aborted
    (abort requests and the completion timeout are logged and ignored); if it fails, the guest is lost
    on both hosts: "failed" with ``values`` ``{"power_state"}`` read on the source (typically
    ``paused``) and an ``error`` saying the migration failed in post-copy.
``compute.abort_live_migration(instance_uuid, migration_id)`` (source)
    Abort the running migration job of that migration (libvirt ``abortJob``); the running
    ``compute.live_migration`` then reports "cancelled". No job running: a logged no-op.
``compute.live_migration_force_complete(instance_uuid, migration_id)`` (source)
    Ask the running ``compute.live_migration`` of that migration to switch over now (above). No such
    job running, or already switched: a logged no-op.
``compute.post_live_migration_at_destination(instance_uuid, migration_id, spec)`` (destination)
    The domain must exist and run here (libvirt says so): writes ``libvirt.xml`` from ``spec`` and
    reports "completed" with ``values`` ``{"power_state"}``; else "error" with ``error``.
``compute.rollback_live_migration_at_destination(instance_uuid, migration_id, shared_storage)``
    (destination) After a failed migration: removes any domain of the instance here that does not run
    and, unless ``shared_storage``, the instance directory. Reports "rolled_back".

Cold migration and resize (task_states ``resize_prep`` -> ``resize_migrating`` -> ``resize_finish``;
the old disk is kept on the source in ``INSTANCES_PATH/<uuid>_resize/`` until confirmed):

``compute.prep_resize(instance_uuid, migration_id, spec, shared_marker)`` (destination)
    Removes the marker; fetches the base image of ``spec`` (the new flavor's spec, for this host).
    Creates nothing in ``INSTANCES_PATH/<uuid>`` (on the same host it is the source's). Reports
    "prepared" or "error".
``compute.resize_instance(instance_uuid, migration_id, dest_host, migration_uri, timeout)`` (source)
    Power off (clean shutdown, ``timeout`` seconds, then forced), undefine the domain, rename the
    directory to ``<uuid>_resize``, copy its ``disk`` to the destination's ``INSTANCES_PATH/<uuid>/
    disk`` with libvirt storage volume streams (download here, upload over ``migration_uri``; on the
    same host or shared storage the same code copies within one filesystem). Reports "migrated"; on
    failure puts everything back as it was (directory, definition, running if it ran) and reports
    "error" with ``error`` and ``values`` ``{"power_state"}``.
``compute.finish_resize(instance_uuid, migration_id, spec, power_on)`` (destination)
    Grows the disk to ``spec``'s root_gb if larger, writes ``console.log``, defines the domain from
    ``spec``, starts it when ``power_on``. Reports "finished" with ``values`` ``{"power_state"}``, or
    "error" (nothing of it left defined here).
``compute.confirm_resize(instance_uuid, migration_id)`` (source)
    Removes ``<uuid>_resize`` (and any leftover domain definition on the source when it is another
    host). Reports "confirmed".
``compute.revert_resize(instance_uuid, migration_id)`` (destination)
    Destroys and undefines the domain here and removes ``INSTANCES_PATH/<uuid>`` (the copy; the
    original is in ``<uuid>_resize`` on the source). Reports "reverted_dest".
``compute.finish_revert_resize(instance_uuid, migration_id, spec, power_on)`` (source)
    Renames ``<uuid>_resize`` back to ``<uuid>``, defines the domain from ``spec`` (the old flavor),
    starts it when ``power_on``. Reports "reverted" with ``values`` ``{"power_state"}``, or "error".

Evacuation (Nova's evacuate: a server rebuilt on another host because its own host is down and
fenced; migration type "evacuation", reports with ``conductor.migration_update``, journal key
``migration-<id>-<step>`` as above):

``compute.rebuild_instance(instance_uuid, migration_id, spec, on_shared_storage, power_on)`` (destination)
    Build the instance here for a host that died. With ``on_shared_storage`` the instance directory
    (``INSTANCES_PATH/<uuid>/disk``) is the dead host's, on storage both hosts mount (their heartbeats
    report the same ``storage_id``): the disk is used as it is (only its base image is fetched into
    the cache), and a missing disk is an error (nothing is ever created in its place). Without it the
    disk is created from ``spec``'s image as spawn creates it (a leftover directory of the instance
    here is replaced): the old root disk's data is lost, which the control plane only asks for when
    the user allowed it. Then, as spawn: ``console.log``, the domain defined from ``spec`` (its ports
    plugged), started when ``power_on``. A domain of the instance already here (a redelivery) is
    reported as it is, never built twice. Reports "rebuilt" with ``values`` ``{"power_state"}``, or
    "error" with ``error`` (nothing of it left defined here; on shared storage the disk is never
    removed).
``compute.destroy_evacuated(instance_uuid, migration_id, keep_disks)`` (the host that came back)
    Sent after ``conductor.host_init`` of a host whose server was evacuated while it was down: the
    stale domain is destroyed and undefined (never started), and ``INSTANCES_PATH/<uuid>`` removed
    unless ``keep_disks`` (shared storage: the directory is the new host's). Nothing there is
    success. Reports "source_cleaned" (or "error" with ``error``).

Each reports ``conductor.instance_update`` with the expected task_state and ``action_id``: on
success ``values`` = the target (vm_state, task_state None, power_state) and an event named
``compute_<operation>_instance`` (e.g. ``compute_reboot_instance``), opened with result "start"
and closed with "success"; on failure ``values`` = the truth read from the hypervisor (vm_state
derived from the domain's real power state: running→active, paused→paused, suspended→suspended,
shutdown/crashed→stopped, no domain→error), task_state None, plus the event closed with "error"
and a ``fault``.

Conductor tasks (sent to ``conductor``), keyword arguments only, each signed by the host named in its
``host`` argument (message headers ``cloudctl_host``, ``cloudctl_ts``, ``cloudctl_sig``: see
:mod:`compute_workers.credentials`); the conductor drops any report whose signature does not prove it:

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
``conductor.migration_update(migration_id, host, status, error=None, values=None, event=None)``
    A step of a migration ended on ``host`` (statuses above). ``values`` may hold ``power_state``;
    a live migration's ``completed`` may add ``progress`` (the final figures, keys as in
    ``migration_progress``) and ``downtime_ms`` (how long the guest was paused for the switch-over);
    ``event`` is ``{"name", "result", "message"}`` for the migration's action. The conductor applies a
    status only in the order it expects (a redelivered or late report is dropped) and sends the next
    step.
``conductor.migration_progress(migration_id, host, progress)`` (queue ``conductor.status``)
    ``progress``: ``{"memory_total", "memory_processed", "memory_remaining", "disk_total",
    "disk_processed", "disk_remaining"}`` in bytes (libvirt job info) plus ``"observed_at"`` (epoch).
``conductor.host_heartbeat(host, resources)``
    Sent every ``COMPUTE_HEARTBEAT_INTERVAL`` seconds; see :data:`HEARTBEAT_RESOURCE_KEYS`. It is also
    the host's word on builds: a server spawning on ``host`` for longer than ``BUILD_REPORT_GRACE``
    whose domain ``instances`` lists running, observed after the build started, and which is not
    ``busy`` (no spawn runs for it any more) is completed as its lost spawn report would have
    (the report, when it comes later, is dropped as stale).

Delivery: a worker keeps a report the broker does not take in its outbox (``INSTANCES_PATH/_reports/<host>``)
and sends it again, in order and signed anew, when the broker answers (heartbeats, ``host_init``,
``host_stopping`` and ``migration_progress`` are not kept: the next one supersedes them). A report may
therefore arrive late, or twice; every conductor task above is a compare-and-swap that drops it then.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal, NotRequired, TypedDict

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
# The pre-flight checks of a requested migration (status "checking"), off the API's request thread.
MIGRATION_PREFLIGHT = "scheduler.migration_preflight"

CONDUCTOR_INSTANCE_UPDATE = "conductor.instance_update"
CONDUCTOR_BUILD_FAILED = "conductor.build_failed"
CONDUCTOR_INSTANCE_DESTROYED = "conductor.instance_destroyed"
CONDUCTOR_HOST_HEARTBEAT = "conductor.host_heartbeat"
CONDUCTOR_POWER_STATE_UPDATE = "conductor.power_state_update"
CONDUCTOR_HOST_INIT = "conductor.host_init"
CONDUCTOR_HOST_STOPPING = "conductor.host_stopping"
CONDUCTOR_MIGRATION_UPDATE = "conductor.migration_update"
CONDUCTOR_MIGRATION_PROGRESS = "conductor.migration_progress"

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
COMPUTE_CHECK_MIGRATE_DESTINATION = "compute.check_can_migrate_destination"
COMPUTE_CHECK_MIGRATE_SOURCE = "compute.check_can_migrate_source"
COMPUTE_PRE_LIVE_MIGRATION = "compute.pre_live_migration"
COMPUTE_LIVE_MIGRATION = "compute.live_migration"
COMPUTE_ABORT_LIVE_MIGRATION = "compute.abort_live_migration"
COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE = "compute.live_migration_force_complete"
COMPUTE_POST_LIVE_MIGRATION_AT_DEST = "compute.post_live_migration_at_destination"
COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST = "compute.rollback_live_migration_at_destination"
COMPUTE_PREP_RESIZE = "compute.prep_resize"
COMPUTE_RESIZE_INSTANCE = "compute.resize_instance"
COMPUTE_FINISH_RESIZE = "compute.finish_resize"
COMPUTE_CONFIRM_RESIZE = "compute.confirm_resize"
COMPUTE_REVERT_RESIZE = "compute.revert_resize"
COMPUTE_FINISH_REVERT_RESIZE = "compute.finish_revert_resize"
COMPUTE_REBUILD_INSTANCE = "compute.rebuild_instance"
COMPUTE_DESTROY_EVACUATED = "compute.destroy_evacuated"
COMPUTE_NETWORK_DHCP_SYNC = "compute.network_dhcp_sync"
COMPUTE_NETWORK_HOST_SYNC = "compute.network_host_sync"
COMPUTE_NETWORK_ROUTER_SYNC = "compute.network_router_sync"

# Statuses a compute worker reports with conductor.migration_update.
MIGRATION_PREPARED = "prepared"
MIGRATION_RUNNING = "running"
MIGRATION_RUNNING_POSTCOPY = "running (post-copy)"  # Nova's name: switched over, no abort possible
MIGRATION_MIGRATED = "migrated"
MIGRATION_COMPLETED = "completed"
MIGRATION_CANCELLED = "cancelled"
MIGRATION_FAILED = "failed"
MIGRATION_ERROR = "error"
MIGRATION_ROLLED_BACK = "rolled_back"
MIGRATION_FINISHED = "finished"
MIGRATION_CONFIRMED = "confirmed"
MIGRATION_REVERTED_DEST = "reverted_dest"
MIGRATION_REVERTED = "reverted"
MIGRATION_REBUILT = "rebuilt"                # evacuation: the server runs (or is defined) on the destination
MIGRATION_SOURCE_CLEANED = "source_cleaned"  # evacuation: the host that came back removed its stale copy
# The event of a switch-over (its request opens it; the source's report, or the migration's end, closes it).
FORCE_COMPLETE_EVENT = "compute_live_migration_force_complete"
MIGRATION_PROGRESS_KEYS = ("memory_total", "memory_processed", "memory_remaining", "disk_total",
                           "disk_processed", "disk_remaining")
RESIZE_DIR_SUFFIX = "_resize"

REBOOT_SOFT = "SOFT"
REBOOT_HARD = "HARD"



class VmState(StrEnum):
    """Where an instance rests (Nova's ``vm_states``); the control plane's choices derive from it."""

    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    RESIZED = "resized"
    ERROR = "error"
    DELETED = "deleted"


class TaskState(StrEnum):
    """The operation in flight (Nova's ``task_states``); None when the instance is idle."""

    SCHEDULING = "scheduling"
    SPAWNING = "spawning"
    REBOOTING = "rebooting"
    REBOOTING_HARD = "rebooting_hard"
    POWERING_OFF = "powering_off"
    POWERING_ON = "powering_on"
    PAUSING = "pausing"
    UNPAUSING = "unpausing"
    SUSPENDING = "suspending"
    RESUMING = "resuming"
    IMAGE_SNAPSHOT = "image_snapshot"
    IMAGE_UPLOADING = "image_uploading"
    MIGRATING = "migrating"
    RESIZE_PREP = "resize_prep"
    RESIZE_MIGRATING = "resize_migrating"
    RESIZE_FINISH = "resize_finish"
    RESIZE_REVERTING = "resize_reverting"
    RESIZE_CONFIRMING = "resize_confirming"
    REBUILDING = "rebuilding"  # evacuation: rebuilt on another host because its own is down and fenced
    DELETING = "deleting"


class PowerState(StrEnum):
    """What the hypervisor says of a domain, as Nova names it."""

    NOSTATE = "nostate"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    SUSPENDED = "suspended"


# The vm_state that tells the truth about a domain in a given power state (a failed operation
# reports it; the conductor's power-state sync and restart recovery apply it). The one copy.
VM_STATE_OF_POWER_STATE: dict[PowerState, VmState] = {
    PowerState.RUNNING: VmState.ACTIVE,
    PowerState.PAUSED: VmState.PAUSED,
    PowerState.SUSPENDED: VmState.SUSPENDED,
    PowerState.SHUTDOWN: VmState.STOPPED,
    PowerState.CRASHED: VmState.STOPPED,
    PowerState.NOSTATE: VmState.ERROR,
}


class EventResult(StrEnum):
    """The result a compute worker reports for a step (an event of an instance action).

    ``start`` opens the step, ``progress`` updates its message and keeps it open, ``success`` and
    ``error`` close it (recorded as :class:`ActionResult`); ``cancelled`` closes a live migration's step
    that an abort ended.
    """

    START = "start"
    PROGRESS = "progress"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"


class ActionResult(StrEnum):
    """How an instance action, or one of its events, ended (Nova's spelling)."""

    SUCCESS = "Success"
    ERROR = "Error"


# Kept for the call sites written before the enumerations; new code uses PowerState.
POWER_NOSTATE = PowerState.NOSTATE
POWER_RUNNING = PowerState.RUNNING
POWER_PAUSED = PowerState.PAUSED
POWER_SHUTDOWN = PowerState.SHUTDOWN
POWER_CRASHED = PowerState.CRASHED
POWER_SUSPENDED = PowerState.SUSPENDED
POWER_STATES = tuple(PowerState)


class FlavorSpec(TypedDict):
    name: str
    vcpus: int
    memory_mb: int
    root_gb: int


class ImageSpec(TypedDict):
    id: str
    name: NotRequired[str]
    url: str
    sha256: str
    size: NotRequired[int]
    disk_format: Literal["qcow2", "raw"]
    properties: NotRequired[dict[str, Any]]


# --- networks of a spawn spec -------------------------------------------------------------------------
# Each entry is one port of the instance, in NIC order (eth0 first): everything the host needs to plug
# it without asking the control plane (Neutron's linuxbridge agent's names). The compute worker ensures
# the bridge (and the network's VXLAN) before the domain starts; libvirt makes the tap.

# Linux limits interface names to 15 characters (IFNAMSIZ - 1): a 3-letter prefix and 11 of the id.
DEVICE_NAME_ID_CHARS = 11


def bridge_name(network_id: str) -> str:
    """The host's Linux bridge of a network: ``brq`` + the first 11 characters of its id."""
    return f"brq{network_id[:DEVICE_NAME_ID_CHARS]}"


def tap_name(port_id: str) -> str:
    """The tap device of a port (the guest's NIC on the host): ``tap`` + the first 11 characters of
    the port's id."""
    return f"tap{port_id[:DEVICE_NAME_ID_CHARS]}"


class FixedIPSpec(TypedDict):
    """An address of the port: the subnet's CIDR gives the prefix length, ``gateway_ip`` is null
    when the subnet has no gateway."""

    ip_address: str
    subnet_id: str
    cidr: str
    gateway_ip: str | None


class SecurityRuleSpec(TypedDict):
    """One security-group rule of a port, resolved for the host.

    ``protocol``: "tcp", "udp", "icmp", "icmpv6" or an IP protocol number as a string; null: any.
    For tcp/udp the port range (null: all ports); for icmp ``port_range_min`` is the ICMP type and
    ``port_range_max`` the code (null: any). ``remote_ip_prefixes``: the peers the rule admits,
    already resolved (a ``remote_ip_prefix``, or the fixed IPs of the ``remote_group``'s member
    ports as /32 or /128); null admits any address; an empty list admits none (a remote group with
    no members).
    """

    direction: Literal["ingress", "egress"]
    ethertype: Literal["IPv4", "IPv6"]
    protocol: str | None
    port_range_min: int | None
    port_range_max: int | None
    remote_ip_prefixes: list[str] | None


class AllowedAddress(TypedDict):
    """A source a port may send from (anti-spoofing): its MAC with one of its fixed IPs."""

    mac_address: str
    ip_address: str


class PortSecuritySpec(TypedDict):
    """The filtering of one port's tap (Neutron's iptables firewall, with conntrack).

    ``enabled`` False: no filtering and no anti-spoofing (a port with port security off).
    Otherwise traffic to the guest passes only if it belongs to an established connection or an
    ``ingress`` rule admits it; traffic from the guest must come from one of ``allowed_addresses``
    (plus DHCP requests from its MAC with source 0.0.0.0, and ARP for its own addresses) and pass
    an ``egress`` rule. DHCP replies to the guest are always allowed; DHCP replies from the guest
    are always dropped.
    """

    enabled: bool
    allowed_addresses: list[AllowedAddress]
    rules: list[SecurityRuleSpec]


class NetworkSpec(TypedDict):
    """One entry of ``SpawnSpec["networks"]`` (spec version 1): a port to plug before the guest
    starts, in the order of the guest's NICs.

    ``bridge`` is :func:`bridge_name` of ``network_id`` and ``tap`` is :func:`tap_name` of
    ``port_id``, sent so that both sides name devices the same way; the domain gets
    ``<interface type='bridge'>`` on ``bridge`` with target dev ``tap``, model virtio, MAC
    ``mac_address`` and ``mtu``. ``segmentation_id`` is the VXLAN VNI (null for ``flat``).
    """

    port_id: str
    network_id: str
    mac_address: str
    fixed_ips: list[FixedIPSpec]
    mtu: int
    provider_type: Literal["vxlan", "flat"]
    segmentation_id: int | None
    bridge: str
    tap: str
    # The port's filtering, applied before the guest starts (so before a live migration's
    # switch-over too); absent in specs built before security groups: no filtering.
    security: NotRequired[PortSecuritySpec]


class HostNetwork(TypedDict):
    """A network with a port on the host: its bridge and, for vxlan, the tunnel peers to flood to."""

    network_id: str
    bridge: str
    provider_type: Literal["vxlan", "flat"]
    segmentation_id: int | None
    mtu: int
    peers: list[str]  # tunnel IPs of the other hosts with a port on this network (vxlan only)


class HostNetworkState(TypedDict):
    """What ``compute.network_host_sync`` converges a host's networking to (the whole of it).

    ``ports``: the ports bound to the host or being live-migrated to it, each with ``security``.
    """

    host: str
    generation: int  # grows with each state built; an older one than the last applied is ignored
    networks: list[HostNetwork]
    ports: list[NetworkSpec]


class RouterPortSpec(TypedDict):
    """A router's leg on a network: the veth end ``qr-`` (``qg-`` for the gateway) + the first 11
    characters of ``port_id`` in the router's namespace; its host end, :func:`tap_name` of the
    port, is on ``bridge``."""

    port_id: str
    network_id: str
    bridge: str
    provider_type: Literal["vxlan", "flat"]
    segmentation_id: int | None
    mtu: int
    mac_address: str
    ip_address: str
    cidr: str
    gateway_ip: str | None  # the external subnet's gateway: the default route, on the gateway port


class FloatingIPSpec(TypedDict):
    floating_ip_id: str
    floating_ip_address: str
    fixed_ip_address: str


class RouterSpec(TypedDict):
    """What ``compute.network_router_sync`` converges a router to, on the network node.

    ``gateway``: the router's port on the external network (null: no external gateway, hence no
    SNAT and no floating IPs). ``enable_snat``: the subnets behind it reach outside as the
    gateway's address. ``interfaces``: its ports on tenant subnets (``ip_address`` is the subnet's
    gateway). ``floating_ips``: the associated floating IPs only. ``deleted``: remove all of it.
    """

    router_id: str
    deleted: bool
    gateway: RouterPortSpec | None
    enable_snat: bool
    interfaces: list[RouterPortSpec]
    floating_ips: list[FloatingIPSpec]


class DhcpSubnet(TypedDict):
    """A subnet a network's DHCP server serves (``enable_dhcp``)."""

    subnet_id: str
    cidr: str
    gateway_ip: str | None
    dns_nameservers: list[str]


class DhcpHost(TypedDict):
    """A port that gets a lease: only known MACs do (dnsmasq's hosts file)."""

    mac_address: str
    ip_address: str
    hostname: str


class DhcpNetworkSpec(TypedDict):
    """What ``compute.network_dhcp_sync`` converges a network's DHCP server to, on the network node.

    The worker makes the network's bridge (as for a guest's port), a namespace
    ``qdhcp-<network id>`` joined to the bridge by a veth pair whose namespace end has the DHCP
    port's MAC and address, and one dnsmasq there (``--no-resolv``: it forwards no DNS) serving
    ``subnets`` to ``hosts`` only. ``deleted``: remove all of it. Every call sends the whole state,
    so a redelivered or reordered call converges to what the control plane holds now.
    """

    network_id: str
    deleted: bool
    bridge: str
    provider_type: Literal["vxlan", "flat"]
    segmentation_id: int | None
    mtu: int
    dhcp_port: FixedIPSpec | None  # its ip_address/cidr; the MAC is dhcp_mac
    dhcp_mac: str
    subnets: list[DhcpSubnet]
    hosts: list[DhcpHost]
    lease_seconds: int


class SpawnSpec(TypedDict):
    """The self-contained description of an instance a compute worker builds (version 1)."""

    version: int
    instance_uuid: str
    name: str
    host: str
    request_id: NotRequired[str]
    flavor: FlavorSpec
    image: ImageSpec
    networks: NotRequired[list[NetworkSpec]]  # the instance's ports; [] or absent: no NIC
    key_data: NotRequired[str | None]
    user_data: NotRequired[str | None]


class Event(TypedDict):
    """A step of an action, as reported: ``{"name", "result", "message"}``."""

    name: str
    result: str
    message: str


class Fault(TypedDict):
    """Why an instance is in ERROR (or why an action failed): ``{"message", "code", "details"}``."""

    message: str
    code: int
    details: str


class InstanceValues(TypedDict, total=False):
    """The fields a compute worker may set on an instance with ``conductor.instance_update``."""

    vm_state: str
    task_state: str | None
    power_state: str


class MigrationProgress(TypedDict, total=False):
    """libvirt's job figures of a migration, in bytes, and when they were read (epoch seconds)."""

    memory_total: int
    memory_processed: int
    memory_remaining: int
    disk_total: int
    disk_processed: int
    disk_remaining: int
    observed_at: float


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
    "busy",                 # list of the instance uuids an operation (spawn, reboot, ...) runs on now
    "tunnel_ip",            # str, COMPUTE_TUNNEL_IP (this host's VXLAN endpoint); "" when unset
    "storage_id",           # str, INSTANCES_PATH/.storage-id (see check_storage_id); "" when unreadable
)

# What ``INSTANCES_PATH/.storage-id`` holds: a uuid4 hex written once (O_CREAT|O_EXCL) by the first host
# that finds it missing. Hosts reporting the same non-empty id share their instances directory.
STORAGE_ID = re.compile(r"^[0-9a-f]{32}$")


def check_storage_id(value: Any) -> str:
    """The heartbeat's ``storage_id``: a :data:`STORAGE_ID` or "" (unknown: shares with nobody); a
    missing key (a worker older than it) is "" too. Raises :class:`ReportError` for anything else."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not STORAGE_ID.match(value):
        raise ReportError(f"storage_id must be 32 lower-case hex digits or empty, not {value!r}")
    return value


def conductor_queue(task_name: str) -> str:
    """The conductor queue a report travels on: status reports apart from operation reports."""
    if task_name in (CONDUCTOR_HOST_HEARTBEAT, CONDUCTOR_POWER_STATE_UPDATE,
                     CONDUCTOR_MIGRATION_PROGRESS):
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


# What the workers accept of the network part of their messages (the control plane keeps to the same).
MTU_MIN, MTU_MAX = 68, 65535
VNI_MIN, VNI_MAX = 1, 2 ** 24 - 1
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")  # safe in device names, paths and command lines
MAC_ADDRESS = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_id(value: Any, where: str) -> str:
    """``value`` if it is an id that may go into a device name, a path or a command line (letters,
    digits and ``-``, at most 64, not starting with ``-``); else :class:`SpecError` naming ``where``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise SpecError(f"{where} must be an id (letters, digits and '-'), not {value!r}")
    return value


def check_mac(value: Any, where: str) -> str:
    """``value`` if it is a MAC address ``xx:xx:xx:xx:xx:xx``; else :class:`SpecError` naming ``where``."""
    if not isinstance(value, str) or not MAC_ADDRESS.match(value):
        raise SpecError(f"{where} must be a MAC address, not {value!r}")
    return value


def check_bridge(value: Any, where: str) -> None:
    """``value`` (a dict) names a network and its bridge: ``network_id`` an id, ``bridge`` its
    :func:`bridge_name`. Raises :class:`SpecError` naming ``where``."""
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be an object")
    network_id = check_id(value.get("network_id"), f"{where}.network_id")
    if value.get("bridge") != bridge_name(network_id):
        raise SpecError(f"{where}.bridge must be {bridge_name(network_id)}, not {value.get('bridge')!r}")


def check_bridge_network(value: Any, where: str) -> None:
    """``value`` (a dict) holds a well-formed network on a bridge, the fields every network message
    shares (:class:`NetworkSpec`, :class:`HostNetwork`, :class:`RouterPortSpec`,
    :class:`DhcpNetworkSpec`): :func:`check_bridge`; ``provider_type`` vxlan or flat;
    ``segmentation_id`` a VNI in ``VNI_MIN..VNI_MAX`` for vxlan, null for flat; ``mtu`` in
    ``MTU_MIN..MTU_MAX``. Other keys are the caller's to check. Raises :class:`SpecError` naming
    ``where``."""
    check_bridge(value, where)
    provider, vni = value.get("provider_type"), value.get("segmentation_id")
    if provider not in ("vxlan", "flat"):
        raise SpecError(f"{where}.provider_type must be vxlan or flat, not {provider!r}")
    if provider == "vxlan" and not _integer(vni, VNI_MIN, VNI_MAX):
        raise SpecError(f"{where}.segmentation_id must be a VNI in {VNI_MIN}..{VNI_MAX} for a vxlan "
                        f"network, not {vni!r}")
    if provider == "flat" and vni is not None:
        raise SpecError(f"{where}.segmentation_id must be null for a flat network, not {vni!r}")
    if not _integer(value.get("mtu"), MTU_MIN, MTU_MAX):
        raise SpecError(f"{where}.mtu must be an integer in {MTU_MIN}..{MTU_MAX}, not {value.get('mtu')!r}")


def check_networks(networks: Any, where: str = "spec.networks") -> None:
    """Each entry of ``networks`` (``spec.networks``, or a host network state's ``ports``) is a
    :class:`NetworkSpec`: a :func:`check_bridge_network` whose MAC is one and whose tap is
    :func:`tap_name` of its port, with its fixed IPs. Raises :class:`SpecError` naming ``where``."""
    if not isinstance(networks, list):
        raise SpecError(f"{where} must be a list")
    for i, nic in enumerate(networks):
        at = f"{where}[{i}]"
        check_bridge_network(nic, at)
        port_id = nic.get("port_id")
        if not isinstance(port_id, str) or not port_id:
            raise SpecError(f"{at}.port_id must be a non-empty string")
        check_mac(nic.get("mac_address"), f"{at}.mac_address")
        if nic.get("tap") != tap_name(port_id):
            raise SpecError(f"{at}.tap must be {tap_name(port_id)}, not {nic.get('tap')!r}")
        fixed_ips = nic.get("fixed_ips")
        if not isinstance(fixed_ips, list):
            raise SpecError(f"{at}.fixed_ips must be a list")
        for j, fixed in enumerate(fixed_ips):
            if not isinstance(fixed, dict):
                raise SpecError(f"{at}.fixed_ips[{j}] must be an object")
            for key in ("ip_address", "subnet_id", "cidr"):
                if not isinstance(fixed.get(key), str):
                    raise SpecError(f"{at}.fixed_ips[{j}].{key} must be a string")
            if not isinstance(fixed.get("gateway_ip"), str | None):
                raise SpecError(f"{at}.fixed_ips[{j}].gateway_ip must be a string or null")


def validate_spec(spec: Any) -> SpawnSpec:
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
    check_networks(spec.get("networks", []))
    return spec  # type: ignore[return-value]  # its shape is what was just checked


class ReportError(ValueError):
    """A compute worker's report does not have the contract's shape (the conductor drops it)."""


def _member(enum: type[StrEnum], value: Any, what: str) -> str:
    try:
        return enum(value)
    except ValueError:
        raise ReportError(f"{what} {value!r} is not one of {[m.value for m in enum]}") from None


def validate_values(values: Any) -> InstanceValues:
    """The ``values`` of an instance report: only the instance fields a worker may set, each a member of
    its enumeration (task_state may be None). Raises :class:`ReportError`."""
    if not isinstance(values, dict):
        raise ReportError("values must be a JSON object")
    unknown = set(values) - set(InstanceValues.__annotations__)
    if unknown:
        raise ReportError(f"values cannot set {sorted(unknown)}")
    checked: InstanceValues = {}
    if "vm_state" in values:
        checked["vm_state"] = _member(VmState, values["vm_state"], "vm_state")
    if "task_state" in values:
        task = values["task_state"]
        checked["task_state"] = None if task is None else _member(TaskState, task, "task_state")
    if "power_state" in values:
        checked["power_state"] = _member(PowerState, values["power_state"], "power_state")
    return checked


def validate_event(event: Any) -> Event | None:
    """The ``event`` of a report (None stays None). Raises :class:`ReportError`."""
    if event is None:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("name"), str) or not event["name"]:
        raise ReportError("event must be an object with a non-empty name")
    return {"name": event["name"], "result": _member(EventResult, event.get("result"), "event result"),
            "message": str(event.get("message") or "")}


def validate_fault(fault: Any) -> Fault | None:
    """The ``fault`` of a report (None stays None). Raises :class:`ReportError`."""
    if fault is None:
        return None
    if not isinstance(fault, dict) or not isinstance(fault.get("message"), str):
        raise ReportError("fault must be an object with a message")
    code = fault.get("code", 500)
    if not isinstance(code, int) or isinstance(code, bool):
        raise ReportError(f"fault code {code!r} is not an integer")
    return {"message": fault["message"], "code": code, "details": str(fault.get("details") or "")}


def validate_progress(progress: Any) -> MigrationProgress:
    """A migration's progress figures: non-negative integers under the contract's keys, plus
    ``observed_at``; other keys are dropped. Raises :class:`ReportError`."""
    if not isinstance(progress, dict):
        raise ReportError("progress must be a JSON object")
    checked: MigrationProgress = {}
    for key in MIGRATION_PROGRESS_KEYS:
        if key in progress:
            value = progress[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ReportError(f"progress.{key} must be a non-negative integer, not {value!r}")
            checked[key] = value  # type: ignore[literal-required]
    if isinstance(progress.get("observed_at"), int | float):
        checked["observed_at"] = float(progress["observed_at"])
    return checked
