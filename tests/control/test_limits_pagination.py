"""Every list is paged as Nova's (``limit``, ``marker``), the body still a plain array, the next page
in an RFC 8288 ``Link`` header; lists written by hand included."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from cloudctl.compute.models import Aggregate, Host, InstanceAction
from cloudctl.images.models import Image, ImageStatus, Visibility
from cloudctl.network.models import Network
from tests.control.conftest import Outbox, active_server, client_for, heartbeat, make_user

pytestmark = pytest.mark.django_db

NEXT = re.compile(r'^<([^>]+)>; rel="next"$')


def next_link(response: Any) -> str | None:
    header = response.get("Link")
    if header is None:
        return None
    match = NEXT.match(header)
    assert match, header
    return match.group(1)


def walk(client: APIClient, url: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Every item of a list, following the Link header to the end; and each page's size."""
    items: list[dict[str, Any]] = []
    sizes: list[int] = []
    current: str | None = url
    while current is not None:
        response = client.get(current)
        assert response.status_code == 200, response.content
        page = response.json()
        assert isinstance(page, list)  # the body stays an array
        items += page
        sizes.append(len(page))
        current = next_link(response)
        assert len(sizes) < 100, "the next links never end"
    return items, sizes


def public_images(count: int, name_of: Any = lambda i: f"img-{i % 7}") -> list[Image]:
    """Many images at once; few names and one creation second, so the ordering (name, created) ties
    and only the primary key makes it total."""
    now = timezone.now()
    images = [Image(name=name_of(i), disk_format="qcow2", status=ImageStatus.ACTIVE,
                    visibility=Visibility.PUBLIC, created=now) for i in range(count)]
    Image.objects.bulk_create(images)
    Image.objects.update(created=now)
    return images


def test_2500_items_come_in_pages_and_the_links_reach_each_exactly_once(api: APIClient) -> None:
    created = {str(image.id) for image in public_images(2500)}
    items, sizes = walk(api, "/api/v1/images/")
    assert sizes == [1000, 1000, 500]  # API_LIST_DEFAULT_LIMIT
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids)) == 2500 and set(ids) == created
    # The pages keep the list's own order (name, then created, then id).
    assert [item["name"] for item in items] == sorted(item["name"] for item in items)

    small, sizes = walk(api, "/api/v1/images/?limit=999")
    assert sizes == [999, 999, 502] and [item["id"] for item in small] == ids


def test_the_link_keeps_the_query_and_is_absent_on_the_last_page(api: APIClient) -> None:
    public_images(5)
    first = api.get("/api/v1/images/?limit=2&foo=bar")
    link = next_link(first)
    assert link is not None and link.startswith("http://testserver/api/v1/images/?")
    assert "limit=2" in link and "foo=bar" in link and f"marker={first.json()[1]['id']}" in link
    last = api.get(f"/api/v1/images/?limit=2&marker={api.get('/api/v1/images/').json()[2]['id']}")
    assert len(last.json()) == 2 and "Link" not in last
    assert "Link" not in api.get("/api/v1/images/?limit=5")  # exactly one page: no next
    assert "X-Total-Count" not in first


def test_a_limit_above_the_maximum_is_clamped(api: APIClient, settings: Any) -> None:
    settings.API_LIST_MAX_LIMIT = 3
    public_images(5)
    response = api.get("/api/v1/images/?limit=1000000")
    assert response.status_code == 200 and len(response.json()) == 3
    assert "limit=3" in next_link(response)  # type: ignore[operator]
    settings.API_LIST_DEFAULT_LIMIT = 2
    assert len(api.get("/api/v1/images/").json()) == 2


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1.5", " 2", "1e3"])
def test_a_limit_that_is_not_a_positive_integer_is_400(api: APIClient, limit: str) -> None:
    response = api.get("/api/v1/images/", {"limit": limit})
    assert response.status_code == 400
    assert response.json() == {"limit": [f"{limit!r} is not a positive integer"]}


