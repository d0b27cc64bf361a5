"""Who may use the dashboard, and what a page may do: auth, CSRF, signed cookies, headers.

* ``auth``: a callable taking the request, sync or async, truthy to allow.
  :func:`basic_auth` makes one for HTTP Basic (``pgflow ui --auth user:pass``);
  it compares in constant time and asks the browser for credentials (401)
  when they are missing or wrong. Any other callable that says no gets 403.
* CSRF: every browser gets a random token in a cookie (``SameSite=Strict``,
  ``HttpOnly``); every form carries that token with an HMAC of it under the
  application's secret. A POST is accepted only if the form's token equals
  the cookie's and its HMAC is right (signed double submit): a page on
  another site can neither read the cookie nor forge the signature.
* Flash messages travel in a short-lived cookie signed the same way.
* Every response says: no inline script, no framing, no sniffing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import json
import secrets
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AuthMiddleware", "HeadersMiddleware", "basic_auth", "csrf_field", "csrf_valid",
           "sign", "unsign"]

CSRF_COOKIE = "pgflow_csrf"
CSRF_FIELD = "csrf"
FLASH_COOKIE = "pgflow_flash"

AuthCallable = Callable[[Request], Any]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


def basic_auth(user: str, password: str, realm: str = "pgflow") -> AuthCallable:
    """An ``auth=`` callable that accepts HTTP Basic credentials ``user:password``."""
    if not user or ":" in user:
        raise ValueError("the user name must be non-empty and contain no ':'")
    if not password:
        raise ValueError("the password must not be empty")
    expected = f"{user}:{password}".encode()

    def check(request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, expected)

    check.challenge = f'Basic realm="{realm}", charset="UTF-8"'  # type: ignore[attr-defined]
    return check


class AuthMiddleware:
    """Ask ``auth`` about every request (static files too) before the dashboard sees it."""

    def __init__(self, app: ASGIApp, auth: AuthCallable) -> None:
        self.app = app
        self.auth = auth
        self.challenge: str | None = getattr(auth, "challenge", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = self.auth(Request(scope, receive))
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if verdict:
            await self.app(scope, receive, send)
            return
        response: Response
        if self.challenge:
            response = PlainTextResponse("authentication required", status_code=401,
                                         headers={"www-authenticate": self.challenge})
        else:
            response = PlainTextResponse("not allowed", status_code=403)
        await response(scope, receive, send)


class HeadersMiddleware:
    """Add :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in SECURITY_HEADERS if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- signatures -----------------------------------------------------------------

def _mac(secret: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign(secret: bytes, purpose: str, value: str) -> str:
    """``value`` with its HMAC for ``purpose``; :func:`unsign` gives it back."""
    return f"{value}.{_mac(secret, purpose, value)}"


def unsign(secret: bytes, purpose: str, signed: str) -> str | None:
    value, sep, mac = signed.rpartition(".")
    if not sep or not hmac.compare_digest(mac, _mac(secret, purpose, value)):
        return None
    return value


# -- CSRF -------------------------------------------------------------------------

def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_field(secret: bytes, cookie_token: str) -> str:
    """What the forms of a page carry for a browser whose cookie holds ``cookie_token``."""
    return sign(secret, "csrf", cookie_token)


def csrf_valid(secret: bytes, cookie_token: str | None, submitted: object) -> bool:
    if not cookie_token or not isinstance(submitted, str):
        return False
    token = unsign(secret, "csrf", submitted)
    return token is not None and hmac.compare_digest(token.encode(), cookie_token.encode())


# -- flash messages --------------------------------------------------------------

def encode_flash(secret: bytes, level: str, text: str) -> str:
    payload = base64.urlsafe_b64encode(json.dumps([level, text[:2000]]).encode()).decode()
    return sign(secret, "flash", payload)


def decode_flash(secret: bytes, cookie: str | None) -> tuple[str, str] | None:
    if not cookie:
        return None
    payload = unsign(secret, "flash", cookie)
    if payload is None:
        return None
    try:
        level, text = json.loads(base64.urlsafe_b64decode(payload.encode()))
    except (ValueError, TypeError, binascii.Error):
        return None
    if level not in ("ok", "error") or not isinstance(text, str):
        return None
    return level, text

