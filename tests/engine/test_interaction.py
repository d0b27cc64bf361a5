"""Signals, published state, cancellation, children, sagas, continue-as-new (in-process worker)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

import pgflow
from pgflow.testing import advance_time
from tests.support.helpers import wait_for, wait_status
from tests.support.workflows.effects import record

# --- loan approval -----------------------------------------------------------------------


@pgflow.step
def record_decision(loan_id: str, decision: str) -> str:
    record(loan_id, decision)
    return decision


@pgflow.workflow(name="loan_approval")
def loan_approval(ctx: pgflow.Context, loan_id: str, amount: int) -> str:
    if amount < 5000:
        return record_decision(loan_id, "approved")
    ctx.set_state("stage", "awaiting review")
    try:
        review = ctx.wait_for_signal("review", timeout=timedelta(days=14))
    except pgflow.SignalTimeout:
        ctx.set_state("stage", "expired")
        return record_decision(loan_id, "expired")
    ctx.set_state("stage", f"reviewed by {review['by']}")
    return record_decision(loan_id, "approved" if review["approve"] else "denied")


@pytest.fixture
def loans(conn, effects, inprocess_worker):
    inprocess_worker.start([loan_approval])
    return conn


def test_small_loans_are_approved_without_review(loans, effects):
    run_id = pgflow.start(loans, loan_approval, "L-1", 1200)
    assert pgflow.result(loans, run_id, timeout=60) == "approved"
    assert effects.per_step("L-1") == {"approved": 1}


@pytest.mark.parametrize(("approve", "decision"), [(True, "approved"), (False, "denied")])
def test_large_loans_wait_for_a_review(loans, effects, approve, decision):
    run_id = pgflow.start(loans, loan_approval, "L-2", 25_000)
    wait_status(loans, run_id, "waiting")
    assert pgflow.get_state(loans, run_id, "stage") == "awaiting review"
    assert loans.execute("select kind from pgflow.waits where run_id = %s",
                         (run_id,)).fetchall() == [("signal",)]
    pgflow.signal(loans, run_id, "review", {"approve": approve, "by": "ana"})
    assert pgflow.result(loans, run_id, timeout=60) == decision
    assert pgflow.get_state(loans, run_id, "stage") == "reviewed by ana"
    assert effects.per_step("L-2") == {decision: 1}
    assert loans.execute("select count(*) from pgflow.timers").fetchone()[0] == 0


def test_an_unreviewed_loan_expires_after_14_days(loans, effects):
    run_id = pgflow.start(loans, loan_approval, "L-3", 9_000)
    wait_status(loans, run_id, "waiting")
    assert advance_time(loans, timedelta(days=13)) == 0
    assert advance_time(loans, timedelta(days=2)) == 1
    assert pgflow.result(loans, run_id, timeout=60) == "expired"
    assert effects.per_step("L-3") == {"expired": 1}
    with pytest.raises(pgflow.RunStateError, match="receives no more signals"):
        pgflow.signal(loans, run_id, "review", {"approve": True, "by": "late"})


# --- signals before the waits --------------------------------------------------------------


@pgflow.step
def warm_up() -> None:
    time.sleep(0.2)


@pgflow.workflow(name="collector")
def collector(ctx: pgflow.Context, n: int) -> list:
    warm_up()
    return [ctx.wait_for_signal("item") for _ in range(n)]


def test_signals_sent_before_the_waits_arrive_in_order_once_each(conn, inprocess_worker):
    inprocess_worker.start([collector])
    with conn.transaction():  # the same transaction as the start
        run_id = pgflow.start(conn, collector, 5)
        for i in range(5):
            pgflow.signal(conn, run_id, "item", {"n": i})
        pgflow.signal(conn, run_id, "other", "not for these waits")
    assert pgflow.result(conn, run_id, timeout=60) == [{"n": i} for i in range(5)]
    consumed = conn.execute("select payload, consumed_seq from pgflow.signals where run_id = %s"
                            " order by id", (run_id,)).fetchall()
    assert consumed == [({"n": i}, i + 1) for i in range(5)] + [("not for these waits", None)]


# --- the booking saga ---------------------------------------------------------------------


class CarUnavailable(Exception):
    pass


@pgflow.step
def reserve_flight(trip: str) -> str:
    record(trip, "reserve_flight")
    return f"FL-{trip}"


@pgflow.step
def reserve_hotel(trip: str) -> str:
    record(trip, "reserve_hotel")
    return f"HT-{trip}"


@pgflow.step(retry=pgflow.Retry(max_attempts=3, non_retryable=(CarUnavailable,)))
def reserve_car(trip: str) -> str:
    record(trip, "reserve_car")
    raise CarUnavailable("no cars left at the airport")


@pgflow.step
def cancel_hotel(booking: str) -> None:
    record(booking.split("-", 1)[1], "cancel_hotel")


@pgflow.step
def cancel_flight(booking: str) -> None:
    record(booking.split("-", 1)[1], "cancel_flight")


@pgflow.workflow(name="book_trip")
def book_trip(ctx: pgflow.Context, trip: str) -> str:
    with ctx.saga() as saga:
        flight = reserve_flight(trip)
        saga.add(cancel_flight, flight)
        hotel = reserve_hotel(trip)
        saga.add(cancel_hotel, hotel)
        reserve_car(trip)
    return "booked"


@pgflow.workflow(name="book_trip_async")
async def book_trip_async(ctx: pgflow.Context, trip: str) -> str:
    async with ctx.saga() as saga:
        flight = await reserve_flight(trip)
        saga.add(cancel_flight, flight)
        hotel = await reserve_hotel(trip)
        saga.add(cancel_hotel, hotel)
        await reserve_car(trip)
    return "booked"


@pytest.mark.parametrize("flow", [book_trip, book_trip_async], ids=["def", "async"])
def test_booking_saga_undoes_hotel_then_flight_when_the_car_fails(conn, effects,
                                                                    inprocess_worker, flow):
    inprocess_worker.start([flow])
    run_id = pgflow.start(conn, flow, "T1")
    with pytest.raises(pgflow.WorkflowFailed) as info:
        pgflow.result(conn, run_id, timeout=60)
    assert "CarUnavailable" in info.value.message and "no cars left" in info.value.message
    order = [r[0] for r in conn.execute(
        "select step from public.effects where run_id = 'T1' order by id")]
    assert order == ["reserve_flight", "reserve_hotel", "reserve_car", "cancel_hotel",
                     "cancel_flight"]
    steps = [(s.name, s.status, s.attempts) for s in pgflow.get(conn, run_id).steps]
    assert steps == [("reserve_flight", "completed", 1), ("reserve_hotel", "completed", 1),
                     ("reserve_car", "failed", 1), ("cancel_hotel", "completed", 1),
                     ("cancel_flight", "completed", 1)]


# --- a long batch job, cancelled ----------------------------------------------------------


@pgflow.step
def process_batch(run_id: str, batch: int) -> int:
    record(run_id, "batch")
    time.sleep(0.02)
    return batch


@pgflow.step
def release_resources(run_id: str) -> None:
    record(run_id, "cleanup")


@pgflow.workflow(name="batch_job")
def batch_job(ctx: pgflow.Context, batches: int) -> str:
    run_id = str(ctx.workflow_id)
    try:
        for batch in range(batches):
            process_batch(run_id, batch)
            ctx.set_state("progress", {"done": batch + 1, "of": batches})
    finally:
        release_resources(run_id)  # runs on cancellation too
    return "all done"


def test_a_cancelled_batch_job_stops_and_keeps_its_progress(conn, effects, inprocess_worker):
    inprocess_worker.start([batch_job])
    # far more batches than any machine gets through before the cancel lands (hours of them)
    batches_in_job = 1_000_000
    run_id = pgflow.start(conn, batch_job, batches_in_job)
    wait_for(lambda: (pgflow.get_state(conn, run_id, "progress") or {"done": 0})["done"] >= 5,
             timeout=60, what="a few batches done")
    assert pgflow.cancel(conn, run_id) is True
    with pytest.raises(pgflow.WorkflowCancelled):
        pgflow.result(conn, run_id, timeout=60)
    assert pgflow.get(conn, run_id).status == "cancelled"

    done = pgflow.get_state(conn, run_id, "progress")["done"]
    assert 5 <= done < batches_in_job
    batches = effects.count(run_id, "batch")
    assert batches == done  # the batch in flight finished and published; none started after
    assert effects.count(run_id, "cleanup") == 1
    time.sleep(0.5)
    assert effects.count(run_id, "batch") == batches  # nothing runs after the cancel
    assert pgflow.cancel(conn, run_id) is False


# --- children -------------------------------------------------------------------------------


@pgflow.workflow(name="child_double")
def child_double(ctx: pgflow.Context, n: int) -> int:
    return n * 2


@pgflow.workflow(name="child_fails")
def child_fails(ctx: pgflow.Context) -> None:
    raise ValueError("the child broke")


@pgflow.workflow(name="child_sleeps")
def child_sleeps(ctx: pgflow.Context) -> None:
    ctx.sleep(timedelta(days=1))


@pgflow.workflow(name="parent_of_children")
def parent_of_children(ctx: pgflow.Context) -> dict:
    handle = ctx.start_child(child_double, 21)
    caught = None
    try:
        ctx.call(child_fails)
    except pgflow.ChildFailed as exc:
        caught = f"{exc.error_type}: {exc.message}"
    return {"double": handle.result(), "caught": caught, "child": str(handle.run_id)}


@pgflow.workflow(name="parent_async")
async def parent_async(ctx: pgflow.Context) -> list:
    handle = await ctx.start_child(child_double, 5)
    return [await ctx.call(child_double, 1), await handle.result()]


@pgflow.workflow(name="parent_waits_on_sleeper")
def parent_waits_on_sleeper(ctx: pgflow.Context) -> None:
    ctx.call(child_sleeps)


def test_children_results_and_failures(conn, inprocess_worker):
    inprocess_worker.start([parent_of_children, parent_async, child_double, child_fails])
    run_id = pgflow.start(conn, parent_of_children)
    out = pgflow.result(conn, run_id, timeout=60)
    assert out["double"] == 42
    assert out["caught"] == "ValueError: the child broke"
    child = pgflow.get(conn, out["child"])
    assert child.parent_id == run_id and child.status == "completed"
    assert pgflow.result(conn, pgflow.start(conn, parent_async), timeout=60) == [2, 10]


def test_cancelling_a_parent_cancels_the_child_it_waits_for(conn, inprocess_worker):
    inprocess_worker.start([parent_waits_on_sleeper, child_sleeps])
    run_id = pgflow.start(conn, parent_waits_on_sleeper)
    wait_status(conn, run_id, "waiting")
    child_id = conn.execute("select id from pgflow.runs where parent_id = %s",
                            (run_id,)).fetchone()[0]
    wait_status(conn, child_id, "sleeping")
    pgflow.cancel(conn, run_id)
    with pytest.raises(pgflow.WorkflowCancelled):
        pgflow.result(conn, run_id, timeout=60)
    wait_status(conn, child_id, "cancelled")


# --- continue-as-new ------------------------------------------------------------------------


@pgflow.workflow(name="countdown")
def countdown(ctx: pgflow.Context, n: int, seen: list) -> list:
    seen = [*seen, ctx.step("visit", lambda: n)]
    if n > 0:
        ctx.continue_as_new(n - 1, seen)
    return seen


def test_continue_as_new_starts_afresh_under_the_same_key(conn, inprocess_worker):
    inprocess_worker.start([countdown])
    first = pgflow.start(conn, countdown, 3, [], key="countdown-1")
    assert pgflow.result(conn, first, timeout=60) == [3, 2, 1, 0]
    runs = conn.execute("select key, continued_as is not null, jsonb_array_length(input -> 1)"
                        " from pgflow.runs order by created_at").fetchall()
    assert runs == [(None, True, 0), (None, True, 1), (None, True, 2), ("countdown-1", False, 3)]
    # every run's journal is fresh: one step each
    assert conn.execute("select count(*) from pgflow.steps").fetchone()[0] == 4
    # the key now names the last run: starting again returns it
    assert pgflow.start(conn, countdown, 3, [], key="countdown-1") != first
