-- ---------------------------------------------------------------------------
-- Claiming
-- ---------------------------------------------------------------------------

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
-- (claimed_at - ready_since is the claim delay the worker's metrics show, by
-- the run's queue).
--
-- p_ended, p_ended_tokens (revision 0014): runs of this worker whose code
-- has returned since its last claim, their completion not sent yet. They
-- execute no more, so their concurrency slots go back in this claim, fenced
-- by their tokens (_code_ended_runs), and this claim may take them: a cap of
-- L keeps L runs executing instead of L runs not yet committed. Under queue
-- caps alone the claim hands their queue slots straight to the runs it takes
-- (_claim_capped) and gives back the rest after; else it gives them all back
-- first. A freed queue slot that an idle worker waits for
-- (queue_settings.starved) wakes it only if this claim leaves the slot free
-- (revision 0015): woken for a slot taken here, that worker (this one,
-- often) would claim and find the cap full.
create function pgflow.claim_runs(
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

-- The claim of workers of release 0.1.0 (revision 0006), kept for them until
-- the next release: claim_runs without its newer columns.
create function pgflow.claim(
    p_worker_id uuid,
    p_queues    text[],
    p_names     text[],
    p_versions  text[],
    p_limit     integer
) returns table (run_id uuid, name text, version text, input jsonb, lease_token bigint,
                 journal jsonb, cancel_requested boolean, cancel_seq integer)
language sql
as $$
    select c.run_id, c.name, c.version, c.input, c.lease_token, c.journal, c.cancel_requested,
           c.cancel_seq
    from pgflow.claim_runs(p_worker_id, p_queues, p_names, p_versions, p_limit) c
$$;

-- A worker about to wait for a NOTIFY guards its wake-ups: it takes every
-- wake stripe of its queues in share mode, on its claim connection (session
-- locks: waiting workers do not block each other), then claims once more
-- before it waits. A transaction that makes a run of one of these queues
-- ready from then on cannot take its stripe, and NOTIFYs (_notify_ready).
--
-- A stripe held by such a transaction is waited for, up to p_wait: it is
-- given back when that transaction ends, usually within a millisecond, and
-- the next start on the same connection finds the guard queued first, and
-- NOTIFYs. A stripe still held after p_wait (a transaction that made a run
-- ready is still open) is left for the next call, and the others are kept:
-- starts on them NOTIFY already. Returns whether every stripe is held; until
-- then the worker polls shortly and calls again. The stripes held are the
-- session's setting pgflow.wake_guards (a list of keys): each is taken once.
create function pgflow.guard_wakes(p_queues text[], p_wait interval default interval '20 ms')
returns boolean
language plpgsql
as $$
declare
    v_held  integer[] := pg_catalog.string_to_array(
                             pg_catalog.current_setting('pgflow.wake_guards', true), ',')::integer[];
    v_keys  integer[] := array(select distinct pgflow._wake_stripe(q, s)
                               from pg_catalog.unnest(p_queues) q,
                                    pg_catalog.generate_series(0, 7) s);
    v_before integer[];
    v_key   integer;
    v_lock_timeout text := pg_catalog.current_setting('lock_timeout');
begin
    v_held := coalesce(v_held, '{}');
    v_before := v_held;
    begin
        foreach v_key in array v_keys loop
            continue when v_key = any (v_held);
            if pg_catalog.pg_try_advisory_lock_shared(7366506, v_key) then
                v_held := v_held || v_key;
            elsif p_wait > interval '0' then
                begin  -- a subtransaction: a lock timeout ends it, not the call
                    perform pg_catalog.set_config(
                        'lock_timeout',
                        pg_catalog.ceil(extract(epoch from p_wait) * 1000)::integer || 'ms',
                        true);
                    perform pg_catalog.pg_advisory_lock_shared(7366506, v_key);
                    v_held := v_held || v_key;
                exception when lock_not_available then
                    null;  -- still held: the next call tries again
                end;
            end if;
        end loop;
    exception when others then
        -- Out of shared memory (the lock table is full), say. Session locks
        -- outlive the error: give back what this call took, so that the
        -- setting still names every stripe held, then fail.
        perform pg_catalog.pg_advisory_unlock_shared(7366506, k)
        from pg_catalog.unnest(v_held) k
        where not k = any (v_before);
        raise;
    end;
    perform pg_catalog.set_config('lock_timeout', v_lock_timeout, true);
    perform pg_catalog.set_config('pgflow.wake_guards', pg_catalog.array_to_string(v_held, ','),
                                  false);
    return v_keys <@ v_held;
end;
$$;

-- The worker has work again (its slots are full, or its claims come back
-- full): starts no longer need to wake it. Gives back what guard_wakes took.
create function pgflow.unguard_wakes() returns void
language plpgsql
as $$
begin
    perform pg_catalog.pg_advisory_unlock_shared(7366506, k::integer)
    from pg_catalog.unnest(pg_catalog.string_to_array(
             pg_catalog.current_setting('pgflow.wake_guards', true), ',')) k;
    perform pg_catalog.set_config('pgflow.wake_guards', '', false);
end;
$$;
