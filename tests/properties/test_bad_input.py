"""Bad input, explored with property-based tests (hypothesis) and pinned by plain tests.

Every call of the SQL procedures, the client (sync and ``pgflow.aio``) and the
CLI, fed arbitrary JSON, malformed JSON text, garbage run ids, names and keys
full of SQL metacharacters, invalid durations and retry policies, must either
succeed with a sane result or fail with exactly one clear error:

- SQL: one error whose SQLSTATE says what is wrong (``PF...`` for pgflow's own
  checks, PostgreSQL's ``22P02``/``22P05`` when the text is not JSON at all);
- Python: a pgflow error, or ``ValueError``/``TypeError`` for an argument
  mistake, never a raw driver error;
- CLI: one ``pgflow: error:`` line on stderr and exit code 1, no traceback;

and whatever was committed before the call is unchanged afterwards.

The hypothesis profile (fixed budget, derandomized) is in ``conftest.py``.
Every failure the properties found is also a plain test below, under
"Found by the properties".
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

import pgflow
from pgflow import aio, cli, codec
from tests.support.sqlkit import (
    BAD_ARGUMENT,
    KEY_CONFLICT,
    UNKNOWN_RUN,
    WRONG_STATE,
    Claim,
    Conn,
    Worker,
    raises_sqlstate,
    worker_factory,
)
from tests.support.strategies import (
    durations,
    json_texts,
    json_values,
    nasty_text,
    run_ids,
    sql_text,
)

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

CLIENT_ERRORS = (pgflow.PgflowError, ValueError, TypeError)
SQL_ERRORS = {BAD_ARGUMENT, KEY_CONFLICT, WRONG_STATE, UNKNOWN_RUN,
              "22P02",  # invalid input syntax: the text is not JSON, or not a UUID
              "22P05"}  # \u0000 in JSON: PostgreSQL text cannot hold it


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

SNAPSHOT = """
select (select coalesce(jsonb_agg(to_jsonb(r) order by r.id), '[]') from pgflow.runs r),
       (select coalesce(jsonb_agg(to_jsonb(s) order by s.run_id, s.seq), '[]') from pgflow.steps s),
       (select coalesce(jsonb_agg(to_jsonb(g) order by g.id), '[]') from pgflow.signals g),
       (select coalesce(jsonb_agg(to_jsonb(v) order by v.run_id, v.key), '[]')
        from pgflow.run_state v),
       (select coalesce(jsonb_agg(to_jsonb(t) order by t.id), '[]') from pgflow.timers t)
"""


def snapshot(conn: Conn) -> tuple[list[Any], ...]:
    """Everything committed about runs: runs, steps, signals, state and timers."""
    row = conn.execute(SNAPSHOT).fetchone()
    assert row is not None
    return tuple(row)


def kept(before: tuple[list[Any], ...], after: tuple[list[Any], ...]) -> None:
    """Every row of ``before`` is still in ``after``, unchanged (a success may add rows)."""
    for old, new in zip(before, after, strict=True):
        new_rows = {json.dumps(r, sort_keys=True) for r in new}
        missing = [r for r in old if json.dumps(r, sort_keys=True) not in new_rows]
        assert not missing, f"committed rows changed or vanished: {missing[:2]}"


def clear_error(exc: BaseException) -> None:
    """One pgflow error or argument error with a message; never the driver's own."""
    assert isinstance(exc, CLIENT_ERRORS), f"{type(exc).__name__}: {exc}"
    assert not isinstance(exc, (psycopg.Error, UnicodeError, OverflowError)), repr(exc)
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


def register(conn: Conn, *names: str) -> None:
    """Announce workflows (version '1', queue 'default') so they can be started by name."""
    announced = [{"name": n, "version": "1", "queue": "default"} for n in names]
    conn.execute("select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'], %s)",
                 (Jsonb(announced),))


WEIRD_NAME = "we'ird; $$ \\ 🦆"
# 9,000 bytes that do not compress: over the btree entry limit of an index on text.
INCOMPRESSIBLE_KEY = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3000))


@pytest.fixture
def registered(conn: Conn) -> Conn:
    register(conn, "wf", WEIRD_NAME)
    return conn


@pytest.fixture
def workers(dsn: str) -> Iterator[Callable[..., Worker]]:
    with worker_factory(dsn) as make:
        yield make


