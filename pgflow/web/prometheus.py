"""``GET /metrics``: the Prometheus series of ``pgflow.metrics``, served by the dashboard.

The queue series (``pgflow_queue_runs``, ``pgflow_queue_oldest_ready_seconds``)
are read at each scrape from ``pgflow.queue_metrics()`` through the
dashboard's own pool (the ``pgflow_reader`` role may call it). The rest is what
``pgflow.metrics.registry`` gives: this process's series, or, with
``PROMETHEUS_MULTIPROC_DIR`` set, the sum of every worker process of the host.
Needs ``prometheus_client`` (in the ``ui`` and ``metrics`` extras); without it
the endpoint answers 503 and says what to install.
"""

from __future__ import annotations

import threading
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pgflow import metrics
from pgflow.web.db import Database
from pgflow.web.site import Site, site_of

__all__ = ["endpoint"]

_lock = threading.Lock()  # two first scrapes at once make one registry


def _queue_rows(db: Database) -> list[tuple[str, str, int, float]]:
    def read(conn: Any) -> list[tuple[str, str, int, float]]:
        return [(q, s, int(n), float(age))
                for q, s, n, age in conn.execute(metrics.QUEUE_METRICS_SQL)]

    return db.call(read)


def _registry(site: Site) -> Any:
    """The dashboard's registry, made on its first scrape; it lives as long as the app."""
    with _lock:
        if site.metrics_registry is None:
            db = site.db
            registry = metrics.registry(None)
            registry.register(metrics.QueueCollector(db.dsn, read=lambda _dsn: _queue_rows(db)))
            site.metrics_registry = registry
        return site.metrics_registry


async def endpoint(request: Request) -> Response:
    if not metrics.available():
        return PlainTextResponse("metrics need prometheus_client: pip install "
                                 "'pgflow-engine[metrics]'\n", status_code=503)
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    body = await run_in_threadpool(generate_latest, _registry(site_of(request)))
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"cache-control": "no-store"})
