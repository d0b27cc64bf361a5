-- ---------------------------------------------------------------------------
-- Internal helpers
-- ---------------------------------------------------------------------------

-- Serialize transitions of one run (two-key advisory lock, transaction scope).
create function pgflow._lock_run(p_run_id uuid) returns void
language sql
as $$
    select pg_catalog.pg_advisory_xact_lock(7366503, pg_catalog.hashtext(p_run_id::text))
$$;

-- The fence: the run must be running under exactly this lease token.
-- Call with the run's advisory lock held.
create function pgflow._check_lease(p_run_id uuid, p_lease_token bigint)
returns pgflow.runs
language plpgsql
as $$
declare
    v_run pgflow.runs;
begin
    select r.* into v_run from pgflow.runs r where r.id = p_run_id;
    if not found then
        raise exception using errcode = 'PF404', message = format('unknown run %s', p_run_id);
    end if;
    if v_run.status <> 'running' or v_run.lease_token <> p_lease_token then
        raise exception using
            errcode = 'PF001',
            message = format('lease lost on run %s: token %s is not current (run is %s under token %s)',
                             p_run_id, p_lease_token, v_run.status, v_run.lease_token);
    end if;
    return v_run;
end;
$$;

-- The error for a report complete_batch refused (its outcome), as the
-- single-run procedures raise it: PF404 / PF001 from _check_lease (with the
-- run's current state), PF004 for a step already recorded. Call it in the
-- transaction of that batch, which still holds the run's lock.
create function pgflow._refused(p_outcome text, p_run_id uuid, p_lease_token bigint,
                                p_what text)
returns void
language plpgsql
as $$
begin
    if p_outcome in ('unknown', 'lease_lost') then
        perform pgflow._check_lease(p_run_id, p_lease_token);
        raise exception using errcode = 'PF001',
            message = format('lease lost on run %s: token %s is not current', p_run_id, p_lease_token);
    elsif p_outcome = 'duplicate' then
        raise exception using errcode = 'PF004',
            message = format('%s of run %s is already recorded', p_what, p_run_id);
    end if;
end;
$$;

-- The journal entry at p_seq, if any, which must be a p_kind named p_name:
-- replayed code asking for something else at a recorded position is the
-- caller's bug (PF004), never a silent overwrite.
create function pgflow._entry(p_run_id uuid, p_seq integer, p_kind text, p_name text)
returns pgflow.steps
language plpgsql
as $$
declare
    v_step pgflow.steps;
begin
    select s.* into v_step from pgflow.steps s where s.run_id = p_run_id and s.seq = p_seq;
    if found and (v_step.kind <> p_kind or v_step.name <> p_name) then
        raise exception using errcode = 'PF004',
            message = format('journal entry %s of run %s is %s %s, not %s %s',
                             p_seq, p_run_id, v_step.kind, v_step.name, p_kind, p_name);
    end if;
    return v_step;
end;
$$;

-- The run lets go of its worker until something wakes it (pgflow._wake).
create function pgflow._suspend(p_run_id uuid, p_status text) returns void
language sql
as $$
    update pgflow.runs r set status = p_status, lease_owner = null where r.id = p_run_id
$$;

-- Wake idle workers of a queue. Payload is the queue name only (NOTIFY
-- payloads are capped at 8000 bytes; queue names at 200 characters).
--
-- Only when one may be waiting for it. PostgreSQL commits the transactions
-- that NOTIFY one at a time, each holding a database-wide lock until its
-- commit is flushed, so concurrent starts that all NOTIFY share no flush.
-- A worker about to wait for a NOTIFY first takes every wake stripe of its
-- queues in share mode (pgflow.guard_wakes), then claims once more. This
-- transaction takes its stripe of the queue exclusively, to its end:
-- - refused: a worker waits (or is about to): NOTIFY;
-- - taken: every waiting worker took its stripes after this transaction
--   ends, so its claim that follows sees this run (locks are released
--   after the commit is visible): no NOTIFY needed.
-- Also NOTIFY when this session guards itself (a claim that makes runs of
-- its own queues ready: its own lock would not refuse it) and while any
-- registered worker is older than revision 0012 (it never guards).
--
-- Claims skip locked rows (FOR UPDATE SKIP LOCKED), so a transaction that
-- locks a pending run's row without taking it out of 'pending' hides the
-- run from every claim made meanwhile, and the worker woken for it finds
-- nothing and waits. Such a transaction calls this too (revision 0013:
-- pgflow.watch, pgflow.cancel, pgflow._child_finished): its commit wakes
-- the worker again, and the handshake above holds for it as for a start.
create function pgflow._notify_ready(p_queue text) returns void
language plpgsql
as $$
begin
    if coalesce(pg_catalog.current_setting('pgflow.wake_guards', true), '') = ''
       and not exists (select 1 from pgflow.workers w where not w.guards_wakes)
       and pg_catalog.pg_try_advisory_xact_lock(
               7366506, pgflow._wake_stripe(p_queue, pg_catalog.pg_backend_pid() & 7)) then
        return;
    end if;
    perform pg_catalog.pg_notify('pgflow_ready', p_queue);
end;
$$;

-- The advisory lock key (class 7366506) of stripe p_stripe (0..7) of a
-- queue's wake-ups. A transaction takes the stripe of its backend (pid
-- modulo 8), so concurrent producers mostly take different ones. Two queues
-- whose hashes share the key only cost an extra NOTIFY or a retried guard.
create function pgflow._wake_stripe(p_queue text, p_stripe integer) returns integer
language sql immutable
as $$
    select (pg_catalog.hashtext(p_queue) & -8) | p_stripe
