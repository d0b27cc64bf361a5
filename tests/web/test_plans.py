"""The runs list on a large table: every variant reads an index, never the whole table."""

from __future__ import annotations

import psycopg
import pytest

from pgflow.web import listing
from tests.support.sqlkit import plan_nodes

ROWS = 50_000


def explain(conn: psycopg.Connection, q: listing.RunQuery) -> list[dict]:
    query, params = listing.statement(q)
    text = psycopg.ClientCursor(conn).mogrify(query, params)
    plan = conn.execute(f"explain (format json) {text}").fetchone()[0][0]["Plan"]
    return list(plan_nodes(plan))


@pytest.mark.slow
def test_every_runs_list_query_uses_an_index(conn):
    conn.execute("""
        insert into pgflow.runs (name, version, queue, key, concurrency_key, status, input,
                                 output, error, created_at, available_at, started_at,
                                 finished_at, lease_owner)
        select 'wf_' || (g %% 20), '1', 'q' || (g %% 5), 'key-' || g, 'c-' || (g %% 1000), s,
               '[]', case when s = 'completed' then 'null'::jsonb end,
               case when s = 'failed' then '{"type": "E"}'::jsonb end,
               t, t, t, case when s in ('completed', 'failed', 'cancelled') then t end,
               case when s = 'running' then gen_random_uuid() end
        from generate_series(1, %s) g,
             lateral (select case when g %% 100 < 85 then 'completed'
                                  when g %% 100 < 92 then 'failed'
                                  when g %% 100 < 95 then 'cancelled'
                                  else (array['pending', 'running', 'sleeping', 'waiting'])[1 + g %% 4]
                             end as s) st,
             lateral (select now() - (g * interval '50 seconds') as t) x""", (ROWS,))
    conn.execute("vacuum analyze pgflow.runs")
    deep = listing.fetch_page(conn, listing.RunQuery.parse({"limit": "50"}))
    for _ in range(20):  # 1,000 runs down
        deep = listing.fetch_page(conn, listing.RunQuery(before=deep.older))
    cursor = deep.older.encode()
    variants = {
        "first page": {},
        "status": {"status": "failed"},
        "workflow": {"workflow": "wf_3"},
        "queue": {"queue": "q2"},
        "key": {"key": "key-777"},
        "concurrency key": {"concurrency_key": "c-12"},
        "concurrency key, failed": {"concurrency_key": "c-12", "status": "failed"},
        "time range": {"since": "3d", "until": "1d"},
        "deep page": {"before": cursor},
        "deep page, newer": {"after": cursor},
        "deep page, status": {"status": "completed", "before": cursor},
    }
    for name, params in variants.items():
        nodes = explain(conn, listing.RunQuery.parse(params))
        scans = [n for n in nodes if n.get("Relation Name") == "runs"]
        assert scans, name
        assert all(n["Node Type"] != "Seq Scan" for n in scans), (name, nodes)
        indexes = {n["Index Name"] for n in nodes if "Index Name" in n}
        assert indexes, name
        assert all(i.startswith("runs_") for i in indexes), (name, indexes)
    # and the pages are the ones a full sort gives
    page = listing.fetch_page(conn, listing.RunQuery.parse({"before": cursor, "limit": "50"}))
    expected = conn.execute(
        "select id from pgflow.runs where (created_at, id) < (%s, %s)"
        " order by created_at desc, id desc limit 50", (deep.older.created_at, deep.older.id))
    assert [r["id"] for r in page.rows] == [r[0] for r in expected]
