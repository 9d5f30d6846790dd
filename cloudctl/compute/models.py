"""Flavors, hosts, instances, resource claims and the record of every action."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from cloudctl.compute.states import PowerState, TaskState, VmState, derive_status
from cloudctl.identity.models import Project
from cloudctl.images.models import Image


class Flavor(models.Model):
    name = models.CharField(max_length=64, unique=True)
    vcpus = models.PositiveIntegerField()
    memory_mb = models.PositiveIntegerField()
    root_gb = models.PositiveIntegerField()
    is_public = models.BooleanField(default=True)
    extra_specs = models.JSONField(default=dict, blank=True)
    disabled = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("memory_mb", "vcpus", "name")

    def __str__(self) -> str:
        return f"{self.name} ({self.vcpus} vCPU, {self.memory_mb} MiB, {self.root_gb} GiB)"


class Host(models.Model):
    """A compute service on a hypervisor host, created by its first heartbeat."""

    name = models.CharField(max_length=255, unique=True)
    libvirt_uri = models.CharField(max_length=255, blank=True)
    driver = models.CharField(max_length=32, blank=True)
    virt_type = models.CharField(max_length=16, blank=True)
    # Set from the host's aggregates (the one naming a zone); empty: DEFAULT_AVAILABILITY_ZONE.
    availability_zone = models.CharField(max_length=255, blank=True, editable=False)
    enabled = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=255, blank=True)
    # Nova's service force-down: an admin (or a fencing command that succeeded) says the host is off.
    # It is down whatever its heartbeats say until this is cleared; only then may its servers be
    # evacuated (rebuilt elsewhere) without the risk of running twice.
    forced_down = models.BooleanField(default=False)
    forced_down_reason = models.CharField(max_length=255, blank=True)
    forced_down_at = models.DateTimeField(null=True, blank=True)
    # HOST_FENCE_COMMAND's last attempt on this host (the periodic task retries a failed one after
    # HOST_FENCE_RETRY_INTERVAL) and what it said: empty until it ran.
    fence_attempted_at = models.DateTimeField(null=True, blank=True)
    fence_message = models.TextField(blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    vcpus = models.PositiveIntegerField(default=0)
    memory_mb = models.PositiveIntegerField(default=0)
    memory_mb_reserved = models.PositiveIntegerField(default=0)
    disk_gb = models.PositiveIntegerField(default=0)
    disk_gb_reserved = models.PositiveIntegerField(default=0)
    hypervisor_type = models.CharField(max_length=64, blank=True)
    hypervisor_version = models.BigIntegerField(default=0)
    cpu_info = models.JSONField(default=dict, blank=True)
    reported_instances = models.JSONField(default=dict, blank=True,
                                          help_text="uuid -> power state, from the last heartbeat")
    reported_at = models.DateTimeField(
        null=True, blank=True, help_text="when the host read the states of reported_instances (its clock)")
    # The host's VXLAN endpoint (its COMPUTE_TUNNEL_IP, from the heartbeat): the other hosts' flood
    # entries for the vxlan networks they share point here. "": none (flat networks only).
    tunnel_ip = models.CharField(max_length=64, blank=True, default="",
                                 help_text="VXLAN tunnel endpoint (COMPUTE_TUNNEL_IP), from the heartbeat")
    # The id of the filesystem holding the host's INSTANCES_PATH (its .storage-id file, from the
    # heartbeat): hosts with the same non-empty id share their instances directory.
    storage_id = models.CharField(max_length=64, blank=True, default="",
                                  help_text="id of the storage holding INSTANCES_PATH, from the heartbeat")
    # The generation of the host's key (HMAC(CLOUDCTL_HOST_KEY_SECRET, "host:<name>:<generation>"),
    # compute_workers.credentials): `manage.py host_credentials --rotate` bumps it, revoking the old key.
    key_generation = models.PositiveIntegerField(
        default=1, help_text="generation of the host key its reports are signed with (host_credentials)")
    # Per-host overrides; null means the global setting.
    cpu_allocation_ratio = models.FloatField(null=True, blank=True)
    ram_allocation_ratio = models.FloatField(null=True, blank=True)
    disk_allocation_ratio = models.FloatField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("name",)

    # The reason a host heard of for the first time joins disabled with (unless COMPUTE_TRUSTED_HOSTS
    # names it): until an admin enables it, it is trusted with nothing, not even a server it claims.
    NEW_HOST_REASON = ("new host: enable it once you trust it (COMPUTE_TRUSTED_HOSTS lists the hosts that "
                       "join enabled)")

    def __str__(self) -> str:
        return self.name

    @property
    def awaiting_trust(self) -> bool:
        """Joined disabled as a new host, and not enabled by an admin since."""
        return not self.enabled and self.disabled_reason == self.NEW_HOST_REASON

    @property
    def heartbeat_recent(self) -> bool:
        """A heartbeat came within SERVICE_DOWN_TIME (a worker that stopped cleanly has none), whatever
        ``forced_down`` says: the host's own word that its worker runs."""
        if self.last_heartbeat is None:
            return False
        return timezone.now() - self.last_heartbeat < timedelta(seconds=settings.SERVICE_DOWN_TIME)

    @property
    def is_up(self) -> bool:
        return not self.forced_down and self.heartbeat_recent

    @property
    def ratios(self) -> dict[str, float]:
        """Allocation ratios in force: the host's own, else the settings'."""
        return {"cpu": self.cpu_allocation_ratio or settings.CPU_ALLOCATION_RATIO,
                "ram": self.ram_allocation_ratio or settings.RAM_ALLOCATION_RATIO,
                "disk": self.disk_allocation_ratio or settings.DISK_ALLOCATION_RATIO}

    @property
    def zone(self) -> str:
        return self.availability_zone or settings.DEFAULT_AVAILABILITY_ZONE


