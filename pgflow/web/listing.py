"""The runs list: its filters, its keyset cursor, and the one query behind both the page and the API.

Newest first, by ``(created_at, id)``. The query is a ``union all`` of one
branch a status, each an index range scan of ``runs_status_created``
(``status, created_at desc``) that stops after ``limit + 1`` rows: a page costs
a few dozen index entries however many runs the table holds, and a deep page
(a cursor) costs the same as the first. Without the per-status branches,
"newest first" over all statuses would have no index to follow and would sort
the whole table. ``bench/dashboard.py`` measures it on a million runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from psycopg import sql

from pgflow import models
from pgflow.validation import check_text

__all__ = ["STATUSES", "BadQuery", "Cursor", "Page", "RunQuery", "fetch_page", "parse_time"]

STATUSES = ("pending", "running", "sleeping", "waiting", "completed", "failed", "cancelled")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_FILTER_CHARS = 1024

# What a row of the list carries (no payloads: they can be large).
COLUMNS = ("id", "name", "version", "queue", "status", "key", "concurrency_key", "priority",
           "parent_id", "created_at", "started_at", "finished_at")
ERROR_COLUMNS = ("left(r.error ->> 'type', 200) as error_type",
                 "left(r.error ->> 'message', 300) as error_message")


class BadQuery(ValueError):
    """A filter, cursor or limit that cannot be used; the message says which and why."""


_AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, what: str, now: datetime | None = None) -> datetime:
    """An ISO date/time (UTC unless it says otherwise), or an age: ``30m``, ``2h``, ``7d``, ``2w``."""
    text = text.strip()
    number, unit = text[:-1], text[-1:]
    if unit in _AGE_UNITS and number.isdigit():
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(**{_AGE_UNITS[unit]: int(number)})
        except OverflowError:
            raise BadQuery(f"{what} {text!r} is too far back") from None
    try:  # Python 3.10's fromisoformat does not know a trailing Z
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise BadQuery(f"{what} {text!r} is not a date/time: use ISO (2026-12-01T08:00, UTC "
                       "unless an offset is given) or an age (30m, 2h, 7d, 2w)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Cursor:
    """A position in the list: the ``(created_at, id)`` of the row next to it."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        return f"{self.created_at.isoformat()}~{self.id}"

    @classmethod
    def decode(cls, text: str, what: str) -> Cursor:
        at, sep, rid = text.partition("~")
        try:
            if not sep:
                raise ValueError
            when = datetime.fromisoformat(at)
            if when.tzinfo is None:
                raise ValueError
            return cls(when, uuid.UUID(rid))
        except ValueError:
            raise BadQuery(f"{what} {text[:80]!r} is not a position in the list "
                           "(follow the page links)") from None


@dataclass(frozen=True)
class RunQuery:
    """The filters of the runs list, checked; built from query parameters by :meth:`parse`."""

    status: str | None = None
    workflow: str | None = None
    queue: str | None = None
    key: str | None = None
    concurrency_key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: Cursor | None = None  # older than this row (the next page)
    after: Cursor | None = None  # newer than this row (the previous page)
    limit: int = DEFAULT_LIMIT
    raw: dict[str, str] = field(default_factory=dict, compare=False)  # as given, for the form

    @classmethod
    def parse(cls, params: Mapping[str, str], *, now: datetime | None = None) -> RunQuery:
        """Check every parameter; :class:`BadQuery` names the first bad one."""
        raw = {k: v.strip() for k, v in params.items() if isinstance(v, str) and v.strip()}
        for name, value in raw.items():
            if len(value) > MAX_FILTER_CHARS:
                raise BadQuery(f"{name} is longer than {MAX_FILTER_CHARS} characters")
            try:
                check_text(value, name)
            except ValueError as exc:
                raise BadQuery(str(exc)) from None
        status = raw.get("status")
        if status is not None and status not in STATUSES:
            raise BadQuery(f"unknown status {status!r}: one of {', '.join(STATUSES)}")
        since = parse_time(raw["since"], "since", now) if "since" in raw else None
        until = parse_time(raw["until"], "until", now) if "until" in raw else None
        if since and until and since >= until:
            raise BadQuery("since must be earlier than until")
        before = Cursor.decode(raw["before"], "before") if "before" in raw else None
        after = Cursor.decode(raw["after"], "after") if "after" in raw else None
        if before and after:
            raise BadQuery("give before or after, not both")
        limit = DEFAULT_LIMIT
        if "limit" in raw:
            if not raw["limit"].isdigit() or not 1 <= int(raw["limit"]) <= MAX_LIMIT:
                raise BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}, "
                               f"got {raw['limit'][:20]!r}")
            limit = int(raw["limit"])
        return cls(status, raw.get("workflow"), raw.get("queue"), raw.get("key"),
                   raw.get("concurrency_key"), since, until, before, after, limit, raw)

    @property
    def filters(self) -> dict[str, str]:
        """The filters as given (no cursor): the query string of the first page."""
        return {k: v for k, v in self.raw.items() if k not in ("before", "after")}


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    older: Cursor | None  # the next page (older runs) starts after this row
    newer: Cursor | None  # the previous page (newer runs) ends before this row


