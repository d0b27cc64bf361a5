"""The ``pgflow`` command line.

Every failure the user can cause (bad JSON, unknown run, workflow or schedule,
database unreachable, schema not migrated) ends as one line on stderr and exit
code 1; set ``PGFLOW_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import psycopg
import typer
from psycopg.types.json import Jsonb

from pgflow import (
    cli_queues,
    cli_schedules,
    cli_ui,
    client,
    errors,
    flow,
    logs,
    metrics,
    models,
    schema,
    supervisor,
)
from pgflow import dsn as dsn_resolution
from pgflow.cli_support import (
    DsnOption,
    JsonOption,
    columns,
    connect,
    one_line,
    parse_json,
    user_errors,
)
from pgflow.worker import DEFAULT_CONCURRENCY, STALE_AFTER, Worker

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Durable workflows on PostgreSQL.")
app.command("schedules")(cli_schedules.list_schedules)
app.add_typer(cli_schedules.schedule_app, name="schedule")
app.command("queues")(cli_queues.list_queues)
app.add_typer(cli_queues.queue_app, name="queue")
app.command("ui")(cli_ui.ui)

@app.command()
def migrate(dsn: DsnOption = None) -> None:
    """Create or upgrade the pgflow schema (safe to repeat, safe to run concurrently)."""
    with user_errors():
        target = dsn_resolution.resolve(dsn)
        for note in schema.breaking_notes(target):
            typer.echo(f"pgflow: stop every worker before this migration: {note}", err=True)
        revision = schema.migrate(target)
        typer.echo(f"pgflow schema is at revision {revision}")


@app.command()
def worker(
    modules: Annotated[list[str], typer.Argument(help="Modules that define workflows.")],
    queue: Annotated[list[str] | None, typer.Option(
        "-q", "--queue", help="Queue to serve (repeatable) [default: the workflows' queues]")] = None,
    concurrency: Annotated[int, typer.Option(
        "-c", "--concurrency", min=1, help="Runs in flight at once.")] = DEFAULT_CONCURRENCY,
    stale_after: Annotated[float, typer.Option(
        "--stale-after", min=1.0,
        help="Seconds without a heartbeat after which this worker declares another dead "
             "(a killed worker is noticed at once, by its lost connection).")
    ] = STALE_AFTER.total_seconds(),
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=1, max=65535,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (needs the 'metrics' extra).")
    ] = None,
    metrics_host: Annotated[str, typer.Option(
        "--metrics-host", help="Address the metrics endpoint listens on.")] = "0.0.0.0",
    log_format: Annotated[str, typer.Option(
        "--log-format", help="text, or json: one JSON object a line (run_id, workflow, step, "
                             "attempt included).")] = "text",
    processes: Annotated[int | None, typer.Option(
        "-p", "--processes", min=1,
        help="Worker processes, under one supervisor when more than 1 [default: one a core]")
    ] = None,
    scheduler: Annotated[bool, typer.Option(
        "--scheduler/--no-scheduler", hidden=True,
        help="Take part in electing the scheduler leader (a supervisor's first process does).")
    ] = True,
    dsn: DsnOption = None,
) -> None:
    """Run the workflows defined in MODULES until SIGTERM/SIGINT, then drain.

    With -p N (default: one a core), a supervisor starts N worker processes,
    starts again one that dies, and forwards SIGTERM to all for a drain.
    """
    supervisor.die_with_supervisor()
    with user_errors():
        if log_format not in ("text", "json"):
            raise ValueError(f"--log-format must be text or json, not {log_format!r}")
        if (metrics_port is not None or metrics.shared_directory()) and not metrics.available():
            raise ValueError("metrics need prometheus_client: pip install 'pgflow-engine[metrics]'")
        target = dsn_resolution.resolve(dsn)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # any error of the module's own code, too
                raise ValueError(f"cannot import module {name!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
        logs.configure(logging.INFO, log_format)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        count = supervisor.default_processes() if processes is None else processes
        if count > 1:
            command = functools.partial(
                _child_command, modules=modules, queues=queue or [], concurrency=concurrency,
                stale_after=stale_after, log_format=log_format)
            _check_before_supervising(target, queue, concurrency)
            boss = supervisor.Supervisor(command, count, target)
            if metrics_port is not None:
                with _serving_metrics(metrics_host, metrics_port):
                    boss.serve_metrics(metrics_port, metrics_host)
            raise typer.Exit(boss.run())
        if metrics_port is not None:
            with _serving_metrics(metrics_host, metrics_port):
                metrics.serve(metrics_port, target, metrics_host)
            logging.getLogger("pgflow.worker").info(
                "metrics at http://%s:%d/metrics", metrics_host, metrics_port)
        _quiet_garbage_collector()
        Worker(target, queues=queue or None, concurrency=concurrency,
               stale_after=timedelta(seconds=stale_after), schedule_timers=scheduler,
               metrics=metrics_port is not None or metrics.shared_directory() is not None).run()


@contextlib.contextmanager
def _serving_metrics(host: str, port: int) -> Iterator[None]:
    """A port that cannot be bound is one error line."""
    try:
        yield
    except OSError as exc:
        raise ValueError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


def _check_before_supervising(target: str, queues: list[str] | None, concurrency: int) -> None:
    """Every mistake found once, before any process starts (not once a process)."""
    Worker(target, queues=queues or None, concurrency=concurrency)  # workflows, queues
    with psycopg.connect(target, autocommit=True) as conn:
        schema.check(conn)
        # What each process does first, tried here and undone: a login without the
        # pgflow_worker role gets its one error line now.
        with conn.transaction(force_rollback=True):
            conn.execute("select pgflow.register_worker(%s, %s, %s, %s, %s)",
                         (uuid.uuid4(), "supervisor", os.getpid(), [], Jsonb([])))


def _child_command(index: int, *, modules: list[str], queues: list[str], concurrency: int,
                   stale_after: float, log_format: str) -> list[str]:
    """A supervised worker process: one process, the DSN in its environment; the first
    is the host's scheduler candidate."""
    return [sys.executable, "-m", "pgflow", "worker", *modules, "-p", "1",
            "-c", str(concurrency), "--stale-after", str(stale_after),
            "--log-format", log_format, *[arg for q in queues for arg in ("-q", q)],
            *(() if index == 0 else ("--no-scheduler",))]


