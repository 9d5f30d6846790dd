"""Projects, roles and tokens: a request acts in one project with one role; tokens expire, are stored
hashed, can be revoked, and die with a password change, a disabled user or a disabled project; failed
logins are throttled (API and admin); the admin API manages projects, users and roles."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from cloudctl.identity import services
from cloudctl.identity.models import LoginAttempt, Project, RoleAssignment, Token
from tests.control.conftest import active_server, client_for, make_user
from tests.control.test_openapi import _api_routes

pytestmark = pytest.mark.django_db

TOKEN = "/api/v1/auth/token/"
GOOD_PASSWORD = "correct-horse-battery-9"


def login(username: str, password: str = "pw", **extra: Any) -> Any:
    return APIClient().post(TOKEN, {"username": username, "password": password, **extra},
                            format="json")


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    return client


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``clock(seconds)`` moves the time every identity check reads by that much."""
    real_now = timezone.now
    offset = [timedelta(0)]
    monkeypatch.setattr(timezone, "now", lambda: real_now() + offset[0])

    def advance(seconds: float) -> None:
        offset[0] += timedelta(seconds=seconds)

    return advance


# --- roles and scope ---------------------------------------------------------------------------------

def test_a_reader_lists_and_shows_but_may_not_act(project, flavors, image, outbox):
    member_api = client_for(make_user("alice", project))
    server = active_server(member_api, outbox)
    reader = client_for(make_user("rita", project, role="reader"))
    listed = reader.get("/api/v1/servers/")
    assert listed.status_code == 200 and [s["id"] for s in listed.json()] == [str(server.uuid)]
    assert reader.get(f"/api/v1/servers/{server.uuid}/").status_code == 200
    refused = reader.post("/api/v1/servers/", {"name": "x", "flavor": "m1.nano", "image": "tiny"},
                          format="json")
    assert refused.status_code == 403
    assert refused.json()["detail"] == ("your role in project blue is reader: it may list and show, "
                                        "not POST")
    network = reader.post("/api/v1/networks/", {"name": "n"}, format="json")
    assert network.status_code == 403 and "reader" in network.json()["detail"]
    assert reader.delete(f"/api/v1/servers/{server.uuid}/").status_code == 403
    assert reader.get("/api/v1/networks/").status_code == 200


def test_a_request_sees_only_the_project_its_token_is_scoped_to(project, other_project, flavors,
                                                               image, outbox):
    alice = make_user("alice", project)
    services.role_assign(user=alice, project=other_project)
    in_blue = active_server(client_for(alice, project), outbox, name="in-blue")
    in_green = active_server(client_for(alice, other_project), outbox, name="in-green")
    blue_view = client_for(alice, project)
    assert [s["name"] for s in blue_view.get("/api/v1/servers/").json()] == ["in-blue"]
    assert blue_view.get(f"/api/v1/servers/{in_green.uuid}/").status_code == 404
    green_view = client_for(alice, other_project)
    assert [s["name"] for s in green_view.get("/api/v1/servers/").json()] == ["in-green"]
    assert green_view.get(f"/api/v1/servers/{in_blue.uuid}/").status_code == 404
    # The token answer says which project; the default is the first assignment.
    assert login("alice").json()["project"] == {"id": project.pk, "name": "blue"}
    assert login("alice", project="green").json()["project"] == {"id": other_project.pk,
                                                                  "name": "green"}
    assert login("alice", project=other_project.pk).json()["project"]["name"] == "green"


def test_the_admin_role_sees_every_project(project, other_project, flavors, image, outbox, admin_api):
    active_server(client_for(make_user("alice", project)), outbox, name="a")
    active_server(client_for(make_user("bob", other_project)), outbox, name="b")
    assert sorted(s["name"] for s in admin_api.get("/api/v1/servers/").json()) == ["a", "b"]
    assert admin_api.get("/api/v1/hosts/").status_code == 200


def test_is_staff_without_the_admin_role_is_no_administrator(project, flavors, image, outbox):
    staff = get_user_model().objects.create_user("sam", password="pw", is_staff=True,
                                                 is_superuser=True)
    services.role_assign(user=staff, project=project, role="member")
    answer = login("sam").json()
    assert answer["is_admin"] is False and answer["roles"] == ["member", "reader"]
    api = bearer(answer["token"])
    assert api.get("/api/v1/hosts/").status_code == 403
    assert api.post("/api/v1/flavors/", {"name": "big", "vcpus": 8, "memory_mb": 8192,
                                         "root_gb": 10}, format="json").status_code == 403
    active_server(client_for(make_user("bob", Project.objects.create(name="other"))), outbox)
    assert api.get("/api/v1/servers/").json() == []
    assert not services.is_admin(staff)