def test_a_marker_that_names_no_item_is_400(api: APIClient, other_project: Any) -> None:
    public_images(3)
    missing = str(uuid.uuid4())
    response = api.get("/api/v1/images/", {"marker": missing})
    assert response.status_code == 400 and response.json() == {"marker": [f"no item with id {missing!r}"]}
    assert api.get("/api/v1/images/", {"marker": "not-a-uuid"}).status_code == 400
    # Another project's private image is no marker either: its place in the list is not told.
    theirs = Image.objects.create(name="secret", disk_format="qcow2", owner=other_project,
                                  status=ImageStatus.ACTIVE)
    assert api.get("/api/v1/images/", {"marker": str(theirs.id)}).status_code == 400
    # An integer primary key (migrations, server actions) refuses a word the same way.
    assert api.get("/api/v1/flavors/", {"marker": "x"}).status_code == 400


def test_a_filtered_list_is_paged_after_the_filter(api: APIClient, project: Any) -> None:
    networks = Network.objects.bulk_create(
        [Network(name="wanted" if i % 3 == 0 else "other", project=project, mtu=1450,
                 provider_type="flat") for i in range(30)])
    wanted = {str(n.id) for n in networks if n.name == "wanted"}
    items, sizes = walk(api, "/api/v1/networks/?name=wanted&limit=4")
    assert sizes == [4, 4, 2]
    assert [item["id"] for item in items] and {item["id"] for item in items} == wanted
    assert len(items) == len(wanted)
    # A marker that left the filter between two pages still marks the place.
    other = next(n for n in sorted(networks, key=lambda n: (n.created, n.id)) if n.name == "other")
    after = api.get(f"/api/v1/networks/?name=wanted&marker={other.id}")
    assert after.status_code == 200
    assert all(item["name"] == "wanted" for item in after.json())


def test_hosts_are_marked_by_name_and_zones_by_name(admin_api: APIClient, api: APIClient) -> None:
    for name in ("hv-c", "hv-a", "hv-b"):
        heartbeat(name)
    first = admin_api.get("/api/v1/hosts/?limit=2")
    assert [h["name"] for h in first.json()] == ["hv-a", "hv-b"]
    assert "marker=hv-b" in next_link(first)  # type: ignore[operator]
    rest = admin_api.get(next_link(first))  # type: ignore[arg-type]
    assert [h["name"] for h in rest.json()] == ["hv-c"] and "Link" not in rest
    assert admin_api.get("/api/v1/hosts/?marker=hv-zzz").status_code == 400

    for zone in ("az-1", "az-2", "az-3"):
        Aggregate.objects.create(name=f"agg-{zone}", availability_zone=zone)
    zones, sizes = walk(api, "/api/v1/availability-zones/?limit=2")
    assert [z["name"] for z in zones] == ["az-1", "az-2", "az-3", "nova"] and sizes == [2, 2]
    assert api.get("/api/v1/availability-zones/?marker=nowhere").json() == {
        "marker": ["no item with id 'nowhere'"]}
    assert Host.objects.count() == 3


