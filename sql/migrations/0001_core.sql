-- pgflow engine, revision 0001: the durable execution core.
--
-- This file is the engine. Every state transition of a run is one call of a
-- function below, atomic and fenced; the Python worker only calls them.
--
-- Who may call what is revision 0002's (sql/0002_roles.sql): the entry points
-- run as the schema owner with a fixed search_path, and the roles
-- pgflow_client, pgflow_worker and pgflow_reader each get their duty's share.
--
-- Public procedures (stable, callable from a client, trigger or psql):
--   pgflow.start(name, input, key, queue, priority, delay, version, timeout)  new run
--   pgflow.watch(run)             ask for NOTIFY pgflow_done when the run finishes
--   pgflow.now()                                                      engine clock
--   pgflow.max_payload_bytes()    the size limit of every JSON payload (see Limits)
--
-- Worker procedures (called by `pgflow worker`):
--   pgflow.register_worker(...)   join: takes the worker's liveness lock
--   pgflow.heartbeat(worker)      still alive
--   pgflow.claim(worker, ...)     lease ready runs, with their journals
--   pgflow.complete_step(...)     checkpoint a step result
--   pgflow.fail_step(...)         record a failed attempt; back off or give up
--   pgflow.complete_run(...)      the workflow returned
--   pgflow.complete_batch(...)    many runs' checkpoints, completions, sleeps: one transaction
--   pgflow.fail_run(...)          the workflow raised
--   pgflow.release_run(...)       give a run back unfinished (draining worker)
--   pgflow.sleep(...)             suspend a run until a time (durable timer)
--   pgflow.record_value(...)      journal ctx.now() / uuid4() / random() / patched()
--   pgflow.recover(stale_after)   give back runs of dead workers
--
-- Scheduler procedures (called by the one scheduler leader, and by tests):
--   pgflow.fire_timers(limit)     wake the runs whose timers are due
--   pgflow.next_timer_in()        seconds until the earliest timer
--   pgflow.advance_time(delta)    move the engine clock and fire what came due
--
-- Interaction and composition (worker side):
--   pgflow.wait_signal(...)       take a queued signal, or wait for one
--   pgflow.set_state(...)         publish a value (pgflow.run_state)
--   pgflow.start_child(...), pgflow.wait_child(...), pgflow.map(...)
--   pgflow.continue_as_new(...)   finish this run, start its successor
--   pgflow.cancel_run(...)        the workflow ended by cancellation
--
-- Operator procedures (public):
--   pgflow.signal(run, name, payload)  deliver a signal
--   pgflow.cancel(run)            cancel a run and its children
--   pgflow.retry(run)             resume a failed run from its last checkpoint
--   pgflow.purge(older_than, batch)  delete old finished runs, one bounded batch a call
--
-- Fencing: a claim bumps runs.lease_token and hands it to the worker. Every
-- report names that token; a report whose token is no longer current (the
-- run was recovered and re-claimed) raises SQLSTATE PF001 and writes nothing.
--
-- Lock order: a transition that touches a leased or suspended run first takes
-- the run's transaction-scoped advisory lock (pgflow._lock_run), then rows.
-- Claim is the one exception: it moves pending runs, guarded by FOR UPDATE
-- SKIP LOCKED on the run rows themselves.
--
-- Error codes raised here (class PF):
--   PF001 lease lost          PF002 bad argument / unknown workflow
--   PF003 worker unknown      PF004 duplicate checkpoint
--   PF005 key conflict        PF006 run not in a state that allows this
--   PF404 unknown run
--
-- Limits: every JSON payload a caller hands in (workflow input, signal
-- payload, state value, recorded value, continue-as-new input, map item) is
-- at most pgflow.max_payload_bytes() as stored (pg_column_size of the jsonb:
-- O(1), no serialization); a larger one raises PF002 naming it, its size and
-- the limit, and writes nothing. A failure report's error is never refused
-- (that would leave the run stuck): one over the limit is cut down
-- (pgflow._bounded_error). Names are 1..200 characters, keys (idempotency
-- and state) 1..1024 bytes, delays and timeouts at most 100 years.
--
-- Two clocks: pgflow.now() is business time (created_at, delays, back-offs,
-- sleeps); tests move it with pgflow.advance_time(), which also fires the
-- timers that come due. Worker liveness (heartbeats) uses the real clock, so
-- moving business time never kills workers.

create schema if not exists pgflow;

-- ---------------------------------------------------------------------------
-- Clock
-- ---------------------------------------------------------------------------

-- One row: how far the engine clock runs ahead of the database clock.
create table pgflow.clock (
    singleton boolean primary key default true,
    offset_by interval not null default interval '0',
    constraint clock_one_row check (singleton)
);
insert into pgflow.clock default values;

