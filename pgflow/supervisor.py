"""``pgflow worker -p N``: one supervisor and N worker processes on one host.

A worker process runs Python, so it uses about one core whatever ``-c`` says.
The supervisor runs no workflow: it starts N children (``pgflow worker ... -p 1``,
each a complete worker: claims, heartbeat, recovery) and keeps them running:

- a child that exits on its own is started again, after a back-off (1 s,
  doubling up to 30 s; back to 1 s once a child has lived a minute);
- SIGTERM or SIGINT is forwarded to every child, which drains; the supervisor
  exits 0 once all have exited 0 (else with the first other code). A second
  signal is forwarded too: the children exit at once, their runs recovered;
- only the first child is a scheduler candidate (the database elects one
  leader among all candidates; one a host is plenty);
- with ``--metrics-port``, the children record into a fresh
  ``PROMETHEUS_MULTIPROC_DIR`` and the supervisor serves their sum (and the
  queue series) on that one port;
- the children die with the supervisor (``PR_SET_PDEATHSIG``, Linux): a
  supervisor killed with SIGKILL leaves no orphan, and its children's runs
  come back through recovery like any dead worker's.

The DSN reaches the children in ``PGFLOW_DSN`` (never on a command line that
``ps`` shows). Under systemd, use ``KillMode=mixed``: SIGTERM to the supervisor
only (a second SIGTERM sent to each child directly would stop it at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pgflow import metrics

logger = logging.getLogger("pgflow.supervisor")

SUPERVISOR_ENV = "PGFLOW_SUPERVISOR_PID"  # set for a child: its supervisor's pid
RESTART_MIN = 1.0  # seconds before a dead child is started again, doubling...
RESTART_MAX = 30.0  # ... up to this
STABLE_AFTER = 60.0  # a child that lived this long resets its back-off
POLL = 0.2  # seconds between looks at the children


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = RESTART_MIN
    restart_at: float | None = None
    final: int | None = None  # its exit code once the supervisor was told to stop


class Supervisor:
    """Runs ``processes`` children made by ``command(index)`` until signalled; see the module."""

    def __init__(self, command: Callable[[int], list[str]], processes: int, dsn: str) -> None:
        if processes < 2:
            raise ValueError(f"a supervisor runs 2 processes or more, not {processes}")
        self._command = command
        self._children = [_Child(i) for i in range(processes)]
        self._dsn = dsn
        self._signals = 0
        self._metrics_dir: str | None = None

    # -- running ---------------------------------------------------------------

    def run(self) -> int:
        """Supervise until every child has exited after a signal; the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            for child in self._children:
                self._start(child)
            logger.info("supervising %d worker processes: %s", len(self._children),
                        ", ".join(str(c.proc.pid) for c in self._children if c.proc))
            while not self._all_stopped():
                self._tend()
                time.sleep(POLL)
            self._tend()  # the exit codes of the last to stop
        finally:
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        # A child that died and was started again does not count: the drain does.
        return next((c.final for c in self._children if c.final not in (None, 0)), 0)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        logger.info("%s received: %s %d worker processes", signal.Signals(signum).name,
                    "draining" if self._signals == 1 else "stopping at once",
                    len(self._children))
        for child in self._children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    def _all_stopped(self) -> bool:
        return self._signals > 0 and all(c.proc is None or c.proc.poll() is not None
                                         for c in self._children)

    def _tend(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.proc is not None and child.restart_at is None:
                code = child.proc.poll()
                if code is None:
                    continue
                self._forget_samples(child.proc.pid)
                if self._signals:
                    child.final = code  # stopping: it drained (or was told to stop)
                    child.restart_at = float("inf")  # seen: not looked at again
                    continue
                lived = now - child.started
                child.backoff = RESTART_MIN if lived >= STABLE_AFTER else min(
                    child.backoff * 2, RESTART_MAX)
                child.restart_at = now + (RESTART_MIN if lived >= STABLE_AFTER
                                          else child.backoff)
                logger.warning("worker process %d (pid %d) exited with %d after %.1fs; "
                               "starting it again in %.0fs", child.index, child.proc.pid, code,
                               lived, child.restart_at - now)
            elif child.restart_at is not None and now >= child.restart_at and not self._signals:
                self._start(child)

    def _start(self, child: _Child) -> None:
        env = {**os.environ, "PGFLOW_DSN": self._dsn, SUPERVISOR_ENV: str(os.getpid())}
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        # A session of its own: Ctrl-C in a terminal reaches the supervisor alone, which
        # passes it on once (twice would be "exit at once").
        child.proc = subprocess.Popen(self._command(child.index), env=env,
                                      start_new_session=True)
        child.started = time.monotonic()
        child.restart_at = None

    # -- metrics ---------------------------------------------------------------

    def _forget_samples(self, pid: int) -> None:
        """A dead child's in-flight gauge no longer counts (its counters still do)."""
        if self._metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self._metrics_dir)

    def serve_metrics(self, port: int, host: str = "0.0.0.0") -> None:
        """Before :meth:`run`: the children's samples go to a fresh directory, and this
        process serves their sum on ``port`` (:class:`OSError` if it cannot bind it)."""
        self._metrics_dir = tempfile.mkdtemp(prefix="pgflow-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        try:
            metrics.serve(port, self._dsn, host)
        except OSError:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None
            raise
        logger.info("metrics of all worker processes at http://%s:%d/metrics", host, port)


def die_with_supervisor() -> None:
    """In a child: ask the kernel for SIGKILL when the supervisor dies (Linux), and exit now
    if it already has."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(supervisor):
        os._exit(1)  # orphaned before the request took effect


CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"


def default_processes(cpu_max: str = CPU_MAX) -> int:
    """One worker process a core this process may use: the cores it may run on, fewer
    under a CPU quota (a container limited to 2 CPUs on a 64-core node gets 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # rounded up
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return max(1, cores)
