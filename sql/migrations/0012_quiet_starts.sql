-- pgflow engine, revision 0012: starts skip the NOTIFY when no worker waits for one.
--
-- PostgreSQL commits the transactions that NOTIFY one at a time (a lock held
-- through the commit's flush), so producers starting runs on several
-- connections shared no flush. Now a worker about to wait for a NOTIFY
-- guards its queues' wake-ups (pgflow.guard_wakes: advisory locks in share
-- mode on its claim connection) and claims once more; what makes a run ready
-- NOTIFYs only when it cannot lock its stripe of the queue, that is when a
-- worker waits (pgflow._notify_ready, 03_guards.sql).
--
-- Compatibility: workers of earlier revisions register through the old
-- register_worker, which records them as not guarding; while one is
-- registered every transition to ready NOTIFYs, as before.

alter table pgflow.workers add column guards_wakes boolean not null default false;

create index workers_unguarded on pgflow.workers (id) where not guards_wakes;

create function pgflow._wake_stripe(p_queue text, p_stripe integer) returns integer
language sql immutable
as $$
    select (pg_catalog.hashtext(p_queue) & -8) | p_stripe
$$;

create or replace function pgflow._notify_ready(p_queue text) returns void
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

create function pgflow.register_worker(
    p_worker_id uuid,
    p_hostname  text,
    p_pid       integer,
    p_queues    text[],
    p_workflows jsonb,  -- [{name, version, queue, timeout_seconds, params, concurrency}]
    p_guards_wakes boolean
) returns integer
language plpgsql
as $$
declare
    v_lock_key integer := pg_catalog.nextval('pgflow.worker_lock_key_seq');
    v_changed  bigint;
begin
    -- Lock first, row second: recovery never sees a row without its lock.
    perform pg_catalog.pg_advisory_lock(7366502, v_lock_key);
    insert into pgflow.workers (id, lock_key, hostname, pid, queues, workflows, guards_wakes)
    values (p_worker_id, v_lock_key, p_hostname, p_pid, p_queues, p_workflows, p_guards_wakes);

    insert into pgflow.workflows as w (name, version, queue, timeout, params)
    select d ->> 'name', d ->> 'version', d ->> 'queue',
           (d ->> 'timeout_seconds')::double precision * interval '1 second',
           d -> 'params'
    from jsonb_array_elements(p_workflows) d
    where not (d ->> 'name') like 'pgflow.%'
    on conflict (name, version) do update
        set last_seen = pg_catalog.clock_timestamp(), queue = excluded.queue,
            timeout = excluded.timeout,
            params = coalesce(excluded.params, w.params);  -- an older worker announces none

    -- Concurrency limits, as announced (workers older than revision 0008
    -- announce none: the limit known stays). A workflow whose limit changes
    -- gets its parked runs back; the next claims park again those still
    -- over the new limit.
    with announced as (
        select d ->> 'name' as name, d ->> 'version' as version,
               ((d -> 'concurrency') ->> 'limit')::integer as lim,
               (d -> 'concurrency') ->> 'key' as param
        from jsonb_array_elements(p_workflows) d
        where d ? 'concurrency' and not (d ->> 'name') like 'pgflow.%'
    ), changed as (
        update pgflow.workflows w set concurrency_limit = a.lim, concurrency_param = a.param
        from announced a
        where w.name = a.name and w.version = a.version
          and (w.concurrency_limit, w.concurrency_param) is distinct from (a.lim, a.param)
        returning w.name
    )
    select coalesce(sum(pgflow._unpark_workflow(c.name)), 0) into v_changed
    from (select distinct c.name from changed c) c;
    return v_lock_key;
end;
$$;

create or replace function pgflow.register_worker(
    p_worker_id uuid, p_hostname text, p_pid integer, p_queues text[], p_workflows jsonb
) returns integer
language sql
as $$
    select pgflow.register_worker(p_worker_id, p_hostname, p_pid, p_queues, p_workflows, false)
$$;

