"""Every filter explains its refusal twice: naming the hosts (administrators) and without a host
name (tenants), with the same figures."""

from __future__ import annotations

import pytest

from scheduler.filters import ALL_FILTERS, CoreFilter, DiskFilter, RamFilter
from scheduler.host_state import HostState, RequestSpec
from scheduler.selection import NoValidHost, select_hosts

NAMES = ("rack4-node-alpha", "rack4-node-beta")


def host(name: str, **kw) -> HostState:
    defaults = dict(availability_zone="nova", enabled=True, is_up=True, vcpus=4, memory_mb=4096,
                    disk_gb=100, ram_allocation_ratio=1.0, cpu_info={"arch": "x86_64"})
    defaults.update(kw)
    return HostState(name=name, **defaults)


# A request every filter rejects, each for its own reason, with the hosts named wherever a filter
# could name them (group hosts, hints, hosts already tried).
SPEC = RequestSpec(instance_uuid="u", vcpus=64, memory_mb=16384, root_gb=500,
                   availability_zone="elsewhere", ignore_hosts=NAMES,
                   image_properties={"architecture": "aarch64"},
                   flavor_extra_specs={"capabilities:hypervisor_type": "xen"},
                   same_host=frozenset({"rack4-node-gamma"}), different_host=frozenset(NAMES),
                   group_policy="affinity", group_hosts={"rack4-node-gamma": 1})
REJECTED = [host(NAMES[0], is_up=False), host(NAMES[1], enabled=False, memory_mb=9216)]


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_the_tenant_explanation_names_no_host(name):
    explanation = ALL_FILTERS[name]().explain_for_tenant(SPEC, REJECTED)
    assert explanation
    assert "rack4" not in explanation, explanation


@pytest.mark.parametrize(("cls", "figures"), [
    (RamFilter, "no host has 16384 MiB free; the most free is 9216 MiB"),
    (DiskFilter, "no host has 500 GiB free; the most free is 100 GiB"),
    (CoreFilter, "no host has 64 vCPU free; the most free is 64 vCPU"),
])
def test_resource_filters_give_the_figures(cls, figures):
    assert cls().explain_for_tenant(SPEC, REJECTED) == figures
    assert NAMES[1] in cls().explain(SPEC, REJECTED) or NAMES[0] in cls().explain(SPEC, REJECTED)


def test_no_valid_host_carries_both_messages():
    hosts = [host(NAMES[0], memory_mb=4096), host(NAMES[1], memory_mb=9216)]
    spec = RequestSpec(instance_uuid="u", vcpus=1, memory_mb=16384, root_gb=1)
    with pytest.raises(NoValidHost) as raised:
        select_hosts(hosts, spec, [RamFilter()], [])
    fault = raised.value.as_fault()
    assert fault["tenant_message"] == ("No valid host was found: RamFilter: no host has 16384 MiB "
                                       "free; the most free is 9216 MiB.")
    assert fault["message"].endswith(f"the most free is 9216 MiB on {NAMES[1]}.")


def test_a_pinned_host_is_not_named_to_tenants():
    spec = RequestSpec(instance_uuid="u", vcpus=1, memory_mb=1, root_gb=1, force_host="rack4-node-x")
    with pytest.raises(NoValidHost) as raised:
        select_hosts([host(NAMES[0])], spec, [], [])
    assert "rack4" not in raised.value.tenant_message
    assert "rack4-node-x" in raised.value.message
