"""The scale curve: the drains with 1, 2, 4, 8, 16 worker processes against one PostgreSQL.

    .venv/bin/python -m bench.scale [--processes 1,2,4,8,16] [--only pgbench,W1b,W2]
        [--dsn ADMIN_DSN | --private-server] [--quick]

One ``bench.run`` a point, with ``PGFLOW_BENCH_PROCESSES=N`` (``pgflow worker -p N``) and
``PGFLOW_BENCH_WAITS=1`` (what the database's backends wait on, sampled during each drain),
its lines kept in ``bench/results/<UTC start>-scale-pN.jsonl``; then one table: runs/s,
steps/s, host CPU busy, worker and database CPU ms a run, and the top wait events. Made to
be copied to a machine with many cores and run as one command (bench/README.md, "Worker
processes").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.harness import REPO, RESULTS_DIR

DEFAULT_PROCESSES = "1,2,4,8,16"
DEFAULT_WORKLOADS = "pgbench,W1b,W2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default=DEFAULT_PROCESSES,
                        help=f"comma-separated worker process counts [{DEFAULT_PROCESSES}]")
    parser.add_argument("--only", default=DEFAULT_WORKLOADS,
                        help=f"the workloads of each point [{DEFAULT_WORKLOADS}]")
    parser.add_argument("--dsn", help="admin server DSN (as bench.run)")
    parser.add_argument("--private-server", action="store_true",
                        help="a throwaway PostgreSQL for each point (as bench.run)")
    parser.add_argument("--quick", action="store_true", help="as bench.run --quick")
    args = parser.parse_args(argv)
    try:
        args.counts = [int(n) for n in args.processes.split(",")]
    except ValueError:
        parser.error(f"--processes: comma-separated whole numbers, not {args.processes!r}")
    if not args.counts or min(args.counts) < 1:
        parser.error("--processes: each count must be at least 1")
    return args


def run_point(args: argparse.Namespace, processes: int, output: Path) -> list[dict[str, Any]]:
    """One ``bench.run`` with ``processes`` worker processes; its JSON lines."""
    command = [sys.executable, "-m", "bench.run", "--only", args.only, "--output", str(output)]
    command += ["--dsn", args.dsn] if args.dsn else []
    command += ["--private-server"] if args.private_server else []
    command += ["--quick"] if args.quick else []
    env = dict(os.environ, PGFLOW_BENCH_PROCESSES=str(processes), PGFLOW_BENCH_WAITS="1")
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(text) for text in output.read_text().splitlines() if text.strip()]


def _waits(line: dict[str, Any]) -> str:
    events = line.get("wait_events") or {}
    return ", ".join(f"{name} {share:.0%}" for name, share in list(events.items())[:3]) or "-"


def table(points: dict[int, list[dict[str, Any]]]) -> str:
    rows = ["| processes | pgbench 1 / 8 clients tps | W1b runs/s | W2 steps/s | host CPU busy"
            " (W1b / W2) | worker + db CPU ms a W1b run | active backends (W1b) |"
            " W1b waits |",
            "|---|---|---|---|---|---|---|---|"]
    for processes, lines in points.items():
        by = {line.get("workload"): line for line in lines}
        b, w2 = by.get("W1b_drain", {}), by.get("W2_ten_steps", {})
        c1, c8 = by.get("pgbench_update_c1", {}), by.get("pgbench_update_c8", {})
        rows.append(
            f"| {processes} | {c1.get('per_sec', '-')} / {c8.get('per_sec', '-')}"
            f" | {b.get('per_sec', '-')} | {w2.get('per_sec', '-')}"
            f" | {b.get('host_cpu_busy', '-')} / {w2.get('host_cpu_busy', '-')}"
            f" | {b.get('worker_cpu_ms_per_run', '-')} + {b.get('db_cpu_ms_per_run', '-')}"
            f" | {b.get('active_backends', '-')} | {_waits(b)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    points: dict[int, list[dict[str, Any]]] = {}
    for processes in args.counts:
        output = RESULTS_DIR / f"{started}-scale-p{processes}.jsonl"
        print(f"[scale] {processes} worker process(es): {args.only} -> {output}",
              file=sys.stderr, flush=True)
        points[processes] = run_point(args, processes, output)
    print(table(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
