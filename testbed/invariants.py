"""What must hold once a cloudctl recovered from a fault: the kill -9 tests' and ``bench/chaos.py``'s
checks, the same for both.

:func:`check` reads the control plane's database (Django must be set up on it) and the domains each
host runs, and reports every breach of issue 19's rules:

- **stuck**: a server whose task (or build) is older than its deadline (``INSTANCE_BUILD_TIMEOUT`` for
  scheduling/spawning, ``TASK_DEADLINES`` otherwise) plus ``slack`` seconds (the reaper's period): the
  reaper should have ended it;
- **leaked** claims: an Allocation of a deleted server, or on a host the server is not on without a
  migration in progress between them, or held for a migration that ended;
- **doubled** claims: a server holding claims on two hosts outside a migration;
- **unclaimed**: a server on a host without its claim there (its resources would be given twice); not
  one in ERROR (a build that failed or timed out frees its claim and keeps the host it failed on);
- **orphan domains**: a domain on a host where no server of it is (none, deleted, or elsewhere), outside
  a migration in progress;
- **missing domains**: a server that is ACTIVE, SHUTOFF, PAUSED or SUSPENDED with no task in flight
  whose host does not run its domain (a server in ERROR says what is wrong: not counted);
- **unfinished actions**: an action without a result while its server has no task in flight (or is
  deleted): nobody will ever finish it.

The hosts' domains come from the hypervisors, never from what cloudctl recorded:
:func:`fake_domains` reads the fake driver's state files (``COMPUTE_FAKE_STATE_DIR``),
:func:`libvirt_domains` a libvirt connection. Without them (``domains=None``) the last heartbeat of
each host that is up stands in.

``python -m testbed.invariants [--fake-state DIR] [--slack S]`` prints the report as JSON (run with
the stack's environment: its DATABASE_URL); :func:`check_stack` runs it for a :class:`Stack`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed import REPO

if TYPE_CHECKING:
    from testbed.stack import Stack

Domains = dict[str, dict[str, str]]  # host name -> {instance uuid: power state}


@dataclasses.dataclass
class Report:
    """Each list holds one human-readable line per breach; all empty: the invariants hold."""

    stuck: list[str] = dataclasses.field(default_factory=list)
    leaked: list[str] = dataclasses.field(default_factory=list)
    doubled: list[str] = dataclasses.field(default_factory=list)
    unclaimed: list[str] = dataclasses.field(default_factory=list)
    orphan_domains: list[str] = dataclasses.field(default_factory=list)
    missing_domains: list[str] = dataclasses.field(default_factory=list)
    unfinished_actions: list[str] = dataclasses.field(default_factory=list)
    # Not breaches: servers with a task in flight within its deadline (a caller waits for 0).
    in_flight: int = 0

    @property
    def ok(self) -> bool:
        return not any(getattr(self, name) for name in BREACHES)

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in BREACHES}

    def describe(self) -> str:
        lines = [f"{name}: {len(getattr(self, name))}" for name in BREACHES]
        for name in BREACHES:
            lines += [f"  {name}: {line}" for line in getattr(self, name)[:20]]
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


BREACHES = ("stuck", "leaked", "doubled", "unclaimed", "orphan_domains", "missing_domains",
            "unfinished_actions")


def check(domains: Domains | None = None, *, slack: float = 0.0) -> Report:
    """The invariants over the database Django is set up on, against ``domains`` (see the module)."""
    from django.conf import settings
    from django.utils import timezone

    from cloudctl.compute.models import (
        MIGRATION_IN_PROGRESS,
        Allocation,
        Host,
        Instance,
        InstanceAction,
        Migration,
    )
    from cloudctl.compute.states import TaskState, VmState

    now = timezone.now()
    report = Report()
    deadlines = {**settings.TASK_DEADLINES, TaskState.SCHEDULING: settings.INSTANCE_BUILD_TIMEOUT,
                 TaskState.SPAWNING: settings.INSTANCE_BUILD_TIMEOUT}
    default_deadline = max([settings.MIGRATION_STEP_TIMEOUT, *deadlines.values()])
    hosts = {host.pk: host for host in Host.objects.all()}
    if domains is None:
        domains = {host.name: dict(host.reported_instances or {}) for host in hosts.values() if host.is_up}
    servers = {str(server.uuid): server for server in Instance.objects.all()}
    moving: dict[str, set[int]] = defaultdict(set)  # uuid -> hosts of its migrations in progress
    for migration in Migration.objects.filter(status__in=MIGRATION_IN_PROGRESS):
        moving[str(migration.instance_id)].update(
            pk for pk in (migration.source_host_id, migration.dest_host_id) if pk is not None)

    def name(server: Instance) -> str:
        where = hosts[server.host_id].name if server.host_id in hosts else "no host"
        task = f"/{server.task_state}" if server.task_state else ""
        return f"{server.uuid} ({server.vm_state}{task} on {where})"

    for server in servers.values():
        if server.task_state is None:
            continue
        limit = deadlines.get(server.task_state, default_deadline) + slack
        if server.task_state_since < now - timedelta(seconds=limit):
            age = (now - server.task_state_since).total_seconds()
            report.stuck.append(f"{name(server)}: {server.task_state} for {age:.0f} s (deadline {limit:g} s)")
        else:
            report.in_flight += 1

    claims: dict[str, list[Allocation]] = defaultdict(list)
    for allocation in Allocation.objects.select_related("migration"):
        uuid = str(allocation.instance_id)
        server = servers[uuid]
        host = hosts[allocation.host_id].name
        claims[uuid].append(allocation)
        if server.vm_state == VmState.DELETED:
            report.leaked.append(f"{host}: claim of deleted server {server.uuid}")
        elif allocation.migration is not None:
            if allocation.migration.status not in MIGRATION_IN_PROGRESS:
                migration = allocation.migration
                report.leaked.append(f"{host}: claim of {name(server)} for migration {migration.pk}, "
                                     f"which is {migration.status}")
        elif allocation.host_id != server.host_id and allocation.host_id not in moving[uuid]:
            report.leaked.append(f"{host}: claim of {name(server)}, which is not there")
    for uuid, held in claims.items():
        plain = [allocation for allocation in held if allocation.migration is None]
        if len(plain) > 1 and not moving[uuid]:
            report.doubled.append(f"{name(servers[uuid])}: claims on "
                                  f"{sorted(hosts[allocation.host_id].name for allocation in plain)}")
    for uuid, server in servers.items():
        if (server.host_id is not None and server.vm_state not in (VmState.DELETED, VmState.ERROR)
                and not any(allocation.host_id == server.host_id for allocation in claims[uuid])):
            report.unclaimed.append(f"{name(server)}: no claim on its host")

    settled = (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED, VmState.SUSPENDED)
    by_name = {host.name: host for host in hosts.values()}
    for host_name, running in domains.items():
        host = by_name.get(host_name)
        for uuid, power_state in running.items():
            server = servers.get(uuid)
            here = (server is not None and host is not None and server.vm_state != VmState.DELETED
                    and (server.host_id == host.pk or host.pk in moving[uuid]))
            if not here:
                state = "no server" if server is None else name(server)
                report.orphan_domains.append(f"{host_name}: domain of {uuid} ({power_state}): {state}")
        if host is None:
            continue
        for server in servers.values():
            if (server.host_id == host.pk and server.task_state is None and server.vm_state in settled
                    and str(server.uuid) not in running and not moving[str(server.uuid)]):
                report.missing_domains.append(f"{name(server)}: {host_name} runs no domain of it")

    for action in InstanceAction.objects.filter(finish_time__isnull=True).select_related("instance"):
        server = action.instance
        if server.task_state is None or server.vm_state == VmState.DELETED:
            report.unfinished_actions.append(f"{name(server)}: action {action.action} ({action.pk}) started "
                                             f"{action.start_time:%H:%M:%S} has no result")
    return report


def fake_domains(state_dir: Path) -> Domains:
    """The domains of every fake host that keeps them in ``state_dir`` (``COMPUTE_FAKE_STATE_DIR``)."""
    domains: Domains = {}
    for path in sorted(state_dir.glob("*.json")):
        saved = json.loads(path.read_text())
        domains[path.stem] = {uuid: fields["power_state"] for uuid, fields in saved.items()}
    return domains


def libvirt_domains(hosts: dict[str, str]) -> Domains:
    """The domains named ``instance-<uuid>`` of each host (name -> libvirt URI), with their power state."""
    import libvirt

    from compute_workers.virt.libvirt.host import power_state

    prefix = "instance-"  # contract.domain_name
    domains: Domains = {}
    for host, uri in hosts.items():
        conn = libvirt.open(uri)
        try:
            domains[host] = {domain.name()[len(prefix):]: power_state(domain.state()[0])
                             for domain in conn.listAllDomains() if domain.name().startswith(prefix)}
        finally:
            conn.close()
    return domains


def check_stack(stack: Stack, *, fake_state: Path | None = None, slack: float = 0.0) -> Report:
    """:func:`check` on ``stack``'s database, run in a process with its environment."""
    command = [sys.executable, "-m", "testbed.invariants", "--slack", str(slack)]
    if fake_state is not None:
        command += ["--fake-state", str(fake_state)]
    done = subprocess.run(command, cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"testbed.invariants failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Report.from_json(json.loads(done.stdout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.invariants",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--fake-state", type=Path,
                        help="the fake hosts' COMPUTE_FAKE_STATE_DIR (other hosts: their last heartbeat)")
    parser.add_argument("--slack", type=float, default=0.0, help="seconds past a deadline still not stuck")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudctl.settings")
    import django

    django.setup()
    domains = None
    if args.fake_state:
        # The fake hosts that keep state files are read there; every other host (a fleet's, say) by its
        # last heartbeat.
        from cloudctl.compute.models import Host

        domains = {host.name: dict(host.reported_instances or {})
                   for host in Host.objects.all() if host.is_up}
        domains.update(fake_domains(args.fake_state))
    report = check(domains, slack=args.slack)
    print(json.dumps(dataclasses.asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
