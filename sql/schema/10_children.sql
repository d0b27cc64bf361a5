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
    if v_parent.status = 'pending' then
        -- Woken before (a timer, another child): its row is locked to this
        -- commit, and claims made meanwhile skip it (03_guards.sql).
        perform pgflow._notify_ready(v_parent.queue);
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
