"""The operators' view of networks: every object, subnets with their IP usage, groups with their
rules. Writes go through the same services as the API (creation and deletion); the allocation
fields (VNI, MAC, addresses) are read-only: cloudctl owns them."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from cloudctl.errors import CloudctlError
from cloudctl.network import selectors, services
from cloudctl.network.models import Network, Port, PortFixedIP, SecurityGroup, SecurityGroupRule, Subnet


def _delete_each(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any],
                 delete: Any) -> None:
    """Delete through the service, one by one, saying for each why it stays when it does."""
    for obj in list(queryset):
        try:
            delete(obj)
        except CloudctlError as refused:
            modeladmin.message_user(request, f"{obj}: not deleted: {refused}", level=messages.WARNING)
        else:
            modeladmin.message_user(request, f"{obj}: deleted", level=messages.SUCCESS)


class SubnetInline(admin.TabularInline):
    model = Subnet
    extra = 0
    fields = ("name", "cidr", "gateway_ip", "enable_dhcp")
    readonly_fields = fields
    show_change_link = True
    can_delete = False


@admin.register(Network)
class NetworkAdmin(admin.ModelAdmin):
    list_display = ("name", "id", "project", "provider_type", "segmentation_id", "mtu", "shared",
                    "external", "status")
    list_filter = ("provider_type", "shared", "external", "status", "project")
    search_fields = ("name", "id")
    readonly_fields = ("id", "project", "provider_type", "segmentation_id", "status", "created",
                       "updated")
    inlines = [SubnetInline]
    actions = ["delete_networks"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # created through the API (VNI allocation, admin-only fields checked there)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the action below deletes through the service, refusals shown per network

    @admin.action(description="Delete the selected networks (refused while ports use them)")
    def delete_networks(self, request: HttpRequest, queryset: QuerySet[Network]) -> None:
        _delete_each(self, request, queryset,
                     lambda network: services.network_delete(network=network, user=request.user))


@admin.register(Subnet)
class SubnetAdmin(admin.ModelAdmin):
    list_display = ("name", "cidr", "network", "gateway_ip", "enable_dhcp", "ip_usage")
    list_filter = ("enable_dhcp",)
    search_fields = ("name", "cidr", "id")
    readonly_fields = ("id", "network", "ip_version", "cidr", "gateway_ip", "allocation_pools",
                       "ip_usage", "created", "updated")
    fields = ("name", *readonly_fields, "dns_nameservers", "enable_dhcp")
    actions = ["delete_subnets"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Subnet]:
        return selectors.subnets_with_usage()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="IP usage (allocated / pool size)")
    def ip_usage(self, subnet: Subnet) -> str:
        allocated = getattr(subnet, "allocated", None)
        if allocated is None:
            allocated = subnet.fixed_ips.count()
        return f"{allocated} / {subnet.pool_size()}"

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Delete the selected subnets (refused while ports hold addresses)")
    def delete_subnets(self, request: HttpRequest, queryset: QuerySet[Subnet]) -> None:
        _delete_each(self, request, queryset,
                     lambda subnet: services.subnet_delete(subnet=subnet, user=request.user))


class PortFixedIPInline(admin.TabularInline):
    model = PortFixedIP
    extra = 0
    fields = ("subnet", "ip_address")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Port)
class PortAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "network", "project", "mac_address", "addresses", "device_owner",
                    "device_id", "binding_host", "migrating_to", "status", "admin_state_up",
                    "port_security_enabled")
    list_filter = ("status", "device_owner", "port_security_enabled", "project")
    search_fields = ("id", "name", "mac_address", "device_id", "fixed_ips__ip_address")
    # Port security is read-only here: turning it off must clear the groups with it and reach the
    # hosts (the API's PATCH, through services.port_update).
    readonly_fields = ("id", "network", "project", "mac_address", "security_groups", "port_security_enabled",
                       "device_id", "device_owner", "binding_host", "migrating_to", "status", "created",
                       "updated")
    inlines = [PortFixedIPInline]
    actions = ["delete_ports"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Port]:
        return super().get_queryset(request).select_related("network", "project").prefetch_related(
            "fixed_ips")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Delete the selected ports (their addresses are free at once)")
    def delete_ports(self, request: HttpRequest, queryset: QuerySet[Port]) -> None:
        _delete_each(self, request, queryset, lambda port: services.port_delete(port=port, user=request.user))

    @admin.display(description="fixed IPs")
    def addresses(self, port: Port) -> str:
        return ", ".join(f.ip_address for f in port.fixed_ips.all())


class SecurityGroupRuleInline(admin.TabularInline):
    model = SecurityGroupRule
    fk_name = "security_group"
    extra = 0
    fields = ("direction", "ethertype", "protocol", "port_range_min", "port_range_max",
              "remote_ip_prefix", "remote_group", "description")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # rules are validated by the service: the API creates them


@admin.register(SecurityGroup)
class SecurityGroupAdmin(admin.ModelAdmin):
    list_display = ("name", "id", "project", "description", "rule_count", "created")
    list_filter = ("project",)
    search_fields = ("name", "id")
    readonly_fields = ("id", "project", "created")
    inlines = [SecurityGroupRuleInline]
    actions = ["delete_groups"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="rules")
    def rule_count(self, group: SecurityGroup) -> int:
        return group.rules.count()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Delete the selected security groups (refused for a default group or "
                              "one in use)")
    def delete_groups(self, request: HttpRequest, queryset: QuerySet[SecurityGroup]) -> None:
        _delete_each(self, request, queryset,
                     lambda group: services.security_group_delete(group=group, user=request.user))