-- The engine clock: every engine timestamp comes from here.
create function pgflow.now() returns timestamptz
language sql stable
as $$
    select pg_catalog.statement_timestamp() + c.offset_by from pgflow.clock c
$$;

-- Time-ordered UUIDs (version 7 layout): new runs land on the right edge of
-- the primary-key index instead of on random pages.
create function pgflow.uuid_v7() returns uuid
language sql volatile
as $$
    select pg_catalog.encode(
        pg_catalog.set_bit(
            pg_catalog.set_bit(
                overlay(
                    pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
                    placing substring(
                        pg_catalog.int8send(
                            (extract(epoch from pg_catalog.clock_timestamp()) * 1000)::bigint
                        ) from 3)
                    from 1 for 6),
                52, 1),
            53, 1),
        'hex')::uuid
$$;

-- ---------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------

-- Workflow definitions that workers have announced: lets pgflow.start() by
-- name pick the newest version and its queue without the workflow's code.
create table pgflow.workflows (
    name       text not null,
    version    text not null,
    queue      text not null,
    timeout    interval,                    -- the workflow's own time limit, if any
    first_seen timestamptz not null default pg_catalog.clock_timestamp(),
    last_seen  timestamptz not null default pg_catalog.clock_timestamp(),
    primary key (name, version)
);

-- One row a run. Status transitions:
--   pending   -> running            claim
--   running   -> completed|failed   complete_run | fail_run
--   running   -> pending            release_run, recover
--   running   -> sleeping           sleep, fail_step (retry back-off)
--   sleeping  -> pending            fire_timers (its timer came due)
--   failed    -> pending            retry
--   any unfinished -> failed        fire_timers (its deadline timer: WorkflowTimeout)
--   running   -> waiting            wait_signal, wait_child, map
--   waiting   -> pending            signal, a child finishing, fire_timers (signal timeout)
--   running   -> cancelled          cancel_run (the workflow let pgflow.Cancelled through)
--   unstarted -> cancelled          cancel (a run that never ran has nothing to clean up)
--   running   -> completed          continue_as_new (continued_as names the new run)
-- A delayed start begins as sleeping.
-- The hot columns are updated in place (no indexed column changes on a
-- checkpoint), so fillfactor leaves room for HOT updates.
create table pgflow.runs (
    id           uuid primary key default pgflow.uuid_v7(),
    name         text not null,
    version      text not null,
    queue        text not null,
    key          text,                       -- idempotency key, unique when set
    status       text not null default 'pending',
    priority     integer not null default 0, -- higher runs first
    input        jsonb not null,             -- array = positional, object = keyword arguments
    output       jsonb,
    error        jsonb,                      -- {type, message, traceback}
    parent_id    uuid,
    parent_seq   integer,                    -- the parent's journal entry that waits for it (map)
    parent_index integer,                    -- its position among that entry's children (map)
    parent_notified boolean not null default false,  -- counted by its parent's map entry
    cancel_requested boolean not null default false,
    cancel_seq   integer,                    -- the journal entry it was suspended on when cancelled
    continued_as uuid,                       -- continue_as_new: the run that carries on
    timeout      interval,                   -- fail the run if it is not finished this long after start
    created_at   timestamptz not null,
    available_at timestamptz not null,       -- not claimable before this (delay, back-off)
    started_at   timestamptz,                -- first claim
    finished_at  timestamptz,
    lease_owner  uuid,                       -- worker holding the run while running
    lease_token  bigint not null default 0,  -- fencing counter: bumped by claim and recovery
    watched      boolean not null default false, -- someone waits in result(): NOTIFY pgflow_done
    constraint runs_status_known check (
        status in ('pending', 'running', 'sleeping', 'waiting', 'completed', 'failed', 'cancelled')),
    constraint runs_leased_iff_running check ((status = 'running') = (lease_owner is not null)),
    constraint runs_finished_iff_final check (
        (status in ('completed', 'failed', 'cancelled')) = (finished_at is not null)),
    constraint runs_completed_has_output check (status <> 'completed' or output is not null),
    constraint runs_failed_has_error check (status <> 'failed' or error is not null),
    constraint runs_input_shape check (jsonb_typeof(input) in ('array', 'object')),
    -- Names travel in NOTIFY payloads (queue) and must stay short and printable.
    constraint runs_names_length check (
        char_length(name) between 1 and 200 and char_length(version) between 1 and 200
        and char_length(queue) between 1 and 200),
    -- A btree entry must fit in a third of a page.
    constraint runs_key_length check (key is null or octet_length(key) between 1 and 1024)
) with (
    fillfactor = 70,  -- room for HOT updates of status and lease on the same page
    autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02
);

