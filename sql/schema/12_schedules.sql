-- ---------------------------------------------------------------------------
-- Schedules: runs started on a cron expression or a fixed interval
-- ---------------------------------------------------------------------------
--
-- Who computes what. Cron expressions are parsed and iterated in Python, by
-- the cronsim library (pgflow/timetable.py), in the schedule's IANA time
-- zone; SQL stores the schedule, decides each tick and starts its run:
--
--   * the scheduler leader (pgflow/ticker.py) takes due schedules with
--     pgflow.due_schedules (FOR NO KEY UPDATE SKIP LOCKED, in due order),
--     works out their ticks, and hands them to pgflow.fire_schedules, which
--     starts each tick's run and moves the schedule's cursor and next fire
--     time, all in the same transaction;
--   * every decided tick is a row of pgflow.schedule_ticks (primary key:
--     schedule and scheduled time) and every tick's run has the key
--     schedule:<id>:<scheduled time>: a tick never starts twice, whether two
--     leaders race, one crashes between start and bookkeeping, or a backfill
--     covers a range the leader already fired;
--   * deciding a tick locks its schedule row first (the one lock order here:
--     schedule, then run), so deciders of one schedule take turns;
--   * a tick that must wait (overlap 'buffer_one' / 'buffer_all') stays
--     'buffered' until the schedule's unfinished run ends; the runs trigger
--     below wakes the leader, which starts it (pgflow.start_buffered_ticks).

-- One row a schedule. The cursor handled_through says which ticks are
-- decided: every tick at or before it. next_fire_at is when the leader looks
-- at the schedule next (the next tick plus its jitter); null once no tick is
-- left (past end_at).
create table pgflow.schedules (
    id              text primary key,
    workflow        text not null,
    cron            text,                        -- 5 fields, standard syntax
    every           interval,                    -- or a fixed interval, anchored
    timezone        text not null default 'UTC', -- IANA name; cron follows its wall clock
    input           jsonb not null default '[]'::jsonb,  -- the runs' input, as pgflow.start takes it
    queue           text,                        -- null: the workflow's queue
    priority        integer not null default 0,
    overlap         text not null default 'skip',
    catchup_window  interval not null default interval '10 minutes',
    jitter          interval,                    -- each tick fires up to this much late
    start_at        timestamptz,                 -- no tick before; also the interval's anchor
    end_at          timestamptz,                 -- no tick at or after
    paused          boolean not null default false,
    declared        boolean not null default false,  -- by pgflow.schedule() in workers' code
    handled_through timestamptz not null,        -- every tick up to here is decided
    next_fire_at    timestamptz,
    last_fired_at   timestamptz,                 -- engine time of the last tick that started a run
    created_at      timestamptz not null,
    updated_at      timestamptz not null,
    constraint schedules_id_length check (char_length(id) between 1 and 200),
    constraint schedules_one_spec check ((cron is null) <> (every is null)),
    constraint schedules_every_positive check (every > interval '0'),
    constraint schedules_overlap_known check (
        overlap in ('skip', 'buffer_one', 'buffer_all', 'cancel_other', 'allow_all')),
    constraint schedules_input_shape check (jsonb_typeof(input) in ('array', 'object')),
    constraint schedules_window check (end_at > start_at)
);
-- The leader's walk: due schedules in due order. Schedules that are not due
-- are never read, so firing costs the same with 10 or 100,000 of them.
create index schedules_due on pgflow.schedules (next_fire_at) where not paused;

