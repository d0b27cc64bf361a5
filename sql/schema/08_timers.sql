-- ---------------------------------------------------------------------------
-- Durable time: sleeps and timers
-- ---------------------------------------------------------------------------

-- Suspend a running run until p_until (else now + p_duration, engine clock).
-- The sleep is journal entry p_seq; a timer wakes the run. Returns true if
-- the run is now sleeping (the worker lets go of it), false if the time has
-- already come (the workflow goes on). Idempotent for a sleep already
-- recorded at p_seq, so a replay that meets it again re-suspends if needed.
create function pgflow.sleep(
    p_run_id      uuid,
    p_lease_token bigint,
    p_seq         integer,
    p_name        text,
    p_until       timestamptz,
    p_duration    interval default null
) returns boolean
language plpgsql
as $$
declare
    v_now   timestamptz := pgflow.now();
    v_until timestamptz := coalesce(p_until, v_now + p_duration);
    v_step  pgflow.steps;
begin
    if v_until is null then
        raise exception using errcode = 'PF002', message = 'sleep needs an end time or a duration';
    end if;
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);

    insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                              started_at, finished_at)
    values (p_run_id, p_seq, p_name, 'sleep',
            case when v_until <= v_now then 'completed' else 'sleeping' end, 1,
            jsonb_build_object('until', v_until), v_now, greatest(v_until, v_now))
    on conflict (run_id, seq) do nothing;

    v_step := pgflow._entry(p_run_id, p_seq, 'sleep', p_name);
    if v_step.status = 'completed' then
        return false;
    end if;

    perform pgflow._suspend(p_run_id, 'sleeping');
    if not exists (select 1 from pgflow.timers t
                   where t.run_id = p_run_id and t.kind = 'sleep' and t.seq = p_seq) then
        perform pgflow._add_timer(p_run_id, 'sleep', p_seq, (v_step.output ->> 'until')::timestamptz);
    end if;
    return true;
end;
$$;

-- Record a value the workflow must see identically on every replay
-- (ctx.now(), ctx.uuid4(), ctx.random()) as journal entry p_seq. For kind
-- 'now' the value is the engine clock's, never a worker's clock. Returns
-- what was recorded.
create function pgflow.record_value(
    p_run_id      uuid,
    p_lease_token bigint,
    p_seq         integer,
    p_kind        text,
    p_value       jsonb,
    p_name        text default null   -- the entry's name (a patch id); default: the kind
) returns jsonb
language plpgsql
as $$
declare
    v_now   timestamptz := pgflow.now();
    v_value jsonb := case when p_kind = 'now' then to_jsonb(v_now) else p_value end;
begin
    perform pgflow._check_payload(v_value, format('the recorded %s value', p_kind));
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                              started_at, finished_at)
    values (p_run_id, p_seq, coalesce(p_name, p_kind), p_kind, 'completed', 1,
            coalesce(v_value, 'null'::jsonb), v_now, v_now)
    on conflict (run_id, seq) do nothing;
    if not found then
        raise exception using errcode = 'PF004',
            message = format('journal entry %s of run %s is already recorded', p_seq, p_run_id);
    end if;
    return v_value;
end;
$$;

-- Wake the runs of up to p_limit due timers, earliest first: a finished
-- sleep is marked completed in the journal, the run becomes pending, and
-- its queue is notified. A timer whose run is locked by a transition in
-- progress is left for the next call (try-lock: the scheduler never waits
-- on a run, so it can never deadlock with one). Returns how many fired.
create function pgflow.fire_timers(p_limit integer default 1000) returns integer
language plpgsql
as $$
declare
    v_now    timestamptz := pgflow.now();
    v_runs   uuid[];
    v_kinds  text[];
    v_seqs   integer[];
    v_queues text[];
    v_expired uuid[];
    v_dues   timestamptz[];