-- Idempotent start: one run per key, ever (until purged).
create unique index runs_key_unique on pgflow.runs (key) where key is not null;
-- The claim: only pending runs are in it, so its cost is independent of
-- finished history and of suspended runs (sleeping runs, delayed starts and
-- retry back-offs wait as 'sleeping' with a timer, outside this index).
create index runs_claimable on pgflow.runs (queue, priority desc, available_at)
    where status = 'pending';
-- Recovery: runs held by workers.
create index runs_leased on pgflow.runs (lease_owner) where status = 'running';
create index runs_parent on pgflow.runs (parent_id, parent_seq, parent_index)
    where parent_id is not null;
-- Listing recent runs by name / status.
create index runs_name_created on pgflow.runs (name, created_at desc);
create index runs_status_created on pgflow.runs (status, created_at desc);
-- Retention: the oldest finished runs first.
create index runs_finished on pgflow.runs (finished_at) where finished_at is not null;

-- The journal: one row a durable call of a run, in call order (seq).
-- Insert-mostly; replay reads it in the same round trip as the claim.
-- No foreign key to runs: it would lock the hottest row on every checkpoint,
-- and every writer here has already checked the run under its lock.
create table pgflow.steps (
    run_id      uuid not null,
    seq         integer not null,
    name        text not null,
    kind        text not null default 'step',
    status      text not null,     -- completed | failed | retrying | sleeping | waiting
    attempts    integer not null default 1,
    output      jsonb,
    error       jsonb,             -- last attempt's {type, message, traceback}
    started_at  timestamptz not null,
    finished_at timestamptz not null,
    primary key (run_id, seq),
    constraint steps_status_known check (
        status in ('completed', 'failed', 'retrying', 'sleeping', 'waiting')),
    constraint steps_seq_positive check (seq >= 0),
    constraint steps_attempts_positive check (attempts >= 1),
    constraint steps_failure_has_error check (
        status in ('completed', 'sleeping', 'waiting') or error is not null)
);

-- Every failed attempt of a step, insert-only: what went wrong, each time.
create table pgflow.step_attempts (
    id          bigint generated always as identity primary key,
    run_id      uuid not null,
    seq         integer not null,
    attempt     integer not null,
    error       jsonb not null,    -- {type, message, traceback}
    started_at  timestamptz not null,
    finished_at timestamptz not null
);
create index step_attempts_run on pgflow.step_attempts (run_id, seq);

-- One row a pending wake-up of a run. kind says why:
--   sleep  ctx.sleep / ctx.sleep_until (seq: the sleep's journal position)
--   retry  a step's back-off before its next attempt (seq: the step)
--   start     a delayed start
--   deadline  the run's timeout: it fails if still unfinished
--   signal    the timeout of a signal wait (seq: the wait)
-- The scheduler reads them in due order only, so its cost does not depend on
-- how many runs sleep.
create table pgflow.timers (
    id         bigint generated always as identity primary key,
    run_id     uuid not null,
    kind       text not null,
    seq        integer,
    due_at     timestamptz not null,
    created_at timestamptz not null,
    constraint timers_kind_known check (
        kind in ('sleep', 'retry', 'start', 'deadline', 'signal'))
) with (
    -- Insert-then-delete churn: the scheduler reads the head of timers_due, which
    -- fills with dead entries unless vacuum comes often.
    autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000
);
create index timers_due on pgflow.timers (due_at);

-- Each run's mailbox: signals in the order they were sent. A wait takes the
-- oldest unconsumed one of its name and records its journal position in it,
-- so every signal is delivered once.
create table pgflow.signals (
    id           bigint generated always as identity primary key,
    run_id       uuid not null,
    name         text not null,
    payload      jsonb not null default 'null'::jsonb,
    sent_at      timestamptz not null,
    consumed_seq integer,          -- the wait that received it; null while in the mailbox
    constraint signals_name_length check (char_length(name) between 1 and 200)
);
create index signals_mailbox on pgflow.signals (run_id, name, id) where consumed_seq is null;
create index signals_run on pgflow.signals (run_id);  -- retention deletes by run

-- Values a workflow publishes with ctx.set_state, readable by anyone.
create table pgflow.run_state (
    run_id     uuid not null,
    key        text not null,
    value      jsonb not null,
    updated_at timestamptz not null,
    primary key (run_id, key)
);
create index timers_run on pgflow.timers (run_id);

-- Live workers. Each holds the session advisory lock (7366502, lock_key) on
-- its listener connection for as long as it lives: a killed worker's lock
-- vanishes with its connection, so recovery does not wait for a heartbeat.
create sequence pgflow.worker_lock_key_seq as integer minvalue 1 cycle;
create table pgflow.workers (
    id           uuid primary key,
    lock_key     integer not null unique,
    hostname     text not null,
    pid          integer not null,
    queues       text[] not null,
    workflows    jsonb not null,    -- [{name, version, queue}]
    started_at   timestamptz not null default pg_catalog.clock_timestamp(),
    heartbeat_at timestamptz not null default pg_catalog.clock_timestamp()
);

-- What every suspended run waits for, and until when.
create view pgflow.waits as
select r.id as run_id, r.name, r.status, t.kind, t.seq, s.name as step, t.due_at,
       t.due_at - pgflow.now() as due_in
from pgflow.timers t
join pgflow.runs r on r.id = t.run_id
left join pgflow.steps s on s.run_id = t.run_id and s.seq = t.seq;

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
create function pgflow._notify_ready(p_queue text) returns void
language sql
as $$
    select pg_catalog.pg_notify('pgflow_ready', p_queue)
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
create function pgflow.watch(p_run_id uuid) returns void
language sql
as $$
    update pgflow.runs r set watched = true
    where r.id = p_run_id and not r.watched
      and r.status not in ('completed', 'failed', 'cancelled')
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

-- ---------------------------------------------------------------------------
-- Starting runs (public)
-- ---------------------------------------------------------------------------

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
    timeout  interval default null
) returns uuid
language plpgsql
as $$
#variable_conflict use_column
declare
    v_version text := _start.version;
    v_queue   text := _start.queue;
    v_timeout interval := _start.timeout;
    v_now     timestamptz := pgflow.now();
    v_id      uuid;
    v_name    text;
