"""Tenants never read a hypervisor's name: not in a server, its actions and events, its migrations,
its fault, its server group, its ports, nor an error answer. They see Nova's ``hostId`` (sha224 of
project id + host name); administrators see ``host`` as well. NoValidHost stays explained, with the
figures and without host names for tenants."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from cloudctl.compute.models import Host, Instance, Migration
from cloudctl.compute.scheduling import schedule_instance
from cloudctl.network.models import Port
from tests.control.conftest import active_server, heartbeat

pytestmark = pytest.mark.django_db

API = "/api/v1"
# Distinctive names: the tests look for them anywhere in the answers' text.
HOST = "hv1"  # active_server places the server on hv1
OTHER = "rack7-compute-secret"


def expected_host_id(instance: Instance, name: str) -> str:
    return hashlib.sha224(f"{instance.project_id}{name}".encode()).hexdigest()


def assert_no_host_name(response, *names: str) -> str:
    text = response.content.decode()
    for name in names:
        assert f'"{name}"' not in text and f" {name}" not in text and f"{name} " not in text, (
            f"{name!r} in {text}")
    return text


@pytest.fixture
def server(api, flavors, image, outbox):
    return active_server(api, outbox)


def test_tenant_sees_host_id_not_the_host_in_show_and_list(api, admin_api, server):
    shown = api.get(f"{API}/servers/{server.uuid}/")
    assert shown.status_code == 200
    assert_no_host_name(shown, HOST)
    body = shown.json()
    assert body["host"] is None
    assert body["hostId"] == expected_host_id(server, HOST)
    listed = api.get(f"{API}/servers/")
    assert_no_host_name(listed, HOST)
    assert [s["hostId"] for s in listed.json()] == [expected_host_id(server, HOST)]

    admin = admin_api.get(f"{API}/servers/{server.uuid}/").json()
    assert admin["host"] == HOST
    assert admin["hostId"] == body["hostId"]


def test_a_server_on_no_host_has_an_empty_host_id(api, flavors, image):
    created = api.post(f"{API}/servers/", {"name": "w", "flavor": "m1.nano", "image": "tiny"},
                       format="json").json()
    assert (created["host"], created["hostId"]) == (None, "")


def test_host_ids_differ_between_projects(server, other_project):
    from cloudctl.compute.host_ids import host_id
    assert host_id(server.project_id, HOST) != host_id(other_project.pk, HOST)
    assert host_id(server.project_id, HOST) == host_id(server.project_id, HOST)


def test_actions_and_events_name_no_host_for_tenants(api, admin_api, server):
    # A message written for everyone that names the host (as the recovery's do).
    action = server.actions.get(action="create")
    action.events.create(event="compute_rebuild", result="Error", host=HOST,
                         message=f"the compute worker on {HOST} restarted during spawning")
    answer = api.get(f"{API}/servers/{server.uuid}/actions/")
    assert answer.status_code == 200
    assert_no_host_name(answer, HOST)
    events = [e for a in answer.json() for e in a["events"]]
    assert {e["host"] for e in events} == {""}
    assert {e["hostId"] for e in events if e["event"] == "compute_rebuild"} == {
        expected_host_id(server, HOST)}
    rebuilt = next(e for e in events if e["event"] == "compute_rebuild")
    assert rebuilt["message"] == (f"the compute worker on {expected_host_id(server, HOST)} "
                                  "restarted during spawning")

    admin_events = [e for a in admin_api.get(f"{API}/servers/{server.uuid}/actions/").json()
                    for e in a["events"]]
    assert HOST in {e["host"] for e in admin_events}
    assert any(e["message"] == f"the compute worker on {HOST} restarted during spawning"
               for e in admin_events)


def test_an_accepted_action_names_no_host(api, server):
    answer = api.post(f"{API}/servers/{server.uuid}/reboot/", {"type": "HARD"}, format="json")
    assert answer.status_code == 202
    assert_no_host_name(answer, HOST)


def test_resize_migrations_name_no_host_for_tenants(api, admin_api, server, outbox):
    heartbeat(OTHER)
    accepted = api.post(f"{API}/servers/{server.uuid}/resize/", {"flavor": "m1.tiny"}, format="json")
    assert accepted.status_code == 202, accepted.content
    assert_no_host_name(accepted, HOST, OTHER)
    assert accepted.json()["source_host"] is None
    migration = Migration.objects.get(instance=server)
    Migration.objects.filter(pk=migration.pk).update(
        dest_host=Host.objects.get(name=OTHER),
        error=f"the destination {OTHER} could not finish: disk full; reverting to {HOST}")
    listed = api.get(f"{API}/servers/{server.uuid}/migrations/")
    assert listed.status_code == 200
    assert_no_host_name(listed, HOST, OTHER)
    [shown] = listed.json()
    assert (shown["source_host"], shown["dest_host"]) == (None, None)
    one = api.get(f"{API}/servers/{server.uuid}/migrations/{migration.pk}/")
    assert_no_host_name(one, HOST, OTHER)

    [admin_view] = admin_api.get(f"{API}/servers/{server.uuid}/migrations/").json()
    assert (admin_view["source_host"], admin_view["dest_host"]) == (HOST, OTHER)
    assert OTHER in admin_view["error"]


def test_a_fault_naming_the_host_names_none_for_tenants(api, admin_api, server):
    Instance.objects.filter(pk=server.pk).update(vm_state="error", fault={
        "message": f"the domain of this server no longer exists on host {HOST}", "code": 500,
        "details": f"seen by {HOST}"})
    answer = api.get(f"{API}/servers/{server.uuid}/")
    assert_no_host_name(answer, HOST)
    assert answer.json()["fault"]["message"] == (
        f"the domain of this server no longer exists on host {expected_host_id(server, HOST)}")
    admin = admin_api.get(f"{API}/servers/{server.uuid}/").json()
    assert admin["fault"]["message"].endswith(f"on host {HOST}")


def test_an_error_answer_names_no_host_for_tenants(api, admin_api, server):
    Host.objects.filter(name=HOST).update(last_heartbeat=timezone.now() - timedelta(hours=1))
    refused = api.post(f"{API}/servers/{server.uuid}/stop/")
    assert refused.status_code == 409
    assert_no_host_name(refused, HOST)
    assert expected_host_id(server, HOST) in refused.content.decode()
    admin_refused = admin_api.post(f"{API}/servers/{server.uuid}/stop/")
    assert admin_refused.status_code == 409 and f"host {HOST} is down" in admin_refused.content.decode()


def test_server_group_members_show_host_ids_to_tenants(api, admin_api, flavors, image, outbox):
    group = api.post(f"{API}/server-groups/", {"name": "g", "policy": "anti-affinity"},
                     format="json").json()
    heartbeat(HOST)
    created = api.post(f"{API}/servers/", {"name": "m", "flavor": "m1.nano", "image": "tiny",
                                           "scheduler_hints": {"group": group["id"]}},
                       format="json").json()
    assert schedule_instance(created["id"]) == HOST
    answer = api.get(f"{API}/server-groups/{group['id']}/")
    assert_no_host_name(answer, HOST)
    [member] = answer.json()["members"]
    instance = Instance.objects.get(uuid=created["id"])
    assert (member["host"], member["hostId"]) == (None, expected_host_id(instance, HOST))
    [admin_member] = admin_api.get(f"{API}/server-groups/{group['id']}/").json()["members"]
    assert admin_member["host"] == HOST


def test_port_binding_host_is_for_admins(api, admin_api):
    net = api.post(f"{API}/networks/", {"name": "private"}, format="json")
    assert net.status_code == 201, net.content
    api.post(f"{API}/subnets/", {"network": net.json()["id"], "cidr": "10.0.0.0/24",
                                 "enable_dhcp": False}, format="json")
    port = api.post(f"{API}/ports/", {"network": "private", "name": "p"}, format="json").json()
    Port.objects.filter(pk=port["id"]).update(binding_host=OTHER)
    shown = api.get(f"{API}/ports/{port['id']}/")
    assert shown.status_code == 200
    assert_no_host_name(shown, OTHER)
    assert shown.json()["binding_host"] == ""
    assert admin_api.get(f"{API}/ports/{port['id']}/").json()["binding_host"] == OTHER


# --- NoValidHost ------------------------------------------------------------------------------------

def test_no_valid_host_tells_tenants_the_figures_and_admins_the_hosts(api, admin_api, flavors, image):
    heartbeat(OTHER, memory_mb=6144)  # 9216 MiB free at RAM ratio 1.5
    heartbeat("rack9-compute-hidden", memory_mb=4096)
    created = api.post(f"{API}/servers/", {"name": "big", "flavor": "m1.xlarge", "image": "tiny"},
                       format="json").json()
    assert schedule_instance(created["id"]) is None
    shown = api.get(f"{API}/servers/{created['id']}/")
    text = assert_no_host_name(shown, OTHER, "rack9-compute-hidden")
    assert "rack" not in text
    fault = shown.json()["fault"]
    assert fault["message"] == ("No valid host was found: RamFilter: no host has 16384 MiB free; "
                                "the most free is 9216 MiB.")
    assert fault["details"] == ""
    actions = api.get(f"{API}/servers/{created['id']}/actions/")
    assert "rack" not in actions.content.decode()
    assert "no host has 16384 MiB free; the most free is 9216 MiB" in actions.content.decode()

    admin_fault = admin_api.get(f"{API}/servers/{created['id']}/").json()["fault"]
    assert admin_fault["message"] == (
        "No valid host was found: RamFilter left 0 of 2 host(s): 2 host(s) lack 16384 MiB RAM free; "
        f"the most free is 9216 MiB on {OTHER}.")
    assert OTHER in str(admin_fault["details"])
