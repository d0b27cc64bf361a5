-- Undo revision 0008: flow control. Limits, pauses and parked runs are
-- forgotten; parked runs become claimable again.

drop function pgflow._start(text, jsonb, text, text, integer, interval, text, uuid, interval,
                            text, timestamptz, text);
drop function pgflow.start_run(text, jsonb, text, text, integer, interval, text, interval, text);
drop view pgflow.queues;
drop trigger runs_flow on pgflow.runs;
drop function pgflow._runs_flow();
drop function pgflow._give_back_slots(uuid[]);
drop function pgflow._unpark(text, integer);
drop function pgflow.wake_queues();
drop function pgflow.resume_queue(text);
drop function pgflow.pause_queue(text);
drop function pgflow.set_queue(text, integer, integer, interval);
drop function pgflow._unpark_workflow(text);
drop function pgflow._claim_capped(text[], text[], text[], integer, timestamptz);
drop function pgflow._claim_under_limits(text[], text[], text[], integer, timestamptz);
drop function pgflow._mark_starved(text[], uuid[]);
drop function pgflow._rate_blocked(text, integer);
drop function pgflow._take_rate_slot(text, integer, interval, timestamptz);
drop function pgflow._hand_down_slot(text, integer, integer);
drop function pgflow._ensure_slots(text, integer);
drop function pgflow._give_back_slot(text, uuid);
drop function pgflow._take_slot(text, integer, uuid);
drop function pgflow._park(text, uuid, text, text, boolean);
drop function pgflow._concurrency_key(jsonb, text, jsonb);
drop function pgflow._workflow_scope(text, text, text);
drop table pgflow.slots;
drop table pgflow.scope_rechecks;
drop table pgflow.queue_settings;
drop index pgflow.runs_held;
drop index pgflow.runs_keyed_ready;
drop index pgflow.runs_claimable;
alter table pgflow.runs drop column concurrency_key, drop column held_by, drop column holds_slots;
alter table pgflow.workflows drop column concurrency_limit, drop column concurrency_param;
create index runs_claimable on pgflow.runs (queue, priority desc, available_at)
    where status = 'pending';

-- The functions as revision 0007 made them.
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
    scheduled_time timestamptz default null
) returns uuid
language plpgsql
as $$
#variable_conflict use_column
declare
    v_version text := _start.version;
    v_queue   text := _start.queue;
    v_timeout interval := _start.timeout;
    v_params  jsonb;
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
    perform pgflow._check_span(_start.delay, 'delay', true);
    perform pgflow._check_span(_start.timeout, 'timeout', false);

    if v_version is null or v_queue is null then
        -- The newest version a live worker serves; else the newest ever seen.
        select w.version, w.queue, w.timeout, w.params into v_version, v_queue, v_timeout, v_params
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
        select w.params into v_params
        from pgflow.workflows w
        where w.name = _start.name and w.version = v_version;
    end if;
    perform pgflow._check_input(_start.name, v_version, v_params, _start.input);

    insert into pgflow.runs as r (name, version, queue, key, status, priority, input, parent_id,
                                  timeout, created_at, available_at, schedule_id,
                                  scheduled_time)
    values (_start.name, v_version, v_queue, _start.key,
            case when coalesce(_start.delay, interval '0') > interval '0'
                 then 'sleeping' else 'pending' end,
            coalesce(_start.priority, 0), _start.input, _start.parent_id, v_timeout, v_now,
            v_now + coalesce(_start.delay, interval '0'), _start.schedule_id,
            _start.scheduled_time)
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

-- Seconds from now (engine clock) until the earliest timer or tick; null if
-- none. The leader sleeps that long unless pgflow_timer wakes it earlier.
create or replace function pgflow.next_wake_in() returns double precision
language sql stable
as $$
    select extract(epoch from least((select min(t.due_at) from pgflow.timers t),
                                    (select min(s.next_fire_at) from pgflow.schedules s
                                     where not s.paused))
                              - pgflow.now())
$$;

