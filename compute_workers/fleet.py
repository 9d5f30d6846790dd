"""``python -m compute_workers.fleet --hosts N``: N simulated hypervisor hosts in one process.

For scheduler benchmarks and race tests: hundreds to a thousand fake hosts without a thousand
processes. Each host is a :class:`ComputeManager` with its own in-memory :class:`FakeDriver` (sizes and
delays from the options) and answers the contract exactly as ``python -m compute_workers --driver
fake`` would; what the hosts share is the process:

* host names are ``<prefix><i>``, i = 1…N zero-padded to the digits of N (``fake-1``…``fake-5`` for 5
  hosts, ``fake-0001``…``fake-1000`` for 1,000: they sort as numbers);
* ONE Celery worker (the compute app and its settings, threads pool, ``--concurrency`` threads for all
  the hosts) consumes the N queues ``compute.<host>`` as node ``fleet@<prefix>``; a task runs on the
  manager of the host whose queue it came from: Celery hands the task the routing key it was published
  with (``request.delivery_info["routing_key"]``), which for a task sent to ``compute_queue(host)`` is
  that queue's name (kombu's Redis transport keeps it in the message, also when it restores an
  unacknowledged one). A spawn whose routing key is not a fleet queue falls back to its spec's ``host``;
  any other such task is logged and dropped;
* one reporter, signing each host's reports with the host's first key derived from
  ``CLOUDCTL_HOST_KEY_SECRET`` (the control plane's secret: a fleet is a simulation run beside the
  control plane, never a real host), one power-state event thread, one heartbeat thread: each host's
  ``conductor.host_heartbeat`` (its own resources and instances, ``observed_at``) every
  ``--heartbeat-interval`` seconds (default 10: 1,000 hosts make 100 heartbeats a second), spread
  evenly over the interval;
* ``conductor.host_init`` of every host, sent one after the other before the worker consumes anything
  (each retried until the broker takes it);
* the redelivery journals of lifecycle actions live in a temporary directory, one subdirectory per
  host, removed at exit: a fake host's instances do not outlive the process either (after a restart
  every host_init reports no instances).

The fleet runs tasks with ``--concurrency`` threads in all, not per host: a slow task (``--spawn-delay``)
holds one thread whichever host it belongs to, and with ``worker_prefetch_multiplier`` 1 at most
``--concurrency`` tasks are reserved at a time.

Measured (2 CPUs, local Redis 7, fake driver without delays): ready to consume 0.5 s after launch for
100 hosts and 2.0 s for 1,000 (of which sending the 1,000 host_init takes 1.1 s); 50 spawns on random
hosts, sent straight to their queues, all reported active on the conductor queue 0.2 s (100 hosts) and
0.35 s (1,000 hosts) after the first was sent; about 360 tasks/s through 100 hosts and 200 tasks/s
through 1,000, while the heartbeats (100/s at 1,000 hosts) take about a sixth of a CPU. One process is
one CPU (the GIL): beyond that, run several fleets with different ``--prefix``.

SIGTERM stops it as it stops a single host's worker: running tasks finish (so a long ``--spawn-delay``
delays the exit), then the process exits.
Options override the environment variables of :mod:`compute_workers.config` that they name; the broker,
the result backend, the reserved sizes and the time limits come from the environment as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from celery import Celery
from celery.app.task import Context

from compute_workers import contract
from compute_workers.app import create_app
from compute_workers.config import ComputeConfig, ConfigError
from compute_workers.heartbeat import SpreadHeartbeat
from compute_workers.manager import ComputeManager
from compute_workers.outbox import Outbox
from compute_workers.power_events import PowerStateEvents
from compute_workers.reporter import CeleryReporter, Reporter, derived_host_keys
from compute_workers.tasks import register_tasks
from compute_workers.virt.driver import ComputeDriver
from compute_workers.virt.fake import FakeDriver

LOG = logging.getLogger("compute_workers.fleet")

DEFAULT_PREFIX = "fake-"
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_CONCURRENCY = 16
HOST_INIT_RETRY_MAX = 30.0

# option -> environment variable it overrides
OVERRIDES = {
    "vcpus": "COMPUTE_FAKE_VCPUS",
    "memory_mb": "COMPUTE_FAKE_MEMORY_MB",
    "disk_gb": "COMPUTE_FAKE_DISK_GB",
}


def host_names(prefix: str, count: int) -> list[str]:
    """``<prefix>1``…``<prefix><count>``, the numbers zero-padded to the digits of ``count``."""
    width = len(str(count))
    names = [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]
    for name in names:
        contract.compute_queue(name)  # raises ValueError for a prefix no queue can be named after
    return names


class Fleet:
    """The managers of simulated hosts, one per name, sharing ``reporter``; the tasks' :class:`Managers`.

    ``config`` is the settings every host shares; each host's own is a copy with its name and
    ``instances_path / <name>``, which ``make_driver`` gets to make its driver (hosts given different
    paths have different storage: each its own ``storage_id``, and an evacuation between them rebuilds
    from the image).
    """

    def __init__(self, config: ComputeConfig, hosts: Sequence[str], reporter: Reporter,
                 make_driver: Callable[[ComputeConfig], ComputeDriver]) -> None:
        if not hosts:
            raise ValueError("a fleet needs at least one host")
        self.config = config
        self.reporter = reporter
        self.managers: dict[str, ComputeManager] = {}
        self._by_queue: dict[str, ComputeManager] = {}
        for host in hosts:
            host_config = dataclasses.replace(config, host=host, instances_path=config.instances_path / host)
            manager = ComputeManager(host_config, make_driver(host_config), reporter)
            self.managers[host] = manager
            self._by_queue[host_config.queue] = manager
        if len(self.managers) != len(hosts):
            raise ValueError("host names must be unique")
        self._power_events: PowerStateEvents | None = None

    @property
    def queues(self) -> list[str]:
        return list(self._by_queue)

    def for_task(self, request: Context, host: str | None = None) -> ComputeManager | None:
        """The manager of the host whose queue the task came from; else the one ``host`` names."""
        delivery_info = getattr(request, "delivery_info", None) or {}
        routing_key = delivery_info.get("routing_key")
        manager = self._by_queue.get(routing_key) if isinstance(routing_key, str) else None
        if manager is None and host is not None:
            manager = self.managers.get(host)
            if manager is not None:
                LOG.warning("task %s came with routing key %r; run by host %s, which its arguments name",
                            getattr(request, "id", None), delivery_info.get("routing_key"), host)
        return manager

    def init_hosts(self) -> None:
        for manager in self.managers.values():
            manager.driver.init_host()

    def watch_power_states(self) -> None:
        """One event thread for the lifecycle events of every host's domains."""
        if self._power_events is None:
            self._power_events = PowerStateEvents(self.reporter)
            self._power_events.start()
        for manager in self.managers.values():
            manager.watch_power_states(self._power_events)

    def send_host_init(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """``conductor.host_init`` of every host, in order, each retried with backoff until sent."""
        for manager in self.managers.values():
            delay = 1.0
            while not stopping():
                try:
                    manager.host_init()
                    break
                except Exception as exc:
                    LOG.warning("cannot send host_init of %s (%s); trying again in %.0f s", manager.host,
                                exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, HOST_INIT_RETRY_MAX)

    def heartbeat(self, interval: float) -> SpreadHeartbeat:
        """The (not yet started) thread sending every host's heartbeat once per ``interval``."""
        return SpreadHeartbeat([manager.heartbeat for manager in self.managers.values()], interval)

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()
        if self._power_events is not None:
            self._power_events.stop()
            self._power_events = None


def create_fleet_app(config: ComputeConfig) -> Celery:
    """The compute app with its settings, reading only the priority-0 list of each queue.

    kombu's Redis transport keeps a queue's messages in one list per priority step (4 by default) and
    blocks on all of them in one BRPOP, rebuilt after every message: with 1,000 queues, 4,000 keys to
    encode per message made that the fleet's bottleneck (112 tasks/s; 209 with one step). Nothing in
    cloudctl sends task priorities, so every message is in the priority-0 list.
    """
    app = create_app(config)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "priority_steps": [0]}
    return app


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m compute_workers.fleet",
        description="cloudctl compute fleet: N simulated hypervisor hosts (fake driver) in one process, "
                    "one Celery worker consuming every host's queue compute.<host>.")
    parser.add_argument("--hosts", type=_positive_int, required=True, help="number of simulated hosts")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help=f"host names are <prefix><i>, i zero-padded to the digits of --hosts "
                             f"(default {DEFAULT_PREFIX!r}; --hosts 1000: fake-0001…fake-1000)")
    parser.add_argument("--vcpus", type=_positive_int, help="vCPUs of each host (COMPUTE_FAKE_VCPUS)")
    parser.add_argument("--memory-mb", type=_positive_int, help="RAM of each host (COMPUTE_FAKE_MEMORY_MB)")
    parser.add_argument("--disk-gb", type=_positive_int, help="disk of each host (COMPUTE_FAKE_DISK_GB)")
    parser.add_argument("--spawn-delay", type=_non_negative_float, default=0.0,
                        help="seconds each spawn takes (default 0)")
    parser.add_argument("--destroy-delay", type=_non_negative_float, default=0.0,
                        help="seconds each terminate takes (default 0)")
    parser.add_argument("--concurrency", type=_positive_int, default=DEFAULT_CONCURRENCY,
                        help=f"worker threads for all the hosts together (default {DEFAULT_CONCURRENCY})")
    parser.add_argument("--heartbeat-interval", type=_positive_float, default=DEFAULT_HEARTBEAT_INTERVAL,
                        help="seconds between two heartbeats of a host, spread over the hosts (default "
                             f"{DEFAULT_HEARTBEAT_INTERVAL:g}; COMPUTE_HEARTBEAT_INTERVAL is not used)")
    parser.add_argument("--loglevel", default="info",
                        choices=["debug", "info", "warning", "error", "critical"], help="log level")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Until the Celery worker installs its own handlers (warm shutdown), SIGTERM ends start-up.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(),
                        format="[%(asctime)s: %(levelname)s/%(threadName)s] %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    try:
        names = host_names(args.prefix, args.hosts)
    except ValueError as exc:
        print(f"compute_workers.fleet: invalid --prefix: {exc}", file=sys.stderr)
        return 2
    overrides = {OVERRIDES[option]: str(value) for option, value in vars(args).items()
                 if option in OVERRIDES and value is not None}
    with tempfile.TemporaryDirectory(prefix="cloudctl-fleet-") as journals:
        overrides.update({"COMPUTE_DRIVER": "fake", "COMPUTE_HOST": names[0], "INSTANCES_PATH": journals,
                          "COMPUTE_CONCURRENCY": str(args.concurrency),
                          "COMPUTE_HEARTBEAT_INTERVAL": str(args.heartbeat_interval)})
        try:
            config = ComputeConfig.from_env(overrides)
        except ConfigError as exc:
            print(f"compute_workers.fleet: configuration error: {exc}", file=sys.stderr)
            return 2
        return run(config, names, args, started, Path(journals))


