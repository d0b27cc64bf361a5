-- pgflow engine, revision 0006: which workers may run on this schema.
--
-- A worker accepts a range of schema revisions, not one: from the oldest
-- whose procedures it calls (pgflow.schema.MIN_REVISION) to the newest it
-- knows, and any newer one whose pgflow.min_worker_revision() is not newer
-- than the newest it knows. The compatibility rule (sql/README.md):
--   * a public or worker-facing procedure's signature never changes in place:
--     a revision adds defaulted trailing parameters or a procedure of a new
--     name, and drops the old one a release later;
--   * a revision that older workers cannot run with raises
--     min_worker_revision() to itself, and its first line reads
--     `-- breaking: ...` (`pgflow migrate` prints it: stop the workers first).
--
-- Changes: function pgflow.min_worker_revision (new, everyone may call it);
-- pgflow._privileges (replaced, same signature).

-- The oldest revision a worker may be built for and still run on this schema.
-- Workers of code that knows this revision (or a newer one) work here.
create function pgflow.min_worker_revision() returns text
language sql immutable
as $$
    select '0006_schema_compat'::text
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
    ('relation', 'waits',            '{pgflow_reader}'),
    ('relation', 'unserved_runs',    '{pgflow_reader}'),
    ('relation', 'patches_in_use',   '{pgflow_reader}')
$$;

select pgflow._secure();
