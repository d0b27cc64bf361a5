-- ---------------------------------------------------------------------------
-- Observability: trace context on runs, queue figures for metrics (revision 0009)
-- ---------------------------------------------------------------------------

-- A run carries the W3C trace context of its start (runs.traceparent): the
-- worker's spans for it continue that trace (pgflow/tracing.py). The Python
-- client passes the current span's; from SQL, pgflow.start_run(...,
-- traceparent => '00-...'). Children and map items inherit their parent's.

-- The traceparent, checked: `<version>-<32 hex trace id>-<16 hex span id>-
-- <2 hex flags>`, lowercase, neither id all zeros, version not ff (W3C Trace
-- Context, level 1). Null passes (no trace).
create function pgflow._check_traceparent(p_traceparent text) returns text
language plpgsql immutable
as $$
begin
    if p_traceparent is not null and (
           p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
           or left(p_traceparent, 2) = 'ff'
           or substr(p_traceparent, 4, 32) = repeat('0', 32)
           or substr(p_traceparent, 37, 16) = repeat('0', 16)) then
        raise exception using errcode = 'PF002',
            message = pg_catalog.format(
                'traceparent %L is not a W3C trace context '
                '(00-<32 hex digits trace id>-<16 hex digits span id>-<2 hex digits flags>)',
                left(p_traceparent, 100));
    end if;
    return p_traceparent;
end;
$$;

-- A child (start_child) or a map item inserted without a trace of its own
-- continues its parent's: one primary-key probe, for those inserts only.
create function pgflow._runs_trace() returns trigger
language plpgsql
as $$
begin
    new.traceparent := (select p.traceparent from pgflow.runs p where p.id = new.parent_id);
    return new;
end;
$$;

create trigger runs_trace
    before insert on pgflow.runs
    for each row
    when (new.parent_id is not null and new.traceparent is null)
    execute function pgflow._runs_trace();

-- What a metrics scrape shows of the queues (pgflow/metrics.py): unfinished
-- runs by queue and status, `held` for pending runs parked by a concurrency
-- limit (13_flow_control.sql), and the age in seconds of the oldest run that
-- is ready and unclaimed (0 when none). Reads only unfinished runs (index
-- runs_status_created leads with status), so its cost follows the work in
-- flight, not the finished history. Every queue a worker serves appears,
-- with 0 pending when idle, so that an alert on it has a series to read.
create function pgflow.queue_metrics()
returns table (queue text, status text, runs bigint, oldest_ready_seconds double precision)
language sql stable
as $$
    with unfinished as (
        select r.queue,
               case when r.held_by is not null then 'held' else r.status end as status,
               pg_catalog.count(*) as runs,
               pg_catalog.min(r.available_at) filter (
                   where r.status = 'pending' and r.held_by is null
                     and r.available_at <= pgflow.now()) as oldest_ready
        from pgflow.runs r
        where r.status in ('pending', 'running', 'sleeping', 'waiting')
        group by 1, 2
    ), served as (
        select distinct q.queue, 'pending'::text as status, 0::bigint as runs,
               null::timestamptz as oldest_ready
        from pgflow.workers w
        cross join lateral pg_catalog.unnest(w.queues) as q(queue)
        where not exists (select 1 from unfinished u
                          where u.queue = q.queue and u.status = 'pending')
    )
    select x.queue, x.status, x.runs,
           coalesce(extract(epoch from pgflow.now() - x.oldest_ready)::double precision, 0)
    from (select * from unfinished union all select * from served) x
    order by x.queue, x.status
$$;
