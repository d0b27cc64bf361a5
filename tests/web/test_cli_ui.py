"""``pgflow ui``: loopback by default, no other address without authentication, one-line errors."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from pgflow.cli_ui import is_loopback, parse_credentials
from tests.support.cli import assert_one_line_error, cli_env, pgflow_cli
from tests.support.helpers import REPO
from tests.web.browser import free_port


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("192.168.1.2", False),
    ("no-such-host.invalid", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_credentials_are_user_colon_password():
    assert parse_credentials("ana:s3:cret") == ("ana", "s3:cret")
    for bad in ("ana", ":x", "ana:", ""):
        with pytest.raises(ValueError, match="must be USER:PASSWORD"):
            parse_credentials(bad)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_public_address_without_auth_is_refused(dsn, host):
    assert_one_line_error(pgflow_cli("ui", "--host", host, "--dsn", dsn),
                          f"refusing to listen on {host}, which is not a loopback address",
                          "--auth USER:PASSWORD", "PGFLOW_UI_AUTH")


def test_bad_auth_and_bad_databases_are_one_line(empty_dsn):
    assert_one_line_error(pgflow_cli("ui", "--auth", "nopassword"), "must be USER:PASSWORD")
    assert_one_line_error(pgflow_cli("ui", "--host", "0.0.0.0", env=cli_env(PGFLOW_UI_AUTH=":")),
                          "must be USER:PASSWORD")
    assert_one_line_error(pgflow_cli("ui", "--dsn", empty_dsn), "pgflow migrate")
    assert_one_line_error(pgflow_cli("ui", "--dsn", "postgresql://postgres@127.0.0.1:1/x"),
                          "cannot connect to the database")
    assert_one_line_error(pgflow_cli("ui", "--port", "70000"), "--port", exit_code=2)


def test_a_port_in_use_is_one_line(dsn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(pgflow_cli("ui", "--dsn", dsn, "--port", str(port)),
                              f"cannot listen on 127.0.0.1:{port}")
    assert_one_line_error(pgflow_cli("ui", "--dsn", dsn, "--host", "no-such-host.invalid",
                                     env=cli_env(PGFLOW_UI_AUTH="a:b")),
                          "cannot listen on no-such-host.invalid:8080")


def test_without_the_ui_extra_it_says_what_to_install(dsn):
    code = ("import sys; sys.modules['uvicorn'] = None; sys.argv = ['pgflow', 'ui', '--dsn', "
            f"{dsn!r}]; from pgflow.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert_one_line_error(result, "the web dashboard needs the 'ui' extra",
                          "pip install 'pgflow-engine[ui]'")


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _serve(dsn: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pgflow", "ui", "--dsn", dsn, "--port", str(port),
                             *args], cwd=REPO, env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(base + "/static/app.css")
            return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"pgflow ui did not start: {proc.communicate()}") from None
            time.sleep(0.1)


@pytest.mark.slow
def test_pgflow_ui_serves_the_dashboard(dsn):
    proc, base = _serve(dsn, "--read-only")
    try:
        status, body = _get(base + "/runs")
        assert status == 200 and "read-only" in body
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"pgflow dashboard on {base}/ (read-only)" in err


@pytest.mark.slow
def test_pgflow_ui_with_auth_asks_for_it(dsn):
    proc, base = _serve(dsn, env=cli_env(PGFLOW_UI_AUTH="ana:s3cret"))
    try:
        assert _get(base + "/runs")[0] == 401
        good = "Basic " + base64.b64encode(b"ana:s3cret").decode()
        assert _get(base + "/runs", {"Authorization": good})[0] == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
