"""Independent libvirt "hosts" on one machine, for migration tests.

Each host is a libvirtd (qemu driver) in its own network namespace (``ip netns add``) and its own
mount, PID and UTS namespaces (``unshare``), with ``tini`` as PID 1 (prompt reaping), private bind
mounts over the libvirt directories and a private instances directory mounted at the same path on
every host (so a guest's disk and console keep their path when it migrates, yet are different files).
The hosts reach each other over veth pairs into a bridge that lives in a namespace of its own; the
addresses never leave these namespaces. The test process talks to each daemon over its unix socket.
Tear-down kills each PID 1 (the kernel ends the daemon and its guests) and deletes the namespaces.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/var/lib/cloudctl-test/multihost")
LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
SUBNET = "10.253.0"  # only ever inside this harness's own namespaces
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


@dataclass
class NamespaceHost:
    name: str
    ip: str
    netns: str
    directory: Path  # this host's private state, as the test process sees it
    instances_path: Path  # where the daemon (and QEMU) see this host's instances
    host_uuid: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / "libvirtd.log"

    @property
    def socket(self) -> Path:
        return self.directory / "_run_libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The control URI for the test process (the daemon's unix socket)."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def peer_uri(self) -> str:
        """The URI another host's daemon uses to reach this one (peer-to-peer migration)."""
        return f"qemu+tcp://{self.ip}/system"

    @property
    def migrate_uri(self) -> str:
        return f"tcp://{self.ip}"

    @property
    def local_instances(self) -> Path:
        """This host's instances directory as the test process sees it."""
        return self.directory / "instances"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def missing_capabilities() -> str | None:
    """Why this machine cannot run the harness, or None. Quick: a few checks and one netns."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network and mount namespaces)"
    try:
        status = Path("/proc/self/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("CapEff:"))
        effective = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError) as exc:
        return f"cannot read the process capabilities: {exc}"
    for bit, label in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")):
        if not effective & (1 << bit):
            return f"multi-host tests need {label} (namespaces, bind mounts, veth/bridge)"
    for tool in ("ip", "unshare", "tini", "libvirtd", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"multi-host tests need `{tool}` on PATH"
    probe = f"cch-probe-{secrets.token_hex(3)}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        return f"`ip netns add` fails here: {result.stderr.strip()}"
    try:
        result = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--pid", "--fork", "--mount",
                                 "--uts", "--propagation", "private", "--mount-proc", "true"],
                                capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            return f"cannot create PID/mount/UTS namespaces: {result.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


LIBVIRTD_CONF = """listen_tcp = 1
listen_tls = 0
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
host_uuid = "{host_uuid}"
log_outputs = "3:stderr"
"""

QEMU_CONF = """migration_host = "{ip}"
stdio_handler = "file"
cgroup_controllers = [ ]
security_driver = "none"
"""

# Runs as tini's child inside the new namespaces: private mounts, hostname, then the daemon.
START_SCRIPT = """set -e
d={directory}
for target in {libvirt_dirs}; do
  mkdir -p "$target"
  mount --bind "$d/$(echo "$target" | tr / _)" "$target"
done
mount --bind "$d/instances" {instances_path}
hostname {hostname}
ip link set lo up
exec libvirtd --listen --pid-file /run/libvirt/libvirtd.pid
"""


class NamespaceHosts:
    """N libvirt hosts on one machine. ``start()`` brings them up, ``stop()`` removes every trace."""

    def __init__(self, count: int = 2) -> None:
        self.run_id = secrets.token_hex(3)
        self.directory = ROOT / self.run_id
        self.instances_path = self.directory / "instances"  # the path every host's daemon sees
        self.bridge_ns = f"cch-{self.run_id}-br"
        names = [f"host-{chr(ord('a') + i)}" for i in range(count)]
        self.hosts = [
            NamespaceHost(name=name, ip=f"{SUBNET}.{i + 1}", netns=f"cch-{self.run_id}-{i}",
                          directory=self.directory / name, instances_path=self.instances_path,
                          host_uuid=str(uuid.uuid4()))
            for i, name in enumerate(names)]
        self._netns: list[str] = []

    def start(self, timeout: float = 30) -> list[NamespaceHost]:
        started = time.monotonic()
        for path in (ROOT.parent, ROOT, self.directory, self.instances_path):
            path.mkdir(mode=0o755, exist_ok=True)
            path.chmod(0o755)
        self._add_netns(self.bridge_ns)
        _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts):
            self._add_netns(host.netns)
            port = f"p{index}"
            _run("ip", "-n", host.netns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                 "netns", self.bridge_ns)
            _run("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")
            self._start_daemon(host)
        for host in self.hosts:
            self._wait_for_socket(host, started + timeout)
        return self.hosts

    def _add_netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._netns.append(name)

    def _start_daemon(self, host: NamespaceHost) -> None:
        host.directory.mkdir(mode=0o755)
        for target in LIBVIRT_DIRS:
            (host.directory / target.replace("/", "_")).mkdir(mode=0o755)
        (host.directory / "instances").mkdir(mode=0o755)
        etc = host.directory / "_etc_libvirt"
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(host_uuid=host.host_uuid))
        (etc / "qemu.conf").write_text(QEMU_CONF.format(ip=host.ip))
        script = START_SCRIPT.format(directory=host.directory, libvirt_dirs=" ".join(LIBVIRT_DIRS),
                                     instances_path=self.instances_path, hostname=f"cloudctl-{host.name}")
        with host.log_path.open("ab") as log:
            # --kill-child: if unshare (our child) dies, the namespace's PID 1 is killed with it.
            host.process = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--fork", "--kill-child", "--mount",
                 "--uts", "--propagation", "private", "--mount-proc", "tini", "-s", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for_socket(self, host: NamespaceHost, deadline: float) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        while True:
            if host.process is not None and host.process.poll() is not None:
                raise RuntimeError(
                    f"libvirtd of {host.name} exited ({host.process.returncode}):\n{host.log()}")
            if host.socket.exists():
                try:
                    libvirt.open(host.uri).close()
                    return
                except libvirt.libvirtError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd of {host.name} did not answer in time:\n{host.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill every namespace's PID 1 (ending its daemon and guests), delete the namespaces and files."""
        errors: list[str] = []
        for host in self.hosts:
            if host.process is None:
                continue
            for pid in _children(host.process.pid):  # the namespace's PID 1 (tini)
                _kill(pid)
            _kill(host.process.pid)
            try:
                host.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"{host.name}: unshare did not exit")
        for name in self._netns:
            deadline = time.monotonic() + 10
            while True:  # nothing may outlive the test in these namespaces
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    _kill(int(pid))
                if time.monotonic() > deadline:
                    errors.append(f"processes left in {name}: {pids}")
                    break
                time.sleep(0.05)
            result = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if result.returncode != 0:
                errors.append(f"ip netns del {name}: {result.stderr.strip()}")
        self._netns.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise RuntimeError("multi-host tear-down incomplete: " + "; ".join(errors))


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
