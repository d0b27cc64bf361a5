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
    -- [{name, kind, required}] in declaration order, the context excluded; kind
    -- is one of Python's inspect.Parameter kinds (positional_only, positional,
    -- keyword_only, var_positional, var_keyword). pgflow._start checks every
    -- input against it. Null: announced only by workers older than revision 0003.
    params     jsonb,
    -- Concurrency(limit, key) of the workflow (13_flow_control.sql): at most
    -- concurrency_limit runs executing, per value of the parameter
    -- concurrency_param when it is set. Null: no limit.
    concurrency_limit integer,
    concurrency_param text,
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
    schedule_id  text,                       -- the schedule whose tick started it (12_schedules.sql)
    scheduled_time timestamptz,              -- that tick's time: ctx.scheduled_time
    concurrency_key text,                    -- its value of its workflow's Concurrency key
    held_by      text,                       -- pending, parked by this full scope (13_flow_control.sql)
    holds_slots  boolean not null default false,  -- running with concurrency slots taken
    traceparent  text,                       -- W3C trace context of its start (14_observability.sql)
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
-- retry back-offs wait as 'sleeping' with a timer, outside this index), and
-- of runs parked by a full concurrency scope (held_by, 13_flow_control.sql).
create index runs_claimable on pgflow.runs (queue, priority desc, available_at)
    where status = 'pending' and held_by is null;
-- Recovery: runs held by workers.
create index runs_leased on pgflow.runs (lease_owner) where status = 'running';
create index runs_parent on pgflow.runs (parent_id, parent_seq, parent_index)
    where parent_id is not null;
-- Listing recent runs by name / status.
create index runs_name_created on pgflow.runs (name, created_at desc);
create index runs_status_created on pgflow.runs (status, created_at desc);
-- A schedule's runs (is one unfinished? the overlap policies ask). Partial:
-- other runs are not in it, and no update of a run touches its columns.
create index runs_schedule on pgflow.runs (schedule_id, scheduled_time)
    where schedule_id is not null;
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
    status      text not null,     -- completed | failed | retrying | sleeping | waiting | cancelled
    attempts    integer not null default 1,
    output      jsonb,
    error       jsonb,             -- last attempt's {type, message, traceback}
    started_at  timestamptz not null,
    finished_at timestamptz not null,
    primary key (run_id, seq),
    constraint steps_status_known check (
        status in ('completed', 'failed', 'retrying', 'sleeping', 'waiting', 'cancelled')),
    constraint steps_seq_positive check (seq >= 0),
    constraint steps_attempts_positive check (attempts >= 1),
    constraint steps_failure_has_error check (
        status in ('completed', 'sleeping', 'waiting', 'cancelled') or error is not null)
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
    heartbeat_at timestamptz not null default pg_catalog.clock_timestamp(),
    -- It guards its wake-ups (pgflow.guard_wakes, revision 0012). While a
    -- worker that does not (an older one) is registered, every transition to
    -- ready NOTIFYs, as before.
    guards_wakes boolean not null default false
);

-- What pgflow._notify_ready asks on every call: is any registered worker an older one?
create index workers_unguarded on pgflow.workers (id) where not guards_wakes;

-- What every suspended run waits for, and until when.
create view pgflow.waits as
select r.id as run_id, r.name, r.status, t.kind, t.seq, s.name as step, t.due_at,
       t.due_at - pgflow.now() as due_in
from pgflow.timers t
join pgflow.runs r on r.id = t.run_id
left join pgflow.steps s on s.run_id = t.run_id and s.seq = t.seq;
