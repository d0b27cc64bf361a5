"""``pgflow ui``: serve the web dashboard (``pgflow.web``) with uvicorn.

Registered on the main app by :mod:`pgflow.cli`. Starlette, Jinja2 and uvicorn
come with the ``ui`` extra and are imported only here, when the command runs,
so the rest of the CLI works without them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Annotated, Any

import typer

from pgflow import dsn as dsn_resolution
from pgflow.cli_support import DsnOption, connect, user_errors

__all__ = ["AUTH_ENV", "check_bindable", "is_loopback", "parse_credentials", "ui"]

AUTH_ENV = "PGFLOW_UI_AUTH"
MISSING_EXTRA = ("the web dashboard needs the 'ui' extra: pip install 'pgflow-engine[ui]' "
                 "(missing: {name})")


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in found}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addresses)


def parse_credentials(text: str) -> tuple[str, str]:
    """``USER:PASSWORD`` (``--auth`` and ``$PGFLOW_UI_AUTH``); the password may hold ':'."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth (or {AUTH_ENV}) must be USER:PASSWORD, both non-empty")
    return user, password


def check_bindable(host: str, port: int) -> None:
    """Fail now, in one line, if ``host:port`` cannot be listened on (in use, no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _load() -> tuple[Any, Any]:
    try:
        import uvicorn

        from pgflow import web
    except ImportError as exc:
        raise ValueError(MISSING_EXTRA.format(name=exc.name or exc)) from None
    return uvicorn, web


def ui(
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. Anything but loopback needs --auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8080,
    read_only: Annotated[bool, typer.Option(
        "--read-only", help="No actions: every POST is refused and every transaction is "
                            "read-only (the pgflow_reader role is enough).")] = False,
    auth: Annotated[str | None, typer.Option(
        "--auth", metavar="USER:PASSWORD",
        help=f"Require HTTP Basic authentication [default: ${AUTH_ENV}]. Prefer the "
             "environment variable: a command line is visible to other users.")] = None,
    dsn: DsnOption = None,
) -> None:
    """Serve the web dashboard: runs, a run's timeline, schedules, queues, workers."""
    with user_errors():
        credentials = auth or os.environ.get(AUTH_ENV) or None
        if credentials is None and not is_loopback(host):
            raise ValueError(f"refusing to listen on {host}, which is not a loopback address, "
                             f"without authentication: give --auth USER:PASSWORD (or set "
                             f"{AUTH_ENV}), or keep the default --host 127.0.0.1")
        user_password = parse_credentials(credentials) if credentials else None
        uvicorn, web = _load()
        check_bindable(host, port)
        check = web.basic_auth(*user_password) if user_password else None
        target = dsn_resolution.resolve(dsn)
        connect(target).close()  # unreachable or not migrated: one line now, not on each page
        app = web.create_app(target, read_only=read_only, auth=check)
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"pgflow dashboard on http://{shown}:{port}/"
                   + (" (read-only)" if read_only else "")
                   + (" (HTTP Basic authentication)" if check else "")
                   + "; Ctrl-C stops it", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
