-- pgflow engine, revision 0015: a claim hands an ended run's queue slot to the next run,
-- and wakes idle workers only for the slots it leaves free.
--
-- A claim that gives back the slots of runs whose code returned (revision
-- 0014) woke the queue's idle workers whenever one had found the cap full
-- (queue_settings.starved), then took those slots itself. Woken for them,
-- a worker (most often the claiming one: it LISTENs too) claimed again,
-- found the cap full and marked the queue starved again, so the next such
-- claim woke it again: a NOTIFY, whose commit serializes with every other
-- notifying commit, and an empty claim for about every slot given back.
-- Now pgflow._give_back_slots returns the starved queues it freed slots of
-- and, asked to (p_wake => false), leaves waking them to its caller, and
-- claim_runs wakes those whose slots it left free.
--
-- Under queue caps alone the claim also hands the ended runs' queue slots
-- straight to the runs it takes (_claim_capped's p_handed): each slot is
-- updated once instead of freed and taken again. _code_ended_runs (the
-- fencing of the ended runs) replaces _give_back_at_code_end.
--
-- Compatibility: claim_runs keeps its parameters and result; the callers of
-- _give_back_slots (the trigger runs_flow, complete_batch) and of
-- _claim_capped call them as before.

drop function pgflow._give_back_slots(uuid[]);
drop function pgflow._give_back_at_code_end(uuid, uuid[], bigint[]);
drop function pgflow._claim_capped(text[], text[], text[], integer, timestamptz);

create function pgflow._claim_capped(
    p_queues   text[],
    p_names    text[],
    p_versions text[],
    p_limit    integer,
    p_now      timestamptz,
    p_handed   uuid[] default '{}',
    out chosen  uuid[],
    out slotted uuid[]
)
language plpgsql
as $$
declare
    v_capped text[] := '{}';
    v_slots  integer[];
    v_ids    uuid[];
    q        record;
begin
    chosen := '{}';
    slotted := '{}';
    for q in
        select u.queue, s.concurrency
        from pg_catalog.unnest(p_queues) as u(queue)
        left join pgflow.queue_settings s on s.name = u.queue
        where not coalesce(s.paused, false)
    loop
        exit when cardinality(chosen) >= p_limit;
        v_slots := null;  -- no cap: as many runs as the claim still wants
        if q.concurrency is not null then
            v_slots := '{}';
            if cardinality(p_handed) > 0
               and not exists (select 1 from pgflow.slots h
                               where h.scope = 'queue:' || q.queue and h.slot > q.concurrency
                                 and h.run_id is not null) then
                v_slots := array(
                    select f.slot from pgflow.slots f
                    where f.run_id = any (p_handed) and f.scope = 'queue:' || q.queue
                      and f.slot <= q.concurrency
                    order by f.slot
                    limit p_limit - cardinality(chosen)
                    for update);
            end if;
            v_slots := v_slots || array(
                select f.slot from pgflow.slots f
                where f.scope = 'queue:' || q.queue and f.run_id is null
                  and f.slot <= q.concurrency
                order by f.slot
                limit p_limit - cardinality(chosen) - cardinality(v_slots)
                for update skip locked);
            if cardinality(v_slots) = 0 then
                v_capped := v_capped || q.queue;
                continue;
            end if;
        end if;
        v_ids := array(
            select r.id
            from pgflow.runs r
            where r.status = 'pending'
              and r.held_by is null
              and r.queue = q.queue
              and r.available_at <= p_now
              and (r.name, r.version) in (select t.n, t.v
                                          from unnest(p_names, p_versions) as t(n, v))
            order by r.priority desc, r.available_at
            limit coalesce(cardinality(v_slots), p_limit - cardinality(chosen))
            for update skip locked);
        if q.concurrency is not null then
            update pgflow.slots f set run_id = t.id
            from unnest(v_slots[1:cardinality(v_ids)], v_ids) as t(slot, id)
            where f.scope = 'queue:' || q.queue and f.slot = t.slot;
            slotted := slotted || v_ids;
        end if;
        chosen := chosen || v_ids;
    end loop;
    perform pgflow._mark_starved(v_capped, chosen);
end;
$$;

create function pgflow._give_back_slots(p_run_ids uuid[], p_wake boolean default true)
returns text[]
language plpgsql
as $$
declare
    g         record;
    v_limit   integer;
    v_starved boolean;
    v_freed   integer;  -- slots of the scope that free capacity
    v_slot    integer;
    v_waiting text[] := '{}';  -- starved queues that got a slot back
begin
    for g in
        with held as (
            select s.scope, s.slot, s.run_id from pgflow.slots s
            where s.run_id = any (p_run_ids)
            for update
        ), freed as (  -- (RETURNING gives the new run_id, null: hence held)
            update pgflow.slots s set run_id = null
            from held h
            where s.scope = h.scope and s.slot = h.slot
            returning h.scope, h.slot, h.run_id
        )
        select f.scope, pg_catalog.array_agg(f.slot order by f.slot) as slots,
               min(r.queue) as queue, min(r.name) as name, min(r.version) as version
        from freed f
        join pgflow.runs r on r.id = f.run_id
        group by f.scope
        order by f.scope  -- one lock order
    loop
        v_starved := false;
        if g.scope like 'queue:%' then
            select q.concurrency, q.starved into v_limit, v_starved
            from pgflow.queue_settings q where q.name = g.queue;
        else
            select w.concurrency_limit into v_limit
            from pgflow.workflows w where w.name = g.name and w.version = g.version;
        end if;
        -- The limit was removed or lowered since the claim: these slots go.
        delete from pgflow.slots s
        where s.scope = g.scope and s.slot = any (g.slots)
          and (v_limit is null or s.slot > v_limit) and s.run_id is null;
        v_freed := (select count(*) from unnest(g.slots) x where x <= v_limit);
        continue when coalesce(v_freed, 0) = 0;
        if exists (select 1 from pgflow.slots h
                   where h.scope = g.scope and h.slot > v_limit and h.run_id is not null) then
            foreach v_slot in array g.slots loop
                continue when v_slot > v_limit;
                if pgflow._hand_down_slot(g.scope, v_slot, v_limit) then
                    v_freed := v_freed - 1;
                end if;
            end loop;
            continue when v_freed = 0;
        end if;

        if g.scope like 'queue:%' then
            if v_starved then
                v_waiting := v_waiting || g.queue;
                if p_wake then
                    perform pgflow._notify_ready(g.queue);  -- an idle worker waits for it
                end if;
            end if;
            continue;
        end if;
        if not pg_catalog.pg_try_advisory_xact_lock(7366505, pg_catalog.hashtext(g.scope)) then
            -- A claimer may be parking a run here right now: the leader looks
            -- again once it is done (see the header).
            insert into pgflow.scope_rechecks (scope, queued_at) values (g.scope, pgflow.now());
            perform pg_catalog.pg_notify('pgflow_timer', '');
            continue;
        end if;
        perform pgflow._unpark(g.scope, v_freed);
    end loop;
    return v_waiting;
end;
$$;

create function pgflow._code_ended_runs(p_worker_id uuid, p_runs uuid[], p_tokens bigint[])
returns uuid[]
language plpgsql  -- not sql: PL/pgSQL keeps the statement's plan from call to call
as $$
declare
    v_ended uuid[];
begin
    with ended as (
        select r.id from pgflow.runs r
        join unnest(p_runs, p_tokens) as t(id, token)
          on r.id = t.id and r.lease_token = t.token
        where r.status = 'running' and r.lease_owner = p_worker_id and r.holds_slots
        for update of r skip locked
    ), cleared as (
        update pgflow.runs r set holds_slots = false
        from ended e
        where r.id = e.id
        returning r.id
    )
    select coalesce(pg_catalog.array_agg(c.id), '{}') into v_ended from cleared c;
    return v_ended;
end;
$$;

create or replace function pgflow.claim_runs(
    p_worker_id uuid,
    p_queues    text[],
    p_names     text[],
    p_versions  text[],
    p_limit     integer,
    p_ended        uuid[] default null,
    p_ended_tokens bigint[] default null
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
    v_ended           uuid[] := '{}';  -- p_ended, fenced: their slots go back in this claim
    v_hand_on         boolean;  -- caps and pauses only: _claim_capped hands v_ended's slots on
    v_starved         text[];   -- of p_queues, those an idle worker waits for (queue_settings.starved)
    v_waiting         text[] := '{}';  -- capped queues given slots back that a worker waits for
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
                   where w.concurrency_limit is not null),
           coalesce(pg_catalog.array_agg(s.name) filter (where s.starved), '{}')
    into v_registered, v_now, v_queue_limits, v_rates, v_workflow_limits, v_starved
    from pgflow.queue_settings s  -- aggregates: one row, also when none matches
    where s.name = any (p_queues);
    if not v_registered then
        raise exception using errcode = 'PF003',
            message = format('worker %s is not registered (declared dead?)', p_worker_id);
    end if;
    if p_ended is not null then
        v_ended := pgflow._code_ended_runs(p_worker_id, p_ended, p_ended_tokens);
    end if;
    -- Caps and pauses only: the claim hands the ended runs' queue slots on
    -- (_claim_capped) and gives back the rest after it. Else they all go back
    -- first, and the claim may take them.
    v_hand_on := v_queue_limits and not (v_workflow_limits or v_rates);
    if cardinality(v_ended) > 0 and not v_hand_on then
        v_waiting := pgflow._give_back_slots(v_ended, p_wake => false);
    end if;

    if v_workflow_limits or v_rates then
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_under_limits(p_queues, p_names, p_versions, p_limit, v_now) l;
    elsif v_hand_on then
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_capped(p_queues, p_names, p_versions, p_limit, v_now, v_ended) l;
        if cardinality(v_ended) > 0 then
            -- A run taken from a starved queue cleared its mark
            -- (_mark_starved): the queues starved before count as waiting too.
            v_waiting := v_starved || pgflow._give_back_slots(v_ended, p_wake => false);
        end if;
    end if;
    if cardinality(v_waiting) > 0 then
        perform pgflow._notify_ready(w.queue)
        from (select distinct u.queue from pg_catalog.unnest(v_waiting) as u(queue)) w
        join pgflow.queue_settings s on s.name = w.queue
        where exists (select 1 from pgflow.slots f
                      where f.scope = 'queue:' || w.queue and f.run_id is null
                        and f.slot <= s.concurrency);
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
