-- pgflow engine, revision 0009: observability (trace context on runs, queue figures for metrics).
--
-- Changes: column pgflow.runs.traceparent (new; nullable, no default: adding
-- it rewrites nothing); trigger runs_trace on pgflow.runs and the functions
-- of sql/schema/14_observability.sql (new: pgflow.queue_metrics, the
-- helpers _check_traceparent and _runs_trace); pgflow._start (re-created: a
-- trailing defaulted parameter, traceparent; internal, its callers
-- unchanged); pgflow.start_run (re-created: a trailing defaulted parameter,
-- traceparent; calls naming the parameters of 0008 are unchanged);
-- pgflow.claim_runs (re-created: two new result columns, traceparent and
-- claimed_at); pgflow._privileges (replaced, same signature). Workers of
-- 0.1.0 (pgflow.claim) and of revision 0008 keep running on it: they read
-- claim_runs' columns by name.

alter table pgflow.runs
    add column traceparent  text;                       -- W3C trace context of its start (14_observability.sql)

-- ---------------------------------------------------------------------------
-- Trace context and queue figures (sql/schema/14_observability.sql)
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

-- ---------------------------------------------------------------------------
-- _start and start_run: a trailing parameter, the trace of the run
-- ---------------------------------------------------------------------------

drop function pgflow.start_run(text, jsonb, text, text, integer, interval, text, interval, text);
drop function pgflow._start(text, jsonb, text, text, integer, interval, text, uuid, interval,
                           text, timestamptz, text);

