"""Filters and weighers are pure: no database, no Django settings."""

from __future__ import annotations

import pytest

from scheduler.filters import (
    AvailabilityZoneFilter,
    ComputeFilter,
    CoreFilter,
    DiskFilter,
    RamFilter,
    RetryFilter,
    UnknownPluginError,
    load_filters,
)
from scheduler.host_state import HostState, RequestSpec
from scheduler.weighers import CPUWeigher, RAMWeigher, load_weighers, weigh_hosts


def host(name: str = "h", **kw) -> HostState:
    defaults = dict(availability_zone="nova", enabled=True, is_up=True, vcpus=4, memory_mb=4096,
                    disk_gb=100)
    defaults.update(kw)
    return HostState(name=name, **defaults)


def spec(**kw) -> RequestSpec:
    defaults = dict(instance_uuid="u", vcpus=1, memory_mb=512, root_gb=10)
    defaults.update(kw)
    return RequestSpec(**defaults)


def test_ram_filter_applies_ratio_reserved_and_usage():
    state = host(memory_mb=1000, ram_allocation_ratio=1.5, memory_mb_reserved=100,
                 memory_mb_used=800)
    assert state.free_ram_mb == 600
    assert RamFilter().host_passes(state, spec(memory_mb=600))
    assert not RamFilter().host_passes(state, spec(memory_mb=601))


def test_core_filter_uses_cpu_allocation_ratio():
    state = host(vcpus=2, cpu_allocation_ratio=16.0, vcpus_used=31)
    assert CoreFilter().host_passes(state, spec(vcpus=1))
    assert not CoreFilter().host_passes(state, spec(vcpus=2))


def test_disk_filter():
    state = host(disk_gb=20, disk_allocation_ratio=1.0, disk_gb_used=15, disk_gb_reserved=2)
    assert DiskFilter().host_passes(state, spec(root_gb=3))
    assert not DiskFilter().host_passes(state, spec(root_gb=4))


def test_compute_filter_needs_enabled_and_up():
    assert ComputeFilter().host_passes(host(), spec())
    assert not ComputeFilter().host_passes(host(enabled=False), spec())
    assert not ComputeFilter().host_passes(host(is_up=False), spec())
    reason = ComputeFilter().explain(spec(), [host("a", is_up=False), host("b", enabled=False)])
    assert reason == "1 host(s) down (a); 1 host(s) disabled (b)"


def test_retry_and_zone_filters():
    assert not RetryFilter().host_passes(host("a"), spec(ignore_hosts=("a",)))
    assert RetryFilter().host_passes(host("b"), spec(ignore_hosts=("a",)))
    assert AvailabilityZoneFilter().host_passes(host(availability_zone="z1"), spec())
    assert not AvailabilityZoneFilter().host_passes(host(availability_zone="z1"),
                                                    spec(availability_zone="z2"))


def test_resource_filter_explains_with_the_best_host():
    rejected = [host("a", memory_mb=1000, ram_allocation_ratio=1.0, memory_mb_used=900),
                host("b", memory_mb=1000, ram_allocation_ratio=1.0, memory_mb_used=400)]
    assert RamFilter().explain(spec(memory_mb=8192), rejected) == (
        "2 host(s) lack 8192 MiB RAM free; the most free is 600 MiB on b")


def test_unknown_names_fail_loudly():
    with pytest.raises(UnknownPluginError, match="RamFiltr"):
        load_filters(["RamFilter", "RamFiltr"])
    with pytest.raises(UnknownPluginError, match="Nope"):
        load_weighers(["Nope"], {})


def test_weighers_normalise_multiply_and_sum():
    hosts = [host("a", memory_mb=1000, vcpus=8), host("b", memory_mb=4000, vcpus=2),
             host("c", memory_mb=2500, vcpus=4)]
    spread = weigh_hosts(hosts, spec(), [(RAMWeigher(), 1.0)])
    assert [h.name for h, _ in spread] == ["b", "c", "a"]
    assert [w for _, w in spread] == [1.0, 0.5, 0.0]
    stack = weigh_hosts(hosts, spec(), [(RAMWeigher(), -1.0)])
    assert [h.name for h, _ in stack] == ["a", "c", "b"]
    # CPU free (x16 ratio): a=128, b=32, c=64 -> a=1, b=0, c=1/3; RAM: a=0, b=1, c=0.5.
    both = dict((h.name, w) for h, w in weigh_hosts(hosts, spec(),
                                                     [(RAMWeigher(), 1.0), (CPUWeigher(), 2.0)]))
    assert both["a"] == pytest.approx(2.0)
    assert both["b"] == pytest.approx(1.0)
    assert both["c"] == pytest.approx(0.5 + 2 / 3)


def test_equal_hosts_keep_a_stable_order():
    hosts = [host("b"), host("a")]
    assert [h.name for h, _ in weigh_hosts(hosts, spec(), [(RAMWeigher(), 1.0)])] == ["a", "b"]