class Aggregate(models.Model):
    """Hosts grouped with metadata, as Nova's host aggregates; one may name an availability zone,
    which then is the zone of its hosts."""

    name = models.CharField(max_length=255, unique=True)
    availability_zone = models.CharField(max_length=255, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    hosts = models.ManyToManyField(Host, blank=True, related_name="aggregates")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class ServerGroupPolicy(models.TextChoices):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"
    SOFT_AFFINITY = "soft-affinity"
    SOFT_ANTI_AFFINITY = "soft-anti-affinity"


class ServerGroup(models.Model):
    """Servers placed together (affinity) or apart (anti-affinity); soft policies only prefer."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    policy = models.CharField(max_length=32, choices=ServerGroupPolicy.choices)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="server_groups")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("name", "created")

    def __str__(self) -> str:
        return f"{self.name} ({self.policy})"


class InstanceQuerySet(models.QuerySet["Instance"]):
    def change(self, **values: Any) -> int:
        """UPDATE with the bookkeeping every state change needs: ``updated``, and
        ``task_state_since`` whenever task_state is written. Returns the number of rows changed, so
        a filtered ``change`` is a compare-and-swap."""
        now = timezone.now()
        values.setdefault("updated", now)
        if "task_state" in values:
            values.setdefault("task_state_since", now)
        return self.update(**values)


class Instance(models.Model):
    objects = InstanceQuerySet.as_manager()

    uuid = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="instances")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL,
                             related_name="instances")
    flavor = models.ForeignKey(Flavor, on_delete=models.PROTECT, related_name="instances")
    # The flavor's numbers at boot time: a later flavor edit must not change a running server.
    vcpus = models.PositiveIntegerField()
    memory_mb = models.PositiveIntegerField()
    root_gb = models.PositiveIntegerField()
    image = models.ForeignKey(Image, null=True, on_delete=models.SET_NULL, related_name="instances")
    availability_zone = models.CharField(max_length=255, blank=True)
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="instances")
    vm_state = models.CharField(max_length=16, choices=VmState.choices, default=VmState.BUILDING)
    task_state = models.CharField(max_length=32, choices=TaskState.choices, null=True, blank=True,
                                  default=TaskState.SCHEDULING)
    # When task_state last changed: the reaper measures each task's deadline from it.
    task_state_since = models.DateTimeField(default=timezone.now)
    power_state = models.CharField(max_length=16, choices=PowerState.choices,
                                   default=PowerState.NOSTATE)
    fault = models.JSONField(null=True, blank=True)
    server_group = models.ForeignKey(ServerGroup, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="members")
    # same_host / different_host: lists of server ids the scheduler must (not) share a host with.
    scheduler_hints = models.JSONField(default=dict, blank=True)
    # A host an administrator pinned the server to (still checked by the filters).
    requested_host = models.CharField(max_length=255, blank=True)
    # Hosts a build was tried on (RetryFilter excludes them) and how many attempts were made.
    retry_hosts = models.JSONField(default=list, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    launched_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created",)
        indexes = [models.Index(fields=["vm_state", "task_state"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.uuid})"

    @property
    def status(self) -> str:
        return derive_status(self.vm_state, self.task_state)


class MigrationType(models.TextChoices):
    LIVE = "live-migration"
    COLD = "migration"
    RESIZE = "resize"
    EVACUATION = "evacuation"


class MigrationStatus(models.TextChoices):
    """Nova's migration statuses, in the order a migration goes through them."""

    ACCEPTED = "accepted"            # host evacuation: waits for its batch's turn (batch_limit)
    CHECKING = "checking"            # the scheduler's worker runs the pre-flight checks
    PREPARING = "preparing"          # the destination prepares (pre_live_migration, prep_resize)
    QUEUED = "queued"                # live: prepared, the source was asked to start
    RUNNING = "running"              # live: libvirt's job runs (progress is reported)
    RUNNING_POSTCOPY = "running (post-copy)"  # live: switched over; the guest runs on the destination
    CANCELLING = "cancelling"        # live: abort requested
    MIGRATING = "migrating"          # cold/resize: the source powers off and copies the disk
    POST_MIGRATING = "post-migrating"  # the destination finishes (post_live_migration, finish)
    FINISHED = "finished"            # resize: VERIFY_RESIZE, waiting for confirm or revert
    CONFIRMING = "confirming"
    REVERTING = "reverting"
    REBUILDING = "rebuilding"        # evacuation: the destination rebuilds the server
    DONE = "done"                    # evacuation: rebuilt; the dead host's copy is not cleaned up yet
    COMPLETED = "completed"          # live migration done
    CONFIRMED = "confirmed"          # cold migration or resize done
    REVERTED = "reverted"
    CANCELLED = "cancelled"
    FAILED = "failed"
    ERROR = "error"
    REFUSED = "refused"              # a pre-flight check refused it: nothing changed (see failed_check)


MIGRATION_IN_PROGRESS = (MigrationStatus.ACCEPTED, MigrationStatus.CHECKING, MigrationStatus.PREPARING,
                         MigrationStatus.QUEUED,
                         MigrationStatus.RUNNING, MigrationStatus.RUNNING_POSTCOPY,
                         MigrationStatus.CANCELLING, MigrationStatus.MIGRATING,
                         MigrationStatus.POST_MIGRATING, MigrationStatus.FINISHED,
                         MigrationStatus.CONFIRMING, MigrationStatus.REVERTING,
                         MigrationStatus.REBUILDING)


class Migration(models.Model):
    """One move of an instance between hosts (or a resize, possibly on one host), with its progress.

    While it runs the instance holds resources on both hosts: the source's allocation is handed to
    the migration (``Allocation.migration``) and a new one is claimed on the destination, so neither
    can be given away until the migration ends one way or the other.
    """

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="migrations")
    migration_type = models.CharField(max_length=16, choices=MigrationType.choices)
    status = models.CharField(max_length=24, choices=MigrationStatus.choices,
                              default=MigrationStatus.ACCEPTED)
    source_host = models.ForeignKey(Host, null=True, on_delete=models.SET_NULL, related_name="+")
    dest_host = models.ForeignKey(Host, null=True, on_delete=models.SET_NULL, related_name="+")
    old_flavor = models.ForeignKey(Flavor, on_delete=models.PROTECT, related_name="+")
    new_flavor = models.ForeignKey(Flavor, on_delete=models.PROTECT, related_name="+")
    # Requested (null: "auto") until the pre-flight checks decide; then what the migration does.
    block_migration = models.BooleanField(null=True, blank=True)
    shared_storage = models.BooleanField(null=True, blank=True)
    # Live migration: what the destination asked the source to connect to.
    migration_uri = models.CharField(max_length=255, blank=True)
    migration_data_uri = models.CharField(max_length=255, blank=True)
    completion_timeout = models.PositiveIntegerField(null=True, blank=True,
                                                     help_text="seconds; live migration only")
    # Power state before a cold migration or resize: the destination starts the server if it ran.
    power_on = models.BooleanField(default=True)
    memory_total = models.BigIntegerField(null=True, blank=True)
    memory_processed = models.BigIntegerField(null=True, blank=True)
    memory_remaining = models.BigIntegerField(null=True, blank=True)
    disk_total = models.BigIntegerField(null=True, blank=True)
    disk_processed = models.BigIntegerField(null=True, blank=True)
    disk_remaining = models.BigIntegerField(null=True, blank=True)
    downtime_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="live migration: how long the guest was paused for the switch-over "
                                         "(libvirt's figure, from the destination)")
    progress_updated = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    # The pre-flight check that refused the migration (status "refused"); not "check", which is
    # Django's Model.check.
    failed_check = models.CharField(max_length=32, blank=True)
    # A host evacuation: its migrations share a batch id, and at most batch_limit of them are past
    # "accepted" and in progress at once (the others wait, status "accepted").
    batch = models.CharField(max_length=36, blank=True, db_index=True)
    batch_limit = models.PositiveSmallIntegerField(null=True, blank=True)
    action = models.ForeignKey("InstanceAction", null=True, on_delete=models.SET_NULL, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL,
                             related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created", "-id")
        indexes = [models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"{self.migration_type} {self.pk} of {self.instance_id}"

    @property
    def in_progress(self) -> bool:
        return self.status in MIGRATION_IN_PROGRESS

    @property
    def progress(self) -> str:
        """"42% (12.5 MiB left)" of memory and disk together, from the last job info; "" before any."""
        total = (self.memory_total or 0) + (self.disk_total or 0)
        remaining = (self.memory_remaining or 0) + (self.disk_remaining or 0)
        if not total:
            return ""
        return f"{100 * (total - remaining) / total:.0f}% ({remaining / 2**20:.1f} MiB left)"


class Allocation(models.Model):
    """Resources an instance holds on a host. A host's usage is the sum of its allocations.

    An allocation with a ``migration`` is the source side of a move in progress: the instance left
    (or is leaving) that host, but the resources stay held until the move is confirmed or reverted.
    """

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="allocations")
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="allocations")
    migration = models.ForeignKey(Migration, null=True, blank=True, on_delete=models.CASCADE,
                                  related_name="allocations")
    vcpus = models.PositiveIntegerField()
    memory_mb = models.PositiveIntegerField()
    disk_gb = models.PositiveIntegerField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instance", "host"], condition=models.Q(migration=None),
                                    name="one_allocation_per_instance_host"),
            models.UniqueConstraint(fields=["migration"], condition=~models.Q(migration=None),
                                    name="one_source_allocation_per_migration"),
        ]


class InstanceAction(models.Model):
    """One user-visible operation on an instance (create, delete, reboot, ...)."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="actions")
    action = models.CharField(max_length=64)
    request_id = models.CharField(max_length=64)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    project = models.ForeignKey(Project, null=True, on_delete=models.SET_NULL)
    start_time = models.DateTimeField(default=timezone.now)
    finish_time = models.DateTimeField(null=True, blank=True)
    result = models.CharField(max_length=16, blank=True, help_text="empty while running")
    message = models.TextField(blank=True)
    # The image a snapshot action makes (killed if the action fails before it has data).
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")

    class Meta:
        ordering = ("-start_time", "-id")


class InstanceActionEvent(models.Model):
    """A step of an action (scheduling, compute_spawn, ...), with its outcome."""

    action = models.ForeignKey(InstanceAction, on_delete=models.CASCADE, related_name="events")
    event = models.CharField(max_length=64)
    start_time = models.DateTimeField(default=timezone.now)
    finish_time = models.DateTimeField(null=True, blank=True)
    result = models.CharField(max_length=16, blank=True)
    host = models.CharField(max_length=255, blank=True)
    message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)

    class Meta:
        ordering = ("start_time", "id")
