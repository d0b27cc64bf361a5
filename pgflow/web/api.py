"""The JSON API: ``GET /api/runs`` (the runs list) and ``GET /api/runs/{id}`` (a run and its steps).

Times are ISO 8601 with their offset, ids are strings. A bad parameter is a
400 with ``{"error": "..."}``; an unknown run a 404 of the same shape. The
run page's live update polls ``/api/runs/{id}`` and compares ``version``.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgflow.web import listing, pages, reads
from pgflow.web.site import json_errors, site_of

__all__ = ["run", "runs"]

RUNS_PARAMETERS = frozenset({"status", "workflow", "queue", "key", "concurrency_key", "since",
                             "until", "before", "after", "limit"})


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)


def json_response(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, default=_default, ensure_ascii=False)
    return Response(body, status_code=status, media_type="application/json",
                    headers={"cache-control": "no-store"})


@json_errors
async def runs(request: Request) -> Response:
    unknown = sorted(set(request.query_params) - RUNS_PARAMETERS)
    if unknown:
        raise listing.BadQuery(f"unknown parameter {unknown[0][:40]!r}: use "
                               f"{', '.join(sorted(RUNS_PARAMETERS))}")
    q = listing.RunQuery.parse(dict(request.query_params))
    page = await site_of(request).db.run(listing.fetch_page, q)
    return json_response({
        "runs": [{k: v for k, v in row.items() if k != "finished"} for row in page.rows],
        "older": page.older.encode() if page.older else None,
        "newer": page.newer.encode() if page.newer else None,
    })


def _run_data(conn: Any, rid: Any) -> dict[str, Any]:
    detail = reads.run_detail(conn, rid)
    r = detail.run
    data = {k: v for k, v in vars(r).items() if k != "steps"}
    data["steps"] = [{**vars(s), "attempts_failed": detail.attempts.get(s.seq, [])}
                     for s in r.steps]
    return {"run": data | {k: v for k, v in detail.extra.items() if k != "lease_owner"},
            "finished": r.finished, "held": detail.held, "unserved": detail.unserved,
            "wait": reads.current_wait(detail),
            "signals": detail.signals, "state": detail.state,
            "children": detail.children, "version": pages.fingerprint(r)}


@json_errors
async def run(request: Request) -> Response:
    text = request.path_params["run_id"]
    try:
        rid = uuid.UUID(text)
    except ValueError:
        raise listing.BadQuery(f"{text[:80]!r} is not a run id (a UUID)") from None
    return json_response(await site_of(request).db.run(_run_data, rid))


