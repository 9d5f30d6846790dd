"""Placement rules through the API: hints, pinned hosts, server groups, zones, disabled hosts."""

from __future__ import annotations

from typing import Any

import pytest

from cloudctl.compute.models import Flavor, Instance
from cloudctl.compute.scheduling import schedule_instance
from tests.control.conftest import heartbeat

pytestmark = pytest.mark.django_db


@pytest.fixture
def hosts(db) -> list[str]:
    for name in ("hv1", "hv2", "hv3"):
        heartbeat(name, vcpus=4, memory_mb=4096)
    return ["hv1", "hv2", "hv3"]


def boot(client, name: str = "s", **extra: Any) -> dict[str, Any]:
    response = client.post("/api/v1/servers/", {"name": name, "flavor": "m1.nano",
                                                "image": "tiny", **extra}, format="json")
    assert response.status_code == 202, response.content
    schedule_instance(response.json()["id"])
    shown = client.get(f"/api/v1/servers/{response.json()['id']}/").json()
    # A tenant's answer has the hostId only (host names are for administrators): the placement
    # checks read the host the server landed on.
    placed = Instance.objects.select_related("host").get(uuid=shown["id"]).host
    return {**shown, "host": placed.name if placed else None}


def test_anti_affinity_spreads_and_fails_clearly_when_hosts_run_out(api, flavors, image, hosts):
    group = api.post("/api/v1/server-groups/", {"name": "web", "policy": "anti-affinity"},
                     format="json")
    assert group.status_code == 201, group.content
    hint = {"scheduler_hints": {"group": group.json()["id"]}}
    placed = [boot(api, f"web-{i}", **hint) for i in range(3)]
    assert sorted(s["host"] for s in placed) == hosts
    fourth = boot(api, "web-4", **hint)
    assert fourth["status"] == "ERROR"
    assert fourth["fault"]["message"] == (
        "No valid host was found: ServerGroupAntiAffinityFilter: every host left already runs a "
        "member of the server group (anti-affinity).")
    members = api.get(f"/api/v1/server-groups/{group.json()['id']}/").json()["members"]
    assert {m["name"] for m in members} == {"web-0", "web-1", "web-2", "web-4"}


def test_affinity_packs_onto_one_host(api, flavors, image, hosts):
    group = api.post("/api/v1/server-groups/", {"name": "db", "policy": "affinity"},
                     format="json").json()
    placed = [boot(api, f"db-{i}", scheduler_hints={"group": group["id"]}) for i in range(4)]
    assert len({s["host"] for s in placed}) == 1


def test_soft_policies_prefer_without_failing(api, flavors, image, hosts):
    spread = api.post("/api/v1/server-groups/", {"name": "a", "policy": "soft-anti-affinity"},
                      format="json").json()
    spread_hosts = [boot(api, f"a-{i}", scheduler_hints={"group": spread["id"]})["host"]
                    for i in range(4)]
    assert len(set(spread_hosts[:3])) == 3 and spread_hosts[3] in hosts
    pack = api.post("/api/v1/server-groups/", {"name": "b", "policy": "soft-affinity"},
                    format="json").json()
    pack_hosts = {boot(api, f"b-{i}", scheduler_hints={"group": pack["id"]})["host"]
                  for i in range(3)}
    assert len(pack_hosts) == 1


def test_server_group_validation_and_delete(api, flavors, image, hosts, other_project):
    bad = api.post("/api/v1/server-groups/", {"name": "x", "policy": "sometimes"}, format="json")
    assert bad.status_code == 400 and "policy" in bad.json()
    group = api.post("/api/v1/server-groups/", {"name": "g", "policy": "affinity"},
                     format="json").json()
    member = boot(api, "m", scheduler_hints={"group": group["id"]})
    assert member["server_group"] == group["id"]
    assert api.delete(f"/api/v1/server-groups/{group['id']}/").status_code == 204
    assert api.get(f"/api/v1/servers/{member['id']}/").json()["server_group"] is None


def test_same_and_different_host_hints(api, flavors, image, hosts):
    first = boot(api, "first")
    same = boot(api, "same", scheduler_hints={"same_host": [first["id"]]})
    different = boot(api, "different", scheduler_hints={"different_host": [first["id"]]})
    assert same["host"] == first["host"]
    assert different["host"] != first["host"]


@pytest.mark.parametrize(("hints", "reason"), [
    ({"colour": "blue"}, "unknown hint(s) colour"),
    ({"same_host": ["not-a-uuid"]}, "valid UUID"),
    ({"same_host": ["00000000-0000-0000-0000-000000000000"]}, "same_host: no server"),
    ({"group": "00000000-0000-0000-0000-000000000000"}, "group: no server group"),
])
def test_bad_hints_are_400(api, flavors, image, hints, reason):
    response = api.post("/api/v1/servers/", {"name": "a", "flavor": "m1.nano", "image": "tiny",
                                             "scheduler_hints": hints}, format="json")
    assert response.status_code == 400
    assert reason in str(response.json()["scheduler_hints"]), response.json()
    assert not Instance.objects.exists()


