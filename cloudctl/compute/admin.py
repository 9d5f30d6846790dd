"""Django admin registrations. State fields are read-only: the system owns them."""

from django.contrib import admin

from cloudctl.compute.models import Allocation, Flavor, Host, Instance, InstanceAction, InstanceActionEvent


@admin.register(Flavor)
class FlavorAdmin(admin.ModelAdmin):
    list_display = ("name", "vcpus", "memory_mb", "root_gb", "is_public", "disabled")
    search_fields = ("name",)


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ("name", "enabled", "vcpus", "memory_mb", "disk_gb", "hypervisor_type",
                    "virt_type", "last_heartbeat")
    readonly_fields = ("libvirt_uri", "driver", "virt_type", "last_heartbeat", "vcpus", "memory_mb",
                       "memory_mb_reserved", "disk_gb", "disk_gb_reserved", "hypervisor_type",
                       "hypervisor_version", "cpu_info", "reported_instances")


class InstanceActionInline(admin.TabularInline):
    model = InstanceAction
    extra = 0
    can_delete = False
    readonly_fields = ("action", "request_id", "user", "start_time", "finish_time", "result",
                       "message")
    fields = readonly_fields


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ("name", "uuid", "vm_state", "task_state", "power_state", "host", "flavor",
                    "project", "created")
    list_filter = ("vm_state", "task_state", "host", "project")
    search_fields = ("name", "uuid")
    readonly_fields = ("uuid", "vm_state", "task_state", "power_state", "host", "fault",
                       "retry_hosts", "attempts", "vcpus", "memory_mb", "root_gb", "launched_at",
                       "deleted_at", "created", "updated")
    inlines = [InstanceActionInline]


@admin.register(Allocation)
class AllocationAdmin(admin.ModelAdmin):
    list_display = ("instance", "host", "vcpus", "memory_mb", "disk_gb", "created")
    list_filter = ("host",)


@admin.register(InstanceActionEvent)
class InstanceActionEventAdmin(admin.ModelAdmin):
    list_display = ("action", "event", "result", "host", "start_time", "finish_time")
    list_filter = ("event", "result")