begin
    perform pgflow._check_name(_start.name, 'workflow name');
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
        select w.version, w.queue, w.timeout into v_version, v_queue, v_timeout
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
                message = format('unknown workflow %L: no worker has registered it (pass version to start it anyway)',
                                 _start.name);
        end if;
        v_version := coalesce(_start.version, v_version);
        v_queue := coalesce(_start.queue, v_queue, 'default');
        v_timeout := coalesce(_start.timeout, v_timeout);
    end if;

    insert into pgflow.runs as r (name, version, queue, key, status, priority, input, parent_id,
                                  timeout, created_at, available_at)
    values (_start.name, v_version, v_queue, _start.key,
            case when coalesce(_start.delay, interval '0') > interval '0'
                 then 'sleeping' else 'pending' end,
            coalesce(_start.priority, 0), _start.input, _start.parent_id, v_timeout, v_now,
            v_now + coalesce(_start.delay, interval '0'))
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

-- The public entry point: everything of _start but the parent, which only a
-- running parent may set (start_child).
create function pgflow.start(
    name     text,
    input    jsonb default '[]'::jsonb,
    key      text default null,
    queue    text default null,
    priority integer default 0,
    delay    interval default null,
    version  text default null,
    timeout  interval default null
) returns uuid
language sql
as $$
    select pgflow._start(start.name, start.input, start.key, start.queue, start.priority,
                         start.delay, start.version, null, start.timeout)
$$;

-- ---------------------------------------------------------------------------
-- Workers: membership and liveness
-- ---------------------------------------------------------------------------

