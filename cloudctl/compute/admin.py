"""The operators' control room. Every admin action calls the same service as the REST API; the
state fields are read-only (the system owns them) and "reset state" is the recorded escape hatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from cloudctl.compute import evacuation, migration_requests, ports, selectors, services
from cloudctl.compute.dashboard import usage_bars
from cloudctl.compute.errors import (
    ComputeUnavailable,
    HostFenceFailed,
    HostNotFenced,
    MigrationInvalidState,
    ServerConsoleUnavailable,
)
from cloudctl.compute.models import (
    Aggregate,
    Allocation,
    Flavor,
    Host,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    Migration,
    MigrationStatus,
    ServerGroup,
)
from cloudctl.compute.states import VmState

# --- servers -------------------------------------------------------------------------------------


def _run_on_each(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Instance],
                 verb: str, operation: Callable[[Instance], Any]) -> None:
    """Apply one service call per server and tell, per server, whether it was accepted. A migration
    is accepted "(checking)": its pre-flight checks run next, and a refusal then shows in the
    migration list and in the server's action history."""
    for instance in queryset.select_related("host"):
        try:
            outcome = operation(instance)
        except migration_requests.REFUSED as refused:
            modeladmin.message_user(request, f"{instance.name}: {verb} refused: {refused}",
                                    level=messages.WARNING)
        else:
            checking = isinstance(outcome, Migration) and outcome.status == MigrationStatus.CHECKING
            modeladmin.message_user(request, f"{instance.name}: {verb} accepted"
                                             f"{' (checking)' if checking else ''}",
                                    level=messages.SUCCESS)


def _lifecycle_action(verb: str, call: Callable[..., Any], **fixed: Any) -> Any:
    def run(modeladmin: admin.ModelAdmin, request: HttpRequest,
            queryset: QuerySet[Instance]) -> None:
        _run_on_each(modeladmin, request, queryset, verb,
                     lambda instance: call(instance=instance, user=request.user, **fixed))

    run.__name__ = verb.replace(" ", "_").replace("(", "").replace(")", "")
    return admin.action(description=f"{verb.capitalize()} selected servers")(run)


def _snapshot(instance: Instance, user: Any) -> Any:
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    return services.server_snapshot(instance=instance, user=user,
                                    name=f"{instance.name}-snapshot-{stamp}")


def _live_migrate(instance: Instance, user: Any) -> Any:
    """The scheduler picks the destination; the disk is copied only if the hosts share no storage."""
    return migration_requests.server_live_migrate(instance=instance, user=user, host=None,
                                                  block_migration="auto")


def _cold_migrate(instance: Instance, user: Any) -> Any:
    return migration_requests.server_migrate(instance=instance, user=user, host=None)


def _delete(instance: Instance, user: Any) -> Any:
    return services.server_delete(instance=instance, user=user)


class ResetStateForm(forms.Form):
    state = forms.ChoiceField(choices=[(VmState.ACTIVE, "active"), (VmState.ERROR, "error")],
                              help_text="as Nova's os-resetState: active or error")
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 3}),
                             help_text="recorded in the server's action history")


@admin.action(description="Reset state of selected servers (recorded)")
def reset_state(modeladmin: admin.ModelAdmin, request: HttpRequest,
                queryset: QuerySet[Instance]) -> HttpResponse | None:
    form = ResetStateForm(request.POST if "apply" in request.POST else None)
    if "apply" in request.POST and form.is_valid():
        _run_on_each(modeladmin, request, queryset, "reset state",
                     lambda instance: services.server_reset_state(
                         instance=instance, user=request.user, state=form.cleaned_data["state"],
                         reason=form.cleaned_data["reason"]))
        return None
    return TemplateResponse(request, "admin/compute/instance/reset_state.html", {
        **modeladmin.admin_site.each_context(request), "title": "Reset server state",
        "servers": queryset, "form": form, "opts": modeladmin.model._meta,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    })


