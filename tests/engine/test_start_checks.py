"""A start whose input cannot bind to the workflow is refused at start, writing nothing.

Workers announce each workflow's parameters (``pgflow.workflows.params``);
``pgflow.start`` checks every input against them, from SQL, Python and the
CLI alike. Names beginning with ``pgflow.`` belong to internal workflows:
they are neither listed in ``pgflow.workflows`` nor startable from outside.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

import pgflow
from tests.support import sqlkit
from tests.support.cli import assert_one_line_error, cli_env, ok
from tests.support.helpers import REPO


@pgflow.step
def greet(email: str) -> str:
    return f"hello {email}"


@pgflow.workflow(name="checked_signup")
def checked_signup(ctx: pgflow.Context, email: str, plan: str = "free", *,
                   referrer: str | None = None) -> str:
    return greet(email) + f" on {plan}" + (f" via {referrer}" if referrer else "")


@pgflow.workflow(name="checked_tags")
def checked_tags(ctx: pgflow.Context, owner: str, /, *tags: str, **labels: str) -> int:
    return len(tags) + len(labels)


SIGNUP_PARAMS = [
    {"name": "email", "kind": "positional", "required": True},
    {"name": "plan", "kind": "positional", "required": False},
    {"name": "referrer", "kind": "keyword_only", "required": False},
]


def _runs(conn: psycopg.Connection[Any]) -> int:
    return sqlkit.count(conn, "runs")


@pytest.fixture
def served(conn: psycopg.Connection[Any], inprocess_worker: Any) -> Any:
    """A real worker serving both workflows (it announces their parameters)."""
    return inprocess_worker.start([checked_signup, checked_tags])


def test_a_worker_announces_each_workflows_parameters(conn, served):
    rows = dict(conn.execute("select name, params from pgflow.workflows").fetchall())
    assert rows["checked_signup"] == SIGNUP_PARAMS
    assert rows["checked_tags"] == [
        {"name": "owner", "kind": "positional_only", "required": True},
        {"name": "tags", "kind": "var_positional", "required": False},
        {"name": "labels", "kind": "var_keyword", "required": False},
    ]


def test_internal_workflows_are_not_listed(conn, served):
    # the worker serves the ctx.map items of every step it knows, but only the
    # application's own workflows are listed
    announced = conn.execute(
        "select count(*) from pgflow.workers w, jsonb_array_elements(w.workflows) d"
        " where d ->> 'name' like 'pgflow.map:%'").fetchone()[0]
    assert announced > 0
    names = {r[0] for r in conn.execute("select name from pgflow.workflows")}
    assert names == {"checked_signup", "checked_tags"}


BAD_INPUTS = [
    # (input, what the error names)
    (["a@x", "pro", "extra"], "takes 2 positional argument(s) (email, plan), got 3"),
    ([], "missing required argument(s) email"),
    ({"plan": "pro"}, "missing required argument(s) email"),
    ({"email": "a@x", "colour": "red"}, "has no parameter colour"),
]


@pytest.mark.parametrize(("data", "message"), BAD_INPUTS)
def test_sql_start_refuses_an_input_that_cannot_bind(conn, served, data, message):
    with sqlkit.raises_sqlstate("PF002") as refused:
        conn.execute("select pgflow.start('checked_signup', %s)", (Jsonb(data),))
    assert message in str(refused.value)
    assert "workflow 'checked_signup' (version '1')" in str(refused.value)
    assert _runs(conn) == 0


@pytest.mark.parametrize(("data", "message"), BAD_INPUTS)
def test_python_start_by_name_refuses_it_with_a_value_error(conn, served, data, message):
    args, kwargs = (data, {}) if isinstance(data, list) else ([], data)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pgflow.start(conn, "checked_signup", *args, **kwargs)
    assert _runs(conn) == 0


@pytest.mark.slow
def test_the_cli_refuses_it_in_one_line(dsn, conn, served):
    result = subprocess.run(
        [sys.executable, "-m", "pgflow", "start", "checked_signup", "--input", '["x", "y", "extra"]',
         "--dsn", dsn], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "takes 2 positional argument(s)", "got 3")
    assert _runs(conn) == 0


def test_inputs_that_bind_are_started_and_run(conn, served):
    runs = [
        pgflow.start(conn, "checked_signup", "a@x"),
        pgflow.start(conn, "checked_signup", "a@x", "pro"),
        pgflow.start(conn, "checked_signup", email="a@x", referrer="ana"),
        pgflow.start(conn, checked_signup, "a@x", referrer="ana"),
        pgflow.start(conn, "checked_tags", "me", "t1", "t2"),
        pgflow.start(conn, checked_tags, "me", "t1"),
    ]
    results = [pgflow.result(conn, run_id, timeout=30) for run_id in runs]
    assert results == ["hello a@x on free", "hello a@x on pro", "hello a@x on free via ana",
                       "hello a@x on free via ana", 2, 1]


def test_positional_only_and_star_args_follow_python_binding(conn, served):
    with sqlkit.raises_sqlstate("PF002") as refused:  # positional-only: not by name
        conn.execute("""select pgflow.start('checked_tags', '{"owner": "me"}')""")
    assert "missing required argument(s) owner" in str(refused.value)
    # *tags takes any number of positional arguments, **labels any name
    conn.execute("""select pgflow.start('checked_tags', '["me", "a", "b", "c", "d"]')""")
    assert _runs(conn) == 1


def test_a_workflow_announced_without_parameters_is_started_unchecked(conn):
    # a worker of an older pgflow announces no params: starts go through as before
    conn.execute("select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],"
                 """ '[{"name": "legacy", "version": "1", "queue": "default"}]')""")
    conn.execute("""select pgflow.start('legacy', '["any", "number", "of", "args"]')""")
    assert _runs(conn) == 1
    # and an older worker registering later keeps what a newer one announced
    conn.execute("select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],"
                 " %s)", (Jsonb([{"name": "legacy", "version": "1", "queue": "default",
                                  "params": SIGNUP_PARAMS}]),))
    conn.execute("select pgflow.register_worker(gen_random_uuid(), 'h', 1, array['default'],"
                 """ '[{"name": "legacy", "version": "1", "queue": "default"}]')""")
    with sqlkit.raises_sqlstate("PF002"):
        conn.execute("""select pgflow.start('legacy', '[]')""")


@pytest.mark.slow
def test_the_unknown_workflow_hint_names_options_that_exist(dsn, conn):
    with pytest.raises(pgflow.WorkflowNotFound) as unknown:
        pgflow.start(conn, "never_registered", 1)
    message = str(unknown.value)
    assert "no worker has registered it" in message
    assert "version =>" in message  # SQL's named argument: it exists
    assert "pass version to start it anyway" not in message
    # ... and the SQL named argument does start it
    conn.execute("select pgflow.start('never_registered', '[1]', version => '1')")
    result = subprocess.run([sys.executable, "-m", "pgflow", "start", "other_unknown", "--dsn", dsn],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "unknown workflow 'other_unknown'", "start a worker")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pgflow.map:greet", "pgflow.anything"])
def test_internal_workflow_names_cannot_be_started_from_outside(dsn, conn, served, name):
    with pytest.raises(ValueError, match="is reserved"):
        pgflow.start(conn, name, "x")
    with sqlkit.raises_sqlstate("PF002"):
        conn.execute("select pgflow.start(%s, '[\"x\"]', version => 'map')", (name,))
    result = subprocess.run([sys.executable, "-m", "pgflow", "start", name, "--input", '["x"]',
                             "--dsn", dsn], cwd=REPO, env=cli_env(), capture_output=True,
                            text=True, timeout=60)
    assert_one_line_error(result, "is reserved")
    assert _runs(conn) == 0


def test_a_workflow_cannot_take_a_reserved_name():
    with pytest.raises(ValueError, match="is reserved"):
        @pgflow.workflow(name="pgflow.mine")
        def mine(ctx: pgflow.Context) -> None: ...


@pytest.mark.slow
def test_start_checks_pass_with_the_cli(dsn, conn, served):
    run_id = ok(subprocess.run(
        [sys.executable, "-m", "pgflow", "start", "checked_signup", "--input",
         '{"email": "b@x", "referrer": "cli"}', "--dsn", dsn], cwd=REPO, env=cli_env(),
        capture_output=True, text=True, timeout=60)).strip()
    assert pgflow.result(conn, run_id, timeout=30) == "hello b@x on free via cli"
