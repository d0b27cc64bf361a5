"""Roles and grants (revision 0002): each duty can do its work and nothing more.

Real LOGIN roles with unique names are created per test and dropped after it
(roles are cluster-wide: other tests' databases share them). The three group
roles ``pgflow_worker``, ``pgflow_client`` and ``pgflow_reader`` exist once
the template database is migrated.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgflow
from pgflow import schema
from tests.support import sqlkit
from tests.support.cli import assert_one_line_error, ok, pgflow_cli, register_two_steps
from tests.support.helpers import EFFECTS_DSN_ENV, wait_for
from tests.support.workflows.simple import two_steps
from tests.support.workflows.sleepers import nap

WORKER, CLIENT, READER = "pgflow_worker", "pgflow_client", "pgflow_reader"
DUTIES = (WORKER, CLIENT, READER)
FIXED_PATH = "search_path=pg_catalog, pgflow, pg_temp"
PAYLOAD_TABLES = ("runs", "steps", "signals", "run_state", "step_attempts", "timers")

Login = Callable[..., str]  # login(*duties) -> the DSN of a new LOGIN role holding them


def _drop_role(admin_dsn: str, role: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("drop owned by {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))


@pytest.fixture
def login(dsn: str) -> Iterator[Login]:
    made: list[str] = []

    def make(*duties: str, options: str = "") -> str:
        role = f"pgflow_t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("create role {} login " + options).format(sql.Identifier(role)))
            made.append(role)
            for duty in duties:
                admin.execute(sql.SQL("grant {} to {}").format(sql.Identifier(duty),
                                                               sql.Identifier(role)))
        return make_conninfo(dsn, user=role)

    yield make
    for role in made:
        _drop_role(dsn, role)


def _denied(conn: psycopg.Connection[Any], query: str, params: Any = None) -> str:
    """Run ``query`` and return the permission-denied message it must fail with."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc, conn.transaction():
        conn.execute(query, params)
    return str(exc.value)


