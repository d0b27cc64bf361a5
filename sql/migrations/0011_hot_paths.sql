-- pgflow engine, revision 0011: a cheaper claim and a cheaper start (hot paths).
--
-- Changes, all bodies only (same signatures, results and behaviour; workers
-- of every revision since 0.1.0 keep running):
-- - pgflow.claim_runs: its checks, clock and flow-control probes are one
--   statement instead of four, and without limits the choice of runs and
--   their update are one statement instead of two. On an idle worker the
--   claim is most of the time from a start's commit to its step running
--   (W3, bench/README.md).
-- - pgflow.now(): PL/pgSQL instead of SQL. A SQL function that reads a table
--   is never inlined, and called from a procedure it was parsed and planned
--   again on every call; PL/pgSQL keeps its plan. Every procedure calls it.
-- - pgflow.start, pgflow.start_run: PL/pgSQL instead of SQL, for the same
--   reason (a security definer SQL function is never inlined either).
-- - pgflow._check_input: an array input that binds is recognised in
--   expressions, without running a statement; the full check (and its
--   messages) runs only for the others.
-- - pgflow._start: its argument checks in two statements instead of eight
--   (same checks, same order, same errors).

create or replace function pgflow.now() returns timestamptz
language plpgsql stable
as $$
begin
    return pg_catalog.statement_timestamp() + (select c.offset_by from pgflow.clock c);
end;
$$;

create or replace function pgflow._check_input(p_name text, p_version text, p_params jsonb, p_input jsonb)
returns void
language plpgsql immutable
as $$
declare
    v_positional text[];   -- what a JSON array fills, in order
    v_named      text[];   -- what a JSON object may name
    v_required   text[];
    v_var_args   boolean;
    v_var_kwargs boolean;
    v_given      integer;
    v_filled     integer;  -- positional parameters (what an array can fill)
    v_bad        text[];
    v_what       text;
begin
    if p_params is null then
        return;
    end if;
    -- The common case, an array that binds, in expressions PL/pgSQL evaluates
    -- without running a statement (the checks below cost 30-60 us a start):
    -- no more arguments than positional parameters (unless *args), and no
    -- required parameter after the positional ones given. Positional
    -- parameters come first in a signature, so the required ones from position
    -- least(given, positional) on are exactly those missing (keyword-only ones
    -- cannot be given in an array). tests/properties/test_input_binding.py
    -- compares both paths with Python's Signature.bind.
    if pg_catalog.jsonb_typeof(p_input) = 'array' then
        v_given := pg_catalog.jsonb_array_length(p_input);
        v_filled := pg_catalog.jsonb_array_length(pg_catalog.jsonb_path_query_array(
            p_params, '$[*] ? (@.kind == "positional_only" || @.kind == "positional")'));
        if (v_given <= v_filled
            or pg_catalog.jsonb_path_exists(p_params, '$[*] ? (@.kind == "var_positional")'))
           and not pg_catalog.jsonb_path_exists(
                   p_params, '$[$filled to last] ? (@.required == true)',
                   pg_catalog.jsonb_build_object('filled', least(v_given, v_filled))) then
            return;
        end if;
    end if;
    -- Otherwise find out exactly what is wrong (or that an object binds).
    v_what := pg_catalog.format('workflow %L (version %L)', p_name, p_version);
    select coalesce(array_agg(a.p ->> 'name' order by a.i)
                        filter (where a.p ->> 'kind' in ('positional_only', 'positional')), '{}'),
           coalesce(array_agg(a.p ->> 'name' order by a.i)
                        filter (where a.p ->> 'kind' in ('positional', 'keyword_only')), '{}'),
           coalesce(array_agg(a.p ->> 'name' order by a.i)
                        filter (where (a.p ->> 'required')::boolean), '{}'),
           coalesce(bool_or(a.p ->> 'kind' = 'var_positional'), false),
           coalesce(bool_or(a.p ->> 'kind' = 'var_keyword'), false)
    into v_positional, v_named, v_required, v_var_args, v_var_kwargs
    from jsonb_array_elements(p_params) with ordinality as a(p, i);

    if jsonb_typeof(p_input) = 'array' then
        v_given := jsonb_array_length(p_input);
        if v_given > cardinality(v_positional) and not v_var_args then
            raise exception using errcode = 'PF002',
                message = pg_catalog.format('%s takes %s positional argument(s)%s, got %s',
                    v_what, cardinality(v_positional),
                    coalesce(' (' || pg_catalog.array_to_string(v_positional, ', ') || ')', ''),
                    v_given);
        end if;
        v_bad := array(select r from unnest(v_required) r
                       where not r = any(v_positional[1:v_given]));
    else
        if not v_var_kwargs then
            v_bad := array(select k from jsonb_object_keys(p_input) k
                           where not k = any(v_named) order by k);
            if cardinality(v_bad) > 0 then
                raise exception using errcode = 'PF002',
                    message = pg_catalog.format('%s has no parameter %s (its parameters: %s)',
                        v_what, pg_catalog.array_to_string(v_bad, ', '),
                        coalesce(nullif(pg_catalog.array_to_string(v_named, ', '), ''), 'none'));
            end if;
        end if;
        v_bad := array(select r from unnest(v_required) r
                       where not (r = any(v_named) and p_input ? r));
    end if;
    if cardinality(v_bad) > 0 then
        raise exception using errcode = 'PF002',
            message = pg_catalog.format('%s is missing required argument(s) %s', v_what,
                                        pg_catalog.array_to_string(v_bad, ', '));
    end if;
end;
$$;

