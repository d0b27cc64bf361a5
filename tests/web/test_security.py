"""Auth hooks, HTTP Basic, and read-only mode on a login that has only the pgflow_reader role."""

from __future__ import annotations

import base64

import psycopg
import pytest

from pgflow.web import basic_auth
from tests.web.conftest import csrf_token


def _basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_an_auth_callable_decides_every_request(web):
    seen = []

    def allow_header(request):
        seen.append(request.url.path)
        return request.headers.get("x-team") == "ops"

    client = web(auth=allow_header)
    for path in ("/", "/runs", "/api/runs", "/static/app.css"):
        assert client.get(path).status_code == 403, path
        assert client.get(path, headers={"x-team": "ops"}).status_code == 200, path
    assert "/static/app.css" in seen


def test_an_async_auth_callable_is_awaited(web):
    async def allow(request):
        return request.query_params.get("pass") == "1"

    client = web(auth=allow)
    assert client.get("/runs").status_code == 403
    assert client.get("/runs?pass=1").status_code == 200


def test_a_post_refused_by_auth_changes_nothing(web, dsn, history):
    client = web(auth=lambda request: request.method == "GET")
    token = csrf_token(client)
    response = client.post(f"/runs/{history.sleeping}/cancel", data={"csrf": token, "confirmed": "yes"})
    assert response.status_code == 403
    with psycopg.connect(dsn) as c:
        assert not c.execute("select cancel_requested from pgflow.runs where id = %s",
                             (history.sleeping,)).fetchone()[0]


def test_basic_auth_asks_for_credentials_and_compares_them(web):
    client = web(auth=basic_auth("ana", "s3cret:x"))
    missing = client.get("/runs")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith('Basic realm="pgflow"')
    assert client.get("/runs", headers=_basic("ana", "wrong")).status_code == 401
    assert client.get("/runs", headers=_basic("bob", "s3cret:x")).status_code == 401
    assert client.get("/runs", headers={"authorization": "Basic !!!"}).status_code == 401
    assert client.get("/runs", headers={"authorization": "Bearer x"}).status_code == 401
    assert client.get("/runs", headers=_basic("ana", "s3cret:x")).status_code == 200


@pytest.mark.parametrize(("user", "password"), [("", "p"), ("a:b", "p"), ("a", "")])
def test_basic_auth_refuses_unusable_credentials(user, password):
    with pytest.raises(ValueError):
        basic_auth(user, password)


def test_auth_must_be_callable(dsn):
    from pgflow.web import create_app
    with pytest.raises(TypeError, match="auth must be a callable"):
        create_app(dsn, auth="ana:secret")  # type: ignore[arg-type]


def test_read_only_mode_serves_every_page_as_pgflow_reader(web, dsn, reader_dsn, history):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("select pgflow.create_schedule(id => 'nightly', workflow => 'wf',"
                  " cron => '0 3 * * *', next_fire_at => now() + interval '1 day')")
    with psycopg.connect(reader_dsn) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("select pgflow.cancel(%s)", (history.sleeping,))
    client = web(reader_dsn, read_only=True)
    pages = ["/", "/runs", "/runs?status=pending", "/runs?q=order-1", "/schedules", "/queues",
             "/workers", "/api/runs", *(f"/runs/{r}" for r in history.all()),
             *(f"/api/runs/{r}" for r in history.all())]
    for path in pages:
        response = client.get(path)
        assert response.status_code in (200, 303), (path, response.text[:500])
    assert "nightly" in client.get("/schedules").text
    assert "queue payments is paused" in client.get(f"/runs/{history.held}").text


def test_an_action_on_a_reader_login_is_a_clear_message(web, reader_dsn, history):
    """Without --read-only, the database still refuses the reader: one message, no traceback."""
    client = web(reader_dsn)
    token = csrf_token(client)
    response = client.post(f"/runs/{history.sleeping}/cancel", data={"csrf": token, "confirmed": "yes"})
    page = client.get(response.headers["location"]).text
    assert "permission denied" in page and "pgflow_reader reads them" in page


def test_read_only_transactions_refuse_writes(dsn):
    from pgflow.web.db import Database
    db = Database(dsn, read_only=True)
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            db.call(lambda conn: conn.execute("select pgflow.pause_queue('default')"))
    finally:
        db.close()


def test_an_unreachable_database_is_one_message(web):
    client = web("postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=1")
    client.app.state.site.db.wait = 0.5  # seconds a request waits for a connection
    page = client.get("/runs")
    assert page.status_code == 503
    assert "cannot connect to the database" in page.text
    api = client.get("/api/runs")
    assert api.status_code == 503 and "cannot connect" in api.json()["error"]


def test_a_database_without_the_schema_is_one_message(web, empty_dsn):
    page = web(empty_dsn).get("/runs")
    assert page.status_code == 503
    assert "the pgflow schema is not installed: run `pgflow migrate` first" in page.text
