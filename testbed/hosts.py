"""Independent libvirt "hosts" on one machine, for the migration tests and benchmarks.

Each host is a libvirtd (qemu driver) in its own network namespace (``ip netns add``) and its own
mount, PID and UTS namespaces (``unshare``), with ``tini`` as PID 1 (prompt reaping), private bind
mounts over the libvirt directories and a private instances directory mounted at the same path on
every host (so a guest's disk and console keep their path when it migrates, yet are different files).
Hosts of a shared-storage group (``shared=``) bind-mount one and the same directory there instead, as
an NFS export mounted on each of them would be.
The hosts reach each other over veth pairs into a bridge that lives in a namespace of its own. One
more veth joins the root network namespace to that bridge (address ``<subnet>.254``), so that processes
of the test (compute workers, ``virsh -c qemu+tcp://...``) reach every daemon over TCP. Each run takes
a /24 of 10.253.0.0/16 that no other run on this machine holds (see :func:`_claim_subnet`): the root
namespace is shared by every test run, so two runs must never route the same addresses. The test
process talks to each daemon over its unix socket. Tear-down kills each PID 1 (the kernel ends the
daemon and its guests), removes the root veth and deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import REPO

ROOT = Path("/var/lib/cloudctl-test/multihost")
NSEXEC = Path(__file__).with_name("nsexec.py")
LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
NETWORK = ipaddress.IPv4Network("10.253.0.0/16")  # each run takes a /24 of it (_claim_subnet)
ROOT_HOST_PART = 254  # the root namespace's address in a run's /24
OWNER_FILE = "owner"  # the pid of the test process that started a run (remove_stale_runs)
# Where a process other than the test (a fencing command, see testbed.fence) finds a run's hosts: the
# path of the run's state file (NamespaceHosts.state_path), set in that process's environment.
STATE_ENV = "CLOUDCTL_HARNESS_STATE"
STATE_FILE = "harness.json"
LOG = logging.getLogger(__name__)
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


@dataclass
class NamespaceHost:
    name: str
    ip: str  # on the hosts' bridge (and reachable from the root namespace); set by NamespaceHosts.start()
    netns: str
    directory: Path  # this host's private state, as the test process sees it
    instances_path: Path  # where the daemon (and QEMU) see this host's instances
    host_uuid: str
    # This host's instances directory as the test process sees it; hosts of one shared-storage group
    # have the same one.
    local_instances: Path
    process: subprocess.Popen[bytes] | None = None  # `unshare`, the parent of the namespaces' PID 1
    init_pid: int = 0  # the namespaces' PID 1 (tini) as the root PID namespace numbers it
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

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def command(self, *argv: str, env: Mapping[str, str] | None = None, wd: Path = REPO) -> list[str]:
        """The argv that runs ``argv`` on this host: in its mount, UTS and PID namespaces (its
        ``/run/libvirt``, instances directory, hostname; it dies with the host) but in the caller's
        network namespace. Signals to the process it starts reach ``argv``, which it exits as
        (see nsexec.py). ``env`` is set on top of the environment the process gets."""
        setenv = [f"--setenv={name}={value}" for name, value in (env or {}).items()]
        return [sys.executable, str(NSEXEC), "--target", str(self.init_pid), "--wd", str(wd), *setenv,
                "--", *argv]

    def worker_env(self) -> dict[str, str]:
        """The settings that make a compute worker this host's (broker, backend and service token are
        the caller's to add). Its networking (bridges, VXLAN devices, firewall, the network node's veths)
        is made in the host's network namespace, where its libvirtd plugs the guests' taps, and its VXLAN
        endpoint is the host's address on the hosts' bridge; the worker itself stays in the caller's
        network namespace (Redis and the API on 127.0.0.1)."""
        return {"COMPUTE_HOST": self.name, "COMPUTE_LIBVIRT_URI": "qemu:///system",
                "INSTANCES_PATH": str(self.instances_path), "COMPUTE_VIRT_TYPE": "qemu",
                "COMPUTE_MIGRATION_ADDRESS": self.ip, "COMPUTE_TUNNEL_IP": self.ip,
                "COMPUTE_NETWORK_NAMESPACE": self.netns}

    def worker_command(self, env: Mapping[str, str] | None = None) -> list[str]:
        """``python -m compute_workers`` as this host's worker: :meth:`worker_env` plus ``env`` set on
        top; a ready Procfile line is ``shlex.join(host.worker_command())``."""
        return self.command(sys.executable, "-m", "compute_workers", "--host", self.name,
                            env={**self.worker_env(), **(env or {})})


def command_pid(process: subprocess.Popen[Any], timeout: float = 10) -> int:
    """The PID (root numbering) of the command a :meth:`NamespaceHost.command` process runs, once it
    runs on the host."""
    deadline = time.monotonic() + timeout
    while not (children := _children(process.pid)):
        if process.poll() is not None:
            raise RuntimeError(f"exited ({process.returncode}) before its command ran")
        if time.monotonic() > deadline:
            raise RuntimeError(f"its command did not start within {timeout} s")
        time.sleep(0.01)
    return children[0]


class HostWorker:
    """The compute worker process of one harness host, outside any process manager, so that a test
    can SIGKILL it (say mid-migration) and start it again while the rest of the cloud runs."""

    def __init__(self, host: NamespaceHost, env: Mapping[str, str], log_path: Path) -> None:
        self.host, self.env, self.log_path = host, dict(env), log_path
        self.process: subprocess.Popen[bytes] | None = None  # nsexec, which stands in for the worker

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"the worker of {self.host.name} runs already")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.host.worker_command(), env=self.env, cwd=REPO,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """The worker process itself (root PID numbering), not nsexec. Waits for it to be forked."""
        assert self.process is not None, "not started"
        try:
            return command_pid(self.process)
        except RuntimeError as exc:
            raise RuntimeError(f"the worker of {self.host.name}: {exc}\n{self.log()[-3000:]}") from None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker itself (SIGSTOP/SIGCONT too, which nsexec does not forward)."""
        os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the worker, as a crash would: no warm shutdown, no ``host_stopping``."""
        if self.running:
            self.signal(signal.SIGKILL)
            assert self.process is not None
            self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM, without waiting: a warm shutdown (running tasks finish, ``host_stopping`` is sent)."""
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError, RuntimeError):  # it may be exiting already
                os.kill(self.pid, signal.SIGCONT)  # a stopped worker could not shut down
            self.process.terminate()  # nsexec forwards it to the worker

    def wait(self, timeout: float = 30) -> int | None:
        """The exit status (negative: the signal), after a SIGKILL if the worker has not exited within
        ``timeout`` seconds; None if never started."""
        if self.process is None:
            return None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # nsexec's death kills the worker (PR_SET_PDEATHSIG)
            self.process.wait(10)
        return self.process.returncode

    def stop(self, timeout: float = 30) -> int | None:
        """:meth:`terminate` and :meth:`wait`."""
        self.terminate()
        return self.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def missing_netns_features(probe: str, steps: Sequence[tuple[list[str], str]]) -> str | None:
    """Create network namespace ``probe``, run each ``(argv, feature)`` step (argv usually acts in
    the namespace: ``ip -n <probe> ...``), delete the namespace. Returns why the first failing step's
    feature is missing, or None when all ran."""
    try:
        for argv, feature in ((["ip", "netns", "add", probe], "network namespaces"), *steps):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            if result.returncode != 0:
                return f"no {feature} here: `{' '.join(argv)}` fails: {result.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


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


