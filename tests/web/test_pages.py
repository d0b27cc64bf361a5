"""Every page renders what the database holds, escaped, with the right status."""

from __future__ import annotations

import html
import re
import uuid
from datetime import timedelta

import psycopg
import pytest

import pgflow
from tests.support import sqlkit
from tests.web.scenarios import XSS


def test_every_page_answers_200_on_an_empty_database(client):
    for path in ("/", "/runs", "/schedules", "/queues", "/workers"):
        page = client.get(path)
        assert page.status_code == 200, (path, page.text)
        assert page.headers["content-type"].startswith("text/html")
        assert "<nav>" in page.text
    assert "No run matches." in client.get("/runs").text
    assert "No schedule." in client.get("/schedules").text
    assert "No worker registered." in client.get("/workers").text


def test_every_page_and_every_run_page_answers_200(client, history):
    for path in ("/", "/runs", "/schedules", "/queues", "/workers"):
        assert client.get(path).status_code == 200, path
    for run_id in history.all():
        page = client.get(f"/runs/{run_id}")
        assert page.status_code == 200, (run_id, page.text)
        assert str(run_id) in page.text


def test_the_overview_counts_runs_by_status_and_charts_failures(client, history):
    """Unfinished runs all, finished ones of the last 24 hours (here: all of them)."""
    page = client.get("/").text
    counts = dict(re.findall(r'id="count-(\w+)">\s*<span class="n">(\d+)</span>', page))
    assert counts == {"pending": "3", "running": "0", "sleeping": "1", "waiting": "1",
                      "completed": "3", "failed": "1", "cancelled": "1"}
    assert "1 failed in these 24 hours" in page
    bars = re.findall(r"<title>([^<]*failed run\(s\))</title>", page)
    assert len(bars) == 24
    assert sum(int(re.search(r": (\d+) failed", b).group(1)) for b in bars) == 1
    assert str(history.failed) in page  # latest failures