def test_the_admin_role_counts_only_in_its_project(project, other_project):
    """Admin in one project, member in another: a cloud administrator only with a token of the
    first (Keystone's scoped tokens)."""
    boss = make_user("boss", project, admin=True)
    services.role_assign(user=boss, project=other_project, role="member")
    assert login("boss", project="blue").json()["is_admin"] is True
    as_member = login("boss", project="green").json()
    assert as_member["is_admin"] is False and as_member["roles"] == ["member", "reader"]
    assert bearer(as_member["token"]).get("/api/v1/users/").status_code == 403


def test_no_role_in_the_project_asked_is_403_with_the_reason(project, other_project, member):
    refused = login("alice", project="green")
    assert refused.status_code == 403
    assert refused.json()["detail"] == "user alice has no role in project green"
    assert login("alice", project="nowhere").status_code == 403


def test_a_user_without_any_role_gets_no_token(db):
    get_user_model().objects.create_user("loner", password="pw")
    refused = login("loner")
    assert refused.status_code == 403 and "no role in any enabled project" in refused.json()["detail"]


def test_a_removed_role_stops_the_token_at_once(project, member):
    api = client_for(member)
    RoleAssignment.objects.filter(user=member).delete()
    refused = api.get("/api/v1/servers/")
    assert refused.status_code == 401
    assert refused.json()["detail"] == "user no longer has a role in project blue"


# --- tokens --------------------------------------------------------------------------------------------

def test_the_token_answer(project, member, settings):
    settings.TOKEN_TTL = 3600
    before = timezone.now()
    answer = login("alice")
    after = timezone.now()
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"token", "expires_at", "project", "roles", "user", "is_admin"}
    assert body["user"] == "alice" and body["is_admin"] is False
    assert body["project"] == {"id": project.pk, "name": "blue"}
    assert body["roles"] == ["member", "reader"]
    expires = Token.objects.get().expires_at
    # Issued within the request (password hashing makes it last a while on a loaded machine).
    assert before + timedelta(seconds=3600) <= expires <= after + timedelta(seconds=3600)
    assert body["expires_at"].startswith(expires.strftime("%Y-%m-%dT%H:%M:%S"))
    assert bearer(body["token"]).get("/api/v1/servers/").status_code == 200


def test_tokens_are_stored_hashed(project, member):
    secret = login("alice").json()["token"]
    token = Token.objects.get()
    assert token.digest == hashlib.sha256(secret.encode()).hexdigest()
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM identity_token")
        rows = cursor.fetchall()
    assert rows and not any(secret in str(value) for row in rows for value in row)
    # A client that presents the digest instead of the secret gets nowhere.
    assert bearer(token.digest).get("/api/v1/servers/").status_code == 401


def test_a_token_expires(project, member, settings, clock):
    settings.TOKEN_TTL = 60
    api = bearer(login("alice").json()["token"])
    clock(59)
    assert api.get("/api/v1/servers/").status_code == 200
    clock(2)
    expired = api.get("/api/v1/servers/")
    assert expired.status_code == 401 and expired.json()["detail"] == "token expired"
    assert expired.headers["WWW-Authenticate"] == "Token"


def test_delete_revokes_the_token_it_is_sent_with(project, member):
    first, second = login("alice").json()["token"], login("alice").json()["token"]
    assert bearer(first).delete(TOKEN).status_code == 204
    revoked = bearer(first).get("/api/v1/servers/")
    assert revoked.status_code == 401 and revoked.json()["detail"] == "token revoked"
    assert bearer(second).get("/api/v1/servers/").status_code == 200  # only that one
    assert APIClient().delete(TOKEN).status_code == 401


def test_a_stale_token_header_does_not_stop_a_login(project, member):
    stale = bearer("not-a-token")
    assert stale.post(TOKEN, {"username": "alice", "password": "pw"}, format="json").status_code == 200