def test_a_servers_actions_are_paged_newest_first(api: APIClient, outbox: Outbox, flavors: Any,
                                                  image: Any) -> None:
    server = active_server(api, outbox)
    start = timezone.now()
    InstanceAction.objects.bulk_create([
        InstanceAction(instance=server, action="reboot", request_id=f"req-{i}",
                       start_time=start + timezone.timedelta(seconds=i // 2)) for i in range(9)])
    whole = api.get(f"/api/v1/servers/{server.uuid}/actions/").json()
    assert len(whole) == 10  # the create and the nine reboots
    items, sizes = walk(api, f"/api/v1/servers/{server.uuid}/actions/?limit=3")
    assert sizes == [3, 3, 3, 1] and items == whole
    assert api.get(f"/api/v1/servers/{server.uuid}/actions/?limit=0").status_code == 400
    migrations = api.get(f"/api/v1/servers/{server.uuid}/migrations/?limit=x")
    assert migrations.status_code == 400 and "limit" in migrations.json()


def test_a_tenant_pages_through_its_own_items_only(project: Any, other_project: Any) -> None:
    mine = client_for(make_user("pager", project))
    Network.objects.bulk_create([Network(name=f"n{i}", project=p, mtu=1450, provider_type="flat")
                                 for i in range(6) for p in (project, other_project)])
    items, _ = walk(mine, "/api/v1/networks/?limit=2")
    assert len(items) == 6 and {n["project"] for n in items} == {"blue"}


def test_servers_filtered_by_status_are_paged_after_the_filter(api: APIClient, outbox: Outbox,
                                                               flavors: Any, image: Any) -> None:
    from cloudctl.compute.models import Instance

    ids = [api.post("/api/v1/servers/", {"name": f"s{i}", "flavor": "m1.nano", "image": "tiny"},
                    format="json").json()["id"] for i in range(9)]
    active, stopped, rebooting = ids[:5], ids[5:7], ids[7:8]
    Instance.objects.filter(uuid__in=active).update(vm_state="active", task_state=None)
    Instance.objects.filter(uuid__in=stopped).update(vm_state="stopped", task_state=None)
    Instance.objects.filter(uuid__in=rebooting).update(vm_state="active", task_state="rebooting")
    items, sizes = walk(api, "/api/v1/servers/?status=ACTIVE&limit=2")
    assert sizes == [2, 2, 1] and sorted(s["id"] for s in items) == sorted(active)
    assert {s["status"] for s in items} == {"ACTIVE"}
    assert [s["id"] for s in walk(api, "/api/v1/servers/?status=shutoff")[0]] == [
        s["id"] for s in api.get("/api/v1/servers/").json() if s["id"] in stopped]
    assert [s["id"] for s in api.get("/api/v1/servers/?status=REBOOT").json()] == rebooting
    assert [s["id"] for s in api.get("/api/v1/servers/?status=BUILD").json()] == [ids[8]]
    refused = api.get("/api/v1/servers/?status=RUNNING")
    assert refused.status_code == 400 and "ACTIVE" in refused.json()["status"][0]
    # A server is shown whatever the list's filter.
    assert api.get(f"/api/v1/servers/{stopped[0]}/?status=ACTIVE").status_code == 200


@pytest.mark.parametrize("ordering", [("project", "name"), ("-segmentation_id",),
                                      ("segmentation_id", "-name"), ("-project__name", "-created")])
def test_any_field_ordering_pages_each_item_once(project: Any, other_project: Any,
                                                 ordering: tuple[str, ...]) -> None:
    """The keyset follows the list's ordering, relations and NULLs (flat networks have no
    segmentation id) included, in both directions."""
    from django.test import RequestFactory
    from rest_framework.request import Request

    from cloudctl.api import MarkerPagination

    Network.objects.bulk_create(
        [Network(name=f"n{i % 4}", project=(project, other_project)[i % 2], mtu=1450,
                 provider_type="flat" if i % 3 else "vxlan", segmentation_id=None if i % 3 else 1000 + i)
         for i in range(23)])
    everything = list(Network.objects.order_by(*ordering, "pk").values_list("pk", flat=True))
    seen: list[Any] = []
    marker: str | None = None
    while True:
        query = {"limit": "4", **({"marker": marker} if marker else {})}
        paginator = MarkerPagination()
        page = paginator.paginate_queryset(Network.objects.order_by(*ordering),
                                           Request(RequestFactory().get("/networks/", query)))
        seen += [network.pk for network in page]
        marker = paginator.next_marker
        if marker is None:
            break
    assert len(seen) == len(set(seen)) == 23
    if not any(key.lstrip("-") == "segmentation_id" for key in ordering):
        assert seen == everything  # same order as the database's (NULLs placed apart otherwise)