drop function pgflow.claim_runs(uuid, text[], text[], text[], integer);
-- Lease up to p_limit ready runs of the given queues whose (name, version)
-- the worker has code for, highest priority first, oldest first. Each comes
-- with its journal so that replay needs no further round trip, the time its
-- schedule's tick was due (ctx.scheduled_time; null if no schedule started
-- it) and since when it was ready (available_at: the claim delay).
create function pgflow.claim_runs(
    p_worker_id uuid,
    p_queues    text[],
    p_names     text[],
    p_versions  text[],
    p_limit     integer
) returns table (run_id uuid, name text, version text, input jsonb, lease_token bigint,
                 journal jsonb, cancel_requested boolean, cancel_seq integer,
                 scheduled_time timestamptz, ready_since timestamptz)
language plpgsql
-- One plan for the life of the connection: left to choose, PL/pgSQL re-plans
-- this statement on every call (its array parameters make each custom plan
-- look cheaper), which cost 0.3 ms a call, half the claim (measured). The
-- generic plan walks the same indexes (tests/sql/test_sql_procedures.py).
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_now timestamptz := pgflow.now();
begin
    if p_limit is null or p_limit < 1 then
        raise exception using errcode = 'PF002', message = 'claim limit must be at least 1';
    end if;
    if not exists (select 1 from pgflow.workers w where w.id = p_worker_id) then
        raise exception using errcode = 'PF003',
            message = format('worker %s is not registered (declared dead?)', p_worker_id);
    end if;

    -- One ordered walk of runs_claimable per queue (an `= any(queues)` filter
    -- would read and sort every ready run of those queues on each claim),
    -- then the best p_limit of the per-queue candidates. Candidates beyond
    -- p_limit stay locked until this statement's transaction ends, which
    -- only makes other claimers skip them for that instant.
    return query
    with candidates as materialized (
        select c.id
        from pg_catalog.unnest(p_queues) as q(queue)
        cross join lateral (
            select r.id, r.priority, r.available_at
            from pgflow.runs r
            where r.status = 'pending'
              and r.queue = q.queue
              and r.available_at <= v_now
              and (r.name, r.version) in (select t.n, t.v from unnest(p_names, p_versions) as t(n, v))
            order by r.priority desc, r.available_at
            limit p_limit
            for update skip locked
        ) c
        order by c.priority desc, c.available_at
        limit p_limit
    ), claimed as (
        update pgflow.runs r
        set status = 'running', lease_owner = p_worker_id, lease_token = r.lease_token + 1,
            started_at = coalesce(r.started_at, v_now)
        from candidates c
        where r.id = c.id
        returning r.id, r.name, r.version, r.input, r.lease_token, r.cancel_requested,
                  r.cancel_seq, r.scheduled_time, r.available_at
    )
    select c.id, c.name, c.version, c.input, c.lease_token,
           coalesce((select jsonb_agg(jsonb_build_object(
                                 'seq', s.seq, 'name', s.name, 'kind', s.kind, 'status', s.status,
                                 'attempts', s.attempts, 'output', s.output, 'error', s.error)
                             order by s.seq)
                     from pgflow.steps s where s.run_id = c.id),
                    '[]'::jsonb),
           c.cancel_requested, c.cancel_seq, c.scheduled_time, c.available_at
    from claimed c;
end;
$$;

-- Register a worker and take its liveness lock on *this* session. Call it on
-- the connection that lives as long as the worker (its listener).
create or replace function pgflow.register_worker(
    p_worker_id uuid,
    p_hostname  text,
    p_pid       integer,
    p_queues    text[],
    p_workflows jsonb   -- [{name, version, queue, timeout_seconds, params}]
) returns integer
language plpgsql
as $$
declare
    v_lock_key integer := pg_catalog.nextval('pgflow.worker_lock_key_seq');
begin
    -- Lock first, row second: recovery never sees a row without its lock.
    perform pg_catalog.pg_advisory_lock(7366502, v_lock_key);
    insert into pgflow.workers (id, lock_key, hostname, pid, queues, workflows)
    values (p_worker_id, v_lock_key, p_hostname, p_pid, p_queues, p_workflows);

    insert into pgflow.workflows as w (name, version, queue, timeout, params)
    select d ->> 'name', d ->> 'version', d ->> 'queue',
           (d ->> 'timeout_seconds')::double precision * interval '1 second',
           d -> 'params'
    from jsonb_array_elements(p_workflows) d
    where not (d ->> 'name') like 'pgflow.%'
    on conflict (name, version) do update
        set last_seen = pg_catalog.clock_timestamp(), queue = excluded.queue,
            timeout = excluded.timeout,
            params = coalesce(excluded.params, w.params);  -- an older worker announces none
    return v_lock_key;
