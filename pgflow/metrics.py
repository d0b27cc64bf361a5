"""Prometheus metrics: what a worker does (steps, runs, claims) and what waits (queues, from SQL).

Needs ``prometheus_client`` (extra ``pgflow[metrics]``); :func:`instruments`
gives a no-op :class:`Instruments` without it or when metrics are off, so
the worker calls the same methods either way.

Series (``SERIES``; names and labels follow Prometheus conventions: units in
names, ``_total`` counters, bounded labels, never a run id):

- ``pgflow_steps_total{workflow,step,outcome}``: live step executions by
  outcome (``completed``, ``retrying``: an attempt failed and another is
  scheduled, ``failed``: the step failed for good);
- ``pgflow_step_duration_seconds{workflow,step}``: their durations;
- ``pgflow_runs_finished_total{workflow,status}``: runs this worker ended;
- ``pgflow_claim_delay_seconds{queue}``: from ready (``available_at``) to claimed;
- ``pgflow_worker_runs_in_flight``: runs the worker process is executing;
- ``pgflow_queue_runs{queue,status}`` and ``pgflow_queue_oldest_ready_seconds{queue}``:
  read at scrape time from ``pgflow.queue_metrics()``, which walks only
  unfinished runs (index on status), so a scrape costs the same on a table of
  a million finished runs as on an empty one.

Several worker processes on one host share one endpoint through
``prometheus_client``'s multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR``
to an empty directory for all of them; each records its metrics there (no
port needed), and the one started with ``--metrics-port`` serves the sum
(see :func:`registry`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg

logger = logging.getLogger("pgflow.metrics")

# Every series a scrape can show, with its labels (docs/observability checks its
# expressions against this). prometheus_client adds a ``_created`` timestamp to
# each counter and histogram (not for queries; left out here).
SERIES: dict[str, tuple[str, ...]] = {
    "pgflow_steps_total": ("workflow", "step", "outcome"),
    "pgflow_step_duration_seconds_bucket": ("workflow", "step", "le"),
    "pgflow_step_duration_seconds_sum": ("workflow", "step"),
    "pgflow_step_duration_seconds_count": ("workflow", "step"),
    "pgflow_runs_finished_total": ("workflow", "status"),
    "pgflow_claim_delay_seconds_bucket": ("queue", "le"),
    "pgflow_claim_delay_seconds_sum": ("queue",),
    "pgflow_claim_delay_seconds_count": ("queue",),
    "pgflow_worker_runs_in_flight": (),
    "pgflow_queue_runs": ("queue", "status"),
    "pgflow_queue_oldest_ready_seconds": ("queue",),
}

# Steps range from a dict lookup to a minutes-long call; claims from a NOTIFY's
# millisecond to a backlog's minutes.
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                 60, 300)

QUEUE_METRICS_SQL = ("select queue, status, runs, oldest_ready_seconds"
                     " from pgflow.queue_metrics()")


class Instruments:
    """What the worker reports; this base class records nothing (metrics off)."""

    enabled = False

    def claimed(self, queue: str, delay_seconds: float) -> None:
        """A run of ``queue`` was claimed ``delay_seconds`` after it became ready."""

    def step_ended(self, workflow: str, step: str, outcome: str, seconds: float) -> None:
        """A live step execution ended: ``completed``, ``retrying`` or ``failed``."""

    def run_ended(self, workflow: str, status: str) -> None:
        """This worker ended a run: ``completed``, ``failed`` or ``cancelled``."""

    def run_started(self) -> None:
        """A claimed run began executing here."""

    def run_left(self) -> None:
        """A run stopped executing here (ended, suspended, given back)."""


class PrometheusInstruments(Instruments):
    """:class:`Instruments` recording into ``prometheus_client`` metrics."""

    enabled = True

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = REGISTRY if registry is None else registry
        self._steps = Counter("pgflow_steps", "Live step executions, by outcome.",
                              ("workflow", "step", "outcome"), registry=registry)
        self._step_seconds = Histogram("pgflow_step_duration_seconds",
                                       "Duration of live step executions.", ("workflow", "step"),
                                       buckets=STEP_BUCKETS, registry=registry)
        self._runs = Counter("pgflow_runs_finished", "Runs ended by this worker, by status.",
                             ("workflow", "status"), registry=registry)
        self._delay = Histogram("pgflow_claim_delay_seconds",
                                "Seconds from a run being ready to its claim.", ("queue",),
                                buckets=DELAY_BUCKETS, registry=registry)
        self._in_flight = Gauge("pgflow_worker_runs_in_flight",
                                "Runs this worker process is executing.", registry=registry,
                                multiprocess_mode="livesum")

    def claimed(self, queue: str, delay_seconds: float) -> None:
        self._delay.labels(queue).observe(max(0.0, delay_seconds))

    def step_ended(self, workflow: str, step: str, outcome: str, seconds: float) -> None:
        self._steps.labels(workflow, step, outcome).inc()
        self._step_seconds.labels(workflow, step).observe(seconds)

    def run_ended(self, workflow: str, status: str) -> None:
        self._runs.labels(workflow, status).inc()

    def run_started(self) -> None:
        self._in_flight.inc()

    def run_left(self) -> None:
        self._in_flight.dec()


_lock = threading.Lock()
_instruments: PrometheusInstruments | None = None


def instruments(enabled: bool) -> Instruments:
    """The process's instruments: recording ones (created once) if ``enabled``."""
    global _instruments
    if not enabled:
        return Instruments()
    with _lock:
        if _instruments is None:
            _instruments = PrometheusInstruments()
        return _instruments


