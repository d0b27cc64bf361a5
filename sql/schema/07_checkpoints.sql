-- ---------------------------------------------------------------------------
-- Reporting (fenced by lease token)
-- ---------------------------------------------------------------------------

-- Checkpoint a step's result. p_duration is the step's run time measured by
-- the worker's monotonic clock; both timestamps come from the engine clock.
-- Returns whether cancellation was requested meanwhile.
create function pgflow.complete_step(
    p_run_id      uuid,
    p_lease_token bigint,
    p_seq         integer,
    p_name        text,
    p_kind        text,
    p_output      jsonb,
    p_duration    interval
) returns boolean
language plpgsql
as $$
declare
    v_outcome text;
begin
    -- A batch of one: complete_batch is the one place a checkpoint is written.
    select b.outcome into v_outcome
    from pgflow.complete_batch(array[p_run_id], array[p_lease_token], array[p_seq],
                               array[p_name], array[p_kind], array[p_output],
                               array[extract(epoch from p_duration)::double precision],
                               array[false], array[null::jsonb]) as b;
    perform pgflow._refused(v_outcome, p_run_id, p_lease_token,
                            format('step %s (%s)', p_seq, p_name));
    return v_outcome = 'cancel';  -- the worker raises pgflow.Cancelled at the next durable point
end;
$$;

-- Record a failed attempt of a step (kept in step_attempts). If the policy
-- allows another attempt, the step is marked retrying and the run sleeps on
-- a retry timer for the back-off delay (p_initial * p_backoff^(attempts-1),
-- capped at p_max): outcome 'retry'. Otherwise the step is failed and the run stays leased so
-- the workflow can handle pgflow.StepFailed: outcome 'failed'.
create function pgflow.fail_step(
    p_run_id       uuid,
    p_lease_token  bigint,
    p_seq          integer,
    p_name         text,
    p_kind         text,
    p_error        jsonb,
    p_duration     interval,
    p_retryable    boolean,
    p_max_attempts integer,
    p_initial      interval,
    p_backoff      double precision,
    p_max          interval,
    out outcome    text,
    out attempts   integer,
    out retry_at   timestamptz
)
language plpgsql
as $$
#variable_conflict use_column
declare
    v_now   timestamptz := pgflow.now();
    v_run   pgflow.runs;
    v_delay interval;
begin
    perform pgflow._lock_run(p_run_id);
    v_run := pgflow._check_lease(p_run_id, p_lease_token);
    p_error := pgflow._bounded_error(p_error);  -- never refuse a failure: cut it to size

    insert into pgflow.steps as s (run_id, seq, name, kind, status, attempts, error,
                                   started_at, finished_at)
    values (p_run_id, p_seq, p_name, p_kind, 'failed', 1, p_error, v_now - p_duration, v_now)
    on conflict (run_id, seq) do update
        set attempts = s.attempts + 1, error = excluded.error,
            started_at = excluded.started_at, finished_at = excluded.finished_at
        where s.status = 'retrying' and s.name = excluded.name
    returning s.attempts into fail_step.attempts;
    if not found then
        raise exception using errcode = 'PF004',
            message = format('step %s (%s) of run %s is already recorded', p_seq, p_name, p_run_id);
    end if;

    insert into pgflow.step_attempts (run_id, seq, attempt, error, started_at, finished_at)
    values (p_run_id, p_seq, fail_step.attempts, p_error, v_now - p_duration, v_now);

    if p_retryable and fail_step.attempts < p_max_attempts then
        v_delay := pgflow._backoff(p_initial, p_backoff, p_max, fail_step.attempts);
        outcome := 'retry';
        retry_at := v_now + v_delay;
        update pgflow.steps s set status = 'retrying'
        where s.run_id = p_run_id and s.seq = p_seq;
        update pgflow.runs r set status = 'sleeping', lease_owner = null
        where r.id = p_run_id;
        perform pgflow._add_timer(p_run_id, 'retry', p_seq, fail_step.retry_at);
    else
        outcome := 'failed';
        update pgflow.steps s set status = 'failed'
        where s.run_id = p_run_id and s.seq = p_seq;
    end if;
end;
$$;

-- The wait after failed attempt n: initial * backoff^(n-1), capped at p_max.
-- Compared in log space, so a large n cannot overflow the interval type.
create function pgflow._backoff(p_initial interval, p_backoff double precision,
                                p_max interval, p_attempt integer) returns interval