def test_only_admins_pin_a_host_and_the_filters_still_apply(api, admin_api, flavors, image,
                                                            hosts):
    refused = api.post("/api/v1/servers/", {"name": "a", "flavor": "m1.nano", "image": "tiny",
                                            "host": "hv2"}, format="json")
    assert refused.status_code == 400
    assert refused.json()["host"] == ["only administrators may choose a host"]
    assert boot(admin_api, "pinned", host="hv2")["host"] == "hv2"
    unknown = admin_api.post("/api/v1/servers/", {"name": "a", "flavor": "m1.nano",
                                                  "image": "tiny", "host": "hv9"}, format="json")
    assert unknown.status_code == 400 and unknown.json()["host"] == ["no host 'hv9'"]
    admin_api.post("/api/v1/hosts/hv3/disable/", {"reason": "maintenance"}, format="json")
    failed = boot(admin_api, "pinned-to-disabled", host="hv3")
    assert failed["status"] == "ERROR"
    assert "ComputeFilter left 0 of 1 host(s): 1 host(s) disabled (hv3)" in failed["fault"][
        "message"]


def test_disabled_hosts_keep_servers_but_get_no_new_ones(api, admin_api, flavors, image, hosts):
    on_hv1 = boot(admin_api, "keep", host="hv1")
    disabled = admin_api.post("/api/v1/hosts/hv1/disable/", {"reason": "disk swap"},
                              format="json")
    assert disabled.status_code == 200
    assert (disabled.json()["enabled"], disabled.json()["disabled_reason"]) == (False,
                                                                               "disk swap")
    assert api.post("/api/v1/hosts/hv1/enable/").status_code == 403
    assert {boot(api, f"n{i}")["host"] for i in range(6)} == {"hv2", "hv3"}
    assert admin_api.get(f"/api/v1/servers/{on_hv1['id']}/").json()["host"] == "hv1"
    assert admin_api.post("/api/v1/hosts/hv1/enable/").json()["enabled"] is True


def test_zones_come_from_aggregates(api, admin_api, flavors, image, hosts):
    aggregate = admin_api.post("/api/v1/aggregates/", {"name": "rack-a",
                                                       "availability_zone": "zone-a",
                                                       "metadata": {"ssd": "true"}},
                               format="json")
    assert aggregate.status_code == 201, aggregate.content
    agg_id = aggregate.json()["id"]
    added = admin_api.post(f"/api/v1/aggregates/{agg_id}/add-host/", {"host": "hv2"},
                           format="json")
    assert added.status_code == 200 and added.json()["hosts"] == ["hv2"]
    zones = {z["name"]: z for z in admin_api.get("/api/v1/availability-zones/").json()}
    assert zones["zone-a"]["hosts"] == ["hv2"] and set(zones["nova"]["hosts"]) == {"hv1", "hv3"}
    assert "hosts" not in api.get("/api/v1/availability-zones/").json()[0]
    assert {boot(api, f"z{i}", availability_zone="zone-a")["host"] for i in range(3)} == {"hv2"}
    bad = api.post("/api/v1/servers/", {"name": "a", "flavor": "m1.nano", "image": "tiny",
                                        "availability_zone": "zone-z"}, format="json")
    assert bad.status_code == 400 and "no availability zone 'zone-z'" in bad.json()[
        "availability_zone"][0]
    other = admin_api.post("/api/v1/aggregates/", {"name": "rack-b", "availability_zone": "zone-b"},
                           format="json").json()
    clash = admin_api.post(f"/api/v1/aggregates/{other['id']}/add-host/", {"host": "hv2"},
                           format="json")
    assert clash.status_code == 400
    assert "a host is in one availability zone" in clash.json()["availability_zone"][0]
    assert api.get("/api/v1/aggregates/").status_code == 403


def test_flavor_extra_specs_and_image_properties(api, admin_api, flavors, image, hosts):
    Flavor.objects.filter(name="m1.nano").update(
        extra_specs={"capabilities:cpu_info:arch": "x86_64", "hw:cpu_policy": "shared"})
    assert boot(api, "ok")["status"] == "BUILD"
    Flavor.objects.filter(name="m1.nano").update(extra_specs={"hypervisor_type": "xen"})
    refused = boot(api, "xen")
    assert refused["status"] == "ERROR"
    assert refused["fault"]["message"] == ("No valid host was found: ComputeCapabilitiesFilter: no "
                                           "host has the flavor's required capabilities "
                                           "(hypervisor_type xen).")
    Flavor.objects.filter(name="m1.nano").update(extra_specs={})
    image.properties = {"architecture": "aarch64"}
    image.save()
    arm = boot(api, "arm")
    assert arm["fault"]["message"].startswith("No valid host was found: ImagePropertiesFilter: no "
                                              "host matches the image's")


def test_an_aggregate_name_is_unique(admin_api: Any) -> None:
    """A second aggregate of the same name is a 400 naming the field (it was an IntegrityError: 500);
    saving an aggregate under its own name is fine."""
    first = admin_api.post("/api/v1/aggregates/", {"name": "rack1"}, format="json")
    assert first.status_code == 201
    again = admin_api.post("/api/v1/aggregates/", {"name": "rack1"}, format="json")
    assert again.status_code == 400
    assert again.json() == {"name": ["an aggregate named 'rack1' already exists"]}
    same = admin_api.put(f"/api/v1/aggregates/{first.json()['id']}/", {"name": "rack1"}, format="json")
    assert same.status_code == 200
    admin_api.post("/api/v1/aggregates/", {"name": "rack2"}, format="json")
    clash = admin_api.patch(f"/api/v1/aggregates/{first.json()['id']}/", {"name": "rack2"}, format="json")
    assert clash.status_code == 400 and "name" in clash.json()
