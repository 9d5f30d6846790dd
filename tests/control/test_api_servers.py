"""POST/GET/DELETE /api/v1/servers/ and console-output: status codes, validation, scoping."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from cloudctl.compute import conductor
from cloudctl.compute.host_ids import host_id
from cloudctl.compute.models import Allocation, Instance, InstanceAction
from cloudctl.compute.scheduling import schedule_instance
from cloudctl.compute.states import VmState
from compute_workers import contract
from tests.control.conftest import Outbox, client_for, make_user

pytestmark = pytest.mark.django_db


def create(api: APIClient, **body: Any) -> Any:
    return api.post("/api/v1/servers/", body, format="json")


def test_create_answers_202_and_asks_the_scheduler(api, flavors, image, outbox: Outbox,
                                                   django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = create(api, name="web-1", flavor="m1.nano", image="tiny")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "BUILD"
    assert (body["vm_state"], body["task_state"], body["power_state"]) == (
        "building", "scheduling", "nostate")
    assert body["flavor"]["name"] == "m1.nano" and body["flavor"]["memory_mb"] == 128
    assert body["image"] == {"id": str(image.id), "name": "tiny"}
    assert body["host"] is None and body["fault"] is None
    assert outbox.scheduler == [(contract.SCHEDULE_INSTANCE, {"instance_uuid": body["id"]})]
    assert InstanceAction.objects.get(instance_id=body["id"]).action == "create"


def test_create_accepts_ids(api, flavors, image):
    response = create(api, name="x", flavor=flavors["m1.tiny"].pk, image=str(image.id))
    assert response.status_code == 202, response.content
    assert response.json()["flavor"]["name"] == "m1.tiny"


@pytest.mark.parametrize(("body", "field", "reason"), [
    ({"flavor": "m1.nano", "image": "tiny"}, "name", "required"),
    ({"name": "", "flavor": "m1.nano", "image": "tiny"}, "name", "blank"),
    ({"name": 42, "flavor": "m1.nano", "image": "tiny"}, "name", "valid string"),
    ({"name": "a", "flavor": "m9.huge", "image": "tiny"}, "flavor", "no flavor"),
    ({"name": "a", "flavor": "m1.nano", "image": "nope"}, "image", "no image"),
    ({"name": "a", "flavor": ["m1.nano"], "image": "tiny"}, "flavor", "id or a name"),
    ({"name": "a", "flavor": True, "image": "tiny"}, "flavor", "id or a name"),
    ({"name": "a" * 256, "flavor": "m1.nano", "image": "tiny"}, "name", "255"),
])
def test_create_rejects_bad_input_naming_the_field(api, flavors, image, body, field, reason):
    response = create(api, **body)
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert reason in " ".join(response.json()[field])
    assert Instance.objects.count() == 0


def test_create_rejects_a_body_that_is_not_json(api, flavors, image):
    response = api.post("/api/v1/servers/", "{name: oops", content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert Instance.objects.count() == 0


def test_create_refuses_an_image_bigger_than_the_flavor_disk(api, flavors, image):
    image.virtual_size = 5 * 1024**3
    image.save()
    response = create(api, name="a", flavor="m1.nano", image="tiny")
    assert response.status_code == 400
    assert "larger than flavor m1.nano" in response.json()["flavor"][0]


def test_every_call_needs_a_token(flavors):
    anonymous = APIClient()
    assert anonymous.get("/api/v1/servers/").status_code == 401
    assert anonymous.post("/api/v1/servers/", {}, format="json").status_code == 401
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token nonsense")
    assert bad.get("/api/v1/flavors/").status_code == 401


def test_token_endpoint(member):
    client = APIClient()
    good = client.post("/api/v1/auth/token/", {"username": "alice", "password": "pw"},
                       format="json")
    assert good.status_code == 200 and len(good.json()["token"]) == 43  # token_urlsafe(32)
    authed = APIClient()
    authed.credentials(HTTP_AUTHORIZATION=f"Token {good.json()['token']}")
    assert authed.get("/api/v1/servers/").status_code == 200
    wrong = client.post("/api/v1/auth/token/", {"username": "alice", "password": "no"},
                        format="json")
    assert wrong.status_code == 401
    missing = client.post("/api/v1/auth/token/", {"username": "alice"}, format="json")
    assert missing.status_code == 400 and "password" in missing.json()


def test_members_see_only_their_project(api, flavors, image, other_project, admin_api):
    mine = create(api, name="mine", flavor="m1.nano", image="tiny").json()
    stranger = client_for(make_user("bob", other_project))
    theirs = create(stranger, name="theirs", flavor="m1.nano", image="tiny").json()

    assert [s["name"] for s in api.get("/api/v1/servers/").json()] == ["mine"]
    assert api.get(f"/api/v1/servers/{theirs['id']}/").status_code == 404
    assert api.delete(f"/api/v1/servers/{theirs['id']}/").status_code == 404
    assert stranger.get(f"/api/v1/servers/{mine['id']}/").status_code == 404
    assert {s["name"] for s in admin_api.get("/api/v1/servers/").json()} == {"mine", "theirs"}


def test_delete_before_placement_is_immediate(api, flavors, image, outbox):
    server = create(api, name="a", flavor="m1.nano", image="tiny").json()
    assert api.delete(f"/api/v1/servers/{server['id']}/").status_code == 204
    assert api.get(f"/api/v1/servers/{server['id']}/").status_code == 404
    assert api.get("/api/v1/servers/").json() == []
    row = Instance.objects.get(uuid=server["id"])
    assert row.vm_state == VmState.DELETED and row.deleted_at is not None
    assert outbox.compute == []
    # The scheduler then finds nothing to do.
    assert schedule_instance(server["id"]) is None
    assert not Allocation.objects.exists()


def test_delete_of_a_placed_server_asks_its_host(api, flavors, image, host, outbox,
                                                 django_capture_on_commit_callbacks):
    server = create(api, name="a", flavor="m1.nano", image="tiny").json()
    assert schedule_instance(server["id"]) == "hv1"
    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"/api/v1/servers/{server['id']}/")
    assert response.status_code == 202
    assert response.json()["task_state"] == "deleting"
    assert outbox.compute[-1] == ("hv1", contract.COMPUTE_TERMINATE,
                                  {"instance_uuid": server["id"]})
    again = api.delete(f"/api/v1/servers/{server['id']}/")
    assert again.status_code == 409
    assert again.json()["task_state"] == "deleting"


def test_a_delete_ends_the_action_of_the_task_it_replaces(api, flavors, image, host, outbox,
                                                          django_capture_on_commit_callbacks):
    """A server deleted while it builds: the build's report will be dropped as stale, so its create
    action ends at the delete, in error, saying so (found by the kill -9 chaos test: such actions
    stayed without a result forever); the delete's own action ends when the host destroyed it."""
    server = create(api, name="a", flavor="m1.nano", image="tiny").json()
    assert schedule_instance(server["id"]) == "hv1"
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/v1/servers/{server['id']}/").status_code == 202
    actions = {a["action"]: a for a in api.get(f"/api/v1/servers/{server['id']}/actions/").json()}
    assert (actions["create"]["result"], actions["create"]["message"]) == (
        "Error", "superseded by a delete of the server during spawning")
    assert actions["create"]["finish_time"] is not None
    assert (actions["delete"]["result"], actions["delete"]["finish_time"]) == ("", None)
    # The late spawn report changes nothing (the action ended, the server is deleting).
    assert not conductor.instance_update(instance_uuid=server["id"], host="hv1",
                                         expected_task_state="spawning",
                                         values={"vm_state": "active", "task_state": None})
    conductor.instance_destroyed(instance_uuid=server["id"], host="hv1")
    assert InstanceAction.objects.get(instance_id=server["id"], action="delete").result == "Success"
    assert InstanceAction.objects.get(instance_id=server["id"], action="create").result == "Error"