begin
    if p_limit is null or p_limit < 1 then
        raise exception using errcode = 'PF002', message = 'fire_timers limit must be at least 1';
    end if;
    with due as materialized (
        select t.id, t.run_id
        from pgflow.timers t
        where t.due_at <= v_now
        order by t.due_at
        limit p_limit
        for update skip locked
    ), ours as materialized (
        select d.id from due d
        where pg_catalog.pg_try_advisory_xact_lock(7366503, pg_catalog.hashtext(d.run_id::text))
    ), fired as (
        delete from pgflow.timers t using ours o where t.id = o.id
        returning t.run_id, t.kind, t.seq, t.due_at
    )
    select coalesce(array_agg(f.run_id), '{}'), coalesce(array_agg(f.kind), '{}'),
           coalesce(array_agg(f.seq), '{}'), coalesce(array_agg(f.due_at), '{}')
    into v_runs, v_kinds, v_seqs, v_dues
    from fired f;

    if cardinality(v_runs) = 0 then
        return 0;
    end if;

    -- Deadlines: an unfinished run fails with WorkflowTimeout, whatever it was
    -- doing; bumping the lease token fences a worker still running it.
    with expired as (
        update pgflow.runs r
        set status = 'failed', finished_at = v_now, lease_owner = null,
            lease_token = r.lease_token + 1,
            error = jsonb_build_object(
                'type', 'pgflow.errors.WorkflowTimeout',
                'message', format('run did not finish within its timeout of %s', r.timeout),
                'traceback', null)
        from unnest(v_runs, v_kinds) as f(run_id, kind)
        where f.kind = 'deadline' and r.id = f.run_id
          and r.status not in ('completed', 'failed', 'cancelled')
        returning r.id
    ), cleared as (
        delete from pgflow.timers t using expired e where t.run_id = e.id
    )
    select coalesce(array_agg(e.id), '{}') into v_expired from expired e;
    perform pgflow._notify_done(x), pgflow._child_finished(x) from pg_catalog.unnest(v_expired) x;

    -- Signal waits that timed out: the wait is over, without a payload.
    update pgflow.steps s
    set status = 'completed', output = jsonb_build_object('timed_out', true), finished_at = v_now
    from unnest(v_runs, v_kinds, v_seqs) as f(run_id, kind, seq)
    where f.kind = 'signal' and s.run_id = f.run_id and s.seq = f.seq and s.status = 'waiting';

    update pgflow.steps s set status = 'completed', finished_at = v_now
    from unnest(v_runs, v_kinds, v_seqs) as f(run_id, kind, seq)
    where f.kind = 'sleep' and s.run_id = f.run_id and s.seq = f.seq and s.status = 'sleeping';

    -- available_at = when it was due, so a run woken late keeps its place in line.
    with woken as (
        update pgflow.runs r set status = 'pending', available_at = f.due_at
        from unnest(v_runs, v_dues, v_kinds) as f(run_id, due_at, kind)
        where r.id = f.run_id and f.kind <> 'deadline'
          and (r.status = 'sleeping' or (r.status = 'waiting' and f.kind = 'signal'))
        returning r.queue
    )
    select coalesce(array_agg(distinct w.queue), '{}') into v_queues from woken w;

    perform pgflow._notify_ready(q) from pg_catalog.unnest(v_queues) q;
    return cardinality(v_runs);
end;
$$;

-- Seconds from now (engine clock) until the earliest timer; null if none.
-- The scheduler sleeps that long unless pgflow_timer wakes it earlier.
create function pgflow.next_timer_in() returns double precision
language sql stable
as $$
    select extract(epoch from min(t.due_at) - pgflow.now()) from pgflow.timers t
$$;

-- Tests: move the engine clock forward by p_delta and fire every timer that
-- came due, in the caller's transaction. Returns how many fired.
create function pgflow.advance_time(p_delta interval) returns integer
language plpgsql
as $$
declare
    v_total integer := 0;
    v_fired integer;
begin
    if p_delta is null or p_delta < interval '0' then
        raise exception using errcode = 'PF002', message = 'the clock only moves forward';
    end if;
    update pgflow.clock set offset_by = offset_by + p_delta;
    -- Until a batch fires nothing: a timer skipped because its run was locked
    -- still used a slot of its batch, so a short batch does not mean "done".
    loop
        v_fired := pgflow.fire_timers(1000);
        v_total := v_total + v_fired;
        exit when v_fired = 0;
    end loop;
    perform pg_catalog.pg_notify('pgflow_timer', '');  -- the scheduler recomputes its sleep
    return v_total;
end;
$$;

-- Set the engine clock's offset (default: none, the real clock); returns the
-- offset it replaced. The scheduler recomputes its sleep on pgflow_timer.
create function pgflow.reset_time(p_offset interval default interval '0') returns interval
language plpgsql
as $$
declare
    v_before interval;
begin
    if p_offset is null then
        raise exception using errcode = 'PF002', message = 'the clock offset must not be null';
    end if;
    perform pgflow._check_span(p_offset, 'the clock offset', true);
    select c.offset_by into v_before from pgflow.clock c for update;
    update pgflow.clock set offset_by = p_offset;
    perform pg_catalog.pg_notify('pgflow_timer', '');
    return v_before;
end;
$$;
