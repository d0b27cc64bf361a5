"""What every handler shares: the database, the templates, the secret; rendering and errors.

:class:`Site` lives in ``app.state.site``. :func:`page_errors` and
:func:`json_errors` turn every failure a user can cause into one clear
message (an HTML page or a JSON error) with the right status: never a
traceback. Unexpected errors are logged with their traceback on the server
and shown as one line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import psycopg
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pgflow import errors
from pgflow.cli_support import describe
from pgflow.web import render, security
from pgflow.web.db import Database, Unavailable
from pgflow.web.listing import BadQuery

__all__ = ["NotFound", "Site", "json_errors", "page_errors", "site_of"]

logger = logging.getLogger("pgflow.web")

Handler = Callable[[Request], Awaitable[Response]]
FLASH_MAX_AGE = 60  # seconds: a flash is read by the page the redirect lands on


class NotFound(LookupError):
    """Nothing at this address (an unknown run id, say)."""


class Refused(PermissionError):
    """The request is understood but not allowed (read-only mode, a bad CSRF token)."""


def site_of(request: Request) -> Site:
    site: Site = request.app.state.site
    return site


def classify(exc: Exception) -> tuple[int, str]:
    """The HTTP status and the one-line message for a failure."""
    if isinstance(exc, BadQuery):
        return 400, str(exc)
    if isinstance(exc, (NotFound, errors.RunNotFound, errors.ScheduleNotFound,
                        errors.WorkflowNotFound)):
        return 404, str(exc)
    if isinstance(exc, Refused):
        return 403, str(exc)
    if isinstance(exc, (errors.SchemaNotMigrated, errors.SchemaTooNew)):
        return 503, str(exc)
    if isinstance(exc, Unavailable):
        return 503, str(exc)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return 403, describe(exc)
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return 503, "the database took too long to answer (statement timeout): narrow the filters"
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.UndefinedTable
                  | psycopg.errors.UndefinedFunction):
        return 503, describe(exc)
    if isinstance(exc, (errors.PgflowError, ValueError, TypeError)):
        return 409, describe(exc)
    logger.exception("pgflow dashboard: unexpected error")
    return 500, f"unexpected error: {describe(exc)}"


class Site:
    def __init__(self, db: Database, *, read_only: bool, secret: bytes) -> None:
        self.db = db
        self.read_only = read_only
        self.secret = secret
        self.env = render.environment()
        self.metrics_registry: Any = None  # /metrics' (pgflow/web/prometheus.py), made on use

    # -- cookies -------------------------------------------------------------------
    @staticmethod
    def cookie_path(request: Request) -> str:
        return request.scope.get("root_path") or "/"

    def _cookie(self, response: Response, request: Request, name: str, value: str,
                max_age: int | None = None) -> None:
        response.set_cookie(name, value, max_age=max_age, path=self.cookie_path(request),
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    # -- pages ---------------------------------------------------------------------
    def url(self, request: Request, name: str, query: dict[str, Any] | None = None,
            **path: Any) -> str:
        """The path of route ``name`` (mount prefix included), with a query string."""
        target = request.url_for(name, **{k: str(v) for k, v in path.items()}).path
        if query:
            pairs = {k: v for k, v in query.items() if v not in (None, "")}
            if pairs:
                target += "?" + urlencode(pairs)
        return target

    def page(self, request: Request, template: str, status: int = 200,
             **context: Any) -> HTMLResponse:
        token = request.cookies.get(security.CSRF_COOKIE)
        fresh = not token or len(token) > 100
        if fresh:
            token = security.new_csrf_token()
        flash = security.decode_flash(self.secret, request.cookies.get(security.FLASH_COOKIE))
        html = self.env.get_template(template).render(
            request=request, read_only=self.read_only, flash=flash,
            csrf=security.csrf_field(self.secret, token or ""),
            url=functools.partial(self.url, request), **context)
        response = HTMLResponse(html, status_code=status)
        response.headers["cache-control"] = "no-store"
        if fresh:
            self._cookie(response, request, security.CSRF_COOKIE, token or "")
        if security.FLASH_COOKIE in request.cookies:
            response.delete_cookie(security.FLASH_COOKIE, path=self.cookie_path(request))
        return response

    def error_page(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.page(request, "error.html", status=status, message=message,
                         title={400: "Bad request", 403: "Refused", 404: "Not found",
                                409: "Not possible", 503: "Database unavailable"}.get(
                                    status, "Error"))

    def redirect(self, request: Request, target: str, level: str | None = None,
                 message: str | None = None) -> RedirectResponse:
        """303 to ``target``, carrying a one-line message for the page it lands on."""
        response = RedirectResponse(target, status_code=303)
        if level and message:
            self._cookie(response, request, security.FLASH_COOKIE,
                         security.encode_flash(self.secret, level, message), FLASH_MAX_AGE)
        return response


def page_errors(handler: Handler) -> Handler:
    """Render any failure of an HTML handler as one message on an error page."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            status, message = classify(exc)
            return site_of(request).error_page(request, status, message)

    return wrapper


def json_errors(handler: Handler) -> Handler:
    """Answer any failure of a JSON handler with ``{"error": message}`` and its status."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            status, message = classify(exc)
            return JSONResponse({"error": message}, status_code=status)

    return wrapper
