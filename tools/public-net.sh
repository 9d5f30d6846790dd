#!/usr/bin/env bash
# The outside world of `make run` (devstack's `public` network), inside this machine: a network namespace
# `cloudctl-public` holding a bridge with the external network's gateway address (172.24.4.1/24) and a
# veth pair whose root-namespace end (`cc-public`) is the compute worker's COMPUTE_FLAT_INTERFACE: the
# worker enslaves it to the bridge of the flat external network, so the routers' gateways (qg-) and
# floating IPs meet 172.24.4.1 there. The namespace routes nowhere else and does no NAT: what the guests
# send "outside" ends in it, and nothing leaves the machine. Try a floating IP from the outside with
#   ip netns exec cloudctl-public ping 172.24.4.X
# On a real network node an operator maps flat networks to a physical interface instead
# (COMPUTE_FLAT_INTERFACE=eth1) and runs no such namespace.
#
# Usage: tools/public-net.sh up|down   (both idempotent; `up` also repairs what is missing)
# Environment: CLOUDCTL_PUBLIC_NETNS (cloudctl-public), CLOUDCTL_PUBLIC_GATEWAY (172.24.4.1/24),
#              CLOUDCTL_PUBLIC_INTERFACE (cc-public), NETWORK_PHYSICAL_MTU (1500)
set -euo pipefail

ns=${CLOUDCTL_PUBLIC_NETNS:-cloudctl-public}
gateway=${CLOUDCTL_PUBLIC_GATEWAY:-172.24.4.1/24}
interface=${CLOUDCTL_PUBLIC_INTERFACE:-cc-public}
mtu=${NETWORK_PHYSICAL_MTU:-1500}
bridge=br-public  # inside the namespace: no name clash with the host's
inside=public0    # the veth's namespace end, on $bridge

has_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$ns"; }

up() {
  if [ "${#interface}" -gt 15 ]; then
    echo "CLOUDCTL_PUBLIC_INTERFACE $interface: at most 15 characters" >&2
    exit 2
  fi
  has_netns || ip netns add "$ns"
  ip -n "$ns" link set dev lo up
  ip -n "$ns" link show dev "$bridge" >/dev/null 2>&1 ||
    ip -n "$ns" link add name "$bridge" type bridge stp_state 0 forward_delay 0
  ip -n "$ns" link set dev "$bridge" mtu "$mtu" up
  local have
  have=$(ip -n "$ns" -4 -o addr show dev "$bridge" | awk '{print $4}')
  if [ "$have" != "$gateway" ]; then
    ip -n "$ns" -4 addr flush dev "$bridge"
    ip -n "$ns" addr add "$gateway" dev "$bridge"
  fi
  if ! ip link show dev "$interface" >/dev/null 2>&1; then
    ip -n "$ns" link del dev "$inside" 2>/dev/null || true  # half a pair: make it again
    ip link add "$interface" mtu "$mtu" type veth peer name "$inside" mtu "$mtu" netns "$ns"
    # No IPv6 link-local address on the root end either: it is a bridge port, not a host interface.
    ip link set dev "$interface" addrgenmode none
  fi
  ip -n "$ns" link set dev "$inside" master "$bridge" up
  ip link set dev "$interface" up
  echo "==> outside world: namespace $ns, $gateway on $bridge, reached through $interface"
}

down() {
  ip link del dev "$interface" 2>/dev/null || true  # its peer in the namespace goes with it
  if has_netns; then
    ip netns del "$ns"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
