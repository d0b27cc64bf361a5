"""One error vocabulary: an unmigrated database and a broken worker module say what they are."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import psycopg
import pytest

import pgflow
from pgflow import aio
from tests.support.cli import assert_one_line_error, cli_env
from tests.support.helpers import REPO

RUN_ID = uuid.uuid4()

CALLS = {
    "start": lambda c: pgflow.start(c, "anything", 1),
    "get": lambda c: pgflow.get(c, RUN_ID),
    "signal": lambda c: pgflow.signal(c, RUN_ID, "go"),
    "cancel": lambda c: pgflow.cancel(c, RUN_ID),
    "retry": lambda c: pgflow.retry(c, RUN_ID),
    "get_state": lambda c: pgflow.get_state(c, RUN_ID, "stage"),
    "result": lambda c: pgflow.result(c, RUN_ID, timeout=1),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_the_python_api_on_an_unmigrated_database_raises_schema_not_migrated(empty_dsn, call):
    with psycopg.connect(empty_dsn, autocommit=True) as conn, \
            pytest.raises(pgflow.SchemaNotMigrated, match="run `pgflow migrate`"):
        CALLS[call](conn)


def test_the_async_api_too(empty_dsn):
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(empty_dsn, autocommit=True) as conn:
            with pytest.raises(pgflow.SchemaNotMigrated):
                await aio.start(conn, "anything", 1)
            with pytest.raises(pgflow.SchemaNotMigrated):
                await aio.get(conn, RUN_ID)

    asyncio.run(main())


def test_a_worker_module_that_fails_on_import_is_named_with_its_error(dsn, tmp_path):
    (tmp_path / "broken_app.py").write_text(
        "import os\nSETTING = os.environ['PGFLOW_TEST_NO_SUCH_SETTING']\n")
    env = cli_env(PYTHONPATH=f"{tmp_path}:{REPO}")
    result = subprocess.run([sys.executable, "-m", "pgflow", "worker", "broken_app", "--dsn", dsn],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "cannot import module 'broken_app'",
                          "KeyError: 'PGFLOW_TEST_NO_SUCH_SETTING'")
