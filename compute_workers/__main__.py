"""``python -m compute_workers``: the compute worker of one hypervisor host.

Runs the driver's init_host, starts sending a ``conductor.power_state_update`` on every lifecycle event
of an instance's domain, sends the reports an earlier run left in its outbox
(``INSTANCES_PATH/_reports/<host>``: see :mod:`compute_workers.outbox`) and then ``conductor.host_init``
(both retried until the broker takes them), starts sending the outbox in the background, starts the
heartbeat (one at once, then every COMPUTE_HEARTBEAT_INTERVAL seconds), then a Celery worker (threads
pool, events on) consuming only ``compute.<host>`` as node ``compute@<host>``. SIGTERM (what make run's
supervisor and systemd send) stops it cleanly: running tasks finish first. Options override the
environment variables listed in :mod:`compute_workers.config`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from types import FrameType

from compute_workers import contract
from compute_workers.app import create_app
from compute_workers.config import DRIVERS, ComputeConfig, ConfigError
from compute_workers.exception import ComputeError
from compute_workers.heartbeat import Heartbeat
from compute_workers.manager import ComputeManager
from compute_workers.outbox import Outbox
from compute_workers.reporter import CeleryReporter, one_host_key
from compute_workers.tasks import register_tasks
from compute_workers.virt import load_driver

LOG = logging.getLogger("compute_workers")

# option -> environment variable it overrides
OVERRIDES = {
    "host": "COMPUTE_HOST",
    "libvirt_uri": "COMPUTE_LIBVIRT_URI",
    "driver": "COMPUTE_DRIVER",
    "vcpus": "COMPUTE_FAKE_VCPUS",
    "memory_mb": "COMPUTE_FAKE_MEMORY_MB",
    "disk_gb": "COMPUTE_FAKE_DISK_GB",
    "concurrency": "COMPUTE_CONCURRENCY",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m compute_workers",
        description="cloudctl compute worker: runs libvirt operations for one hypervisor host. "
                    "Configured by environment variables (see compute_workers/config.py); options "
                    "override them.")
    parser.add_argument("--host", help="host name; consumes queue compute.<host> (COMPUTE_HOST)")
    parser.add_argument("--libvirt-uri", help="libvirt URI, e.g. qemu:///system (COMPUTE_LIBVIRT_URI)")
    parser.add_argument("--driver", choices=DRIVERS, help="hypervisor driver (COMPUTE_DRIVER)")
    parser.add_argument("--vcpus", type=int, help="vCPUs the fake driver reports (COMPUTE_FAKE_VCPUS)")
    parser.add_argument("--memory-mb", type=int,
                        help="RAM the fake driver reports (COMPUTE_FAKE_MEMORY_MB)")
    parser.add_argument("--disk-gb", type=int, help="disk the fake driver reports (COMPUTE_FAKE_DISK_GB)")
    parser.add_argument("--concurrency", type=int, help="worker threads (COMPUTE_CONCURRENCY)")
    parser.add_argument("--loglevel", default="info",
                        choices=["debug", "info", "warning", "error", "critical"], help="log level")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # Until the Celery worker installs its own handlers (warm shutdown), SIGTERM ends start-up.
    raise SystemExit(128 + signum)


HOST_INIT_RETRY_MAX = 30.0


def send_host_init(manager: ComputeManager, reporter: CeleryReporter | None = None) -> None:
    """``conductor.host_init``, retried with backoff: the conductor must hear it before any task runs.
    The reports ``reporter``'s outbox kept from an earlier run go first: the conductor's restart
    handling (which ends an interrupted build in ERROR) must see a spawn that did finish."""
    delay = 1.0
    while True:
        try:
            if reporter is not None and (sent := reporter.flush()):
                LOG.info("%d report(s) kept in the outbox sent before host_init", sent)
            manager.host_init()
            LOG.info("host_init sent for host %s", manager.host)
            return
        except Exception as exc:
            LOG.warning("cannot send host_init (%s); trying again in %.0f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, HOST_INIT_RETRY_MAX)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(),
                        format="[%(asctime)s: %(levelname)s/%(threadName)s] %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    overrides = {OVERRIDES[option]: str(value) for option, value in vars(args).items()
                 if option in OVERRIDES and value is not None}
    try:
        config = ComputeConfig.from_env(overrides)
        driver = load_driver(config)
    except ConfigError as exc:
        print(f"compute_workers: configuration error: {exc}", file=sys.stderr)
        return 2

    app = create_app(config)
    if not config.host_key:
        LOG.warning("COMPUTE_HOST_KEY is not set: the conductor drops every report of host %s (issue its "
                    "key with `manage.py host_credentials %s` on the control plane)", config.host,
                    config.host)
    reporter = CeleryReporter(app, one_host_key(config.host, config.host_key),
                              Outbox.under(config.instances_path, config.host))
    manager = ComputeManager(config, driver, reporter)
    try:
        manager.init_host()
    except (ComputeError, OSError) as exc:
        LOG.error("cannot start the compute worker of host %s: %s", config.host, exc)
        return 1
    if config.concurrency < 2:
        LOG.warning("COMPUTE_CONCURRENCY=%d: a running live migration holds the only thread, so an abort "
                    "(and every other task of this host) waits until it ends; use 2 or more",
                    config.concurrency)
    register_tasks(app, manager)
    # Events first: a change between the host_init snapshot and the registration would be missed.
    manager.watch_power_states()
    send_host_init(manager, reporter)
    reporter.start()

    heartbeat = Heartbeat(manager.heartbeat, config.heartbeat_interval)
    heartbeat.start()
    try:
        # No mingle/gossip: they make every worker exchange state with every other (hundreds of hosts),
        # and nothing here uses them. Events (for Flower) stay on.
        worker = app.Worker(hostname=f"compute@{config.host}", queues=[config.queue], pool_cls="threads",
                            concurrency=config.concurrency, loglevel=args.loglevel.upper(),
                            task_events=True, without_mingle=True, without_gossip=True)
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        heartbeat.stop()
        try:
            # Tell the conductor at once, rather than leaving the host "up" with nobody
            # consuming its queue until its heartbeat grows old.
            manager.reporter.report(contract.CONDUCTOR_HOST_STOPPING, host=manager.host)
        except Exception as exc:
            LOG.warning("could not report that host %s is stopping: %s", manager.host, exc)
        reporter.stop()
        manager.close()


if __name__ == "__main__":
    sys.exit(main())
