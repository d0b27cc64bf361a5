"""The schema: installed by Alembic inside schema pgflow, columns as documented."""

from __future__ import annotations

import psycopg
import pytest

import pgflow
from pgflow import schema

RUNS_COLUMNS = {"id", "name", "version", "queue", "key", "status", "input", "output", "error",
                "priority", "created_at", "started_at", "finished_at", "parent_id"}
STEPS_COLUMNS = {"run_id", "name", "status", "attempts", "output", "error", "started_at",
                 "finished_at"}


def _columns(conn: psycopg.Connection, table: str) -> set[str]:
    rows = conn.execute("select column_name from information_schema.columns"
                        " where table_schema = 'pgflow' and table_name = %s", (table,))
    return {r[0] for r in rows}


def test_documented_columns_exist(conn):
    assert _columns(conn, "runs") >= RUNS_COLUMNS
    assert _columns(conn, "steps") >= STEPS_COLUMNS


def test_app_alembic_history_is_untouched(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("create table public.alembic_version (version_num varchar(32) primary key)")
        conn.execute("insert into public.alembic_version values ('app_rev_42')")
    assert schema.migrate(empty_dsn) == schema.head_revision()
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("select version_num from public.alembic_version").fetchall() == [
            ("app_rev_42",)]
        assert conn.execute("select version_num from pgflow.alembic_version").fetchall() == [
            (schema.head_revision(),)]


def test_downgrade_and_upgrade_again(empty_dsn):
    schema.migrate(empty_dsn)
    schema.downgrade(empty_dsn, "base")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        left = conn.execute("select count(*) from pg_class c join pg_namespace n"
                            " on n.oid = c.relnamespace where n.nspname = 'pgflow'"
                            " and c.relname <> 'alembic_version'"
                            " and c.relname not like 'alembic_version%%'").fetchone()[0]
        functions = conn.execute("select count(*) from pg_proc p join pg_namespace n"
                                 " on n.oid = p.pronamespace where n.nspname = 'pgflow'"
                                 ).fetchone()[0]
    assert (left, functions) == (0, 0)
    assert schema.current_revision(empty_dsn) is None
    assert schema.migrate(empty_dsn) == schema.head_revision()


def test_check_names_the_missing_migration(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn, pytest.raises(
            pgflow.SchemaNotMigrated, match="run `pgflow migrate` first"):
        schema.check(conn)
