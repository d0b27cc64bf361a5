"""Dashboard tier: ``pgflow.web`` over HTTP (Starlette's TestClient) and in a real browser.

``web`` builds a dashboard on the test's database and returns a TestClient
whose lifespan has run (the pool is open); ``history`` fills the database
with runs in every state through the engine's own procedures.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from starlette.testclient import TestClient

from pgflow.web import create_app
from tests.web import scenarios

CSRF_INPUT = re.compile(r'name="csrf-token" content="([^"]+)"')


@pytest.fixture
def web(dsn: str) -> Iterator[Callable[..., TestClient]]:
    """``web(**create_app options)``: a TestClient on the test's database (lifespan entered)."""
    clients: list[TestClient] = []

    def make(target: str | None = None, **options: Any) -> TestClient:
        client = TestClient(create_app(target or dsn, **options), follow_redirects=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(web: Callable[..., TestClient]) -> TestClient:
    return web()


@pytest.fixture
def reader_dsn(dsn: str, server_dsn: str) -> Iterator[str]:
    """A login that holds pgflow_reader and nothing else."""
    role = f"pgflow_web_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'create role "{role}" login')
        admin.execute(f'grant pgflow_reader to "{role}"')
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'drop role "{role}"')


@pytest.fixture
def history(dsn: str) -> scenarios.History:
    return scenarios.make_history(dsn)


def csrf_token(client: TestClient, path: str = "/runs") -> str:
    """The token the forms of ``path`` carry (the page also sets the browser's cookie)."""
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = CSRF_INPUT.search(page.text)
    assert found, "no csrf field on the page"
    return found.group(1)


def post(client: TestClient, path: str, data: dict[str, str] | None = None, *,
         confirmed: bool = True, token: str | None = None) -> Any:
    """POST a dashboard form as the page's script would send it."""
    fields = {"csrf": token if token is not None else csrf_token(client), **(data or {})}
    if confirmed:
        fields["confirmed"] = "yes"
    return client.post(path, data=fields)


def flash(client: TestClient, response: Any) -> str:
    """The one-line message shown on the page a POST redirected to."""
    assert response.status_code == 303, (response.status_code, response.text[:2000])
    page = client.get(response.headers["location"])
    found = re.search(r'<p class="flash (ok|error)"[^>]*>(.*?)</p>', page.text, re.S)
    assert found, "no message on the page"
    return f"{found.group(1)}: {found.group(2)}"
