"""Replay, typed payloads, failures and retries, run by an in-process worker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import uuid
from decimal import Decimal

import pydantic
import pytest

import pgflow
from tests.support.helpers import backoffs, log_timers, wait_status
from tests.support.workflows.effects import record

FAST = pgflow.Retry(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=1)


class Order(pydantic.BaseModel):
    id: uuid.UUID
    total: Decimal
    placed: dt.datetime


@dataclasses.dataclass
class Receipt:
    order_id: uuid.UUID
    charged: Decimal


@pgflow.step
def price(order: Order) -> Receipt:
    return Receipt(order.id, order.total * 2)


@pgflow.step(retry=FAST)
def flaky_once(run_id: str, receipt: Receipt) -> str:
    # the replayed receipt must arrive typed, not as a dict
    assert isinstance(receipt, Receipt) and isinstance(receipt.charged, Decimal)
    if record(run_id, "flaky_once") == 1:
        raise ConnectionError("transient")
    return f"ok {receipt.charged}"


@pgflow.workflow(name="replay_typed")
def typed(ctx: pgflow.Context, order: Order, at: dt.datetime) -> dict[str, str]:
    assert isinstance(order, Order) and isinstance(at, dt.datetime)
    receipt = price(order)
    return {"receipt": flaky_once(str(ctx.workflow_id), receipt), "id": str(receipt.order_id)}


def test_typed_payloads_survive_replay(conn, effects, inprocess_worker):
    inprocess_worker.start([typed])
    order = Order(id=uuid.uuid4(), total=Decimal("12.50"),
                  placed=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    run_id = pgflow.start(conn, typed, order, dt.datetime.now(dt.timezone.utc))
    assert pgflow.result(conn, run_id, timeout=60) == {"receipt": "ok 25.00", "id": str(order.id)}
    run = pgflow.get(conn, run_id)
    assert [(s.name, s.status, s.attempts) for s in run.steps] == [
        ("price", "completed", 1), ("flaky_once", "completed", 2)]
    assert run.steps[0].output == {"order_id": str(order.id), "charged": "25.00"}


@pgflow.step(retry=pgflow.Retry(max_attempts=3, initial_interval=0.3, backoff=2.0))
def always_fails(run_id: str) -> None:
    record(run_id, "always_fails")
    raise ValueError("nope")


class Fatal(Exception):
    pass


@pgflow.step(retry=pgflow.Retry(max_attempts=5, initial_interval=0.05, non_retryable=(Fatal,)))
def fails_fatally(run_id: str) -> None:
    record(run_id, "fails_fatally")
    raise Fatal("card declined")


@pgflow.workflow(name="replay_catches")
def catches(ctx: pgflow.Context) -> str:
    try:
        always_fails(str(ctx.workflow_id))
    except pgflow.StepFailed as exc:
        return f"{exc.step}/{exc.error_type}/{exc.message}/{exc.attempts}"
    return "unreachable"


@pgflow.workflow(name="replay_fatal")
def fatal(ctx: pgflow.Context) -> None:
    fails_fatally(str(ctx.workflow_id))


def test_retries_back_off_in_the_database_and_step_failed_is_catchable(conn, effects,
                                                                        inprocess_worker):
    log_timers(conn)
    inprocess_worker.start([catches], poll_interval=0.05)
    run_id = pgflow.start(conn, catches)
    assert pgflow.result(conn, run_id, timeout=60) == "always_fails/ValueError/nope/3"
    times = [row[0] for row in conn.execute(
        "select at from public.effects where run_id = %s order by at", (str(run_id),))]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert len(gaps) == 2
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps
    # The back-off is a database timer: 0.3 s, then 0.6 s, exactly as the policy says
    # (read from the timers, not from how soon a busy worker came back), and each
    # attempt began no earlier than its timer was due.
    retries = backoffs(conn, run_id)
    assert [round(b.delay.total_seconds(), 3) for b in retries] == [0.3, 0.6]
    for retry, next_attempt in zip(retries, times[1:], strict=True):
        assert next_attempt >= retry.due, (retry, next_attempt)


def test_non_retryable_error_stops_at_one_attempt_and_fails_the_run(conn, effects,
                                                                      inprocess_worker):
    inprocess_worker.start([fatal])
    run_id = pgflow.start(conn, fatal)
    with pytest.raises(pgflow.WorkflowFailed, match="card declined"):
        pgflow.result(conn, run_id, timeout=60)
    assert effects.count(run_id, "fails_fatally") == 1
    step = pgflow.get(conn, run_id).steps[0]
    assert (step.status, step.attempts, step.error["type"]) == (
        "failed", 1, "tests.engine.test_replay.Fatal")


@pgflow.step
async def async_double(n: int) -> int:
    return n * 2


@pgflow.step
def sync_increment(n: int) -> int:
    return n + 1


@pgflow.workflow(name="replay_async")
async def async_flow(ctx: pgflow.Context, n: int) -> list[int]:
    a = await async_double(n)
    b = await sync_increment(a)
    c = await ctx.step("lambda_step", lambda: b * 10)
    return [a, b, c]


@pgflow.workflow(name="replay_sync_calls_async")
def sync_flow(ctx: pgflow.Context, n: int) -> list[int]:
    a = async_double(n)
    b = ctx.step("square", lambda: a * a)
    return [a, b]


def test_async_and_sync_workflows_and_steps_mix(conn, inprocess_worker):
    inprocess_worker.start([async_flow, sync_flow])
    first = pgflow.start(conn, async_flow, 4)
    second = pgflow.start(conn, sync_flow, 3)
    assert pgflow.result(conn, first, timeout=60) == [8, 9, 90]
    assert pgflow.result(conn, second, timeout=60) == [6, 36]
    assert [s.name for s in pgflow.get(conn, first).steps] == [
        "async_double", "sync_increment", "lambda_step"]


def test_steps_outside_a_workflow_are_plain_calls():
    assert sync_increment(1) == 2
    assert price(Order(id=uuid.uuid4(), total=Decimal(1), placed=dt.datetime.now())).charged == 2


@pgflow.step
def returns_garbage() -> object:
    return object()


@pgflow.workflow(name="replay_garbage")
def garbage(ctx: pgflow.Context) -> None:
    returns_garbage()


def test_unencodable_step_result_fails_the_step_once(conn, inprocess_worker):
    inprocess_worker.start([garbage])
    run_id = pgflow.start(conn, garbage)
    with pytest.raises(pgflow.WorkflowFailed):
        pgflow.result(conn, run_id, timeout=60)
    step = pgflow.get(conn, run_id).steps[0]
    assert (step.status, step.attempts) == ("failed", 1)
    assert step.error["type"] == "pgflow.errors.EncodingError"
    assert "cannot be encoded" in step.error["message"]


def test_input_that_does_not_fit_the_signature_fails_the_run(conn, inprocess_worker):
    inprocess_worker.start([typed])
    run_id = conn.execute(
        "select pgflow.start('replay_typed',"
        " '[{\"id\": \"not-a-uuid\"}, \"2026-01-01T00:00:00Z\"]', version => '1')"
    ).fetchone()[0]
    with pytest.raises(pgflow.WorkflowFailed, match="EncodingError"):
        pgflow.result(conn, run_id, timeout=60)


@pgflow.workflow(name="replay_versions", version="1")
def versions_v1(ctx: pgflow.Context) -> str:
    return "v1"


@pgflow.workflow(name="replay_versions", version="2")
def versions_v2(ctx: pgflow.Context) -> str:
    return "v2"


def test_a_worker_claims_only_the_versions_it_has(conn, inprocess_worker):
    old = pgflow.start(conn, versions_v1)
    new = pgflow.start(conn, versions_v2)
    inprocess_worker.start([versions_v2])
    assert pgflow.result(conn, new, timeout=60) == "v2"
    assert pgflow.get(conn, old).status == "pending"
    inprocess_worker.start([versions_v1])
    assert pgflow.result(conn, old, timeout=60) == "v1"


def test_changed_code_is_a_non_determinism_error(conn, inprocess_worker):
    # A journal recorded by other code: step 0 was 'something_else'.
    run_id = pgflow.start(conn, async_flow, 1)
    conn.execute("insert into pgflow.steps (run_id, seq, name, status, output, started_at,"
                 " finished_at) values (%s, 0, 'something_else', 'completed', '1', now(), now())",
                 (run_id,))
    inprocess_worker.start([async_flow])
    with pytest.raises(pgflow.WorkflowFailed, match="NonDeterminismError"):
        pgflow.result(conn, run_id, timeout=60)
    wait_status(conn, run_id, "failed")
    assert len(pgflow.get(conn, run_id).steps) == 1  # nothing ran on the diverged path