-- Start a run of workflow `name`. Runs inside the caller's transaction: the
-- run exists if and only if that transaction commits. With `key`, a second
-- start returns the existing run's id. Without `version`, the newest version
-- a live worker serves is used (else the newest any worker ever announced),
-- with its queue unless `queue` is given.
-- pgflow.start and pgflow.start_child share this body; only start_child
-- (fenced by its parent's lease) may name a parent, so _start is not public.
create function pgflow._start(
    name     text,
    input    jsonb default '[]'::jsonb,
    key      text default null,
    queue    text default null,
    priority integer default 0,
    delay    interval default null,
    version  text default null,
    parent_id uuid default null,
    timeout  interval default null,
    schedule_id    text default null,        -- a schedule's tick (12_schedules.sql)
    scheduled_time timestamptz default null,
    concurrency_key text default null,       -- overrides the key read from the input (13_flow_control.sql)
    traceparent     text default null        -- the caller's trace (14_observability.sql)
) returns uuid
language plpgsql
as $$
#variable_conflict use_column
declare
    v_version text := _start.version;
    v_queue   text := _start.queue;
    v_timeout interval := _start.timeout;
    v_params  jsonb;
    v_param   text;        -- the workflow's Concurrency key parameter, if any
    v_ckey    text := _start.concurrency_key;
    v_now     timestamptz := pgflow.now();
    v_id      uuid;
    v_name    text;
begin
    perform pgflow._check_name(_start.name, 'workflow name');
    if _start.name like 'pgflow.%' then
        raise exception using errcode = 'PF002',
            message = format('workflow name %L is reserved: names beginning with "pgflow." '
                             'belong to pgflow''s internal workflows', _start.name);
    end if;
    if _start.input is null or jsonb_typeof(_start.input) not in ('array', 'object') then
        raise exception using errcode = 'PF002',
            message = 'workflow input must be a JSON array (positional arguments) or object (keyword arguments)';
    end if;
    perform pgflow._check_payload(_start.input, format('the input of workflow %L', _start.name));
    if _start.key is not null then
        perform pgflow._check_key(_start.key, 'key');
    end if;
    if _start.queue is not null then
        perform pgflow._check_name(_start.queue, 'queue');
    end if;
    if _start.version is not null then
        perform pgflow._check_name(_start.version, 'version');
    end if;
    if v_ckey is not null then
        perform pgflow._check_key(v_ckey, 'concurrency key');
    end if;
    perform pgflow._check_span(_start.delay, 'delay', true);
    perform pgflow._check_span(_start.timeout, 'timeout', false);

    if v_version is null or v_queue is null then
        -- The newest version a live worker serves; else the newest ever seen.
        select w.version, w.queue, w.timeout, w.params, w.concurrency_param
        into v_version, v_queue, v_timeout, v_params, v_param
        from pgflow.workflows w
        where w.name = _start.name
          and (_start.version is null or w.version = _start.version)
        order by exists (
                     select 1 from pgflow.workers k
                     where k.workflows @> jsonb_build_array(
                               jsonb_build_object('name', w.name, 'version', w.version))) desc,
                 w.first_seen desc
        limit 1;
        if not found and _start.version is null then
            raise exception using errcode = 'PF002',
                message = format('unknown workflow %L: no worker has registered it '
                                 '(start a worker that defines it; from SQL, version => ... '
                                 'starts it before any worker has)', _start.name);
        end if;
        v_version := coalesce(_start.version, v_version);
        v_queue := coalesce(_start.queue, v_queue, 'default');
        v_timeout := coalesce(_start.timeout, v_timeout);
    else
        -- Version and queue given (the Python client with the workflow's code):
        -- one primary-key probe for the parameters its workers announced.
        select w.params, w.concurrency_param into v_params, v_param
        from pgflow.workflows w
        where w.name = _start.name and w.version = v_version;
    end if;
    perform pgflow._check_input(_start.name, v_version, v_params, _start.input);
    if v_ckey is null and v_param is not null then
        v_ckey := pgflow._concurrency_key(v_params, v_param, _start.input);
        if octet_length(v_ckey) > 1024 then  -- it names a scope: a btree key
            raise exception using errcode = 'PF002',
                message = format('the concurrency key of workflow %L (argument %L) must be at '
                                 'most 1024 bytes, got %s', _start.name, v_param,
                                 octet_length(v_ckey));
        end if;
    end if;

    insert into pgflow.runs as r (name, version, queue, key, status, priority, input, parent_id,
                                  timeout, created_at, available_at, schedule_id,
                                  scheduled_time, concurrency_key, traceparent)
    values (_start.name, v_version, v_queue, _start.key,
            case when coalesce(_start.delay, interval '0') > interval '0'
                 then 'sleeping' else 'pending' end,
            coalesce(_start.priority, 0), _start.input, _start.parent_id, v_timeout, v_now,
            v_now + coalesce(_start.delay, interval '0'), _start.schedule_id,
            _start.scheduled_time, v_ckey, pgflow._check_traceparent(_start.traceparent))
    on conflict (key) where key is not null do nothing
    returning r.id into v_id;

    if v_id is null then
        -- Idempotent start: the key is taken (by a committed run, or one whose
        -- transaction we just waited for).
        select r.id, r.name into v_id, v_name from pgflow.runs r where r.key = _start.key;
        if v_name is distinct from _start.name then
            raise exception using errcode = 'PF005',
                message = format('key %L is already used by a run of workflow %L', _start.key, v_name);
        end if;
        return v_id;
    end if;

    if v_timeout is not null then
        perform pgflow._add_timer(v_id, 'deadline', null, v_now + v_timeout);
    end if;
    if coalesce(_start.delay, interval '0') > interval '0' then
        perform pgflow._add_timer(v_id, 'start', null, v_now + _start.delay);
    else
        perform pgflow._notify_ready(v_queue);
    end if;
    return v_id;
end;
$$;

-- start with every option: what the Python client calls. concurrency_key
-- sets the run's key under its workflow's Concurrency limit (else it is read
-- from the input; 13_flow_control.sql). traceparent: the W3C trace context
-- (`00-<trace id>-<span id>-<flags>`) the run's spans continue
-- (14_observability.sql).
create function pgflow.start_run(
    name     text,
    input    jsonb default '[]'::jsonb,
    key      text default null,
    queue    text default null,
    priority integer default 0,
    delay    interval default null,
    version  text default null,
    timeout  interval default null,
    concurrency_key text default null,
    traceparent     text default null
) returns uuid
language sql
as $$
    select pgflow._start(start_run.name, start_run.input, start_run.key, start_run.queue,
                         start_run.priority, start_run.delay, start_run.version, null,
                         start_run.timeout, null, null, start_run.concurrency_key,
                         start_run.traceparent)
$$;

-- ---------------------------------------------------------------------------
-- claim_runs: the trace and the claim's time with each run
-- ---------------------------------------------------------------------------

drop function pgflow.claim_runs(uuid, text[], text[], text[], integer);

-- Lease up to p_limit ready runs of the given queues whose (name, version)
-- the worker has code for, highest priority first, oldest first. Each comes
-- with its journal so that replay needs no further round trip, the time its
-- schedule's tick was due (ctx.scheduled_time; null if no schedule started
-- it) and since when it was ready (available_at: the claim delay). Runs
-- over a concurrency or rate limit, and runs of paused queues, stay pending
-- (13_flow_control.sql). limited: the run holds concurrency slots, which it
-- gives back when it stops executing; its worker then claims again at once
-- (it is the one that knows a slot just came free: no NOTIFY is sent for it).
-- traceparent: the trace its spans continue; claimed_at: the claim's time
-- (claimed_at - ready_since is the claim delay the worker's metrics show).
create function pgflow.claim_runs(
    p_worker_id uuid,
    p_queues    text[],
    p_names     text[],
    p_versions  text[],
    p_limit     integer
) returns table (run_id uuid, name text, version text, input jsonb, lease_token bigint,
                 journal jsonb, cancel_requested boolean, cancel_seq integer,
                 scheduled_time timestamptz, ready_since timestamptz, limited boolean,
                 traceparent text, claimed_at timestamptz)
language plpgsql
-- One plan for the life of the connection: left to choose, PL/pgSQL re-plans
-- this statement on every call (its array parameters make each custom plan
-- look cheaper), which cost 0.3 ms a call, half the claim (measured). The
-- generic plan walks the same indexes (tests/sql/test_sql_procedures.py).
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_now     timestamptz := pgflow.now();
    v_chosen  uuid[];
    v_slotted uuid[] := '{}';  -- the chosen runs that took concurrency slots
    v_queue_limits    boolean;  -- a cap, rate or pause on one of p_queues
    v_rates           boolean;
    v_workflow_limits boolean;  -- a Concurrency on one of the worker's workflows
begin
    if p_limit is null or p_limit < 1 then
        raise exception using errcode = 'PF002', message = 'claim limit must be at least 1';
    end if;
    if not exists (select 1 from pgflow.workers w where w.id = p_worker_id) then
        raise exception using errcode = 'PF003',
            message = format('worker %s is not registered (declared dead?)', p_worker_id);
    end if;

    -- Flow control (13_flow_control.sql) only where a limit or a pause
    -- concerns this worker: two probes of small tables, then the claim as
    -- it always was.
    select coalesce(bool_or(s.paused or s.concurrency is not null or s.rate_limit is not null),
                    false),
           coalesce(bool_or(s.rate_limit is not null), false)
    into v_queue_limits, v_rates
    from pgflow.queue_settings s
    where s.name = any (p_queues);
    v_workflow_limits := exists (
        select 1 from pgflow.workflows w
        join unnest(p_names, p_versions) as t(n, v) on w.name = t.n and w.version = t.v
        where w.concurrency_limit is not null);
    if v_workflow_limits or v_rates then
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_under_limits(p_queues, p_names, p_versions, p_limit, v_now) l;
    elsif v_queue_limits then  -- caps and pauses only
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_capped(p_queues, p_names, p_versions, p_limit, v_now) l;
    else
        -- One ordered walk of runs_claimable per queue (an `= any(queues)`
        -- filter would read and sort every ready run of those queues on each
        -- claim), then the best p_limit of the per-queue candidates.
        -- Candidates beyond p_limit stay locked until this statement's
        -- transaction ends, which only makes other claimers skip them for
        -- that instant.
        v_chosen := array(
            with candidates as materialized (
                select c.id
                from pg_catalog.unnest(p_queues) as q(queue)
                cross join lateral (
                    select r.id, r.priority, r.available_at
                    from pgflow.runs r
                    where r.status = 'pending'
                      and r.held_by is null
                      and r.queue = q.queue
                      and r.available_at <= v_now
                      and (r.name, r.version) in (select t.n, t.v
                                                  from unnest(p_names, p_versions) as t(n, v))
                    order by r.priority desc, r.available_at
                    limit p_limit
                    for update skip locked
                ) c
                order by c.priority desc, c.available_at
                limit p_limit
            )
            select d.id from candidates d);
    end if;

    return query
    with claimed as (
        update pgflow.runs r
        set status = 'running', lease_owner = p_worker_id, lease_token = r.lease_token + 1,
            started_at = coalesce(r.started_at, v_now), holds_slots = r.id = any (v_slotted)
        where r.id = any (v_chosen)
        returning r.id, r.name, r.version, r.input, r.lease_token, r.cancel_requested,
                  r.cancel_seq, r.scheduled_time, r.available_at, r.holds_slots, r.traceparent
    )
    select c.id, c.name, c.version, c.input, c.lease_token,
           coalesce((select jsonb_agg(jsonb_build_object(
                                 'seq', s.seq, 'name', s.name, 'kind', s.kind, 'status', s.status,
                                 'attempts', s.attempts, 'output', s.output, 'error', s.error)
                             order by s.seq)
                     from pgflow.steps s where s.run_id = c.id),
                    '[]'::jsonb),
           c.cancel_requested, c.cancel_seq, c.scheduled_time, c.available_at, c.holds_slots,
           c.traceparent, v_now
    from claimed c;
end;
$$;

-- ---------------------------------------------------------------------------
-- The grant policy: queue_metrics for workers and readers
-- ---------------------------------------------------------------------------

-- kind 'definer': an entry point, run as the owner with the fixed search_path.
-- kind 'invoker': a small SQL function kept inlinable; runs with the caller's rights.
-- kind 'relation': a table or view; the roles get SELECT on it.
-- roles '{}': owner only.
create or replace function pgflow._privileges()
returns table (kind text, object text, roles text[])
language sql immutable
as $$
    values
    -- == GRANT LIST: add every new public function here (see the header) ==
    -- worker: membership and liveness (pgflow/membership.py)
    ('definer', 'register_worker',   '{pgflow_worker}'::text[]),
    ('definer', 'heartbeat',         '{pgflow_worker}'),
    ('definer', 'unregister_worker', '{pgflow_worker}'),
    ('definer', 'recover',           '{pgflow_worker}'),
    -- worker: claiming and reporting (pgflow/procedures.py)
    ('definer', 'claim',             '{pgflow_worker}'),  -- workers of 0.1.0
    ('definer', 'claim_runs',        '{pgflow_worker}'),  -- revision 0007
    ('definer', 'complete_step',     '{pgflow_worker}'),
    ('definer', 'complete_batch',    '{pgflow_worker}'),  -- checkpoints, completions, sleeps
    ('definer', 'fail_step',         '{pgflow_worker}'),
    ('definer', 'complete_run',      '{pgflow_worker}'),
    ('definer', 'fail_run',          '{pgflow_worker}'),
    ('definer', 'release_run',       '{pgflow_worker}'),
    ('definer', 'sleep',             '{pgflow_worker}'),
    ('definer', 'record_value',      '{pgflow_worker}'),
    ('definer', 'wait_signal',       '{pgflow_worker}'),
    ('definer', 'set_state',         '{pgflow_worker}'),
    ('definer', 'start_child',       '{pgflow_worker}'),
    ('definer', 'wait_child',        '{pgflow_worker}'),
    ('definer', 'map',               '{pgflow_worker}'),
    ('definer', 'continue_as_new',   '{pgflow_worker}'),
    ('definer', 'cancel_run',        '{pgflow_worker}'),
    -- worker: the timer scheduler (pgflow/scheduler.py)
    ('definer', 'fire_timers',       '{pgflow_worker}'),
    ('definer', 'next_timer_in',     '{pgflow_worker}'),
    -- worker: schedules (pgflow/ticker.py; revision 0007)
    ('definer', 'next_wake_in',      '{pgflow_worker}'),
    ('definer', 'due_schedules',     '{pgflow_worker}'),
    ('definer', 'fire_schedules',    '{pgflow_worker}'),
    ('definer', 'start_buffered_ticks', '{pgflow_worker}'),
    -- worker: flow control (the leader wakes rate-limited queues; revision 0008)
    ('definer', 'wake_queues',       '{pgflow_worker}'),
    -- worker and dashboard: the queue figures of a metrics scrape (revision 0009)
    ('definer', 'queue_metrics',     '{pgflow_worker,pgflow_reader}'),
    -- client: control runs (pgflow/client.py, pgflow/aio.py, the CLI)
    ('definer', 'start',             '{pgflow_client}'),
    ('definer', 'start_run',         '{pgflow_client}'),  -- revision 0008
    ('definer', 'signal',            '{pgflow_client}'),
    ('definer', 'cancel',            '{pgflow_client}'),
    ('definer', 'retry',             '{pgflow_client}'),
    ('definer', 'watch',             '{pgflow_client}'),  -- result(): also needs pgflow_reader
    -- client: schedules (pgflow/schedules.py; revision 0007). Workers apply the
    -- schedules declared in their code when they start.
    ('definer', 'create_schedule',   '{pgflow_client,pgflow_worker}'),
    ('definer', 'delete_schedule',   '{pgflow_client,pgflow_worker}'),
    ('definer', 'pause_schedule',    '{pgflow_client}'),
    ('definer', 'resume_schedule',   '{pgflow_client}'),
    ('definer', 'trigger_schedule',  '{pgflow_client}'),
    ('definer', 'backfill_schedule', '{pgflow_client}'),
    -- client: queue caps and pauses (pgflow/flow.py; revision 0008)
    ('definer', 'set_queue',         '{pgflow_client}'),
    ('definer', 'pause_queue',       '{pgflow_client}'),
    ('definer', 'resume_queue',      '{pgflow_client}'),
    -- owner only: the test clock and retention are operator tools
    ('definer', 'advance_time',      '{}'),
    ('definer', 'reset_time',        '{}'),  -- revision 0004
    ('definer', 'purge',             '{}'),
    ('definer', 'purge_schedule_ticks', '{}'),  -- revision 0007
    -- kept inlinable
    ('invoker', 'now',               '{pgflow_worker,pgflow_client,pgflow_reader}'),
    ('invoker', 'uuid_v7',           '{}'),  -- column default of runs.id, used by start()
    ('invoker', 'max_payload_bytes', '{pgflow_worker,pgflow_client,pgflow_reader}'),  -- a constant
    ('invoker', 'min_worker_revision', '{pgflow_worker,pgflow_client,pgflow_reader}'),  -- 0006
    -- == END OF GRANT LIST ==
    -- Everyone: the version check (pgflow.schema.check) and the engine clock.
    ('relation', 'alembic_version',  '{pgflow_worker,pgflow_client,pgflow_reader}'),
    ('relation', 'clock',            '{pgflow_worker,pgflow_client,pgflow_reader}'),
    -- reader: the run records and the operators' views
    ('relation', 'runs',             '{pgflow_reader}'),
    ('relation', 'steps',            '{pgflow_reader}'),
    ('relation', 'step_attempts',    '{pgflow_reader}'),
    ('relation', 'signals',          '{pgflow_reader}'),
    ('relation', 'run_state',        '{pgflow_reader}'),
    ('relation', 'timers',           '{pgflow_reader}'),
    ('relation', 'workers',          '{pgflow_reader}'),
    ('relation', 'workflows',        '{pgflow_reader}'),
    ('relation', 'schedules',        '{pgflow_reader,pgflow_client,pgflow_worker}'),  -- 0007: backfill and a worker's declared schedules read it
    ('relation', 'schedule_ticks',   '{pgflow_reader}'),
    ('relation', 'queue_settings',   '{pgflow_reader}'),  -- 0008
    ('relation', 'slots',            '{pgflow_reader}'),
    ('relation', 'scope_rechecks',   '{pgflow_reader}'),
    ('relation', 'queues',           '{pgflow_reader}'),
    ('relation', 'waits',            '{pgflow_reader}'),
    ('relation', 'unserved_runs',    '{pgflow_reader}'),
    ('relation', 'patches_in_use',   '{pgflow_reader}')
$$;

select pgflow._secure();