class InstanceActionInline(admin.TabularInline):
    model = InstanceAction
    extra = 0
    can_delete = False
    readonly_fields = ("action", "request_id", "user", "start_time", "finish_time", "result",
                       "message", "steps")
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="events")
    def steps(self, action: InstanceAction) -> str:
        return format_html_join(
            "", "<div>{} <b>{}</b> {}</div>",
            ((event.event, event.result or "…", event.message) for event in action.events.all()))


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ("name", "uuid", "status_shown", "host", "flavor", "project", "created")
    list_filter = ("vm_state", "task_state", "host", "project")
    search_fields = ("name", "uuid")
    readonly_fields = ("uuid", "vm_state", "task_state", "power_state", "host", "fault",
                       "retry_hosts", "attempts", "vcpus", "memory_mb", "root_gb", "launched_at",
                       "deleted_at", "created", "updated", "availability_zone", "server_group",
                       "scheduler_hints", "requested_host", "addresses", "console_tail")
    fields = ("name", *readonly_fields)
    inlines = [InstanceActionInline]
    actions = [
        _lifecycle_action("reboot (soft)", services.server_reboot, reboot_type="SOFT"),
        _lifecycle_action("reboot (hard)", services.server_reboot, reboot_type="HARD"),
        _lifecycle_action("stop", services.server_stop),
        _lifecycle_action("start", services.server_start),
        _lifecycle_action("pause", services.server_pause),
        _lifecycle_action("unpause", services.server_unpause),
        _lifecycle_action("suspend", services.server_suspend),
        _lifecycle_action("resume", services.server_resume),
        _lifecycle_action("snapshot", _snapshot),
        _lifecycle_action("live-migrate", _live_migrate),
        _lifecycle_action("migrate (cold)", _cold_migrate),
        _lifecycle_action("delete", _delete),
        reset_state,
    ]

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # deleting rows would lie: delete goes through the service
        return actions

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # servers are created through the API, which schedules them

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="status", ordering="vm_state")
    def status_shown(self, instance: Instance) -> str:
        return instance.status + (f" ({instance.task_state})" if instance.task_state else "")

    @admin.display(description="addresses")
    def addresses(self, instance: Instance) -> str:
        """The server's ports in NIC order: network, addresses, MAC, and the port (linked)."""
        rows = [(port.network.name or port.network_id,
                 ", ".join(f.ip_address for f in port.fixed_ips.all()) or "no address",
                 port.mac_address, reverse("admin:network_port_change", args=[port.pk]), port.pk,
                 port.binding_host or "unbound", port.status)
                for port in ports.server_ports(instance.uuid)]
        if not rows:
            return "(no network)"
        return format_html("<ul>{}</ul>", format_html_join(
            "", "<li>{}: {} (MAC {}, port <a href='{}'>{}</a> on {}, {})</li>", rows))

    @admin.display(description="console output (last 20 lines)")
    def console_tail(self, instance: Instance) -> str:
        try:
            output = services.server_console_output(instance=instance, lines=20)
        except (ServerConsoleUnavailable, ComputeUnavailable) as unavailable:
            return f"({unavailable})"
        return format_html("<pre style='max-height:20em;overflow:auto'>{}</pre>", output)


# --- hosts ----------------------------------------------------------------------------------------


class DisableForm(forms.Form):
    reason = forms.CharField(max_length=255, required=False)


@admin.action(description="Disable selected hosts (keep their servers, no new ones)")
def disable_hosts(modeladmin: admin.ModelAdmin, request: HttpRequest,
                  queryset: QuerySet[Host]) -> None:
    reason = f"disabled by {request.user} from the admin"
    for host in queryset:
        services.host_set_enabled(host=host, enabled=False, reason=reason)
    modeladmin.message_user(request, f"disabled {queryset.count()} host(s)")


@admin.action(description="Enable selected hosts")
def enable_hosts(modeladmin: admin.ModelAdmin, request: HttpRequest,
                 queryset: QuerySet[Host]) -> None:
    for host in queryset:
        services.host_set_enabled(host=host, enabled=True)
    modeladmin.message_user(request, f"enabled {queryset.count()} host(s)")


