-- pgflow engine, revision 0004: a test clock that can be put back.
--
-- pgflow.advance_time moves the engine clock (pgflow.now()) of the whole
-- database forward; until now nothing moved it back, so a shared development
-- database stayed days ahead for good. pgflow.reset_time puts the offset back
-- (to zero, or to a given offset: pgflow.testing.time_travel restores the one
-- it found). Timestamps recorded while the clock was ahead stay as they are.
--
-- pgflow.purge ages finished runs by the database's real clock, not the
-- engine clock: moving the test clock ahead never makes purge delete a run
-- that has just finished (runs finished while the clock was ahead carry
-- future finish times and are purged once real time passes them).
--
-- Changes: function pgflow.reset_time (new, owner only); pgflow.purge and
-- pgflow._privileges (replaced, same signatures).

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

create or replace function pgflow.purge(p_older_than interval, p_batch integer default 1000)
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
        -- Real time, not pgflow.now(): a test clock moved ahead never ages a run.
        where r.finished_at < pg_catalog.statement_timestamp() - p_older_than
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
    ('definer', 'claim',             '{pgflow_worker}'),
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
    -- client: control runs (pgflow/client.py, pgflow/aio.py, the CLI)
    ('definer', 'start',             '{pgflow_client}'),
    ('definer', 'signal',            '{pgflow_client}'),
    ('definer', 'cancel',            '{pgflow_client}'),
    ('definer', 'retry',             '{pgflow_client}'),
    ('definer', 'watch',             '{pgflow_client}'),  -- result(): also needs pgflow_reader
    -- owner only: the test clock and retention are operator tools
    ('definer', 'advance_time',      '{}'),
    ('definer', 'reset_time',        '{}'),  -- revision 0004
    ('definer', 'purge',             '{}'),
    -- kept inlinable
    ('invoker', 'now',               '{pgflow_worker,pgflow_client,pgflow_reader}'),
    ('invoker', 'uuid_v7',           '{}'),  -- column default of runs.id, used by start()
    ('invoker', 'max_payload_bytes', '{pgflow_worker,pgflow_client,pgflow_reader}'),  -- a constant
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
    ('relation', 'waits',            '{pgflow_reader}'),
    ('relation', 'unserved_runs',    '{pgflow_reader}'),
    ('relation', 'patches_in_use',   '{pgflow_reader}')
$$;

select pgflow._secure();