@pytest.fixture
def leased(conn: Conn, workers: Callable[..., Worker]) -> tuple[Worker, Claim]:
    """A run claimed by a (SQL-level) worker, for the worker procedures."""
    worker = workers()
    conn.execute("select pgflow.start('wf', '[]', version => '1')")
    return worker, worker.claim_one()


# ---------------------------------------------------------------------------
# The payload size measure
# ---------------------------------------------------------------------------


@pytest.mark.slow
@given(value=json_values.filter(lambda v: "nan" not in json.dumps(v).lower()
                                and "infinity" not in json.dumps(v).lower()))
@example(value=[0] * 1000)
@example(value={"k" * 100: [None, True, 1.5e-300, -(10**40)]})
@example(value="é" * 1000)
def test_the_python_estimate_of_a_payload_is_never_below_its_jsonb_size(conn, value):
    """So nothing Python lets through is refused by the database's own check."""
    try:
        estimate = codec.stored_size(value, "value")
    except pgflow.EncodingError as exc:  # NUL or a lone surrogate: jsonb cannot hold it
        assert "NUL" in str(exc) or "surrogate" in str(exc)
        return
    actual = conn.execute("select pg_column_size(%s::jsonb)", (json.dumps(value),)).fetchone()[0]
    assert actual <= estimate <= 2 * actual + 64


# ---------------------------------------------------------------------------
# SQL procedures, called directly
# ---------------------------------------------------------------------------


@given(name=st.one_of(st.just("wf"), st.just(WEIRD_NAME), sql_text),
       input_text=json_texts, key=st.one_of(st.none(), sql_text),
       queue=st.one_of(st.none(), sql_text))
@example(name="wf", input_text='{"a": "\'; drop table pgflow.runs; --"}', key="$$", queue=";")
@example(name="x" * 201, input_text="[]", key=None, queue=None)
@example(name="wf", input_text="[]", key="k" * 1025, queue=None)
@example(name="wf", input_text="[]", key=None, queue="q" * 201)
def test_sql_start_either_stores_exactly_what_it_was_given_or_fails_cleanly(
        registered, name, input_text, key, queue):
    conn = registered
    before = snapshot(conn)
    key_taken = key is not None and conn.execute(
        "select exists (select 1 from pgflow.runs where key = %s)", (key,)).fetchone()[0]
    try:
        run_id = conn.execute(
            "select pgflow.start(%s, %s::jsonb, key => %s, queue => %s)",
            (name, input_text, key, queue)).fetchone()[0]
    except psycopg.Error as exc:
        assert exc.sqlstate in SQL_ERRORS, f"{exc.sqlstate}: {exc}"
        assert snapshot(conn) == before
        return
    row = conn.execute("select name, input, key, queue from pgflow.runs where id = %s",
                       (run_id,)).fetchone()
    assert row[0] == name
    if key_taken:
        assert row[2] == key  # idempotent start: the key's earlier run is returned as it is
    elif row[2] == key:
        assert row[1] == json.loads(input_text)
        assert queue is None or row[3] == queue
    else:
        assert key is None
    kept(before, snapshot(conn))


@given(name=sql_text, payload_text=json_texts,
       target=st.sampled_from(["pending", "finished", "unknown"]))
def test_sql_signal_delivers_or_fails_cleanly(registered, name, payload_text, target):
    conn = registered
    ids = conn.execute("select id, status from pgflow.runs where name = 'wf' order by id").fetchall()
    if not ids:
        pending = conn.execute("select pgflow.start('wf', '[]', version => '1')").fetchone()[0]
        done = conn.execute("select pgflow.start('wf', '[]', version => '1')").fetchone()[0]
        conn.execute("select pgflow.cancel(%s)", (done,))
    else:
        pending = next(i for i, s in ids if s == "pending")
        done = next(i for i, s in ids if s == "cancelled")
    run_id = {"pending": pending, "finished": done, "unknown": uuid.uuid4()}[target]
    before = snapshot(conn)
    try:
        conn.execute("select pgflow.signal(%s, %s, %s::jsonb)", (run_id, name, payload_text))
    except psycopg.Error as exc:
        assert exc.sqlstate in SQL_ERRORS, f"{exc.sqlstate}: {exc}"
        assert snapshot(conn) == before
        return
    assert target == "pending"
    last = conn.execute("select name, payload from pgflow.signals order by id desc limit 1").fetchone()
    assert last == (name, json.loads(payload_text))
    kept(before, snapshot(conn))