def run_command(*args: str) -> None:
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

# remember_owner = 0: libvirt would record each file's original owner in trusted.* xattrs, which the
# destination of a migration on shared storage then reads as "in use" and refuses the console file
# ("Setting different DAC user or group ... already in use"); NFS, what shared storage stands for
# here, usually has no such xattrs.
# user/group root: post-copy live migration needs userfaultfd in the destination's QEMU, which the
# kernel allows an unprivileged process (QEMU as libvirt-qemu) only with vm.unprivileged_userfaultfd=1,
# a machine-wide setting that a test must not change; without either, libvirt fails such a migration
# at once ("Postcopy is not supported"). The system libvirtd the other tests use still runs QEMU as
# libvirt-qemu.
QEMU_CONF = """migration_host = "{ip}"
stdio_handler = "file"
cgroup_controllers = [ ]
security_driver = "none"
remember_owner = 0
user = "root"
group = "root"
"""

# Runs as tini's child inside the new namespaces: private mounts, hostname, the daemon, the keeper. The host's
# own /etc/hosts names it: libvirt resolves its hostname while it sets up every migration, and without
# an entry glibc asks the machine's DNS server, which these namespaces cannot reach: each migration
# stalled 5 s in getaddrinfo ("Temporary failure in name resolution") with the domain's job locked.
START_SCRIPT = """set -e
d={directory}
for target in {libvirt_dirs}; do
  mkdir -p "$target"
  mount --bind "$d/$(echo "$target" | tr / _)" "$target"
done
mount --bind {local_instances} {instances_path}
mount --bind $d/hosts /etc/hosts
hostname {hostname}
ip link set lo up
(libvirtd --listen --pid-file /run/libvirt/libvirtd.pid &)
exec sleep infinity
"""
# The host's "power supply": PID 1 (tini) exits with its child, so its child is this process, which
# no power cut (power_off) kills, and not libvirtd (started by a subshell that exits at once, so the
# daemon too is a child of PID 1, which reaps it and the QEMU processes it daemonizes).
KEEPER_CMDLINE = b"sleep\0infinity\0"


