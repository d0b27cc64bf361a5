"""Client calls on a Django connection, inside ``transaction.atomic()``, and the example app.

Django is configured once per process, with the example project's settings
(``examples/django_app``); each test points Django's ``default`` connection at
its own fresh database (the ``dsn`` fixture) and runs the app's migrations there,
as Django's own test runner does when it creates a test database.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgflow

django = pytest.importorskip("django")

from django.db import DatabaseError, connection, connections, transaction  # noqa: E402

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "django_app"


@pytest.fixture(scope="session")
def shop(server_dsn: str) -> Any:
    """The example project, set up: its ``settings`` module (Django reads it once a process)."""
    if str(EXAMPLE_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLE_DIR))
    os.environ["DJANGO_SETTINGS_MODULE"] = "shop.settings"
    saved = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = server_dsn  # replaced by each test's database below
    try:
        django.setup()
    finally:
        if saved is None:
            del os.environ["DATABASE_URL"]
        else:
            os.environ["DATABASE_URL"] = saved
    from django.test.utils import setup_test_environment

    setup_test_environment()  # the test client's host is allowed
    import shop.settings

    return shop.settings


@pytest.fixture
def db(shop: Any, dsn: str) -> Iterator[Any]:
    """Django's ``default`` connection, on this test's database, with the app migrated."""
    from django.core.management import call_command

    default = connections["default"]
    default.close()
    default.settings_dict.update(shop.database_settings(dsn))
    call_command("migrate", verbosity=0)
    yield default
    default.close()


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    return conn.execute(f"select count(*) from {table}").fetchone()[0]


class Boom(Exception):
    pass


@pgflow.workflow(name="django_refund")
def refund(ctx: pgflow.Context, order_id: int) -> None:
    return None


def test_atomic_that_raises_after_start_leaves_no_run(db, conn):
    from orders.workflows import fulfil_order

    with pytest.raises(Boom), transaction.atomic():
        pgflow.start(connection, fulfil_order, 1)
        assert _count(conn, "pgflow.runs") == 0  # not visible before the commit
        raise Boom
    assert _count(conn, "pgflow.runs") == 0


def test_savepoint_rolled_back_takes_its_run_only(db, conn):
    from orders.workflows import fulfil_order

    with transaction.atomic():
        kept = pgflow.start(connections["default"], fulfil_order, 1)
        with pytest.raises(Boom), transaction.atomic():
            pgflow.start(connection, fulfil_order, 2)
            raise Boom
    assert [row[0] for row in conn.execute("select id from pgflow.runs")] == [kept]


def test_atomic_that_commits_starts_a_run_that_completes(db, conn, inprocess_worker):
    from orders.models import Order
    from orders.workflows import fulfil_order

    with transaction.atomic():
        order = Order.objects.create(item="book", quantity=1)
        run_id = pgflow.start(connection, fulfil_order, order.id)
    inprocess_worker.start([fulfil_order])
    # Outside atomic() the Django connection is in autocommit: result() can wait on it.
    assert pgflow.result(connection, run_id, timeout=60) == "shipped"
    order.refresh_from_db()
    assert order.status == "shipped"
    run = pgflow.get(connection, run_id)
    assert (run.status, run.input, run.output) == ("completed", [order.id], "shipped")
    assert [step.name for step in run.steps] == ["mark_paid", "mark_shipped"]
    assert run.created_at.tzinfo is not None


def test_client_calls_through_the_django_connection(db, conn):
    from orders.workflows import fulfil_order

    with transaction.atomic():
        run_id = pgflow.start(connection, fulfil_order, 7, key="order:7")
        # Django reads jsonb as text for its own fields; pgflow's values come back decoded.
        assert pgflow.get(connection, run_id).input == [7]
        assert pgflow.start(connection, fulfil_order, 7, key="order:7") == run_id
    pgflow.signal(connection, run_id, "approved", {"by": "ana"})
    assert conn.execute("select count(*) from pgflow.signals where run_id = %s",
                        (run_id,)).fetchone()[0] == 1
    assert pgflow.get_state(connection, run_id, "progress") is None
    assert pgflow.cancel(connections["default"], run_id) is True
    assert pgflow.get(connection, run_id).status in ("cancelling", "cancelled")
    info = pgflow.set_queue(connection, "orders", concurrency=3)
    assert info.concurrency == 3


def test_pgflow_errors_are_pgflow_exceptions_not_django_ones(db, conn):
    from orders.workflows import fulfil_order

    missing = uuid.uuid4()
    with pytest.raises(pgflow.RunNotFound):
        pgflow.get(connection, missing)
    with pytest.raises(pgflow.RunNotFound) as raised:
        pgflow.retry(connection, missing)  # raised by the database, wrapped by Django
    assert not isinstance(raised.value, DatabaseError)
    run_id = pgflow.start(connection, fulfil_order, 1)
    with pytest.raises(pgflow.RunStateError):
        pgflow.retry(connection, run_id)
    with pytest.raises(pgflow.WorkflowNotFound, match="nobody_knows"):
        pgflow.start(connection, "nobody_knows")
    # In atomic(), the failed statement breaks the transaction, which then rolls back.
    with pytest.raises(pgflow.KeyConflict, match="shared-key"), transaction.atomic():
        pgflow.start(connection, fulfil_order, 2, key="shared-key")
        pgflow.start(connection, refund, 2, key="shared-key")
    assert [row[0] for row in conn.execute("select id from pgflow.runs")] == [run_id]


def test_a_django_connection_to_another_database_is_refused(db):
    from django.db.utils import ConnectionHandler

    lite = ConnectionHandler({"default": {"ENGINE": "django.db.backends.sqlite3",
                                          "NAME": ":memory:"}})["default"]
    with pytest.raises(TypeError, match=r"PostgreSQL.*'default'.*sqlite"):
        pgflow.start(lite, "fulfil_order", 1)
    lite.close()
    with pytest.raises(TypeError, match="use the sync client"):
        import asyncio

        from pgflow import aio

        asyncio.run(aio.start(connection, "fulfil_order", 1))


# -- the example app's view, through Django's test client -----------------------

def _post(client: Any, body: Any) -> Any:
    return client.post("/orders", data=json.dumps(body), content_type="application/json")


def test_view_creates_the_order_and_its_run_together(db, conn, inprocess_worker):
    from django.test import Client
    from orders.workflows import fulfil_order

    client = Client()
    response = _post(client, {"item": "lamp", "quantity": 2})
    assert response.status_code == 201, response.content
    body = response.json()
    order = conn.execute("select item, quantity, run_id from orders_order where id = %s",
                         (body["id"],)).fetchone()
    assert order == ("lamp", 2, uuid.UUID(body["run_id"]))
    run = pgflow.get(conn, body["run_id"])
    assert (run.name, run.input, run.key) == ("fulfil_order", [body["id"]], f"order:{body['id']}")

    inprocess_worker.start([fulfil_order])
    assert pgflow.result(conn, body["run_id"], timeout=60) == "shipped"
    shown = client.get(f"/orders/{body['id']}").json()
    assert (shown["status"], shown["run_status"]) == ("shipped", "completed")


def test_a_request_failing_after_the_start_creates_neither(db, conn):
    from django.test import Client

    def fail_on_the_run_id(execute, sql, params, many, context):
        if sql.startswith('UPDATE "orders_order"'):
            raise DatabaseError("the database went away")
        return execute(sql, params, many, context)

    client = Client(raise_request_exception=False)
    with connection.execute_wrapper(fail_on_the_run_id):
        response = _post(client, {"item": "lamp", "quantity": 2})
    assert response.status_code == 500
    assert _count(conn, "orders_order") == 0
    assert _count(conn, "pgflow.runs") == 0


@pytest.mark.parametrize(("body", "error"), [
    ("not json", "the body must be JSON"),
    ([1, 2], "the body must be a JSON object"),
    ({"quantity": 1}, "item must be a non-empty string"),
    ({"item": "lamp", "quantity": 0}, "quantity must be a positive integer"),
    ({"item": "lamp", "quantity": True}, "quantity must be a positive integer"),
])
def test_a_bad_order_is_one_clear_error_and_creates_nothing(db, conn, body, error):
    from django.test import Client

    data = body if isinstance(body, str) else json.dumps(body)
    response = Client().post("/orders", data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"].startswith(error)
    assert _count(conn, "orders_order") == 0
    assert _count(conn, "pgflow.runs") == 0
