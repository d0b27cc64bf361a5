"""Flow control from Python: Concurrency, RateLimit, set_queue, pause/resume, concurrency_key.

The SQL underneath is tested procedure by procedure in
``tests/sql/test_sql_flow_control.py``; real worker processes racing under
limits in ``tests/processes/test_flow_control.py``.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgflow
import pgflow.aio
from pgflow import procedures
from pgflow.flow import key_text, list_queues, parse_rate
from tests.support.helpers import wait_for


@pgflow.workflow(name="fc_charge", queue="fc_billing",
                 concurrency=pgflow.Concurrency(limit=1, key="customer"))
def fc_charge(ctx: pgflow.Context, customer: str, cents: int = 0, region: str = "eu") -> str:
    return f"{customer}:{cents}"


@pgflow.workflow(name="fc_by_region", queue="fc_billing",
                 concurrency=pgflow.Concurrency(limit=2, key="region"))
def fc_by_region(ctx: pgflow.Context, customer: str, region: str = "eu") -> str:
    return region


@pgflow.workflow(name="fc_nap", queue="fc_naps", concurrency=pgflow.Concurrency(limit=1, key="k"))
def fc_nap(ctx: pgflow.Context, k: str, hours: int) -> str:
    ctx.sleep(timedelta(hours=hours))
    return k


@pgflow.workflow(name="fc_quick", queue="fc_capped")
def fc_quick(ctx: pgflow.Context, i: int) -> int:
    return i


def _key(conn: Any, run_id: Any) -> str | None:
    return conn.execute("select concurrency_key from pgflow.runs where id = %s",
                        (run_id,)).fetchone()[0]


# -- declaring limits ----------------------------------------------------------------------


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: pgflow.Concurrency(0), ValueError, "between 1 and 100000"),
    (lambda: pgflow.Concurrency(True), TypeError, "must be an int"),
    (lambda: pgflow.Concurrency(2, key=""), ValueError, "Concurrency key"),
    (lambda: pgflow.RateLimit(0, per=1), ValueError, "between 1 and 100000"),
    (lambda: pgflow.RateLimit(10, per=timedelta(0)), ValueError, "must be positive"),
    (lambda: pgflow.RateLimit(10, per="1s"), TypeError, "per"),
])
def test_bad_limits_are_refused_where_they_are_written(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_concurrency_key_must_name_a_parameter():
    def charge(ctx, customer: str, *rest: Any) -> None: ...

    with pytest.raises(ValueError, match=r"key 'client' of workflow 'charge_x' is not one of "
                                         r"its parameters \(customer\)"):
        pgflow.workflow(name="charge_x", concurrency=pgflow.Concurrency(1, key="client"))(charge)
    with pytest.raises(ValueError, match="is not one of its parameters"):
        pgflow.workflow(name="charge_y", concurrency=pgflow.Concurrency(1, key="rest"))(charge)
    with pytest.raises(TypeError, match=r"must be a pgflow\.Concurrency"):
        pgflow.workflow(name="charge_z", concurrency=3)(charge)  # type: ignore[arg-type]


def test_rates_parse_from_text_and_print_back():
    assert parse_rate("100/1m") == pgflow.RateLimit(100, per=timedelta(minutes=1))
    assert parse_rate("10/s") == pgflow.RateLimit(10, per=timedelta(seconds=1))
    assert str(parse_rate(" 5000 / 2h ")) == "5000/2h"
    assert str(pgflow.RateLimit(3, per=timedelta(milliseconds=1500))) == "3/1500ms"
    for bad in ("100", "0/1m", "10/1y", "ten/1m", "-1/1m"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)


def test_key_text_matches_what_sql_reads_from_json():
    assert [key_text(v) for v in ("c1", 42, 1.5, True, None, [1, "a"])] == [
        "c1", "42", "1.5", "true", None, '[1, "a"]']


# -- the key of a run -----------------------------------------------------------------------


def test_the_key_comes_from_the_argument_its_default_or_the_override(conn):
    assert _key(conn, pgflow.start(conn, fc_charge, "c1", 5)) == "c1"
    assert _key(conn, pgflow.start(conn, fc_charge, customer="c2")) == "c2"
    assert _key(conn, pgflow.start(conn, fc_by_region, "c3")) == "eu"  # the default
    assert _key(conn, pgflow.start(conn, fc_charge, "c4", concurrency_key="tenant")) == "tenant"
    with pytest.raises(ValueError, match="concurrency_key must be a non-empty string"):
        pgflow.start(conn, fc_charge, "c5", concurrency_key="")


def test_a_run_started_by_name_gets_its_key_from_the_input_in_sql(conn, inprocess_worker):
    inprocess_worker.start([fc_charge])  # announces the limit and the parameters
    wait_for(lambda: conn.execute("select concurrency_param from pgflow.workflows"
                                  " where name = 'fc_charge'").fetchone() == ("customer",),
             what="the worker's announcement")
    run = pgflow.start(conn, "fc_charge", customer="c9", cents=1)
    assert _key(conn, run) == "c9"
    assert pgflow.result(conn, run, timeout=60) == "c9:1"


# -- limits at work -------------------------------------------------------------------------


def test_a_sleeping_run_holds_no_slot(conn, inprocess_worker):
    inprocess_worker.start([fc_nap])
    sleeper = pgflow.start(conn, fc_nap, "k", 1)
    wait_for(lambda: conn.execute("select status from pgflow.runs where id = %s",
                                  (sleeper,)).fetchone()[0] == "sleeping", what="the nap")
    other = pgflow.start(conn, fc_nap, "k", 0)
    assert pgflow.result(conn, other, timeout=60) == "k"  # while the first one sleeps
    pgflow.testing.advance_time(conn, timedelta(hours=1))
    assert pgflow.result(conn, sleeper, timeout=60) == "k"


def test_a_capped_queue_costs_its_worker_one_claim_a_run(conn, inprocess_worker, monkeypatch):
    """Each run's code end wakes the worker for one claim, which gives its slot back and
    takes the next run (revisions 0014, 0015). Neither the completion of a run whose slot
    a claim gave back nor a NOTIFY for a slot the claim took again wakes it once more: that
    claim would find the cap full, and mark the queue starved for the next one to wake."""
    runs = 30
    claims: list[int] = []
    claim_runs = procedures.claim_runs

    async def counted(*args: Any, **kwargs: Any) -> list[procedures.ClaimedRun]:
        claimed = await claim_runs(*args, **kwargs)
        claims.append(len(claimed))
        return claimed

    monkeypatch.setattr(procedures, "claim_runs", counted)
    pgflow.set_queue(conn, "fc_capped", concurrency=1)
    for i in range(runs):
        pgflow.start(conn, fc_quick, i)
    inprocess_worker.start([fc_quick], concurrency=4, poll_interval=3600)
    # Polled, not result(): watching a pending run wakes its worker (revision 0013).
    wait_for(lambda: conn.execute("select count(*) from pgflow.runs where status = 'completed'"
                                  ).fetchone()[0] == runs, what="the runs", timeout=60)
    # The first claim, the guard's claim before waiting (cap full), one a run after.
    assert sum(claims) == runs and len(claims) <= runs + 2, claims


def test_queue_settings_round_trip_and_show_in_the_queues_view(conn):
    info = pgflow.set_queue(conn, "fc_mail", concurrency=3,
                            rate_limit=pgflow.RateLimit(100, per=timedelta(minutes=1)))
    assert (info.name, info.concurrency, str(info.rate_limit)) == ("fc_mail", 3, "100/1m")
    pgflow.pause_queue(conn, "fc_mail")
    pgflow.start(conn, fc_charge, "c1", queue="fc_mail")
    [row] = [q for q in list_queues(conn) if q.name == "fc_mail"]
    assert (row.paused, row.pending, row.running) == (True, 1, 0)
    pgflow.resume_queue(conn, "fc_mail")
    info = pgflow.set_queue(conn, "fc_mail")  # no caps
    assert (info.concurrency, info.rate_limit, info.paused) == (None, None, False)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"concurrency": 0}, ValueError, "queue concurrency must be between 1 and 100000"),
    ({"concurrency": "3"}, TypeError, "queue concurrency must be an int"),
    ({"rate_limit": 10}, TypeError, "rate_limit must be a pgflow.RateLimit"),
])
def test_bad_queue_settings_raise_and_write_nothing(conn, kwargs, error, message):
    with pytest.raises(error, match=message):
        pgflow.set_queue(conn, "fc_bad", **kwargs)
    with pytest.raises(ValueError, match="queue"):
        pgflow.pause_queue(conn, "")
    assert conn.execute("select count(*) from pgflow.queue_settings").fetchone()[0] == 0


def test_the_asyncio_client_sets_pauses_and_resumes(dsn):
    async def scenario() -> tuple[Any, ...]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            info = await pgflow.aio.set_queue(aconn, "fc_async", concurrency=2)
            await pgflow.aio.pause_queue(aconn, "fc_async")
            cur = await aconn.execute("select paused from pgflow.queue_settings")
            paused = (await cur.fetchone())[0]
            await pgflow.aio.resume_queue(aconn, "fc_async")
            run = await pgflow.aio.start(aconn, fc_charge, "c1", concurrency_key="t")
            cur = await aconn.execute("select concurrency_key from pgflow.runs where id = %s",
                                      (run,))
            return info.concurrency, paused, (await cur.fetchone())[0]

    assert asyncio.run(scenario()) == (2, True, "t")
