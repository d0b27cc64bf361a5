-- pgflow engine, revision 0014 undone: slots go back with completions only.

drop function pgflow.claim_runs(uuid, text[], text[], text[], integer, uuid[], bigint[]);
drop function pgflow._give_back_at_code_end(uuid, uuid[], bigint[]);

create function pgflow.claim_runs(
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
