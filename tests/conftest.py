"""Test fixtures: a real PostgreSQL, one fresh database a test.

The server is ``PGFLOW_TEST_DSN`` when set, else the embedded one under
``./.pgflow/``. A template database is migrated once per session; each test
gets a clone of it (``CREATE DATABASE ... TEMPLATE``, a few tens of ms).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from psycopg.conninfo import make_conninfo

from pgflow import embedded, schema
from tests.support import helpers

# Property tests (tests/properties/test_bad_input.py) run with a fixed budget and a fixed
# seed, so CI is reproducible and quick: derandomized examples, no deadline
# (a shared, busy server makes timings meaningless), and the database fixture
# deliberately shared by the examples of one test (what one example commits,
# the next must find unchanged). PGFLOW_HYPOTHESIS_PROFILE=thorough explores more.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large])
settings.load_profile(os.environ.get("PGFLOW_HYPOTHESIS_PROFILE", "ci"))


def _admin_dsn() -> str:
    return os.environ.get("PGFLOW_TEST_DSN") or embedded.embedded_dsn()


@pytest.fixture(scope="session")
def server_dsn() -> str:
    return _admin_dsn()


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    name = f"pgflow_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    schema.migrate(make_conninfo(server_dsn, dbname=name))
    yield name
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


@contextlib.contextmanager
def _database(server_dsn: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database on the test server (cloned from ``template``), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clone = f' template "{template}"' if template else ""
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"{clone}')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """A freshly migrated database of its own for this test."""
    with _database(server_dsn, "pgflow_test", template_db) as test_dsn:
        yield test_dsn


@pytest.fixture
def empty_dsn(server_dsn: str) -> Iterator[str]:
    """A database without the pgflow schema."""
    with _database(server_dsn, "pgflow_empty") as test_dsn:
        yield test_dsn


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def effects(conn: psycopg.Connection[Any]) -> helpers.Effects:
    """The side-effect log that test workflows write to (see tests/support/workflows)."""
    return helpers.Effects.create(conn)


@pytest.fixture
def processes() -> Iterator[helpers.Processes]:
    procs = helpers.Processes()
    yield procs
    procs.kill_all()


@pytest.fixture
def inprocess_worker(dsn: str) -> Iterator[helpers.InProcessWorkers]:
    workers = helpers.InProcessWorkers(dsn)
    yield workers
    workers.stop_all()
