"""A whole cloudctl on harness hosts: the control plane from the real Procfile (web, scheduler,
conductor, beat) under honcho, and one real compute worker per harness host, outside honcho so that a
test may SIGKILL one (honcho would stop everything) and start it again."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from testbed.hosts import HostWorker, NamespaceHost, NamespaceHosts
from testbed.stack import Stack

CONTROL_PLANE = ("web", "scheduler", "conductor", "beat")


@dataclass
class Cloud:
    """What the ``cloud`` fixture (tests/multihost) yields. ``stack.api(...)`` talks to the REST API
    as the admin; ``workers[name]`` is the compute worker of host ``name`` (kill(), start(), stop(),
    signal()).
    A host's files are at ``host(name).local_instances``; ``stack.instances_path`` and ``stack.host``
    belong to run_stack's single-host default and mean nothing here."""

    harness: NamespaceHosts
    stack: Stack
    workers: dict[str, HostWorker] = field(default_factory=dict)

    @property
    def hosts(self) -> list[NamespaceHost]:
        return self.harness.hosts

    def host(self, name: str) -> NamespaceHost:
        return self.harness.host(name)


@contextmanager
def host_workers(harness: NamespaceHosts, stack: Stack, workers: dict[str, HostWorker],
                 host_env: Mapping[str, Mapping[str, str]] | None = None) -> Iterator[None]:
    """One compute worker per harness host, on the stack's broker, into ``workers`` (for
    ``run_stack(companions=...)``); a warm shutdown of them all at once on the way out. ``host_env``:
    host name -> settings of that host's worker only (say the network node's ``COMPUTE_FLAT_INTERFACE``)."""
    try:
        for host in harness.hosts:
            log_path = stack.log_path.parent / f"compute-{host.name}.log"
            stack.extra_logs.append(log_path)
            env = {**stack.env, "COMPUTE_HOST_KEY": stack.host_key(host.name),
                   **(host_env or {}).get(host.name, {})}
            workers[host.name] = harness.start_worker(host, env, log_path)
        yield
    finally:
        for worker in workers.values():
            worker.terminate()
        for worker in workers.values():
            worker.wait()