$$;

-- Add a timer. If it is now the earliest one, wake the scheduler, which may
-- be sleeping until a later timer; otherwise stay silent (a NOTIFY costs
-- every listening worker a transaction).
create function pgflow._add_timer(p_run_id uuid, p_kind text, p_seq integer, p_due_at timestamptz)
returns void
language plpgsql
as $$
begin
    -- min() is one probe of timers_due; a "not exists (due_at <= p_due_at)"
    -- test gets a generic plan that scans every timer.
    if coalesce((select min(t.due_at) from pgflow.timers t) > p_due_at, true) then
        perform pg_catalog.pg_notify('pgflow_timer', '');
    end if;
    insert into pgflow.timers (run_id, kind, seq, due_at, created_at)
    values (p_run_id, p_kind, p_seq, p_due_at, pgflow.now());
end;
$$;

-- Tell result() waiters that a run finished, if there are any. Every NOTIFY
-- costs each listening connection of the database (every worker) a
-- transaction, so runs nobody waits for finish silently.
create function pgflow._notify_done(p_run_id uuid) returns void
language sql
as $$
    select pg_catalog.pg_notify('pgflow_done', p_run_id::text)
    from pgflow.runs r
    where r.id = p_run_id and r.watched
$$;

-- Called by result() (after LISTEN pgflow_done, in its own transaction):
-- ask for a NOTIFY when the run finishes. Racing a finishing run is safe:
-- the finisher holds the row, so this update waits and then finds the run
-- final (the caller's next statement sees it so), or commits first and the
-- finisher's update sees watched = true. Read the status in a later
-- statement, not this one: its snapshot predates a finisher it waited for.
-- A pending run's row is locked here until commit, and claims skip locked
-- rows: wake the queue again (see _notify_ready's callers, revision 0013).
create function pgflow.watch(p_run_id uuid) returns void
language sql
as $$
    with watched as (
        update pgflow.runs r set watched = true
        where r.id = p_run_id and not r.watched
          and r.status not in ('completed', 'failed', 'cancelled')
        returning r.status, r.queue
    )
    select pgflow._notify_ready(w.queue) from watched w where w.status = 'pending'
$$;

-- ---------------------------------------------------------------------------
-- Limits
-- ---------------------------------------------------------------------------

-- The largest JSON payload accepted, in bytes as stored (jsonb). Big enough
-- for any sane document; small enough that a run's journal, which claim
-- sends to the worker on every replay, stays cheap to move. Python mirrors
-- it as pgflow.codec.MAX_PAYLOAD_BYTES.
create function pgflow.max_payload_bytes() returns integer
language sql immutable parallel safe
as $$
    select 2097152  -- 2 MiB
$$;

-- Refuse a payload over the limit (PF002), naming what it is. The size is the
-- datum's own (pg_column_size: a header read, no serialization).
create function pgflow._check_payload(p_value jsonb, p_what text) returns void
language plpgsql immutable
as $$
declare
    v_size integer := pg_catalog.pg_column_size(p_value);
begin
    if v_size > pgflow.max_payload_bytes() then
        raise exception using errcode = 'PF002',
            message = format('%s is too large: %s bytes as jsonb, over the limit of %s bytes '
                             '(pgflow.max_payload_bytes())', p_what, v_size,
                             pgflow.max_payload_bytes());
    end if;
end;
$$;

-- A failure report's error, cut to fit the payload limit: the type, the first
-- 64 KiB of the message and the last 64 KiB of the traceback (where the raise
-- is). Refusing the report instead would leave the run stuck in running.
create function pgflow._bounded_error(p_error jsonb) returns jsonb
language sql immutable
as $$
    select case
        when p_error is null or pg_catalog.pg_column_size(p_error) <= pgflow.max_payload_bytes()
            then p_error
        when jsonb_typeof(p_error) <> 'object'
            then jsonb_build_object('type', 'Error', 'message',
                                    left(p_error::text, 65536) || ' [truncated]', 'traceback', null)
        else jsonb_strip_nulls(jsonb_build_object(
            'type', left(coalesce(p_error ->> 'type', 'Error'), 1024),
            'message', left(coalesce(p_error ->> 'message', ''), 65536) || ' [truncated]',
            'traceback', right(p_error ->> 'traceback', 65536),
            -- what a StepFailed carries for a parent's ctx.map (see context.error_json)
            'step', left(p_error ->> 'step', 1024),
            'error_type', left(p_error ->> 'error_type', 1024),
            'error_message', left(p_error ->> 'error_message', 65536),
            'attempts', case when jsonb_typeof(p_error -> 'attempts') = 'number'
                             then p_error -> 'attempts' end,
            'truncated_from_bytes', pg_catalog.pg_column_size(p_error)))
    end
$$;

-- A delay or time limit must be a real, future-bound span: negative makes no
-- sense and beyond 100 years the timestamps it produces overflow.
create function pgflow._check_span(p_span interval, p_what text, p_allow_zero boolean)
returns void
language plpgsql immutable
as $$
begin
    if p_span is null then
        return;
    end if;
    if p_span < interval '0' or (not p_allow_zero and p_span = interval '0') then
        raise exception using errcode = 'PF002',
            message = format('%s must %s, got %s', p_what,
                             case when p_allow_zero then 'not be negative' else 'be positive' end,
                             p_span);
    end if;
    if p_span > interval '100 years' then
        raise exception using errcode = 'PF002',
            message = format('%s must be at most 100 years, got %s', p_what, p_span);
    end if;
end;
$$;

-- A name (workflow, version, queue, signal): 1..200 characters, not blank.
create function pgflow._check_name(p_value text, p_what text) returns void
language plpgsql immutable
as $$
begin
    if p_value is null or pg_catalog.btrim(p_value) = '' then
        raise exception using errcode = 'PF002', message = format('%s must not be empty', p_what);
    end if;
    if char_length(p_value) > 200 then
        raise exception using errcode = 'PF002',
            message = format('%s must be at most 200 characters, got %s', p_what,
                             char_length(p_value));
    end if;
end;
$$;

-- A key (idempotency, state): 1..1024 bytes, so that its btree entry fits.
create function pgflow._check_key(p_value text, p_what text) returns void
language plpgsql immutable
as $$
begin
    if p_value is null or p_value = '' then
        raise exception using errcode = 'PF002', message = format('%s must not be empty', p_what);
    end if;
    if octet_length(p_value) > 1024 then
        raise exception using errcode = 'PF002',
            message = format('%s must be at most 1024 bytes, got %s', p_what, octet_length(p_value));
    end if;
end;
$$;
