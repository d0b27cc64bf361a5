"""A FastAPI application mounting the dashboard at /ops/pgflow behind its own auth callable."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from pgflow.web import create_app

PREFIX = "/ops/pgflow"


def host_app(dsn: str) -> FastAPI:
    def staff_only(request: Request) -> bool:
        return request.cookies.get("session") == "staff"

    dashboard = create_app(dsn, auth=staff_only)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with dashboard.router.lifespan_context(dashboard):  # opens and closes its pool
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/")
    def home() -> dict[str, str]:
        return {"app": "orders"}

    app.mount(PREFIX, dashboard)
    return app


@pytest.fixture
def host(dsn: str) -> Iterator[TestClient]:
    with TestClient(host_app(dsn), follow_redirects=False) as client:
        yield client


def test_the_host_app_keeps_its_own_routes(host):
    assert host.get("/").json() == {"app": "orders"}


def test_unauthenticated_requests_are_refused(host, history):
    for path in ("/", "/runs", f"/runs/{history.completed}", "/api/runs", "/static/app.css"):
        assert host.get(PREFIX + path).status_code == 403, path


def test_every_link_and_form_stays_under_the_prefix(host, history):
    host.cookies.set("session", "staff")
    for path in ("/", "/runs", f"/runs/{history.waiting}", f"/runs/{history.failed}", "/queues",
                 "/schedules", "/workers"):
        page = host.get(PREFIX + path)
        assert page.status_code == 200, path
        targets = re.findall(r'(?:href|src|action|data-poll)="(/[^"]*)"', page.text)
        assert targets, path
        outside = [t for t in targets if not t.startswith(PREFIX + "/")]
        assert outside == [], (path, outside)
        for target in set(targets):
            if "/runs/" in target and target.endswith(("/cancel", "/retry", "/signal")):
                continue  # forms: POST only
            if target.startswith(PREFIX + "/queues/") or target.startswith(PREFIX + "/schedules/"):
                continue
            response = host.get(target.replace("&amp;", "&"))
            assert response.status_code in (200, 303), (path, target, response.status_code)


def test_an_action_works_under_the_prefix(host, dsn, history):
    host.cookies.set("session", "staff")
    page = host.get(f"{PREFIX}/runs/{history.sleeping}")
    token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    assert page.headers["set-cookie"].count(f"Path={PREFIX}") == 1
    response = host.post(f"{PREFIX}/runs/{history.sleeping}/cancel",
                         data={"csrf": token, "confirmed": "yes"})
    assert response.status_code == 303
    assert response.headers["location"] == f"{PREFIX}/runs/{history.sleeping}"
    assert "cancellation of run" in host.get(response.headers["location"]).text
    with psycopg.connect(dsn) as c:
        assert c.execute("select cancel_requested from pgflow.runs where id = %s",
                         (history.sleeping,)).fetchone()[0]


def test_search_redirects_under_the_prefix(host, history):
    host.cookies.set("session", "staff")
    response = host.get(f"{PREFIX}/runs?q=order-1")
    assert response.headers["location"] == f"{PREFIX}/runs/{history.completed}"