@admin.action(description="Live-migrate all servers away from selected hosts (disables them)")
def live_migrate_servers_away(modeladmin: admin.ModelAdmin, request: HttpRequest,
                              queryset: QuerySet[Host]) -> None:
    for host in queryset:
        evacuation = migration_requests.host_live_migrate_servers(host=host, user=request.user)
        if not evacuation.servers:
            modeladmin.message_user(request, f"host {host.name}: disabled; no servers to move")
        for result in evacuation.servers:
            name = f"{result.server.name} (on {host.name})"
            if result.migration is None:
                modeladmin.message_user(request, f"{name}: refused: {result.refused}", level=messages.WARNING)
                continue
            when = ("checking" if result.migration.status == MigrationStatus.CHECKING
                    else f"waiting: {evacuation.max_servers} at a time")
            modeladmin.message_user(request, f"{name}: live migration {result.migration.pk} accepted "
                                             f"({when})", level=messages.SUCCESS)


@admin.action(description="Force selected hosts down (they are off: their servers may be evacuated)")
def force_down_hosts(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Host]) -> None:
    for host in queryset:
        evacuation.host_force_down(host=host, forced_down=True, user=request.user,
                                   reason=f"forced down by {request.user} from the admin")
    modeladmin.message_user(request, f"forced {queryset.count()} host(s) down")


@admin.action(description="Clear forced down on selected hosts")
def clear_forced_down(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Host]) -> None:
    for host in queryset:
        evacuation.host_force_down(host=host, forced_down=False, user=request.user)
    modeladmin.message_user(request, f"cleared forced down on {queryset.count()} host(s)")


@admin.action(description="Fence selected dead hosts now (HOST_FENCE_COMMAND)")
def fence_hosts(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Host]) -> None:
    for host in queryset:
        try:
            evacuation.host_fence(host=host, user=request.user)
        except HostFenceFailed as refused:
            modeladmin.message_user(request, f"host {host.name}: {refused}", level=messages.ERROR)
        else:
            modeladmin.message_user(request, f"host {host.name}: fenced and forced down",
                                    level=messages.SUCCESS)


@admin.action(description="Evacuate the servers of selected dead, fenced hosts (only those whose disk a "
                          "host sharing the storage keeps)")
def evacuate_hosts(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Host]) -> None:
    for host in queryset:
        try:
            servers = evacuation.host_evacuate_servers(host=host, user=request.user)
        except HostNotFenced as refused:
            modeladmin.message_user(request, str(refused), level=messages.ERROR)
            continue
        if not servers:
            modeladmin.message_user(request, f"host {host.name}: no servers to evacuate")
        for result in servers:
            name = f"{result.server.name} (on {host.name})"
            if result.migration is None:
                modeladmin.message_user(request, f"{name}: refused: {result.refused}",
                                        level=messages.WARNING)
            else:
                modeladmin.message_user(request, f"{name}: evacuation {result.migration.pk} to "
                                                 f"{result.migration.dest_host} accepted",
                                        level=messages.SUCCESS)


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ("name", "state", "forced_down", "enabled", "disabled_reason", "zone", "vcpu_usage",
                    "ram_usage", "disk_usage", "instance_count", "virt_type", "last_heartbeat")
    list_filter = ("enabled", "forced_down", "virt_type")
    search_fields = ("name",)
    readonly_fields = ("name", "libvirt_uri", "driver", "virt_type", "availability_zone",
                       "last_heartbeat", "vcpus", "memory_mb", "memory_mb_reserved", "disk_gb",
                       "disk_gb_reserved", "hypervisor_type", "hypervisor_version", "cpu_info",
                       "tunnel_ip", "reported_instances", "servers", "forced_down", "forced_down_reason",
                       "forced_down_at", "fence_attempted_at", "fence_message", "storage_id")
    actions = [disable_hosts, enable_hosts, live_migrate_servers_away, force_down_hosts, clear_forced_down,
               fence_hosts, evacuate_hosts]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Host]:
        return selectors.hosts_with_usage()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # hosts register themselves with their first heartbeat

    @admin.display(description="state")
    def state(self, host: Host) -> str:
        return "up" if host.is_up else "DOWN"

    @staticmethod
    def _usage(host: Host, resource: str, unit: str) -> str:
        bar = usage_bars(host)[resource]
        return (f"{bar['used']:g}/{bar['capacity']:g} {unit} ({bar['percent']:.0f}%, "
                f"x{bar['ratio']:g})")

    @admin.display(description="vCPU")
    def vcpu_usage(self, host: Host) -> str:
        return self._usage(host, "vcpu", "")

    @admin.display(description="RAM")
    def ram_usage(self, host: Host) -> str:
        return self._usage(host, "ram", "MiB")

    @admin.display(description="disk")
    def disk_usage(self, host: Host) -> str:
        return self._usage(host, "disk", "GiB")

    @admin.display(description="servers")
    def instance_count(self, host: Host) -> int:
        return host.instance_count

    @admin.display(description="servers on this host")
    def servers(self, host: Host) -> str:
        live = selectors.servers_on_host(host=host)
        return format_html_join(", ", "{} ({})", ((s.name, s.status) for s in live)) or "none"