def _functions(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(name, a call with NULL arguments) of every function of schema pgflow."""
    rows = conn.execute(
        "select p.proname, (select string_agg('null::' || format_type(t, null), ', ' order by i)"
        "                   from unnest(p.proargtypes::oid[]) with ordinality a(t, i))"
        " from pg_proc p where p.pronamespace = 'pgflow'::regnamespace order by 1").fetchall()
    return [(name, f"select pgflow.{name}({args or ''})") for name, args in rows]


def _granted(conn: psycopg.Connection[Any], duty: str) -> set[str]:
    rows = conn.execute("select object from pgflow._privileges()"
                        " where kind <> 'relation' and %s = any(roles)", (duty,)).fetchall()
    return {r[0] for r in rows}


def _assert_other_functions_denied(admin: psycopg.Connection[Any],
                                   conn: psycopg.Connection[Any], duty: str | None) -> None:
    """Every function not granted to ``duty`` refuses a call (before looking at arguments)."""
    granted = _granted(admin, duty) if duty else set()
    checked = []
    for name, call in _functions(admin):
        if name not in granted:
            assert f"permission denied for function {name}" in _denied(conn, call)
            checked.append(name)
    assert {"claim", "complete_step", "complete_run", "fail_run", "register_worker", "start",
            "signal", "cancel", "advance_time", "purge", "_suspend", "_lock_run"} - granted <= set(checked)


# -- client ------------------------------------------------------------------


def test_client_starts_signals_and_cancels_but_reads_and_changes_no_table(dsn, conn, login):
    client_dsn = login(CLIENT)
    with psycopg.connect(client_dsn) as client:
        # Python API, in the client's own transaction: gone with a rollback ...
        dropped = pgflow.start(client, two_steps, 1)
        client.rollback()
        # ... there with a commit; SQL the same.
        kept = pgflow.start(client, two_steps, 2, key="k-2")
        by_sql = client.execute("select pgflow.start('two_steps', '[3]', version => '1')"
                                ).fetchone()[0]
        assert pgflow.start(client, two_steps, 2, key="k-2") == kept  # idempotent start
        client.commit()
        pgflow.signal(client, kept, "approve", {"by": "ana"})
        assert pgflow.cancel(client, by_sql) is True
        client.execute("select pgflow.watch(%s)", (kept,))
        client.commit()

        for table in PAYLOAD_TABLES:
            assert f"permission denied for table {table}" in _denied(
                client, f"select * from pgflow.{table}")
        _denied(client, "update pgflow.runs set input = '[666]' where id = %s", (kept,))
        _denied(client, "delete from pgflow.runs where id = %s", (kept,))
        _denied(client, "insert into pgflow.signals (run_id, name, payload)"
                        " values (%s, 'approve', 'null')", (kept,))
        _denied(client, "select * from pgflow.waits")
        # get() and result() read tables: that is the reader's duty.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pgflow.get(client, kept)
        client.rollback()
        _assert_other_functions_denied(conn, client, CLIENT)

    assert sqlkit.count(conn, "runs") == 2
    assert conn.execute("select count(*) from pgflow.runs where id = %s", (dropped,)
                        ).fetchone()[0] == 0
    assert sqlkit.run_row(conn, kept)["input"] == [2]
    assert sqlkit.run_row(conn, by_sql)["status"] == "cancelled"
    assert conn.execute("select name, payload from pgflow.signals where run_id = %s",
                        (kept,)).fetchall() == [("approve", {"by": "ana"})]
    assert sqlkit.run_row(conn, kept)["watched"] is True


def test_client_controls_schedules_through_procedures_only(dsn, conn, login):
    register_two_steps(dsn)
    client_dsn = login(CLIENT)
    with psycopg.connect(client_dsn, autocommit=True) as client:
        pgflow.create_schedule(client, "nightly", two_steps, cron="0 3 * * *",
                               timezone="Europe/Paris", args=[1])
        pgflow.pause_schedule(client, "nightly")
        pgflow.resume_schedule(client, "nightly")
        triggered = pgflow.trigger_schedule(client, "nightly")
        backfilled = pgflow.backfill_schedule(client, "nightly",
                                              datetime(2026, 3, 1, tzinfo=timezone.utc),
                                              datetime(2026, 3, 3, tzinfo=timezone.utc))
        assert len(backfilled) == 2
        for table in ("schedule_ticks", "runs"):
            assert f"permission denied for table {table}" in _denied(
                client, f"select * from pgflow.{table}")
        _denied(client, "update pgflow.schedules set paused = true")
        _denied(client, "select pgflow.purge_schedule_ticks(interval '1 day')")
        _denied(client, "select * from pgflow.due_schedules(10)")
        pgflow.delete_schedule(client, "nightly")
    assert sqlkit.count(conn, "schedules") == 0
    assert conn.execute("select count(*) from pgflow.runs where schedule_id = 'nightly'"
                        ).fetchone()[0] == 3
    assert sqlkit.run_row(conn, triggered)["schedule_id"] == "nightly"


def test_client_cannot_attach_its_run_to_another_run_as_a_child(dsn, conn, login):
    victim = sqlkit.start(conn, "two_steps")
    with psycopg.connect(login(CLIENT), autocommit=True) as client:
        # Only start_child, fenced by the parent's lease, names a parent.
        with pytest.raises(psycopg.errors.UndefinedFunction):
            client.execute("select pgflow.start('two_steps', '[1]', version => '1',"
                           " parent_id => %s)", (victim,))
        assert "permission denied for function _start" in _denied(
            client, "select pgflow._start('two_steps', '[1]', null, null, 0, null, '1', %s, null)",
            (victim,))
    assert conn.execute("select count(*) from pgflow.runs where parent_id = %s",
                        (victim,)).fetchone()[0] == 0


def test_client_retries_a_failed_run(dsn, conn, login):
    run_id = sqlkit.start(conn, "wf")
    worker = sqlkit.Worker(dsn)
    try:
        claim = worker.claim_one()
        worker.fail_run(run_id, claim.token)
    finally:
        worker.close()
    with psycopg.connect(login(CLIENT), autocommit=True) as client:
        pgflow.retry(client, run_id)
    assert sqlkit.run_row(conn, run_id)["status"] == "pending"


# -- reader ------------------------------------------------------------------


def test_reader_selects_but_cannot_start_or_change_anything(dsn, conn, login):
    run_id = pgflow.start(conn, two_steps, 7)
    conn.execute("insert into pgflow.run_state (run_id, key, value, updated_at)"
                 " values (%s, 'k', '1', now())",
                 (run_id,))
    with psycopg.connect(login(READER), autocommit=True) as reader:
        for relation in (*PAYLOAD_TABLES, "workers", "workflows", "waits", "unserved_runs",
                         "patches_in_use", "clock", "alembic_version"):
            reader.execute(f"select * from pgflow.{relation}").fetchall()
        run = pgflow.get(reader, run_id)
        assert (run.status, run.input) == ("pending", [7])
        assert pgflow.get_state(reader, run_id, "k") == 1
        schema.check(reader)
        # The view's pgflow.now() runs with the reader's rights: granted.
        reader.execute("select due_in from pgflow.waits").fetchall()

        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pgflow.start(reader, two_steps, 1)
        for statement in ("update pgflow.runs set status = 'cancelled'",
                          "delete from pgflow.steps",
                          "insert into pgflow.run_state (run_id, key, value) values"
                          " (gen_random_uuid(), 'k', '1')",
                          "truncate pgflow.runs"):
            _denied(reader, statement)
        _assert_other_functions_denied(conn, reader, READER)
    assert sqlkit.run_row(conn, run_id)["status"] == "pending"


# -- worker ------------------------------------------------------------------


def test_worker_role_reports_through_procedures_only(dsn, conn, login):
    worker_dsn = login(WORKER)
    run_id = sqlkit.start(conn, "wf", [1])
    worker = sqlkit.Worker(worker_dsn)
    try:
        claim = worker.claim_one()
        worker.complete_step(run_id, claim.token, 1)
        worker.complete_run(run_id, claim.token, "done")
        assert worker.heartbeat() is True
        schema.check(worker.db)
        for table in PAYLOAD_TABLES:
            _denied(worker.db, f"select * from pgflow.{table}")
        _denied(worker.db, "update pgflow.runs set status = 'pending' where id = %s", (run_id,))
        _assert_other_functions_denied(conn, worker.db, WORKER)
    finally:
        worker.close()
    assert sqlkit.run_row(conn, run_id)["output"] == "done"


@pytest.mark.slow
def test_a_worker_process_with_the_worker_role_runs_workflows_to_the_end(
        dsn, conn, effects, processes, login):
    """`pgflow worker` as a worker-only login: steps, a durable sleep (scheduler), results."""
    worker_dsn, client_dsn = login(WORKER), login(CLIENT, READER)
    proc = processes.worker(worker_dsn, "tests.support.workflows.simple", "tests.support.workflows.sleepers",
                            extra_env={EFFECTS_DSN_ENV: dsn})  # the effects log is the test's
    with psycopg.connect(client_dsn) as client:
        steps = pgflow.start(client, two_steps, 20)
        sleeper = pgflow.start(client, nap, 0.5)
        client.commit()
        client.autocommit = True
        # result() = watch (client) + reading the run (reader).
        assert pgflow.result(client, steps, timeout=60) == 42
        assert pgflow.result(client, sleeper, timeout=60) == "awake"
    assert effects.per_step(steps) == {"first": 1, "second": 1}
    assert effects.per_step(sleeper) == {"wake_up": 1}
    assert [s["kind"] for s in sqlkit.step_rows(conn, sleeper)] == ["sleep", "step"]
    proc.terminate()
    assert proc.wait(30) == 0, processes.log_of(proc)
    assert "permission denied" not in processes.log_of(proc)


# -- search_path -------------------------------------------------------------


def test_a_search_path_of_the_callers_cannot_hijack_the_procedures(dsn, conn, login):
    """A client puts its own schema first: shadows of now(), jsonb_typeof(), pg_notify()
    and the timestamptz + interval operator. Its own invoker calls see them; the
    procedures, running as the owner, never call them."""
    client_dsn = login(CLIENT)
    client_role = conninfo_to_dict(client_dsn)["user"]
    conn.execute(sql.SQL("grant create on database {} to {}").format(
        sql.Identifier(conn.info.dbname), sql.Identifier(client_role)))
    with psycopg.connect(client_dsn, autocommit=True) as client:
        client.execute("""
            create schema evil;
            create table evil.calls (what text, as_user text);
            grant insert on evil.calls to public;
            create function evil.jsonb_typeof(jsonb) returns text language sql as $$
                insert into evil.calls values ('jsonb_typeof', current_user) returning 'array'
            $$;
            create function evil.pg_notify(text, text) returns void language sql as $$
                insert into evil.calls values ('pg_notify', current_user)
            $$;
            create function evil.now() returns timestamptz language sql
                as $$ select timestamptz '1999-01-01 00:00+00' $$;
            create function evil.plus(timestamptz, interval) returns timestamptz language sql
                as $$ select timestamptz '1999-01-01 00:00+00' $$;
            create operator evil.+ (leftarg = timestamptz, rightarg = interval,
                                    function = evil.plus);
            grant usage on schema evil to public;
            grant execute on all functions in schema evil to public;
            set search_path = evil, pg_catalog, pgflow, pg_temp;
        """)
        # The shadows work in the client's own statements (so the test can fail):
        # pgflow.now() is an invoker function, its `+` resolves to evil's here.
        assert client.execute("select pgflow.now()").fetchone()[0].year == 1999
        assert client.execute("select now()").fetchone()[0].year == 1999
        assert client.execute("select jsonb_typeof('[]')").fetchone()[0] == "array"

        run_id = client.execute("select pgflow.start('two_steps', '[1]', version => '1')"
                                ).fetchone()[0]
        client.execute("select pgflow.signal(%s, 'go', '{}')", (run_id,))
        client.execute("select pgflow.cancel(%s)", (run_id,))
        calls = client.execute("select what, as_user from evil.calls").fetchall()
    assert calls == [("jsonb_typeof", client_role)]  # only the client's own call above
    run = sqlkit.run_row(conn, run_id)
    assert run["status"] == "cancelled"
    now = conn.execute("select pg_catalog.now()").fetchone()[0]
    assert abs((now - run["created_at"]).total_seconds()) < 300
    assert abs((now - run["finished_at"]).total_seconds()) < 300


# -- the policy --------------------------------------------------------------


def test_every_function_and_relation_is_covered_by_the_grant_policy(conn):
    """A function or table added later must be given a duty (or '{}', owner only)."""
    policy = conn.execute("select kind, object, roles from pgflow._privileges()").fetchall()
    named = {(kind != "relation", obj) for kind, obj, _ in policy}
    functions = conn.execute(
        "select proname from pg_proc where pronamespace = 'pgflow'::regnamespace"
        " and proname not like '\\_%%'").fetchall()
    relations = conn.execute(
        "select relname from pg_class where relnamespace = 'pgflow'::regnamespace"
        " and relkind in ('r', 'p', 'v', 'm')").fetchall()
    missing = sorted({f"function pgflow.{f}" for (f,) in functions if (True, f) not in named}
                     | {f"table pgflow.{r}" for (r,) in relations if (False, r) not in named})
    assert not missing, (f"{missing} have no entry in pgflow._privileges() "
                         "(sql/0002_roles.sql, GRANT LIST)")
    for _, _, roles in policy:
        assert set(roles) <= set(DUTIES)


def test_the_catalog_matches_the_policy(conn):
    rows = conn.execute("""
        select p.proname, p.prosecdef, p.proconfig, pol.kind, coalesce(pol.roles, '{}'),
               coalesce((select array_agg(case when a.grantee = 0 then 'public'
                                               else a.grantee::regrole::text end order by 1)
                         from aclexplode(p.proacl) a
                         where a.privilege_type = 'EXECUTE' and a.grantee <> p.proowner),
                        '{}'),
               p.proacl is null
        from pg_proc p
        left join pgflow._privileges() pol on pol.object = p.proname and pol.kind <> 'relation'
        where p.pronamespace = 'pgflow'::regnamespace""").fetchall()
    assert len(rows) > 30
    for name, definer, config, kind, roles, grantees, default_acl in rows:
        assert not default_acl, f"{name}: default ACL (PUBLIC may execute)"
        assert sorted(grantees) == sorted(roles), name  # never PUBLIC
        if kind == "definer":
            # The fixed search_path, and nothing else but a planner setting of the
            # function's own (claim and complete_batch keep one generic plan).
            assert definer and FIXED_PATH in config, name
            assert set(config) - {FIXED_PATH} <= {"plan_cache_mode=force_generic_plan"}, name
        elif name != "_secure":
            # Helpers and now() stay inlinable: no SECURITY DEFINER, no SET.
            assert (definer, config) == (False, None), name
    tables = conn.execute("""
        select c.relname, (select array_agg(a.grantee::regrole::text order by 1)
                           from aclexplode(c.relacl) a
                           where a.grantee <> c.relowner and a.privilege_type <> 'SELECT')
        from pg_class c where c.relnamespace = 'pgflow'::regnamespace
          and c.relkind in ('r', 'p', 'v', 'm')""").fetchall()
    assert [t for t in tables if t[1]] == []  # nobody but the owner writes


def test_the_one_expression_helpers_are_still_inlined(conn):
    """A SET clause or SECURITY DEFINER would stop inlining: the plan would show the call."""
    for call, body in (("pgflow._lock_run(gen_random_uuid())", "pg_advisory_xact_lock"),
                       ("pgflow._wake_stripe(random()::text, 3)", "hashtext")):
        plan = "\n".join(r[0] for r in conn.execute(
            f"explain (verbose, costs off) select {call}").fetchall())
        assert body in plan and call.split("(")[0] not in plan, plan


# -- migrating ---------------------------------------------------------------


def _security(dsn: str) -> tuple[bool, bool, bool]:
    """(start is definer, PUBLIC may execute start, pgflow_client may execute start)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            "select p.prosecdef, has_function_privilege('pgflow_worker', p.oid, 'execute'),"
            "       has_function_privilege('pgflow_client', p.oid, 'execute')"
            " from pg_proc p where p.oid = 'pgflow.start'::regproc").fetchone()
    assert row is not None
    return row