@given(run_id=st.one_of(st.uuids().map(str), st.text(max_size=40).filter(lambda t: "\x00" not in t)),
       procedure=st.sampled_from(["cancel", "retry", "signal", "watch"]))
def test_sql_operations_on_garbage_run_ids_fail_cleanly(conn, run_id, procedure):
    before = snapshot(conn)
    call = {"cancel": "select pgflow.cancel(%s::uuid)", "retry": "select pgflow.retry(%s::uuid)",
            "signal": "select pgflow.signal(%s::uuid, 'go')",
            "watch": "select pgflow.watch(%s::uuid)"}[procedure]
    try:
        conn.execute(call, (run_id,))
    except psycopg.Error as exc:
        assert exc.sqlstate in SQL_ERRORS, f"{exc.sqlstate}: {exc}"
    assert snapshot(conn) == before


@given(key=sql_text, value_text=json_texts)
@example(key=INCOMPRESSIBLE_KEY, value_text="1")
def test_sql_set_state_stores_or_fails_cleanly(conn, leased, key, value_text):
    worker, claim = leased
    before = snapshot(conn)
    try:
        worker.db.execute("select pgflow.set_state(%s, %s, %s, %s::jsonb)",
                          (claim.run_id, claim.token, key, value_text))
    except psycopg.Error as exc:
        assert exc.sqlstate in SQL_ERRORS, f"{exc.sqlstate}: {exc}"
        assert snapshot(conn) == before
        return
    assert pgflow.get_state(conn, claim.run_id, key) == json.loads(value_text)


spans = st.one_of(st.none(), st.sampled_from(
    [timedelta(seconds=-1), timedelta(0), timedelta(seconds=1), timedelta(days=36525),
     timedelta(days=36526), timedelta(days=365250), timedelta.max, timedelta.min]))


@given(delay=spans, timeout=spans)
@example(delay=timedelta(days=365250), timeout=None)
@example(delay=None, timeout=timedelta.max)
def test_sql_start_refuses_spans_it_cannot_schedule(registered, delay, timeout):
    conn = registered
    before = snapshot(conn)
    try:
        conn.execute("select pgflow.start('wf', '[]', delay => %s, timeout => %s)",
                     (delay, timeout))
    except psycopg.Error as exc:
        assert exc.sqlstate == BAD_ARGUMENT, f"{exc.sqlstate}: {exc}"
        assert snapshot(conn) == before


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


@given(name=st.one_of(st.just("wf"), st.just(WEIRD_NAME), nasty_text),
       args=st.lists(json_values, max_size=3), key=st.one_of(st.none(), nasty_text),
       queue=st.one_of(st.none(), nasty_text), delay=durations,
       priority=st.one_of(st.integers(), st.floats(), st.booleans()))
@example(name="wf", args=[], key=None, queue=None, delay=float("nan"), priority=0)
@example(name="wf", args=[], key=None, queue=None, delay=10**15, priority=0)
@example(name="wf", args=["a\x00b"], key=None, queue=None, delay=None, priority=0)
@example(name="wf\x00", args=[], key=None, queue=None, delay=None, priority=0)
def test_client_start_either_starts_the_run_or_raises_one_clear_error(
        registered, name, args, key, queue, delay, priority):
    conn = registered
    before = snapshot(conn)
    try:
        run_id = pgflow.start(conn, name, *args, key=key, queue=queue, delay=delay,
                              priority=priority)
    except Exception as exc:
        clear_error(exc)
        assert snapshot(conn) == before
        return
    run = pgflow.get(conn, run_id)
    assert run.name == name and run.key == key
    if len(snapshot(conn)[0]) > len(before[0]):  # a new run, not the one its key names
        assert run.input == json.loads(json.dumps(args))
        assert run.queue == (queue or "default")
    kept(before, snapshot(conn))


@given(run_id=run_ids, call=st.sampled_from(["get", "cancel", "retry", "signal", "get_state",
                                             "result"]),
       name=nasty_text, payload=json_values)
