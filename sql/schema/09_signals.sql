-- ---------------------------------------------------------------------------
-- Interaction: signals, published state, cancellation
-- ---------------------------------------------------------------------------
--
-- Parent and child runs: a finishing child locks its parent's run *row*
-- (FOR UPDATE), never the parent's advisory lock; every procedure that makes
-- a parent wait locks the parent's row first; cancel cascades to children
-- before it touches the parent's row. So a child's wake-up can neither be
-- lost nor deadlock with its parent.

-- A suspended run becomes claimable again (woken by a signal, a child, a
-- timer, or a cancel).
create function pgflow._wake(p_run_id uuid) returns void
language plpgsql
as $$
declare
    v_queue text;
begin
    update pgflow.runs r set status = 'pending', available_at = pgflow.now()
    where r.id = p_run_id and r.status in ('sleeping', 'waiting')
    returning r.queue into v_queue;
    if found then
        perform pgflow._notify_ready(v_queue);
    end if;
end;
$$;

-- Send signal `name` to a run. It waits in the run's mailbox until a
-- ctx.wait_for_signal(name) takes it, oldest first; if the run waits for it
-- now, it is delivered in this transaction and the run woken. Sending to a
-- finished run is an error (PF006): nobody would ever read it.
create function pgflow.signal(run_id uuid, name text, payload jsonb default 'null'::jsonb)
returns void
language plpgsql
as $$
#variable_conflict use_column
declare
    v_run  pgflow.runs;
    v_wait pgflow.steps;
    v_id   bigint;
begin
    perform pgflow._check_name(signal.name, 'signal name');
    perform pgflow._check_payload(signal.payload, format('the payload of signal %L', signal.name));
    perform pgflow._lock_run(signal.run_id);
    select r.* into v_run from pgflow.runs r where r.id = signal.run_id;
    if not found then
        raise exception using errcode = 'PF404', message = format('unknown run %s', signal.run_id);
    end if;
    if v_run.status in ('completed', 'failed', 'cancelled') then
        raise exception using errcode = 'PF006',
            message = format('run %s is %s: it receives no more signals', signal.run_id, v_run.status);
    end if;

    insert into pgflow.signals (run_id, name, payload, sent_at)
    values (signal.run_id, signal.name, coalesce(signal.payload, 'null'::jsonb), pgflow.now())
    returning id into v_id;

    -- Deliver at once if the run waits for this signal and none older is queued.
    select s.* into v_wait from pgflow.steps s
    where s.run_id = signal.run_id and s.kind = 'signal' and s.name = signal.name
      and s.status = 'waiting';
    if found then
        perform pgflow._deliver_signal(signal.run_id, v_wait.seq, signal.name);
        perform pgflow._wake(signal.run_id);
    end if;
end;
$$;

-- Hand the oldest queued signal `name` to the wait at journal entry p_seq.
-- Returns false if the mailbox holds none. Call under the run's lock.
create function pgflow._deliver_signal(p_run_id uuid, p_seq integer, p_name text)
returns boolean
language plpgsql
as $$
declare
    v_signal pgflow.signals;
begin
    select g.* into v_signal from pgflow.signals g
    where g.run_id = p_run_id and g.name = p_name and g.consumed_seq is null
    order by g.id
    limit 1
    for update;
    if not found then
        return false;
    end if;
    update pgflow.signals g set consumed_seq = p_seq where g.id = v_signal.id;
    insert into pgflow.steps as s (run_id, seq, name, kind, status, attempts, output,
                                   started_at, finished_at)
    values (p_run_id, p_seq, p_name, 'signal', 'completed', 1,
            jsonb_build_object('payload', v_signal.payload), pgflow.now(), pgflow.now())
    on conflict (run_id, seq) do update
        set status = 'completed', output = excluded.output, finished_at = excluded.finished_at
        where s.status = 'waiting';
    delete from pgflow.timers t where t.run_id = p_run_id and t.kind = 'signal' and t.seq = p_seq;
    return true;
end;
$$;

-- ctx.wait_for_signal: take the oldest queued signal `name` (journal entry
-- p_seq, outcome 'received'), or suspend the run as waiting, with a timeout
-- timer if p_timeout is given (outcome 'waiting'). Idempotent at p_seq: a
-- wait already recorded returns its outcome ('received' or 'timed_out').
create function pgflow.wait_signal(
    p_run_id      uuid,
    p_lease_token bigint,
    p_seq         integer,
    p_name        text,
    p_timeout     interval,
    out outcome   text,
    out payload   jsonb
)
language plpgsql
as $$
declare
    v_step pgflow.steps;
begin
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    perform 1 from pgflow.runs r where r.id = p_run_id for update;

    v_step := pgflow._entry(p_run_id, p_seq, 'signal', p_name);
    if v_step.status = 'completed' then
        outcome := case when v_step.output ? 'timed_out' then 'timed_out' else 'received' end;
        payload := v_step.output -> 'payload';
        return;
    end if;

    if pgflow._deliver_signal(p_run_id, p_seq, p_name) then
        outcome := 'received';
        select s.output -> 'payload' into payload
        from pgflow.steps s where s.run_id = p_run_id and s.seq = p_seq;
        return;
    end if;

    if v_step.seq is null then
        insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                                  started_at, finished_at)
        values (p_run_id, p_seq, p_name, 'signal', 'waiting', 1,
                jsonb_build_object('timeout', p_timeout), pgflow.now(),
                pgflow.now() + coalesce(p_timeout, interval '0'));
        if p_timeout is not null then
            perform pgflow._add_timer(p_run_id, 'signal', p_seq, pgflow.now() + p_timeout);
        end if;
    end if;
    perform pgflow._suspend(p_run_id, 'waiting');
    outcome := 'waiting';
