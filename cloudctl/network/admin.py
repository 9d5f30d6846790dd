"""The operators' view of networks: every object, subnets with their IP usage, groups with their
rules, routers with their interfaces, floating IPs with what they map to. Writes go through the same
services as the API (creation and deletion); the allocation fields (VNI, MAC, addresses) are
read-only: cloudctl owns them."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from cloudctl.errors import CloudctlError
from cloudctl.network import l3, routers, selectors, services
from cloudctl.network.models import (
    COMPUTE_DEVICE_OWNER_PREFIX,
    FloatingIP,
    Network,
    Port,
    PortFixedIP,
    Router,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
)


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

    @admin.display(description="IP usage (used / pool size)")
    def ip_usage(self, subnet: Subnet) -> str:
        usage = selectors.subnet_usage(subnet)
        return f"{usage.used} / {usage.pool_size} ({usage.percent:g} %)"

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


def _port_link(port: Port | None) -> str:
    if port is None:
        return "-"
    return format_html('<a href="{}">{}</a>', reverse("admin:network_port_change", args=[port.pk]),
                       port.pk)


@admin.register(Router)
class RouterAdmin(admin.ModelAdmin):
    list_display = ("name", "id", "project", "external_network", "gateway_address", "enable_snat",
                    "interface_count", "status", "created")
    list_filter = ("status", "enable_snat", "project")
    search_fields = ("name", "id")
    fields = ("id", "name", "project", "status", "external_network", "enable_snat", "gateway",
              "interfaces", "floating_ips", "created", "updated")
    readonly_fields = fields
    actions = ["delete_routers"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Router]:
        return super().get_queryset(request).select_related(
            "project", "external_network", "gateway_port").prefetch_related("gateway_port__fixed_ips")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # through the API: gateway and interfaces are allocated by the services

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="gateway address")
    def gateway_address(self, router: Router) -> str:
        port = router.gateway_port
        return ", ".join(f.ip_address for f in port.fixed_ips.all()) if port is not None else "-"

    @admin.display(description="interfaces")
    def interface_count(self, router: Router) -> int:
        return len(routers.interface_ports(router.pk))

    @admin.display(description="gateway port")
    def gateway(self, router: Router) -> str:
        port = router.gateway_port
        if port is None:
            return "-"
        return format_html("{} {} on {}", _port_link(port), self.gateway_address(router),
                           router.external_network)

    @admin.display(description="interfaces (port, subnet, address)")
    def interfaces(self, router: Router) -> str:
        rows = [(_port_link(p), f.subnet, f.ip_address)
                for p in routers.interface_ports(router.pk) for f in p.fixed_ips.all()]
        if not rows:
            return "none"
        return format_html("<table>{}</table>", format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", rows))

    @admin.display(description="floating IPs mapped through it")
    def floating_ips(self, router: Router) -> str:
        mapped = [(f.floating_ip_address, f.fixed_ip_address, _port_link(f.port))
                  for f in router.floating_ips.select_related("port")]
        if not mapped:
            return "none"
        return format_html("<table>{}</table>", format_html_join(
            "", "<tr><td>{} &rarr; {}</td><td>{}</td></tr>", mapped))

    @admin.action(description="Delete the selected routers (refused while they have interfaces)")
    def delete_routers(self, request: HttpRequest, queryset: QuerySet[Router]) -> None:
        _delete_each(self, request, queryset,
                     lambda router: l3.router_delete(router=router, user=request.user))


@admin.register(FloatingIP)
class FloatingIPAdmin(admin.ModelAdmin):
    list_display = ("floating_ip_address", "id", "project", "floating_network", "fixed_ip_address",
                    "port_link", "router", "server", "status")
    list_filter = ("status", "floating_network", "project")
    search_fields = ("floating_ip_address", "fixed_ip_address", "id", "port__device_id")
    fields = ("id", "floating_ip_address", "floating_network", "project", "status", "port_link",
              "fixed_ip_address", "router", "server", "floating_port_link", "description", "created",
              "updated")
    readonly_fields = fields
    actions = ["disassociate", "release"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[FloatingIP]:
        return super().get_queryset(request).select_related(
            "project", "floating_network", "port", "router", "floating_port")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="port")
    def port_link(self, fip: FloatingIP) -> str:
        return _port_link(fip.port)

    @admin.display(description="address held by")
    def floating_port_link(self, fip: FloatingIP) -> str:
        return _port_link(fip.floating_port)

    @admin.display(description="server")
    def server(self, fip: FloatingIP) -> str:
        port = fip.port
        if port is None or not port.device_owner.startswith(COMPUTE_DEVICE_OWNER_PREFIX):
            return "-"
        return format_html('<a href="{}">{}</a>',
                           reverse("admin:compute_instance_change", args=[port.device_id]),
                           port.device_id)

    @admin.action(description="Disassociate the selected floating IPs (they stay allocated)")
    def disassociate(self, request: HttpRequest, queryset: QuerySet[FloatingIP]) -> None:
        for fip in list(queryset):
            l3.floating_ip_disassociate(floating_ip=fip, user=request.user)
            self.message_user(request, f"{fip}: disassociated", level=messages.SUCCESS)

    @admin.action(description="Release the selected floating IPs (their addresses are free at once)")
    def release(self, request: HttpRequest, queryset: QuerySet[FloatingIP]) -> None:
        _delete_each(self, request, queryset,
                     lambda fip: l3.floating_ip_delete(floating_ip=fip, user=request.user))
