"""Quotas: GET/PATCH /api/v1/quotas/<project>/, GET /api/v1/limits/, and every creation refused at
its limit with 403 quota_exceeded (counted from the resources: deleting frees)."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from cloudctl.compute.models import Instance, Migration
from cloudctl.errors import QuotaExceeded
from cloudctl.identity.models import Project
from cloudctl.images.models import Image, ImageStatus
from cloudctl.images.services import image_create, image_upload
from cloudctl.network.models import Port
from cloudctl.quotas.models import ProjectQuota
from cloudctl.quotas.resources import NAMES
from cloudctl.quotas.services import quota_usage
from tests.control.conftest import Outbox, active_server, client_for, make_user

pytestmark = pytest.mark.django_db

API = "/api/v1"


def create(api: APIClient, name: str = "s", flavor: str = "m1.nano", **body: Any) -> Any:
    return api.post(f"{API}/servers/", {"name": name, "flavor": flavor, "image": "tiny", **body},
                    format="json")


def set_limits(project: Project, **limits: int) -> None:
    for resource, limit in limits.items():
        ProjectQuota.objects.update_or_create(project=project, resource=resource,
                                              defaults={"limit": limit})


def refused(response: Any, resource: str, *, requested: int, in_use: int, limit: int) -> None:
    assert response.status_code == 403, response.content
    body = response.json()
    assert {k: body[k] for k in ("code", "resource", "requested", "in_use", "limit")} == {
        "code": "quota_exceeded", "resource": resource, "requested": requested, "in_use": in_use,
        "limit": limit}
    assert f"quota exceeded for {resource}" in body["detail"]


# --- the API ---------------------------------------------------------------------------------------


def test_member_reads_its_own_quotas_with_defaults_and_usage(api, project, flavors, image, settings):
    settings.QUOTA_INSTANCES = 7
    assert create(api).status_code == 202
    answer = api.get(f"{API}/quotas/{project.name}/")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body["project"] == {"id": project.pk, "name": "blue"}
    assert set(body["quotas"]) == set(NAMES)
    assert body["quotas"]["instances"] == {"limit": 7, "in_use": 1}
    assert body["quotas"]["cores"] == {"limit": 20, "in_use": 1}
    assert body["quotas"]["ram"] == {"limit": 51200, "in_use": 128}
    assert api.get(f"{API}/quotas/{project.pk}/").json() == body, "by id as by name"


def test_member_cannot_read_another_projects_quotas(api, other_project):
    assert api.get(f"{API}/quotas/{other_project.name}/").status_code == 404
    assert api.get(f"{API}/quotas/{other_project.pk}/").status_code == 404
    assert api.get(f"{API}/quotas/nowhere/").status_code == 404


def test_admin_reads_any_project(admin_api, project):
    answer = admin_api.get(f"{API}/quotas/{project.name}/")
    assert answer.status_code == 200 and answer.json()["project"]["name"] == "blue"


def test_quotas_need_a_token(project):
    assert APIClient().get(f"{API}/quotas/{project.name}/").status_code == 401
    assert APIClient().get(f"{API}/limits/").status_code == 401


def test_admin_patch_changes_limits(admin_api, api, project):
    answer = admin_api.patch(f"{API}/quotas/{project.name}/", {"instances": 20, "ram": -1},
                             format="json")
    assert answer.status_code == 200, answer.content
    assert answer.json()["quotas"]["instances"] == {"limit": 20, "in_use": 0}
    assert answer.json()["quotas"]["ram"]["limit"] == -1
    assert api.get(f"{API}/quotas/blue/").json()["quotas"]["instances"]["limit"] == 20
    assert dict(ProjectQuota.objects.filter(project=project).values_list("resource", "limit")) == {
        "instances": 20, "ram": -1}


@pytest.mark.parametrize(("body", "field", "reason"), [
    ({"widgets": 3}, "widgets", "no quota resource 'widgets'"),
    ({"instances": -2}, "instances", "-1 (unlimited) or more"),
    ({"instances": "ten"}, "instances", "an integer"),
    ({"instances": True}, "instances", "an integer"),
    ({"instances": 1.5}, "instances", "an integer"),
    ({"image_bytes": 2**63}, "image_bytes", "at most 9223372036854775807"),
    ({}, "non_field_errors", "at least one resource"),
    ([1, 2], "non_field_errors", "at least one resource"),
])
def test_patch_refuses_bad_limits_naming_the_field(admin_api, project, body, field, reason):
    answer = admin_api.patch(f"{API}/quotas/{project.name}/", body, format="json")
    assert answer.status_code == 400, answer.content
    assert reason in answer.json()[field][0]
    assert not ProjectQuota.objects.exists()


def test_member_cannot_patch(api, project, other_project):
    assert api.patch(f"{API}/quotas/{project.name}/", {"instances": 99}, format="json").status_code == 403
    assert api.patch(f"{API}/quotas/{other_project.name}/", {"instances": 99},
                     format="json").status_code == 403
    assert not ProjectQuota.objects.exists()


def test_limits_of_the_callers_project_with_novas_names(api, project, flavors, image):
    set_limits(project, instances=4)
    assert create(api, flavor="m1.tiny").status_code == 202
    answer = api.get(f"{API}/limits/")
    assert answer.status_code == 200
    body = answer.json()
    assert body["project"]["name"] == "blue"
    assert body["quotas"]["instances"] == {"limit": 4, "in_use": 1}
    absolute = body["absolute"]
    assert (absolute["maxTotalInstances"], absolute["totalInstancesUsed"]) == (4, 1)
    assert (absolute["maxTotalCores"], absolute["totalCoresUsed"]) == (20, 1)
    assert (absolute["maxTotalRAMSize"], absolute["totalRAMUsed"]) == (51200, 512)
    assert absolute["maxServerGroups"] == 10 and absolute["totalServerGroupsUsed"] == 0


# --- servers ---------------------------------------------------------------------------------------


def test_instances_quota_refuses_at_the_limit_and_deleting_frees(api, project, flavors, image):
    set_limits(project, instances=2)
    first, second = create(api, "a"), create(api, "b")
    assert first.status_code == second.status_code == 202
    refused(create(api, "c"), "instances", requested=1, in_use=2, limit=2)
    assert Instance.objects.count() == 2 and not Port.objects.exists()
    assert api.delete(f"{API}/servers/{first.json()['id']}/").status_code == 204  # on no host yet
    assert Instance.objects.get(uuid=first.json()["id"]).vm_state == "deleted"
    assert create(api, "c").status_code == 202, "a deleted server no longer counts"
    assert quota_usage(project)["instances"]["in_use"] == 2


def test_error_servers_count_until_deleted(api, project, flavors, image):
    set_limits(project, instances=1)
    made = create(api, "a").json()
    Instance.objects.filter(uuid=made["id"]).update(vm_state="error", task_state=None)
    refused(create(api, "b"), "instances", requested=1, in_use=1, limit=1)


def test_cores_and_ram_quotas_count_the_flavor(api, project, flavors, image):
    set_limits(project, cores=3)
    assert create(api, "a", flavor="m1.medium").status_code == 202  # 2 vCPUs
    refused(create(api, "b", flavor="m1.medium"), "cores", requested=2, in_use=2, limit=3)
    assert create(api, "b", flavor="m1.tiny").status_code == 202
    set_limits(project, cores=-1, ram=4096 + 512 + 1024)
    refused(create(api, "c", flavor="m1.small"), "ram", requested=2048, in_use=4608, limit=5632)


def test_quotas_are_per_project(api, project, other_project, flavors, image):
    set_limits(project, instances=1)
    assert create(api, "a").status_code == 202
    other = client_for(make_user("bob", other_project))
    assert create(other, "b").status_code == 202
    assert create(other, "c").status_code == 202


def test_server_groups_and_their_members(api, project, flavors, image):
    set_limits(project, server_groups=1, server_group_members=2)
    group = api.post(f"{API}/server-groups/", {"name": "g", "policy": "anti-affinity"}, format="json")
    assert group.status_code == 201, group.content
    second = api.post(f"{API}/server-groups/", {"name": "h", "policy": "affinity"}, format="json")
    refused(second, "server_groups", requested=1, in_use=1, limit=1)
    hints = {"scheduler_hints": {"group": group.json()["id"]}}
    assert create(api, "a", **hints).status_code == 202
    assert create(api, "b", **hints).status_code == 202
    answer = create(api, "c", **hints)
    refused(answer, "server_group_members", requested=1, in_use=2, limit=2)
    assert "server group's limit" in answer.json()["detail"]
    assert create(api, "c").status_code == 202, "outside the group the members' limit is not involved"
    assert quota_usage(project)["server_group_members"]["in_use"] == 2


def resize(api: APIClient, server: Instance, flavor: str) -> Any:
    return api.post(f"{API}/servers/{server.uuid}/resize/", {"flavor": flavor}, format="json")


def test_resize_counts_the_new_flavor(api, project, flavors, image, outbox: Outbox):
    server = active_server(api, outbox)  # m1.nano: 1 vCPU, 128 MiB
    set_limits(project, cores=2)
    refused(resize(api, server, "m1.large"), "cores", requested=3, in_use=1, limit=2)
    assert not Migration.objects.exists()
    server.refresh_from_db()
    assert (server.vm_state, server.task_state) == ("active", None)
    set_limits(project, cores=-1, ram=1000)
    refused(resize(api, server, "m1.small"), "ram", requested=1920, in_use=128, limit=1000)
    set_limits(project, cores=2, ram=-1)
    assert resize(api, server, "m1.medium").status_code == 202  # 2 vCPUs: within
    usage = quota_usage(project)
    assert usage["cores"]["in_use"] == 2, "a pending resize counts its larger flavor"
    assert usage["ram"]["in_use"] == 4096
    refused(create(api, "more"), "cores", requested=1, in_use=2, limit=2)


def test_resize_to_a_smaller_flavor_needs_no_quota(api, project, flavors, image, outbox: Outbox):
    server = active_server(api, outbox)
    Instance.objects.filter(uuid=server.uuid).update(vcpus=4, memory_mb=8192)
    server.refresh_from_db()
    set_limits(project, cores=1, ram=1)  # already over: lowered by an administrator
    assert resize(api, server, "m1.small").status_code == 202


# --- images ----------------------------------------------------------------------------------------


def test_images_quota(api, project):
    set_limits(project, images=1)
    made = api.post(f"{API}/images/", {"name": "a", "disk_format": "qcow2"}, format="json")
    assert made.status_code == 201, made.content
    refused(api.post(f"{API}/images/", {"name": "b", "disk_format": "qcow2"}, format="json"),
            "images", requested=1, in_use=1, limit=1)
    assert api.delete(f"{API}/images/{made.json()['id']}/").status_code == 204
    assert api.post(f"{API}/images/", {"name": "b", "disk_format": "qcow2"},
                    format="json").status_code == 201


def test_image_bytes_refused_before_reading_when_the_size_is_announced(api, project, small_qcow2):
    size = small_qcow2.stat().st_size
    set_limits(project, image_bytes=size - 1)
    made = api.post(f"{API}/images/", {"name": "a", "disk_format": "qcow2"}, format="json").json()
    answer = api.put(f"{API}/images/{made['id']}/file/", small_qcow2.read_bytes(),
                     content_type="application/octet-stream")
    refused(answer, "image_bytes", requested=size, in_use=0, limit=size - 1)
    assert Image.objects.get(pk=made["id"]).status == ImageStatus.QUEUED, "nothing was read"
    set_limits(project, image_bytes=size)
    answer = api.put(f"{API}/images/{made['id']}/file/", small_qcow2.read_bytes(),
                     content_type="application/octet-stream")
    assert answer.status_code == 200, answer.content
    assert quota_usage(project)["image_bytes"] == {"limit": size, "in_use": size}


def test_image_bytes_of_an_unannounced_upload_are_checked_when_it_activates(project, small_qcow2):
    size = small_qcow2.stat().st_size
    set_limits(project, image_bytes=size - 1)
    image = image_create(name="a", disk_format="qcow2", owner=project)
    with open(small_qcow2, "rb") as stream, pytest.raises(QuotaExceeded) as exceeded:
        image_upload(image=image, stream=stream, expected_size=None)
    assert (exceeded.value.requested, exceeded.value.in_use) == (size, 0)
    image.refresh_from_db()
    assert image.status == ImageStatus.KILLED and "quota exceeded" in image.properties["failure"]
    from cloudctl.images.services import image_path
    assert image_path(image) is None, "the bytes are removed"
    assert quota_usage(project)["image_bytes"]["in_use"] == 0


# --- networks --------------------------------------------------------------------------------------


def post(api: APIClient, path: str, **body: Any) -> Any:
    return api.post(f"{API}/{path}/", body, format="json")


def test_networks_quota(api, project):
    set_limits(project, networks=1)
    assert post(api, "networks", name="a").status_code == 201
    refused(post(api, "networks", name="b"), "networks", requested=1, in_use=1, limit=1)


def test_ports_quota_counts_servers_ports_but_not_cloudctls_own(api, project, flavors, image):
    set_limits(project, ports=2)
    net = post(api, "networks", name="a").json()
    assert post(api, "subnets", network=net["id"], cidr="10.0.0.0/24").status_code == 201
    assert Port.objects.filter(device_owner="network:dhcp", project=project).count() == 1
    assert post(api, "ports", network=net["id"]).status_code == 201
    assert create(api, "s", networks=[{"network": net["id"]}]).status_code == 202
    assert quota_usage(project)["ports"]["in_use"] == 2, "the DHCP port is not counted"
    refused(post(api, "ports", network=net["id"]), "ports", requested=1, in_use=2, limit=2)
    refused(create(api, "t", networks=[{"network": net["id"]}]), "ports", requested=1, in_use=2, limit=2)
    assert Instance.objects.filter(name="t").count() == 0, "the server went with its refused port"


def test_security_groups_and_rules_quotas(api, project):
    set_limits(project, security_groups=1, security_group_rules=2)
    group = post(api, "security-groups", name="web")
    assert group.status_code == 201, group.content  # with its egress rule
    refused(post(api, "security-groups", name="db"), "security_groups", requested=1, in_use=1, limit=1)
    rule = post(api, "security-group-rules", security_group=group.json()["id"], direction="ingress",
                protocol="tcp", port_range_min=22, port_range_max=22)
    assert rule.status_code == 201, rule.content
    refused(post(api, "security-group-rules", security_group=group.json()["id"], direction="ingress",
                 protocol="tcp", port_range_min=80, port_range_max=80),
            "security_group_rules", requested=1, in_use=2, limit=2)
    assert api.delete(f"{API}/security-group-rules/{rule.json()['id']}/").status_code == 204
    assert post(api, "security-group-rules", security_group=group.json()["id"], direction="ingress",
                protocol="tcp", port_range_min=80, port_range_max=80).status_code == 201


def test_routers_and_floating_ips_quotas(api, admin_api, project, settings):
    settings.NETWORK_NODE_HOST = "hv1"
    net = post(admin_api, "networks", name="public", external=True, shared=True, provider_type="flat")
    assert net.status_code == 201, net.content
    assert post(admin_api, "subnets", network="public", cidr="172.24.4.0/24", enable_dhcp=False,
                allocation_pools=[{"start": "172.24.4.10", "end": "172.24.4.250"}]).status_code == 201
    set_limits(project, routers=1, floating_ips=1)
    assert post(api, "routers", name="r1", external_gateway="public").status_code == 201
    refused(post(api, "routers", name="r2"), "routers", requested=1, in_use=1, limit=1)
    fip = post(api, "floating-ips", network="public")
    assert fip.status_code == 201, fip.content
    refused(post(api, "floating-ips", network="public"), "floating_ips", requested=1, in_use=1, limit=1)
    usage = quota_usage(project)
    assert usage["ports"]["in_use"] == 0, "gateway and floating-IP ports are cloudctl's own"
    assert api.delete(f"{API}/floating-ips/{fip.json()['id']}/").status_code == 204
    assert post(api, "floating-ips", network="public").status_code == 201


# --- the Django admin ------------------------------------------------------------------------------


def test_admin_sets_a_limit_through_the_service(admin, project):
    from django.test import Client

    staff = Client()
    staff.force_login(admin)
    added = staff.post("/admin/quotas/projectquota/add/", {"project": project.pk, "resource": "cores",
                                                           "limit": "8"})
    assert added.status_code == 302, added.content.decode()[-2000:]
    quota = ProjectQuota.objects.get(project=project, resource="cores")
    assert quota.limit == 8
    page = staff.get(f"/admin/quotas/projectquota/{quota.pk}/change/")
    assert page.status_code == 200
    changed = staff.post(f"/admin/quotas/projectquota/{quota.pk}/change/", {"limit": "-1"})
    assert changed.status_code == 302, changed.content.decode()[-2000:]
    assert quota_usage(project)["cores"]["limit"] == -1
    bad = staff.post("/admin/quotas/projectquota/add/", {"project": project.pk, "resource": "cores",
                                                         "limit": "-5"})
    assert bad.status_code == 200 and ProjectQuota.objects.get(pk=quota.pk).limit == -1


def test_a_snapshot_needs_the_images_quota(api, project, flavors, image, outbox: Outbox):
    server = active_server(api, outbox)
    set_limits(project, images=0)
    refused(api.post(f"{API}/servers/{server.uuid}/snapshot/", {"name": "snap"}, format="json"),
            "images", requested=1, in_use=0, limit=0)
    server.refresh_from_db()
    assert (server.vm_state, server.task_state) == ("active", None)
    assert not Image.objects.filter(owner=project).exists()
    set_limits(project, images=1)
    assert api.post(f"{API}/servers/{server.uuid}/snapshot/", {"name": "snap"},
                    format="json").status_code == 202
