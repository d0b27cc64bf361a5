"""The JSON API: /api/runs and /api/runs/{id}."""

from __future__ import annotations

import uuid

import psycopg
import pytest


def test_api_runs_lists_newest_first_with_filters(client, dsn, history):
    data = client.get("/api/runs").json()
    with psycopg.connect(dsn) as c:
        expected = [str(r[0]) for r in c.execute(
            "select id from pgflow.runs order by created_at desc, id desc")]
    assert [r["id"] for r in data["runs"]] == expected
    assert data["older"] is None and data["newer"] is None
    failed = client.get("/api/runs?status=failed").json()["runs"]
    assert [r["id"] for r in failed] == [str(history.failed)]
    assert failed[0]["error_type"] == "ValueError" and failed[0]["queue"] == "payments"
    assert failed[0]["concurrency_key"] == "c-1"
    assert [r["id"] for r in client.get("/api/runs?workflow=billing&status=pending").json()["runs"]] \
        == [str(history.held)]
    assert [r["id"] for r in client.get("/api/runs?key=order-2").json()["runs"]] == [str(history.retried)]
    assert client.get("/api/runs?workflow=nope").json() == {"runs": [], "older": None, "newer": None}


def test_api_runs_pages_with_limit_and_cursor(client, history):
    first = client.get("/api/runs?limit=4").json()
    assert len(first["runs"]) == 4 and first["older"]
    second = client.get("/api/runs", params={"limit": 4, "before": first["older"]}).json()
    everything = client.get("/api/runs").json()["runs"]
    assert [r["id"] for r in first["runs"] + second["runs"]] == [r["id"] for r in everything[:8]]
    assert second["newer"]


@pytest.mark.parametrize(("query", "message"), [
    ("status=nope", "unknown status 'nope'"),
    ("limit=501", "limit must be a whole number from 1 to 500, got '501'"),
    ("limit=-1", "limit must be a whole number"),
    ("since=tomorrow", "since 'tomorrow' is not a date/time"),
    ("before=x", "before 'x' is not a position in the list"),
    ("name=wf", "unknown parameter 'name'"),
])
def test_api_runs_bad_parameters_are_400_json(client, query, message):
    response = client.get(f"/api/runs?{query}")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"].startswith(message)


def test_api_run_returns_the_run_and_its_steps(client, history):
    data = client.get(f"/api/runs/{history.retried}").json()
    run = data["run"]
    assert run["id"] == str(history.retried) and run["status"] == "completed"
    assert run["input"] == ["bob"] and run["output"] == "done" and run["key"] == "order-2"
    assert [(s["seq"], s["name"], s["status"], s["attempts"]) for s in run["steps"]] == [
        (0, "charge", "completed", 3)]
    assert [a["attempt"] for a in run["steps"][0]["attempts_failed"]] == [1, 2]
    assert data["finished"] is True and data["version"]
    waiting = client.get(f"/api/runs/{history.waiting}").json()
    assert waiting["finished"] is False and waiting["wait"] == "waiting for signal 'approve'"
    assert waiting["state"][0]["value"] == "awaiting <review>"
    assert waiting["signals"][0]["payload"] == {"by": "<img src=x onerror=alert(1)>"}
    held = client.get(f"/api/runs/{history.held}").json()
    assert held["held"] == "queue payments is paused"


def test_api_run_version_changes_when_the_run_moves(client, dsn, history):
    before = client.get(f"/api/runs/{history.waiting}").json()["version"]
    assert client.get(f"/api/runs/{history.waiting}").json()["version"] == before
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("select pgflow.signal(%s, 'approve', 'true')", (history.waiting,))
    assert client.get(f"/api/runs/{history.waiting}").json()["version"] != before


def test_api_run_unknown_is_404_and_malformed_is_400(client):
    missing = client.get(f"/api/runs/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["error"].startswith("unknown run")
    bad = client.get("/api/runs/123")
    assert bad.status_code == 400 and bad.json() == {"error": "'123' is not a run id (a UUID)"}
