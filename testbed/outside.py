"""An outside world for a stack's external (flat) network: ``tools/public-net.sh`` (what `make run` builds)
with names of a test run's own, so that it clashes with neither `make run`'s nor another run's."""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from dataclasses import dataclass

from testbed import REPO

# TEST-NET-3: clashes with nothing real (`make run`'s outside world is 172.24.4.0/24).
GATEWAY = ipaddress.IPv4Interface("203.0.113.1/24")


@dataclass(frozen=True)
class OutsideWorld:
    """Namespace ``netns`` holds a bridge with ``gateway``; ``interface`` (the root end of its veth) is a
    compute worker's COMPUTE_FLAT_INTERFACE, the uplink of the flat network. It routes nowhere and does no
    NAT: what reaches it ends there, so nothing a guest sends leaves the machine."""

    netns: str
    interface: str
    gateway: ipaddress.IPv4Interface = GATEWAY

    @classmethod
    def unique(cls) -> OutsideWorld:
        tag = secrets.token_hex(3)
        return cls(netns=f"ccfip-{tag}", interface=f"ccfip{tag}")

    def _script(self, action: str) -> None:
        env = {**os.environ, "CLOUDCTL_PUBLIC_NETNS": self.netns, "CLOUDCTL_PUBLIC_INTERFACE": self.interface,
               "CLOUDCTL_PUBLIC_GATEWAY": str(self.gateway)}
        subprocess.run([str(REPO / "tools" / "public-net.sh"), action], env=env, capture_output=True,
                       text=True, check=True)

    def up(self) -> None:
        self._script("up")

    def down(self) -> None:
        self._script("down")
