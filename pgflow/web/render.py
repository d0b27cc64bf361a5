"""Templates: a Jinja2 environment with autoescaping on, and the filters the pages use.

Every value reaches the HTML through autoescaping; JSON payloads are
pretty-printed as text and shown in ``<pre>``, escaped like anything else.
No template marks user data ``|safe``.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import jinja2

from pgflow.web.timeline import duration_text

__all__ = ["environment", "pretty_json"]


def utc(value: datetime | None, precise: bool = False) -> str:
    if value is None:
        return "-"
    value = value.astimezone(timezone.utc)
    text = f"{value:%Y-%m-%d %H:%M:%S}"
    return f"{text}.{value.microsecond // 1000:03d}" if precise else text


def duration(value: timedelta | None) -> str:
    return "-" if value is None else duration_text(value)


def between(start: datetime | None, end: datetime | None) -> str:
    return "-" if start is None or end is None else duration_text(end - start)


MAX_SHOWN_CHARS = 100_000  # of one JSON payload on a page; /api/runs/{id} has all of it


def pretty_json(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=False)
    if len(text) > limit:
        return (f"{text[:limit]}\n... {len(text) - limit:,} more characters not shown "
                "(GET /api/runs/<id> returns all of it)")
    return text


def percent(value: float) -> str:
    return f"{value * 100:.3f}%"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pgflow.web", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(utc=utc, duration=duration, pretty=pretty_json, percent=percent)
    env.globals.update(between=between)
    return env
