"""``/metrics``: the Prometheus series, the queue ones read through the dashboard's pool."""

from __future__ import annotations

import re


def queue_series(text: str) -> dict[tuple[str, str], float]:
    return {(q, s): float(v) for q, s, v in re.findall(
        r'^pgflow_queue_runs\{queue="([^"]+)",status="([^"]+)"\} (\S+)$', text, re.M)}


def test_metrics_show_the_queues_runs(client, history):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert queue_series(response.text) == {
        ("default", "pending"): 2.0, ("default", "sleeping"): 1.0, ("default", "waiting"): 1.0,
        ("payments", "pending"): 1.0}
    assert "# TYPE pgflow_queue_oldest_ready_seconds gauge" in response.text


def test_metrics_on_a_reader_login_in_read_only_mode(web, reader_dsn, history):
    response = web(reader_dsn, read_only=True).get("/metrics")
    assert response.status_code == 200
    assert queue_series(response.text)[("payments", "pending")] == 1.0


def test_metrics_obey_the_auth_hook(web, history):
    client = web(auth=lambda request: request.headers.get("x-scraper") == "yes")
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", headers={"x-scraper": "yes"}).status_code == 200