@example(run_id="\x00", call="get", name="x", payload=None)
@example(run_id=uuid.UUID(int=0), call="signal", name="a\x00", payload=None)
@example(run_id=uuid.UUID(int=0), call="get_state", name="k\x00", payload=None)
def test_client_calls_on_garbage_run_ids_raise_one_clear_error(conn, run_id, call, name, payload):
    before = snapshot(conn)
    calls: dict[str, Callable[[], Any]] = {
        "get": lambda: pgflow.get(conn, run_id),
        "cancel": lambda: pgflow.cancel(conn, run_id),
        "retry": lambda: pgflow.retry(conn, run_id),
        "signal": lambda: pgflow.signal(conn, run_id, name, payload),
        "get_state": lambda: pgflow.get_state(conn, run_id, name),
        "result": lambda: pgflow.result(conn, run_id, timeout=0.01),
    }
    with pytest.raises(Exception) as raised:
        calls[call]()
    clear_error(raised.value)
    assert snapshot(conn) == before


@given(run_id=run_ids, name=nasty_text, payload=json_values)
def test_async_client_fails_the_same_way(dsn, run_id, name, payload):
    async def go() -> BaseException:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            for attempt in (aio.get(aconn, run_id), aio.signal(aconn, run_id, name, payload),
                            aio.get_state(aconn, run_id, name), aio.cancel(aconn, run_id)):
                try:
                    await attempt
                except Exception as exc:
                    clear_error(exc)
                else:
                    raise AssertionError("a call on an unknown run succeeded")
            await aconn.execute("select 1")  # still usable
        return None

    asyncio.run(go())


@given(payload=json_values, name=nasty_text)
def test_a_failed_call_leaves_the_callers_transaction_usable_or_clearly_aborted(
        dsn, registered, payload, name):
    conn = registered
    run_id = conn.execute("select pgflow.start('wf', '[]', version => '1')").fetchone()[0]
    before = snapshot(conn)
    with psycopg.connect(dsn) as app:
        app.execute("create temporary table if not exists mine (x int)")
        app.execute("insert into mine values (1)")
        try:
            pgflow.signal(app, run_id, name, payload)
        except Exception as exc:
            clear_error(exc)
            status = app.info.transaction_status
            assert status in (psycopg.pq.TransactionStatus.INTRANS,
                              psycopg.pq.TransactionStatus.INERROR)
            if status == psycopg.pq.TransactionStatus.INTRANS:  # refused before sending
                assert app.execute("select count(*) from mine").fetchone()[0] >= 1
        app.rollback()
    kept(before, snapshot(conn))


# ---------------------------------------------------------------------------
# Durations and retry policies
# ---------------------------------------------------------------------------


@given(max_attempts=st.integers(1, 2**31 - 1), initial=st.integers(0, 36525 * 86400),
       backoff=st.floats(1, 1e300), maximum=st.integers(0, 36525 * 86400),
       attempts=st.integers(1, 1000))
def test_every_valid_policy_schedules_its_back_off_in_sql(conn, max_attempts, initial, backoff,
                                                          maximum, attempts):
    """What Retry accepts, pgflow._backoff computes, and now + it is a timestamp."""
    assume(maximum >= initial)  # a cap below the first interval is refused (test_retry_policy)
    policy = pgflow.Retry(max_attempts=max_attempts, initial_interval=initial, backoff=backoff,
                          max_interval=maximum)
    wait = conn.execute("select pgflow._backoff(%s, %s, %s, %s), pgflow.now() + "
                        "pgflow._backoff(%s, %s, %s, %s) is not null",
                        (policy.initial_interval, policy.backoff, policy.max_interval, attempts) * 2
                        ).fetchone()
    assert timedelta(0) <= wait[0] <= max(policy.initial_interval, policy.max_interval)
    assert wait[1]


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


runner = CliRunner()


