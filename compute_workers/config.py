"""Configuration of a compute worker, from environment variables only.

Every setting is one environment variable; ``python -m compute_workers`` options override some of them.
A malformed value fails at start with :class:`ConfigError` naming the variable.

| Variable | Default | Meaning |
|---|---|---|
| `CELERY_BROKER_URL` | `redis://127.0.0.1:6379/0` | Broker the worker consumes from and sends conductor reports to. |
| `CELERY_RPC_BACKEND` | `redis://127.0.0.1:6379/1` | Redis result backend holding the results of synchronous calls (`compute.get_console_output`). |
| `REDIS_PASSWORD` | (empty) | Password of the Redis broker, put into the two URLs above when they name none (`tools/services.sh` generates it into the control plane's `var/redis.password`). |
| `COMPUTE_HOST_KEY` | (empty) | This host's key (`manage.py host_credentials <host>` on the control plane prints it): every report to the conductor is signed with it (HMAC-SHA256). Unset: the worker starts, but the conductor drops every report of this host. |
| `CLOUDCTL_API_URL` | `http://127.0.0.1:8000` | The control plane's API. The service token is sent only to URLs under it: an image or upload URL of a task that points anywhere else is refused without a request. |
| `COMPUTE_HOST` | `socket.gethostname()` | Host name; the worker consumes queue `compute.<host>` as node `compute@<host>`. |
| `COMPUTE_LIBVIRT_URI` | `qemu:///system` | libvirt connection URI (`test:///default` for fast tests). |
| `COMPUTE_DRIVER` | `libvirt` | `libvirt`, or `fake` (in-memory hypervisor, for benchmarks). |
| `COMPUTE_VIRT_TYPE` | `auto` | `kvm`, `qemu` (TCG), or `auto`: kvm only when a probe guest really runs fast under KVM. |
| `COMPUTE_MACHINE_TYPE` | `pc` | QEMU machine type of new domains. |
| `INSTANCES_PATH` | `/var/lib/cloudctl/instances` | Instance directories and the image cache `_base/`; every parent must be traversable by the QEMU user. |
| `CLOUDCTL_SERVICE_TOKEN` | (empty) | Sent as `Authorization: Token <token>` when downloading images; a spawn that needs an image fails without it. |
| `COMPUTE_HEARTBEAT_INTERVAL` | `5` | Seconds between two `conductor.host_heartbeat` reports. |
| `COMPUTE_CONCURRENCY` | `4` | Worker threads, i.e. tasks run at once. |
| `COMPUTE_RESERVED_HOST_MEMORY_MB` | `512` | RAM kept for the host itself, reported in the heartbeat. |
| `COMPUTE_RESERVED_HOST_DISK_GB` | `0` | Disk kept for the host itself, reported in the heartbeat. |
| `COMPUTE_IMAGE_DOWNLOAD_TIMEOUT` | `300` | Seconds one image download may take in all. |
| `COMPUTE_CLEAN_SHUTDOWN_TIMEOUT` | `60` | Seconds a soft reboot waits for the guest to shut down after the ACPI request before it reboots hard; also the wait of a power off whose task gives no timeout. At most `COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT` - 30. |
| `COMPUTE_SPAWN_SOFT_TIME_LIMIT` | `900` | Celery soft time limit of `compute.spawn`, seconds. |
| `COMPUTE_SPAWN_TIME_LIMIT` | `960` | Celery hard time limit of `compute.spawn`. |
| `COMPUTE_TERMINATE_SOFT_TIME_LIMIT` | `120` | Soft time limit of `compute.terminate`. |
| `COMPUTE_TERMINATE_TIME_LIMIT` | `180` | Hard time limit of `compute.terminate`. |
| `COMPUTE_CONSOLE_SOFT_TIME_LIMIT` | `20` | Soft time limit of `compute.get_console_output`. |
| `COMPUTE_CONSOLE_TIME_LIMIT` | `30` | Hard time limit of `compute.get_console_output`. |
| `COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT` | `300` | Soft time limit of each lifecycle task (reboot, power off/on, pause, unpause, suspend, resume); a power off's clean-shutdown wait is capped 30 s below it. |
| `COMPUTE_LIFECYCLE_TIME_LIMIT` | `360` | Hard time limit of each lifecycle task. |
| `COMPUTE_DHCP_SOFT_TIME_LIMIT` | `60` | Soft time limit of `compute.network_dhcp_sync` (a network node's bridge, namespace, veth and dnsmasq of one network) and of `compute.network_host_sync` (a host's bridges, flood entries and firewall). |
| `COMPUTE_DHCP_TIME_LIMIT` | `90` | Hard time limit of `compute.network_dhcp_sync` and `compute.network_host_sync`. |
| `COMPUTE_ROUTER_SOFT_TIME_LIMIT` | `60` | Soft time limit of `compute.network_router_sync` (a network node's router: bridges, namespace, veths, route and NAT). |
| `COMPUTE_ROUTER_TIME_LIMIT` | `90` | Hard time limit of `compute.network_router_sync`. |
| `COMPUTE_SNAPSHOT_SOFT_TIME_LIMIT` | `1800` | Soft time limit of `compute.snapshot_instance` (copy, convert and upload). |
| `COMPUTE_SNAPSHOT_TIME_LIMIT` | `1860` | Hard time limit of `compute.snapshot_instance`. |
| `COMPUTE_RESIZE_SOFT_TIME_LIMIT` | `1800` | Soft time limit of `compute.resize_instance` (power off, then the disk copy to the destination); the copy must end 60 s before it (counting the clean-shutdown wait), or it is abandoned and the instance put back. |
| `COMPUTE_RESIZE_TIME_LIMIT` | `1860` | Hard time limit of `compute.resize_instance`. |
| `COMPUTE_RESIZE_STEP_SOFT_TIME_LIMIT` | `600` | Soft time limit of the other cold migration and resize tasks (`compute.prep_resize`, which may download the image, `finish_resize`, `confirm_resize`, `revert_resize`, `finish_revert_resize`). |
| `COMPUTE_RESIZE_STEP_TIME_LIMIT` | `660` | Hard time limit of those tasks. |
| `COMPUTE_MAX_CONCURRENT_SNAPSHOTS` | `2` | Snapshots run at once on this host; the others wait for a slot. Temporary files go to `INSTANCES_PATH/snapshots/`. |
| `COMPUTE_IMAGE_UPLOAD_TIMEOUT` | `600` | Seconds a snapshot upload may wait for the image service (connect, and each read of its answer). |
| `COMPUTE_IMAGE_CACHE_MAX_AGE` | `86400` | A cached base image (`_base/<image-id>`) that no instance disk of this host uses and no spawn used for this many seconds is removed. |
| `COMPUTE_IMAGE_CACHE_CLEANUP_INTERVAL` | `600` | Seconds between two image cache cleanups (run by the heartbeat thread). |
| `COMPUTE_MIGRATION_ADDRESS` | the host name (`COMPUTE_HOST`) | Address at which other hosts' libvirtd and QEMU reach this host for migrations: the check answers `qemu+<scheme>://<address>/system` (libvirt, peer to peer) and `tcp://<address>` (QEMU's migration stream). An IPv6 address is bracketed. |
| `COMPUTE_MIGRATION_SCHEME` | `tcp` | `tcp`, `tls` or `ssh`: the transport of the libvirt migration URI (`qemu+tcp://`, `qemu+tls://`, `qemu+ssh://`); libvirtd must listen on it (`tcp`: `listen_tcp`, `tls`: `listen_tls`, `ssh`: root's key trusted by every host). |
| `COMPUTE_MIGRATION_UNSAFE` | `0` | `1`: add `VIR_MIGRATE_UNSAFE` to live migrations on shared storage, for an `INSTANCES_PATH` shared in a way libvirt cannot recognise (a local directory shared by bind mounts); libvirt 9.0 refuses such a migration otherwise ("Migration without shared storage is unsafe"). Never on real NFS/cluster filesystems: libvirt recognises them. |
| `COMPUTE_LIVE_MIGRATION_BANDWIDTH` | `0` | Maximum bandwidth of a live migration's stream, MiB/s; `0`: libvirt's default (unlimited, or what `virsh migrate-setspeed` set on the domain). |
| `COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY` | `0` | `1`: start live migrations with `VIR_MIGRATE_POSTCOPY`, so that a switch-over (`compute.live_migration_force_complete`, or the completion timeout with `COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION=force_complete`) moves the guest to the destination at once, which then fetches the pages not yet copied; a failure after that loses the guest on both hosts. The destination's QEMU needs userfaultfd: on Debian 12 (QEMU 7.2, run as `libvirt-qemu`) set `sysctl vm.unprivileged_userfaultfd=1` on every host that receives migrations (or run QEMU as root); otherwise libvirt fails every migration at once with "Postcopy is not supported". |
| `COMPUTE_LIVE_MIGRATION_PERMIT_AUTO_CONVERGE` | `0` | `1`: start live migrations with `VIR_MIGRATE_AUTO_CONVERGE` (QEMU throttles the guest's vCPUs while the copy does not converge); as in Nova, only when post-copy is not permitted. |
| `COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION` | `abort` | What a live migration does when its `completion_timeout` passes: `abort` it (reported failed), or `force_complete`: switch it over (post-copy when permitted, else pause the guest until the copy converges) and never abort it. |
| `COMPUTE_LIVE_MIGRATION_SOFT_TIME_LIMIT` | `3600` | Soft time limit of `compute.live_migration`; a migration's `completion_timeout` is capped 30 s below it, so that an aborted migration is still reported. The other migration tasks use the limits of their kind: the checks those of `compute.get_console_output`, `compute.pre_live_migration` those of `compute.spawn` (it may download an image), post/rollback/abort/force-complete those of the lifecycle tasks. |
| `COMPUTE_LIVE_MIGRATION_TIME_LIMIT` | `3660` | Hard time limit of `compute.live_migration`. |
| `COMPUTE_VISIBILITY_TIMEOUT` | `7200` | Redis `visibility_timeout`: an unacknowledged task is delivered again after it. Must exceed every hard time limit. |
| `COMPUTE_TUNNEL_IP` | (empty) | This host's VXLAN tunnel endpoint: the `local` address of every `vxlan-<vni>` device it makes for a vxlan network's bridge (`brq…`), and the address the other hosts' forwarding entries point to. A spawn on a vxlan network fails while it is unset (flat networks do not need it). Reported in every heartbeat (`tunnel_ip`): the control plane names it as a peer in the other hosts' network state. `make run` sets `127.0.0.1` unless it is set (one host). |
| `COMPUTE_FLAT_INTERFACE` | (empty) | The physical interface enslaved to the bridge of a flat network (Neutron's `physical_interface_mappings`; one flat network per interface). Unset: a flat network's bridge has no uplink and joins only this host's guests. `make run` sets `cc-public` unless it is set: the veth into its outside world, `tools/public-net.sh`. |
| `COMPUTE_NETWORK_NAMESPACE` | (empty) | The network namespace (a name `ip netns` knows) the host's networking lives in: its bridges, VXLAN devices, firewall and the host ends of the network node's veths are made there (`ip netns exec`), while the worker itself stays in its own (it reaches the broker and the API there). Empty: the worker's own namespace, as on a real host. The multi-host harness sets each host's namespace, where its libvirtd plugs the guests' taps. |
| `COMPUTE_FAKE_VCPUS` | `16` | vCPUs the fake driver reports (`--vcpus`). |
| `COMPUTE_FAKE_MEMORY_MB` | `32768` | RAM the fake driver reports (`--memory-mb`). |
| `COMPUTE_FAKE_DISK_GB` | `500` | Disk the fake driver reports (`--disk-gb`). |
| `COMPUTE_FAKE_SPAWN_DELAY` | `0` | Seconds the fake driver's spawn takes (tests and benchmarks: a spawn in flight during a fault). |
| `COMPUTE_FAKE_DESTROY_DELAY` | `0` | Seconds the fake driver's destroy takes (a delete in flight during a fault). |
| `COMPUTE_FAKE_STATE_DIR` | (empty) | Where the fake driver keeps its domains (`<dir>/<host>.json`, written at each change) so that they outlive a killed worker as libvirt's do (the kill -9 tests, `bench/chaos.py`). Empty: in memory only, a restarted fake worker is a host that rebooted. |
| `COMPUTE_TEST_DUPLICATE_DELIVERY` | `0` | **Tests only.** `1` (or `after`): every task this worker runs is run a second time once the first run finished, with the same task id and arguments, as Redis redelivers a message that was not acknowledged; `concurrent`: the second run starts while the first still runs. Proves that every compute and network task changes nothing the second time (README: Duplicate delivery); doubles every operation's work, so the worker logs a WARNING at start when it is on. |

Celery time limits are not enforced by the ``threads`` pool the worker runs (Celery ignores them
there); they are declared for pools that do, and the operations bound their own waits (download
timeout, ``qemu-img`` timeouts, libvirt calls).
"""  # noqa: E501  (the table above is meant to be copied into the README as it is)

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from compute_workers import contract, credentials
from compute_workers.redelivery import parse_mode