-- Register a worker and take its liveness lock on *this* session. Call it on
-- the connection that lives as long as the worker (its listener).
create function pgflow.register_worker(
    p_worker_id uuid,
    p_hostname  text,
    p_pid       integer,
    p_queues    text[],
    p_workflows jsonb
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

    insert into pgflow.workflows as w (name, version, queue, timeout)
    select d ->> 'name', d ->> 'version', d ->> 'queue',
           (d ->> 'timeout_seconds')::double precision * interval '1 second'
    from jsonb_array_elements(p_workflows) d
    on conflict (name, version) do update
        set last_seen = pg_catalog.clock_timestamp(), queue = excluded.queue,
            timeout = excluded.timeout;
    return v_lock_key;
end;
$$;

-- Returns false when the worker is no longer registered (declared dead):
-- it must then abandon its runs and register again.
create function pgflow.heartbeat(p_worker_id uuid) returns boolean
language sql
as $$
    with beat as (
        update pgflow.workers set heartbeat_at = pg_catalog.clock_timestamp()
        where id = p_worker_id
        returning 1
    )
    select exists (select 1 from beat)
$$;

create function pgflow.unregister_worker(p_worker_id uuid) returns void
language sql
as $$
    delete from pgflow.workers where id = p_worker_id
$$;

-- Declare dead every worker whose liveness lock is gone (its connection
-- closed: killed, crashed, network cut) or whose heartbeat is older than
-- p_stale_after (frozen), then put back every run leased to a worker that is
-- no longer registered. Any process may call it at any time; concurrent calls
-- split the work with SKIP LOCKED. Returns the number of runs recovered.
create function pgflow.recover(p_stale_after interval default interval '30 seconds')
returns integer
language plpgsql
as $$
declare
    v_db     oid := (select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database());
    v_run    record;
    v_count  integer := 0;
    v_queues text[] := '{}';
begin
    delete from pgflow.workers w
    where w.id in (
        select w2.id from pgflow.workers w2
        where w2.heartbeat_at < pg_catalog.clock_timestamp() - p_stale_after
           or not exists (
                select 1 from pg_catalog.pg_locks l
                where l.locktype = 'advisory' and l.database = v_db
                  and l.classid = 7366502::oid and l.objid = w2.lock_key::oid
                  and l.objsubid = 2 and l.granted)
        for update skip locked);

    -- Lock order as everywhere: the run's advisory lock, then its row. A run
    -- whose lock is taken (a late report racing us) is skipped: the next
    -- call gets it.
    for v_run in
        select r.id, r.queue from pgflow.runs r
        where r.status = 'running'
          and not exists (select 1 from pgflow.workers w where w.id = r.lease_owner)
    loop
        continue when not pg_catalog.pg_try_advisory_xact_lock(
            7366503, pg_catalog.hashtext(v_run.id::text));
        update pgflow.runs r
        set status = 'pending', lease_owner = null, lease_token = r.lease_token + 1,
            available_at = pgflow.now()
        where r.id = v_run.id and r.status = 'running'
          and not exists (select 1 from pgflow.workers w where w.id = r.lease_owner);
        if found then
            v_count := v_count + 1;
            if not v_run.queue = any(v_queues) then
                v_queues := v_queues || v_run.queue;
            end if;
        end if;
    end loop;

    perform pgflow._notify_ready(q) from pg_catalog.unnest(v_queues) q;
    return v_count;
end;
$$;

-- ---------------------------------------------------------------------------
-- Claiming
-- ---------------------------------------------------------------------------

-- Lease up to p_limit ready runs of the given queues whose (name, version)
-- the worker has code for, highest priority first, oldest first. Each comes
-- with its journal so that replay needs no further round trip.
create function pgflow.claim(
    p_worker_id uuid,
    p_queues    text[],
    p_names     text[],
    p_versions  text[],
    p_limit     integer
) returns table (run_id uuid, name text, version text, input jsonb, lease_token bigint,
                 journal jsonb, cancel_requested boolean, cancel_seq integer)
language plpgsql
-- One plan for the life of the connection: left to choose, PL/pgSQL re-plans
-- this statement on every call (its array parameters make each custom plan
-- look cheaper), which cost 0.3 ms a call, half the claim (measured). The
-- generic plan walks the same indexes (tests/test_sql_procedures.py).
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
                  r.cancel_seq
    )
    select c.id, c.name, c.version, c.input, c.lease_token,
           coalesce((select jsonb_agg(jsonb_build_object(
                                 'seq', s.seq, 'name', s.name, 'kind', s.kind, 'status', s.status,
                                 'attempts', s.attempts, 'output', s.output, 'error', s.error)
                             order by s.seq)
                     from pgflow.steps s where s.run_id = c.id),
                    '[]'::jsonb),
           c.cancel_requested, c.cancel_seq
    from claimed c;
end;
$$;

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

-- ---------------------------------------------------------------------------
-- Operating runs
-- ---------------------------------------------------------------------------

-- Resume a failed run from its last checkpoint: the failed step at the end
-- of its journal is forgotten (its attempts stay in step_attempts) so that
-- it runs again; every completed step keeps its result.
create function pgflow.retry(p_run_id uuid) returns void
language plpgsql
as $$
declare
    v_run pgflow.runs;
begin
    perform pgflow._lock_run(p_run_id);
    select r.* into v_run from pgflow.runs r where r.id = p_run_id for update;
    if not found then
        raise exception using errcode = 'PF404', message = format('unknown run %s', p_run_id);
    end if;
    if v_run.status <> 'failed' then
        raise exception using errcode = 'PF006',
            message = format('run %s is %s: only failed runs can be retried', p_run_id, v_run.status);
    end if;

    delete from pgflow.steps s
    where s.run_id = p_run_id and s.status = 'failed'
      and s.seq > coalesce((select max(k.seq) from pgflow.steps k
                            where k.run_id = p_run_id and k.status <> 'failed'), -1);

    update pgflow.runs r
    set status = 'pending', output = null, error = null, finished_at = null,
        available_at = pgflow.now(), lease_token = r.lease_token + 1
    where r.id = p_run_id;
    if v_run.timeout is not null then  -- a fresh time limit for the resumed run
        perform pgflow._add_timer(p_run_id, 'deadline', null, pgflow.now() + v_run.timeout);
    end if;
    perform pgflow._notify_ready(v_run.queue);
end;
$$;

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
    delete from pgflow.timers t where t.run_id = p_run_id;
    perform pgflow._notify_done(p_run_id);
    perform pgflow._child_finished(p_run_id);
end;
$$;

-- ---------------------------------------------------------------------------
-- Composition: children, parallel map, continue-as-new
-- ---------------------------------------------------------------------------

