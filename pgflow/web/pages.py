"""The HTML pages (GET): overview, runs, a run, schedules, queues, workers."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgflow import flow
from pgflow.web import charts, listing, reads, timeline
from pgflow.web.site import NotFound, page_errors, site_of

__all__ = ["overview", "parse_run_id", "queues", "run", "runs", "schedules", "workers"]

POLL_INTERVAL_MS = 1500  # the run page asks /api/runs/{id} this often while the run is unfinished


def parse_run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise NotFound(f"{text[:80]!r} is not a run id (a UUID)") from None


@page_errors
async def overview(request: Request) -> Response:
    site = site_of(request)
    data = await site.db.run(reads.overview)
    return site.page(request, "overview.html", data=data,
                     chart=charts.bar_chart(data.failures_by_hour), nav="overview")


def _search(conn: Any, text: str) -> tuple[str, str] | None:
    """Where a search goes: ("run", id) for a run id or key, ("workflow", name), or None."""
    try:
        rid = uuid.UUID(text)
    except ValueError:
        rid = None
    if rid is not None:
        row = conn.execute("select r.id from pgflow.runs r where r.id = %s", (rid,)).fetchone()
        if row:
            return "run", str(row[0])
    row = conn.execute("select r.id from pgflow.runs r where r.key = %s", (text,)).fetchone()
    if row:
        return "run", str(row[0])
    row = conn.execute(
        "select exists (select 1 from pgflow.workflows w where w.name = %(n)s)"
        " or exists (select 1 from pgflow.runs r where r.name = %(n)s)", {"n": text}).fetchone()
    if row and row[0]:
        return "workflow", text
    return None


def _runs_data(conn: Any, q: listing.RunQuery) -> dict[str, Any]:
    page = listing.fetch_page(conn, q)
    held = flow.why_pending_runs(conn, [r["id"] for r in page.rows if r["status"] == "pending"])
    unserved = reads.unserved(conn, [r["id"] for r in page.rows if not r["finished"]])
    names = [row[0] for row in conn.execute(
        "select distinct w.name from pgflow.workflows w order by 1").fetchall()]
    queue_names = [row[0] for row in conn.execute(
        "select w.queue from pgflow.workflows w union"
        " select s.name from pgflow.queue_settings s order by 1").fetchall()]
    return {"page": page, "held": held, "unserved": unserved, "workflows": names,
            "queue_names": queue_names}


@page_errors
async def runs(request: Request) -> Response:
    site = site_of(request)
    params = dict(request.query_params)
    search = params.pop("q", "").strip()
    notice = None
    if search:
        found = await site.db.run(_search, search)
        if found and found[0] == "run":
            return site.redirect(request, site.url(request, "run", run_id=found[1]))
        if found:
            return site.redirect(request, site.url(request, "runs", {"workflow": found[1]}))
        notice = f"no run has the id or key {search!r}, and no workflow is named so"
    q = listing.RunQuery.parse(params)
    data = await site.db.run(_runs_data, q)
    return site.page(request, "runs.html", q=q, statuses=listing.STATUSES, search=search,
                     notice=notice, nav="runs", **data)


def fingerprint(detail_run: Any) -> str:
    """Changes whenever the run page would show something new (compared by the live poll)."""
    parts = [detail_run.status] + [f"{s.seq}:{s.status}:{s.attempts}:{s.finished_at}"
                                   for s in detail_run.steps]
    return "|".join(parts)


@page_errors
async def run(request: Request) -> Response:
    site = site_of(request)
    rid = parse_run_id(request.path_params["run_id"])
    detail = await site.db.run(reads.run_detail, rid)
    return site.page(
        request, "run.html", d=detail, r=detail.run, extra=detail.extra,
        timeline=timeline.build(detail.run, detail.attempts, detail.now, detail.waits),
        wait=reads.current_wait(detail), version=fingerprint(detail.run),
        poll_ms=POLL_INTERVAL_MS, nav="runs")


@page_errors
async def schedules(request: Request) -> Response:
    site = site_of(request)
    found = await site.db.run(reads.schedules)
    return site.page(request, "schedules.html", schedules=found, nav="schedules")


@page_errors
async def queues(request: Request) -> Response:
    site = site_of(request)
    found = await site.db.run(reads.queues)
    return site.page(request, "queues.html", queues=found, holds=reads.queue_holds, nav="queues")


@page_errors
async def workers(request: Request) -> Response:
    site = site_of(request)
    found = await site.db.run(reads.workers)
    return site.page(request, "workers.html", workers=found, nav="workers")
