"""The actions (POST): cancel, retry, signal a run; pause, resume, trigger a schedule; pause, resume a queue.

Each goes through the same functions as the CLI (``pgflow.client``,
``pgflow.schedules``, ``pgflow.flow``), in one transaction, and answers with a
redirect to the page it came from carrying one message (done, or why not).
Before anything is written, in this order:

1. read-only mode refuses every action (403, nothing done);
2. the CSRF token must match the browser's cookie (403, nothing done);
3. the inputs are checked (a malformed JSON payload: a message, nothing done);
4. the action must be confirmed: the page's script asks with ``confirm()``
   and sends ``confirmed=yes``; a form sent without it (no script) gets a
   confirmation page that sends it again with ``confirmed=yes``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from pgflow import client, flow, schedules
from pgflow.cli_support import describe, parse_json
from pgflow.validation import check_name
from pgflow.web import security
from pgflow.web.pages import parse_run_id
from pgflow.web.site import NotFound, Refused, Site, classify, page_errors, site_of

__all__ = ["cancel_run", "queue_action", "retry_run", "schedule_action", "signal_run"]

MAX_PAYLOAD_CHARS = 4_000_000  # beyond any payload the engine accepts (pgflow.max_payload_bytes)

Perform = Callable[[Any], str]  # runs in the transaction; returns the message shown when done


async def _guarded_form(request: Request, site: Site) -> FormData:
    if site.read_only:
        raise Refused("this dashboard is read-only: actions are disabled, nothing was done")
    form = await request.form()
    if not security.csrf_valid(site.secret, request.cookies.get(security.CSRF_COOKIE),
                               form.get(security.CSRF_FIELD)):
        raise Refused("the form's security token is missing or does not match this browser "
                      "(a stale page, or a request from another site): reload the page and try "
                      "again; nothing was done")
    return form


async def _act(request: Request, site: Site, form: FormData, *, back: str, question: str,
               perform: Perform) -> Response:
    if form.get("confirmed") != "yes":
        fields = [(k, v) for k, v in form.multi_items()
                  if k not in (security.CSRF_FIELD, "confirmed") and isinstance(v, str)]
        return site.page(request, "confirm.html", question=question, action=str(request.url.path),
                         fields=fields, back=back)
    try:
        message = await site.db.run(perform)
    except Exception as exc:
        _, text = classify(exc)
        return site.redirect(request, back, "error", text)
    return site.redirect(request, back, "ok", message)


def _run_target(request: Request, site: Site) -> tuple[uuid.UUID, str]:
    rid = parse_run_id(request.path_params["run_id"])
    return rid, site.url(request, "run", run_id=rid)


@page_errors
async def cancel_run(request: Request) -> Response:
    site = site_of(request)
    form = await _guarded_form(request, site)
    rid, back = _run_target(request, site)

    def perform(conn: Any) -> str:
        if not client.cancel(conn, rid):
            raise ValueError(f"run {rid} had already finished: nothing to cancel")
        return f"cancellation of run {rid} requested (it stops at its next durable point)"

    return await _act(request, site, form, back=back, perform=perform,
                      question=f"Cancel run {rid} and its children?")


@page_errors
async def retry_run(request: Request) -> Response:
    site = site_of(request)
    form = await _guarded_form(request, site)
    rid, back = _run_target(request, site)

    def perform(conn: Any) -> str:
        client.retry(conn, rid)
        return f"run {rid} will resume from its last checkpoint"

    return await _act(request, site, form, back=back, perform=perform,
                      question=f"Retry run {rid} from its last checkpoint?")


@page_errors
async def signal_run(request: Request) -> Response:
    site = site_of(request)
    form = await _guarded_form(request, site)
    rid, back = _run_target(request, site)
    name = str(form.get("name") or "").strip()
    text = str(form.get("payload") or "").strip() or "null"
    try:
        check_name(name, "signal name")
        if len(text) > MAX_PAYLOAD_CHARS:
            raise ValueError(f"the payload is longer than {MAX_PAYLOAD_CHARS} characters")
        payload = parse_json(text, "the payload")
    except ValueError as exc:
        return site.redirect(request, back, "error", f"{describe(exc)}; nothing was sent")

    def perform(conn: Any) -> str:
        client.signal(conn, rid, name, payload)
        return f"signal {name!r} sent to run {rid}"

    return await _act(request, site, form, back=back, perform=perform,
                      question=f"Send signal {name!r} to run {rid}?")


def _pause_schedule(conn: Any, sid: str) -> str:
    schedules.pause_schedule(conn, sid)
    return f"schedule {sid!r} paused"


def _resume_schedule(conn: Any, sid: str) -> str:
    schedules.resume_schedule(conn, sid)
    return f"schedule {sid!r} resumed"


def _trigger_schedule(conn: Any, sid: str) -> str:
    return f"schedule {sid!r} triggered: run {schedules.trigger_schedule(conn, sid)} started"


_SCHEDULE_VERBS: dict[str, Callable[[Any, str], str]] = {
    "pause": _pause_schedule, "resume": _resume_schedule, "trigger": _trigger_schedule}


async def _named_action(request: Request, verbs: dict[str, Callable[[Any, str], str]], *,
                        thing: str, field: str, label: str, back_to: str,
                        question: Callable[[str, str], str]) -> Response:
    """A schedule's or a queue's action: the verb of the path, the name of the form."""
    site = site_of(request)
    verb = request.path_params["verb"]
    if verb not in verbs:
        *others, last = verbs
        raise NotFound(f"no {thing} action {verb[:40]!r}: {', '.join(others)} or {last}")
    form = await _guarded_form(request, site)
    back = site.url(request, back_to)
    name = str(form.get(field) or "")
    try:
        check_name(name, label)
    except ValueError as exc:
        return site.redirect(request, back, "error", describe(exc))
    act = verbs[verb]
    return await _act(request, site, form, back=back, perform=lambda conn: act(conn, name),
                      question=question(verb, name))


@page_errors
async def schedule_action(request: Request) -> Response:
    return await _named_action(
        request, _SCHEDULE_VERBS, thing="schedule", field="id", label="schedule id",
        back_to="schedules", question=lambda verb, sid: f"{verb.capitalize()} schedule {sid!r}?")


def _pause_queue(conn: Any, name: str) -> str:
    flow.pause_queue(conn, name)
    return f"queue {name!r} paused: its pending runs are not claimed until it is resumed"


def _resume_queue(conn: Any, name: str) -> str:
    flow.resume_queue(conn, name)
    return f"queue {name!r} resumed"


_QUEUE_VERBS: dict[str, Callable[[Any, str], str]] = {
    "pause": _pause_queue, "resume": _resume_queue}


@page_errors
async def queue_action(request: Request) -> Response:
    return await _named_action(
        request, _QUEUE_VERBS, thing="queue", field="name", label="queue", back_to="queues",
        question=lambda verb, name: (
            f"Pause queue {name!r}? Its pending runs will not be claimed until it is resumed."
            if verb == "pause" else f"Resume queue {name!r}?"))
