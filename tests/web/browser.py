"""Serving the dashboard on a real port, and a headless Chromium to drive it.

The browser is the system's (``/usr/bin/chromium``, Debian's package): no
browser is downloaded. Without it the browser tests are skipped, with the
reason, on a developer's machine; under CI (``CI`` set) they fail instead,
since ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from pgflow.web import create_app

CHROMIUM = Path(os.environ.get("PGFLOW_TEST_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS_ENV = "PGFLOW_UI_SCREENSHOTS"  # a folder: the browser tests keep their screenshots there


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = (f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) "
               "to run the browser tests")
    if os.environ.get("CI"):
        pytest.fail(message + " (.ci/run installs it under CI)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(dsn: str, **options: Any) -> Iterator[str]:
    """The dashboard under uvicorn in a thread, on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(dsn, **options), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="pgflow-web-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the dashboard's server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def screenshot(page: Any, name: str) -> None:
    """Keep a screenshot of the page under $PGFLOW_UI_SCREENSHOTS (docs/images/), if set."""
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