DRIVERS = ("libvirt", "fake")
VIRT_TYPES = ("auto", "kvm", "qemu")
MIGRATION_SCHEMES = ("tcp", "tls", "ssh")
LIVE_MIGRATION_TIMEOUT_ACTIONS = ("abort", "force_complete")
DEFAULT_INSTANCES_PATH = Path("/var/lib/cloudctl/instances")
LIFECYCLE_TASKS = (contract.COMPUTE_REBOOT, contract.COMPUTE_POWER_OFF, contract.COMPUTE_POWER_ON,
                   contract.COMPUTE_PAUSE, contract.COMPUTE_UNPAUSE, contract.COMPUTE_SUSPEND,
                   contract.COMPUTE_RESUME)
# Seconds a lifecycle task keeps, below its soft time limit, to force a guest off and report.
SHUTDOWN_MARGIN = 30
# The cold migration and resize tasks other than compute.resize_instance (which copies the disk).
RESIZE_STEP_TASKS = (contract.COMPUTE_PREP_RESIZE, contract.COMPUTE_FINISH_RESIZE,
                     contract.COMPUTE_CONFIRM_RESIZE, contract.COMPUTE_REVERT_RESIZE,
                     contract.COMPUTE_FINISH_REVERT_RESIZE)
# Seconds compute.resize_instance keeps, below its soft time limit, to put the instance back and report
# after a copy that took too long.
RESIZE_MARGIN = 60


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def _env(name: str, default: Any, parse: Callable[[str], Any] = str, *, secret: bool = False) -> Any:
    """A dataclass field read from environment variable ``name``, parsed by ``parse``."""
    factory = default if callable(default) else None
    extra: dict[str, Any] = {"default_factory": factory} if factory else {"default": default}
    return dataclasses.field(metadata={"env": name, "parse": parse}, repr=not secret, **extra)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a non-negative number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text
    return parse