def test_console_output_is_409_while_not_on_a_host(api, flavors, image):
    server = create(api, name="a", flavor="m1.nano", image="tiny").json()
    response = api.get(f"/api/v1/servers/{server['id']}/console-output/")
    assert response.status_code == 409
    assert "not running on a host" in response.json()["detail"]


def test_console_output_reads_from_the_host(api, flavors, image, host, outbox):
    server = create(api, name="a", flavor="m1.nano", image="tiny").json()
    schedule_instance(server["id"])
    Instance.objects.filter(uuid=server["id"]).update(vm_state=VmState.ACTIVE, task_state=None)
    seen: dict[str, Any] = {}

    def answer(host_name: str, **kwargs: Any) -> dict[str, str]:
        seen.update(kwargs, host=host_name)
        return {"output": "cloudctl-guest: ready\n"}

    outbox.calls[contract.COMPUTE_CONSOLE_OUTPUT] = answer
    response = api.get(f"/api/v1/servers/{server['id']}/console-output/?lines=5")
    assert response.status_code == 200
    assert response.json() == {"output": "cloudctl-guest: ready\n"}
    assert seen == {"host": "hv1", "instance_uuid": server["id"], "lines": 5}

    assert api.get(f"/api/v1/servers/{server['id']}/console-output/?lines=0").status_code == 400
    outbox.calls[contract.COMPUTE_CONSOLE_OUTPUT] = {"error": "InstanceNotFound",
                                                     "message": "no domain on hv1"}
    gone = api.get(f"/api/v1/servers/{server['id']}/console-output/")
    # Tenants read the host's id where a message names the host.
    hv1 = host_id(Instance.objects.get(uuid=server["id"]).project_id, "hv1")
    assert gone.status_code == 409 and gone.json()["detail"] == f"no domain on {hv1}"
    del outbox.calls[contract.COMPUTE_CONSOLE_OUTPUT]
    silent = api.get(f"/api/v1/servers/{server['id']}/console-output/")
    assert silent.status_code == 503 and "did not answer" in silent.json()["detail"]


def test_fault_details_are_for_admins(api, admin_api, flavors, image):
    server = create(api, name="a", flavor="m1.nano", image="tiny").json()
    schedule_instance(server["id"])  # no hosts at all
    mine = api.get(f"/api/v1/servers/{server['id']}/").json()
    assert mine["status"] == "ERROR" and mine["task_state"] is None
    assert mine["fault"]["message"].startswith("No valid host was found")
    assert mine["fault"]["details"] == ""
    admins = admin_api.get(f"/api/v1/servers/{server['id']}/").json()
    assert admins["fault"]["details"] == {"total_hosts": 0, "filters": []}


