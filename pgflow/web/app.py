"""``create_app``: the dashboard as one ASGI application.

Routes (relative to wherever the application is mounted)::

    GET  /                     overview: counts by status, failures per hour
    GET  /runs                 the runs list: filters, search, keyset pages
    GET  /runs/{id}            one run: timeline, payloads, signals, state, children
    POST /runs/{id}/cancel     /retry, /signal
    GET  /schedules            POST /schedules/pause, /resume, /trigger (field: id)
    GET  /queues               POST /queues/pause, /resume (field: name)
    GET  /workers
    GET  /api/runs             GET /api/runs/{id}: JSON
    GET  /metrics              Prometheus (pgflow.metrics: queue series from SQL)
    GET  /static/...           the stylesheet and the one small script

Every link is built with ``request.url_for``, so the same application works at
``/`` under ``pgflow ui`` and at any prefix inside a host application.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pgflow.web import actions, api, pages, prometheus
from pgflow.web.db import Database
from pgflow.web.security import AuthCallable, AuthMiddleware, HeadersMiddleware
from pgflow.web.site import Site

__all__ = ["create_app"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
SECRET_ENV = "PGFLOW_UI_SECRET"


def create_app(dsn: str, *, read_only: bool = False, auth: AuthCallable | None = None,
               secret: str | bytes | None = None) -> Starlette:
    """The dashboard for the pgflow database at ``dsn``, as an ASGI application.

    - ``read_only``: no action is offered, every POST is refused, and every
      transaction is READ ONLY; a login with only the ``pgflow_reader`` role
      is enough.
    - ``auth``: a callable taking the ``starlette.requests.Request``, plain or
      async, that returns something truthy to let the request through; refused
      requests get 403 (401 with a challenge for :func:`pgflow.web.basic_auth`).
    - ``secret``: the key that signs CSRF tokens and flash messages; give the
      same one to every process serving the dashboard behind one address
      (default: ``$PGFLOW_UI_SECRET``, else random for this process).

    The connection pool opens at startup (or at the first request where the
    host application does not run a mounted application's lifespan) and closes
    at shutdown: a host can enter ``app.router.lifespan_context(app)`` in its
    own lifespan to close it cleanly.
    """
    key = secret if secret is not None else os.environ.get(SECRET_ENV) or secrets.token_bytes(32)
    site = Site(Database(dsn, read_only=read_only), read_only=read_only,
                secret=key.encode() if isinstance(key, str) else key)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        site.db.open()
        try:
            yield
        finally:
            site.db.close()

    routes = [
        Route("/", pages.overview, name="overview"),
        Route("/runs", pages.runs, name="runs"),
        Route("/runs/{run_id}", pages.run, name="run"),
        Route("/runs/{run_id}/cancel", actions.cancel_run, methods=["POST"], name="cancel_run"),
        Route("/runs/{run_id}/retry", actions.retry_run, methods=["POST"], name="retry_run"),
        Route("/runs/{run_id}/signal", actions.signal_run, methods=["POST"], name="signal_run"),
        Route("/schedules", pages.schedules, name="schedules"),
        Route("/schedules/{verb}", actions.schedule_action, methods=["POST"],
              name="schedule_action"),
        Route("/queues", pages.queues, name="queues"),
        Route("/queues/{verb}", actions.queue_action, methods=["POST"], name="queue_action"),
        Route("/workers", pages.workers, name="workers"),
        Route("/api/runs", api.runs, name="api_runs"),
        Route("/api/runs/{run_id}", api.run, name="api_run"),
        Route("/metrics", prometheus.endpoint, name="metrics"),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [Middleware(HeadersMiddleware)]
    if auth is not None:
        if not callable(auth):
            raise TypeError(f"auth must be a callable taking the request, not {auth!r}")
        middleware.append(Middleware(AuthMiddleware, auth=auth))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.site = site
    return app
