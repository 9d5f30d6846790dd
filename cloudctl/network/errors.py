"""Why a network request is refused: each error knows its HTTP answer (see :mod:`cloudctl.errors`).

A 409 names what blocks the request: the port holding an address, the ports still on a network or a
subnet, the pool or the VNI range that is exhausted. Validation errors are
:class:`cloudctl.errors.InvalidRequest` (400, ``{field: [reason]}``).
"""

from __future__ import annotations

from typing import Any

from cloudctl.errors import CloudctlError


class NetworkConflict(CloudctlError):
    """A network object's state forbids the request (HTTP 409)."""


class AddressInUse(NetworkConflict):
    """The requested fixed IP is held by another port (HTTP 409, naming it)."""

    code = "ip_address_in_use"

    def __init__(self, *, ip_address: str, subnet_id: str, port_id: str) -> None:
        self.ip_address = ip_address
        self.port_id = port_id
        super().__init__(f"IP address {ip_address} of subnet {subnet_id} is in use by port {port_id}")

    def body(self) -> dict[str, Any]:
        return {**super().body(), "port": self.port_id}


class PoolExhausted(NetworkConflict):
    """No free address is left in a subnet's allocation pools (HTTP 409)."""

    code = "ip_address_exhausted"


class MacAddressInUse(NetworkConflict):
    code = "mac_address_in_use"


class SegmentationIdExhausted(NetworkConflict):
    """No free VNI is left in NETWORK_VNI_RANGE (HTTP 409)."""

    code = "segmentation_id_exhausted"


class SegmentationIdInUse(NetworkConflict):
    code = "segmentation_id_in_use"


class InUse(NetworkConflict):
    """The object cannot be deleted while ports use it (HTTP 409, naming them)."""

    code = "in_use"

    def __init__(self, message: str, *, ports: list[str]) -> None:
        self.ports = ports
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {**super().body(), "ports": self.ports}


class NotOwner(CloudctlError):
    """The object is visible (a shared or external network) but belongs to another project, which
    alone (or an administrator) may change it (HTTP 403)."""

    status_code = 403
    code = "forbidden"


class PortInUse(NetworkConflict):
    """The port is bound to a device already (HTTP 409, naming the server holding it)."""

    code = "port_in_use"

    def __init__(self, *, port_id: str, device_id: str, device_owner: str) -> None:
        self.port_id = port_id
        self.device_id = device_id
        holder = f"server {device_id}" if device_owner.startswith("compute:") else \
            f"{device_owner or 'device'} {device_id}"
        super().__init__(f"port {port_id} is in use by {holder}")

    def body(self) -> dict[str, Any]:
        return {**super().body(), "port": self.port_id, "device_id": self.device_id}


class SubnetOnRouter(NetworkConflict):
    """The subnet already has a router interface (HTTP 409, naming the router)."""

    code = "subnet_in_use"

    def __init__(self, message: str, *, router_id: str) -> None:
        self.router_id = router_id
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {**super().body(), "router": self.router_id}


class FloatingIPsInUse(NetworkConflict):
    """Floating IPs mapped through a router block a change of it: clearing or moving its gateway,
    removing the interface their fixed IPs are behind, deleting it (HTTP 409, naming them)."""

    code = "in_use"

    def __init__(self, message: str, *, floating_ips: list[str]) -> None:
        self.floating_ips = floating_ips
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {**super().body(), "floating_ips": self.floating_ips}


class FixedIPHasFloatingIP(NetworkConflict):
    """The fixed IP is the target of another floating IP already (HTTP 409, naming it)."""

    code = "floating_ip_in_use"

    def __init__(self, message: str, *, floating_ip_id: str) -> None:
        self.floating_ip_id = floating_ip_id
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {**super().body(), "floating_ip": self.floating_ip_id}


class ExternalNetworkUnreachable(NetworkConflict):
    """No router joins the fixed IP's subnet to the floating IP's network (HTTP 409)."""

    code = "external_network_unreachable"