end;
$$;

-- Group commit: the checkpoints, completions and sleeps of many runs in one
-- call and one transaction. A worker sends what its runs reported while its
-- previous batch was committing, so concurrent runs share round trips and
-- commits instead of paying one each. Element i is run p_run_ids[i] under
-- lease p_tokens[i], and does, in this order:
--   p_seqs[i] not null   record a step (p_seqs, p_names, p_kinds, p_outputs,
--                        p_durations in seconds) as complete_step does; it
--                        ended p_ages[i] seconds before this call (the time
--                        its report waited for the batch), default 0;
--   p_finish[i]          then complete the run with p_results[i], as
--                        complete_run does; or
--   p_sleep_seqs[i] not null
--                        then sleep until p_sleep_until[i] (or for
--                        p_sleep_seconds[i]) at that journal position, as
--                        pgflow.sleep does, unless cancellation was requested.
-- Each element is fenced on its own and never fails the others; the outcome
-- says what happened to it:
--   ok          recorded (a sleep: its time had already come, go on);
--   sleeping    recorded, and the run now sleeps (its worker lets go of it);
--   cancel      the step recorded, but cancellation was requested, so no
--               sleep was recorded (the workflow raises Cancelled);
--   lease_lost  the token is not current (nothing written; PF001 elsewhere);
--   duplicate   the step is already recorded (nothing written; PF004);
--   unknown     no such run (PF404).
-- A run appears at most once in a batch (it waits for its report).
create or replace function pgflow.complete_batch(
    p_run_ids         uuid[],
    p_tokens          bigint[],
    p_seqs            integer[],
    p_names           text[],
    p_kinds           text[],
    p_outputs         jsonb[],
    p_durations       double precision[],
    p_finish          boolean[],
    p_results         jsonb[],
    p_sleep_seqs      integer[] default null,
    p_sleep_until     timestamptz[] default null,
    p_sleep_seconds   double precision[] default null,
    p_ages            double precision[] default null
) returns table (run_id uuid, outcome text)
language plpgsql
-- As claim: planning the batch statement on every call cost 0.4 ms, twice a
-- one-element batch's work (measured); the generic plan probes runs_pkey.
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_now      timestamptz := pgflow.now();
    v_outcomes text[];
    v_finished uuid[];
    v_watched  uuid[];
    v_children uuid[];
    v_i        integer;