class NamespaceHosts:
    """N libvirt hosts on one machine. ``start()`` brings them up, ``stop()`` removes every trace.

    ``shared`` lists groups of host names (``host-a``, ``host-b``, ... in order) that share their
    instances directory, e.g. ``NamespaceHosts(3, shared=(("host-b", "host-c"),))``: a file one of them
    writes under ``instances_path`` the others see at once; every other host has a private one."""

    def __init__(self, count: int = 2, shared: Sequence[Sequence[str]] = ()) -> None:
        self.run_id = secrets.token_hex(3)
        self.directory = ROOT / self.run_id
        self.instances_path = self.directory / "instances"  # the path every host's daemon sees
        self.bridge_ns = f"cch-{self.run_id}-br"
        # The root namespace's end of its veth into the bridge: unique per run (15 characters at most).
        self.root_link = f"cch-{self.run_id}-r"
        self.root_ip = ""  # <subnet>.254, known once start() has claimed a subnet
        names = [f"host-{chr(ord('a') + i)}" for i in range(count)]
        local_instances = {name: self.directory / name / "instances" for name in names}
        for group in shared:
            unknown = [name for name in group if name not in names]
            if unknown:
                raise ValueError(f"shared storage group {list(group)}: no host {', '.join(unknown)} "
                                 f"(hosts: {', '.join(names)})")
            directory = self.directory / ("shared-" + "+".join(group))
            for name in group:
                if local_instances[name] != self.directory / name / "instances":
                    raise ValueError(f"{name} is in more than one shared storage group")
                local_instances[name] = directory
        self.hosts = [
            NamespaceHost(name=name, ip="", netns=f"cch-{self.run_id}-{i}",
                          directory=self.directory / name, instances_path=self.instances_path,
                          host_uuid=str(uuid.uuid4()), local_instances=local_instances[name])
            for i, name in enumerate(names)]
        self._netns: list[str] = []
        self._root_link_added = False
        self.workers: list[HostWorker] = []

    def host(self, name: str) -> NamespaceHost:
        return next(host for host in self.hosts if host.name == name)

    def start_worker(self, host: NamespaceHost, env: Mapping[str, str], log_path: Path) -> HostWorker:
        """Start ``host``'s compute worker (see :class:`HostWorker`) with ``env`` (the whole environment:
        broker, backend, service token, ...; the host's own settings are added on top); stop() ends it
        if the test has not."""
        worker = HostWorker(host, env, log_path)
        worker.start()
        self.workers.append(worker)
        return worker

    def start(self, timeout: float = 30) -> list[NamespaceHost]:
        started = time.monotonic()
        remove_stale_runs()
        for path in (ROOT.parent, ROOT, self.directory, self.instances_path):
            path.mkdir(mode=0o755, exist_ok=True)
            path.chmod(0o755)
        (self.directory / OWNER_FILE).write_text(str(os.getpid()))
        self._add_netns(self.bridge_ns)
        run_command("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run_command("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        subnet = self._connect_root_namespace()
        for index, host in enumerate(self.hosts):
            host.ip = str(subnet[index + 1])
            self._add_netns(host.netns)
            port = f"p{index}"
            run_command("ip", "-n", host.netns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                 "netns", self.bridge_ns)
            run_command("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            run_command("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            run_command("ip", "-n", host.netns, "link", "set", "eth0", "up")
            run_command("ip", "-n", host.netns, "link", "set", "lo", "up")
            self._start_daemon(host)
        for host in self.hosts:
            self._wait_for_socket(host, started + timeout)
            # The daemon answers, so unshare has long forked the namespaces' PID 1.
            host.init_pid = _init_pid(host)
        self._write_state()
        return self.hosts

    @property
    def state_path(self) -> Path:
        """The run's state file (written by start()): what :func:`load_state` reads in another process."""
        return self.directory / STATE_FILE

    def fence_env(self) -> dict[str, str]:
        """The environment a fencing command (``python -m testbed.fence <host>``) needs to find this run."""
        return {STATE_ENV: str(self.state_path)}

    def power_off(self, name: str, timeout: float = 10) -> list[int]:
        """Cut the power of host ``name``: SIGKILL every process of its PID namespace but its PID 1 and
        the keeper of its namespaces (its libvirtd, its guests' QEMU processes, its compute worker if one
        runs through :class:`HostWorker`), as a power cut ends them: no clean shutdown, no ``host_stopping``.
        Returns the PIDs killed. Its namespaces, bridges and files stay (the machine is off, not gone);
        :meth:`power_on` starts its libvirtd again. Raises RuntimeError if processes are left after
        ``timeout`` seconds."""
        host = self.host(name)
        killed = power_off(host.init_pid, timeout)
        for worker in self.workers:
            if worker.host is host and worker.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(timeout)  # its nsexec ends as the worker did: SIGKILL
        return killed

    def power_on(self, name: str, timeout: float = 30) -> None:
        """Bring host ``name`` back after :meth:`power_off` (or a fencing command): its ``/run/libvirt``
        emptied (a tmpfs a reboot empties), its libvirtd started again in its namespaces. Its persistent
        domains are defined again, shut off (nothing starts them); its compute worker is the caller's to
        start. Raises RuntimeError while processes of the host still run, or if libvirtd does not answer
        within ``timeout`` seconds."""
        host = self.host(name)
        running = host_processes(host.init_pid)
        if running:
            raise RuntimeError(f"{name} is not powered off: processes {sorted(running)} still run on it")
        run_dir = host.directory / "_run_libvirt"
        for entry in run_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        # --daemon: the daemon is reparented to the host's PID 1, as the first one was its child; its log
        # goes where the first one's stderr went.
        argv = ["ip", "netns", "exec", host.netns,
                *host.command("libvirtd", "--listen", "--daemon", "--pid-file", "/run/libvirt/libvirtd.pid",
                              env={"LIBVIRT_LOG_OUTPUTS": f"3:file:{host.log_path}"}, wd=Path("/"))]
        with host.log_path.open("ab") as log:  # not a pipe: the daemon would hold it open
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"libvirtd of {name} did not start again ({result.returncode}):\n"
                               f"{host.log()[-3000:]}")
        self._wait_for_socket(host, time.monotonic() + timeout)

    def _write_state(self) -> None:
        """The run's hosts as another process (a fencing command) needs them; see :func:`load_state`."""
        state = {"run_id": self.run_id, "owner": os.getpid(),
                 "hosts": {host.name: {"init_pid": host.init_pid, "netns": host.netns, "ip": host.ip,
                                       "directory": str(host.directory)} for host in self.hosts}}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    def add_namespace(self, suffix: str) -> str:
        """A network namespace of this run (``cch-<run>-<suffix>``, e.g. a test's "outside world"), deleted
        by stop() with every process in it (and by remove_stale_runs() after a killed run)."""
        name = f"cch-{self.run_id}-{suffix}"
        self._add_netns(name)
        return name

    def _add_netns(self, name: str) -> None:
        run_command("ip", "netns", "add", name)
        self._netns.append(name)

    def _connect_root_namespace(self) -> ipaddress.IPv4Network:
        """Claim a free /24 and put the root namespace on the bridge at its .254; return the subnet.

        A plain veth endpoint in the root namespace, not a bridge there: the root's br_netfilter hook
        (``net.bridge.bridge-nf-call-iptables``) filters what a bridge forwards, whereas traffic to
        and from a local address only meets the root's ordinary INPUT/OUTPUT chains."""
        with _subnet_lock():
            subnet = _claim_subnet()
            run_command("ip", "link", "add", self.root_link, "type", "veth", "peer", "name", "root",
                 "netns", self.bridge_ns)
            self._root_link_added = True
            self.root_ip = str(subnet[ROOT_HOST_PART])
            # Address before the lock is released: it is what marks the subnet taken for other runs.
            run_command("ip", "addr", "add", f"{self.root_ip}/{subnet.prefixlen}", "dev", self.root_link)
        run_command("ip", "link", "set", self.root_link, "up")
        run_command("ip", "-n", self.bridge_ns, "link", "set", "root", "master", "br0", "up")
        return subnet

    def _start_daemon(self, host: NamespaceHost) -> None:
        host.directory.mkdir(mode=0o755)
        for target in LIBVIRT_DIRS:
            (host.directory / target.replace("/", "_")).mkdir(mode=0o755)
        host.local_instances.mkdir(mode=0o755, exist_ok=True)  # a shared one: by its first host
        etc = host.directory / "_etc_libvirt"
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(host_uuid=host.host_uuid))
        (etc / "qemu.conf").write_text(QEMU_CONF.format(ip=host.ip))
        (host.directory / "hosts").write_text(f"127.0.0.1 localhost\n{host.ip} cloudctl-{host.name}\n")
        script = START_SCRIPT.format(directory=host.directory, libvirt_dirs=" ".join(LIBVIRT_DIRS),
                                     local_instances=host.local_instances, instances_path=self.instances_path,
                                     hostname=f"cloudctl-{host.name}")
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
        for worker in self.workers:  # they would die with their host's PID 1; reap them first
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)
        self.workers.clear()
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
        if self._root_link_added:
            # Deleting the bridge namespace would take the veth pair with it; say it explicitly anyway.
            result = subprocess.run(["ip", "link", "del", self.root_link], capture_output=True, text=True)
            if result.returncode != 0 and "Cannot find device" not in result.stderr:
                errors.append(f"ip link del {self.root_link}: {result.stderr.strip()}")
            self._root_link_added = False
        for name in self._netns:
            errors += delete_netns(name)
        self._netns.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise RuntimeError("multi-host tear-down incomplete: " + "; ".join(errors))


