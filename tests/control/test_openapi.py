"""The OpenAPI schema: generated without a single warning, covering every route of the REST API,
and served (with Swagger UI) to anyone, token or not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.urls import URLPattern, URLResolver

from cloudctl import urls

REPO = Path(__file__).resolve().parents[2]
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
UNDOCUMENTED = {"/api/v1/schema/", "/api/v1/docs/"}


def _normalise(route: str) -> str:
    """A Django route or router regex as an OpenAPI path, every parameter written ``{}``."""
    route = route.replace("^", "").replace("$", "").replace("/?", "/")
    route = re.sub(r"\(\?P<\w+>[^)]*\)", "{}", route)  # router regex groups
    route = re.sub(r"<(?:\w+:)?\w+>", "{}", route)  # path converters
    return "/" + route


def _routes(patterns: list[Any], prefix: str = "") -> list[tuple[str, set[str]]]:
    """(path, HTTP methods) of every URL pattern, resolvers followed."""
    found = []
    for entry in patterns:
        if isinstance(entry, URLResolver):
            found += _routes(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            callback = entry.callback
            actions = getattr(callback, "actions", None)  # a viewset: its method -> action map
            if actions is not None:
                methods = set(actions) & set(HTTP_METHODS)  # HEAD is GET's, OPTIONS DRF's
            else:
                view_class = getattr(callback, "view_class", None)
                methods = {m for m in HTTP_METHODS if hasattr(view_class, m)}
            found.append((_normalise(prefix + str(entry.pattern)), methods))
    return found


def _api_routes() -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for path, methods in _routes(urls.urlpatterns):
        if path.startswith("/api/v1/") and path not in UNDOCUMENTED:
            routes.setdefault(path, set()).update(methods)
    return routes


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The schema as `manage.py spectacular` writes it; any warning fails the command."""
    tmp = tmp_path_factory.mktemp("openapi")
    target = tmp / "schema.json"
    env = {**os.environ, "CLOUDCTL_STATE_DIR": str(tmp / "state")}
    done = subprocess.run(
        [sys.executable, "manage.py", "spectacular", "--fail-on-warn", "--validate",
         "--format", "openapi-json", "--file", str(target)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"schema generation failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(target.read_text())


def test_route_discovery_sees_the_api() -> None:
    routes = _api_routes()
    assert routes["/api/v1/servers/{}/reboot/"] == {"post"}
    assert routes["/api/v1/images/{}/file/"] == {"get", "put"}
    assert routes["/api/v1/auth/token/"] == {"post", "delete"}
    assert routes["/api/v1/projects/"] == {"get", "post"}
    assert routes["/api/v1/projects/{}/"] == {"get", "patch"}
    assert routes["/api/v1/projects/{}/members/"] == {"get", "post"}
    assert routes["/api/v1/projects/{}/members/{}/"] == {"delete"}
    assert routes["/api/v1/users/"] == {"get", "post"}
    assert routes["/api/v1/users/{}/"] == {"get", "patch"}


def test_the_token_endpoint_is_documented(schema: dict[str, Any]) -> None:
    """Issuing needs no token (and says 429); the answer names the project and the roles; every
    other operation needs tokenAuth."""
    issue = schema["paths"]["/api/v1/auth/token/"]["post"]
    assert {"200", "401", "403", "429"} <= set(issue["responses"]) and not issue.get("security")
    answer = issue["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    fields = schema["components"]["schemas"][answer.rsplit("/", 1)[1]]["properties"]
    assert {"token", "expires_at", "project", "roles", "user", "is_admin"} <= set(fields)
    assert "204" in schema["paths"]["/api/v1/auth/token/"]["delete"]["responses"]
    assert {"tokenAuth": []} in schema["paths"]["/api/v1/flavors/"]["get"]["security"]
    assert {} not in schema["paths"]["/api/v1/flavors/"]["get"]["security"]  # no anonymous access


def test_every_api_route_and_method_is_documented(schema: dict[str, Any]) -> None:
    documented = {re.sub(r"\{\w+\}", "{}", path): {m for m in operations if m in HTTP_METHODS}
                  for path, operations in schema["paths"].items()}
    missing = {f"{method.upper()} {path}" for path, methods in _api_routes().items()
               for method in methods if method not in documented.get(path, set())}
    assert not missing, f"routes absent from the OpenAPI schema: {sorted(missing)}"


def test_server_actions_document_202_and_409(schema: dict[str, Any]) -> None:
    reboot = schema["paths"]["/api/v1/servers/{id}/reboot/"]["post"]
    assert {"202", "409"} <= set(reboot["responses"])
    conflict = reboot["responses"]["409"]["content"]["application/json"]["schema"]["$ref"]
    fields = schema["components"]["schemas"][conflict.rsplit("/", 1)[1]]["properties"]
    assert {"detail", "code", "status", "vm_state", "task_state"} <= set(fields)
    assert reboot["parameters"][0]["schema"] == {"type": "string", "format": "uuid"}


def test_server_create_documents_202_and_400(schema: dict[str, Any]) -> None:
    create = schema["paths"]["/api/v1/servers/"]["post"]
    assert {"202", "400"} <= set(create["responses"])
    body = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/ServerCreateRequest")


def test_a_body_of_another_media_type_is_documented_as_415(schema: dict[str, Any]) -> None:
    create = schema["paths"]["/api/v1/servers/"]["post"]["responses"]["415"]
    assert create["description"] == "The body is not application/json"
    assert create["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "detail" in schema["components"]["schemas"]["Error"]["properties"]
    upload = schema["paths"]["/api/v1/images/{id}/file/"]["put"]["responses"]["415"]
    assert upload["description"] == "The body is not application/octet-stream"
    assert "415" not in schema["paths"]["/api/v1/servers/"]["get"]["responses"]  # no body, no 415


def test_a_body_too_large_is_documented_as_413(schema: dict[str, Any]) -> None:
    create = schema["paths"]["/api/v1/servers/"]["post"]["responses"]["413"]
    assert "API_MAX_BODY_BYTES" in create["description"]
    upload = schema["paths"]["/api/v1/images/{id}/file/"]["put"]["responses"]["413"]
    assert "IMAGE_SIZE_CAP" in upload["description"]
    assert "413" not in schema["paths"]["/api/v1/servers/"]["get"]["responses"]


def test_a_json_parse_error_matches_the_documented_400(schema: dict[str, Any]) -> None:
    [by_field, parse_error] = schema["components"]["schemas"]["ValidationError"]["oneOf"]
    assert parse_error["required"] == ["detail"] and by_field["additionalProperties"]["oneOf"]


@pytest.mark.django_db
def test_the_documented_error_answers_are_what_the_api_says(client: Any, django_user_model: Any) -> None:
    user = django_user_model.objects.create_user("media", password="x")
    client.force_login(user)
    form = client.post("/api/v1/servers/", {"name": "x"})  # a form, not JSON
    assert form.status_code == 415 and "detail" in form.json()
    broken = client.post("/api/v1/servers/", "{not json", content_type="application/json")
    assert broken.status_code == 400 and list(broken.json()) == ["detail"]
    assert broken.json()["detail"].startswith("JSON parse error")


@pytest.mark.django_db
def test_a_path_that_matches_no_route_answers_json_under_the_api_only(api: Any, client: Any) -> None:
    """Django's own 404 (no URL pattern matched, e.g. an id with a dot) is the API's JSON error body
    under /api/, and stays the HTML page elsewhere (the admin)."""
    for path in ("/api/v1/aggregates/0.5/", "/api/v1/nothing-here/", "/api/v2/"):
        answer = api.get(path)
        assert answer.status_code == 404, path
        assert answer["Content-Type"] == "application/json" and answer.json() == {"detail": "Not found."}
    page = client.get("/no-such-page/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")


def test_every_operation_on_an_object_documents_its_404(schema: dict[str, Any]) -> None:
    for url, operations in schema["paths"].items():
        if "{" in url:
            for method, operation in operations.items():
                assert "404" in operation["responses"], f"{method.upper()} {url}"
    assert "404" not in schema["paths"]["/api/v1/servers/"]["get"]["responses"]


def test_image_data_is_binary(schema: dict[str, Any]) -> None:
    file = schema["paths"]["/api/v1/images/{id}/file/"]
    assert "application/octet-stream" in file["put"]["requestBody"]["content"]
    assert {"200", "206", "416"} <= set(file["get"]["responses"])
    assert "application/octet-stream" in file["get"]["responses"]["206"]["content"]


@pytest.mark.django_db
def test_schema_and_docs_need_no_token(client: Any) -> None:
    schema = client.get("/api/v1/schema/?format=json")
    assert schema.status_code == 200
    assert json.loads(schema.content)["info"]["title"] == "cloudctl"
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200
    assert "swagger" in docs.content.decode().lower()
    assert client.get("/api/v1/servers/").status_code == 401  # the API itself still needs one


def test_migration_requests_document_202_checking_and_no_preflight_409(schema: dict[str, Any]) -> None:
    """The checks run after the answer: 202 with the migration (status checking), 409 only for the
    server's state or host; the migration shows the refusal's check; an evacuation takes max_servers."""
    for path in ("live-migrate", "migrate", "resize"):
        operation = schema["paths"][f"/api/v1/servers/{{id}}/{path}/"]["post"]
        assert {"202", "409"} <= set(operation["responses"])
        # Its only 503 is every operation's database outage: no compute worker is waited for.
        assert "did not answer" not in operation["responses"]["503"]["description"]
        assert "`checking`" in operation["description"] and "`refused`" in operation["description"]
    conflict = schema["components"]["schemas"]["Conflict"]["properties"]
    assert "preflight_failed" not in json.dumps(conflict) and "check" not in conflict
    migration = schema["components"]["schemas"]["Migration"]["properties"]
    assert {"failed_check", "batch"} <= set(migration)
    assert {"checking", "refused"} <= set(_status_enum(schema))
    evacuate = schema["paths"]["/api/v1/hosts/{name}/live-migrate-servers/"]["post"]
    body = evacuate["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert schema["components"]["schemas"][body]["properties"]["max_servers"]["minimum"] == 1
    answer = evacuate["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    shown = schema["components"]["schemas"][answer]["properties"]
    assert {"host", "batch", "max_servers", "servers"} <= set(shown)


def _status_enum(schema: dict[str, Any]) -> list[str]:
    """The enumeration of the migration's status, whatever name drf-spectacular gave it."""
    ref = schema["components"]["schemas"]["Migration"]["properties"]["status"]
    ref = ref.get("$ref") or ref["allOf"][0]["$ref"]
    return list(schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["enum"])


def test_network_endpoints_document_their_conflicts(schema: dict[str, Any]) -> None:
    create = schema["paths"]["/api/v1/ports/"]["post"]
    assert {"201", "400", "409"} <= set(create["responses"])
    conflict = create["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert {"detail", "code", "port", "ports"} <= set(schema["components"]["schemas"][conflict]["properties"])
    assert "409" in schema["paths"]["/api/v1/networks/{id}/"]["delete"]["responses"]
    assert {"get", "post"} <= set(schema["paths"]["/api/v1/security-group-rules/"])


def _list_operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """path -> GET operation, of every GET that answers a JSON array."""
    found = {}
    for path, operations in schema["paths"].items():
        get = operations.get("get")
        body = (get or {}).get("responses", {}).get("200", {}).get("content", {}).get("application/json")
        if not body:
            continue
        shape = body["schema"]
        if "$ref" in shape:
            shape = schema["components"]["schemas"][shape["$ref"].rsplit("/", 1)[1]]
        if shape.get("type") == "array":
            found[path] = get
    return found


def test_every_list_documents_limit_marker_and_the_link(schema: dict[str, Any]) -> None:
    lists = _list_operations(schema)
    assert {"/api/v1/servers/", "/api/v1/availability-zones/", "/api/v1/servers/{id}/actions/",
            "/api/v1/servers/{id}/migrations/", "/api/v1/security-group-rules/"} <= set(lists)
    for path, operation in lists.items():
        parameters = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}
        assert {"limit", "marker"} <= set(parameters), path
        assert parameters["limit"]["schema"] == {"type": "integer", "minimum": 1}, path
        assert "Link" in operation["responses"]["200"]["headers"], path
        assert "400" in operation["responses"], path


@pytest.mark.django_db
def test_every_list_is_paged(schema: dict[str, Any], admin_api: Any, flavors: Any, image: Any,
                             outbox: Any) -> None:
    """Whatever the list (a ModelViewSet's, a ``list`` or an ``@action`` written by hand): its
    paginator reads the query, so a limit of 0 is refused. A list added without pagination fails
    here."""
    from cloudctl.identity.models import Project
    from tests.control.conftest import active_server

    server = active_server(admin_api, outbox)
    ids = {"/api/v1/projects/{id}/members/": str(Project.objects.get(name="admin").pk)}
    lists = _list_operations(schema)
    assert len(lists) >= 15
    for path in lists:
        url = path.replace("{id}", ids.get(path, str(server.uuid)))
        assert "{" not in url, f"{path}: give this test an id for it"
        response = admin_api.get(url, {"limit": "0"})
        assert response.status_code == 400 and "limit" in response.json(), (path, response.content)
        assert admin_api.get(url, {"limit": "1"}).status_code == 200, path
