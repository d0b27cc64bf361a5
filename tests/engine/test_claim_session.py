"""The worker's claim session (pgflow/claims.py): one connection that LISTENs and claims.

Against a real server: what wakes a wait and what does not, timer NOTIFYs reaching the
scheduler while the claim loop waits for a free slot, NOTIFYs that arrive during a claim,
and a connection killed under the session (the next claim reconnects, LISTENs again and
finds what became ready meanwhile).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgflow.claims import READY_CHANNEL, TIMER_CHANNEL, ClaimSession
from tests.support.sqlkit import Worker, start

PAIRS = [("wf", "1")]
LONG = 30.0  # seconds: a wait that should be cut short long before


class Pokes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def notify(conn: psycopg.Connection[Any], channel: str, payload: str = "") -> None:
    conn.execute("select pg_notify(%s, %s)", (channel, payload))


async def timed_wait(session: ClaimSession, *events: asyncio.Event, ready_wakes: bool = True,
                     timeout: float = LONG) -> float:
    began = time.monotonic()
    await session.wait(*events, timeout=timeout, ready_wakes=ready_wakes)
    return time.monotonic() - began


async def notify_soon(conn: psycopg.Connection[Any], channel: str, payload: str = "",
                      delay: float = 0.2) -> None:
    await asyncio.sleep(delay)
    await asyncio.to_thread(notify, conn, channel, payload)


def test_a_ready_notify_for_its_queue_wakes_the_wait_and_others_do_not(dsn, conn):
    worker = Worker(dsn)

    async def scenario() -> tuple[float, float, int]:
        session = ClaimSession(dsn, ["default"], on_timer=Pokes())
        try:
            assert await session.claim(worker.id, PAIRS, 10) == []
            # another queue's NOTIFY: the wait runs to its timeout
            other = asyncio.ensure_future(notify_soon(conn, READY_CHANNEL, "other"))
            idle = await timed_wait(session, asyncio.Event(), timeout=1.0)
            await other
            # its own queue's: the wait ends at once, and the claim finds the run
            run_id = await asyncio.to_thread(start, conn)
            woken = await timed_wait(session, asyncio.Event())
            claimed = await session.claim(worker.id, PAIRS, 10)
            assert [c.run_id for c in claimed] == [run_id]
            return idle, woken, len(claimed)
        finally:
            await session.close()

    idle, woken, claimed = asyncio.run(scenario())
    assert idle >= 0.9  # its timeout (1 s), give or take the clock's resolution
    assert woken < LONG / 2
    assert claimed == 1


def test_an_event_ends_the_wait_and_a_set_one_returns_at_once(dsn):
    worker = Worker(dsn)

    async def scenario() -> tuple[float, float]:
        session = ClaimSession(dsn, ["default"], on_timer=Pokes())
        try:
            await session.claim(worker.id, PAIRS, 10)
            event = asyncio.Event()
            asyncio.get_running_loop().call_later(0.2, event.set)
            by_event = await timed_wait(session, event)
            at_once = await timed_wait(session, event)  # still set
            return by_event, at_once
        finally:
            await session.close()

    by_event, at_once = asyncio.run(scenario())
    assert 0.15 <= by_event < LONG / 2
    assert at_once < LONG / 2


def test_a_new_connection_is_polled_before_it_is_waited_on(dsn, conn):
    """A run made ready before the session LISTENs sends no NOTIFY it can hear: the
    first wait on a fresh connection returns at once, so the loop claims first."""
    worker = Worker(dsn)
    run_id = start(conn)

    async def scenario() -> tuple[float, list[Any]]:
        session = ClaimSession(dsn, ["default"], on_timer=Pokes())
        try:
            waited = await timed_wait(session, asyncio.Event())
            return waited, await session.claim(worker.id, PAIRS, 10)
        finally:
            await session.close()

    waited, claimed = asyncio.run(scenario())
    assert waited < LONG / 2
    assert [c.run_id for c in claimed] == [run_id]


def test_timer_notifies_poke_the_scheduler_while_the_loop_waits_for_a_slot(dsn, conn):
    """ready_wakes=False (no free slot): ready NOTIFYs do not end the wait, timer
    NOTIFYs still reach the scheduler, one poke each."""
    worker = Worker(dsn)
    pokes = Pokes()

    async def scenario() -> float:
        session = ClaimSession(dsn, ["default"], on_timer=pokes)
        try:
            await session.claim(worker.id, PAIRS, 10)
            after_connect = pokes.count  # connecting pokes once (NOTIFYs may have been missed)
            slot_freed = asyncio.Event()

            async def traffic() -> None:
                await notify_soon(conn, READY_CHANNEL, "default")
                await notify_soon(conn, TIMER_CHANNEL)
                await notify_soon(conn, TIMER_CHANNEL)
                await asyncio.sleep(0.3)
                slot_freed.set()

            sender = asyncio.ensure_future(traffic())
            waited = await timed_wait(session, slot_freed, ready_wakes=False)
            await sender
            assert pokes.count - after_connect == 2
            return waited
        finally:
            await session.close()

    assert asyncio.run(scenario()) >= 0.8  # until the slot was freed, not the ready NOTIFY


def test_notifies_sent_together_are_all_seen(dsn, conn):
    """A ready and a timer NOTIFY in one transaction arrive in one packet: the wait
    ends for the ready one and the scheduler is still poked for the timer after it."""
    worker = Worker(dsn)
    pokes = Pokes()

    def both() -> None:
        with conn.transaction():
            notify(conn, READY_CHANNEL, "default")
            notify(conn, TIMER_CHANNEL)

    async def scenario() -> tuple[float, int]:
        session = ClaimSession(dsn, ["default"], on_timer=pokes)
        try:
            await session.claim(worker.id, PAIRS, 10)
            before = pokes.count
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, lambda: loop.run_in_executor(None, both))
            return await timed_wait(session, asyncio.Event()), pokes.count - before
        finally:
            await session.close()

    waited, poked = asyncio.run(scenario())
    assert waited < LONG / 2
    assert poked == 1


def test_notifies_that_arrive_during_a_claim_are_kept_for_the_next_wait(dsn, conn):
    worker = Worker(dsn)

    async def scenario() -> float:
        session = ClaimSession(dsn, ["default"], on_timer=Pokes())
        try:
            await session.claim(worker.id, PAIRS, 10)
            # Hold the claim's transaction open past a NOTIFY: a lock it must wait for.
            blocker = await psycopg.AsyncConnection.connect(dsn)
            await blocker.execute("lock table pgflow.workers in exclusive mode")
            claiming = asyncio.ensure_future(session.claim(worker.id, PAIRS, 10))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(notify, conn, READY_CHANNEL, "default")
            await asyncio.sleep(0.2)
            await blocker.rollback()
            await blocker.close()
            assert await claiming == []
            return await timed_wait(session, asyncio.Event())
        finally:
            await session.close()

    assert asyncio.run(scenario()) < LONG / 2


def test_a_killed_connection_fails_one_claim_and_the_next_reconnects(dsn, conn):
    worker = Worker(dsn)
    pokes = Pokes()

    async def scenario() -> tuple[list[Any], float]:
        session = ClaimSession(dsn, ["default"], on_timer=pokes)
        try:
            await session.claim(worker.id, PAIRS, 10)
            pid = (await session.connect()).info.backend_pid
            await asyncio.to_thread(conn.execute, "select pg_terminate_backend(%s)", (pid,))
            with pytest.raises(psycopg.OperationalError):
                await session.claim(worker.id, PAIRS, 10)
            run_id = await asyncio.to_thread(start, conn)  # its NOTIFY is heard by no one
            poked = pokes.count
            claimed = await session.claim(worker.id, PAIRS, 10)  # reconnects, LISTENs
            assert [c.run_id for c in claimed] == [run_id]
            assert pokes.count == poked + 1  # timer NOTIFYs may have been missed too
            # and LISTENs again: a new start wakes the wait
            await asyncio.to_thread(start, conn)
            return claimed, await timed_wait(session, asyncio.Event())
        finally:
            await session.close()

    _claimed, waited = asyncio.run(scenario())
    assert waited < LONG / 2


def test_a_wait_whose_connection_breaks_returns_and_the_claim_after_reconnects(dsn, conn):
    worker = Worker(dsn)

    async def scenario() -> tuple[float, int]:
        session = ClaimSession(dsn, ["default"], on_timer=Pokes())
        try:
            await session.claim(worker.id, PAIRS, 10)
            pid = (await session.connect()).info.backend_pid
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, lambda: loop.run_in_executor(
                None, conn.execute, "select pg_terminate_backend(%s)", (pid,)))
            waited = await timed_wait(session, asyncio.Event())
            await asyncio.to_thread(start, conn)
            return waited, len(await session.claim(worker.id, PAIRS, 10))
        finally:
            await session.close()

    waited, claimed = asyncio.run(scenario())
    assert waited < LONG / 2
    assert claimed == 1


def guarding_worker(dsn: str) -> tuple[psycopg.Connection[Any], Any]:
    """A worker of this revision (it guards its wake-ups): its connection and id."""
    holder = psycopg.connect(dsn, autocommit=True)
    worker_id = uuid.uuid4()
    holder.execute("select pgflow.register_worker(%s, 'h', 1, array['default'], %s, true)",
                   (worker_id, Jsonb([{"name": "wf", "version": "1", "queue": "default"}])))
    return holder, worker_id


def test_guarded_a_start_wakes_the_session_and_unguarded_it_does_not(dsn, conn):
    holder, worker_id = guarding_worker(dsn)

    async def scenario() -> tuple[float, float, bool]:
        session = ClaimSession(dsn, ["default"], on_timer=Pokes())
        try:
            assert await session.claim(worker_id, PAIRS, 10) == []
            assert not session.guarded and await session.guard() and session.guarded
            soon = asyncio.get_running_loop().call_later(
                0.2, lambda: asyncio.ensure_future(asyncio.to_thread(start, conn)))
            woken = await timed_wait(session, asyncio.Event())
            soon.cancel()
            assert len(await session.claim(worker_id, PAIRS, 10)) == 1

            await session.unguard()  # busy: starts skip the NOTIFY
            late = asyncio.ensure_future(notify_soon(conn, READY_CHANNEL, "other", 0.0))
            await asyncio.to_thread(start, conn)
            idle = await timed_wait(session, asyncio.Event(), timeout=1.0)
            await late
            return woken, idle, session.guarded
        finally:
            await session.close()

    with holder:
        woken, idle, guarded = asyncio.run(scenario())
    assert woken < LONG / 2
    assert idle >= 0.9 and not guarded  # the start's NOTIFY was skipped


def test_a_lost_connection_takes_the_guard_with_it(dsn, conn):
    holder, worker_id = guarding_worker(dsn)

    async def scenario() -> tuple[bool, bool, int]:
        session = ClaimSession(dsn, ["default"], on_timer=Pokes())
        try:
            await session.claim(worker_id, PAIRS, 10)
            assert await session.guard()
            pid = (await session.connect()).info.backend_pid
            await asyncio.to_thread(conn.execute, "select pg_terminate_backend(%s)", (pid,))
            await session.unguard()  # fails quietly: the connection is dropped
            after_loss = session.guarded
            run_id = await asyncio.to_thread(start, conn)  # nobody guards: no NOTIFY
            claimed = await session.claim(worker_id, PAIRS, 10)  # reconnects, finds it
            assert [c.run_id for c in claimed] == [run_id]
            return after_loss, await session.guard(), len(await asyncio.to_thread(
                lambda: conn.execute("select 1 from pg_locks where classid = 7366506"
                                     " and locktype = 'advisory' and database = (select oid"
                                     " from pg_database where datname = current_database())"
                                     ).fetchall()))
        finally:
            await session.close()

    with holder:
        after_loss, guarded_again, locks = asyncio.run(scenario())
    assert not after_loss and guarded_again and locks == 8


@pytest.mark.parametrize("at_code_end", [True, False])
def test_the_next_claim_gives_back_the_slots_of_a_run_whose_code_ended(dsn, conn, at_code_end):
    """Revision 0014: a capped run's slots go back with the session's next claim, and its
    completion waits for that claim; without it (an older schema), with its completion."""
    worker = Worker(dsn)
    conn.execute("select pgflow.set_queue('default', concurrency => 1)")
    first, second = start(conn), start(conn)

    async def scenario() -> tuple[list[uuid.UUID], bool, list[uuid.UUID]]:
        session = ClaimSession(dsn, ["default"], slots_at_code_end=at_code_end)
        try:
            [claimed] = await session.claim(worker.id, PAIRS, 10)
            assert claimed.run_id == first and claimed.limited
            ended = session.code_ended(claimed.run_id, claimed.lease_token)
            waited = not ended.done()  # its completion waits for the next claim
            after = await session.claim(worker.id, PAIRS, 10)
            assert ended.done() and ended.result() is at_code_end  # a claim gave them back
            late = session.code_ended(claimed.run_id, claimed.lease_token)
            session.settle_ended()  # no claim will carry it: its completion goes at once
            assert late.done() and late.result() is False
            return [claimed.run_id], waited, [c.run_id for c in after]
        finally:
            await session.close()

    _, waited, after = asyncio.run(scenario())
    assert waited is at_code_end
    assert after == ([second] if at_code_end else [])  # the slot came back, or not yet