def test_upgrade_downgrade_and_upgrade_again(empty_dsn):
    assert schema.migrate(empty_dsn, "0001_core") == "0001_core"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        run_id = sqlkit.start(c, "wf", [1])
    # 0001: caller's rights, PUBLIC (so pgflow_worker too) may execute everything.
    assert _security(empty_dsn) == (False, True, True)
    assert schema.migrate(empty_dsn) == schema.head_revision()
    assert _security(empty_dsn) == (True, False, True)
    schema.downgrade(empty_dsn, "0001_core")
    assert schema.current_revision(empty_dsn) == "0001_core"
    assert _security(empty_dsn) == (False, True, True)
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        assert c.execute("select count(*) from pg_proc where proname in"
                         " ('_privileges', '_secure') or 'search_path=pg_catalog, pgflow, pg_temp'"
                         " = any(proconfig)").fetchone()[0] == 0
        assert sqlkit.run_row(c, run_id)["input"] == [1]
    assert schema.migrate(empty_dsn) == schema.head_revision()
    assert _security(empty_dsn) == (True, False, True)


def test_a_database_owner_without_createrole_migrates_once_the_roles_exist(server_dsn, dsn,
                                                                            login):
    """The grants need no CREATEROLE; the roles already exist (the template made them)."""
    owner_dsn = login(options="nocreaterole")
    owner = conninfo_to_dict(owner_dsn)["user"]
    name = f"pgflow_owner_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {} owner {}").format(
            sql.Identifier(name), sql.Identifier(owner)))
    try:
        db_as_owner = make_conninfo(owner_dsn, dbname=name)
        assert schema.migrate(db_as_owner) == schema.head_revision()
        client = login(CLIENT)
        with psycopg.connect(make_conninfo(client, dbname=name), autocommit=True) as c:
            run_id = c.execute("select pgflow.start('x', '[]', version => '1')").fetchone()[0]
            _denied(c, "select * from pgflow.runs")
        with psycopg.connect(db_as_owner, autocommit=True) as c:
            # The definer procedures run as the owner, who owns the rows' table.
            assert sqlkit.run_row(c, run_id)["name"] == "x"
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def _role_block(names: tuple[str, str, str]) -> str:
    """The role-creating DO block of sql/0002_roles.sql, for roles of these names."""
    text = schema.read_sql("migrations/0002_roles.sql")
    block = re.search(r"^do \$\$\n.*?^\$\$;", text, re.S | re.M)
    assert block is not None and "create role" in block.group(0)
    body = block.group(0)
    for old, new in zip(DUTIES, names, strict=True):
        body = body.replace(old, new)
    return body