def _host(text: str) -> str:
    contract.compute_queue(text)  # the one place that knows what a queue-able host name is
    return text


def _api_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("must be an http(s) URL without query or fragment, e.g. http://10.0.0.1:8000")
    return text.strip().rstrip("/")


def _address(text: str) -> str:
    """A migration address: a host name or an IP address, nothing a URI could be made of."""
    if text and (any(c.isspace() or c in "/?#@" for c in text) or text.startswith("[")):
        raise ValueError("must be a host name or an IP address (no brackets, no URI)")
    return text


def _ip_address(text: str) -> str:
    if text:
        ipaddress.ip_address(text)  # ValueError names the problem
    return text


def _interface(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", text):
        raise ValueError("must be a network interface name (at most 15 letters, digits, '_', '.', ':', '-')")
    return text


def _netns(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise ValueError("must be a network namespace name (letters, digits, '_', '.', '-')")
    return text


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return text == "1"


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


# Seconds compute.live_migration keeps, below its soft time limit, to abort the job and report.
LIVE_MIGRATION_MARGIN = 30
# The migration tasks other than compute.live_migration, by the time limits they share.
MIGRATION_CHECK_TASKS = (contract.COMPUTE_CHECK_MIGRATE_DESTINATION, contract.COMPUTE_CHECK_MIGRATE_SOURCE)
LIVE_MIGRATION_STEP_TASKS = (contract.COMPUTE_ABORT_LIVE_MIGRATION,
                             contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE,
                             contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST,
                             contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST)


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """Settings of one compute worker. Build with :meth:`from_env`."""

    broker_url: str = _env("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0", _non_empty)
    rpc_backend: str = _env("CELERY_RPC_BACKEND", "redis://127.0.0.1:6379/1", _non_empty)
    host: str = _env("COMPUTE_HOST", socket.gethostname, _host)
    libvirt_uri: str = _env("COMPUTE_LIBVIRT_URI", "qemu:///system", _non_empty)
    driver: str = _env("COMPUTE_DRIVER", "libvirt", _choice(DRIVERS))
    virt_type: str = _env("COMPUTE_VIRT_TYPE", "auto", _choice(VIRT_TYPES))
    machine_type: str = _env("COMPUTE_MACHINE_TYPE", "pc", _non_empty)
    instances_path: Path = _env("INSTANCES_PATH", DEFAULT_INSTANCES_PATH, Path)  # noqa: RUF009 (a field)
    service_token: str = _env("CLOUDCTL_SERVICE_TOKEN", "", secret=True)
    redis_password: str = _env("REDIS_PASSWORD", "", secret=True)
    host_key: str = _env("COMPUTE_HOST_KEY", "", secret=True)
    api_url: str = _env("CLOUDCTL_API_URL", "http://127.0.0.1:8000", _api_url)
    heartbeat_interval: float = _env("COMPUTE_HEARTBEAT_INTERVAL", 5.0, _positive_float)
    concurrency: int = _env("COMPUTE_CONCURRENCY", 4, _positive_int)
    reserved_host_memory_mb: int = _env("COMPUTE_RESERVED_HOST_MEMORY_MB", 512, _non_negative_int)
    reserved_host_disk_gb: int = _env("COMPUTE_RESERVED_HOST_DISK_GB", 0, _non_negative_int)
    image_download_timeout: float = _env("COMPUTE_IMAGE_DOWNLOAD_TIMEOUT", 300.0, _positive_float)
    clean_shutdown_timeout: float = _env("COMPUTE_CLEAN_SHUTDOWN_TIMEOUT", 60.0, _non_negative_float)
    spawn_soft_time_limit: int = _env("COMPUTE_SPAWN_SOFT_TIME_LIMIT", 900, _positive_int)
    spawn_time_limit: int = _env("COMPUTE_SPAWN_TIME_LIMIT", 960, _positive_int)
    terminate_soft_time_limit: int = _env("COMPUTE_TERMINATE_SOFT_TIME_LIMIT", 120, _positive_int)
    terminate_time_limit: int = _env("COMPUTE_TERMINATE_TIME_LIMIT", 180, _positive_int)
    console_soft_time_limit: int = _env("COMPUTE_CONSOLE_SOFT_TIME_LIMIT", 20, _positive_int)
    console_time_limit: int = _env("COMPUTE_CONSOLE_TIME_LIMIT", 30, _positive_int)
    lifecycle_soft_time_limit: int = _env("COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT", 300, _positive_int)
    lifecycle_time_limit: int = _env("COMPUTE_LIFECYCLE_TIME_LIMIT", 360, _positive_int)
    dhcp_soft_time_limit: int = _env("COMPUTE_DHCP_SOFT_TIME_LIMIT", 60, _positive_int)
    dhcp_time_limit: int = _env("COMPUTE_DHCP_TIME_LIMIT", 90, _positive_int)
    router_soft_time_limit: int = _env("COMPUTE_ROUTER_SOFT_TIME_LIMIT", 60, _positive_int)
    router_time_limit: int = _env("COMPUTE_ROUTER_TIME_LIMIT", 90, _positive_int)
    snapshot_soft_time_limit: int = _env("COMPUTE_SNAPSHOT_SOFT_TIME_LIMIT", 1800, _positive_int)
    snapshot_time_limit: int = _env("COMPUTE_SNAPSHOT_TIME_LIMIT", 1860, _positive_int)
    resize_soft_time_limit: int = _env("COMPUTE_RESIZE_SOFT_TIME_LIMIT", 1800, _positive_int)
    resize_time_limit: int = _env("COMPUTE_RESIZE_TIME_LIMIT", 1860, _positive_int)
    resize_step_soft_time_limit: int = _env("COMPUTE_RESIZE_STEP_SOFT_TIME_LIMIT", 600, _positive_int)
    resize_step_time_limit: int = _env("COMPUTE_RESIZE_STEP_TIME_LIMIT", 660, _positive_int)
    max_concurrent_snapshots: int = _env("COMPUTE_MAX_CONCURRENT_SNAPSHOTS", 2, _positive_int)
    image_upload_timeout: float = _env("COMPUTE_IMAGE_UPLOAD_TIMEOUT", 600.0, _positive_float)
    image_cache_max_age: float = _env("COMPUTE_IMAGE_CACHE_MAX_AGE", 86400.0, _non_negative_float)
    image_cache_cleanup_interval: float = _env("COMPUTE_IMAGE_CACHE_CLEANUP_INTERVAL", 600.0,
                                               _positive_float)
    migration_address: str = _env("COMPUTE_MIGRATION_ADDRESS", "", _address)
    migration_scheme: str = _env("COMPUTE_MIGRATION_SCHEME", "tcp", _choice(MIGRATION_SCHEMES))
    migration_unsafe: bool = _env("COMPUTE_MIGRATION_UNSAFE", False, _flag)
    live_migration_bandwidth: int = _env("COMPUTE_LIVE_MIGRATION_BANDWIDTH", 0, _non_negative_int)
    live_migration_permit_post_copy: bool = _env("COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY", False, _flag)
    live_migration_permit_auto_converge: bool = _env("COMPUTE_LIVE_MIGRATION_PERMIT_AUTO_CONVERGE", False,
                                                     _flag)
    live_migration_timeout_action: str = _env("COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION", "abort",
                                              _choice(LIVE_MIGRATION_TIMEOUT_ACTIONS))
    live_migration_soft_time_limit: int = _env("COMPUTE_LIVE_MIGRATION_SOFT_TIME_LIMIT", 3600, _positive_int)
    live_migration_time_limit: int = _env("COMPUTE_LIVE_MIGRATION_TIME_LIMIT", 3660, _positive_int)
    visibility_timeout: int = _env("COMPUTE_VISIBILITY_TIMEOUT", 7200, _positive_int)
    tunnel_ip: str = _env("COMPUTE_TUNNEL_IP", "", _ip_address)
    flat_interface: str = _env("COMPUTE_FLAT_INTERFACE", "", _interface)
    network_namespace: str = _env("COMPUTE_NETWORK_NAMESPACE", "", _netns)
    fake_vcpus: int = _env("COMPUTE_FAKE_VCPUS", 16, _positive_int)
    fake_memory_mb: int = _env("COMPUTE_FAKE_MEMORY_MB", 32768, _positive_int)
    fake_disk_gb: int = _env("COMPUTE_FAKE_DISK_GB", 500, _positive_int)
    fake_spawn_delay: float = _env("COMPUTE_FAKE_SPAWN_DELAY", 0.0, _non_negative_float)
    fake_destroy_delay: float = _env("COMPUTE_FAKE_DESTROY_DELAY", 0.0, _non_negative_float)
    fake_state_dir: str = _env("COMPUTE_FAKE_STATE_DIR", "", str)
    test_duplicate_delivery: str = _env("COMPUTE_TEST_DUPLICATE_DELIVERY", "0", parse_mode)

    def __post_init__(self) -> None:
        for kind in ("spawn", "terminate", "console", "lifecycle", "snapshot", "live_migration", "resize",
                     "resize_step", "dhcp", "router"):
            soft_var = f"COMPUTE_{kind.upper()}_SOFT_TIME_LIMIT"
            hard_var = f"COMPUTE_{kind.upper()}_TIME_LIMIT"
            soft, hard = getattr(self, f"{kind}_soft_time_limit"), getattr(self, f"{kind}_time_limit")
            if soft >= hard:
                raise ConfigError(f"{soft_var} ({soft} s) must be below {hard_var} ({hard} s)")
            if hard >= self.visibility_timeout:
                raise ConfigError(f"COMPUTE_VISIBILITY_TIMEOUT ({self.visibility_timeout} s) must exceed "
                                  f"{hard_var} ({hard} s), or Redis delivers the task again while it "
                                  "still runs")
        if self.clean_shutdown_timeout > self.max_shutdown_timeout:
            raise ConfigError(f"COMPUTE_CLEAN_SHUTDOWN_TIMEOUT ({self.clean_shutdown_timeout:g} s) must be "
                              f"at most COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT - {SHUTDOWN_MARGIN} "
                              f"({self.max_shutdown_timeout:g} s): a soft reboot must have time to "
                              "fall back to a hard one")

    @property
    def max_shutdown_timeout(self) -> float:
        """The longest wait for a clean shutdown, leaving a lifecycle task time to force and report."""
        return float(max(self.lifecycle_soft_time_limit - SHUTDOWN_MARGIN, 0))

    def time_limits(self) -> tuple[tuple[str, int, int], ...]:
        """(task name, soft limit, hard limit) of every compute task."""
        return (
            (contract.COMPUTE_SPAWN, self.spawn_soft_time_limit, self.spawn_time_limit),
            (contract.COMPUTE_TERMINATE, self.terminate_soft_time_limit, self.terminate_time_limit),
            (contract.COMPUTE_CONSOLE_OUTPUT, self.console_soft_time_limit, self.console_time_limit),
            (contract.COMPUTE_SNAPSHOT, self.snapshot_soft_time_limit, self.snapshot_time_limit),
            (contract.COMPUTE_RESIZE_INSTANCE, self.resize_soft_time_limit, self.resize_time_limit),
            *((name, self.resize_step_soft_time_limit, self.resize_step_time_limit)
              for name in RESIZE_STEP_TASKS),
            *((name, self.lifecycle_soft_time_limit, self.lifecycle_time_limit) for name in LIFECYCLE_TASKS),
            (contract.COMPUTE_LIVE_MIGRATION, self.live_migration_soft_time_limit,
             self.live_migration_time_limit),
            *((name, self.console_soft_time_limit, self.console_time_limit)
              for name in MIGRATION_CHECK_TASKS),
            (contract.COMPUTE_PRE_LIVE_MIGRATION, self.spawn_soft_time_limit, self.spawn_time_limit),
            # A rebuild downloads the image and builds as a spawn does; the cleanup is a terminate.
            (contract.COMPUTE_REBUILD_INSTANCE, self.spawn_soft_time_limit, self.spawn_time_limit),
            (contract.COMPUTE_DESTROY_EVACUATED, self.terminate_soft_time_limit, self.terminate_time_limit),
            *((name, self.lifecycle_soft_time_limit, self.lifecycle_time_limit)
              for name in LIVE_MIGRATION_STEP_TASKS),
            (contract.COMPUTE_NETWORK_DHCP_SYNC, self.dhcp_soft_time_limit, self.dhcp_time_limit),
            (contract.COMPUTE_NETWORK_ROUTER_SYNC, self.router_soft_time_limit, self.router_time_limit),
            (contract.COMPUTE_NETWORK_HOST_SYNC, self.dhcp_soft_time_limit, self.dhcp_time_limit),
        )

    def resize_copy_timeout(self, shutdown_wait: float) -> float:
        """The longest a resize's disk copy may take: what the task's soft time limit leaves after a
        clean shutdown wait of ``shutdown_wait`` seconds and the time to put the instance back and
        report (at least a minute)."""
        return float(max(self.resize_soft_time_limit - shutdown_wait - RESIZE_MARGIN, 60))

    @property
    def max_live_migration_timeout(self) -> float:
        """The longest completion_timeout of a live migration, leaving the task time to abort and report."""
        return float(max(self.live_migration_soft_time_limit - LIVE_MIGRATION_MARGIN, 1))

    @property
    def migration_host(self) -> str:
        """COMPUTE_MIGRATION_ADDRESS (the host name when unset) as it goes in a URI."""
        address = self.migration_address or self.host
        return f"[{address}]" if ":" in address else address

    @property
    def migration_uri(self) -> str:
        """The libvirt URI other hosts' daemons reach this one at (peer-to-peer migration)."""
        return f"qemu+{self.migration_scheme}://{self.migration_host}/system"

    @property
    def migration_data_uri(self) -> str:
        """Where other hosts' QEMU sends a migration stream to this host's QEMU."""
        return f"tcp://{self.migration_host}"

    @property
    def queue(self) -> str:
        return contract.compute_queue(self.host)

    @property
    def broker_connection_url(self) -> str:
        """CELERY_BROKER_URL with REDIS_PASSWORD in it (when it names no password itself)."""
        return credentials.redis_url(self.broker_url, self.redis_password)

    @property
    def rpc_backend_url(self) -> str:
        """CELERY_RPC_BACKEND with REDIS_PASSWORD in it (when it names no password itself)."""
        return credentials.redis_url(self.rpc_backend, self.redis_password)

    @classmethod
    def from_env(cls, overrides: Mapping[str, str] | None = None,
                 environ: Mapping[str, str] | None = None) -> ComputeConfig:
        """Read every variable from ``environ`` (default ``os.environ``); ``overrides`` win.

        Both map variable names (``"COMPUTE_HOST"``) to strings. Raises :class:`ConfigError`.
        """
        source = dict(os.environ if environ is None else environ)
        source.update(overrides or {})
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = field.metadata["env"]
            if name not in source:
                continue
            try:
                values[field.name] = field.metadata["parse"](source[name])
            except ValueError as exc:
                raise ConfigError(f"invalid value {source[name]!r} for environment variable {name}: "
                                  f"{exc}") from None
        return cls(**values)

    @staticmethod
    def variables() -> tuple[str, ...]:
        """Every environment variable read, in documentation order."""
        return tuple(field.metadata["env"] for field in dataclasses.fields(ComputeConfig))