-- A run has just finished: if its parent waits for it (ctx.call, a child
-- handle's result(), or a ctx.map entry), record its outcome there and wake
-- the parent when nothing else is awaited. Locks the parent's row only (see
-- the lock rule above).
create function pgflow._child_finished(p_child_id uuid) returns void
language plpgsql
as $$
declare
    v_child     pgflow.runs;
    v_parent    pgflow.runs;
    v_outcome   jsonb;
    v_remaining integer;
    v_woken     boolean := false;
begin
    select r.* into v_child from pgflow.runs r where r.id = p_child_id;
    if v_child.parent_id is null then
        return;
    end if;
    select r.* into v_parent from pgflow.runs r where r.id = v_child.parent_id for update;
    if not found then
        return;
    end if;
    v_outcome := jsonb_build_object('run_id', v_child.id, 'status', v_child.status,
                                    'output', v_child.output, 'error', v_child.error);

    update pgflow.steps s
    set status = 'completed', output = v_outcome, finished_at = pgflow.now()
    where s.run_id = v_parent.id and s.kind = 'child' and s.status = 'waiting'
      and s.output ->> 'run_id' = v_child.id::text;
    v_woken := found;

    if v_child.parent_seq is not null then
        -- Each item counts once, on its first finish (a retried item does not
        -- reopen or recount the map).
        update pgflow.runs r set parent_notified = true
        where r.id = v_child.id and not r.parent_notified;
        if not found then
            return;
        end if;
        update pgflow.steps s
        set output = jsonb_set(s.output, '{remaining}',
                               to_jsonb((s.output ->> 'remaining')::integer - 1))
        where s.run_id = v_parent.id and s.seq = v_child.parent_seq and s.kind = 'map'
          and s.status = 'waiting'
        returning (s.output ->> 'remaining')::integer into v_remaining;
        if v_remaining = 0 then
            update pgflow.steps s
            set status = 'completed', finished_at = pgflow.now(),
                output = jsonb_build_object('items', (
                    select coalesce(jsonb_agg(jsonb_build_object(
                               'run_id', c.id, 'status', c.status, 'output', c.output,
                               'error', c.error) order by c.parent_index), '[]'::jsonb)
                    from pgflow.runs c
                    where c.parent_id = v_parent.id and c.parent_seq = v_child.parent_seq
                      and c.continued_as is null))
            where s.run_id = v_parent.id and s.seq = v_child.parent_seq;
            v_woken := true;
        end if;
    end if;

    if v_woken and v_parent.status = 'waiting' then
        perform pgflow._wake(v_parent.id);
    end if;
end;
$$;

-- ctx.start_child: start run `p_name` as a child of this run, recorded at
-- journal entry p_seq so that a replay gets the same child. Returns its id.
create function pgflow.start_child(
    p_run_id      uuid,
    p_lease_token bigint,
    p_seq         integer,
    p_name        text,
    p_input       jsonb,
    p_key         text,
    p_queue       text,
    p_version     text,
    p_timeout     interval
) returns uuid
language plpgsql
as $$
declare
    v_child uuid;
    v_step  pgflow.steps;
begin
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    v_step := pgflow._entry(p_run_id, p_seq, 'start_child', p_name);
    if v_step.seq is not null then
        return (v_step.output ->> 'run_id')::uuid;
    end if;
    v_child := pgflow._start(p_name, p_input, key => p_key, queue => p_queue, version => p_version,
                             parent_id => p_run_id, timeout => p_timeout);
    insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                              started_at, finished_at)
    values (p_run_id, p_seq, p_name, 'start_child', 'completed', 1,
            jsonb_build_object('run_id', v_child), pgflow.now(), pgflow.now());
    return v_child;
end;
$$;

-- A child handle's result(): the child's outcome {run_id, status, output,
-- error} if it has finished (outcome recorded at journal entry p_seq), else
-- null and the run waits until the child finishes.
create function pgflow.wait_child(p_run_id uuid, p_lease_token bigint, p_seq integer,
                                  p_child_id uuid) returns jsonb
language plpgsql
as $$
declare
    v_child pgflow.runs;
    v_step  pgflow.steps;