def _quiet_garbage_collector() -> None:
    """Shorter pauses of the cyclic garbage collector in this dedicated worker process.

    Every suspension unwinds a workflow with an exception, which leaves reference
    cycles, so collections are frequent; a full one walked every object imported so
    far and held the event loop for tens of milliseconds. Freezing what the imports
    made takes it out of those walks, and a larger first generation collects less
    often. Measured (bench W4, 2,000 timers due within a second): timer firing p99
    21-31 ms -> 7-10 ms. Only here: an application embedding ``pgflow.Worker`` keeps
    its own collector settings.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@app.command()
def start(
    name: Annotated[str, typer.Argument(help="Workflow name.")],
    input: Annotated[str, typer.Option(
        "--input", help="Arguments: a JSON array (positional) or object (by name).")] = "[]",
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", help="Override the queue.")] = None,
    dsn: DsnOption = None,
) -> None:
    """Start a run of workflow NAME and print its id."""
    with user_errors():
        data = parse_json(input, "--input")
        if isinstance(data, list):
            args, kwargs = tuple(data), {}
        elif isinstance(data, dict):
            args, kwargs = (), data
        else:
            raise ValueError("--input must be a JSON array (positional arguments) "
                             "or object (keyword arguments)")
        with connect(dsn) as conn:
            run_id = client.start(conn, name, *args, key=key, queue=queue, **kwargs)
        typer.echo(str(run_id))


@app.command()
def show(run_id: Annotated[str, typer.Argument(help="Run id.")], dsn: DsnOption = None,
         as_json: JsonOption = False) -> None:
    """Show a run and its step timeline; for a pending run held back, why."""
    with user_errors(), connect(dsn) as conn:
        run = client.get(conn, run_id)
        held = flow.why_pending(conn, run.id) if run.status == "pending" else None
    if as_json:
        typer.echo(json.dumps(_run_json(run) | {"held": held}, default=str, indent=2))
        return
    typer.echo(_render_run(run, held))


StatusOption = Annotated[str | None, typer.Option("--status", help="Only runs in this status.")]
NameOption = Annotated[str | None, typer.Option("--name", help="Only runs of this workflow.")]
KeyOption = Annotated[str | None, typer.Option("--key", help="Only the run with this key.")]
SinceOption = Annotated[str | None, typer.Option(
    "--since", help="Only runs created since: 30m, 2h, 7d, or an ISO date/time.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@dataclass(frozen=True)
class RunFilter:
    """The --status/--name/--key/--since filters, as SQL over pgflow.runs r."""

    status: str | None = None
    name: str | None = None
    key: str | None = None
    since: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in _STATUSES:
            raise ValueError(f"unknown status {self.status!r}; one of: {', '.join(_STATUSES)}")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.status, self.name, self.key, self.since))

    def sql(self) -> tuple[str, dict[str, Any]]:
        where = " and ".join([
            "(%(status)s::text is null or r.status = %(status)s)",
            "(%(name)s::text is null or r.name = %(name)s)",
            "(%(key)s::text is null or r.key = %(key)s)",
            "(%(since)s::timestamptz is null or r.created_at >= %(since)s)"])
        since = None if self.since is None else _parse_since(self.since)
        return where, {"status": self.status, "name": self.name, "key": self.key, "since": since}


def _parse_since(text: str) -> datetime:
    with contextlib.suppress(ValueError):
        return datetime.now(timezone.utc) - _parse_age(text, "--since")
    try:  # Python 3.10's fromisoformat does not know a trailing Z
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"--since {text!r}: use 30m, 2h, 7d or an ISO date/time") from None
    return when if when.tzinfo else when.astimezone()


# A run nobody can serve: unfinished, and no live worker has its (name, version) on its queue.
_UNSERVED = ("r.status in ('pending', 'sleeping', 'waiting') and not exists (select 1 from"
             " pgflow.workers w where r.queue = any(w.queues) and w.workflows @>"
             " jsonb_build_array(jsonb_build_object('name', r.name, 'version', r.version)))")


@app.command("list")
def list_runs(
    status: StatusOption = None,
    name: NameOption = None,
    key: KeyOption = None,
    since: SinceOption = None,
    unserved: Annotated[bool, typer.Option(
        "--unserved", help="Only runs that no live worker can serve.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 50,
    dsn: DsnOption = None,
    as_json: JsonOption = False,
) -> None:
    """List runs, newest first; held-back runs and runs no live worker can serve are marked."""
    with user_errors():
        where, params = RunFilter(status, name, key, since).sql()
        if unserved:
            where += f" and {_UNSERVED}"
        with connect(dsn) as conn:
            rows = conn.execute(
                f"select {', '.join(_LIST_COLUMNS)}, {_UNSERVED} as unserved"
                f" from pgflow.runs r where {where}"
                " order by r.created_at desc, r.id desc limit %(limit)s",
                {**params, "limit": limit}).fetchall()
            runs = [dict(zip((*(c.removeprefix("r.") for c in _LIST_COLUMNS), "unserved"), row,
                             strict=True)) for row in rows]
            held = {} if as_json else flow.why_pending_runs(
                conn, [r["id"] for r in runs if r["status"] == "pending"])
    if as_json:  # one JSON array, newest first
        typer.echo(json.dumps(runs, default=str, indent=2))
        return
    table = [("ID", "WORKFLOW", "STATUS", "CREATED", "KEY")]
    for r in runs:
        marker = "  (held)" if r["id"] in held else ""  # `pgflow show` says why
        if r["unserved"]:
            marker += f"  (no worker for v{r['version']})"
        table.append((str(r["id"]), f"{r['name']} v{r['version']}", f"{r['status']}{marker}",
                      _time(r["created_at"]), r["key"] or ""))
    typer.echo(columns(table))


# What `pgflow list` reads of each run (and prints with --json).
_LIST_COLUMNS = ("r.id", "r.name", "r.version", "r.queue", "r.status", "r.key", "r.priority",
                 "r.parent_id", "r.created_at", "r.started_at", "r.finished_at", "r.input",
                 "r.output", "r.error")


@app.command()
def signal(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    name: Annotated[str, typer.Argument(help="Signal name.")],
    payload: Annotated[str, typer.Option("--payload", help="JSON payload.")] = "null",
    dsn: DsnOption = None,
) -> None:
    """Send a signal to a run."""
    with user_errors():
        data = parse_json(payload, "--payload")
        with connect(dsn) as conn:
            client.signal(conn, run_id, name, data)
    typer.echo(f"signal {name!r} sent to run {run_id}")


RunIdArgument = Annotated[str | None, typer.Argument(
    help="Run id; or leave it out and select runs with the filters.")]


@app.command()
def cancel(run_id: RunIdArgument = None, status: StatusOption = None, name: NameOption = None,
           key: KeyOption = None, since: SinceOption = None, yes: YesOption = False,
           dsn: DsnOption = None) -> None:
    """Cancel a run (and its children) at its next durable point, or every run that matches."""
    with user_errors(), connect(dsn) as conn:
        if run_id is not None:
            _no_filters_with_an_id(status, name, key, since)
            requested = client.cancel(conn, run_id)
            typer.echo(f"cancellation of run {run_id} requested" if requested
                       else f"run {run_id} had already finished")
            return
        ids = _select(conn, RunFilter(status, name, key, since),
                      "r.status not in ('completed', 'failed', 'cancelled')", "cancel")
        _confirm(f"Cancel {len(ids)} unfinished run(s)?", len(ids), yes, "cancel")
        done = sum(client.cancel(conn, rid) for rid in ids)
        typer.echo(f"cancellation requested for {done} run(s)")


@app.command()
def retry(run_id: RunIdArgument = None, status: StatusOption = None, name: NameOption = None,
          key: KeyOption = None, since: SinceOption = None, yes: YesOption = False,
          dsn: DsnOption = None) -> None:
    """Resume a failed run from its last checkpoint, or every failed run that matches."""
    with user_errors(), connect(dsn) as conn:
        if run_id is not None:
            _no_filters_with_an_id(status, name, key, since)
            client.retry(conn, run_id)
            typer.echo(f"run {run_id} will resume from its last checkpoint")
            return
        if status not in (None, "failed"):
            raise ValueError("only failed runs can be retried: leave --status out or say failed")
        _require_filters(RunFilter(status, name, key, since), "retry")  # before status is forced
        ids = _select(conn, RunFilter("failed", name, key, since), "true", "retry")
        _confirm(f"Retry {len(ids)} failed run(s)?", len(ids), yes, "retry")
        resumed = 0
        for rid in ids:
            try:
                client.retry(conn, rid)
                resumed += 1
            except errors.RunStateError:  # retried or cancelled by someone else meanwhile
                continue
        skipped = f" ({len(ids) - resumed} no longer failed)" if resumed < len(ids) else ""
        typer.echo(f"{resumed} run(s) will resume from their last checkpoint{skipped}")


def _no_filters_with_an_id(*filters: str | None) -> None:
    if any(f is not None for f in filters):
        raise ValueError("give a run id or filters (--status, --name, --key, --since), not both")


def _require_filters(filters: RunFilter, verb: str) -> None:
    if not filters.given:
        raise ValueError(f"give a run id, or filters (--status, --name, --key, --since) to "
                         f"{verb} several runs")


def _select(conn: psycopg.Connection[Any], filters: RunFilter, condition: str,
            verb: str) -> list[Any]:
    _require_filters(filters, verb)
    where, params = filters.sql()
    rows = conn.execute(f"select r.id from pgflow.runs r where {where} and {condition}"
                        " order by r.created_at", params).fetchall()
    return [row[0] for row in rows]


def _confirm(question: str, count: int, yes: bool, verb: str) -> None:
    if count == 0:
        raise ValueError(f"no run matches: nothing to {verb}")
    if yes:
        return
    if not sys.stdin.isatty():
        raise ValueError(f"{count} run(s) match: pass --yes to {verb} them (no terminal to ask)")
    if not typer.confirm(question, default=False):
        raise ValueError(f"not confirmed: nothing was done ({count} run(s) matched)")


@app.command()
def purge(
    older_than: Annotated[str, typer.Option(
        "--older-than", help="Delete runs that finished longer ago than this: 30m, 12h, 30d, 2w.")],
    batch: Annotated[int, typer.Option("--batch", min=1, help="Runs deleted a transaction.")] = 1000,
    dsn: DsnOption = None,
) -> None:
    """Delete finished runs and all their rows, in short batches that never wait for workers.

    Schedules' tick records older than that go too (buffered ticks, still to run, stay).
    """
    with user_errors():
        age = _parse_age(older_than, "--older-than")
        total = ticks = 0
        with connect(dsn) as conn:
            while deleted := conn.execute("select pgflow.purge(%s, %s)", (age, batch)).fetchone()[0]:
                total += deleted
            while deleted := conn.execute("select pgflow.purge_schedule_ticks(%s, %s)",
                                          (age, batch)).fetchone()[0]:
                ticks += deleted
    typer.echo(f"purged {total} run(s) that finished more than {older_than} ago"
               + (f" and {ticks} schedule tick record(s)" if ticks else ""))


_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _parse_age(text: str, option: str) -> timedelta:
    number, unit = text[:-1], text[-1:]
    if unit not in _AGE_UNITS or not number.isdigit():
        raise ValueError(f"{option} {text!r}: use a whole number and a unit, e.g. 30m, 12h, 30d, 2w")
    try:
        age = timedelta(**{_AGE_UNITS[unit]: int(number)})
        datetime.now(timezone.utc) - age  # the caller subtracts it: it must stay a date
    except OverflowError:
        raise ValueError(f"{option} {text!r} is too far back") from None
    return age


_STATUSES = ("pending", "running", "sleeping", "waiting", "completed", "failed", "cancelled")


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _run_json(run: models.Run) -> dict[str, Any]:
    data = {k: v for k, v in vars(run).items() if k != "steps"}
    data["steps"] = [vars(step) for step in run.steps]
    return data


def _render_run(run: models.Run, held: str | None = None) -> str:
    lines = [f"run      {run.id}",
             f"workflow {run.name} v{run.version}  (queue {run.queue})",
             f"status   {run.status}"]
    if held:
        lines.append(f"held     {held}")
    if run.key:
        lines.append(f"key      {run.key}")
    if run.parent_id:
        lines.append(f"parent   {run.parent_id}")
    lines.append(f"created  {_time(run.created_at)}")
    lines.append(f"started  {_time(run.started_at)}")
    lines.append(f"finished {_time(run.finished_at)}")
    lines.append(f"input    {json.dumps(run.input)}")
    if run.status == "completed":
        lines.append(f"output   {json.dumps(run.output)}")
    if run.error:
        lines.append(f"error    {run.error.get('type')}: {run.error.get('message')}")
    lines.append("")
    table = [("SEQ", "STEP", "STATUS", "ATTEMPTS", "STARTED", "DURATION", "ERROR")]
    for s in run.steps:
        if s.duration_ms is not None:
            duration = f"{s.duration_ms:.1f} ms"
        elif s.waits_until is not None and not run.finished:
            duration = f"until {_time(s.waits_until)}"
        else:
            duration = "-"
        error = f"{s.error.get('type')}: {s.error.get('message')}" if s.error else ""
        table.append((str(s.seq), s.name, s.status, str(s.attempts), _time(s.started_at),
                      duration, one_line(error)[:80]))
    lines.append(columns(table) if run.steps else "(no steps recorded yet)")
    return "\n".join(lines)


def main() -> None:
    """Entry point: usage mistakes too end as one line on stderr (exit 2)."""
    # Typer's click (vendored or not) raises these; match them by name.
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        names = {cls.__name__ for cls in type(exc).__mro__}
        ctx = getattr(exc, "ctx", None)
        if "NoArgsIsHelpError" in names and ctx is not None:
            typer.echo(ctx.get_help(), err=True)
            sys.exit(2)
        if "UsageError" in names:
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"pgflow: error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(2)
        if "Abort" in names:
            typer.echo("\npgflow: error: aborted", err=True)
            sys.exit(130)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