def run(config: ComputeConfig, names: list[str], args: argparse.Namespace, started: float,
        journals: Path) -> int:
    app = create_fleet_app(config)

    def make_driver(host_config: ComputeConfig) -> FakeDriver:
        return FakeDriver(vcpus=config.fake_vcpus, memory_mb=config.fake_memory_mb,
                          disk_gb=config.fake_disk_gb, spawn_delay=args.spawn_delay,
                          destroy_delay=args.destroy_delay, instances_path=host_config.instances_path)

    # Simulated hosts on the control plane's machine sign with keys derived from its secret (each
    # host's first generation); a real host gets its own key only (COMPUTE_HOST_KEY).
    secret = os.environ.get("CLOUDCTL_HOST_KEY_SECRET", "").strip()
    if not secret:
        LOG.warning("CLOUDCTL_HOST_KEY_SECRET is not set: the fleet's reports go unsigned and the "
                    "conductor drops them")
    # The outbox lives in this run's temporary directory, as the simulated domains live in memory.
    reporter = CeleryReporter(app, derived_host_keys(secret) if secret else None,
                              Outbox.under(config.instances_path, args.prefix))
    fleet = Fleet(config, names, reporter, make_driver)
    fleet.init_hosts()
    register_tasks(app, fleet)
    heartbeat = fleet.heartbeat(config.heartbeat_interval)
    try:
        # Events first: a change between the host_init snapshot and the registration would be missed.
        fleet.watch_power_states()
        sending = time.monotonic()
        fleet.send_host_init()
        LOG.info("host_init sent for %d hosts (%s…%s) in %.2f s", len(names), names[0], names[-1],
                 time.monotonic() - sending)
        heartbeat.start()
        reporter.start()
        LOG.info("fleet of %d hosts (%d vCPUs, %d MiB, %d GiB each; journals in %s) built in %.2f s; "
                 "starting the worker", len(names), config.fake_vcpus, config.fake_memory_mb,
                 config.fake_disk_gb, journals, time.monotonic() - started)
        # quiet: the banner would list every one of the N queues. No mingle/gossip (as a host's worker).
        worker = app.Worker(hostname=f"fleet@{args.prefix}", queues=fleet.queues, pool_cls="threads",
                            concurrency=config.concurrency, loglevel=args.loglevel.upper(),
                            task_events=True, without_mingle=True, without_gossip=True, quiet=True)
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        heartbeat.stop()
        reporter.stop()
        fleet.close()


if __name__ == "__main__":
    sys.exit(main())