-- One row a decided tick: what it did. 'buffered' ticks wait for the
-- schedule's unfinished run; 'missed' ones came due while no scheduler ran
-- (or the schedule was paused) and were older than its catch-up window;
-- 'failed' ones could not start their run (error says why: the workflow's
-- parameters changed under the schedule's input, say).
create table pgflow.schedule_ticks (
    schedule_id    text not null references pgflow.schedules (id) on delete cascade,
    scheduled_time timestamptz not null,
    outcome        text not null,
    run_id         uuid,
    error          text,
    recorded_at    timestamptz not null,
    primary key (schedule_id, scheduled_time),
    constraint schedule_ticks_outcome_known check (
        outcome in ('started', 'skipped', 'buffered', 'missed', 'failed')),
    constraint schedule_ticks_run_iff_started check ((outcome = 'started') = (run_id is not null))
);
create index schedule_ticks_buffered on pgflow.schedule_ticks (schedule_id, scheduled_time)
    where outcome = 'buffered';
-- Retention (pgflow.purge_schedule_ticks): the oldest records first.
create index schedule_ticks_recorded on pgflow.schedule_ticks (recorded_at);

-- ---------------------------------------------------------------------------
-- Checks
-- ---------------------------------------------------------------------------

-- A cron expression in the standard 5-field syntax: numbers, JAN-DEC and
-- SUN-SAT names, *, ranges a-b, steps /n and lists. cronsim, which iterates
-- it, also takes extensions (L, W, #, a seconds field): refused here, so an
-- expression means the same to every cron a user knows.
create function pgflow._check_cron(p_cron text) returns void
language plpgsql immutable
as $$
declare
    v_fields text[] := pg_catalog.regexp_split_to_array(pg_catalog.btrim(p_cron), '\s+');
    v_what   text[] := array['minute', 'hour', 'day of month', 'month', 'day of week'];
    v_low    integer[] := array[0, 0, 1, 1, 0];
    v_high   integer[] := array[59, 23, 31, 12, 7];
    v_months text[] := array['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN',
                             'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];
    v_days   text[] := array['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
    v_item   text;
    v_parts  text[];
    v_bound  text;
    v_values integer[];
    v_value  integer;
    i        integer;
begin
    if p_cron is null or cardinality(v_fields) <> 5 or v_fields[1] = '' then
        raise exception using errcode = 'PF002',
            message = format('cron expression %L must have 5 fields (minute hour day-of-month '
                             'month day-of-week), got %s', p_cron,
                             coalesce(cardinality(v_fields), 0));
    end if;
    for i in 1..5 loop
        foreach v_item in array pg_catalog.string_to_array(v_fields[i], ',') loop
            -- [1] the whole range part, [2] its start, [4] its end, [6] the step
            v_parts := pg_catalog.regexp_match(pg_catalog.upper(v_item),
                '^(\*|([0-9]+|[A-Z]{3})(-([0-9]+|[A-Z]{3}))?)(/([0-9]+))?$');
            if v_parts is null then
                raise exception using errcode = 'PF002',
                    message = format('cron expression %L: bad %s field %L', p_cron, v_what[i],
                                     v_fields[i]);
            end if;
            v_values := '{}';
            foreach v_bound in array array[v_parts[2], v_parts[4]] loop
                continue when v_bound is null;
                v_value := case
                    when v_bound ~ '^[0-9]+$' then least(v_bound::numeric, 1000)::integer
                    when i = 4 then pg_catalog.array_position(v_months, v_bound)
                    when i = 5 then pg_catalog.array_position(v_days, v_bound) - 1
                end;
                if v_value is null or v_value not between v_low[i] and v_high[i] then
                    raise exception using errcode = 'PF002',
                        message = format('cron expression %L: %s %L is out of range (%s-%s)',
                                         p_cron, v_what[i], v_bound, v_low[i], v_high[i]);
                end if;
                v_values := v_values || v_value;
            end loop;
            if cardinality(v_values) = 2 and v_values[1] > v_values[2] then
                raise exception using errcode = 'PF002',
                    message = format('cron expression %L: %s range %L runs backwards',
                                     p_cron, v_what[i], v_parts[1]);
            end if;
            if v_parts[6] is not null and v_parts[6]::numeric < 1 then
                raise exception using errcode = 'PF002',
                    message = format('cron expression %L: %s step must be at least 1',
                                     p_cron, v_what[i]);
            end if;
        end loop;
    end loop;
end;
$$;

-- An IANA time zone name (Europe/Paris, UTC), as Python's zoneinfo reads
-- it. The database must know it; POSIX rules (UTC+3) and offsets (+02:00)
-- are refused, since a DST rule is what a schedule needs the zone for.
create function pgflow._check_timezone(p_timezone text) returns void
language plpgsql stable
as $$
begin
    if p_timezone is null or p_timezone !~ '^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$'
       or (p_timezone ~ '^[A-Za-z]+[0-9+-]'  -- looks like a POSIX rule: the slow, exact check
           and not exists (select 1 from pg_catalog.pg_timezone_names z
                           where z.name = p_timezone)) then
        raise exception using errcode = 'PF002',
            message = format('unknown time zone %L: use an IANA name such as Europe/Paris or UTC',
                             p_timezone);
    end if;
    begin
        perform pg_catalog.now() at time zone p_timezone;
    exception when invalid_parameter_value then
        raise exception using errcode = 'PF002',
            message = format('unknown time zone %L: use an IANA name such as Europe/Paris or UTC',
                             p_timezone);
    end;
end;
$$;

-- An overlap policy by name.
create function pgflow._check_overlap(p_overlap text) returns void
language plpgsql immutable
as $$
begin
    if p_overlap is null or p_overlap not in ('skip', 'buffer_one', 'buffer_all',
                                              'cancel_other', 'allow_all') then
        raise exception using errcode = 'PF002',
            message = format('unknown overlap policy %L: use skip, buffer_one, buffer_all, '
                             'cancel_other or allow_all', p_overlap);
    end if;
end;
$$;

-- The schedule, locked for deciding its ticks; PF405 if there is none.
create function pgflow._lock_schedule(p_id text) returns pgflow.schedules
language plpgsql
as $$
declare
    v_schedule pgflow.schedules;
begin
    select s.* into v_schedule from pgflow.schedules s where s.id = p_id for no key update;
    if not found then
        raise exception using errcode = 'PF405', message = format('unknown schedule %L', p_id);
    end if;
    return v_schedule;
end;
$$;

-- ---------------------------------------------------------------------------
-- Deciding a tick
-- ---------------------------------------------------------------------------

-- Has the schedule a run that is not finished? (runs_schedule: its runs only.)
create function pgflow._schedule_busy(p_id text) returns boolean
language sql stable
as $$
    select exists (select 1 from pgflow.runs r
                   where r.schedule_id = p_id
                     and r.status not in ('completed', 'failed', 'cancelled'))
$$;

-- Start the run of one tick: key schedule:<id>:<time in UTC, ISO 8601>. If a
-- run with that key exists (the schedule was deleted and created again),
-- that run is the tick's run: a tick never starts twice. The caller records
-- the schedule's last_fired_at, once a call (pgflow._fired).
create function pgflow._start_tick(p_schedule pgflow.schedules, p_time timestamptz) returns uuid
language sql
as $$
    select pgflow._start(p_schedule.workflow, p_schedule.input,
                         key => 'schedule:' || p_schedule.id || ':'
                                || pg_catalog.to_char(p_time at time zone 'UTC',
                                       case when extract(microseconds from p_time)::bigint
                                                 % 1000000 = 0
                                            then 'YYYY-MM-DD"T"HH24:MI:SS"Z"'
                                            else 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"' end),
                         queue => p_schedule.queue, priority => p_schedule.priority,
                         schedule_id => p_schedule.id, scheduled_time => p_time)
$$;

-- These schedules started runs just now.
create function pgflow._fired(p_ids text[]) returns void
language sql
as $$
    update pgflow.schedules s set last_fired_at = pgflow.now() where s.id = any(p_ids)
$$;

-- Decide the tick at p_time of a schedule the caller has locked, by
-- p_overlap; record it. Returns the run it started, or null (skipped,
-- buffered, or decided before).
create function pgflow._fire_tick(p_schedule pgflow.schedules, p_time timestamptz,
                                  p_overlap text)
returns uuid
language plpgsql
as $$
declare
    v_busy    boolean;
    v_outcome text := 'started';
    v_run     uuid;
begin
    if exists (select 1 from pgflow.schedule_ticks t
               where t.schedule_id = p_schedule.id and t.scheduled_time = p_time) then
        return null;
    end if;
    v_busy := p_overlap <> 'allow_all' and pgflow._schedule_busy(p_schedule.id);
    if v_busy and p_overlap = 'skip' then
        v_outcome := 'skipped';
    elsif p_overlap = 'buffer_one' and v_busy then
        v_outcome := case when exists (select 1 from pgflow.schedule_ticks t
                                       where t.schedule_id = p_schedule.id
                                         and t.outcome = 'buffered')
                          then 'skipped' else 'buffered' end;
    elsif p_overlap = 'buffer_all'
          and (v_busy or exists (select 1 from pgflow.schedule_ticks t
                                 where t.schedule_id = p_schedule.id and t.outcome = 'buffered')) then
        v_outcome := 'buffered';
    else
        if v_busy and p_overlap = 'cancel_other' then
            perform pgflow.cancel(r.id) from pgflow.runs r
            where r.schedule_id = p_schedule.id
              and r.status not in ('completed', 'failed', 'cancelled')
            order by r.id;
        end if;
        v_run := pgflow._start_tick(p_schedule, p_time);
    end if;
    insert into pgflow.schedule_ticks (schedule_id, scheduled_time, outcome, run_id, recorded_at)
    values (p_schedule.id, p_time, v_outcome, v_run, pgflow.now());
    return v_run;
end;
$$;

-- ---------------------------------------------------------------------------
-- The scheduler leader (pgflow/ticker.py)
-- ---------------------------------------------------------------------------

-- Up to p_limit due schedules, earliest first, locked until the caller's
-- transaction ends (another leader skips them), with the engine time the
-- ticks are worked out against.
create function pgflow.due_schedules(p_limit integer default 500)
returns table (id text, cron text, every interval, timezone text,
               catchup_window interval, jitter interval, start_at timestamptz,
               end_at timestamptz, handled_through timestamptz, now timestamptz)
language sql
as $$
    select s.id, s.cron, s.every, s.timezone, s.catchup_window, s.jitter, s.start_at,
           s.end_at, s.handled_through, pgflow.now()
    from pgflow.schedules s
    where not s.paused and s.next_fire_at <= pgflow.now()
    order by s.next_fire_at
    limit p_limit
    for no key update of s skip locked
$$;

-- Record what the leader worked out for the schedules it took: the ticks
-- (p_tick_*: one element a tick, in order) and, for each schedule (p_ids),
-- its new cursor and next fire time. A tick's p_tick_outcomes is 'fire'
-- (decided here by the schedule's overlap policy), 'missed' (recorded, not
-- fired) or 'failed' (recorded with p_tick_errors: the leader could not start
-- it). Returns how many runs started.
create function pgflow.fire_schedules(
    p_ids             text[],
    p_handled_through timestamptz[],
    p_next_fire_at    timestamptz[],
    p_tick_schedules  text[],
    p_tick_times      timestamptz[],
    p_tick_outcomes   text[],
    p_tick_errors     text[]
) returns integer
language plpgsql
as $$
declare
    v_tick     record;
    v_schedule pgflow.schedules;
    v_started  integer := 0;
    v_fired    text[] := '{}';
begin
    for v_tick in
        select t.schedule_id, t.at, t.outcome, t.error
        from unnest(p_tick_schedules, p_tick_times, p_tick_outcomes, p_tick_errors)
             with ordinality as t(schedule_id, at, outcome, error, i)
        order by t.i
    loop
        if v_schedule.id is distinct from v_tick.schedule_id then
            v_schedule := pgflow._lock_schedule(v_tick.schedule_id);
        end if;
        if v_tick.outcome in ('missed', 'failed') then
            insert into pgflow.schedule_ticks (schedule_id, scheduled_time, outcome, error,
                                               recorded_at)
            values (v_tick.schedule_id, v_tick.at, v_tick.outcome, v_tick.error, pgflow.now())
            on conflict do nothing;
        elsif pgflow._fire_tick(v_schedule, v_tick.at, v_schedule.overlap) is not null then
            v_started := v_started + 1;
            v_fired := v_fired || v_tick.schedule_id;
        end if;
    end loop;
    perform pgflow._fired(v_fired);

    update pgflow.schedules s
    set handled_through = greatest(s.handled_through, u.handled_through),
        next_fire_at = u.next_fire_at
    from unnest(p_ids, p_handled_through, p_next_fire_at) as u(id, handled_through, next_fire_at)
    where s.id = u.id;
    return v_started;
end;
$$;

-- Start the oldest buffered tick of every schedule whose runs have all
-- finished. Returns how many started.
create function pgflow.start_buffered_ticks() returns integer
language plpgsql
as $$
declare
    v_id       text;
    v_schedule pgflow.schedules;
    v_time     timestamptz;
    v_run      uuid;
    v_started  integer := 0;
begin
    for v_id in
        select distinct t.schedule_id from pgflow.schedule_ticks t where t.outcome = 'buffered'
    loop
        select s.* into v_schedule from pgflow.schedules s
        where s.id = v_id for no key update skip locked;
        continue when not found or pgflow._schedule_busy(v_id);
        select t.scheduled_time into v_time from pgflow.schedule_ticks t
        where t.schedule_id = v_id and t.outcome = 'buffered'
        order by t.scheduled_time limit 1;
        continue when not found;
        v_run := pgflow._start_tick(v_schedule, v_time);
        update pgflow.schedule_ticks t set outcome = 'started', run_id = v_run
        where t.schedule_id = v_id and t.scheduled_time = v_time;
        perform pgflow._fired(array[v_id]);
        v_started := v_started + 1;
    end loop;
    return v_started;
end;
$$;

-- Retention: delete up to p_batch tick records older than p_older_than (real
-- time, like pgflow.purge), oldest first; buffered ticks, still to run, stay.
-- Call it until it returns 0 (`pgflow purge` does, after the runs).
create function pgflow.purge_schedule_ticks(p_older_than interval, p_batch integer default 1000)
returns integer
language plpgsql
as $$
declare
    v_deleted integer;
begin
    if p_older_than is null or p_older_than < interval '0' then
        raise exception using errcode = 'PF002', message = 'older_than must not be negative';
    end if;
    if p_batch is null or p_batch < 1 then
        raise exception using errcode = 'PF002', message = 'purge batch must be at least 1';
    end if;
    with old as (
        select t.schedule_id, t.scheduled_time from pgflow.schedule_ticks t
        where t.recorded_at < pg_catalog.statement_timestamp() - p_older_than
          and t.outcome <> 'buffered'
        order by t.recorded_at
        limit p_batch
        for update skip locked
    )
    delete from pgflow.schedule_ticks t using old
    where t.schedule_id = old.schedule_id and t.scheduled_time = old.scheduled_time;
    get diagnostics v_deleted = row_count;
    return v_deleted;
end;
$$;

-- A run started by a schedule has finished: if that schedule holds buffered
-- ticks, wake the leader to start the next one. Only a NOTIFY here: the
-- finishing transaction holds the run's row, and taking the schedule's row
-- after it would invert the lock order (schedule, then run).
create function pgflow._schedule_run_finished() returns trigger
language plpgsql
as $$
begin
    if exists (select 1 from pgflow.schedule_ticks t
               where t.schedule_id = new.schedule_id and t.outcome = 'buffered') then
        perform pg_catalog.pg_notify('pgflow_timer', '');
    end if;
    return null;
end;
$$;

-- Only rows of scheduled runs whose status became final fire it; the WHEN
-- clause is all that other runs' updates pay.
create trigger runs_schedule_finished
    after update of status on pgflow.runs
    for each row
    when (new.schedule_id is not null
          and new.status in ('completed', 'failed', 'cancelled')
          and old.status not in ('completed', 'failed', 'cancelled'))
    execute function pgflow._schedule_run_finished();

-- ---------------------------------------------------------------------------
-- Public: create, control, trigger, backfill
-- ---------------------------------------------------------------------------

-- Create or replace schedule `id`. Checks everything and writes nothing on a
-- bad argument: the workflow must be known (announced by a worker) and the
-- input must fit its parameters. next_fire_at is the first tick plus its
-- jitter as the caller's cron library computed it (pgflow.create_schedule in
-- Python does); null lets the leader work it out within moments. Replacing
-- a schedule keeps its cursor and next fire time unless the timing (cron,
-- every, timezone, jitter, start_at, end_at) changed. `declared` marks a
-- schedule of workers' code: replacing it keeps a pause made at runtime.
create function pgflow.create_schedule(
    id             text,
    workflow       text,
    cron           text default null,
    every          interval default null,
    timezone       text default 'UTC',
    input          jsonb default '[]'::jsonb,
    overlap        text default 'skip',
    catchup_window interval default interval '10 minutes',
    jitter         interval default null,
    start_at       timestamptz default null,
    end_at         timestamptz default null,
    paused         boolean default false,
    queue          text default null,
    priority       integer default 0,
    next_fire_at   timestamptz default null,
    declared       boolean default false
) returns void
language plpgsql
as $$
#variable_conflict use_variable
declare
    v_now      timestamptz := pgflow.now();
    v_version  text;
    v_params   jsonb;
begin
    perform pgflow._check_name(id, 'schedule id');
    perform pgflow._check_name(workflow, 'workflow name');
    if (cron is null) = (every is null) then
        raise exception using errcode = 'PF002',
            message = format('schedule %L needs exactly one of cron and every', id);
    end if;
    if cron is not null then
        perform pgflow._check_cron(cron);
    end if;
    perform pgflow._check_span(every, 'every', false);
    perform pgflow._check_timezone(timezone);
    perform pgflow._check_overlap(overlap);
    perform pgflow._check_span(catchup_window, 'catchup_window', true);
    perform pgflow._check_span(jitter, 'jitter', true);
    if catchup_window is null then
        raise exception using errcode = 'PF002', message = 'catchup_window must not be null';
    end if;
    if start_at is not null and end_at is not null and end_at <= start_at then
        raise exception using errcode = 'PF002',
            message = format('schedule %L ends (%s) before it starts (%s)', id, end_at, start_at);
    end if;
    if queue is not null then
        perform pgflow._check_name(queue, 'queue');
    end if;
    if input is null or jsonb_typeof(input) not in ('array', 'object') then
        raise exception using errcode = 'PF002',
            message = 'schedule input must be a JSON array (positional arguments) or object (keyword arguments)';
    end if;
    perform pgflow._check_payload(input, format('the input of schedule %L', id));

    select w.version, w.params into v_version, v_params
    from pgflow.workflows w where w.name = workflow
    order by w.first_seen desc limit 1;
    if not found then
        raise exception using errcode = 'PF002',
            message = format('unknown workflow %L: no worker has registered it '
                             '(start a worker that defines it first)', workflow);
    end if;
    perform pgflow._check_input(workflow, v_version, v_params, input);

    insert into pgflow.schedules as s (
        id, workflow, cron, every, timezone, input, queue, priority, overlap, catchup_window,
        jitter, start_at, end_at, paused, declared, handled_through, next_fire_at,
        created_at, updated_at)
    values (
        id, workflow, cron, every, timezone, input, queue, coalesce(priority, 0), overlap,
        catchup_window, nullif(jitter, interval '0'), start_at, end_at, coalesce(paused, false),
        coalesce(declared, false), v_now, coalesce(next_fire_at, v_now), v_now, v_now)
    on conflict on constraint schedules_pkey do update
    set workflow = excluded.workflow, cron = excluded.cron, every = excluded.every,
        timezone = excluded.timezone, input = excluded.input, queue = excluded.queue,
        priority = excluded.priority, overlap = excluded.overlap,
        catchup_window = excluded.catchup_window, jitter = excluded.jitter,
        start_at = excluded.start_at, end_at = excluded.end_at,
        paused = case when excluded.declared and s.declared then s.paused
                      else excluded.paused end,
        declared = excluded.declared, updated_at = excluded.updated_at,
        -- A new timing starts from now: it neither fires nor misses ticks of the old one.
        handled_through = case when (s.cron, s.every, s.timezone, s.jitter, s.start_at, s.end_at)
                                    is distinct from (excluded.cron, excluded.every,
                                                      excluded.timezone, excluded.jitter,
                                                      excluded.start_at, excluded.end_at)
                               then excluded.handled_through else s.handled_through end,
        next_fire_at = case when (s.cron, s.every, s.timezone, s.jitter, s.start_at, s.end_at)
                                 is distinct from (excluded.cron, excluded.every,
                                                   excluded.timezone, excluded.jitter,
                                                   excluded.start_at, excluded.end_at)
                            then excluded.next_fire_at else s.next_fire_at end;
    perform pg_catalog.pg_notify('pgflow_timer', '');  -- the leader recomputes its sleep
end;
$$;

-- A paused schedule starts nothing; its ticks wait, decided on resume.
create function pgflow.pause_schedule(id text) returns void
language plpgsql
as $$
begin
    perform pgflow._lock_schedule(pause_schedule.id);
    update pgflow.schedules s set paused = true, updated_at = pgflow.now()
    where s.id = pause_schedule.id;
end;
$$;

-- Resume: the leader then decides the ticks that came due meanwhile, firing
-- those within the catch-up window (by the overlap policy) and recording the
-- older ones as missed.
create function pgflow.resume_schedule(id text) returns void
language plpgsql
as $$
begin
    perform pgflow._lock_schedule(resume_schedule.id);
    update pgflow.schedules s set paused = false, updated_at = pgflow.now()
    where s.id = resume_schedule.id;
    perform pg_catalog.pg_notify('pgflow_timer', '');
end;
$$;

-- Delete a schedule and its tick records; the runs it started stay.
create function pgflow.delete_schedule(id text) returns void
language plpgsql
as $$
begin
    perform pgflow._lock_schedule(delete_schedule.id);
    delete from pgflow.schedules s where s.id = delete_schedule.id;
end;
$$;

-- Start one run now, as a tick at the current engine time would, whatever
-- the overlap policy (asking for a run is the point). Returns its id.
create function pgflow.trigger_schedule(id text) returns uuid
language plpgsql
as $$
declare
    v_schedule pgflow.schedules := pgflow._lock_schedule(trigger_schedule.id);
begin
    perform pgflow._fired(array[v_schedule.id]);
    -- Two triggers in one statement share its instant, and so its tick and run.
    return coalesce(pgflow._fire_tick(v_schedule, pgflow.now(), 'allow_all'),
                    (select t.run_id from pgflow.schedule_ticks t
                     where t.schedule_id = v_schedule.id and t.scheduled_time = pgflow.now()));
end;
$$;

-- One run for every tick in [start_at, end_at), decided by `overlap`
-- (default: start them all). Ticks decided before (by the leader or an
-- earlier backfill) start nothing, so a repeated backfill starts nothing
-- new. Returns the runs it started. An interval schedule's ticks are worked
-- out here; a cron schedule's come in `ticks`, from the caller's cron
-- library (pgflow.backfill_schedule in Python, `pgflow schedule backfill`).
create function pgflow.backfill_schedule(
    id       text,
    start_at timestamptz,
    end_at   timestamptz,
    overlap  text default 'allow_all',
    ticks    timestamptz[] default null
) returns setof uuid
language plpgsql
as $$
#variable_conflict use_variable
declare
    v_schedule pgflow.schedules;
    v_anchor   timestamptz;
    v_step     double precision;
    v_tick     timestamptz;
    v_run      uuid;
    v_started  boolean := false;
begin
    if start_at is null or end_at is null or end_at <= start_at then
        raise exception using errcode = 'PF002',
            message = format('backfill of schedule %L: end (%s) must be after start (%s)',
                             id, end_at, start_at);
    end if;
    if end_at > pgflow.now() then
        raise exception using errcode = 'PF002',
            message = format('backfill of schedule %L: end (%s) is in the future; '
                             'future ticks fire on time', id, end_at);
    end if;
    perform pgflow._check_overlap(overlap);
    v_schedule := pgflow._lock_schedule(id);
    if v_schedule.every is not null then
        -- Ticks are anchor + k * every (anchor: start_at, else the Unix epoch).
        v_anchor := coalesce(v_schedule.start_at, 'epoch'::timestamptz);
        v_step := extract(epoch from v_schedule.every);
        ticks := array(
            select v_anchor + k * v_schedule.every
            from generate_series(
                     ceil(extract(epoch from start_at - v_anchor) / v_step)::bigint,
                     ceil(extract(epoch from end_at - v_anchor) / v_step)::bigint - 1) as k);
    elsif ticks is null then
        raise exception using errcode = 'PF002',
            message = format('backfill of cron schedule %L needs its ticks: cron is worked out '
                             'by pgflow.backfill_schedule in Python or `pgflow schedule backfill`',
                             id);
    elsif exists (select 1 from unnest(ticks) t where t < start_at or t >= end_at) then
        raise exception using errcode = 'PF002',
            message = format('backfill of schedule %L: a tick lies outside [%s, %s)',
                             id, start_at, end_at);
    end if;
    foreach v_tick in array array(select distinct t from unnest(ticks) t order by t) loop
        v_run := pgflow._fire_tick(v_schedule, v_tick, overlap);
        if v_run is not null then
            v_started := true;
            return next v_run;
        end if;
    end loop;
    if v_started then
        perform pgflow._fired(array[v_schedule.id]);
    end if;
end;
$$;