def test_the_chart_counts_failures_in_their_hour(client, dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""insert into pgflow.runs (name, version, queue, status, input, error,
                         created_at, available_at, finished_at)
                     select 'wf', '1', 'default', 'failed', '[]', '{"type": "E"}',
                            pgflow.now() - h * interval '1 hour', pgflow.now(),
                            pgflow.now() - h * interval '1 hour'
                     from generate_series(0, 2) h, generate_series(1, 2) n""")
        c.execute("""insert into pgflow.runs (name, version, queue, status, input, error,
                         created_at, available_at, finished_at)
                     select 'wf', '1', 'default', 'failed', '[]', '{"type": "E"}',
                            pgflow.now() - interval '3 days', pgflow.now(),
                            pgflow.now() - interval '3 days'""")
    page = client.get("/").text
    assert "6 failed in these 24 hours; at most 2 in one hour" in page
    assert re.search(r'id="count-failed">\s*<span class="n">6</span>', page)  # not the old one
    counts = [int(n) for n in re.findall(r": (\d+) failed run\(s\)</title>", page)]
    assert counts[-3:] == [2, 2, 2] and sum(counts) == 6


def test_a_run_page_shows_its_steps_attempts_and_back_offs_on_the_timeline(client, history):
    page = client.get(f"/runs/{history.retried}").text
    assert page.count('class="seg failed"') == 2
    assert page.count('class="seg backoff"') == 2
    assert 'class="seg ok"' in page
    assert page.count("attempt 1 failed after") == 1 and "attempt 2 failed after" in page
    assert "retry back-off" in page


def test_a_failed_run_shows_its_error_and_traceback_escaped(client, history):
    page = client.get(f"/runs/{history.failed}").text
    assert "ValueError: card &lt;declined&gt;" in page
    assert "ValueError: &lt;b&gt;boom&lt;/b&gt;" in page
    assert "<b>boom</b>" not in page
    assert "Retry run" in page and "Cancel run" not in page
    assert 'id="error"' in page
    assert "Concurrency key" in page and ">c-1<" in page


def test_a_waiting_run_shows_its_wait_signals_and_state(client, history):
    page = client.get(f"/runs/{history.waiting}").text
    assert "waiting for signal &#39;approve&#39;" in page
    assert 'class="seg wait"' in page
    assert "in the mailbox" in page and "note" in page
    assert html.escape(XSS) in page.replace("&#34;", '"') and XSS not in page
    assert "awaiting &lt;review&gt;" in page
    assert f'data-poll="/api/runs/{history.waiting}"' in page  # live while unfinished
    assert "Send signal" in page


def test_a_sleeping_run_shows_its_sleep(client, history):
    page = client.get(f"/runs/{history.sleeping}").text
    assert "sleeping (step nap) until" in page
    assert 'class="seg sleep"' in page


def test_parent_and_children_link_each_other(client, history):
    parent = client.get(f"/runs/{history.parent}").text
    assert f'href="/runs/{history.child}"' in parent
    child = client.get(f"/runs/{history.child}").text
    assert f'href="/runs/{history.parent}"' in child
    finished = client.get(f"/runs/{history.completed}").text
    assert "data-poll" not in finished  # nothing to follow


def test_a_held_run_says_why(client, history):
    page = client.get(f"/runs/{history.held}").text
    assert "queue payments is paused" in page
    listing = client.get("/runs?status=pending").text
    assert 'class="held" title="queue payments is paused"' in listing


def test_a_run_no_worker_can_serve_says_so(client, conn, history):
    ghost = sqlkit.start(conn, "ghost", [], version="7")
    page = client.get(f"/runs/{ghost}").text
    assert "No registered worker serves ghost v7 on queue default" in page
    assert "no worker for v7" in client.get("/runs").text
    assert client.get(f"/api/runs/{ghost}").json()["unserved"] is True
    for served in (history.waiting, history.completed):
        assert 'id="unserved"' not in client.get(f"/runs/{served}").text
    assert client.get("/runs").text.count("no worker for v") == 1


def test_the_xss_probe_is_shown_as_text_everywhere(client, history):
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    for path in ("/runs", f"/runs/{history.xss}", f"/runs/{history.waiting}"):
        page = client.get(path).text
        assert "<img" not in page, path
    assert escaped in client.get(f"/runs/{history.xss}").text
    assert escaped in client.get("/runs").text  # its key


def test_unknown_and_malformed_run_ids_are_404_with_one_message(client):
    missing = client.get(f"/runs/{uuid.uuid4()}")
    assert missing.status_code == 404 and "unknown run" in missing.text
    assert "Traceback" not in missing.text
    bad = client.get("/runs/not-a-uuid")
    assert bad.status_code == 404 and "is not a run id" in bad.text


def test_schedules_queues_and_workers_pages(client, dsn, history):
    with psycopg.connect(dsn, autocommit=True) as c:
        pgflow.create_schedule(c, "nightly <report>", "wf", cron="0 3 * * *", timezone="Europe/Paris")
        pgflow.create_schedule(c, "sync", "wf", every=timedelta(minutes=15), paused=True)
        pgflow.set_queue(c, "emails", concurrency=5, rate_limit=pgflow.RateLimit(100, per=60))
    schedules = client.get("/schedules").text
    assert "nightly &lt;report&gt;" in schedules and "0 3 * * *" in schedules
    assert "Europe/Paris" in schedules and "every 15 min 0 s" in schedules
    assert schedules.count("s-paused") == 1
    queues = client.get("/queues").text
    rows = dict(re.findall(r'<td><a href="/runs\?queue=(\w+)">\w+</a></td>\s*<td>([^<]*)</td>', queues))
    assert rows == {"default": "no cap", "emails": "5", "payments": "no cap"}
    assert "100/1m" in queues
    assert re.search(r'status=pending">1</a>', queues)  # the held payments run
    assert "paused: none of its 1 pending run(s) is claimed" in queues


def test_workers_show_liveness(client, dsn):
    with sqlkit.worker_factory(dsn) as make:
        alive = make()
        gone = make()
        gone.lose_liveness_lock()
        page = client.get("/workers").text
        assert page.count(">alive<") == 1
        assert "gone: its connection is closed" in page
        assert alive.id and gone.id


@pytest.mark.parametrize("path", ["/static/app.css", "/static/app.js"])
def test_static_files_are_served(client, path):
    assert client.get(path).status_code == 200


def test_every_response_forbids_inline_script_and_framing(client):
    page = client.get("/runs")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text and " on" + "click=" not in page.text


def test_a_huge_payload_is_cut_on_the_page_and_whole_in_the_api(client, conn):
    big = "x" * 300_000
    run_id = sqlkit.start(conn, "wf", [big])
    page = client.get(f"/runs/{run_id}").text
    assert "more characters not shown" in page
    assert len(page) < 150_000
    assert client.get(f"/api/runs/{run_id}").json()["run"]["input"] == [big]