# --- the rest -------------------------------------------------------------------------------------


@admin.register(Flavor)
class FlavorAdmin(admin.ModelAdmin):
    list_display = ("name", "vcpus", "memory_mb", "root_gb", "is_public", "disabled")
    search_fields = ("name",)


@admin.register(ServerGroup)
class ServerGroupAdmin(admin.ModelAdmin):
    list_display = ("name", "policy", "project", "created")
    list_filter = ("policy",)
    readonly_fields = ("policy",)


@admin.register(Aggregate)
class AggregateAdmin(admin.ModelAdmin):
    list_display = ("name", "availability_zone", "created")
    filter_horizontal = ("hosts",)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        for host in form.instance.hosts.all():
            services.aggregate_zone_sync(host)


class SystemOwnedAdmin(admin.ModelAdmin):
    """Rows only the system writes (claims, migrations): shown, never edited, added or deleted here."""

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Allocation)
class AllocationAdmin(SystemOwnedAdmin):
    list_display = ("instance", "host", "migration", "vcpus", "memory_mb", "disk_gb", "created")
    list_filter = ("host",)


@admin.register(InstanceActionEvent)
class InstanceActionEventAdmin(admin.ModelAdmin):
    list_display = ("action", "event", "result", "host", "start_time", "finish_time")
    list_filter = ("event", "result")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


def _migration_action(verb: str, call: Callable[..., Migration]) -> Any:
    """An admin action calling a migration service on each selected migration, telling per migration
    whether it was accepted (a refusal says the state that blocked it, as the API's 409)."""
    def run(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Migration]) -> None:
        for migration in queryset.select_related("instance"):
            label = f"migration {migration.pk} of {migration.instance.name}"
            try:
                call(migration=migration, user=request.user)
            except (MigrationInvalidState, ComputeUnavailable) as refused:
                modeladmin.message_user(request, f"{label}: {verb} refused: {refused}",
                                        level=messages.WARNING)
            else:
                modeladmin.message_user(request, f"{label}: {verb} accepted", level=messages.SUCCESS)

    run.__name__ = verb.replace(" ", "_").replace("-", "_")
    return admin.action(description=f"{verb.capitalize()} selected live migrations")(run)


@admin.register(Migration)
class MigrationAdmin(SystemOwnedAdmin):
    """Read-only: a migration's state belongs to the system. A running live migration can be aborted
    or forced to complete (the API's services)."""

    list_display = ("id", "instance", "migration_type", "status", "failed_check", "source_host", "dest_host",
                    "progress", "created", "finished_at")
    list_filter = ("migration_type", "status", "source_host", "dest_host")
    search_fields = ("instance__name", "instance__uuid")
    actions = [_migration_action("abort", migration_requests.migration_abort),
               _migration_action("force-complete", migration_requests.migration_force_complete)]

