"""Every admin route of a real ``kamiyo serve`` refuses a request without the right token: 401, logged."""

from __future__ import annotations

from pathlib import Path

import pytest

from admin.app_client import ADMIN_TOKEN
from e2e.harness import KamiyoServer, wait_until
from kamiyo.web.admin import ENDPOINTS, admin_routes
from support import make_settings

pytestmark = pytest.mark.slow

# Each admin route with the method it serves (path parameters filled in), the page routes first.
ROUTES = [
    ("GET", "/admin"),
    ("HEAD", "/admin"),
    ("POST", "/admin/login"),
    ("GET", "/admin/login"),
    ("POST", "/admin/logout"),
    *[(e.operation.method, e.operation.path.replace("{event_id}", "evt_any")) for e in ENDPOINTS],
    ("GET", "/admin/not-a-route"),
    ("DELETE", "/admin/api/health"),  # a method the route does not serve: still 401 first
]
WRONG = [
    pytest.param({}, id="no-credentials"),
    pytest.param({"Authorization": "Bearer not-the-admin-token-000"}, id="wrong-token"),
    pytest.param({"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, id="token-prefix"),
    pytest.param({"Authorization": f"Basic {ADMIN_TOKEN}"}, id="not-bearer"),
    pytest.param({"Authorization": "Bearer"}, id="empty-bearer"),
    pytest.param({"Cookie": "kamiyo_admin=v1.1700000000.YW5u.forged"}, id="forged-cookie"),
]


@pytest.fixture
def server(console_server: KamiyoServer) -> KamiyoServer:
    return console_server


def test_the_parametrized_routes_cover_every_admin_route_the_app_serves() -> None:
    """So that a route added later cannot escape the refusal test below."""
    served = {route.path for route in admin_routes(make_settings("sqlite://", admin_token=ADMIN_TOKEN), {})}
    listed = {path.replace("evt_any", "{event_id}") for _method, path in ROUTES}
    assert served - {"/admin/{rest:path}"} <= listed
    assert "/admin/not-a-route" in listed


@pytest.mark.parametrize("headers", WRONG)
@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_an_admin_request_without_the_right_token_is_refused_with_401_and_logged(
    server: KamiyoServer, method: str, path: str, headers: dict[str, str]
) -> None:
    needles = ("admin unauthorized", f"method={method} path={path} ")
    logged_before = len(server.log_lines(*needles))
    response = server.http.request(method, path, headers=headers, content=b"")
    assert response.status_code == 401
    if method != "HEAD":
        assert ADMIN_TOKEN not in response.text
    assert "set-cookie" not in response.headers
    wait_until(lambda: len(server.log_lines(*needles)) == logged_before + 1, timeout=5, what="one log line")


def test_the_right_token_is_accepted_on_the_page_and_the_api(server: KamiyoServer) -> None:
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert server.http.get("/admin", headers=bearer).status_code == 200
    assert server.http.get("/admin/api/deliveries", headers=bearer).status_code == 200
    assert server.http.get("/admin/not-a-route", headers=bearer).status_code == 404


def test_the_admin_token_never_appears_in_the_log(server: KamiyoServer) -> None:
    server.http.get("/admin/api/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    server.http.get(f"/admin/{ADMIN_TOKEN}")  # even pasted into a path
    server.http.post("/admin/login", data={"token": ADMIN_TOKEN + "x"})
    assert server.wait_for_log("admin unauthorized", "path=/admin/[token]")
    assert ADMIN_TOKEN not in server.log()


def test_a_too_short_admin_token_stops_kamiyo_serve_at_start_naming_the_setting(tmp_path: Path) -> None:
    server = KamiyoServer(tmp_path, f"sqlite:///{tmp_path / 'kamiyo.db'}", KAMIYO_ADMIN_TOKEN="short-secret")
    result = server.cli("serve", timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "KAMIYO_ADMIN_TOKEN" in output
    assert "short-secret" not in output
