-- pgflow engine, revision 0013 undone: the three bodies of revision 0012.

create or replace function pgflow.watch(p_run_id uuid) returns void
language sql
as $$
    update pgflow.runs r set watched = true
    where r.id = p_run_id and not r.watched
      and r.status not in ('completed', 'failed', 'cancelled')
$$;

create or replace function pgflow.cancel(run_id uuid) returns boolean
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

create or replace function pgflow._child_finished(p_child_id uuid) returns void
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

select pgflow._secure();