@pytest.fixture
def scratch_roles(dsn: str) -> Iterator[tuple[str, str, str]]:
    """Three unique role names for the role-creation block; dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    names = (f"pgflow_t_w_{tag}", f"pgflow_t_c_{tag}", f"pgflow_t_r_{tag}")
    yield names
    with psycopg.connect(dsn, autocommit=True) as admin:
        for role in names:
            admin.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def test_role_creation_races_between_databases(dsn, empty_dsn, scratch_roles):
    """Two databases migrating at once both create the roles: one wins, the other
    waits for its commit and then finds them; neither fails."""
    block = _role_block(scratch_roles)
    first = psycopg.connect(dsn)
    try:
        first.execute(block)  # created, not yet committed
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with psycopg.connect(empty_dsn) as c:
                    c.execute(block)  # blocks on the first one's uncommitted roles
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        with psycopg.connect(dsn, autocommit=True) as monitor:
            waiting = wait_for(lambda: monitor.execute(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                " and datname = %s", (conninfo_to_dict(empty_dsn)["dbname"],)).fetchone()[0] == 1
                or ("finished" if not thread.is_alive() else None),
                what="the second creator to wait")
        assert waiting is True, f"the second creator did not wait: {errors}"
        first.commit()
        thread.join(30)
        assert not errors, errors
    finally:
        first.close()
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("select count(*) from pg_roles where rolname = any(%s)",
                         (list(scratch_roles),)).fetchone()[0] == 3
        c.execute(_role_block(scratch_roles))  # and again: nothing to do


def test_missing_roles_without_createrole_is_one_clear_error(dsn, login, scratch_roles):
    with psycopg.connect(login(options="nocreaterole"), autocommit=True) as c, pytest.raises(
            psycopg.errors.InsufficientPrivilege) as exc:
        c.execute(_role_block(scratch_roles))
    message = str(exc.value)
    assert f"role {scratch_roles[0]} does not exist" in message
    assert "may not create roles" in message and "pgflow migrate" in message
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("select count(*) from pg_roles where rolname = any(%s)",
                         (list(scratch_roles),)).fetchone()[0] == 0



# -- the command line --------------------------------------------------------


@pytest.mark.slow
def test_the_cli_works_per_duty_and_names_the_missing_role(dsn, conn, login):
    client, reader = login(CLIENT), login(READER)
    register_two_steps(dsn)
    run_id = ok(pgflow_cli("start", "two_steps", "--input", "[1]", "--dsn", client)).strip()
    assert sqlkit.run_row(conn, uuid.UUID(run_id))["input"] == [1]
    assert run_id in ok(pgflow_cli("list", "--dsn", reader))
    assert_one_line_error(pgflow_cli("list", "--dsn", client),
                          "permission denied for table runs", "pgflow_reader reads them")
    assert_one_line_error(pgflow_cli("cancel", run_id, "--dsn", reader),
                          "permission denied for function cancel", "pgflow_client")
    assert_one_line_error(pgflow_cli("worker", "tests.support.workflows.simple", "--dsn", reader),
                          "permission denied for function register_worker", "pgflow_worker")