begin
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    perform 1 from pgflow.runs r where r.id = p_run_id for update;  -- see the lock rule
    select s.* into v_step from pgflow.steps s where s.run_id = p_run_id and s.seq = p_seq;
    if found and v_step.status = 'completed' then
        return v_step.output;
    end if;
    select r.* into v_child from pgflow.runs r where r.id = p_child_id;
    if not found then
        raise exception using errcode = 'PF404', message = format('unknown run %s', p_child_id);
    end if;
    -- A child that continued as new is followed to the run that carries on.
    while v_child.continued_as is not null loop
        select r.* into v_child from pgflow.runs r where r.id = v_child.continued_as;
    end loop;
    if v_child.status in ('completed', 'failed', 'cancelled') then
        insert into pgflow.steps as s (run_id, seq, name, kind, status, attempts, output,
                                       started_at, finished_at)
        values (p_run_id, p_seq, 'child', 'child', 'completed', 1,
                jsonb_build_object('run_id', v_child.id, 'status', v_child.status,
                                   'output', v_child.output, 'error', v_child.error),
                pgflow.now(), pgflow.now())
        on conflict (run_id, seq) do update set status = 'completed', output = excluded.output,
            finished_at = excluded.finished_at;
        return (select s.output from pgflow.steps s where s.run_id = p_run_id and s.seq = p_seq);
    end if;
    if v_step.seq is null then
        insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                                  started_at, finished_at)
        values (p_run_id, p_seq, 'child', 'child', 'waiting', 1,
                jsonb_build_object('run_id', v_child.id), pgflow.now(), pgflow.now());
    end if;
    perform pgflow._suspend(p_run_id, 'waiting');
    return null;
end;
$$;

-- ctx.map: one child run of workflow p_name a item (each claimable by any
-- worker), recorded at journal entry p_seq; the run waits until the last one
-- finishes, then the entry holds every outcome in item order. Returns null
-- if the run now waits, else the entry's outcome {items: [...]} (no items, or
-- met again on replay after the last item finished).
create function pgflow.map(
    p_run_id      uuid,
    p_lease_token bigint,
    p_seq         integer,
    p_name        text,
    p_inputs      jsonb,     -- an array of input arrays, one per item
    p_queue       text,
    p_version     text
) returns jsonb
language plpgsql
as $$
declare
    v_run   pgflow.runs;
    v_step  pgflow.steps;
    v_count integer;
    v_now   timestamptz := pgflow.now();
    v_item  record;
begin
    if p_inputs is null or jsonb_typeof(p_inputs) <> 'array' then
        raise exception using errcode = 'PF002',
            message = 'map inputs must be a JSON array of input arrays, one per item';
    end if;
    v_count := jsonb_array_length(p_inputs);
    -- Each item becomes a run's input: the same limit as any start, item by item.
    for v_item in
        select i.input, i.ordinality from jsonb_array_elements(p_inputs) with ordinality as i(input, ordinality)
        where jsonb_typeof(i.input) not in ('array', 'object')
           or pg_catalog.pg_column_size(i.input) > pgflow.max_payload_bytes()
        limit 1
    loop
        if jsonb_typeof(v_item.input) not in ('array', 'object') then
            raise exception using errcode = 'PF002',
                message = format('item %s of map %L: its input must be a JSON array or object',
                                 v_item.ordinality - 1, p_name);
        end if;
        perform pgflow._check_payload(v_item.input,
                                      format('item %s of map %L', v_item.ordinality - 1, p_name));
    end loop;
    perform pgflow._lock_run(p_run_id);
    v_run := pgflow._check_lease(p_run_id, p_lease_token);
    perform 1 from pgflow.runs r where r.id = p_run_id for update;
    v_step := pgflow._entry(p_run_id, p_seq, 'map', p_name);
    if v_step.seq is not null then  -- met again on replay: done, or wait on
        if v_step.status = 'completed' then
            return v_step.output;
        end if;
        perform pgflow._suspend(p_run_id, 'waiting');
        return null;
    end if;
    if v_count = 0 then
        insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                                  started_at, finished_at)
        values (p_run_id, p_seq, p_name, 'map', 'completed', 1,
                jsonb_build_object('items', '[]'::jsonb), v_now, v_now);
        return jsonb_build_object('items', '[]'::jsonb);
    end if;

    insert into pgflow.runs (name, version, queue, priority, input, parent_id, parent_seq,
                             parent_index, created_at, available_at)
    select p_name, p_version, p_queue, v_run.priority, i.input, p_run_id, p_seq,
           (i.ordinality - 1)::integer, v_now, v_now
    from jsonb_array_elements(p_inputs) with ordinality as i(input, ordinality);
    insert into pgflow.steps (run_id, seq, name, kind, status, attempts, output,
                              started_at, finished_at)
    values (p_run_id, p_seq, p_name, 'map', 'waiting', 1,
            jsonb_build_object('children', v_count, 'remaining', v_count), v_now, v_now);
    perform pgflow._suspend(p_run_id, 'waiting');
    perform pgflow._notify_ready(p_queue);
    return null;
end;
$$;

-- ctx.continue_as_new: this run completes (continued_as names its successor)
-- and a new run of the same workflow starts with p_input and a fresh
-- journal, under the same key, parent and time limit. Returns the new id.
create function pgflow.continue_as_new(p_run_id uuid, p_lease_token bigint, p_input jsonb)
returns uuid
language plpgsql
as $$
declare
    v_run pgflow.runs;
    v_new uuid := pgflow.uuid_v7();
    v_now timestamptz := pgflow.now();
