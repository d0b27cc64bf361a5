-- pgflow engine, revision 0002: least-privilege roles and a fixed search_path.
--
-- Three group roles (NOLOGIN), one a duty. Applications grant them to their
-- own logins (`grant pgflow_worker to orders_worker;`):
--   pgflow_worker  everything `pgflow worker` calls: membership, claim,
--                  checkpoints and reports, recovery, the timer scheduler
--   pgflow_client  start, signal, cancel, retry, watch; it reads no table
--                  that holds payloads, so it cannot see or change other runs'
--                  inputs and outputs except through those procedures
--   pgflow_reader  select on the tables and views; it calls no procedure
-- The owner (the user that ran `pgflow migrate`) keeps everything, including
-- the owner-only procedures (advance_time, purge).
--
-- Public entry points run as the owner (security definer) with
--   search_path = pg_catalog, pgflow, pg_temp
-- so nothing a caller puts on its own search_path (a schema with a `now()`,
-- a `jsonb_typeof()` or a `+` operator of its own, a temporary table) can
-- change what the engine calls. pg_catalog first, pg_temp last.
--
-- Not definer: pgflow.now() and the `_` helpers. The one-expression SQL
-- helpers (_lock_run, _wake_stripe) are inlined by the planner into their
-- callers, and pgflow.now() runs in almost every procedure, in some queries
-- once a row; a SET clause or SECURITY DEFINER would stop the inlining and
-- cost about a microsecond a call (an entry point pays it once a call).
-- Called from an entry point they run as the owner under its fixed
-- search_path anyway. EXECUTE on every function of the schema is revoked
-- from PUBLIC, helpers included.
--
-- The policy is data: pgflow._privileges() lists every public function,
-- table and view with the roles it is granted to (an empty list: owner only),
-- and pgflow._secure() makes the catalog match it, idempotently. A later
-- revision that adds or re-creates a function (CREATE OR REPLACE resets
-- SECURITY DEFINER and SET) extends _privileges() and ends with
-- `select pgflow._secure();`. tests/sql/test_security.py fails while any
-- function or relation of the schema is missing from the policy.
--
-- Roles are cluster-wide: creating them needs CREATEROLE. When they are
-- missing and the migrating user may not create them, this revision stops
-- with one error that says what to run; nothing is half applied.

-- ---------------------------------------------------------------------------
-- Roles
-- ---------------------------------------------------------------------------

-- Created if missing. Other databases of the same server may migrate at the
-- same moment (the migration lock is per database): the loser of a creation
-- race waits for the winner's commit and then gets unique_violation (or
-- duplicate_object if it looked after the commit), which means "exists".
do $$
declare
    v_role text;
begin
    foreach v_role in array array['pgflow_worker', 'pgflow_client', 'pgflow_reader'] loop
        continue when exists (select 1 from pg_catalog.pg_roles r where r.rolname = v_role);
        begin
            execute pg_catalog.format('create role %I nologin', v_role);
        exception
            when duplicate_object or unique_violation then
                null;
            when insufficient_privilege then
                raise exception using
                    errcode = 'insufficient_privilege',
                    message = pg_catalog.format(
                        'role %I does not exist and user %I may not create roles: as a user '
                        'with CREATEROLE run `create role pgflow_worker nologin; create role '
                        'pgflow_client nologin; create role pgflow_reader nologin;`, then '
                        'run `pgflow migrate` again', v_role, current_user);
        end;
    end loop;
end;
$$;

-- ---------------------------------------------------------------------------
-- The policy: one row a public function, table or view
-- ---------------------------------------------------------------------------

-- kind 'definer': an entry point, run as the owner with the fixed search_path.
-- kind 'invoker': a small SQL function kept inlinable; runs with the caller's rights.
-- kind 'relation': a table or view; the roles get SELECT on it.
-- roles '{}': owner only.
create function pgflow._privileges()
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

-- Make the catalog match the policy: revoke everything from PUBLIC and from
-- the three roles, then grant what _privileges() lists. Functions and
-- relations the policy does not name end up owner only (fail closed);
-- sequences are left as they are, owner only (only procedures use them).
-- Idempotent; run by the migrating user, who owns every object here.
create function pgflow._secure() returns void
language plpgsql
set search_path = pg_catalog, pgflow, pg_temp
as $$
declare
    v_roles constant text := 'public, pgflow_worker, pgflow_client, pgflow_reader';
    v record;
begin
    execute 'grant usage on schema pgflow to pgflow_worker, pgflow_client, pgflow_reader';

    for v in
        select format('pgflow.%I(%s)', p.proname, pg_get_function_identity_arguments(p.oid))
                   as signature, pol.kind, coalesce(pol.roles, '{}') as roles
        from pg_catalog.pg_proc p
        left join pgflow._privileges() pol
               on pol.object = p.proname and pol.kind in ('definer', 'invoker')
        where p.pronamespace = 'pgflow'::regnamespace
    loop
        execute format('revoke all on function %s from %s', v.signature, v_roles);
        if v.kind = 'definer' then
            execute format('alter function %s security definer'
                           ' set search_path = pg_catalog, pgflow, pg_temp', v.signature);
        end if;
        if cardinality(v.roles) > 0 then
            execute format('grant execute on function %s to %s', v.signature,
                           (select string_agg(quote_ident(r), ', ') from unnest(v.roles) r));
        end if;
    end loop;

    for v in
        select format('pgflow.%I', c.relname) as relation, coalesce(pol.roles, '{}') as roles
        from pg_catalog.pg_class c
        left join pgflow._privileges() pol
               on pol.object = c.relname and pol.kind = 'relation'
        where c.relnamespace = 'pgflow'::regnamespace and c.relkind in ('r', 'p', 'v', 'm')
    loop
        execute format('revoke all on %s from %s', v.relation, v_roles);
        if cardinality(v.roles) > 0 then
            execute format('grant select on %s to %s', v.relation,
                           (select string_agg(quote_ident(r), ', ') from unnest(v.roles) r));
        end if;
    end loop;
end;
$$;

select pgflow._secure();
