"""Flow control: concurrency limits, rate limits and paused queues.

* :class:`Concurrency` on ``@pgflow.workflow``: at most ``limit`` runs of the
  workflow *executing* at once, across all workers; with ``key`` (one of the
  workflow's parameters) at most ``limit`` per value of that argument.
* :func:`set_queue`: a cap on a queue's executing runs and a
  :class:`RateLimit` on how many of its runs begin executing in any window.
* :func:`pause_queue` / :func:`resume_queue`.

Only executing runs hold a slot: a run that sleeps or waits gives its slots
back and takes them again when it resumes. A run over a limit stays
``pending``, never fails for it, and is claimed in priority order as soon as
it may run. Every claim of a rate-limited queue's run counts against its
rate, a resumption after a sleep included. The claim enforces all of it in
SQL (``sql/schema/13_flow_control.sql``); every call here works in the
caller's transaction, like :func:`pgflow.start`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgflow import connections
from pgflow.durations import as_timedelta
from pgflow.validation import check_name

__all__ = ["Concurrency", "QueueInfo", "RateLimit", "key_text", "list_queues", "parse_rate",
           "pause_queue", "resume_queue", "set_queue", "set_queue_params", "settings_info",
           "why_pending", "why_pending_runs"]

MAX_LIMIT = 100_000  # the SQL checks enforce the same bound

SET_QUEUE = ("select name, concurrency, rate_limit, rate_per, paused from"
             " pgflow.set_queue(name => %s, concurrency => %s, rate_limit => %s, rate_per => %s)")
PAUSE = "select pgflow.pause_queue(%s)"
RESUME = "select pgflow.resume_queue(%s)"
LIST = ("select name, concurrency, rate_limit, rate_per, paused, pending, held, running,"
        " sleeping, waiting from pgflow.queues order by name")


def _check_limit(limit: object, what: str) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"{what} must be an int, not {limit!r}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"{what} must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` executing runs of a workflow; per value of argument ``key`` if given."""

    limit: int
    key: str | None = None

    def __post_init__(self) -> None:
        _check_limit(self.limit, "Concurrency limit")
        if self.key is not None:
            check_name(self.key, "Concurrency key")

    def announced(self) -> dict[str, Any]:
        """What a worker tells the database (``pgflow.workflows``)."""
        return {"limit": self.limit, "key": self.key}


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` runs of a queue begin executing in any window of length ``per``."""

    limit: int
    per: timedelta

    def __init__(self, limit: int, per: timedelta | float) -> None:
        object.__setattr__(self, "limit", _check_limit(limit, "rate limit"))
        window = as_timedelta(per, "rate limit window (per)")
        if window <= timedelta(0):
            raise ValueError(f"rate limit window (per) must be positive, got {window}")
        object.__setattr__(self, "per", window)

    def __str__(self) -> str:
        return f"{self.limit}/{_span(self.per)}"


@dataclass(frozen=True)
class QueueInfo:
    """A row of the view ``pgflow.queues``."""

    name: str
    concurrency: int | None
    rate_limit: RateLimit | None
    paused: bool
    pending: int
    held: int  # pending runs parked by a workflow or key limit
    running: int
    sleeping: int
    waiting: int


def set_queue(conn: Any, name: str, *, concurrency: int | None = None,
              rate_limit: RateLimit | None = None) -> QueueInfo:
    """Cap queue ``name``: ``concurrency`` executing runs, ``rate_limit`` starts a window.

    ``None`` removes a cap. Returns the queue's settings (its run counts as zero:
    see :func:`list_queues` for those).
    """
    rows = connections.fetch(conn, SET_QUEUE, set_queue_params(name, concurrency, rate_limit))
    return settings_info(rows[0])


def set_queue_params(name: str, concurrency: int | None,
                     rate_limit: RateLimit | None) -> tuple[Any, ...]:
    """Check a :func:`set_queue` request; the parameters of :data:`SET_QUEUE`."""
    check_name(name, "queue")
    if concurrency is not None:
        _check_limit(concurrency, "queue concurrency")
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):
        raise TypeError(f"rate_limit must be a pgflow.RateLimit, not {rate_limit!r}")
    return (name, concurrency, rate_limit.limit if rate_limit else None,
            rate_limit.per if rate_limit else None)


def settings_info(row: tuple[Any, ...]) -> QueueInfo:
    """A :data:`SET_QUEUE` row as a :class:`QueueInfo` (run counts zero)."""
    return _info((*row, 0, 0, 0, 0, 0))


def pause_queue(conn: Any, name: str) -> None:
    """Stop claiming the queue's pending runs; executing runs go on."""
    connections.fetch(conn, PAUSE, (check_name(name, "queue"),))


def resume_queue(conn: Any, name: str) -> None:
    """Claim the queue's runs again (a queue never paused: nothing happens)."""
    connections.fetch(conn, RESUME, (check_name(name, "queue"),))


def list_queues(conn: Any) -> list[QueueInfo]:
    """Every known queue with its caps and its runs by state (``pgflow.queues``)."""
    return [_info(row) for row in connections.fetch(conn, LIST, ())]


def _info(row: tuple[Any, ...]) -> QueueInfo:
    name, concurrency, rate, per, paused, pending, held, running, sleeping, waiting = row
    return QueueInfo(name, concurrency, RateLimit(rate, per) if rate else None, bool(paused),
                     int(pending), int(held), int(running), int(sleeping), int(waiting))


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": timedelta(milliseconds=1), "s": timedelta(seconds=1), "m": timedelta(minutes=1),
          "h": timedelta(hours=1), "d": timedelta(days=1)}


def parse_rate(text: str) -> RateLimit:
    """``"100/1m"``, ``"10/s"``, ``"5000/1h"``: a :class:`RateLimit` (the CLI's ``--rate``)."""
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"rate {text!r} is not LIMIT/WINDOW, e.g. 100/1m, 10/s or 5000/1h "
                         "(units ms, s, m, h, d)")
    count, amount, unit = match.groups()
    return RateLimit(int(count), int(amount or 1) * _UNITS[unit])


def _span(window: timedelta) -> str:
    for unit in ("d", "h", "m", "s", "ms"):
        whole, rest = divmod(window, _UNITS[unit])
        if whole and not rest:
            return f"{whole}{unit}"
    return f"{window.total_seconds()}s"


def key_text(value: Any) -> str | None:
    """A concurrency key's text, as SQL reads it from a JSON input (``input ->> param``).

    A string is itself; null is no key; anything else is its JSON text.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


# Why pending runs are not claimed now, one row a pending run among %s (an array of
# ids): the scope it is parked on (runs.held_by), and the three queue gates the
# claim checks (pgflow._claim_under_limits): a paused queue, a queue cap with
# no free slot at or under it, a rate with no slot free again by now.
WHY_PENDING = """
select r.id, r.queue, r.held_by, coalesce(q.paused, false) as paused,
       q.concurrency, q.concurrency is not null and not exists (
           select 1 from pgflow.slots s
           where s.scope = 'queue:' || r.queue and s.run_id is null
             and s.slot <= q.concurrency) as queue_full,
       q.rate_limit, q.rate_per, q.rate_limit is not null and not exists (
           select 1 from pgflow.slots s
           where s.scope = 'rate:' || r.queue and s.slot <= q.rate_limit
             and s.free_at <= pgflow.now() and s.free_at > '-infinity') as rate_spent
from pgflow.runs r
left join pgflow.queue_settings q on q.name = r.queue
where r.id = any (%s::uuid[]) and r.status = 'pending'
"""


def why_pending(conn: Any, run_id: uuid.UUID | str) -> str | None:
    """Why a pending run is held back now, in words; ``None`` if nothing holds it.

    A run is held back while it is parked by its workflow's limit (for its key,
    if the limit has one), or while its queue is paused, at its concurrency
    cap, or has spent its rate. ``None`` too for a run that is not pending or
    does not exist.
    """
    return why_pending_runs(conn, [run_id]).get(uuid.UUID(str(run_id)))


def why_pending_runs(conn: Any, run_ids: Iterable[uuid.UUID | str]) -> dict[uuid.UUID, str]:
    """:func:`why_pending` for many runs in one query: the held-back ones, by id."""
    ids = [uuid.UUID(str(r)) for r in run_ids]
    if not ids:
        return {}
    held: dict[uuid.UUID, str] = {}
    for row in connections.fetch(conn, WHY_PENDING, ([str(i) for i in ids],)):
        reason = _explain(*row[1:])
        if reason:
            held[uuid.UUID(str(row[0]))] = reason
    return held


def _explain(queue: str, held_by: str | None, paused: bool, concurrency: int | None,
             queue_full: bool, rate_limit: int | None, rate_per: timedelta | None,
             rate_spent: bool) -> str | None:
    reasons = []
    if held_by is not None:
        reasons.append(_scope_text(held_by))
    if paused:
        reasons.append(f"queue {queue} is paused")
    if queue_full:
        reasons.append(f"queue {queue} is at its concurrency cap ({concurrency} executing)")
    if rate_spent and rate_limit and rate_per:
        rate = RateLimit(rate_limit, rate_per)
        reasons.append(f"queue {queue} has spent its rate limit ({rate})")
    return "; ".join(reasons) or None


def _scope_text(scope: str) -> str:
    """A parking scope (``runs.held_by``) in words."""
    kind, _, rest = scope.partition(":")
    if kind == "workflow" and rest:
        return f"concurrency limit of workflow {rest}"
    if kind == "key":
        try:
            name, key = json.loads(rest)
        except (ValueError, TypeError):
            pass
        else:
            return f"concurrency limit of {name} for key {key}"
    return f"concurrency limit {scope}"