create or replace function pgflow._privileges()
returns table (kind text, object text, roles text[])
language sql immutable
as $$
    values
    -- == GRANT LIST: add every new public function here (see the header) ==
    -- worker: membership and liveness (pgflow/membership.py)
    ('definer', 'register_worker',   '{pgflow_worker}'::text[]),
    ('definer', 'heartbeat',         '{pgflow_worker}'),
    ('definer', 'unregister_worker', '{pgflow_worker}'),
    ('definer', 'recover',           '{pgflow_worker}'),
    -- worker: going idle (pgflow/claims.py; revision 0012)
    ('definer', 'guard_wakes',       '{pgflow_worker}'),
    ('definer', 'unguard_wakes',     '{pgflow_worker}'),
    -- worker: claiming and reporting (pgflow/procedures.py)
    ('definer', 'claim',             '{pgflow_worker}'),  -- workers of 0.1.0
    ('definer', 'claim_runs',        '{pgflow_worker}'),  -- revision 0007
    ('definer', 'complete_step',     '{pgflow_worker}'),
    ('definer', 'complete_batch',    '{pgflow_worker}'),  -- checkpoints, completions, sleeps
    ('definer', 'fail_step',         '{pgflow_worker}'),
    ('definer', 'complete_run',      '{pgflow_worker}'),
    ('definer', 'fail_run',          '{pgflow_worker}'),
    ('definer', 'release_run',       '{pgflow_worker}'),
    ('definer', 'sleep',             '{pgflow_worker}'),
    ('definer', 'record_value',      '{pgflow_worker}'),
    ('definer', 'wait_signal',       '{pgflow_worker}'),
    ('definer', 'set_state',         '{pgflow_worker}'),
    ('definer', 'start_child',       '{pgflow_worker}'),
    ('definer', 'wait_child',        '{pgflow_worker}'),
    ('definer', 'map',               '{pgflow_worker}'),
    ('definer', 'continue_as_new',   '{pgflow_worker}'),
    ('definer', 'cancel_run',        '{pgflow_worker}'),
    -- worker: the timer scheduler (pgflow/scheduler.py)
    ('definer', 'fire_timers',       '{pgflow_worker}'),
    ('definer', 'next_timer_in',     '{pgflow_worker}'),
    -- worker: schedules (pgflow/ticker.py; revision 0007)
    ('definer', 'next_wake_in',      '{pgflow_worker}'),
    ('definer', 'due_schedules',     '{pgflow_worker}'),
    ('definer', 'fire_schedules',    '{pgflow_worker}'),
    ('definer', 'start_buffered_ticks', '{pgflow_worker}'),
    -- worker: flow control (the leader wakes rate-limited queues; revision 0008)
    ('definer', 'wake_queues',       '{pgflow_worker}'),
    -- worker and dashboard: the queue figures of a metrics scrape (revision 0009)
    ('definer', 'queue_metrics',     '{pgflow_worker,pgflow_reader}'),
    -- client: control runs (pgflow/client.py, pgflow/aio.py, the CLI)
    ('definer', 'start',             '{pgflow_client}'),
    ('definer', 'start_run',         '{pgflow_client}'),  -- revision 0008
    ('definer', 'signal',            '{pgflow_client}'),
    ('definer', 'cancel',            '{pgflow_client}'),
    ('definer', 'retry',             '{pgflow_client}'),
    ('definer', 'watch',             '{pgflow_client}'),  -- result(): also needs pgflow_reader
    -- client: schedules (pgflow/schedules.py; revision 0007). Workers apply the
    -- schedules declared in their code when they start.
    ('definer', 'create_schedule',   '{pgflow_client,pgflow_worker}'),
    ('definer', 'delete_schedule',   '{pgflow_client,pgflow_worker}'),
    ('definer', 'pause_schedule',    '{pgflow_client}'),
    ('definer', 'resume_schedule',   '{pgflow_client}'),
    ('definer', 'trigger_schedule',  '{pgflow_client}'),
    ('definer', 'backfill_schedule', '{pgflow_client}'),
    -- client: queue caps and pauses (pgflow/flow.py; revision 0008)
    ('definer', 'set_queue',         '{pgflow_client}'),
    ('definer', 'pause_queue',       '{pgflow_client}'),
    ('definer', 'resume_queue',      '{pgflow_client}'),
    -- owner only: the test clock and retention are operator tools
    ('definer', 'advance_time',      '{}'),
    ('definer', 'reset_time',        '{}'),  -- revision 0004
    ('definer', 'purge',             '{}'),
    ('definer', 'purge_schedule_ticks', '{}'),  -- revision 0007
    -- kept inlinable
    ('invoker', 'now',               '{pgflow_worker,pgflow_client,pgflow_reader}'),
    ('invoker', 'uuid_v7',           '{}'),  -- column default of runs.id, used by start()
    ('invoker', 'max_payload_bytes', '{pgflow_worker,pgflow_client,pgflow_reader}'),  -- a constant
    ('invoker', 'min_worker_revision', '{pgflow_worker,pgflow_client,pgflow_reader}'),  -- 0006
    -- == END OF GRANT LIST ==
    -- Everyone: the version check (pgflow.schema.check) and the engine clock.
    ('relation', 'alembic_version',  '{pgflow_worker,pgflow_client,pgflow_reader}'),
    ('relation', 'clock',            '{pgflow_worker,pgflow_client,pgflow_reader}'),
    -- reader: the run records and the operators' views
    ('relation', 'runs',             '{pgflow_reader}'),
    ('relation', 'steps',            '{pgflow_reader}'),
    ('relation', 'step_attempts',    '{pgflow_reader}'),
    ('relation', 'signals',          '{pgflow_reader}'),
    ('relation', 'run_state',        '{pgflow_reader}'),
    ('relation', 'timers',           '{pgflow_reader}'),
    ('relation', 'workers',          '{pgflow_reader}'),
    ('relation', 'workflows',        '{pgflow_reader}'),
    ('relation', 'schedules',        '{pgflow_reader,pgflow_client,pgflow_worker}'),  -- 0007: backfill and a worker's declared schedules read it
    ('relation', 'schedule_ticks',   '{pgflow_reader}'),
    ('relation', 'queue_settings',   '{pgflow_reader}'),  -- 0008
    ('relation', 'slots',            '{pgflow_reader}'),
    ('relation', 'scope_rechecks',   '{pgflow_reader}'),
    ('relation', 'queues',           '{pgflow_reader}'),
    ('relation', 'waits',            '{pgflow_reader}'),
    ('relation', 'unserved_runs',    '{pgflow_reader}'),
    ('relation', 'patches_in_use',   '{pgflow_reader}')
$$;

select pgflow._secure();