end;
$$;

-- ctx.set_state: publish a value under `key` for readers (pgflow.run_state).
-- Returns whether cancellation was requested.
create function pgflow.set_state(p_run_id uuid, p_lease_token bigint, p_key text, p_value jsonb)
returns boolean
language plpgsql
as $$
declare
    v_run pgflow.runs;
begin
    perform pgflow._check_key(p_key, 'state key');
    perform pgflow._check_payload(p_value, format('state %L', p_key));
    perform pgflow._lock_run(p_run_id);
    v_run := pgflow._check_lease(p_run_id, p_lease_token);
    insert into pgflow.run_state as s (run_id, key, value, updated_at)
    values (p_run_id, p_key, coalesce(p_value, 'null'::jsonb), pgflow.now())
    on conflict (run_id, key) do update set value = excluded.value, updated_at = excluded.updated_at;
    return v_run.cancel_requested;
end;
$$;

-- Cancel a run and, first, its unfinished children. A run that never ran
-- ends cancelled at once. Any other unfinished run is flagged: a running one
-- sees the flag in its next checkpoint's answer; a sleeping or waiting one
-- loses its timers (not its deadline) and is woken, so that pgflow.Cancelled
-- is raised at its next durable point and cleanup and sagas run. Returns
-- false if the run had already finished.
create function pgflow.cancel(run_id uuid) returns boolean
language plpgsql
as $$
#variable_conflict use_column
declare
    v_before pgflow.runs;
    v_run    pgflow.runs;
    v_child  uuid;
begin
    perform pgflow._lock_run(cancel.run_id);
    select r.* into v_before from pgflow.runs r where r.id = cancel.run_id;
    if not found then
        raise exception using errcode = 'PF404', message = format('unknown run %s', cancel.run_id);
    end if;
    if v_before.status in ('completed', 'failed', 'cancelled') then
        return false;
    end if;

    -- Children first (see the lock rule): take all their locks before cancelling
    -- any, so that no child's cancellation (which locks this run's row) waits
    -- on a sibling that is finishing and waiting for this run's row.
    perform pgflow._lock_run(c.id) from pgflow.runs c
    where c.parent_id = cancel.run_id and c.status not in ('completed', 'failed', 'cancelled')
    order by c.id;
    for v_child in
        select c.id from pgflow.runs c
        where c.parent_id = cancel.run_id and c.status not in ('completed', 'failed', 'cancelled')
        order by c.id
    loop
        perform pgflow.cancel(v_child);
    end loop;

    -- Now this run's row, locked: a claim may have taken it meanwhile.
    select r.* into v_run from pgflow.runs r where r.id = cancel.run_id for update;
    if v_run.status in ('completed', 'failed', 'cancelled') then
        return false;
    end if;

    if v_run.status in ('pending', 'sleeping')
       and not exists (select 1 from pgflow.steps s where s.run_id = cancel.run_id) then
        update pgflow.runs r
        set status = 'cancelled', cancel_requested = true, finished_at = pgflow.now(),
            lease_token = r.lease_token + 1
        where r.id = cancel.run_id;
        delete from pgflow.timers t where t.run_id = cancel.run_id;
        perform pgflow._notify_done(cancel.run_id);
        perform pgflow._child_finished(cancel.run_id);
        return true;
    end if;

    -- A suspended run is cancelled at the entry it waited on, even if that wait
    -- completed meanwhile (a child cancelled by the cascade above finishes it
    -- and wakes this run: hence the status from before the cascade).
    update pgflow.runs r
    set cancel_requested = true,
        cancel_seq = case when v_before.status in ('sleeping', 'waiting')
                               or r.status in ('sleeping', 'waiting')
                          then (select max(s.seq) from pgflow.steps s where s.run_id = r.id) end
    where r.id = cancel.run_id;
    delete from pgflow.timers t where t.run_id = cancel.run_id and t.kind <> 'deadline';
    perform pgflow._wake(cancel.run_id);
    if v_run.status = 'pending' then
        -- Its row is locked to this commit: claims made meanwhile skipped it
        -- (03_guards.sql, _notify_ready).
        perform pgflow._notify_ready(v_run.queue);
    end if;
    return true;
end;
$$;

-- The workflow let pgflow.Cancelled through: the run ends cancelled.
create function pgflow.cancel_run(p_run_id uuid, p_lease_token bigint) returns void
language plpgsql
as $$
begin
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    update pgflow.runs r
    set status = 'cancelled', finished_at = pgflow.now(), lease_owner = null
    where r.id = p_run_id;
    -- The entry it waited on (a signal, a child, a sleep, a back-off) ends with it,
    -- so the journal shows no wait of a finished run and no deadline as a duration.
    update pgflow.steps s
    set status = 'cancelled', finished_at = pgflow.now()
    where s.run_id = p_run_id and s.status in ('waiting', 'sleeping', 'retrying');
    delete from pgflow.timers t where t.run_id = p_run_id;
    perform pgflow._notify_done(p_run_id);
    perform pgflow._child_finished(p_run_id);
end;
$$;
