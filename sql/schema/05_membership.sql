-- ---------------------------------------------------------------------------
-- Workers: membership and liveness
-- ---------------------------------------------------------------------------

-- Register a worker and take its liveness lock on *this* session. Call it on
-- the connection that lives as long as the worker. p_guards_wakes: it guards
-- its wake-ups (pgflow.guard_wakes; workers since revision 0012).
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

-- Workers older than revision 0012: they wait for every NOTIFY, so while one
-- is registered every transition to ready NOTIFYs (pgflow._notify_ready).
create function pgflow.register_worker(
    p_worker_id uuid, p_hostname text, p_pid integer, p_queues text[], p_workflows jsonb
) returns integer
language sql
as $$
    select pgflow.register_worker(p_worker_id, p_hostname, p_pid, p_queues, p_workflows, false)
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