def cli_outcome(args: list[str]) -> tuple[int, str, str]:
    result = runner.invoke(cli.app, args, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {result.exception!r}")
    return result.exit_code, result.stdout, result.stderr


def one_error_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 1, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgflow: error: "), stderr
    return lines[0]


@given(input_text=json_texts, key=st.one_of(st.none(), sql_text.filter(lambda t: t != "")))
@example(input_text="[" * 100000, key=None)
@example(input_text='["' + "x" * (3 * 1024 * 1024) + '"]', key=None)
def test_cli_start_prints_an_id_or_one_error_line(dsn, registered, input_text, key):
    args = ["start", "wf", "--input", input_text, "--dsn", dsn]
    if key is not None:
        args += ["--key", key]
    code, stdout, stderr = cli_outcome(args)
    if code == 0:
        uuid.UUID(stdout.strip())
        return
    line = one_error_line(code, stdout, stderr)
    assert any(what in line for what in ("--input", "key", "arguments")), line


@given(payload_text=json_texts, name=sql_text.filter(lambda t: t.strip() and not t.startswith("-")))
def test_cli_signal_delivers_or_prints_one_error_line(dsn, registered, payload_text, name):
    run_id = registered.execute("select pgflow.start('wf', '[]', version => '1')").fetchone()[0]
    code, stdout, stderr = cli_outcome(["signal", str(run_id), name, "--payload", payload_text,
                                        "--dsn", dsn])
    sent = registered.execute("select name, payload::text from pgflow.signals where run_id = %s",
                              (run_id,)).fetchall()
    if code != 0:
        one_error_line(code, stdout, stderr)
        assert sent == []  # a refused signal writes nothing
        return
    # exit 0: the signal is in the run's mailbox, with the payload given (compared as jsonb:
    # numbers keep their exact decimal value there)
    assert stdout.strip() == f"signal {name!r} sent to run {run_id}"
    assert len(sent) == 1 and sent[0][0] == name
    assert registered.execute("select %s::jsonb = %s::jsonb",
                              (sent[0][1], json.dumps(json.loads(payload_text)))).fetchone()[0]


@given(run_id=st.text(max_size=40).filter(lambda t: "\x00" not in t and not t.startswith("-")),
       command=st.sampled_from(["show", "cancel", "retry"]))
def test_cli_commands_on_garbage_run_ids_print_one_error_line(dsn, conn, run_id, command):
    code, stdout, stderr = cli_outcome([command, run_id, "--dsn", dsn, "--yes"]
                                       if command != "show" else [command, run_id, "--dsn", dsn])
    if run_id.strip():
        one_error_line(code, stdout, stderr)
    else:
        assert code != 0


# ---------------------------------------------------------------------------
# Found by the properties: each failure, as a plain test of its concrete example
# ---------------------------------------------------------------------------


def test_found_nul_in_a_payload_is_an_encoding_error_not_a_driver_error(registered):
    # was: psycopg UntranslatableCharacter (22P05) from the jsonb cast
    with pytest.raises(pgflow.EncodingError, match="NUL"):
        pgflow.start(registered, "wf", "a\x00b")
    with pytest.raises(pgflow.EncodingError, match="surrogate"):
        pgflow.start(registered, "wf", {"k": "\ud800"})
    with pytest.raises(pgflow.EncodingError, match="NUL"):
        codec.to_json({"a\x00": 1}, "the value")


@pytest.mark.parametrize("call", ["start_name", "start_key", "start_queue", "signal", "get_state"])
def test_found_nul_in_names_and_keys_is_a_value_error_naming_it(registered, call):
    # was: psycopg.DataError "PostgreSQL text fields cannot contain NUL (0x00) bytes"
    conn = registered
    run_id = conn.execute("select pgflow.start('wf', '[]', version => '1')").fetchone()[0]
    calls = {"start_name": (lambda: pgflow.start(conn, "wf\x00"), "workflow name"),
             "start_key": (lambda: pgflow.start(conn, "wf", key="k\x00"), "key"),
             "start_queue": (lambda: pgflow.start(conn, "wf", queue="q\x00"), "queue"),
             "signal": (lambda: pgflow.signal(conn, run_id, "go\x00"), "signal name"),
             "get_state": (lambda: pgflow.get_state(conn, run_id, "k\x00"), "state key")}
    fn, what = calls[call]
    with pytest.raises(ValueError, match=f"{what} must not contain a NUL"):
        fn()


def test_found_deep_nesting_is_an_encoding_error(registered):
    # was: a bare ValueError("Maximum serialization depth exceeded"), retried as a step failure
    deep: list[Any] = []
    for _ in range(500):
        deep = [deep]
    with pytest.raises(pgflow.EncodingError, match="arguments"):
        pgflow.start(registered, "wf", deep)


@pytest.mark.parametrize(("value", "message"), [
    (float("nan"), "finite"), (float("inf"), "finite"), (1e300, "at most"),
    (10**15, "at most"), (timedelta(days=36526), "at most")])
def test_found_invalid_durations_are_value_errors_naming_them(registered, value, message):
    # was: "cannot convert float NaN to integer", OverflowError, or SQL 22008 timestamp out of range
    with pytest.raises(ValueError, match=f"delay must .*{message}|delay must be {message}"):
        pgflow.start(registered, "wf", delay=value)
    with pytest.raises(ValueError, match="initial_interval"):
        pgflow.Retry(initial_interval=value)


def test_found_result_with_a_nan_timeout_is_refused(registered):
    # was: a NaN deadline never passes: result() waited forever
    run_id = registered.execute("select pgflow.start('wf', '[]', version => '1')").fetchone()[0]
    with pytest.raises(ValueError, match="timeout"):
        pgflow.result(registered, run_id, timeout=float("nan"))
    with pytest.raises(TypeError, match="timeout"):
        pgflow.result(registered, run_id, timeout="5")  # type: ignore[arg-type]


@pytest.mark.parametrize(("named", "message"), [
    ({"name": "x" * 201}, "workflow name must be at most 200 characters"),
    ({"key": "k" * 1025}, "key must be at most 1024 bytes"),
    ({"queue": "q" * 201}, "queue must be at most 200 characters"),
    ({"version": "v" * 201}, "version must be at most 200 characters"),
    ({"delay": timedelta(days=365250)}, "delay must be at most 100 years"),
    ({"timeout": timedelta(days=-1)}, "timeout must be positive")])
def test_found_sql_start_names_the_argument_out_of_bounds(conn, named, message):
    # was: check_violation (23514) naming a constraint, or 22008 timestamp out of range
    params = {"name": "wf", "key": None, "queue": None, "version": "1", "delay": None,
              "timeout": None, **named}
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        conn.execute("select pgflow.start(%(name)s, '[]', key => %(key)s, queue => %(queue)s,"
                     " version => %(version)s, delay => %(delay)s, timeout => %(timeout)s)",
                     params)
    assert message in exc.value.diag.message_primary
    assert conn.execute("select count(*) from pgflow.runs").fetchone()[0] == 0


def test_found_sql_worker_procedures_refuse_malformed_input_with_pf002(conn, leased):
    worker, claim = leased
    # was: 54000 "index row requires 9032 bytes" (state key), 23514 (continue_as_new with a
    # scalar), 22023 "cannot get array length of a scalar" (map)
    with raises_sqlstate(BAD_ARGUMENT) as exc:
        worker.db.execute("select pgflow.set_state(%s, %s, %s, '1')",
                          (claim.run_id, claim.token, INCOMPRESSIBLE_KEY))
    assert "state key must be at most 1024 bytes" in exc.value.diag.message_primary
    with raises_sqlstate(BAD_ARGUMENT):
        worker.db.execute("select pgflow.continue_as_new(%s, %s, '5')", (claim.run_id, claim.token))
    with raises_sqlstate(BAD_ARGUMENT):
        worker.db.execute("select pgflow.map(%s, %s, 0, 'm', '5', 'default', 'map')",
                          (claim.run_id, claim.token))
    with raises_sqlstate(BAD_ARGUMENT):
        worker.db.execute("select pgflow.map(%s, %s, 0, 'm', '[5]', 'default', 'map')",
                          (claim.run_id, claim.token))
    assert conn.execute("select status from pgflow.runs where id = %s",
                        (claim.run_id,)).fetchone()[0] == "running"


def test_found_cli_deeply_nested_input_is_one_clear_line(dsn, registered):
    # was: "pgflow: error: RecursionError: maximum recursion depth exceeded ..."
    line = one_error_line(*cli_outcome(["start", "wf", "--input", "[" * 100000, "--dsn", dsn]))
    assert line == "pgflow: error: --input is nested too deeply"


def test_found_cli_since_too_far_back_is_one_clear_line(dsn, conn):
    # was: "pgflow: error: OverflowError: date value out of range"
    line = one_error_line(*cli_outcome(["list", "--since", "99999999d", "--dsn", dsn]))
    assert "--since" in line and "OverflowError" not in line