def host_processes(init_pid: int) -> dict[int, str]:
    """The processes of the harness host whose PID 1 is ``init_pid`` (root PID numbering), PID 1 and its
    keeper left out: every process of its PID namespace (its libvirtd, QEMU, a worker run through
    nsexec), with its command name. A process that exits meanwhile (or a zombie: its namespaces are
    gone) is left out."""
    try:
        namespace = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError as exc:
        raise RuntimeError(f"no harness host has PID 1 {init_pid} any more: {exc}") from None
    processes = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == init_pid:
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != namespace:
                continue
            if int(entry.name) in _children(init_pid) and (entry / "cmdline").read_bytes() == KEEPER_CMDLINE:
                continue  # the host's power supply (see START_SCRIPT)
            processes[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue
    return processes


def power_off(init_pid: int, timeout: float = 10) -> list[int]:
    """SIGKILL every process of the harness host whose PID 1 is ``init_pid`` (see :func:`host_processes`)
    until none is left: its power cut. Returns the PIDs killed; raises RuntimeError if some are still
    there after ``timeout`` seconds (their PID 1, tini, reaps its children at once)."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while processes := host_processes(init_pid):
        for pid in processes:
            _kill(pid)
            if pid not in killed:
                killed.append(pid)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the host with PID 1 {init_pid} survive SIGKILL: {processes}")
        time.sleep(0.02)
    return killed


def load_state(path: Path | None = None) -> dict[str, Any]:
    """A run's state file (:attr:`NamespaceHosts.state_path`; default: the path in ``$CLOUDCTL_HARNESS_
    STATE``): ``{"run_id", "owner", "hosts": {name: {"init_pid", "netns", "ip", "directory"}}}``.
    Raises RuntimeError when there is none to read."""
    if path is None:
        value = os.environ.get(STATE_ENV, "")
        if not value:
            raise RuntimeError(f"{STATE_ENV} is not set: no harness run to find")
        path = Path(value)
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot read the harness state {path}: {exc}") from None
    return state


def remove_stale_runs() -> list[str]:
    """Tear down what runs whose test process died without :meth:`NamespaceHosts.stop` left behind (a
    killed pytest): their namespaces with every process in them, their veth, their files. A run is
    stale when the process that started it (``owner`` in its directory) is gone. Returns their ids."""
    removed = []
    for directory in sorted(ROOT.iterdir()) if ROOT.is_dir() else []:
        if not directory.is_dir():
            continue
        try:
            owner = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # being set up right now, or not a run
        if Path(f"/proc/{owner}").exists():
            continue
        run_id = directory.name
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                    timeout=10).stdout.split()
        for name in (name for name in namespaces if name.startswith(f"cch-{run_id}-")):
            for error in delete_netns(name):
                LOG.warning("removing stale run %s: %s", run_id, error)
        subprocess.run(["ip", "link", "del", f"cch-{run_id}-r"], capture_output=True, timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(run_id)
    return removed


def delete_netns(name: str) -> list[str]:
    """Kill every process in network namespace ``name`` (nothing may outlive a run there), then
    delete it; what could not be done, as messages."""
    errors = []
    deadline = time.monotonic() + 10
    while True:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
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
    return errors


@contextlib.contextmanager
def fresh_namespaces(prefix: str, count: int) -> Iterator[list[str]]:
    """``count`` new network namespaces named ``<prefix><pid>-<random>``, each with ``lo`` up; deleted
    (with anything still running in them) on exit, also when making one failed."""
    names = [f"{prefix}{os.getpid()}-{secrets.token_hex(3)}" for _ in range(count)]
    made: list[str] = []
    try:
        for name in names:
            run_command("ip", "netns", "add", name)
            made.append(name)
            run_command("ip", "-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in made:
            delete_netns(name)


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    """Serialise subnet claims of concurrent test runs on this machine (each a pytest process)."""
    ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(ROOT / ".subnets.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _claim_subnet() -> ipaddress.IPv4Network:
    """The first /24 of NETWORK that no address of the root namespace lies in. Called under
    :func:`_subnet_lock`; the caller adds its address before releasing the lock, which is the claim.
    A run that died without tear-down keeps its veth (and so its subnet) until the namespaces go."""
    listing = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                             check=True, timeout=10).stdout
    used = {ipaddress.ip_interface(field).ip for line in listing.splitlines()
            for field in line.split()[3:4]}
    for subnet in NETWORK.subnets(new_prefix=24):
        if not any(address in subnet for address in used):
            return subnet
    raise RuntimeError(f"no free /24 left in {NETWORK} for the multi-host harness")


def _init_pid(host: NamespaceHost) -> int:
    """The PID (in the root PID namespace) of ``host``'s PID 1: the one child of its ``unshare``."""
    children = _children(host.process.pid) if host.process is not None else []
    if len(children) != 1:
        raise RuntimeError(f"{host.name}: expected one child of unshare (tini), found {children}")
    return children[0]


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