class QueueCollector:
    """``pgflow_queue_runs`` and ``pgflow_queue_oldest_ready_seconds``, read at scrape time.

    One short query a scrape on its own connection (``connect_timeout`` and a
    ``statement_timeout`` of 5 s: a slow database shows as a failed scrape of
    these series, never as a hung endpoint).
    """

    def __init__(self, dsn: str,
                 read: Callable[[str], list[tuple[str, str, int, float]]] | None = None) -> None:
        self._dsn = dsn
        self._read = read or read_queue_metrics

    def describe(self) -> list[Any]:
        return []  # not known before a scrape: queues come and go

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        runs = GaugeMetricFamily("pgflow_queue_runs", "Unfinished runs by queue and status.",
                                 labels=("queue", "status"))
        oldest = GaugeMetricFamily("pgflow_queue_oldest_ready_seconds",
                                   "Age of the oldest run ready to run and not claimed.",
                                   labels=("queue",))
        try:
            rows = self._read(self._dsn)
        except psycopg.Error as exc:
            logger.warning("queue metrics not read: %s", str(exc).strip().splitlines()[0:1])
            return
        oldest_by_queue: dict[str, float] = {}
        for queue, status, count, oldest_seconds in rows:
            runs.add_metric((queue, status), count)
            oldest_by_queue[queue] = max(oldest_seconds, oldest_by_queue.get(queue, 0.0))
        for queue, seconds in oldest_by_queue.items():
            oldest.add_metric((queue,), seconds)
        yield runs
        yield oldest


def read_queue_metrics(dsn: str) -> list[tuple[str, str, int, float]]:
    """``pgflow.queue_metrics()``: (queue, status, runs, oldest ready seconds) rows."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                         options="-c statement_timeout=5000") as conn:
        return [(q, s, int(n), float(age)) for q, s, n, age in conn.execute(QUEUE_METRICS_SQL)]


def registry(dsn: str | None) -> Any:
    """The registry a scrape reads: this process's metrics, or every process's.

    With ``PROMETHEUS_MULTIPROC_DIR`` set, the worker processes of a host
    write their samples there and one registry sums them (in flight: the sum
    of the live processes). The queue series come from SQL, once a scrape.
    """
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client import multiprocess as mp

    if shared_directory():
        scrape = CollectorRegistry()
        mp.MultiProcessCollector(scrape)
    else:
        scrape = CollectorRegistry()
        scrape.register(_Forward(REGISTRY))
    if dsn is not None:
        scrape.register(QueueCollector(dsn))  # type: ignore[arg-type]
    return scrape


class _Forward:
    """Every metric of another registry (the process's default one)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        return self._source.collect()


def serve(port: int, dsn: str | None, host: str = "") -> Any:
    """Serve ``/metrics`` on ``port`` from a daemon thread; returns the server.

    Raises :class:`OSError` when the port cannot be bound.
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry(dsn))
    return server


def shared_directory() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR``: where the worker processes of a host put their samples."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def available() -> bool:
    """Whether ``prometheus_client`` is installed (extra ``pgflow[metrics]``)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True