def test_a_password_change_revokes_the_users_tokens(project, member, other_project):
    other = make_user("bob", other_project)
    mine, bobs = client_for(member), client_for(other)
    member.set_password("a-new-password-77")
    member.save()
    refused = mine.get("/api/v1/servers/")
    assert refused.status_code == 401 and refused.json()["detail"] == "token revoked"
    assert bobs.get("/api/v1/servers/").status_code == 200
    fresh = bearer(login("alice", "a-new-password-77").json()["token"])
    member.email = "alice@example.org"
    member.save()  # another change revokes nothing
    assert fresh.get("/api/v1/servers/").status_code == 200


def test_a_disabled_user_loses_its_tokens_and_gets_no_new_one(project, member, admin_api):
    api = client_for(member)
    changed = admin_api.patch(f"/api/v1/users/{member.pk}/", {"is_active": False}, format="json")
    assert changed.status_code == 200 and changed.json()["is_active"] is False
    assert api.get("/api/v1/servers/").status_code == 401
    assert login("alice").status_code == 401
    assert Token.objects.filter(user=member, revoked_at__isnull=True).count() == 0


def test_a_disabled_project_stops_its_tokens_and_refuses_new_ones(project, member, admin_api):
    api = client_for(member)
    changed = admin_api.patch(f"/api/v1/projects/{project.pk}/", {"enabled": False}, format="json")
    assert changed.status_code == 200 and changed.json()["enabled"] is False
    refused = api.get("/api/v1/servers/")
    assert refused.status_code == 401
    refused_login = login("alice", project="blue")
    assert refused_login.status_code == 403 and refused_login.json()["detail"] == "project blue is disabled"
    assert admin_api.patch(f"/api/v1/projects/{project.pk}/", {"enabled": True},
                           format="json").status_code == 200
    assert login("alice").status_code == 200


def test_an_admin_may_not_disable_its_own_project_or_user(admin, admin_api):
    own_project = services.project_id_of(admin)
    refused = admin_api.patch(f"/api/v1/projects/{own_project}/", {"enabled": False}, format="json")
    assert refused.status_code == 400 and "enabled" in refused.json()
    refused = admin_api.patch(f"/api/v1/users/{admin.pk}/", {"is_active": False}, format="json")
    assert refused.status_code == 400 and "is_active" in refused.json()


# --- brute force ---------------------------------------------------------------------------------------

def test_the_eleventh_failed_login_in_a_minute_gets_429(project, member, other_project, clock):
    make_user("bob", other_project)
    for _ in range(10):
        assert login("alice", "wrong").status_code == 401
    throttled = login("alice", "wrong")
    assert throttled.status_code == 429
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert "too many failed logins for user 'alice'" in throttled.json()["detail"]
    assert login("alice", "pw").status_code == 429  # even the right password: no more guesses
    assert login("bob", "pw").status_code == 200  # another user is not concerned
    clock(61)
    assert login("alice", "pw").status_code == 200
    assert not LoginAttempt.objects.filter(username="alice").exists()  # success forgets them


def test_retry_after_counts_from_the_oldest_failure_in_the_window(project, member, clock):
    login("alice", "wrong")
    clock(30)
    for _ in range(9):
        login("alice", "wrong")
    throttled = login("alice", "wrong")
    # The first failure leaves the window 60 s after it: 30 s after the others began (each password
    # check takes real time too).
    assert throttled.status_code == 429 and 20 <= int(throttled.headers["Retry-After"]) <= 30


def test_the_throttle_is_counted_in_the_database(project, member):
    """Rows, not a process's memory: what one web worker counted, another sees."""
    now = timezone.now()
    LoginAttempt.objects.bulk_create([LoginAttempt(username="alice", at=now) for _ in range(10)])
    assert login("alice", "pw").status_code == 429


def test_the_admin_login_is_throttled_too(project, admin):
    admin.set_password(GOOD_PASSWORD)
    admin.save()
    browser = Client()
    for _ in range(10):
        page = browser.post("/admin/login/", {"username": "root", "password": "wrong"})
        assert page.status_code == 200 and b"Please enter the correct" in page.content
    throttled = browser.post("/admin/login/", {"username": "root", "password": GOOD_PASSWORD})
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) >= 1
    assert login("root", GOOD_PASSWORD).status_code == 429  # one count for both doors
    LoginAttempt.objects.all().delete()
    ok = browser.post("/admin/login/", {"username": "root", "password": GOOD_PASSWORD})
    assert ok.status_code == 302


# --- anonymous requests --------------------------------------------------------------------------------

def test_anonymous_flavors_are_401(flavors):
    assert APIClient().get("/api/v1/flavors/").status_code == 401


