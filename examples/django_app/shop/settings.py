"""Settings of the shop example: one PostgreSQL database, shared with pgflow.

The database comes from ``DATABASE_URL`` or ``PGFLOW_DSN`` (the variable the
``pgflow`` command reads), as a libpq URL (``postgresql://user@host/db``) or
``key=value`` string; a SQLAlchemy-style ``postgresql+psycopg://`` is accepted.
"""

from __future__ import annotations

import os
import re
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from psycopg.conninfo import conninfo_to_dict

# libpq keyword -> Django DATABASES key; any other keyword goes to OPTIONS (sslmode, ...).
_DJANGO_KEYS = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST",
                "port": "PORT"}


def database_settings(dsn: str) -> dict[str, Any]:
    """A ``DATABASES`` entry for the PostgreSQL database that ``dsn`` names."""
    dsn = re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", dsn.strip())
    try:
        params = conninfo_to_dict(dsn)
    except Exception as exc:
        raise ImproperlyConfigured(f"cannot read the database address {dsn!r}: {exc}") from None
    entry: dict[str, Any] = {"ENGINE": "django.db.backends.postgresql", "OPTIONS": {}}
    for key, value in params.items():
        if key in _DJANGO_KEYS:
            entry[_DJANGO_KEYS[key]] = str(value)
        else:
            entry["OPTIONS"][key] = value
    entry.setdefault("NAME", entry.get("USER") or os.environ.get("USER", "postgres"))
    return entry


_DSN = os.environ.get("DATABASE_URL") or os.environ.get("PGFLOW_DSN")
if not _DSN:
    raise ImproperlyConfigured(
        "set DATABASE_URL (or PGFLOW_DSN) to the PostgreSQL database, "
        "e.g. postgresql://postgres@127.0.0.1:5432/shop")

DATABASES = {"default": database_settings(_DSN)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-key-for-the-example-only")
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")

INSTALLED_APPS = ["orders"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"

USE_TZ = True
TIME_ZONE = "UTC"
