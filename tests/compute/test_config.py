"""ComputeConfig: environment only, defaults as documented, malformed values named."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from compute_workers import config as config_module
from compute_workers.config import ComputeConfig, ConfigError
from compute_workers.virt import load_driver
from compute_workers.virt.fake import FakeDriver
from compute_workers.virt.libvirt.driver import LibvirtDriver


def test_defaults() -> None:
    config = ComputeConfig.from_env(environ={})
    assert config.broker_url == "redis://127.0.0.1:6379/0"
    assert config.rpc_backend == "redis://127.0.0.1:6379/1"
    assert config.host == socket.gethostname()
    assert config.libvirt_uri == "qemu:///system"
    assert (config.driver, config.virt_type, config.machine_type) == ("libvirt", "auto", "pc")
    assert config.instances_path == Path("/var/lib/cloudctl/instances")
    assert config.service_token == ""
    assert (config.heartbeat_interval, config.concurrency) == (5.0, 4)
    assert (config.reserved_host_memory_mb, config.reserved_host_disk_gb) == (512, 0)
    assert config.image_download_timeout == 300.0
    assert config.clean_shutdown_timeout == 60.0
    assert (config.lifecycle_soft_time_limit, config.lifecycle_time_limit) == (300, 360)
    assert config.visibility_timeout > max(hard for _, _, hard in config.time_limits())
    assert config.queue == f"compute.{socket.gethostname()}"


def test_environment_and_overrides() -> None:
    config = ComputeConfig.from_env({"COMPUTE_HOST": "node7"},
                                    environ={"COMPUTE_HOST": "ignored", "COMPUTE_CONCURRENCY": "9",
                                             "COMPUTE_VIRT_TYPE": "qemu", "INSTANCES_PATH": "/srv/i"})
    assert (config.host, config.concurrency, config.virt_type) == ("node7", 9, "qemu")
    assert config.instances_path == Path("/srv/i")


@pytest.mark.parametrize(("variable", "value"), [
    ("COMPUTE_CONCURRENCY", "four"), ("COMPUTE_CONCURRENCY", "0"), ("COMPUTE_HEARTBEAT_INTERVAL", "-1"),
    ("COMPUTE_DRIVER", "xen"), ("COMPUTE_VIRT_TYPE", "hvf"), ("COMPUTE_HOST", "two words"),
    ("COMPUTE_RESERVED_HOST_MEMORY_MB", "-5"), ("CELERY_BROKER_URL", " "),
    ("COMPUTE_CLEAN_SHUTDOWN_TIMEOUT", "-1"), ("COMPUTE_CLEAN_SHUTDOWN_TIMEOUT", "nan"),
    ("COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY", "yes"), ("COMPUTE_LIVE_MIGRATION_PERMIT_AUTO_CONVERGE", "2"),
    ("COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION", "pause"), ("COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION", ""),
    ("COMPUTE_NETWORK_NAMESPACE", "a b"), ("COMPUTE_NETWORK_NAMESPACE", "../etc"),
])
def test_malformed_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        ComputeConfig.from_env(environ={variable: value})


def test_live_migration_switch_over_settings() -> None:
    default = ComputeConfig.from_env(environ={})
    assert (default.live_migration_permit_post_copy, default.live_migration_permit_auto_converge,
            default.live_migration_timeout_action) == (False, False, "abort")
    config = ComputeConfig.from_env(environ={"COMPUTE_LIVE_MIGRATION_PERMIT_POST_COPY": "1",
                                             "COMPUTE_LIVE_MIGRATION_PERMIT_AUTO_CONVERGE": "1",
                                             "COMPUTE_LIVE_MIGRATION_TIMEOUT_ACTION": "force_complete"})
    assert (config.live_migration_permit_post_copy, config.live_migration_permit_auto_converge,
            config.live_migration_timeout_action) == (True, True, "force_complete")


def test_time_limits_must_stay_below_the_visibility_timeout() -> None:
    with pytest.raises(ConfigError, match=r"COMPUTE_VISIBILITY_TIMEOUT .* must exceed COMPUTE_SPAWN_TIME"):
        ComputeConfig.from_env(environ={"COMPUTE_VISIBILITY_TIMEOUT": "600"})
    with pytest.raises(ConfigError, match="COMPUTE_TERMINATE_SOFT_TIME_LIMIT"):
        ComputeConfig.from_env(environ={"COMPUTE_TERMINATE_SOFT_TIME_LIMIT": "500"})


def test_the_clean_shutdown_wait_must_fit_in_a_lifecycle_task() -> None:
    config = ComputeConfig.from_env(environ={"COMPUTE_CLEAN_SHUTDOWN_TIMEOUT": "0"})
    assert config.clean_shutdown_timeout == 0  # soft reboots are then always hard ones
    with pytest.raises(ConfigError, match=r"COMPUTE_CLEAN_SHUTDOWN_TIMEOUT \(280 s\) must be at most "
                                          r"COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT - 30 \(270 s\)"):
        ComputeConfig.from_env(environ={"COMPUTE_CLEAN_SHUTDOWN_TIMEOUT": "280"})
    with pytest.raises(ConfigError, match="COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT"):
        ComputeConfig.from_env(environ={"COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT": "400"})
    with pytest.raises(ConfigError, match="must exceed COMPUTE_LIFECYCLE_TIME_LIMIT"):
        ComputeConfig.from_env(environ={"COMPUTE_LIFECYCLE_SOFT_TIME_LIMIT": "7000",
                                        "COMPUTE_LIFECYCLE_TIME_LIMIT": "8000"})


def test_the_token_is_not_in_the_repr() -> None:
    assert "s3cret" not in repr(ComputeConfig.from_env(environ={"CLOUDCTL_SERVICE_TOKEN": "s3cret"}))


def test_every_variable_is_documented_in_the_module_docstring() -> None:
    documented = config_module.__doc__ or ""
    for variable in ComputeConfig.variables():
        assert f"| `{variable}` |" in documented, variable


def test_drivers_are_chosen_by_name(tmp_path: Path) -> None:
    fake = load_driver(ComputeConfig.from_env(environ={"COMPUTE_DRIVER": "fake", "COMPUTE_FAKE_VCPUS": "3"}))
    assert isinstance(fake, FakeDriver) and fake.get_available_resource()["vcpus"] == 3
    real = load_driver(ComputeConfig.from_env(environ={"COMPUTE_LIBVIRT_URI": "test:///default",
                                                       "INSTANCES_PATH": str(tmp_path)}))
    assert isinstance(real, LibvirtDriver) and real.uri == "test:///default"