ANONYMOUS_ALLOWED = {"/api/v1/auth/token/"}


def _resolvable(path: str) -> str:
    """The route with its parameters filled so that the URL resolves (ids are integers or uuids)."""
    from itertools import product

    from django.urls import Resolver404, resolve

    parts = path.split("{}")
    for values in product(("1", "6f1c1b8e-3f5a-4c2e-9d7a-0b1e2c3d4e5f"), repeat=len(parts) - 1):
        url = parts[0] + "".join(value + part for value, part in zip(values, parts[1:], strict=True))
        try:
            resolve(url)
        except Resolver404:
            continue
        return url
    raise AssertionError(f"no value resolves {path}")


def test_no_api_route_answers_an_anonymous_request(flavors, image):
    """Every route of the API but the token endpoint (the schema and docs are not in the list)."""
    client = APIClient()
    refused = {}
    for path, methods in _api_routes().items():
        if path in ANONYMOUS_ALLOWED:
            continue
        url = _resolvable(path)
        for method in methods:
            answer = getattr(client, method)(url, {}, format="json")
            if answer.status_code != 401:
                refused[f"{method.upper()} {url}"] = answer.status_code
    assert not refused, f"answered without a token: {refused}"


# --- the admin API -------------------------------------------------------------------------------------

def test_admins_manage_projects(admin_api):
    created = admin_api.post("/api/v1/projects/", {"name": "red", "description": "the red team"},
                             format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["name"] == "red" and body["enabled"] is True
    duplicate = admin_api.post("/api/v1/projects/", {"name": "red"}, format="json")
    assert duplicate.status_code == 400
    assert duplicate.json() == {"name": ["a project named 'red' already exists"]}
    assert admin_api.post("/api/v1/projects/", {}, format="json").json() == {
        "name": ["This field is required."]}
    assert admin_api.post("/api/v1/projects/", {"name": 7}, format="json").status_code == 400
    unknown = admin_api.patch(f"/api/v1/projects/{body['id']}/", {"colour": "red"}, format="json")
    assert unknown.status_code == 400 and unknown.json() == {"colour": ["unknown field"]}
    renamed = admin_api.patch(f"/api/v1/projects/{body['id']}/", {"name": "crimson"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["name"] == "crimson"
    assert admin_api.get(f"/api/v1/projects/{body['id']}/").json()["description"] == "the red team"
    assert "crimson" in [p["name"] for p in admin_api.get("/api/v1/projects/").json()]


def test_admins_manage_users_and_their_passwords_are_validated(admin_api, project):
    weak = admin_api.post("/api/v1/users/", {"username": "carol", "password": "12345"}, format="json")
    assert weak.status_code == 400
    reasons = weak.json()["password"]
    assert "This password is too short. It must contain at least 8 characters." in reasons
    assert "This password is too common." in reasons
    assert "This password is entirely numeric." in reasons
    similar = admin_api.post("/api/v1/users/", {"username": "carolinex", "password": "carolinex1"},
                             format="json")
    assert similar.status_code == 400
    assert any("too similar to the username" in r for r in similar.json()["password"])
    bad_name = admin_api.post("/api/v1/users/", {"username": "no spaces", "password": GOOD_PASSWORD},
                              format="json")
    assert bad_name.status_code == 400 and "username" in bad_name.json()
    bad_mail = admin_api.post("/api/v1/users/", {"username": "carol", "password": GOOD_PASSWORD,
                                                 "email": "nope"}, format="json")
    assert bad_mail.status_code == 400 and "email" in bad_mail.json()
    created = admin_api.post("/api/v1/users/", {"username": "carol", "password": GOOD_PASSWORD,
                                                "email": "carol@example.org"}, format="json")
    assert created.status_code == 201, created.content
    carol = created.json()
    assert carol["roles"] == [] and carol["is_active"] is True and "password" not in carol
    again = admin_api.post("/api/v1/users/", {"username": "carol", "password": GOOD_PASSWORD},
                           format="json")
    assert again.status_code == 400 and again.json() == {"username": ["a user named 'carol' already exists"]}
    # No role yet: no token; with one, a token of that project.
    assert login("carol", GOOD_PASSWORD).status_code == 403
    added = admin_api.post(f"/api/v1/projects/{project.pk}/members/",
                           {"user": "carol", "role": "reader"}, format="json")
    assert added.status_code == 201 and added.json()["role"] == "reader"
    assert added.json()["user"] == {"id": carol["id"], "username": "carol"}
    assert login("carol", GOOD_PASSWORD).json()["roles"] == ["reader"]
    promoted = admin_api.post(f"/api/v1/projects/{project.pk}/members/",
                              {"user": carol["id"], "role": "member"}, format="json")
    assert promoted.status_code == 201
    assert admin_api.get(f"/api/v1/users/{carol['id']}/").json()["roles"] == [
        {"project": {"id": project.pk, "name": "blue"}, "role": "member"}]
    members = admin_api.get(f"/api/v1/projects/{project.pk}/members/").json()
    assert [(m["user"]["username"], m["role"]) for m in members] == [("carol", "member")]
    bad_role = admin_api.post(f"/api/v1/projects/{project.pk}/members/",
                              {"user": "carol", "role": "owner"}, format="json")
    assert bad_role.status_code == 400 and "role" in bad_role.json()
    nobody = admin_api.post(f"/api/v1/projects/{project.pk}/members/", {"user": "nobody"},
                            format="json")
    assert nobody.status_code == 400 and nobody.json() == {"user": ["no user with id or username 'nobody'"]}
    weak_change = admin_api.patch(f"/api/v1/users/{carol['id']}/", {"password": "abc"}, format="json")
    assert weak_change.status_code == 400 and "password" in weak_change.json()
    rename = admin_api.patch(f"/api/v1/users/{carol['id']}/", {"username": "x"}, format="json")
    assert rename.status_code == 400 and rename.json() == {"username": ["cannot be changed after creation"]}
    token = login("carol", GOOD_PASSWORD).json()["token"]
    changed = admin_api.patch(f"/api/v1/users/{carol['id']}/", {"password": "another-good-one-42"},
                              format="json")
    assert changed.status_code == 200
    assert bearer(token).get("/api/v1/servers/").json()["detail"] == "token revoked"
    removed = admin_api.delete(f"/api/v1/projects/{project.pk}/members/carol/")
    assert removed.status_code == 204
    assert admin_api.get(f"/api/v1/projects/{project.pk}/members/").json() == []
    assert admin_api.delete(f"/api/v1/projects/{project.pk}/members/carol/").status_code == 400
    assert admin_api.delete(f"/api/v1/projects/{project.pk}/members/ghost/").status_code == 404


def test_members_see_only_their_projects_and_nothing_else_of_the_admin_api(project, other_project,
                                                                           api):
    Project.objects.create(name="elsewhere")
    listed = api.get("/api/v1/projects/")
    assert listed.status_code == 200 and [p["name"] for p in listed.json()] == ["blue"]
    assert api.get(f"/api/v1/projects/{project.pk}/").status_code == 200
    assert api.get(f"/api/v1/projects/{other_project.pk}/").status_code == 404
    for method, url, body in [
        ("post", "/api/v1/projects/", {"name": "mine"}),
        ("patch", f"/api/v1/projects/{project.pk}/", {"enabled": False}),
        ("get", f"/api/v1/projects/{project.pk}/members/", None),
        ("post", f"/api/v1/projects/{project.pk}/members/", {"user": "alice", "role": "admin"}),
        ("delete", f"/api/v1/projects/{project.pk}/members/alice/", None),
        ("get", "/api/v1/users/", None),
        ("post", "/api/v1/users/", {"username": "x", "password": GOOD_PASSWORD}),
    ]:
        answer = getattr(api, method)(url, body, format="json")
        assert answer.status_code == 403, (method, url, answer.status_code)
    assert RoleAssignment.objects.get(user__username="alice").role == "member"


# --- the Django admin ----------------------------------------------------------------------------------

def test_the_django_admin_lists_tokens_without_their_secret_and_revokes(project, member, admin):
    secret = login("alice").json()["token"]
    browser = Client()
    browser.force_login(admin)
    page = browser.get("/admin/identity/token/")
    assert page.status_code == 200
    content = page.content.decode()
    assert "alice" in content and secret not in content
    assert Token.objects.get().digest not in content
    token = Token.objects.get()
    assert secret not in browser.get(f"/admin/identity/token/{token.pk}/change/").content.decode()
    browser.post("/admin/identity/token/", {"action": "revoke", "_selected_action": [token.pk]})
    assert bearer(secret).get("/api/v1/servers/").json()["detail"] == "token revoked"


def test_the_django_admin_shows_and_edits_roles(project, member, admin):
    browser = Client()
    browser.force_login(admin)
    page = browser.get(f"/admin/identity/project/{project.pk}/change/")
    assert page.status_code == 200 and b"alice" in page.content
    user_page = browser.get(f"/admin/auth/user/{member.pk}/change/")
    assert user_page.status_code == 200 and b"role_assignments" in user_page.content


# --- bootstrap and the data migration ------------------------------------------------------------------

def test_bootstrap_gives_the_admin_the_admin_role_and_the_demo_user_the_member_role(
        db, outbox, monkeypatch, capsys):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    monkeypatch.setenv("CLOUDCTL_ADMIN_PASSWORD", "12345")
    with pytest.raises(CommandError, match="CLOUDCTL_ADMIN_PASSWORD: This password is too short"):
        call_command("bootstrap")
    monkeypatch.setenv("CLOUDCTL_ADMIN_PASSWORD", GOOD_PASSWORD)
    monkeypatch.delenv("CLOUDCTL_DEMO_PASSWORD", raising=False)
    call_command("bootstrap", "--demo-user")
    call_command("bootstrap", "--demo-user")  # again: nothing changes
    out = capsys.readouterr().out
    [generated] = [line.rsplit(": ", 1)[1] for line in out.splitlines()
                   if line.startswith("created user 'demo'")]
    admin_answer = login("admin", GOOD_PASSWORD).json()
    assert admin_answer["is_admin"] is True and admin_answer["project"]["name"] == "admin"
    demo_answer = login("demo", generated).json()
    assert demo_answer["is_admin"] is False and demo_answer["project"]["name"] == "demo"
    assert demo_answer["roles"] == ["member", "reader"]
    assert RoleAssignment.objects.count() == 2


def test_the_data_migration_turns_memberships_into_roles(transactional_db):
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    before = [("identity", "0001_initial")]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    user_model = old.get_model("auth", "User")
    old_project = old.get_model("identity", "Project")
    membership = old.get_model("identity", "Membership")
    blue = old_project.objects.create(name="blue")
    ops = old_project.objects.create(name="ops")
    membership.objects.create(user=user_model.objects.create(username="alice"), project=blue)
    membership.objects.create(user=user_model.objects.create(username="root", is_staff=True),
                              project=ops)
    user_model.objects.create(username="nobody")
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    roles = {(a.user.username, a.project.name, a.role)
             for a in RoleAssignment.objects.select_related("user", "project")}
    assert roles == {("alice", "blue", "member"), ("root", "ops", "admin")}
    assert "identity_membership" not in connection.introspection.table_names()
    assert "authtoken_token" not in connection.introspection.table_names()


def test_concurrent_guesses_get_no_more_than_the_limit(transactional_db, settings):
    """Each attempt is stored before its password is checked and counted against the earlier ones:
    a burst from many web workers gets exactly LOGIN_FAILURE_LIMIT password checks."""
    from tests.control.conftest import run_concurrently

    settings.LOGIN_FAILURE_LIMIT = 5
    make_user("alice", Project.objects.create(name="blue"))
    answers = run_concurrently(lambda _: login("alice", "wrong").status_code, list(range(12)))
    assert sorted(answers) == [401] * 5 + [429] * 7


def test_disabling_a_project_in_the_django_admin_revokes_its_tokens(project, member, admin):
    api = client_for(member)
    browser = Client()
    browser.force_login(admin)
    [assignment] = RoleAssignment.objects.filter(project=project)
    page = browser.post(f"/admin/identity/project/{project.pk}/change/", {
        "name": "blue", "description": "",  # "enabled" unchecked
        "role_assignments-TOTAL_FORMS": "1", "role_assignments-INITIAL_FORMS": "1",
        "role_assignments-MIN_NUM_FORMS": "0", "role_assignments-MAX_NUM_FORMS": "1000",
        "role_assignments-0-id": str(assignment.pk), "role_assignments-0-project": str(project.pk),
        "role_assignments-0-user": str(member.pk), "role_assignments-0-role": "reader",
    })
    assert page.status_code == 302, page.content.decode()[:2000]
    project.refresh_from_db()
    assert project.enabled is False
    assert RoleAssignment.objects.get(pk=assignment.pk).role == "reader"
    assert api.get("/api/v1/servers/").status_code == 401
    assert not Token.objects.filter(project=project, revoked_at__isnull=True).exists()
