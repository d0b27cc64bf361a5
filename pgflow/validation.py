"""Argument checks: names, text, keys, patch ids, timeouts and retry policies.

Each check raises ``TypeError`` or ``ValueError`` naming the argument, before
anything reaches the database; the SQL procedures enforce the same bounds
again (``pgflow._check_name``, ``pgflow._check_key``, see ``sql/README.md``).
Elsewhere: durations are checked by :func:`pgflow.durations.as_timedelta`,
JSON payloads (encoding and size) by :mod:`pgflow.codec`, and whole start
requests are assembled by :func:`pgflow.queries.start_params`.
"""

from __future__ import annotations

from datetime import timedelta

from pgflow.durations import as_timedelta
from pgflow.retry import Retry

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_NAME_LENGTH",
    "check_key",
    "check_name",
    "check_patch_id",
    "check_retry",
    "check_text",
    "check_timeout",
]

MAX_NAME_LENGTH = 200  # characters; the schema enforces the same bound
MAX_KEY_BYTES = 1024  # idempotency and state keys; the schema enforces the same bound


def check_text(value: str, what: str) -> str:
    """Refuse what PostgreSQL text cannot hold (a NUL, a lone surrogate), naming ``what``.

    Without this the driver would fail later with an error that names neither.
    """
    if "\x00" in value:
        raise ValueError(f"{what} must not contain a NUL character, got {value[:80]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (it holds a lone surrogate), "
                         f"got {value[:80]!r}") from None
    return value


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {repr(value)[:80]}")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    return check_text(value, what)


def check_key(key: object, what: str) -> str:
    """An idempotency or state key: a non-empty string of at most :data:`MAX_KEY_BYTES`."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty string, got {repr(key)[:80]}")
    check_text(key, what)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"{what} must be at most {MAX_KEY_BYTES} bytes in UTF-8, "
                         f"got {len(key.encode())}")
    return key


def check_patch_id(patch_id: object) -> None:
    if not isinstance(patch_id, str) or not patch_id.strip() or len(patch_id) > 200:
        raise ValueError(f"a patch id must be a non-empty string of at most 200 characters, "
                         f"got {patch_id!r}")


def check_timeout(value: timedelta | float | None) -> timedelta | None:
    """A workflow's or step's ``timeout=``: None, or a positive duration."""
    return None if value is None else as_timedelta(value, "timeout", positive=True)


def check_retry(value: object) -> Retry | None:
    """A ``retry=`` argument: None or a :class:`~pgflow.retry.Retry`."""
    if value is not None and not isinstance(value, Retry):
        raise TypeError(f"retry must be a pgflow.Retry, not {value!r}")
    return value
