"""The demo networks ``make run`` seeds (``manage.py bootstrap --demo-network``), as DevStack does:
an external flat network ``public`` (172.24.4.0/24, no DHCP: floating IPs and routers' gateways come
from 172.24.4.10-250), the ``private`` network (10.0.0.0/24 with DHCP) of the demo project (of the
admin project without a demo user), and ``router1`` joining them. Idempotent: what exists (by name)
is kept, what is missing is made. The project's ``default`` security group is left as Neutron makes
it (users add ICMP or SSH themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import transaction

from cloudctl.identity.models import Project
from cloudctl.network import l3, routers, services
from cloudctl.network.models import Network, ProviderType, Router, Subnet

PUBLIC = "public"
PUBLIC_CIDR = "172.24.4.0/24"
PUBLIC_GATEWAY = "172.24.4.1"
PUBLIC_POOL = {"start": "172.24.4.10", "end": "172.24.4.250"}
PRIVATE = "private"
PRIVATE_CIDR = "10.0.0.0/24"
ROUTER = "router1"


@dataclass(frozen=True)
class DemoNetworks:
    public: Network
    private: Network
    router: Router
    created: list[str]


def _subnet(network: Network, cidr: str) -> Subnet | None:
    return network.subnets.filter(cidr=cidr).first()


@transaction.atomic
def demo_networks_seed(*, user: Any, project: Project,
                       tenant_project: Project | None = None) -> DemoNetworks:
    """Make what is missing of the demo networks (``user``: an administrator; ``project``: the
    admin project, which owns ``public``). ``private`` and ``router1`` belong to ``tenant_project``
    (the demo user's, as DevStack gives its demo project the private network), else to ``project``
    too. ``created`` names what this call made."""
    owner = tenant_project or project
    created: list[str] = []
    public = Network.objects.filter(name=PUBLIC, external=True).first()
    if public is None:
        public = services.network_create(user=user, project=project, name=PUBLIC, shared=True,
                                         external=True, provider_type=ProviderType.FLAT)
        created.append(f"network {PUBLIC}")
    public_subnet = _subnet(public, PUBLIC_CIDR)
    if public_subnet is None:
        public_subnet = services.subnet_create(user=user, network=public, cidr=PUBLIC_CIDR,
                                               name=f"{PUBLIC}-subnet", gateway_ip=PUBLIC_GATEWAY,
                                               allocation_pools=[PUBLIC_POOL], enable_dhcp=False)
        created.append(f"subnet {PUBLIC_CIDR}")
    private = Network.objects.filter(name=PRIVATE, project=owner).first()
    if private is None:
        private = services.network_create(user=user, project=owner, name=PRIVATE)
        created.append(f"network {PRIVATE}")
    private_subnet = _subnet(private, PRIVATE_CIDR)
    if private_subnet is None:
        private_subnet = services.subnet_create(user=user, network=private, cidr=PRIVATE_CIDR,
                                                name=f"{PRIVATE}-subnet", enable_dhcp=True)
        created.append(f"subnet {PRIVATE_CIDR}")
    router = Router.objects.filter(name=ROUTER, project=owner).first()
    if router is None:
        router = l3.router_create(user=user, project=owner, name=ROUTER,
                                  gateway=l3.GatewayRequest(network=public))
        created.append(f"router {ROUTER}")
    elif router.external_network_id is None:
        router = l3.router_update(router=router, user=user, gateway=l3.GatewayRequest(network=public))
        created.append(f"gateway of {ROUTER}")
    on_subnet = any(f.subnet_id == private_subnet.pk
                    for p in routers.interface_ports(router.pk) for f in p.fixed_ips.all())
    if not on_subnet:
        l3.router_interface_add(router=router, user=user, subnet=private_subnet)
        created.append(f"interface of {ROUTER} on {PRIVATE_CIDR}")
    return DemoNetworks(public=public, private=private, router=router, created=created)
