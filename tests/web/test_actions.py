"""Actions: each does what the CLI does, asks first, refuses without a valid token or in read-only mode."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

import pgflow
from tests.support import sqlkit
from tests.web.conftest import csrf_token, flash, post


def status(dsn: str, run_id) -> str:
    with psycopg.connect(dsn) as c:
        return c.execute("select status from pgflow.runs where id = %s", (run_id,)).fetchone()[0]


def snapshot(dsn: str) -> list[tuple]:
    """Everything an action could change."""
    with psycopg.connect(dsn) as c:
        return [
            *c.execute("select id, status, cancel_requested, error from pgflow.runs order by id"),
            *c.execute("select run_id, name, payload from pgflow.signals order by id"),
            *c.execute("select id, paused from pgflow.schedules order by id"),
            *c.execute("select name, paused from pgflow.queue_settings order by name"),
        ]


def test_cancel_a_waiting_run(client, dsn, history):
    response = post(client, f"/runs/{history.sleeping}/cancel")
    assert flash(client, response) == (f"ok: cancellation of run {history.sleeping} requested "
                                       "(it stops at its next durable point)")
    with psycopg.connect(dsn) as c:
        assert c.execute("select cancel_requested from pgflow.runs where id = %s",
                         (history.sleeping,)).fetchone()[0]


def test_cancel_a_finished_run_is_one_clear_message(client, dsn, history):
    before = snapshot(dsn)
    response = post(client, f"/runs/{history.completed}/cancel")
    assert flash(client, response) == (f"error: run {history.completed} had already finished: "
                                       "nothing to cancel")
    assert snapshot(dsn) == before


def test_retry_a_failed_run(client, dsn, history):
    response = post(client, f"/runs/{history.failed}/retry")
    assert flash(client, response) == f"ok: run {history.failed} will resume from its last checkpoint"
    assert status(dsn, history.failed) == "pending"


def test_retry_a_run_that_did_not_fail_is_refused(client, dsn, history):
    before = snapshot(dsn)
    message = flash(client, post(client, f"/runs/{history.completed}/retry"))
    assert message.startswith("error: ") and "failed" in message
    assert "Traceback" not in message
    assert snapshot(dsn) == before


def test_signal_a_waiting_run(client, dsn, history):
    response = post(client, f"/runs/{history.waiting}/signal",
                    {"name": "approve", "payload": '{"by": "ana", "ok": true}'})
    assert flash(client, response) == f"ok: signal &#39;approve&#39; sent to run {history.waiting}"
    with psycopg.connect(dsn) as c:
        assert c.execute("select name, payload from pgflow.signals where run_id = %s"
                         " order by id desc limit 1", (history.waiting,)).fetchone() == (
            "approve", {"by": "ana", "ok": True})
        assert c.execute("select status from pgflow.runs where id = %s",
                         (history.waiting,)).fetchone()[0] == "pending"  # woken


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "approve", "payload": "{by: ana}"},
     "the payload is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ({"name": "approve", "payload": "[1, 2"}, "the payload is not valid JSON"),
    ({"name": "", "payload": "1"}, "signal name must be a non-empty string"),
    ({"name": "x" * 201, "payload": "1"}, "signal name must be at most 200 characters"),
])
def test_a_bad_signal_is_one_message_and_sends_nothing(client, dsn, history, fields, message):
    before = snapshot(dsn)
    text = flash(client, post(client, f"/runs/{history.waiting}/signal", fields))
    assert text.startswith(f"error: {message}") and text.endswith("nothing was sent")
    assert snapshot(dsn) == before


def test_signal_a_finished_run_is_refused(client, dsn, history):
    before = snapshot(dsn)
    text = flash(client, post(client, f"/runs/{history.completed}/signal",
                              {"name": "approve", "payload": "1"}))
    assert text.startswith("error: ") and "signals" in text
    assert snapshot(dsn) == before


def test_unknown_runs_are_refused(client, dsn):
    missing = "0190aaaa-0000-7000-8000-000000000000"
    text = flash(client, post(client, f"/runs/{missing}/cancel"))
    assert text == f"error: unknown run {missing}"


def test_an_unconfirmed_action_asks_first_and_changes_nothing(client, dsn, history):
    before = snapshot(dsn)
    page = post(client, f"/runs/{history.sleeping}/cancel", confirmed=False)
    assert page.status_code == 200
    assert f"Cancel run {history.sleeping} and its children?" in page.text
    assert 'name="confirmed" value="yes"' in page.text
    assert snapshot(dsn) == before
    # the confirmation page's own form does it
    token = csrf_token(client)
    done = client.post(f"/runs/{history.sleeping}/cancel", data={"csrf": token, "confirmed": "yes"})
    assert flash(client, done).startswith("ok: cancellation")


def test_signal_confirmation_keeps_the_payload(client, dsn, history):
    page = post(client, f"/runs/{history.waiting}/signal",
                {"name": "approve", "payload": '{"x": "<b>"}'}, confirmed=False)
    assert 'name="payload" value="{&#34;x&#34;: &#34;&lt;b&gt;&#34;}"' in page.text


@pytest.mark.parametrize("token", [None, "", "forged", "abc.def"])
def test_a_post_without_a_valid_csrf_token_is_403_and_changes_nothing(client, dsn, history, token):
    csrf_token(client)  # the browser has its cookie
    before = snapshot(dsn)
    fields = {"confirmed": "yes"} if token is None else {"csrf": token, "confirmed": "yes"}
    for path, data in ((f"/runs/{history.sleeping}/cancel", {}),
                       (f"/runs/{history.failed}/retry", {}),
                       (f"/runs/{history.waiting}/signal", {"name": "approve", "payload": "1"}),
                       ("/queues/pause", {"name": "default"}),
                       ("/schedules/pause", {"id": "nightly"})):
        response = client.post(path, data={**fields, **data})
        assert response.status_code == 403, path
        assert "security token is missing or does not match" in response.text
    assert snapshot(dsn) == before


def test_a_token_from_another_browser_is_refused(web, dsn, history):
    ours, theirs = web(), web()
    stolen = csrf_token(theirs)
    csrf_token(ours)
    before = snapshot(dsn)
    response = ours.post(f"/runs/{history.sleeping}/cancel", data={"csrf": stolen, "confirmed": "yes"})
    assert response.status_code == 403
    assert snapshot(dsn) == before


def test_a_token_signed_by_another_dashboard_is_refused(web, dsn, history):
    a = web(secret="one")
    b = web(secret="two")
    token_a = csrf_token(a)
    b.cookies.set("pgflow_csrf", a.cookies.get("pgflow_csrf"))
    before = snapshot(dsn)
    assert b.post(f"/runs/{history.sleeping}/cancel",
                  data={"csrf": token_a, "confirmed": "yes"}).status_code == 403
    assert snapshot(dsn) == before


def test_read_only_offers_no_action_and_refuses_every_post(web, dsn, history):
    ro = web(read_only=True)
    page = ro.get(f"/runs/{history.waiting}").text
    assert "Send signal" not in page and "Cancel run" not in page and "read-only" in page
    assert "Pause" not in ro.get("/queues").text
    before = snapshot(dsn)
    token = csrf_token(ro)
    for path, data in ((f"/runs/{history.sleeping}/cancel", {}),
                       (f"/runs/{history.failed}/retry", {}),
                       (f"/runs/{history.waiting}/signal", {"name": "approve", "payload": "1"}),
                       ("/queues/resume", {"name": "payments"}),
                       ("/schedules/trigger", {"id": "nightly"})):
        response = ro.post(path, data={"csrf": token, "confirmed": "yes", **data})
        assert response.status_code == 403, path
        assert "this dashboard is read-only: actions are disabled, nothing was done" in response.text
    assert snapshot(dsn) == before


def test_schedule_actions(client, dsn, history):
    with psycopg.connect(dsn, autocommit=True) as c:
        pgflow.create_schedule(c, "nightly", "wf", cron="0 3 * * *")
    assert flash(client, post(client, "/schedules/pause", {"id": "nightly"})) == \
        "ok: schedule &#39;nightly&#39; paused"
    with psycopg.connect(dsn) as c:
        assert c.execute("select paused from pgflow.schedules where id = 'nightly'").fetchone()[0]
    assert flash(client, post(client, "/schedules/resume", {"id": "nightly"})) == \
        "ok: schedule &#39;nightly&#39; resumed"
    text = flash(client, post(client, "/schedules/trigger", {"id": "nightly"}))
    assert text.startswith("ok: schedule &#39;nightly&#39; triggered: run ")
    with psycopg.connect(dsn) as c:
        assert c.execute("select paused from pgflow.schedules where id = 'nightly'").fetchone()[0] is False
        assert c.execute("select count(*) from pgflow.runs where schedule_id = 'nightly'").fetchone()[0] == 1
    assert flash(client, post(client, "/schedules/pause", {"id": "nope"})) == \
        "error: unknown schedule &#39;nope&#39;"
    assert client.post("/schedules/delete", data={"id": "nightly"}).status_code == 404


def test_queue_actions(client, dsn, history):
    assert flash(client, post(client, "/queues/pause", {"name": "default"})).startswith(
        "ok: queue &#39;default&#39; paused")
    with psycopg.connect(dsn) as c:
        assert c.execute("select paused from pgflow.queues where name = 'default'").fetchone()[0]
    assert flash(client, post(client, "/queues/resume", {"name": "default"})) == \
        "ok: queue &#39;default&#39; resumed"
    with psycopg.connect(dsn) as c:
        assert not c.execute("select paused from pgflow.queues where name = 'default'").fetchone()[0]
    assert flash(client, post(client, "/queues/pause", {"name": ""})).startswith(
        "error: queue must be a non-empty string")


def test_get_on_an_action_is_not_allowed(client, history):
    assert client.get(f"/runs/{history.sleeping}/cancel").status_code == 405


def test_the_message_is_shown_once(client, history):
    response = post(client, f"/runs/{history.sleeping}/cancel")
    assert "cancellation" in flash(client, response)
    assert 'class="flash' not in client.get(f"/runs/{history.sleeping}").text


def test_a_signal_wakes_a_run_that_waits_for_it(client, dsn):
    with sqlkit.worker_factory(dsn) as make, psycopg.connect(dsn, autocommit=True) as c:
        w = make()
        rid = sqlkit.start(c, "wf", [])
        claim = w.claim_one()
        c.execute("select pgflow.wait_signal(%s, %s, 0, 'go', %s)",
                  (rid, claim.token, timedelta(hours=1)))
        assert flash(client, post(client, f"/runs/{rid}/signal", {"name": "go"})).startswith("ok:")
        assert status(dsn, rid) == "pending"
        with psycopg.connect(dsn) as check:
            assert check.execute("select payload from pgflow.signals where run_id = %s",
                                 (rid,)).fetchone()[0] is None
