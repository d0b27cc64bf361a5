"""The runs list: filters, search, keyset pages (each run exactly once, newest first)."""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest

RUN_LINK = re.compile(r'class="mono run-link" href="/runs/([0-9a-f-]{36})"')
NEXT = re.compile(r'rel="next" href="([^"]+)"')
PREV = re.compile(r'rel="prev" href="([^"]+)"')


def ids(page_text: str) -> list[str]:
    return RUN_LINK.findall(page_text)


def load(dsn: str, n: int, *, same_time: int = 1) -> list[str]:
    """``n`` runs over the last n minutes (``same_time`` of them share each created_at),
    statuses and workflows spread; returns their ids newest first, as the list orders them."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""
            insert into pgflow.runs (name, version, queue, key, concurrency_key, status, input,
                                     output, error, created_at, available_at, started_at,
                                     finished_at, lease_owner)
            select case when g %% 3 = 0 then 'billing' else 'wf' end, '1',
                   case when g %% 2 = 0 then 'default' else 'payments' end,
                   'k-' || g, 'c-' || (g %% 4), s.status, '[]',
                   case when s.status = 'completed' then 'null'::jsonb end,
                   case when s.status = 'failed' then '{"type": "E", "message": "m"}'::jsonb end,
                   t, t, t, case when s.status in ('completed', 'failed', 'cancelled') then t end,
                   case when s.status = 'running' then gen_random_uuid() end
            from generate_series(1, %(n)s) g,
                 lateral (select (array['pending', 'running', 'sleeping', 'waiting', 'completed',
                                        'failed', 'cancelled'])[1 + g %% 7] as status) s,
                 lateral (select timestamptz '2026-11-01 12:00Z'
                                 + ((g - 1) / %(same)s) * interval '1 minute' as t) x""",
                  {"n": n, "same": same_time})
        return [str(r[0]) for r in c.execute(
            "select id from pgflow.runs order by created_at desc, id desc")]


def walk(client, first: str, link: re.Pattern[str]) -> tuple[list[str], int]:
    seen: list[str] = []
    pages = 0
    url: str | None = first
    while url:
        page = client.get(url.replace("&amp;", "&"))
        assert page.status_code == 200, page.text
        seen += ids(page.text)
        pages += 1
        found = link.search(page.text)
        url = found.group(1) if found else None
    return seen, pages


@pytest.mark.parametrize("same_time", [1, 7])
def test_pages_walk_every_run_once_newest_first_and_back(client, dsn, same_time):
    expected = load(dsn, 120, same_time=same_time)
    seen, pages = walk(client, "/runs?limit=25", NEXT)
    assert seen == expected
    assert pages == 5
    # and back from the last page, by "Newer" links
    last = client.get(f"/runs?limit=25&before={_cursor(dsn, expected[-21])}")
    assert ids(last.text) == expected[-20:]
    back, _ = walk(client, PREV.search(last.text).group(1), PREV)
    assert back == [i for chunk in _chunks(expected[:-20], 25)[::-1] for i in chunk]


def _chunks(items: list[str], size: int) -> list[list[str]]:
    """``items`` cut into pages of ``size`` from the end, as walking back gives them."""
    out = []
    end = len(items)
    while end > 0:
        out.append(items[max(0, end - size):end])
        end -= size
    return out[::-1]


def _cursor(dsn: str, run_id: str) -> str:
    with psycopg.connect(dsn) as c:
        at = c.execute("select created_at from pgflow.runs where id = %s", (run_id,)).fetchone()[0]
    from urllib.parse import quote
    return quote(f"{at.isoformat()}~{run_id}")


def test_filters_narrow_the_list(client, dsn):
    load(dsn, 70)
    with psycopg.connect(dsn) as c:
        def expect(where: str, params: tuple = ()) -> list[str]:
            return [str(r[0]) for r in c.execute(
                f"select id from pgflow.runs where {where} order by created_at desc, id desc",
                params)]

        cases = {
            "status=failed": expect("status = 'failed'"),
            "workflow=billing": expect("name = 'billing'"),
            "queue=payments&status=pending": expect("queue = 'payments' and status = 'pending'"),
            "key=k-7": expect("key = 'k-7'"),
            "concurrency_key=c-1&workflow=wf": expect("concurrency_key = 'c-1' and name = 'wf'"),
            "since=2026-11-01T12:30Z&until=2026-11-01T12:40": expect(
                "created_at >= '2026-11-01 12:30Z' and created_at < '2026-11-01 12:40Z'"),
            "since=2026-11-01T13:30%2B01:00": expect("created_at >= '2026-11-01 12:30Z'"),
        }
    for query, expected in cases.items():
        page = client.get(f"/runs?{query}&limit=500")
        assert page.status_code == 200, (query, page.text)
        assert ids(page.text) == expected, query
        assert expected, query


def test_a_relative_since_counts_back_from_now(client, dsn):
    load(dsn, 5)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("update pgflow.runs set created_at = now() - interval '10 minutes'"
                  " where key = 'k-1'")
    assert len(ids(client.get("/runs?since=1h").text)) == 1
    assert len(ids(client.get("/runs?since=5m").text)) == 0


@pytest.mark.parametrize(("query", "message"), [
    ("status=done", "unknown status &#39;done&#39;"),
    ("since=yesterday", "since &#39;yesterday&#39; is not a date/time"),
    ("since=2026-12-02&until=2026-12-01", "since must be earlier than until"),
    ("limit=0", "limit must be a whole number from 1 to 500"),
    ("limit=abc", "limit must be a whole number from 1 to 500"),
    ("before=garbage", "before &#39;garbage&#39; is not a position in the list"),
    ("before=2026-11-01T12:00:00%2B00:00~x", "is not a position in the list"),
    ("before=2026-11-01T12:00:00~3f0c9a2e-5b7d-4c1e-9a8f-2d6b4e7c1a90", "is not a position in the list"),
    ("workflow=a%00b", "must not contain a NUL character"),
])
def test_bad_filters_are_one_clear_400(client, query, message):
    page = client.get(f"/runs?{query}")
    assert page.status_code == 400
    assert message in page.text
    assert page.text.count('class="flash error"') == 1


def test_search_by_id_or_key_opens_the_run(client, dsn):
    expected = load(dsn, 10)
    with psycopg.connect(dsn) as c:
        keyed = str(c.execute("select id from pgflow.runs where key = 'k-4'").fetchone()[0])
    by_id = client.get(f"/runs?q={expected[3]}")
    assert by_id.status_code == 303 and by_id.headers["location"] == f"/runs/{expected[3]}"
    by_key = client.get("/runs?q=k-4")
    assert by_key.status_code == 303 and by_key.headers["location"] == f"/runs/{keyed}"
    by_name = client.get("/runs?q=billing")
    assert by_name.status_code == 303 and by_name.headers["location"] == "/runs?workflow=billing"
    nothing = client.get(f"/runs?q={uuid.uuid4()}")
    assert nothing.status_code == 200 and "no run has the id or key" in nothing.text


def test_times_are_shown_in_utc(client, dsn):
    load(dsn, 1)
    assert "2026-11-01 12:00:00" in client.get("/runs").text
