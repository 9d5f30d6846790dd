#!/usr/bin/env bash
# Install the Debian packages cloudctl needs, skipping what is already there.
# Usage: tools/install-system.sh [--postgres] [--browser]
set -euo pipefail

packages=(redis-server libvirt-daemon-system libvirt-dev pkg-config qemu-system-x86 qemu-utils
          tini python3-venv python3-dev gcc make procps
          busybox-static syslinux syslinux-common mtools dosfstools fdisk e2fsprogs cpio gzip
          dnsmasq-base iproute2   # dnsmasq-base, iproute2: the demo image's DHCP test (tests/image)
          # security groups (iptables/ip6tables/ebtables-restore, conntrack -D) and the network
          # node's routers (NAT, conntrack cleanup, gratuitous ARP with arping)
          iptables conntrack iputils-arping)
for arg in "$@"; do
  case "$arg" in
    --postgres) packages+=(postgresql) ;;
    --browser) packages+=(chromium) ;;  # the admin browser test drives Debian's Chromium
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The demo image build downloads the kernel .deb, which needs package lists even when nothing
# is missing on the host.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "cloudctl needs root to install: ${missing[*]:-package lists}" >&2
    exit 1
  fi
  echo "==> apt-get update"
  apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