def test_consume_updates_free_amounts():
    state = host(memory_mb=1000, ram_allocation_ratio=1.0)
    state.consume(spec(memory_mb=300, vcpus=2, root_gb=5))
    assert (state.free_ram_mb, state.vcpus_used, state.disk_gb_used, state.num_instances) == (
        700, 2, 5, 1)


def test_extra_spec_operators():
    from scheduler.filters import extra_spec_matches as match

    assert match("QEMU", "qemu") and not match("QEMU", "xen")
    assert match("QEMU", "s== QEMU") and not match("QEMU", "s== qemu")
    assert match(7002000, ">= 7000000") and not match(7002000, "<= 7000000")
    assert match(4, "== 4") and not match("four", "== 4")
    assert match(["sse2", "avx"], "<in> avx") and not match(["sse2"], "<in> avx")
    assert match("kvm", "<or> qemu <or> kvm") and not match("xen", "<or> qemu <or> kvm")
    assert not match(None, "anything")


def test_compute_capabilities_filter_scopes():
    from scheduler.filters import ComputeCapabilitiesFilter

    state = host(hypervisor_type="QEMU", cpu_info={"arch": "x86_64", "features": ["avx"]},
                 aggregate_metadata={"ssd": "true"})
    passes = ComputeCapabilitiesFilter().host_passes
    assert passes(state, spec(flavor_extra_specs={"capabilities:cpu_info:arch": "x86_64",
                                                  "hw:cpu_policy": "dedicated"}))
    assert passes(state, spec(flavor_extra_specs={"capabilities:cpu_info:features": "<in> avx",
                                                  "ssd": "true"}))
    assert not passes(state, spec(flavor_extra_specs={"hypervisor_type": "xen"}))
    assert not passes(state, spec(flavor_extra_specs={"capabilities:cpu_info:model": "Haswell"}))


def test_image_properties_filter():
    from scheduler.filters import ImagePropertiesFilter

    state = host(hypervisor_type="QEMU", virt_type="kvm", cpu_info={"arch": "x86_64"})
    passes = ImagePropertiesFilter().host_passes
    assert passes(state, spec(image_properties={"architecture": "x86_64",
                                                "hypervisor_type": "kvm"}))
    assert passes(state, spec(image_properties={"hypervisor_type": "qemu"}))
    assert not passes(state, spec(image_properties={"architecture": "aarch64"}))


def test_group_and_hint_filters():
    from scheduler.filters import (
        DifferentHostFilter,
        SameHostFilter,
        ServerGroupAffinityFilter,
        ServerGroupAntiAffinityFilter,
    )

    a, b = host("a"), host("b")
    anti = spec(group_policy="anti-affinity", group_hosts={"a": 1})
    assert not ServerGroupAntiAffinityFilter().host_passes(a, anti)
    assert ServerGroupAntiAffinityFilter().host_passes(b, anti)
    aff = spec(group_policy="affinity", group_hosts={"a": 2})
    assert ServerGroupAffinityFilter().host_passes(a, aff)
    assert not ServerGroupAffinityFilter().host_passes(b, aff)
    # The first member of an affinity group may go anywhere.
    assert ServerGroupAffinityFilter().host_passes(b, spec(group_policy="affinity"))
    assert SameHostFilter().host_passes(a, spec(same_host=frozenset({"a"})))
    assert not SameHostFilter().host_passes(b, spec(same_host=frozenset({"a"})))
    assert SameHostFilter().host_passes(b, spec())
    assert not DifferentHostFilter().host_passes(a, spec(different_host=frozenset({"a"})))


def test_soft_group_weighers():
    from scheduler.weighers import ServerGroupSoftAffinityWeigher, ServerGroupSoftAntiAffinityWeigher

    hosts = [host("a"), host("b"), host("c")]
    counts = {"a": 2, "b": 1}
    pack = weigh_hosts(hosts, spec(group_policy="soft-affinity", group_hosts=counts),
                       [(ServerGroupSoftAffinityWeigher(), 1.0)])
    assert [h.name for h, _ in pack] == ["a", "b", "c"]
    spread = weigh_hosts(hosts, spec(group_policy="soft-anti-affinity", group_hosts=counts),
                         [(ServerGroupSoftAntiAffinityWeigher(), 1.0)])
    assert [h.name for h, _ in spread] == ["c", "b", "a"]


def test_pinned_host_and_subset_size():
    from scheduler.selection import NoValidHost, select_hosts

    hosts = [host(f"h{i}", memory_mb=1000 * (i + 1)) for i in range(5)]
    filters = load_filters(["RamFilter"])
    weighers = [(RAMWeigher(), 1.0)]
    assert [h.name for h in select_hosts(hosts, spec(force_host="h1"), filters, weighers)] == ["h1"]
    with pytest.raises(NoValidHost) as missing:
        select_hosts(hosts, spec(force_host="h9"), filters, weighers)
    assert missing.value.steps[0].name == "RequestedHost"
    firsts = {select_hosts(hosts, spec(), filters, weighers, subset_size=3)[0].name
              for _ in range(60)}
    assert firsts == {"h4", "h3", "h2"}
