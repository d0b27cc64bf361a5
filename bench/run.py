"""pgflow benchmark: one command, a fresh database, one JSON line per workload.

    .venv/bin/python -m bench.run [--dsn ADMIN_DSN | --private-server] [--quick]
        [--only pgbench,W0,W1,W5,W1b,W1c,W1t,W2,W3,W3a,W4,W4a,W4b,W6] [--output FILE | --no-output]

Creates database ``pgflow_bench_<random>`` on the admin server, migrates it,
runs the selected workloads and drops it again, whatever happens. Progress
goes to stderr, ending with a summary (also after Ctrl-C); stdout carries only
the JSON lines, which are also kept in ``bench/results/<UTC start>.jsonl`` after
a first line describing the machine, its PostgreSQL and the commit. What each
workload measures and how to read the numbers: bench/README.md. The machinery
is in bench/harness.py, the workloads in bench/workloads/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from psycopg.conninfo import make_conninfo

from bench.harness import (
    DEFAULT_ADMIN_DSN,
    DSN_ENV,
    QUICK_DIVISOR,
    REPO,
    RESULTS_DIR,
    WORKER_METRICS,
    WORKER_PROCESSES,
    WORKER_TRACING,
    Bench,
    Output,
    admin_server,
    create_database,
    describe_machine,
    drop_database,
    log,
    prepare,
)
from bench.workloads import WORKLOADS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help=f"admin server DSN [default: ${DSN_ENV}, else {DEFAULT_ADMIN_DSN}]")
    parser.add_argument("--quick", action="store_true",
                        help=f"divide run counts by {QUICK_DIVISOR} (smoke run)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--private-server", action="store_true",
                        help="run on a throwaway PostgreSQL of its own (initdb in a temporary "
                             "folder) that loads pg_stat_statements: round trips per run")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--output", metavar="FILE", type=Path,
                        help="keep the JSON lines, after a line describing the machine, in FILE "
                             "[default: bench/results/<UTC start>.jsonl]")
    output.add_argument("--no-output", action="store_true", help="stdout only, no results file")
    return parser.parse_args(argv)


def selected(only: str | None) -> list[str]:
    """The workloads to run, in order; W5 brings W1 along (run first), whose figure it compares with."""
    if not only:
        return list(WORKLOADS)
    by_lower = {name.lower(): name for name in WORKLOADS}
    names = [part.strip() for part in only.split(",") if part.strip()]
    unknown = [name for name in names if name.lower() not in by_lower]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    names = [by_lower[name.lower()] for name in names]
    if "W5" in names and "W1" not in names[:names.index("W5")]:
        names = [name for name in names if name != "W1"]
        names.insert(names.index("W5"), "W1")
    return names


def run_all(b: Bench, names: list[str], out: Output) -> bool:
    """Run the workloads, one JSON line each; a failed one prints an error line. True if all ran."""
    ok = True
    for name in names:
        try:
            for result in WORKLOADS[name](b):
                out.emit(result)
        except KeyboardInterrupt:
            log(f"interrupted during {name}")
            raise
        except Exception as exc:
            ok = False
            log(f"{name} failed: {exc!r}")
            out.emit({"workload": name, "error": repr(exc)})
    return ok


def summary(out: Output) -> None:
    """One line per JSON line so far, on stderr: the figures a reader looks at first."""
    kept = "" if out.path is None or not out.path.exists() else f", kept in {_shown(out.path)}"
    log(f"{len(out.lines)} line(s){kept}")
    for result in out.lines:
        if "error" in result:
            figures = f"error: {result['error']}"
        else:
            figures = f"n {result['n']}"
            if result.get("per_sec") is not None:
                figures += f"  {result['per_sec']:,.1f}/s"
            if result.get("p50_ms") is not None:
                figures += f"  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms"
        print(f"  {result['workload']:<22} {figures}", file=sys.stderr, flush=True)


def _shown(path: Path) -> Path:
    return path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = selected(args.only)
    started = datetime.now(timezone.utc)
    path = None if args.no_output else args.output or RESULTS_DIR / f"{started:%Y%m%dT%H%M%SZ}.jsonl"
    out = Output(path)
    run = {"workloads": names, "quick": args.quick, "private_server": args.private_server,
           "worker_metrics": WORKER_METRICS, "worker_tracing": WORKER_TRACING,
           "worker_processes": WORKER_PROCESSES,
           "argv": sys.argv[1:] if argv is None else argv}
    try:
        with admin_server(args.dsn, args.private_server) as admin_dsn:
            ok = _run(args, names, admin_dsn, out, started, run)
    except KeyboardInterrupt:
        summary(out)
        return 130
    finally:
        out.close()
    summary(out)
    return 0 if ok else 1


def _run(args: argparse.Namespace, names: list[str], admin_dsn: str, out: Output,
         started: datetime, run: dict[str, object]) -> bool:
    with tempfile.TemporaryDirectory(prefix="pgflow-bench-") as tmp:
        dbname = create_database(admin_dsn)
        log(f"database {dbname} created")
        try:
            b = Bench(admin_dsn, dbname, make_conninfo(admin_dsn, dbname=dbname), args.quick, Path(tmp))
            prepare(b)
            out.machine(describe_machine(b, admin_dsn, started, **run))
            return run_all(b, names, out)
        finally:
            drop_database(admin_dsn, dbname)
            log(f"database {dbname} dropped")


if __name__ == "__main__":
    sys.exit(main())