begin
    if p_input is null or jsonb_typeof(p_input) not in ('array', 'object') then
        raise exception using errcode = 'PF002',
            message = 'the new input must be a JSON array (positional arguments) or object (keyword arguments)';
    end if;
    perform pgflow._check_payload(p_input, 'the new input of continue_as_new');
    perform pgflow._lock_run(p_run_id);
    v_run := pgflow._check_lease(p_run_id, p_lease_token);
    -- The key moves to the new run: release it first (it is unique).
    update pgflow.runs r
    set status = 'completed', output = 'null'::jsonb, finished_at = v_now, lease_owner = null,
        key = null, continued_as = v_new
    where r.id = p_run_id;
    delete from pgflow.timers t where t.run_id = p_run_id;
    insert into pgflow.runs (id, name, version, queue, key, priority, input, parent_id, parent_seq,
                             parent_index, timeout, created_at, available_at)
    values (v_new, v_run.name, v_run.version, v_run.queue, v_run.key, v_run.priority, p_input,
            v_run.parent_id, v_run.parent_seq, v_run.parent_index, v_run.timeout, v_now, v_now);
    if v_run.timeout is not null then
        perform pgflow._add_timer(v_new, 'deadline', null, v_now + v_run.timeout);
    end if;
    -- A parent waiting for this run now waits for its successor (its row locked
    -- first, as a finishing child does, so a concurrent wait_child is seen).
    if v_run.parent_id is not null then
        perform 1 from pgflow.runs r where r.id = v_run.parent_id for update;
        update pgflow.steps s set output = jsonb_set(s.output, '{run_id}', to_jsonb(v_new))
        where s.run_id = v_run.parent_id and s.kind = 'child' and s.status = 'waiting'
          and s.output ->> 'run_id' = p_run_id::text;
    end if;
    perform pgflow._notify_ready(v_run.queue);
    perform pgflow._notify_done(p_run_id);
    return v_new;
end;
$$;

-- ---------------------------------------------------------------------------
-- Versions and patches (operators' views)
-- ---------------------------------------------------------------------------

-- Unfinished runs that no live worker can serve: no registered worker has
-- code for their (name, version) on their queue. Such a run waits until one
-- is deployed; it is never claimed by code of another version.
create view pgflow.unserved_runs as
select r.id, r.name, r.version, r.queue, r.status, r.created_at
from pgflow.runs r
where r.status in ('pending', 'sleeping', 'waiting')
  and not exists (
        select 1 from pgflow.workers w
        where r.queue = any(w.queues)
          and w.workflows @> jsonb_build_array(
                  jsonb_build_object('name', r.name, 'version', r.version)));

-- Patches (ctx.patched) recorded by unfinished runs: a patch can be retired
-- from the code (its old branch deleted, then the call itself) once its
-- runs have drained.
create view pgflow.patches_in_use as
select s.name as patch, r.name as workflow, r.version, count(*) as runs
from pgflow.steps s
join pgflow.runs r on r.id = s.run_id
where s.kind = 'patch' and r.status not in ('completed', 'failed', 'cancelled')
group by s.name, r.name, r.version;


-- ---------------------------------------------------------------------------
-- Retention
-- ---------------------------------------------------------------------------

-- Delete up to p_batch runs that finished more than p_older_than ago (engine
-- clock), oldest first, with everything recorded about them. One bounded
-- batch a call keeps each transaction short, and SKIP LOCKED means it never
-- waits for anyone: call it until it returns 0 (`pgflow purge` does).
-- Returns how many runs it deleted.
create function pgflow.purge(p_older_than interval, p_batch integer default 1000)
returns integer
language plpgsql
as $$
declare
    v_ids uuid[];
begin
    if p_older_than is null or p_older_than < interval '0' then
        raise exception using errcode = 'PF002', message = 'older_than must not be negative';
    end if;
    if p_batch is null or p_batch < 1 then
        raise exception using errcode = 'PF002', message = 'purge batch must be at least 1';
    end if;
    select coalesce(array_agg(o.id), '{}') into v_ids
    from (
        select r.id from pgflow.runs r
        where r.finished_at < pgflow.now() - p_older_than
          and r.status in ('completed', 'failed', 'cancelled')
        order by r.finished_at
        limit p_batch
        for update skip locked
    ) o;
    delete from pgflow.steps s where s.run_id = any(v_ids);
    delete from pgflow.step_attempts a where a.run_id = any(v_ids);
    delete from pgflow.signals g where g.run_id = any(v_ids);
    delete from pgflow.run_state v where v.run_id = any(v_ids);
    delete from pgflow.timers t where t.run_id = any(v_ids);
    delete from pgflow.runs r where r.id = any(v_ids);
    return cardinality(v_ids);
end;
$$;