create or replace function pgflow._start(
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
    -- One statement for the rest of the checks, in this order (a statement
    -- each cost 30 us a start).
    perform pgflow._check_payload(_start.input, format('the input of workflow %L', _start.name)),
            case when _start.key is not null then pgflow._check_key(_start.key, 'key') end,
            case when _start.queue is not null then pgflow._check_name(_start.queue, 'queue') end,
            case when _start.version is not null
                 then pgflow._check_name(_start.version, 'version') end,
            case when v_ckey is not null then pgflow._check_key(v_ckey, 'concurrency key') end,
            pgflow._check_span(_start.delay, 'delay', true),
            pgflow._check_span(_start.timeout, 'timeout', false);

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

create or replace function pgflow.start(
    name     text,
    input    jsonb default '[]'::jsonb,
    key      text default null,
    queue    text default null,
    priority integer default 0,
    delay    interval default null,
    version  text default null,
    timeout  interval default null
) returns uuid
language plpgsql
as $$
begin
    return pgflow._start(start.name, start.input, start.key, start.queue, start.priority,
                         start.delay, start.version, null, start.timeout);
end;
$$;

create or replace function pgflow.start_run(
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
language plpgsql
as $$
begin
    return pgflow._start(start_run.name, start_run.input, start_run.key, start_run.queue,
                         start_run.priority, start_run.delay, start_run.version, null,
                         start_run.timeout, null, null, start_run.concurrency_key,
                         start_run.traceparent);
end;
$$;

create or replace function pgflow.claim_runs(
    p_worker_id uuid,
    p_queues    text[],
    p_names     text[],
    p_versions  text[],
    p_limit     integer
) returns table (run_id uuid, name text, version text, input jsonb, lease_token bigint,
                 journal jsonb, cancel_requested boolean, cancel_seq integer,
                 scheduled_time timestamptz, ready_since timestamptz, limited boolean,
                 traceparent text, claimed_at timestamptz, queue text)
language plpgsql
-- One plan for the life of the connection: left to choose, PL/pgSQL re-plans
-- this statement on every call (its array parameters make each custom plan
-- look cheaper), which cost 0.3 ms a call, half the claim (measured). The
-- generic plan walks the same indexes (tests/sql/test_sql_procedures.py).
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_now             timestamptz;
    v_registered      boolean;
    v_chosen          uuid[];   -- chosen under limits; null: no limit concerns this claim
    v_slotted         uuid[] := '{}';  -- the chosen runs that took concurrency slots
    v_queue_limits    boolean;  -- a cap, rate or pause on one of p_queues
    v_rates           boolean;
    v_workflow_limits boolean;  -- a Concurrency on one of the worker's workflows
begin
    if p_limit is null or p_limit < 1 then
        raise exception using errcode = 'PF002', message = 'claim limit must be at least 1';
    end if;
    -- One statement for the checks, the clock and the flow-control probes
    -- (13_flow_control.sql: only where a limit or a pause concerns this
    -- worker), and one for the claim itself: on an idle worker the claim is
    -- most of the time from a start's commit to its step running, and each
    -- statement of a function costs its own executor start (W3,
    -- bench/README.md). pgflow.now() is spelled out for the same reason.
    select exists (select 1 from pgflow.workers w where w.id = p_worker_id),
           pg_catalog.statement_timestamp() + (select c.offset_by from pgflow.clock c),
           coalesce(bool_or(s.paused or s.concurrency is not null or s.rate_limit is not null),
                    false),
           coalesce(bool_or(s.rate_limit is not null), false),
           exists (select 1 from pgflow.workflows w
                   join unnest(p_names, p_versions) as t(n, v)
                     on w.name = t.n and w.version = t.v
                   where w.concurrency_limit is not null)
    into v_registered, v_now, v_queue_limits, v_rates, v_workflow_limits
    from pgflow.queue_settings s  -- aggregates: one row, also when none matches
    where s.name = any (p_queues);
    if not v_registered then
        raise exception using errcode = 'PF003',
            message = format('worker %s is not registered (declared dead?)', p_worker_id);
    end if;

    if v_workflow_limits or v_rates then
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_under_limits(p_queues, p_names, p_versions, p_limit, v_now) l;
    elsif v_queue_limits then  -- caps and pauses only
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_capped(p_queues, p_names, p_versions, p_limit, v_now) l;
    end if;

    -- Without limits the runs are chosen here: one ordered walk of
    -- runs_claimable per queue (an `= any(queues)` filter would read and
    -- sort every ready run of those queues on each claim), then the best
    -- p_limit of the per-queue candidates. Candidates beyond p_limit stay
    -- locked until this statement's transaction ends, which only makes other
    -- claimers skip them for that instant. Under limits v_chosen is set and
    -- the candidates are never read (coalesce stops at it).
    return query
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
    ),
    claimed as (
        update pgflow.runs r
        set status = 'running', lease_owner = p_worker_id, lease_token = r.lease_token + 1,
            started_at = coalesce(r.started_at, v_now), holds_slots = r.id = any (v_slotted)
        where r.id = any (coalesce(v_chosen, array(select d.id from candidates d)))
        returning r.id, r.name, r.version, r.input, r.lease_token, r.cancel_requested,
                  r.cancel_seq, r.scheduled_time, r.available_at, r.holds_slots, r.traceparent,
                  r.queue
    )
    select c.id, c.name, c.version, c.input, c.lease_token,
           coalesce((select jsonb_agg(jsonb_build_object(
                                 'seq', s.seq, 'name', s.name, 'kind', s.kind, 'status', s.status,
                                 'attempts', s.attempts, 'output', s.output, 'error', s.error)
                             order by s.seq)
                     from pgflow.steps s where s.run_id = c.id),
                    '[]'::jsonb),
           c.cancel_requested, c.cancel_seq, c.scheduled_time, c.available_at, c.holds_slots,
           c.traceparent, v_now, c.queue
    from claimed c;
end;
$$;

select pgflow._secure();
