#!/usr/bin/env bash
# Build the cloudctl demo guest disk image, offline, from Debian packages only.
#
#   tools/build-tiny-image.sh OUTPUT.qcow2
#
# Result: a small BIOS-bootable qcow2 disk (~14 MB, 33 MiB virtual):
#   MBR (syslinux mbr.bin) + partition table
#   p1  FAT16 "CLOUDBOOT", bootable: SYSLINUX, Debian cloud kernel, busybox initramfs
#   p2  ext4 "cloudimg-rootfs": busybox userland
# The initramfs loads virtio/ATA/CD-ROM/ACPI-button drivers, finds the root
# filesystem by label (so vda/sda naming does not matter) and switch_roots.
#
# What the guest prints on the serial console (kernel console=ttyS0):
#   cloudctl-guest: boot-count N   N = persistent counter, incremented + synced each boot
#   cloudctl-guest: ready          once the ACPI power-button handler is listening
#   cloudctl-guest: ip A/P gw G    when eth0 (virtio-net) got a DHCP lease (G: the
#                                  lease's router, or "none"); printed again only
#                                  if a renewal changes it
#   cloudctl-guest: no lease on eth0   when no DHCP server answered within ~10 s
#                                  (udhcpc keeps trying in the background)
# Networking never delays "ready": the DHCP client runs in the background, so
# the ip line may come before or after "ready"; a guest without a NIC prints
# no ip line at all. With a NIC the guest answers ping (the kernel) and serves
# a one-line page over HTTP on TCP port 80 (busybox httpd), for connectivity
# tests.
# An ACPI power-button press (e.g. QMP system_powerdown) powers the guest off
# cleanly and quickly: processes stopped, root remounted read-only, poweroff.
#
# Packages are fetched with `apt-get download` from the host's apt sources
# (assumes `apt-get update` was run) into ${CLOUDCTL_CACHE_DIR:-<repo>/var/cache}/debs
# and reused from there (verified against the apt metadata's SHA256). Nothing is
# installed on the host: the .debs are only unpacked with `dpkg-deb -x`. No loop
# devices, no mounts: filesystems are built as plain files (mkfs.fat + mcopy +
# syslinux, mke2fs -d) and assembled with dd.
#
# The output is reproducible: same packages + same script => same sha256.
#
# Environment knobs:
#   CLOUDCTL_CACHE_DIR     cache directory (default <repo>/var/cache)
#   CLOUDCTL_KERNEL_META   kernel metapackage (default linux-image-cloud-amd64)
#   SOURCE_DATE_EPOCH      timestamp stamped on every file (default fixed)
set -euo pipefail

