-- Undo revision 0003: pgflow._start and pgflow.register_worker as revision 0001
-- wrote them, no input check, no params column.

drop function if exists pgflow._check_input(text, text, jsonb, jsonb);

create or replace function pgflow._start(
    name     text,
    input    jsonb default '[]'::jsonb,
    key      text default null,
    queue    text default null,
    priority integer default 0,
    delay    interval default null,
    version  text default null,
    parent_id uuid default null,
    timeout  interval default null
) returns uuid
language plpgsql
as $$
#variable_conflict use_column
declare
    v_version text := _start.version;
    v_queue   text := _start.queue;
    v_timeout interval := _start.timeout;
    v_now     timestamptz := pgflow.now();
    v_id      uuid;
    v_name    text;
begin
    perform pgflow._check_name(_start.name, 'workflow name');
    if _start.input is null or jsonb_typeof(_start.input) not in ('array', 'object') then
        raise exception using errcode = 'PF002',
            message = 'workflow input must be a JSON array (positional arguments) or object (keyword arguments)';
    end if;
    perform pgflow._check_payload(_start.input, format('the input of workflow %L', _start.name));
    if _start.key is not null then
        perform pgflow._check_key(_start.key, 'key');
    end if;
    if _start.queue is not null then
        perform pgflow._check_name(_start.queue, 'queue');
    end if;
    if _start.version is not null then
        perform pgflow._check_name(_start.version, 'version');
    end if;
    perform pgflow._check_span(_start.delay, 'delay', true);
    perform pgflow._check_span(_start.timeout, 'timeout', false);

    if v_version is null or v_queue is null then
        -- The newest version a live worker serves; else the newest ever seen.
        select w.version, w.queue, w.timeout into v_version, v_queue, v_timeout
        from pgflow.workflows w
        where w.name = _start.name
          and (_start.version is null or w.version = _start.version)
        order by exists (
                     select 1 from pgflow.workers k
                     where k.workflows @> jsonb_build_array(
                               jsonb_build_object('name', w.name, 'version', w.version))) desc,
                 w.first_seen desc
        limit 1;
        if not found and _start.version is null then
            raise exception using errcode = 'PF002',
                message = format('unknown workflow %L: no worker has registered it (pass version to start it anyway)',
                                 _start.name);
        end if;
        v_version := coalesce(_start.version, v_version);
        v_queue := coalesce(_start.queue, v_queue, 'default');
        v_timeout := coalesce(_start.timeout, v_timeout);
    end if;

    insert into pgflow.runs as r (name, version, queue, key, status, priority, input, parent_id,
                                  timeout, created_at, available_at)
    values (_start.name, v_version, v_queue, _start.key,
            case when coalesce(_start.delay, interval '0') > interval '0'
                 then 'sleeping' else 'pending' end,
            coalesce(_start.priority, 0), _start.input, _start.parent_id, v_timeout, v_now,
            v_now + coalesce(_start.delay, interval '0'))
    on conflict (key) where key is not null do nothing
    returning r.id into v_id;

    if v_id is null then
        -- Idempotent start: the key is taken (by a committed run, or one whose
        -- transaction we just waited for).
        select r.id, r.name into v_id, v_name from pgflow.runs r where r.key = _start.key;
        if v_name is distinct from _start.name then
            raise exception using errcode = 'PF005',
                message = format('key %L is already used by a run of workflow %L', _start.key, v_name);
        end if;
        return v_id;
    end if;

    if v_timeout is not null then
        perform pgflow._add_timer(v_id, 'deadline', null, v_now + v_timeout);
    end if;
    if coalesce(_start.delay, interval '0') > interval '0' then
        perform pgflow._add_timer(v_id, 'start', null, v_now + _start.delay);
    else
        perform pgflow._notify_ready(v_queue);
    end if;
    return v_id;
end;
$$;

create or replace function pgflow.register_worker(
    p_worker_id uuid,
    p_hostname  text,
    p_pid       integer,
    p_queues    text[],
    p_workflows jsonb
) returns integer
language plpgsql
as $$
declare
    v_lock_key integer := pg_catalog.nextval('pgflow.worker_lock_key_seq');
begin
    -- Lock first, row second: recovery never sees a row without its lock.
    perform pg_catalog.pg_advisory_lock(7366502, v_lock_key);
    insert into pgflow.workers (id, lock_key, hostname, pid, queues, workflows)
    values (p_worker_id, v_lock_key, p_hostname, p_pid, p_queues, p_workflows);

    insert into pgflow.workflows as w (name, version, queue, timeout)
    select d ->> 'name', d ->> 'version', d ->> 'queue',
           (d ->> 'timeout_seconds')::double precision * interval '1 second'
    from jsonb_array_elements(p_workflows) d
    on conflict (name, version) do update
        set last_seen = pg_catalog.clock_timestamp(), queue = excluded.queue,
            timeout = excluded.timeout;
    return v_lock_key;
end;
$$;

alter table pgflow.workflows drop column if exists params;

select pgflow._secure();
