"""The web dashboard: ``pgflow ui``, or :func:`create_app` mounted in your own ASGI application.

Needs the ``ui`` extra (``pip install 'pgflow-engine[ui]'``): Starlette,
Jinja2, python-multipart and, for the command, uvicorn.
"""

from pgflow.web.app import create_app
from pgflow.web.security import basic_auth

__all__ = ["basic_auth", "create_app"]