begin
    -- The payload limit, as complete_step and complete_run apply it (a worker
    -- never sends more; another client might). An offender fails the whole
    -- call; the worker then sends that batch's reports one by one.
    perform pgflow._check_payload(o.v, format('the result of step %L', o.n))
    from unnest(p_outputs, p_names) as o(v, n)
    where pg_catalog.pg_column_size(o.v) > pgflow.max_payload_bytes();
    perform pgflow._check_payload(o.v, 'the result of the workflow')
    from pg_catalog.unnest(p_results) as o(v)
    where pg_catalog.pg_column_size(o.v) > pgflow.max_payload_bytes();

    -- Every run's lock, in id order: two batches (or a batch and a cancel
    -- cascade, which also locks in order) cannot deadlock on each other.
    perform pgflow._lock_run(b.id)
    from pg_catalog.unnest(p_run_ids) as b(id)
    order by b.id;

    -- Multi-array unnest is FROM-clause syntax (ROWS FROM), hence unqualified.
    with report as (
        select *
        from unnest(p_run_ids, p_tokens, p_seqs, p_names, p_kinds, p_outputs, p_durations,
                    p_finish, p_results, p_ages)
             with ordinality as b(id, token, seq, name, kind, output, duration_s, finish, result,
                                  age_s, i)
    ), fenced as (
        -- One runs_pkey probe per report. As a plain join, the generic plan
        -- made while runs had never been analyzed (a fresh install, a
        -- truncated table) hashed a sequential scan of all runs, and the
        -- connection kept it until the next ANALYZE: OFFSET 0 keeps the
        -- lookup a parameterized subquery (tests/test_sql_batch.py).
        select b.*, r.id is not null as known,
               coalesce(r.status = 'running' and r.lease_token = b.token, false) as leased,
               coalesce(r.cancel_requested, false) as cancel_requested
        from report b
        left join lateral (
            select r.id, r.status, r.lease_token, r.cancel_requested
            from pgflow.runs r
            where r.id = b.id
            offset 0
        ) r on true
    ), recorded as (
        insert into pgflow.steps as s (run_id, seq, name, kind, status, attempts, output,
                                       started_at, finished_at)
        select f.id, f.seq, f.name, f.kind, 'completed', 1, coalesce(f.output, 'null'::jsonb),
               v_now - (coalesce(f.age_s, 0) + f.duration_s) * interval '1 second',
               v_now - coalesce(f.age_s, 0) * interval '1 second'
        from fenced f
        where f.leased and f.seq is not null
        on conflict (run_id, seq) do update
            set status = 'completed', attempts = s.attempts + 1, output = excluded.output,
                error = null, started_at = excluded.started_at,
                finished_at = excluded.finished_at
            where s.status = 'retrying' and s.name = excluded.name
        returning s.run_id
    ), finished as (
        update pgflow.runs r
        set status = 'completed', output = coalesce(f.result, 'null'::jsonb), error = null,
            finished_at = v_now, lease_owner = null
        from fenced f
        where r.id = f.id and f.leased and f.finish
          and (f.seq is null or f.id in (select d.run_id from recorded d))
        returning r.id, r.watched, r.parent_id
    )
    select pg_catalog.array_agg(case
               when not f.known then 'unknown'
               when not f.leased then 'lease_lost'
               when f.seq is not null and f.id not in (select d.run_id from recorded d)
                   then 'duplicate'
               when f.cancel_requested and not f.finish then 'cancel'
               else 'ok' end order by f.i),
           (select pg_catalog.array_agg(e.id) from finished e),
           (select pg_catalog.array_agg(e.id) from finished e where e.watched),
           (select pg_catalog.array_agg(e.id) from finished e where e.parent_id is not null)
    into v_outcomes, v_finished, v_watched, v_children
    from fenced f;

    -- What complete_run does after the update, for the runs completed here.
    if v_finished is not null then
        delete from pgflow.timers t where t.run_id = any (v_finished);
        perform pg_catalog.pg_notify('pgflow_done', w::text)
        from pg_catalog.unnest(v_watched) as w;
        perform pgflow._child_finished(c) from pg_catalog.unnest(v_children) as c;
    end if;

    -- Sleeps after the checkpoints they follow, one at a time through
    -- pgflow.sleep (the lock and lease are already held; re-taking them is
    -- cheap). A cancelled run does not go to sleep: its workflow raises
    -- Cancelled at this durable point instead.
    if p_sleep_seqs is not null then
        for v_i in 1 .. coalesce(pg_catalog.array_length(p_run_ids, 1), 0) loop
            continue when p_sleep_seqs[v_i] is null or v_outcomes[v_i] <> 'ok';
            if pgflow.sleep(p_run_ids[v_i], p_tokens[v_i], p_sleep_seqs[v_i], 'sleep',
                            p_sleep_until[v_i],
                            p_sleep_seconds[v_i] * interval '1 second') then
                v_outcomes[v_i] := 'sleeping';
            end if;
        end loop;
    end if;

    return query select * from unnest(p_run_ids, v_outcomes);
end;
$$;

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
    -- client: control runs (pgflow/client.py, pgflow/aio.py, the CLI)
    ('definer', 'start',             '{pgflow_client}'),
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
    ('relation', 'waits',            '{pgflow_reader}'),
    ('relation', 'unserved_runs',    '{pgflow_reader}'),
    ('relation', 'patches_in_use',   '{pgflow_reader}')
$$;

select pgflow._secure();
