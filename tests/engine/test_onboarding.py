"""The three-week onboarding workflow, driven through its weeks with advance_time."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

import pgflow
from pgflow.testing import advance_time
from tests.support.helpers import wait_for
from tests.support.workflows.effects import _conn, record

DAY = timedelta(days=1)


def _verified(customer: str) -> bool:
    row = _conn().execute("select 1 from public.verified where customer = %s",
                          (customer,)).fetchone()
    return row is not None


@pgflow.step
def create_account(customer: str) -> str:
    record(customer, "create_account")
    return f"acct-{customer}"


@pgflow.step
def is_verified(customer: str) -> bool:
    return _verified(customer)


@pgflow.step
def send_reminder(customer: str) -> None:
    record(customer, "send_reminder")


@pgflow.step
def deactivate(customer: str) -> None:
    record(customer, "deactivate")


@pgflow.step
def welcome_bonus(customer: str) -> None:
    record(customer, "welcome_bonus")


class CardDeclined(Exception):
    pass


@pgflow.step(retry=pgflow.Retry(max_attempts=1))
def charge(customer: str) -> str:
    attempt = record(customer, "charge")
    failures = _conn().execute("select failures from public.cards where customer = %s",
                               (customer,)).fetchone()
    if failures and attempt <= failures[0]:
        raise CardDeclined(f"declined ({attempt})")
    return f"paid-{attempt}"


@pgflow.step
def suspend_account(customer: str) -> None:
    record(customer, "suspend_account")


@pgflow.step
def notify_support(customer: str) -> None:
    record(customer, "notify_support")


@pgflow.workflow(name="onboarding")
def onboarding(ctx: pgflow.Context, customer: str) -> str:
    create_account(customer)
    ctx.sleep(DAY)
    if not is_verified(customer):
        send_reminder(customer)
    ctx.sleep(5 * DAY)
    if not is_verified(customer):
        deactivate(customer)
        return "deactivated"
    welcome_bonus(customer)
    ctx.sleep(14 * DAY)
    for charges in range(1, 4):
        try:
            return charge(customer)
        except pgflow.StepFailed:
            if charges < 3:
                ctx.sleep(DAY)
    suspend_account(customer)
    notify_support(customer)
    return "suspended"


def _settle(conn: psycopg.Connection) -> None:
    """Wait until no run is pending or running: every run sleeps or has finished."""
    wait_for(lambda: conn.execute(
        "select count(*) from pgflow.runs where status in ('pending', 'running')"
    ).fetchone()[0] == 0, timeout=60, what="runs to settle")


@pytest.fixture
def customers(conn, effects):
    conn.execute("create table public.verified (customer text primary key)")
    conn.execute("create table public.cards (customer text primary key, failures int)")
    conn.execute("insert into public.verified values ('early'), ('flaky'), ('dead')")
    conn.execute("insert into public.cards values ('flaky', 2), ('dead', 99)")
    return ["early", "late", "never", "flaky", "dead"]


def test_three_weeks_of_onboarding_in_seconds(conn, effects, customers, inprocess_worker):
    inprocess_worker.start([onboarding])
    runs = {c: pgflow.start(conn, onboarding, c, key=f"onboard:{c}") for c in customers}

    _settle(conn)                                    # day 0: accounts created, all asleep
    assert advance_time(conn, DAY) == 5
    _settle(conn)                                    # day 1: reminders for the unverified
    conn.execute("insert into public.verified values ('late')")
    assert advance_time(conn, 5 * DAY) == 5
    _settle(conn)                                    # day 6: 'never' deactivated, others bonus
    assert advance_time(conn, 14 * DAY) == 4
    _settle(conn)                                    # day 20: charges; two cards declined
    assert advance_time(conn, DAY) == 2
    _settle(conn)                                    # day 21: second charges; both declined
    assert advance_time(conn, DAY) == 2
    _settle(conn)                                    # day 22: 'flaky' paid, 'dead' suspended

    outputs = {c: pgflow.result(conn, rid, timeout=60) for c, rid in runs.items()}
    assert outputs == {"early": "paid-1", "late": "paid-1", "never": "deactivated",
                       "flaky": "paid-3", "dead": "suspended"}
    expected = {
        "early": {"create_account": 1, "welcome_bonus": 1, "charge": 1},
        "late": {"create_account": 1, "send_reminder": 1, "welcome_bonus": 1, "charge": 1},
        "never": {"create_account": 1, "send_reminder": 1, "deactivate": 1},
        "flaky": {"create_account": 1, "welcome_bonus": 1, "charge": 3},
        "dead": {"create_account": 1, "welcome_bonus": 1, "charge": 3, "suspend_account": 1,
                 "notify_support": 1},
    }
    assert {c: effects.per_step(c) for c in customers} == expected
    # the declined charges are kept with their errors, queryable in SQL
    declined = conn.execute(
        "select count(*), min(a.error ->> 'type') from pgflow.step_attempts a"
        " join pgflow.runs r on r.id = a.run_id where r.key = 'onboard:dead'").fetchone()
    assert declined == (3, "tests.engine.test_onboarding.CardDeclined")
    # every sleep is in the journal with the time it was due
    sleeps = conn.execute(
        "select count(*) from pgflow.steps s join pgflow.runs r on r.id = s.run_id"
        " where r.key = 'onboard:dead' and s.kind = 'sleep' and s.status = 'completed'"
    ).fetchone()[0]
    assert sleeps == 5
    assert conn.execute("select count(*) from pgflow.timers").fetchone()[0] == 0
