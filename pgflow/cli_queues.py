"""``pgflow queues`` and ``pgflow queue ...``: list queues, cap, pause and resume them.

Registered on the main app by :mod:`pgflow.cli`; the calls are :mod:`pgflow.flow`'s.
Every option is checked before the database is reached: a mistake writes nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from pgflow import flow
from pgflow.cli_support import DsnOption, JsonOption, columns, connect, user_errors
from pgflow.validation import check_name

queue_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        rich_markup_mode=None,
                        help="Control one queue: set its caps, pause, resume.")

QueueArgument = Annotated[str, typer.Argument(help="Queue name.")]


def list_queues(dsn: DsnOption = None, as_json: JsonOption = False) -> None:
    """List every queue: its caps, whether it is paused, and its runs by state.

    HELD counts pending runs parked by their workflow's concurrency limit
    (`pgflow show RUN` says why a pending run waits).
    """
    with user_errors(), connect(dsn) as conn:
        found = flow.list_queues(conn)
    if as_json:  # one JSON array, by name; rate_per in seconds
        typer.echo(json.dumps([_queue_json(q) for q in found], indent=2))
        return
    if not found:
        typer.echo("no queues (a queue appears once a worker serves it, a run is queued on it, "
                   "or it is set with `pgflow queue set`)")
        return
    table = [("NAME", "CONCURRENCY", "RATE", "STATE", "PENDING", "HELD", "RUNNING", "SLEEPING",
              "WAITING")]
    for q in found:
        table.append((q.name, _cap(q.concurrency), _cap(q.rate_limit),
                      "paused" if q.paused else "active", str(q.pending), str(q.held),
                      str(q.running), str(q.sleeping), str(q.waiting)))
    typer.echo(columns(table))


@queue_app.command("set")
def set_queue(
    name: QueueArgument,
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", help=f"At most this many of the queue's runs executing at once "
                              f"(1 to {flow.MAX_LIMIT}); left out: no cap.")] = None,
    rate: Annotated[str | None, typer.Option(
        "--rate", help="At most LIMIT of the queue's runs beginning to execute in any window: "
                       "LIMIT/WINDOW, e.g. 100/1m, 10/s, 5000/1h (units ms, s, m, h, d); "
                       "left out: no rate limit.")] = None,
    dsn: DsnOption = None,
) -> None:
    """Set the caps of queue NAME and print them; an option left out removes that cap."""
    with user_errors():
        rate_limit = None if rate is None else flow.parse_rate(rate)
        flow.set_queue_params(name, concurrency, rate_limit)  # every check, before connecting
        with connect(dsn) as conn:
            info = flow.set_queue(conn, name, concurrency=concurrency, rate_limit=rate_limit)
    typer.echo(f"queue {info.name!r}: concurrency {_cap(info.concurrency, 'no cap')}, "
               f"rate {_cap(info.rate_limit, 'no limit')}"
               + (" (paused)" if info.paused else ""))


@queue_app.command("pause")
def pause_queue(name: QueueArgument, dsn: DsnOption = None) -> None:
    """Stop claiming the queue's pending runs; runs already executing go on."""
    with user_errors():
        check_name(name, "queue")
        with connect(dsn) as conn:
            flow.pause_queue(conn, name)
    typer.echo(f"queue {name!r} paused")


@queue_app.command("resume")
def resume_queue(name: QueueArgument, dsn: DsnOption = None) -> None:
    """Claim the queue's pending runs again (a queue that is not paused: nothing changes)."""
    with user_errors():
        check_name(name, "queue")
        with connect(dsn) as conn:
            flow.resume_queue(conn, name)
    typer.echo(f"queue {name!r} resumed")


def _cap(value: object, none: str = "-") -> str:
    return none if value is None else str(value)


def _queue_json(q: flow.QueueInfo) -> dict[str, Any]:
    return {"name": q.name, "concurrency": q.concurrency,
            "rate_limit": q.rate_limit.limit if q.rate_limit else None,
            "rate_per": q.rate_limit.per.total_seconds() if q.rate_limit else None,
            "paused": q.paused, "pending": q.pending, "held": q.held, "running": q.running,
            "sleeping": q.sleeping, "waiting": q.waiting}