PROG=${0##*/}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
export LC_ALL=C TZ=UTC

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: $PROG OUTPUT.qcow2" >&2; exit 2; }
OUTPUT=$1

# ============================================================ host tools
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("'$1' (Debian package: $2)"); }
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need syslinux syslinux
need mcopy mtools
need mkfs.fat dosfstools
need sfdisk fdisk
need mke2fs e2fsprogs
need debugfs e2fsprogs
need qemu-img qemu-utils
need gzip gzip
for t in cat cp dd ln mkdir mktemp mv sha256sum sort stat touch truncate; do need "$t" coreutils; done
need find findutils
need sed sed
need grep grep
need awk mawk
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
[ -r "$MBR_BIN" ] || missing+=("'$MBR_BIN' (Debian package: syslinux-common)")
if [ ${#missing[@]} -gt 0 ]; then
    printf '%s: missing host tool %s\n' "$PROG" "${missing[@]}" >&2
    die "install the Debian package(s) named above (apt-get install ...) and retry"
fi

# ============================================================ settings
CACHE_DIR=${CLOUDCTL_CACHE_DIR:-$REPO/var/cache}
DEB_CACHE=$CACHE_DIR/debs
KERNEL_META=${CLOUDCTL_KERNEL_META:-linux-image-cloud-amd64}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH   # libext2fs: superblock times

ROOT_LABEL=cloudimg-rootfs
BOOT_LABEL=CLOUDBOOT
ROOT_UUID=8c1e4f0a-3b7d-4c52-9a16-0c10dc7d0002
HASH_SEED=8c1e4f0a-3b7d-4c52-9a16-0c10dc7d0003
FAT_VOLID=0c10dc7d
DISK_ID=0x0c10dc7d
BOOT_MIB=20           # vmlinuz (~14 MB) + initrd (~1.5 MB) + slack
ROOT_MIB=12           # busybox userland (~2 MB) + journal + room for guest state
# vga=0x0f04 ("current mode"): the kernel's real-mode setup then skips the BIOS
# video mode switch, which SeaBIOS's serial console (QEMU -nodefaults, no VGA)
# turns into a clear-screen escape sequence glued to the first console line.
KERNEL_CMDLINE="console=ttyS0,115200 root=LABEL=$ROOT_LABEL quiet vga=0x0f04 panic=-1 8250.nr_uarts=1"

# Drivers the initramfs loads (dependencies are added automatically; anything
# in modules.builtin is skipped - in the Debian cloud kernel ext4, jbd2,
# mbcache, crc16 and crc32c_generic are built in).
#   virtio_pci, virtio_blk     root disk (if=virtio)
#   ata_piix, sr_mod, isofs    config drive on the i440fx IDE CD-ROM
#   button, evdev              ACPI power button -> /dev/input/event* for acpid
#   virtio_net                 eth0 on a virtio NIC (af_packet, which udhcpc
#                              needs, is built in)
# (crc32c_intel is left out: TCG's default CPU model lacks SSE4.2, it would
# only fail to load.)
INITRD_MODULES="virtio_pci virtio_blk ext4 jbd2 mbcache crc16 crc32c_generic
  ata_piix sr_mod cdrom isofs button evdev virtio_net"

START=$(date +%s.%N)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tiny-image.XXXXXX")
OUTPUT_TMP=$OUTPUT.tmp.$$       # unique: concurrent builds of one OUTPUT must not collide
trap 'rm -rf "$WORK" "$OUTPUT_TMP"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$DEB_CACHE"

# ============================================================ .deb cache
# fetch_deb PACKAGE -> prints the path of the cached .deb of its candidate
# version, downloading it if missing or not matching apt's SHA256.
fetch_deb() {
    local pkg=$1 meta ver arch sha file tmp aptopts=()
    meta=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null) ||
        die "package $pkg unknown to apt (run apt-get update?)"
    ver=$(sed -n 's/^Version: //p' <<<"$meta" | head -n1)
    arch=$(sed -n 's/^Architecture: //p' <<<"$meta" | head -n1)
    sha=$(sed -n 's/^SHA256: //p' <<<"$meta" | head -n1)
    [ -n "$ver" ] && [ -n "$arch" ] || die "cannot determine the candidate version of $pkg"
    file=$DEB_CACHE/${pkg}_${ver//:/%3a}_${arch}.deb
    if [ -f "$file" ] && { [ -z "$sha" ] || sha256sum "$file" | grep -q "^$sha "; }; then
        log "cached   ${file##*/}"
    else
        log "download $pkg $ver"
        tmp=$(mktemp -d "$DEB_CACHE/.download.XXXXXX")
        [ "$(id -u)" = 0 ] && aptopts=(-o APT::Sandbox::User=root)
        (cd "$tmp" && apt-get -q "${aptopts[@]}" download "$pkg=$ver" >&2) ||
            { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
        mv -f "$tmp"/*.deb "$file"     # rename: atomic for concurrent builds
        rm -rf "$tmp"
    fi
    printf '%s\n' "$file"
}

# ============================================================ busybox + root partition
# Runs in the background while the (much bigger) kernel package is unpacked.
RT=$WORK/rootfs
BBTREE=$WORK/bbtree
ROOT_IMG=$WORK/root.img

build_busybox_tree() {   # busybox + one relative symlink per applet, in $BBTREE
    local a
    mkdir -p "$BBTREE"/{bin,sbin,usr/bin,usr/sbin}
    cp "$BUSYBOX" "$BBTREE/bin/busybox"
    while IFS= read -r a; do
        case $a in
            bin/busybox) ;;
            bin/*|sbin/*) ln -s ../bin/busybox "$BBTREE/$a" ;;
            *) ln -s ../../bin/busybox "$BBTREE/$a" ;;
        esac
    done < <("$BUSYBOX" --list-full)
}

build_rootfs_tree() {
    cp -a "$BBTREE" "$RT"
    mkdir -p "$RT"/{dev,proc,sys,run,tmp,root,mnt,etc/init.d,etc/acpi/PWRF,var/lib/cloudctl,var/log} \
        "$RT"/{etc/udhcpc,var/www}
    chmod 1777 "$RT/tmp"
    chmod 0700 "$RT/root"
    ln -s ../run "$RT/var/run"
    ln -s ../run/resolv.conf "$RT/etc/resolv.conf"   # DHCP's DNS servers: not written to the disk
    echo cloudctl-guest > "$RT/var/www/index.html"
    echo cloudctl-guest > "$RT/etc/hostname"
    echo 'root:x:0:0:root:/root:/bin/sh' > "$RT/etc/passwd"
    echo 'root:x:0:' > "$RT/etc/group"
    echo "LABEL=$ROOT_LABEL / ext4 rw,noatime 0 1" > "$RT/etc/fstab"
    cat > "$RT/etc/os-release" <<EOF
NAME="cloudctl tiny guest"
ID=cloudctl-tiny
PRETTY_NAME="cloudctl tiny guest (busybox $BUSYBOX_VERSION)"
EOF

    cat > "$RT/etc/inittab" <<'EOF'
# busybox init
::sysinit:/etc/init.d/rcS
ttyS0::askfirst:-/bin/sh
::ctrlaltdel:/sbin/cloudctl-halt reboot
::shutdown:/etc/init.d/rcK
::restart:/sbin/init
EOF

    cat > "$RT/etc/init.d/rcS" <<'EOF'
#!/bin/sh
# Boot: mounts, boot counter, network (in the background), ACPI daemon, then
# the ready marker.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
say() { echo "cloudctl-guest: $*" > /dev/console; }
# /dev, /proc and /sys were moved here from the initramfs.
grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
grep -q ' /sys ' /proc/mounts || mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
grep -q '^[^ ]* / [^ ]* ro[ ,]' /proc/mounts && mount -o remount,rw /
hostname -F /etc/hostname

# Persistent boot counter: written atomically and synced before it is shown.
f=/var/lib/cloudctl/boot-count
n=$(cat "$f" 2>/dev/null)
case $n in ''|*[!0-9]*) n=0 ;; esac
n=$((n + 1))
echo "$n" > "$f.new" && mv "$f.new" "$f" && sync || say "warning: cannot update $f"
say "boot-count $n"

# Network. Loopback always; a virtio NIC (eth0) gets a DHCP client whose
# script (/etc/udhcpc/default.script) applies the lease and prints the
# "ip" line, or "no lease on eth0" after 5 discovers 2 s apart. udhcpc then
# keeps trying, and renews a lease, in the background. Nothing here waits for
# it: "ready" is independent of DHCP.
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    httpd -p 80 -h /var/www
    udhcpc -i eth0 -b -t 5 -T 2 -A 10 -x hostname:"$(hostname)" \
        -p /run/udhcpc.eth0.pid > /run/udhcpc.eth0.log 2>&1 &
fi

# ACPI power button: the "button" and "evdev" modules (loaded by the
# initramfs) expose it as /dev/input/event*; busybox acpid maps KEY_POWER to
# /etc/acpi/PWRF/00000080. acpid daemonizes *before* opening the event
# devices and writes its pid file after, so wait for the pid file: only then
# is a power-button press guaranteed to be seen.
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid
i=0
while [ ! -s /run/acpid.pid ] && [ $i -lt 100 ]; do sleep 0.02; i=$((i + 1)); done
[ -s /run/acpid.pid ] || say "warning: acpid is not running"

say ready
EOF

    cat > "$RT/etc/init.d/rcK" <<'EOF'
#!/bin/sh
# Run by busybox init on `poweroff` / `reboot`: leave the root filesystem clean.
echo "cloudctl-guest: shutting down" > /dev/console
[ -s /run/acpid.pid ] && kill "$(cat /run/acpid.pid)" 2>/dev/null
sync
mount -o remount,ro / 2>/dev/null
exit 0
EOF

    # Fast clean stop for the power button (busybox init's own poweroff path
    # sleeps a fixed ~2 s): stop all processes, sync, remount / read-only, off.
    cat > "$RT/sbin/cloudctl-halt" <<'EOF'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
action=${1:-poweroff}
case $action in
    poweroff|reboot) ;;
    *) echo "usage: cloudctl-halt poweroff|reboot" >&2; exit 2 ;;
esac
trap '' TERM HUP INT
printf "\ncloudctl-guest: %s (clean)\n" "$action" > /dev/console   # own line, even after a prompt
kill -TERM -1 2>/dev/null          # everything but init and this script
sync
i=0
until mount -o remount,ro / 2>/dev/null; do
    i=$((i + 1))
    [ $i -eq 5 ] && kill -KILL -1 2>/dev/null
    if [ $i -ge 20 ]; then
        echo "cloudctl-guest: warning: / busy, cannot remount read-only" > /dev/console
        break
    fi
    sleep 0.1
done
sync
exec "$action" -f
EOF

    # udhcpc's event script (Debian busybox's default path for it).
    cat > "$RT/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc events: apply a lease (address/prefix, default route, DNS) to
# $interface and report it on the console.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# A line of its own: a lease may come after the console's "Please press Enter"
# prompt, which ends without a newline.
say() { printf '\ncloudctl-guest: %s\n' "$*" > /dev/console; }
state=/run/udhcpc.$interface
prefix_of() {      # dotted netmask -> prefix length
    local n=0 octet
    for octet in $(echo "$1" | tr . ' '); do
        while [ "$octet" -gt 0 ]; do n=$((n + (octet & 1))); octet=$((octet >> 1)); done
    done
    echo "$n"
}
case $1 in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    leasefail)
        if [ ! -e "$state.nolease" ]; then     # once, not at every background retry
            : > "$state.nolease"
            say "no lease on $interface"
        fi
        ;;
    bound|renew)
        rm -f "$state.nolease"
        prefix=${mask:-$(prefix_of "${subnet:-255.255.255.255}")}
        if [ "$(cat "$state.addr" 2>/dev/null)" != "$ip/$prefix" ]; then
            ip -4 addr flush dev "$interface"
            echo "$ip/$prefix" > "$state.addr"
        fi
        ip addr replace "$ip/$prefix" broadcast "${broadcast:-+}" dev "$interface"
        while ip -4 route del default dev "$interface" 2>/dev/null; do :; done
        gw=none
        for r in $router; do
            ip route add default via "$r" dev "$interface" && { gw=$r; break; }
        done
        {
            [ -n "$domain" ] && echo "search $domain"
            for d in $dns; do echo "nameserver $d"; done
        } > /run/resolv.conf
        line="ip $ip/$prefix gw $gw"
        if [ "$(cat "$state.line" 2>/dev/null)" != "$line" ]; then
            echo "$line" > "$state.line"
            say "$line"
        fi
        ;;
esac
exit 0
EOF

    cat > "$RT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
exec /sbin/cloudctl-halt poweroff
EOF
    chmod 0755 "$RT/etc/init.d/rcS" "$RT/etc/init.d/rcK" "$RT/sbin/cloudctl-halt" \
        "$RT/etc/acpi/PWRF/00000080" "$RT/etc/udhcpc/default.script"
    find "$RT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

build_root_partition() {
    mke2fs -q -F -t ext4 -L "$ROOT_LABEL" -U "$ROOT_UUID" -m 0 \
        -E "hash_seed=$HASH_SEED,root_owner=0:0" -d "$RT" "$ROOT_IMG" "${ROOT_MIB}M" >/dev/null
    # mke2fs -d copies owner and ctime from the build tree (touch cannot set a
    # ctime): make everything root-owned and pin the ctime, so the image is the
    # same whoever builds it and whenever. debugfs exits 0 even on errors.
    find "$RT" -mindepth 1 -printf '%P\n' | sort |
        awk -v t="$SOURCE_DATE_EPOCH" '{ printf "sif /%s ctime @%s\nsif /%s uid 0\nsif /%s gid 0\n", $0, t, $0, $0 }' \
        > "$WORK/debugfs.cmds"
    debugfs -w -f "$WORK/debugfs.cmds" "$ROOT_IMG" >/dev/null 2>"$WORK/debugfs.err" &&
        ! grep -v '^debugfs [0-9]' "$WORK/debugfs.err" >&2 ||
        die "debugfs failed on the root filesystem"
}

busybox_job() {
    BUSYBOX_DEB=$(fetch_deb busybox-static)
    echo "$BUSYBOX_DEB" > "$WORK/busybox.deb"
    dpkg-deb -x "$BUSYBOX_DEB" "$WORK/busybox"
    BUSYBOX=$WORK/busybox/bin/busybox
    [ -x "$BUSYBOX" ] || die "no bin/busybox in $BUSYBOX_DEB"
    BUSYBOX_VERSION=$(dpkg-deb -f "$BUSYBOX_DEB" Version)
    build_busybox_tree
    build_rootfs_tree
    build_root_partition
}
busybox_job &
BUSYBOX_JOB=$!

# ============================================================ kernel
# The metapackage only depends on the versioned image package: resolve it.
KERNEL_PKG=$(apt-cache show --no-all-versions "$KERNEL_META" 2>/dev/null |
    sed -n 's/^Depends: //p' | head -n1 | tr ',' '\n' |
    sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n1) || true
[ -n "$KERNEL_PKG" ] || die "cannot resolve the kernel package behind $KERNEL_META (run apt-get update?)"
KERNEL_DEB=$(fetch_deb "$KERNEL_PKG")
KERNEL_VERSION=$(dpkg-deb -f "$KERNEL_DEB" Version)
log "unpacking ${KERNEL_DEB##*/} (dpkg-deb -x, not installed)"
dpkg-deb -x "$KERNEL_DEB" "$WORK/kernel"
KVER=${KERNEL_PKG#linux-image-}
VMLINUZ=$WORK/kernel/boot/vmlinuz-$KVER
MODDIR=$WORK/kernel/lib/modules/$KVER
[ -f "$VMLINUZ" ] || die "no boot/vmlinuz-$KVER in ${KERNEL_DEB##*/}"
[ -d "$MODDIR/kernel" ] || die "no modules for $KVER in ${KERNEL_DEB##*/}"

# Module closure. The .deb ships no modules.dep (depmod runs in postinst), so
# read the "depends=" field straight from each module's .modinfo section.
declare -A MODPATH=() BUILTIN=() SEEN=()
while read -r n f; do
    n=${n%.ko*}; MODPATH[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*' -printf '%f %p\n')
while IFS= read -r f; do
    n=${f##*/}; n=${n%.ko}; BUILTIN[${n//-/_}]=1
done < "$MODDIR/modules.builtin"
LOAD_ORDER=()
add_module() {     # depth first: dependencies before dependents
    local m=${1//-/_} f deps d
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    [ -n "${BUILTIN[$m]:-}" ] && return 0
    f=${MODPATH[$m]:-}
    [ -n "$f" ] || die "module $m is neither built into $KVER nor shipped with it"
    case $f in *.ko) ;; *) die "compressed module $f is not supported" ;; esac
    deps=$(grep -a -o -m1 'depends=[^[:cntrl:]]*' "$f" | head -n1 | sed 's/^depends=//; s/,/ /g') || true
    for d in $deps; do add_module "$d"; done
    LOAD_ORDER+=("$m")
}
for m in $INITRD_MODULES; do add_module "$m"; done
log "initramfs modules: ${LOAD_ORDER[*]}"

wait "$BUSYBOX_JOB" || die "building the busybox root filesystem failed"
BUSYBOX_DEB=$(cat "$WORK/busybox.deb")

# ============================================================ initramfs
IR=$WORK/initramfs
cp -a "$BBTREE" "$IR"
mkdir -p "$IR"/{dev,proc,sys,newroot,lib/modules,etc}
for m in "${LOAD_ORDER[@]}"; do
    cp "${MODPATH[$m]}" "$IR/lib/modules/$m.ko"
    echo "$m"
done > "$IR/etc/modules-load-order"
cat > "$IR/init" <<'EOF'
#!/bin/sh
# cloudctl tiny initramfs: load drivers, mount the root fs by label, switch_root.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

rescue() {
    echo "cloudctl-guest: initramfs error: $*"
    echo "cloudctl-guest: dropping to a rescue shell"
    exec setsid cttyhack sh
}

while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "cloudctl-guest: initramfs: cannot load module $m"
done < /etc/modules-load-order

root=LABEL=cloudimg-rootfs
for arg in $(cat /proc/cmdline); do
    case $arg in root=*) root=${arg#root=} ;; esac
done

dev=
i=0
while [ $i -lt 200 ]; do           # give the disk up to ~10 s to show up
    case $root in
        LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
        *) [ -b "$root" ] && dev=$root ;;
    esac
    [ -n "$dev" ] && break
    sleep 0.05
    i=$((i + 1))
done
[ -n "$dev" ] || rescue "root device $root not found"
mount -t ext4 -o rw,noatime "$dev" /newroot || rescue "cannot mount $dev ($root)"
[ -x /newroot/sbin/init ] || rescue "no /sbin/init on $dev"
for fs in dev proc sys; do mount -o move /$fs /newroot/$fs; done
exec switch_root /newroot /sbin/init
EOF
chmod 0755 "$IR/init"
find "$IR" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# cpio "newc" (what the kernel unpacks), written here so that it is
# reproducible (fixed inode numbers, owner 0:0, mtime SOURCE_DATE_EPOCH;
# cpio -o would record the build host's inode and device numbers).
newc_pad() {       # NULs padding a length up to a multiple of 4
    case $(( (4 - $1 % 4) % 4 )) in 1) printf '\0' ;; 2) printf '\0\0' ;; 3) printf '\0\0\0' ;; esac
}
newc_entry() {     # newc_entry INO MODE NLINK SIZE NAME
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
        "$1" "$2" 0 0 "$3" "$SOURCE_DATE_EPOCH" "$4" 0 0 0 0 $(( ${#5} + 1 )) 0 "$5"
    newc_pad $(( 110 + ${#5} + 1 ))
}
write_newc() {     # write_newc DIR > archive.cpio
    local ino=0 type perm size path link
    while read -r type perm size path link; do
        ino=$((ino + 1))
        case $type in
            d) newc_entry $ino $(( 0040000 | 8#$perm )) 2 0 "$path" ;;
            f) newc_entry $ino $(( 0100000 | 8#$perm )) 1 "$size" "$path"
               cat "$1/$path"; newc_pad "$size" ;;
            l) newc_entry $ino $(( 0120000 | 8#$perm )) 1 ${#link} "$path"
               printf '%s' "$link"; newc_pad ${#link} ;;
            *) die "initramfs: unsupported file type '$type' of $path" ;;
        esac
    done < <(find "$1" -mindepth 1 -printf '%y %m %s %P %l\n' | sort -k4,4)
    newc_entry 0 0 1 0 'TRAILER!!!'
}
log "packing initramfs"
write_newc "$IR" | gzip -n -6 > "$WORK/initrd.img"

# ============================================================ boot partition
log "building boot partition (FAT16 + SYSLINUX)"
cp "$VMLINUZ" "$WORK/vmlinuz"
cat > "$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $KERNEL_CMDLINE
EOF
touch -d "@$SOURCE_DATE_EPOCH" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg"
BOOT_IMG=$WORK/boot.img
BOOT_START=2048                    # sectors: 1 MiB aligned
# -h: "hidden sectors" = partition start, so the boot sector finds itself on disk
mkfs.fat -C -F 16 -n "$BOOT_LABEL" -i "$FAT_VOLID" --invariant -h $BOOT_START \
    "$BOOT_IMG" $((BOOT_MIB * 1024)) >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -m -i "$BOOT_IMG" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg" ::/
syslinux --install "$BOOT_IMG"

# ============================================================ whole disk
log "assembling disk"
DISK=$WORK/disk.raw
BOOT_SECTORS=$((BOOT_MIB * 2048))
ROOT_START=$((BOOT_START + BOOT_SECTORS))
ROOT_SECTORS=$((ROOT_MIB * 2048))
truncate -s $(((ROOT_START + ROOT_SECTORS) * 512)) "$DISK"
sfdisk -q --no-reread --no-tell-kernel "$DISK" >/dev/null <<EOF
label: dos
label-id: $DISK_ID
unit: sectors

start=$BOOT_START, size=$BOOT_SECTORS, type=e, bootable
start=$ROOT_START, size=$ROOT_SECTORS, type=83
EOF
dd if="$MBR_BIN" of="$DISK" bs=440 count=1 conv=notrunc status=none
dd if="$BOOT_IMG" of="$DISK" bs=1M seek=$((BOOT_START * 512)) oflag=seek_bytes conv=notrunc,sparse status=none
dd if="$ROOT_IMG" of="$DISK" bs=1M seek=$((ROOT_START * 512)) oflag=seek_bytes conv=notrunc,sparse status=none

# ============================================================ qcow2, atomically
log "converting to qcow2"
mkdir -p "$(dirname "$OUTPUT")"
qemu-img convert -c -O qcow2 "$DISK" "$OUTPUT_TMP"
mv -f "$OUTPUT_TMP" "$OUTPUT"

END=$(date +%s.%N)
log "done in $(awk -v s="$START" -v e="$END" 'BEGIN { printf "%.1f", e - s }') s:" \
    "$(stat -c %s "$OUTPUT") bytes, kernel $KERNEL_PKG $KERNEL_VERSION, busybox-static" \
    "$(dpkg-deb -f "$BUSYBOX_DEB" Version)"
echo "$OUTPUT"
echo "sha256 $(sha256sum "$OUTPUT" | cut -d' ' -f1)"