language plpgsql immutable
as $$
declare
    v_initial double precision := extract(epoch from p_initial);
    v_max     double precision := extract(epoch from p_max);
begin
    if v_initial <= 0 or v_max <= v_initial or p_backoff <= 1 then
        return least(p_initial, p_max);
    end if;
    if (p_attempt - 1) * ln(p_backoff) >= ln(v_max / v_initial) then
        return p_max;
    end if;
    return v_initial * power(p_backoff, p_attempt - 1) * interval '1 second';
end;
$$;

-- The workflow returned: the run is completed with its output. p_step, if
-- given ({seq, name, kind, output, duration_s}), is the checkpoint of the
-- step that ended the workflow, recorded in the same transaction: a one-step
-- run costs one report, not two.
create function pgflow.complete_run(p_run_id uuid, p_lease_token bigint, p_output jsonb,
                                    p_step jsonb default null)
returns void
language plpgsql
as $$
declare
    v_outcome text;
begin
    -- A batch of one, as complete_step.
    select b.outcome into v_outcome
    from pgflow.complete_batch(array[p_run_id], array[p_lease_token],
                               array[(p_step ->> 'seq')::integer], array[p_step ->> 'name'],
                               array[p_step ->> 'kind'], array[p_step -> 'output'],
                               array[(p_step ->> 'duration_s')::double precision],
                               array[true], array[coalesce(p_output, 'null'::jsonb)]) as b;
    perform pgflow._refused(v_outcome, p_run_id, p_lease_token,
                            format('step %s (%s)', p_step ->> 'seq', p_step ->> 'name'));
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
create function pgflow.complete_batch(
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
    v_slotted  uuid[];   -- finished runs that held concurrency slots
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
               coalesce(r.cancel_requested, false) as cancel_requested,
               coalesce(r.holds_slots, false) as holds_slots
        from report b
        left join lateral (
            select r.id, r.status, r.lease_token, r.cancel_requested, r.holds_slots
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
        -- holds_slots cleared here: the batch's slots go back below, in one
        -- statement, not through the trigger runs_flow run by run.
        update pgflow.runs r
        set status = 'completed', output = coalesce(f.result, 'null'::jsonb), error = null,
            finished_at = v_now, lease_owner = null, holds_slots = false
        from fenced f
        where r.id = f.id and f.leased and f.finish
          and (f.seq is null or f.id in (select d.run_id from recorded d))
        returning r.id, r.watched, r.parent_id, f.holds_slots
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
           (select pg_catalog.array_agg(e.id) from finished e where e.parent_id is not null),
           (select pg_catalog.array_agg(e.id) from finished e where e.holds_slots)
    into v_outcomes, v_finished, v_watched, v_children, v_slotted
    from fenced f;

    -- What complete_run does after the update, for the runs completed here.
    if v_finished is not null then
        delete from pgflow.timers t where t.run_id = any (v_finished);
        perform pg_catalog.pg_notify('pgflow_done', w::text)
        from pg_catalog.unnest(v_watched) as w;
        perform pgflow._child_finished(c) from pg_catalog.unnest(v_children) as c;
        if v_slotted is not null then
            perform pgflow._give_back_slots(v_slotted);  -- 13_flow_control.sql
        end if;
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

-- The workflow raised: the run is failed with the error.
create function pgflow.fail_run(p_run_id uuid, p_lease_token bigint, p_error jsonb)
returns void
language plpgsql
as $$
begin
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    update pgflow.runs r
    set status = 'failed', error = pgflow._bounded_error(p_error), finished_at = pgflow.now(),
        lease_owner = null
    where r.id = p_run_id;
    delete from pgflow.timers t where t.run_id = p_run_id;
    perform pgflow._notify_done(p_run_id);
    perform pgflow._child_finished(p_run_id);
end;
$$;

-- Give a running run back, unfinished, so another worker continues it from
-- its last checkpoint (a draining worker does this between steps).
create function pgflow.release_run(p_run_id uuid, p_lease_token bigint) returns void
language plpgsql
as $$
declare
    v_run pgflow.runs;
begin
    perform pgflow._lock_run(p_run_id);
    v_run := pgflow._check_lease(p_run_id, p_lease_token);
    update pgflow.runs r
    set status = 'pending', lease_owner = null, available_at = pgflow.now()
    where r.id = p_run_id;
    perform pgflow._notify_ready(v_run.queue);
end;
$$;
