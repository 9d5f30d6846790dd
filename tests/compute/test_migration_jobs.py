"""What live migration rests on, without a migration: its settings and time limits, the shared-storage
markers, the registry of running jobs (abort, switch-over), the progress throttle and intervals."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from compute_workers import contract, migration_jobs
from compute_workers import shared_storage as markers
from compute_workers.config import ComputeConfig, ConfigError
from compute_workers.migration_jobs import LiveMigrationJobs, ProgressThrottle

# Settings ---------------------------------------------------------------------------------------------

def test_migration_settings_defaults_and_uris() -> None:
    config = ComputeConfig.from_env(environ={"COMPUTE_HOST": "node1"})
    assert (config.migration_uri, config.migration_data_uri) == ("qemu+tcp://node1/system", "tcp://node1")
    assert (config.migration_unsafe, config.live_migration_bandwidth) == (False, 0)
    assert (config.live_migration_soft_time_limit, config.live_migration_time_limit) == (3600, 3660)
    assert config.max_live_migration_timeout == 3570
    ssh = ComputeConfig.from_env(environ={"COMPUTE_HOST": "node1", "COMPUTE_MIGRATION_ADDRESS": "10.0.0.7",
                                          "COMPUTE_MIGRATION_SCHEME": "ssh", "COMPUTE_MIGRATION_UNSAFE": "1",
                                          "COMPUTE_LIVE_MIGRATION_BANDWIDTH": "200"})
    assert (ssh.migration_uri, ssh.migration_data_uri) == ("qemu+ssh://10.0.0.7/system", "tcp://10.0.0.7")
    assert (ssh.migration_unsafe, ssh.live_migration_bandwidth) == (True, 200)
    v6 = ComputeConfig.from_env(environ={"COMPUTE_MIGRATION_ADDRESS": "fd00::2"})
    assert (v6.migration_uri, v6.migration_data_uri) == ("qemu+tcp://[fd00::2]/system", "tcp://[fd00::2]")


@pytest.mark.parametrize(("variable", "value"), [
    ("COMPUTE_MIGRATION_SCHEME", "ftp"), ("COMPUTE_MIGRATION_UNSAFE", "yes"),
    ("COMPUTE_MIGRATION_ADDRESS", "qemu+tcp://x/system"), ("COMPUTE_MIGRATION_ADDRESS", "[fd00::1]"),
    ("COMPUTE_LIVE_MIGRATION_BANDWIDTH", "-1"), ("COMPUTE_LIVE_MIGRATION_SOFT_TIME_LIMIT", "4000"),
])
def test_malformed_migration_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        ComputeConfig.from_env(environ={variable: value})


def test_every_migration_task_has_time_limits_below_the_visibility_timeout() -> None:
    config = ComputeConfig.from_env(environ={})
    limits = {name: (soft, hard) for name, soft, hard in config.time_limits()}
    for name in (contract.COMPUTE_CHECK_MIGRATE_DESTINATION, contract.COMPUTE_CHECK_MIGRATE_SOURCE,
                 contract.COMPUTE_PRE_LIVE_MIGRATION, contract.COMPUTE_LIVE_MIGRATION,
                 contract.COMPUTE_ABORT_LIVE_MIGRATION, contract.COMPUTE_LIVE_MIGRATION_FORCE_COMPLETE,
                 contract.COMPUTE_POST_LIVE_MIGRATION_AT_DEST,
                 contract.COMPUTE_ROLLBACK_LIVE_MIGRATION_AT_DEST):
        soft, hard = limits[name]
        assert soft < hard < config.visibility_timeout, name
    assert limits[contract.COMPUTE_LIVE_MIGRATION] == (3600, 3660)


# Markers, job registry, progress ---------------------------------------------------------------------

def test_markers_are_made_seen_removed_and_only_of_their_own_shape(tmp_path: Path) -> None:
    name = markers.create_marker(tmp_path)
    assert name.startswith(".shared-") and markers.marker_visible(tmp_path, name)
    assert not markers.marker_visible(tmp_path / "elsewhere", name)
    for bad in ("../../etc/passwd", ".shared-xyz", "disk", ""):
        with pytest.raises(markers.InvalidMarker):
            markers.marker_visible(tmp_path, bad)
        assert markers.remove_marker(tmp_path, bad) is False
    assert markers.remove_marker(tmp_path, name) is True
    assert markers.remove_marker(tmp_path, name) is False
    stale = markers.create_marker(tmp_path)
    old = time.time() - markers.MARKER_MAX_AGE - 5
    os.utime(tmp_path / stale, (old, old))
    fresh = markers.create_marker(tmp_path)  # removes the stale one
    assert not (tmp_path / stale).exists() and (tmp_path / fresh).exists()


def test_job_registry_aborts_reach_the_running_job_or_wait_for_it() -> None:
    jobs = LiveMigrationJobs()
    job = jobs.start(1, "u1")
    assert job is not None and jobs.start(1, "u1") is None  # a redelivery while it runs
    assert jobs.request_abort(1, "other-instance") is None and not job.abort_requested.is_set()
    assert jobs.request_abort(1, "u1") is job and job.abort_requested.is_set()
    jobs.finish(job)
    assert len(jobs) == 0
    assert jobs.request_abort(2, "u2") is None  # not started yet: remembered
    early = jobs.start(2, "u2")
    assert early is not None and early.abort_requested.is_set()
    late = jobs.start(3, "u3")
    assert late is not None and not late.abort_requested.is_set()


def test_job_registry_switch_over_requests_reach_only_a_running_job() -> None:
    jobs = LiveMigrationJobs()
    assert jobs.request_force_complete(1, "u1") is None  # nothing running: not kept for later
    job = jobs.start(1, "u1")
    assert job is not None and not job.force_complete_requested.is_set()
    assert jobs.request_force_complete(1, "other-instance") is None
    assert jobs.request_force_complete(1, "u1") is job and job.force_complete_requested.is_set()
    job.force_complete_requested.clear()
    job.switched = "paused"
    assert jobs.request_force_complete(1, "u1") is job and not job.force_complete_requested.is_set()


def test_progress_throttle() -> None:
    throttle = ProgressThrottle(0.6)
    due = [throttle.due(t) for t in (0.0, 0.2, 0.59, 0.6, 1.0, 1.3)]
    assert due == [True, False, False, True, False, True]


def test_monitor_intervals_keep_progress_at_least_every_second() -> None:
    worst = migration_jobs.PROGRESS_INTERVAL + migration_jobs.POLL_INTERVAL
    assert worst <= 0.85  # leaves 150 ms for libvirt to answer jobStats
