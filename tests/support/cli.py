"""Running the ``pgflow`` command as a user does (``python -m pgflow`` in a subprocess).

Shared by every tier whose tests call the CLI: the environment without any DSN,
and the two outcomes the CLI promises (a clean success, or exactly one line on
stderr that starts with ``pgflow: error:``, never a traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg

from tests.support.helpers import REPO

DSN_ENV_VARS = ("PGFLOW_DSN", "DATABASE_URL", "PGFLOW_DEBUG")
REGISTER_TWO_STEPS = (
    "select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],"
    """ '[{"name":"two_steps","version":"1","queue":"default"}]')""")


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any DSN, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DSN_ENV_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def pgflow_cli(*args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgflow", *args], cwd=REPO,
                          env=env if env is not None else cli_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the command succeeded cleanly; return its stdout."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str,
                          exit_code: int = 1) -> str:
    """Assert the command failed the way the CLI promises; return the error line."""
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == exit_code, f"exit {result.returncode}\n{output}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr\n{output}"
    line = lines[0]
    assert line.startswith("pgflow: error: "), output
    assert line[len("pgflow: error: "):].strip(), output
    assert result.stdout == "", output
    for fragment in fragments:
        assert fragment in line, output
    return line


def register_two_steps(dsn: str) -> None:
    """Make ``two_steps`` known to the database, as a worker serving it would."""
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute(REGISTER_TWO_STEPS)


