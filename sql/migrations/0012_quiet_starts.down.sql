-- pgflow engine, revision 0012 undone: every transition to ready NOTIFYs again.

drop function pgflow.guard_wakes(text[], interval);
drop function pgflow.unguard_wakes();
drop function pgflow.register_worker(uuid, text, integer, text[], jsonb, boolean);

create or replace function pgflow._notify_ready(p_queue text) returns void
language sql
as $$
    select pg_catalog.pg_notify('pgflow_ready', p_queue)
$$;

drop function pgflow._wake_stripe(text, integer);

create or replace function pgflow.register_worker(
    p_worker_id uuid,
    p_hostname  text,
    p_pid       integer,
    p_queues    text[],
    p_workflows jsonb   -- [{name, version, queue, timeout_seconds, params, concurrency}]
) returns integer
language plpgsql
as $$
declare
    v_lock_key integer := pg_catalog.nextval('pgflow.worker_lock_key_seq');
    v_changed  bigint;
begin
    -- Lock first, row second: recovery never sees a row without its lock.
    perform pg_catalog.pg_advisory_lock(7366502, v_lock_key);
    insert into pgflow.workers (id, lock_key, hostname, pid, queues, workflows)
    values (p_worker_id, v_lock_key, p_hostname, p_pid, p_queues, p_workflows);

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

drop index pgflow.workers_unguarded;
alter table pgflow.workers drop column guards_wakes;

select pgflow._secure();