def statement(q: RunQuery) -> tuple[sql.Composed, dict[str, Any]]:
    """The runs list query for ``q`` and its parameters (also EXPLAINed by the plan test and bench)."""
    params: dict[str, Any] = {"n": q.limit + 1}
    where: list[sql.Composable] = []
    for column, value in (("name", q.workflow), ("queue", q.queue), ("key", q.key),
                          ("concurrency_key", q.concurrency_key)):
        if value is not None:
            params[column] = value
            where.append(sql.SQL("r.{} = {}").format(sql.Identifier(column),
                                                     sql.Placeholder(column)))
    if q.since is not None:
        params["since"] = q.since
        where.append(sql.SQL("r.created_at >= %(since)s"))
    if q.until is not None:
        params["until"] = q.until
        where.append(sql.SQL("r.created_at < %(until)s"))
    cursor = q.before or q.after
    if cursor is not None:
        params["c_at"], params["c_id"] = cursor.created_at, cursor.id
        # The first term is the index condition; the second breaks ties on created_at.
        where.append(sql.SQL(
            "r.created_at <= %(c_at)s and (r.created_at < %(c_at)s or r.id < %(c_id)s)"
            if q.before else
            "r.created_at >= %(c_at)s and (r.created_at > %(c_at)s or r.id > %(c_id)s)"))
    order = sql.SQL("desc" if q.after is None else "asc")
    columns = sql.SQL(", ").join([*(sql.SQL("r.{}").format(sql.Identifier(c)) for c in COLUMNS),
                                  *(sql.SQL(c) for c in ERROR_COLUMNS)])
    branches = []
    for i, status in enumerate([q.status] if q.status else STATUSES):
        params[f"s{i}"] = status
        conditions = sql.SQL(" and ").join([sql.SQL("r.status = {}").format(
            sql.Placeholder(f"s{i}")), *where])
        branches.append(sql.SQL(
            "(select {columns} from pgflow.runs r where {conditions}"
            " order by r.created_at {order}, r.id {order} limit %(n)s)").format(
                columns=columns, conditions=conditions, order=order))
    query = sql.SQL("select * from ({branches}) page order by created_at {order}, id {order}"
                    " limit %(n)s").format(branches=sql.SQL(" union all ").join(branches),
                                            order=order)
    return query, params


def fetch_page(conn: Any, q: RunQuery) -> Page:
    """One page of the runs list; ``older`` / ``newer`` are the cursors of its neighbours."""
    query, params = statement(q)
    cur = conn.execute(query, params)
    names = [d.name for d in cur.description]
    rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    more = len(rows) > q.limit
    rows = rows[:q.limit]
    if q.after is not None:  # fetched oldest first
        rows.reverse()
        has_older, has_newer = True, more
    else:
        has_older, has_newer = more, q.before is not None
    older = Cursor(rows[-1]["created_at"], rows[-1]["id"]) if rows and has_older else None
    newer = Cursor(rows[0]["created_at"], rows[0]["id"]) if rows and has_newer else None
    for row in rows:
        row["finished"] = row["status"] in models.FINAL_STATUSES
    return Page(rows, older, newer)
