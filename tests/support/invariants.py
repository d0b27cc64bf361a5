"""The invariant every fault test ends with: whatever was killed, nothing is lost or doubled.

:func:`check` reads ``pgflow.runs``, ``steps``, ``timers``, ``signals`` and
``workers`` and the test's effects log (``public.effects``: one row each time
a step body really ran, with the worker's pid and the database time) and
fails with one message listing every offending run. What it requires is the
engine's documented guarantee, no less:

- every run reached the expected final status, once: it is not continued as
  another run, its journal holds positions ``0..n-1`` (each once, all
  completed) and, when the test says so, exactly the expected calls;
- every checkpointed step's body ran at least once, and never began after its
  checkpoint committed, except in a process that was out of touch (frozen or
  cut off from the database) when it began: such a zombie's late report is
  refused, but its body may still run;
- steps run at least once, not "at most once": an execution beyond the one
  that was checkpointed (and beyond the step's recorded failed attempts) must
  belong to a process the test disturbed (killed, frozen or cut off); a
  killed process ran nothing after its death;
- every signal was taken by exactly one wait, of its name, with its payload;
- no finished run keeps a timer, and no unfinished run lacks what will move
  it: pending, running under a live worker (or recoverable by one), sleeping
  with a timer, waiting for a signal not already in its mailbox, a child or a
  timer.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.support.helpers import Effects, effects_app, wait_for

FINAL = ("completed", "failed", "cancelled")


@dataclass
class Disturbed:
    """The worker processes a test disturbed, by kind.

    ``killed`` maps a pid to the database time at which it was known dead.
    ``frozen`` (SIGSTOP) and ``cut_off`` (connections terminated, server
    restarted) processes lived on out of touch: they may repeat a step and
    may finish a body that began before they lost their lease.
    """

    killed: dict[int, datetime] = field(default_factory=dict)
    frozen: set[int] = field(default_factory=set)
    cut_off: set[int] = field(default_factory=set)

    def pids(self) -> set[int]:
        return set(self.killed) | self.frozen | self.cut_off

    def zombies(self) -> set[int]:
        return self.frozen | self.cut_off

    def kill(self, conn: psycopg.Connection[Any], pid: int) -> None:
        """Note ``pid`` as killed (call once the process is reaped).

        A statement the process sent just before it died may still run, once its
        backend reads it: however busy the server, that is before the backend
        exits. So the death is noted once the process's effects-log connections
        (named by :func:`tests.support.helpers.effects_app`) are gone: every row it
        logged is in by then, and a row logged later is not its own.
        """
        wait_for(lambda: not conn.execute(
            "select 1 from pg_stat_activity where application_name = %s"
            " and datname = current_database()", (effects_app(pid),)).fetchone(),
            timeout=60, what=f"the effects-log connections of killed pid {pid} to close")
        row = conn.execute("select clock_timestamp()").fetchone()
        assert row is not None
        self.killed[pid] = row[0]


@dataclass
class Summary:
    runs: int = 0
    steps: int = 0
    executions: int = 0
    repeated: int = 0  # executions beyond one a checkpointed step
    signals: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"{self.runs} runs {self.by_status}, {self.steps} checkpointed steps, "
                f"{self.executions} step executions ({self.repeated} repeated), "
                f"{self.signals} signals")


Journal = list[tuple[str, str]]  # (kind, name) in seq order


def prepare_effects(conn: psycopg.Connection[Any]) -> None:
    """Create the effects log with an execution id, so a retried log write counts once."""
    Effects.create(conn, with_exec_id=True)


def check(conn: psycopg.Connection[Any], *, status: str | None = "completed",
          disturbed: Disturbed | None = None, run_ids: Iterable[uuid.UUID] | None = None,
          expected_runs: int | None = None,
          journal: Callable[[dict[str, Any]], Journal | None] | None = None,
          output: Callable[[dict[str, Any]], Any] | None = None,
          every_step_logged: bool = True) -> Summary:
    """Assert the invariant over the runs of this database (or ``run_ids``); see the module doc.

    :param status: the final status every run must have; ``None`` checks only
        that unfinished runs can move.
    :param journal: a run (a dict of its ``pgflow.runs`` row) -> its expected
        ``[(kind, name), ...]``, or ``None`` for no expectation.
    :param output: a run -> its expected output.
    :param every_step_logged: every step body of these runs writes to the effects log.

    With ``status=None`` it may run while workers are being killed: a run
    still leased to a dead worker then counts as recoverable (recovery is
    about to move it) even if no worker is alive at that instant.
    """
    checker = _Checker(conn, disturbed or Disturbed(), run_ids, settled=status is not None)
    # One snapshot for every table read, so a check made under load sees each
    # transition whole (a timer fired and its run pending, never half of it).
    with conn.transaction():
        conn.execute("set transaction isolation level repeatable read")
        return checker.run(status, expected_runs, journal, output, every_step_logged)


class _Checker:
    def __init__(self, conn: psycopg.Connection[Any], disturbed: Disturbed,
                 run_ids: Iterable[uuid.UUID] | None, settled: bool) -> None:
        self.conn = conn
        self.settled = settled
        self.disturbed = disturbed
        self.ids = None if run_ids is None else [str(r) for r in run_ids]
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.summary = Summary()

    def _rows(self, sql: str) -> list[dict[str, Any]]:
        cur = self.conn.cursor(row_factory=dict_row)
        return cur.execute(sql, {"ids": self.ids}).fetchall()

    def run(self, status: str | None, expected_runs: int | None,
            journal: Callable[[dict[str, Any]], Journal | None] | None,
            output: Callable[[dict[str, Any]], Any] | None, every_step_logged: bool) -> Summary:
        scope = "(%(ids)s::text[] is null or {col}::text = any(%(ids)s::text[]))"
        runs = self._rows("select * from pgflow.runs where " + scope.format(col="id")
                          + " order by created_at")
        offset = self.conn.execute("select offset_by from pgflow.clock").fetchone()
        self.offset = offset[0] if offset else timedelta(0)
        steps = defaultdict(list)
        for s in self._rows("select * from pgflow.steps where " + scope.format(col="run_id")
                            + " order by run_id, seq"):
            steps[str(s["run_id"])].append(s)
        timers = defaultdict(list)
        for t in self._rows("select * from pgflow.timers where " + scope.format(col="run_id")):
            timers[str(t["run_id"])].append(t)
        signals = defaultdict(list)
        for g in self._rows("select * from pgflow.signals where " + scope.format(col="run_id")
                            + " order by id"):
            signals[str(g["run_id"])].append(g)
        effects = defaultdict(list)
        has_effects = self.conn.execute(
            "select to_regclass('public.effects') is not null").fetchone()
        if has_effects and has_effects[0]:
            for e in self._rows("select * from public.effects where " + scope.format(col="run_id")
                                + " order by at, id"):
                effects[(e["run_id"], e["step"])].append(e)
        self.live_workers = {r["id"] for r in self._rows(
            "select w.id from pgflow.workers w where exists ("
            " select 1 from pg_locks l where l.locktype = 'advisory' and l.granted"
            "   and l.classid = 7366502 and l.objid = w.lock_key and l.objsubid = 2"
            "   and l.database = (select oid from pg_database where datname = current_database()))")}
        by_id = {str(r["id"]): r for r in runs}

        self.summary.runs = len(runs)
        if expected_runs is not None and len(runs) != expected_runs:
            self.problems["(all)"].append(f"{len(runs)} runs exist, expected {expected_runs}")
        for run in runs:
            rid = str(run["id"])
            self.summary.by_status[run["status"]] = self.summary.by_status.get(run["status"], 0) + 1
            self._final(run, status, output)
            self._journal(run, steps[rid], journal)
            self._executions(run, steps[rid], effects, every_step_logged)
            self._signals(run, steps[rid], signals[rid])
            self._movers(run, steps[rid], timers[rid], signals[rid], by_id)
        for (rid, step), execs in effects.items():
            if rid in by_id and by_id[rid]["status"] == "completed" and not any(
                    s["kind"] == "step" and s["name"] == step for s in steps[rid]):
                self.problems[rid].append(
                    f"step {step!r} ran {len(execs)} time(s) but the completed run's journal "
                    "does not hold it")
        self._fail_if_any(by_id)
        return self.summary

    # -- the rules -------------------------------------------------------------

    def _final(self, run: dict[str, Any], status: str | None,
               output: Callable[[dict[str, Any]], Any] | None) -> None:
        rid = str(run["id"])
        if status is not None and run["status"] != status:
            self.problems[rid].append(f"ended {run['status']}, expected {status}"
                                      + (f" (error: {run['error']})" if run["error"] else ""))
        if run["continued_as"] is not None:
            self.problems[rid].append(f"continued as {run['continued_as']}")
        if run["status"] == "completed" and output is not None:
            want = output(run)
            if run["output"] != want:
                self.problems[rid].append(f"output {run['output']!r}, expected {want!r}")

    def _journal(self, run: dict[str, Any], steps: list[dict[str, Any]],
                 journal: Callable[[dict[str, Any]], Journal | None] | None) -> None:
        rid = str(run["id"])
        seqs = [s["seq"] for s in steps]
        if seqs != list(range(len(seqs))):
            self.problems[rid].append(f"journal positions {seqs} are not 0..{len(seqs) - 1}")
        if run["status"] == "completed":
            open_ = [(s["seq"], s["name"], s["status"]) for s in steps if s["status"] != "completed"]
            if open_:
                self.problems[rid].append(f"completed with unfinished journal entries {open_}")
        want = journal(run) if journal is not None else None
        if want is not None:
            got = [(s["kind"], s["name"]) for s in steps]
            expected = want if run["status"] == "completed" else want[:len(got)]
            if got != expected:
                self.problems[rid].append(f"journal {got}, expected {expected}")
        names = [s["name"] for s in steps if s["kind"] == "step"]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            self.problems[rid].append(f"step(s) {twice} recorded at more than one position")

    def _executions(self, run: dict[str, Any], steps: list[dict[str, Any]],
                    effects: dict[tuple[str, str], list[dict[str, Any]]],
                    every_step_logged: bool) -> None:
        rid = str(run["id"])
        d = self.disturbed
        for s in steps:
            if s["kind"] != "step":
                continue
            execs = effects.get((rid, s["name"]), [])
            self.summary.executions += len(execs)
            for e in execs:
                died = d.killed.get(e["pid"])
                if died is not None and e["at"] > died:
                    self.problems[rid].append(
                        f"step {s['name']!r} ran in pid {e['pid']} at {e['at']:%T.%f}, "
                        f"after that process was killed ({died:%T.%f})")
            if s["status"] != "completed":
                continue
            self.summary.steps += 1
            # The checkpoint's engine time, on the database clock: no earlier than its commit's start.
            committed = s["finished_at"] - self.offset
            before = [e for e in execs if e["at"] < committed]
            after = [e for e in execs if e["at"] >= committed]
            late = [e for e in after if e["pid"] not in d.zombies()]
            if late:
                self.problems[rid].append(
                    f"step {s['name']!r} began after its checkpoint committed "
                    f"({committed:%T.%f}) in pid(s) {sorted({e['pid'] for e in late})}")
            if every_step_logged and not before:
                self.problems[rid].append(
                    f"step {s['name']!r} is checkpointed but its body never ran before that")
            self.summary.repeated += max(0, len(execs) - 1)
            # All but the checkpointed execution (the last one before the checkpoint) must
            # be failed attempts or belong to a disturbed process.
            undisturbed = [e for e in before[:-1] if e["pid"] not in d.pids()]
            if len(undisturbed) > s["attempts"] - 1:
                self.problems[rid].append(
                    f"step {s['name']!r} ran {len(execs)} times ({s['attempts']} attempt(s) "
                    f"recorded): extra executions in undisturbed pid(s) "
                    f"{sorted({e['pid'] for e in undisturbed})}; executions: "
                    + ", ".join(f"{e['pid']}@{e['at']:%T.%f}" for e in execs))

    def _signals(self, run: dict[str, Any], steps: list[dict[str, Any]],
                 signals: list[dict[str, Any]]) -> None:
        rid = str(run["id"])
        self.summary.signals += len(signals)
        entries = {s["seq"]: s for s in steps}
        taken: dict[int, int] = {}
        for g in signals:
            seq = g["consumed_seq"]
            if seq is None:
                if run["status"] in FINAL:
                    self.problems[rid].append(f"signal {g['name']!r} (#{g['id']}) never taken")
                continue
            if seq in taken:
                self.problems[rid].append(f"signals #{taken[seq]} and #{g['id']} both taken "
                                          f"by the wait at {seq}")
            taken[seq] = g["id"]
            entry = entries.get(seq)
            if entry is None or entry["kind"] != "signal" or entry["name"] != g["name"]:
                self.problems[rid].append(f"signal {g['name']!r} (#{g['id']}) taken by journal "
                                          f"entry {seq}, which is not a wait for it")
            elif entry["status"] == "completed" and entry["output"] != {"payload": g["payload"]}:
                self.problems[rid].append(f"the wait at {seq} recorded {entry['output']!r}, "
                                          f"not signal #{g['id']}'s payload {g['payload']!r}")
        for s in steps:
            if (s["kind"] == "signal" and s["status"] == "completed"
                    and "timed_out" not in (s["output"] or {}) and s["seq"] not in taken):
                self.problems[rid].append(f"the wait at {s['seq']} received a signal "
                                          "that no mailbox entry accounts for")

    def _movers(self, run: dict[str, Any], steps: list[dict[str, Any]],
                timers: list[dict[str, Any]], signals: list[dict[str, Any]],
                by_id: dict[str, dict[str, Any]]) -> None:
        rid, state = str(run["id"]), run["status"]
        if state in FINAL:
            if timers:
                self.problems[rid].append(f"{state} but keeps timer(s) "
                                          f"{[(t['kind'], t['seq']) for t in timers]}")
            return
        if state == "pending":
            return
        if state == "running":
            if (self.settled and run["lease_owner"] not in self.live_workers
                    and not self.live_workers):
                self.problems[rid].append(f"running under dead worker {run['lease_owner']} "
                                          "and no live worker to recover it")
            return
        if state == "sleeping" and not timers:
            self.problems[rid].append("sleeping without a timer")
        if state == "waiting":
            waits = [s for s in steps if s["status"] == "waiting"]
            if not waits and not timers:
                self.problems[rid].append("waiting, but for nothing (no waiting entry, no timer)")
            for w in waits:
                if w["kind"] == "signal":
                    queued = [g["id"] for g in signals
                              if g["name"] == w["name"] and g["consumed_seq"] is None]
                    if queued:
                        self.problems[rid].append(f"waits for signal {w['name']!r} at {w['seq']} "
                                                  f"while #{queued} sits in its mailbox")
                else:
                    children = [c for c in by_id.values() if str(c["parent_id"]) == rid
                                and c["status"] not in FINAL]
                    if not children and self.ids is None:
                        self.problems[rid].append(f"waits at {w['seq']} ({w['kind']}) "
                                                  "with no unfinished child")

    def _fail_if_any(self, by_id: dict[str, dict[str, Any]]) -> None:
        if not self.problems:
            return
        lines = []
        for rid, problems in sorted(self.problems.items()):
            run = by_id.get(rid)
            head = f"run {rid}" + (f" ({run['name']}, {run['status']})" if run else "")
            lines.extend(f"{head}: {p}" for p in problems)
        shown = lines[:40] + ([f"... and {len(lines) - 40} more"] if len(lines) > 40 else [])
        raise AssertionError(f"invariant violated by {len(self.problems)} run(s) "
                             f"[{self.summary}]:\n" + "\n".join(shown))
