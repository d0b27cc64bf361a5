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

-- ---------------------------------------------------------------------------
-- Compatibility of workers and schema (pgflow.schema.check, sql/README.md)
-- ---------------------------------------------------------------------------

-- The oldest revision a worker may be built for and still run on this schema.
-- Workers of code that knows this revision (or a newer one) work here; a
-- revision that older workers cannot run with raises it to itself.
create function pgflow.min_worker_revision() returns text
language sql immutable
as $$
    select '0006_schema_compat'::text
$$;
