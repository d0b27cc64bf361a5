-- pgflow engine, revision 0008: flow control (concurrency limits, rate limits, paused queues).
--
-- Changes: tables pgflow.queue_settings, pgflow.slots and
-- pgflow.scope_rechecks, view pgflow.queues
-- (new); columns pgflow.workflows.concurrency_limit, concurrency_param and
-- pgflow.runs.concurrency_key, held_by, holds_slots (new); index
-- runs_claimable (rebuilt: parked runs are not in it; building it reads the
-- runs table once and blocks writes to it meanwhile), runs_held and
-- runs_keyed_ready (new);
-- trigger runs_flow on pgflow.runs (new); the functions of
-- sql/schema/13_flow_control.sql (new: set_queue, pause_queue,
-- resume_queue, wake_queues and their helpers); pgflow.next_wake_in
-- (replaced: also the next rate slot), pgflow.claim_runs (re-created, a
-- new result column limited: enforces the limits), pgflow.register_worker (replaced, same
-- signature: records announced limits), pgflow.complete_batch (replaced,
-- same signature: gives a batch's slots back at once), pgflow._start (replaced: a
-- trailing defaulted parameter, the run's concurrency key; internal),
-- pgflow.start_run (new: start with every option, concurrency_key too;
-- pgflow.start keeps the arguments of 0.1.0), pgflow._privileges
-- (replaced). Workers of 0.1.0 and of revision 0007 keep running on it:
-- their claim goes through claim_runs and obeys queue caps and pauses;
-- they announce no workflow limits.

alter table pgflow.workflows
    -- Concurrency(limit, key) of the workflow (13_flow_control.sql): at most
    -- concurrency_limit runs executing, per value of the parameter
    -- concurrency_param when it is set. Null: no limit.
    add column concurrency_limit integer,
    add column concurrency_param text;

alter table pgflow.runs
    add column concurrency_key text,                    -- its value of its workflow's Concurrency key
    add column held_by      text,                       -- pending, parked by this full scope (13_flow_control.sql)
    add column holds_slots  boolean not null default false;  -- running with concurrency slots taken

-- The claim: only pending runs are in it, so its cost is independent of
-- finished history and of suspended runs (sleeping runs, delayed starts and
-- retry back-offs wait as 'sleeping' with a timer, outside this index), and
-- of runs parked by a full concurrency scope (held_by, 13_flow_control.sql).
drop index pgflow.runs_claimable;
create index runs_claimable on pgflow.runs (queue, priority desc, available_at)
    where status = 'pending' and held_by is null;

--
-- Every limit is enforced by the claim, run by run, with rows that claimers
-- take with FOR UPDATE SKIP LOCKED: no count(*), no REPEATABLE READ, no
-- table lock, and a claimer never waits for another.
--
-- * A concurrency limit of L is L rows of pgflow.slots sharing a scope:
--     queue:<queue>              set_queue(concurrency => L)
--     workflow:<name>            Concurrency(L) without a key
--     key:["<name>", "<value>"]  Concurrency(L, key=...): one scope a key value
--   The claim takes one free slot of each scope a run is in. Only executing
--   runs hold slots: the trigger runs_flow gives them back in the very update
--   that takes the run out of 'running' (sleep, wait, retry back-off,
--   completion, failure, cancellation, release, recovery of a dead worker),
--   whichever procedure makes it, under that procedure's fencing.
-- * A rate limit of N per window is N rows of scope rate:<queue>, each usable
--   once a window: a slot taken at t is free again at t + window. So no
--   window of that length sees more than N claims of the queue (a token
--   bucket would let a full bucket's burst through on top of the rate).
--   Every claim takes one, a resumption after a sleep or wait included.
-- * Queue limits gate the whole queue: when its slots are taken or its rate
--   is spent, the claim takes nothing more from it. A freed queue slot
--   NOTIFYs the queue; a spent rate records when its next slot frees
--   (queue_settings.rate_blocked_until) and the scheduler leader wakes the
--   queue then (pgflow.wake_queues).
-- * A full workflow or key scope must not hold up the runs queued behind its
--   runs (one customer's backlog would starve every other customer), so the
--   claim parks a run whose scope is full: runs.held_by names the scope and
--   takes the run out of runs_claimable, still 'pending'. Each slot the scope
--   frees unparks its best parked run (priority, then age).
-- * Parking and unparking serialize on a transaction advisory lock of the
--   scope (classid 7366505), and nobody waits for it: a claimer that cannot
--   take it leaves the run for a later claim; a release that cannot take it
--   (a claimer may be parking a run it cannot see yet) leaves the scope in
--   pgflow.scope_rechecks and wakes the scheduler leader, which unparks the
--   scope's best run once the lock is free if a slot is (pgflow.wake_queues).
--   So a park never misses the release that should end it, and no two
--   transactions that give back slots of several scopes (a batch of
--   completions, a recovery) can deadlock on the scopes' locks.

create table pgflow.queue_settings (
    name        text primary key,
    concurrency integer,             -- executing runs of the queue, at most; null: no cap
    rate_limit  integer,             -- claims of the queue in any window of rate_per, at most
    rate_per    interval,
    paused      boolean not null default false,
    -- A claim found the rate spent: the leader wakes the queue at this time.
    rate_blocked_until timestamptz,
    -- A claim found the queue at its cap and took nothing: its worker idles
    -- until a release NOTIFYs the queue. Releases notify only then: a NOTIFY
    -- serializes the commits of every transaction that sends one, which a
    -- busy capped queue would pay on every completion.
    starved     boolean not null default false,
    updated_at  timestamptz not null,
    constraint queue_settings_name_length check (char_length(name) between 1 and 200),
    constraint queue_settings_concurrency check (concurrency is null or concurrency between 1 and 100000),
    constraint queue_settings_rate check (
        (rate_limit is null) = (rate_per is null)
        and (rate_limit is null or rate_limit between 1 and 100000)
        and (rate_per is null or rate_per > interval '0'))
);
create index queue_settings_rate_blocked on pgflow.queue_settings (rate_blocked_until)
    where rate_blocked_until is not null;

-- Scopes whose freed slot a release could not hand to a parked run (their
-- advisory lock was taken): the leader looks again (pgflow.wake_queues).
create table pgflow.scope_rechecks (
    scope     text not null,
    queued_at timestamptz not null
);

create table pgflow.slots (
    scope   text not null,
    slot    integer not null,            -- 1..limit; rows above a lowered limit are not taken
    run_id  uuid,                        -- concurrency: the executing run that holds it
    free_at timestamptz not null default '-infinity',  -- rate: not taken again before this (a time)
    primary key (scope, slot)
) with (fillfactor = 70);
-- Releases find a run's slots; the claim finds a scope's free concurrency
-- slot (the first in slot order: one index entry read whatever the limit),
-- and a queue's least recently used rate slot.
create index slots_held on pgflow.slots (run_id) where run_id is not null;
create index slots_free on pgflow.slots (scope, slot) where run_id is null;
-- Rate slots only (a concurrency slot's free_at stays -infinity): taking and
-- giving back concurrency slots does not maintain it.
create index slots_rate on pgflow.slots (scope, free_at) where free_at > '-infinity';

-- Parked runs of a scope, best first: what a freed slot unparks.
create index runs_held on pgflow.runs (held_by, priority desc, available_at)
    where held_by is not null;
-- The ready runs of one key of a workflow: what _park parks at once. Runs
-- without a concurrency key are not in it (they never pay for it).
create index runs_keyed_ready on pgflow.runs (name, concurrency_key)
    where status = 'pending' and held_by is null and concurrency_key is not null;

-- ---------------------------------------------------------------------------
-- Scopes and slots
-- ---------------------------------------------------------------------------

-- The scope of a workflow's own limit: per key value when the limit has a key.
create function pgflow._workflow_scope(p_name text, p_param text, p_key text) returns text
language sql immutable
as $$
    select case when p_param is null then 'workflow:' || p_name
                else 'key:' || pg_catalog.jsonb_build_array(p_name, p_key)::text end
$$;

-- The key of a run under Concurrency(key=param): that argument of its input,
-- as text (a JSON string's value, else the JSON), found by name in an object
-- or by position in an array. Null when the input does not give it.
create function pgflow._concurrency_key(p_params jsonb, p_param text, p_input jsonb)
returns text
language sql immutable
as $$
    select case
        when p_param is null then null
        when pg_catalog.jsonb_typeof(p_input) = 'object' then p_input ->> p_param
        else p_input ->> (
            select (a.i - 1)::integer
            from pg_catalog.jsonb_array_elements(p_params) with ordinality as a(p, i)
            where a.p ->> 'name' = p_param
              and a.p ->> 'kind' in ('positional_only', 'positional'))
    end
$$;

-- Park a run on its full scope (the caller holds the scope's lock). For a
-- key scope, park the key's whole ready backlog with it in one statement
-- (index runs_keyed_ready): a claim that met one customer's 10,000 queued
-- runs parks them at once instead of walking them a bounded batch a call,
-- and the next run of another customer is claimed right after.
create function pgflow._park(p_scope text, p_run_id uuid, p_name text, p_key text,
                             p_keyed boolean) returns void
language plpgsql
as $$
begin
    update pgflow.runs r set held_by = p_scope where r.id = p_run_id;
    if p_keyed and p_key is not null then
        update pgflow.runs r set held_by = p_scope
        where r.id in (select k.id from pgflow.runs k
                       where k.name = p_name and k.concurrency_key = p_key
                         and k.status = 'pending' and k.held_by is null
                       for update skip locked);
    end if;
end;
$$;

-- Take a free slot of the scope for a run: true if it got one. Slots locked
-- by another transaction are skipped, never waited for.
create function pgflow._take_slot(p_scope text, p_limit integer, p_run_id uuid)
returns boolean
language plpgsql
as $$
declare
    v_slot integer;
begin
    select s.slot into v_slot
    from pgflow.slots s
    where s.scope = p_scope and s.run_id is null and s.slot <= p_limit
    order by s.slot
    limit 1
    for update skip locked;
    if not found then
        return false;
    end if;
    update pgflow.slots s set run_id = p_run_id where s.scope = p_scope and s.slot = v_slot;
    return true;
end;
$$;

-- Undo _take_slot within the claim that took it (the run could not take
-- another slot it needs).
create function pgflow._give_back_slot(p_scope text, p_run_id uuid) returns void
language sql
as $$
    update pgflow.slots s set run_id = null where s.scope = p_scope and s.run_id = p_run_id
$$;

-- Create the slots of a scope up to its limit (lazily, the first time a run
-- of a workflow or key scope needs one, or after its limit was raised).
-- Call it holding the scope's advisory lock: inserts of the same rows by two
-- transactions would wait for each other.
create function pgflow._ensure_slots(p_scope text, p_limit integer) returns void
language sql
as $$
    insert into pgflow.slots (scope, slot)
    select p_scope, g from pg_catalog.generate_series(1, p_limit) g
    where not exists (select 1 from pgflow.slots s where s.scope = p_scope and s.slot = p_limit)
    on conflict do nothing
$$;

-- Slot p_slot (at most p_limit) was just freed: if a run holds a slot above
-- the limit (it was lowered while the run executed), move that run into it
-- and drop the higher slot. True if it did.
create function pgflow._hand_down_slot(p_scope text, p_slot integer, p_limit integer)
returns boolean
language plpgsql
as $$
declare
    v_high record;
begin
    select s.slot, s.run_id into v_high
    from pgflow.slots s
    where s.scope = p_scope and s.slot > p_limit and s.run_id is not null
    order by s.slot desc
    limit 1
    for update skip locked;
    if not found then
        return false;
    end if;
    delete from pgflow.slots s where s.scope = p_scope and s.slot = v_high.slot;
    update pgflow.slots s set run_id = v_high.run_id where s.scope = p_scope and s.slot = p_slot;
    return true;
end;
$$;

-- Take a rate slot of the queue: the free_at it had (to give it back), or
-- null when every slot was used within the last window.
create function pgflow._take_rate_slot(p_queue text, p_limit integer, p_per interval,
                                       p_now timestamptz)
returns timestamptz
language plpgsql
as $$
declare
    v_slot integer;
    v_was  timestamptz;
begin
    select s.slot, s.free_at into v_slot, v_was
    from pgflow.slots s
    where s.scope = 'rate:' || p_queue and s.slot <= p_limit and s.free_at <= p_now
      and s.free_at > '-infinity'  -- the index slots_rate
    order by s.free_at
    limit 1
    for update skip locked;
    if not found then
        return null;
    end if;
    update pgflow.slots s set free_at = p_now + p_per
    where s.scope = 'rate:' || p_queue and s.slot = v_slot;
    return v_was;
end;
$$;

-- The queue's rate is spent: record when its next slot frees, so that the
-- leader wakes the queue's workers then. A row another claimer or set_queue
-- holds is skipped (that one records it, or changes the limit).
create function pgflow._rate_blocked(p_queue text, p_limit integer) returns void
language plpgsql
as $$
declare
    v_until timestamptz := (select min(s.free_at) from pgflow.slots s
                            where s.scope = 'rate:' || p_queue and s.slot <= p_limit);
begin
    update pgflow.queue_settings q set rate_blocked_until = v_until
    where q.name = (select q2.name from pgflow.queue_settings q2
                    where q2.name = p_queue
                      and q2.rate_blocked_until is distinct from v_until
                    for update skip locked);
    if found then
        perform pg_catalog.pg_notify('pgflow_timer', '');  -- the leader recomputes its sleep
    end if;
end;
$$;

-- ---------------------------------------------------------------------------
-- The claim under limits (pgflow.claim_runs calls it when any limit or pause
-- concerns the worker's queues or workflows)
-- ---------------------------------------------------------------------------

-- Choose and lock up to p_limit runs that may start now, taking their slots,
-- and park the runs whose workflow or key scope is full. Walks each open
-- queue in claim order (priority, then age), a bounded number of runs a
-- call. Returns the chosen runs; slotted: those that hold concurrency slots.
create function pgflow._claim_under_limits(
    p_queues   text[],
    p_names    text[],
    p_versions text[],
    p_limit    integer,
    p_now      timestamptz,
    out chosen  uuid[],
    out slotted uuid[]
)
language plpgsql
as $$
declare
    -- Runs examined per queue and round: the first round what the claim
    -- asks for (every candidate is locked until commit: locking more costs
    -- every claim); when runs were parked or passed over, later rounds look
    -- further, up to c_walk.
    c_walk  constant integer := 128;
    v_open  text[];
    v_seen  uuid[] := '{}';
    v_round integer := 0;
    v_met   integer;
    v_scope text;
    v_took  boolean;
    v_full  text[] := '{}';  -- scopes found full (and locked) in this call
    v_busy  text[] := '{}';  -- scopes whose lock another transaction holds
    v_capped text[];         -- queues found at their cap
    c       record;
begin
    chosen := '{}';
    slotted := '{}';
    -- Open: not paused, and with a free queue slot if the queue has a cap
    -- (else capped).
    select coalesce(array_agg(o.queue) filter (where o.free), '{}'),
           coalesce(array_agg(o.queue) filter (where not o.free), '{}')
    into v_open, v_capped
    from (select q.queue,
                 s.concurrency is null
                 or exists (select 1 from pgflow.slots f
                            where f.scope = 'queue:' || q.queue and f.run_id is null
                              and f.slot <= s.concurrency) as free
          from pg_catalog.unnest(p_queues) as q(queue)
          left join pgflow.queue_settings s on s.name = q.queue
          where not coalesce(s.paused, false)) o;

    while cardinality(chosen) < p_limit and cardinality(v_open) > 0 and v_round < 4 loop
        v_round := v_round + 1;
        v_met := 0;
        for c in
            select r.id, r.name, r.queue, r.concurrency_key, w.concurrency_limit,
                   w.concurrency_param, s.concurrency as queue_limit, s.rate_limit, s.rate_per
            from pg_catalog.unnest(v_open) as q(queue)
            cross join lateral (
                select r.id, r.name, r.version, r.queue, r.concurrency_key, r.priority,
                       r.available_at
                from pgflow.runs r
                where r.status = 'pending'
                  and r.held_by is null
                  and r.queue = q.queue
                  and r.available_at <= p_now
                  and (r.name, r.version) in (select t.n, t.v
                                              from unnest(p_names, p_versions) as t(n, v))
                  and r.id <> all (v_seen)
                order by r.priority desc, r.available_at
                limit case when v_round = 1 then p_limit else c_walk end
                for update skip locked
            ) r
            left join pgflow.workflows w on w.name = r.name and w.version = r.version
            left join pgflow.queue_settings s on s.name = r.queue
            order by r.priority desc, r.available_at
        loop
            v_met := v_met + 1;
            v_seen := v_seen || c.id;
            continue when not c.queue = any (v_open)
                       or cardinality(chosen) >= p_limit;
            v_took := false;
            v_scope := null;

            -- The workflow's own limit: a full scope parks the run.
            if c.concurrency_limit is not null then
                v_scope := pgflow._workflow_scope(c.name, c.concurrency_param,
                                                  c.concurrency_key);
                -- Busy with another claimer or a release earlier in this
                -- call: the run waits for a later claim.
                continue when v_scope = any (v_busy);
                if v_scope = any (v_full) then
                    perform pgflow._park(v_scope, c.id, c.name, c.concurrency_key, false);
                    continue;
                end if;
                if not pgflow._take_slot(v_scope, c.concurrency_limit, c.id) then
                    if not pg_catalog.pg_try_advisory_xact_lock(
                            7366505, pg_catalog.hashtext(v_scope)) then
                        v_busy := v_busy || v_scope;
                        continue;
                    end if;
                    perform pgflow._ensure_slots(v_scope, c.concurrency_limit);
                    if not pgflow._take_slot(v_scope, c.concurrency_limit, c.id) then
                        v_full := v_full || v_scope;  -- and locked by us until commit
                        perform pgflow._park(v_scope, c.id, c.name, c.concurrency_key,
                                             c.concurrency_param is not null);
                        continue;
                    end if;
                end if;
                v_took := true;
            end if;

            -- The queue's cap: when it is full the queue is done for this call.
            if c.queue_limit is not null then
                if not pgflow._take_slot('queue:' || c.queue, c.queue_limit, c.id) then
                    if v_took then
                        perform pgflow._give_back_slot(v_scope, c.id);
                    end if;
                    v_open := pg_catalog.array_remove(v_open, c.queue);
                    v_capped := v_capped || c.queue;
                    continue;
                end if;
                v_took := true;
            end if;

            -- The queue's rate: spent, the queue is done until a slot frees.
            if c.rate_limit is not null
               and pgflow._take_rate_slot(c.queue, c.rate_limit, c.rate_per, p_now) is null then
                perform pgflow._give_back_slot(sc, c.id)
                from pg_catalog.unnest(array[v_scope, 'queue:' || c.queue]) sc
                where v_took;
                v_open := pg_catalog.array_remove(v_open, c.queue);
                perform pgflow._rate_blocked(c.queue, c.rate_limit);
                continue;
            end if;

            chosen := chosen || c.id;
            if v_took then
                slotted := slotted || c.id;
            end if;
        end loop;
        exit when v_met = 0;
    end loop;
    perform pgflow._mark_starved(v_capped, chosen);
    -- The walk stopped at its bound with runs still to look at: wake this
    -- queue's workers (this one included) to claim again at once rather
    -- than at their next poll.
    if v_round = 4 and v_met > 0 and cardinality(chosen) < p_limit then
        perform pgflow._notify_ready(q) from pg_catalog.unnest(v_open) q;
    end if;
end;
$$;

-- After a claim: nothing taken and a queue at its cap, ask that queue's
-- releases to wake its workers (queue_settings.starved); something taken
-- from a starved queue, its releases need not wake anyone any more.
create function pgflow._mark_starved(p_capped text[], p_chosen uuid[]) returns void
language plpgsql
as $$
begin
    if cardinality(p_chosen) = 0 and cardinality(p_capped) > 0 then
        update pgflow.queue_settings q set starved = true
        where q.name in (select q2.name from pgflow.queue_settings q2
                         where q2.name = any (p_capped) and not q2.starved
                         for update skip locked);
    elsif cardinality(p_chosen) > 0 then
        update pgflow.queue_settings q set starved = false
        where q.name in (select q2.name from pgflow.queue_settings q2
                         where q2.starved
                           and q2.name in (select r.queue from pgflow.runs r
                                           where r.id = any (p_chosen))
                         for update skip locked);
    end if;
end;
$$;

-- The claim when the only limits in play are queue caps (no workflow limit
-- among the worker's workflows, no rate, pauses allowed): per queue, lock
-- its free slots, then as many ready runs, and pair them in one update,
-- three statements a queue instead of a walk run by run.
create function pgflow._claim_capped(
    p_queues   text[],
    p_names    text[],
    p_versions text[],
    p_limit    integer,
    p_now      timestamptz,
    out chosen  uuid[],
    out slotted uuid[]
)
language plpgsql
as $$
declare
    v_capped text[] := '{}';
    v_slots  integer[];
    v_ids    uuid[];
    q        record;
begin
    chosen := '{}';
    slotted := '{}';
    for q in
        select u.queue, s.concurrency
        from pg_catalog.unnest(p_queues) as u(queue)
        left join pgflow.queue_settings s on s.name = u.queue
        where not coalesce(s.paused, false)
    loop
        exit when cardinality(chosen) >= p_limit;
        v_slots := null;  -- no cap: as many runs as the claim still wants
        if q.concurrency is not null then
            v_slots := array(
                select f.slot from pgflow.slots f
                where f.scope = 'queue:' || q.queue and f.run_id is null
                  and f.slot <= q.concurrency
                order by f.slot
                limit p_limit - cardinality(chosen)
                for update skip locked);
            if cardinality(v_slots) = 0 then
                v_capped := v_capped || q.queue;
                continue;
            end if;
        end if;
        v_ids := array(
            select r.id
            from pgflow.runs r
            where r.status = 'pending'
              and r.held_by is null
              and r.queue = q.queue
              and r.available_at <= p_now
              and (r.name, r.version) in (select t.n, t.v
                                          from unnest(p_names, p_versions) as t(n, v))
            order by r.priority desc, r.available_at
            limit coalesce(cardinality(v_slots), p_limit - cardinality(chosen))
            for update skip locked);
        if q.concurrency is not null then
            update pgflow.slots f set run_id = t.id
            from unnest(v_slots[1:cardinality(v_ids)], v_ids) as t(slot, id)
            where f.scope = 'queue:' || q.queue and f.slot = t.slot;
            slotted := slotted || v_ids;
        end if;
        chosen := chosen || v_ids;
    end loop;
    perform pgflow._mark_starved(v_capped, chosen);
end;
$$;

-- ---------------------------------------------------------------------------
-- Giving slots back (trigger on pgflow.runs)
-- ---------------------------------------------------------------------------

-- Unpark the best p_count parked runs of a scope (priority, then age) and
-- wake their queues; returns how many. The caller holds the scope's lock.
create function pgflow._unpark(p_scope text, p_count integer) returns integer
language sql
as $$
    with woken as (
        update pgflow.runs r set held_by = null
        where r.id in (select p.id from pgflow.runs p
                       where p.held_by = p_scope and p.status = 'pending'
                       order by p.priority desc, p.available_at
                       limit p_count
                       for update skip locked)
        returning r.queue
    )
    select count(pgflow._notify_ready(w.queue) is null)::integer from woken w
$$;

-- Give back the slots of runs that stop executing (the trigger runs_flow for
-- one run, complete_batch for a batch), scope by scope in scope order: wake
-- the queue of a freed queue slot if an idle worker asked for it
-- (queue_settings.starved), unpark as many of a workflow or key scope's
-- parked runs as it freed slots, best first. Slots above a lowered limit
-- (or of a removed one) free no capacity and go; under a lowered limit a
-- run still holding a slot above it takes a freed one first.
create function pgflow._give_back_slots(p_run_ids uuid[]) returns void
language plpgsql
as $$
declare
    g         record;
    v_limit   integer;
    v_starved boolean;
    v_freed   integer;  -- slots of the scope that free capacity
    v_slot    integer;
begin
    for g in
        with held as (
            select s.scope, s.slot, s.run_id from pgflow.slots s
            where s.run_id = any (p_run_ids)
            for update
        ), freed as (  -- (RETURNING gives the new run_id, null: hence held)
            update pgflow.slots s set run_id = null
            from held h
            where s.scope = h.scope and s.slot = h.slot
            returning h.scope, h.slot, h.run_id
        )
        select f.scope, pg_catalog.array_agg(f.slot order by f.slot) as slots,
               min(r.queue) as queue, min(r.name) as name, min(r.version) as version
        from freed f
        join pgflow.runs r on r.id = f.run_id
        group by f.scope
        order by f.scope  -- one lock order
    loop
        v_starved := false;
        if g.scope like 'queue:%' then
            select q.concurrency, q.starved into v_limit, v_starved
            from pgflow.queue_settings q where q.name = g.queue;
        else
            select w.concurrency_limit into v_limit
            from pgflow.workflows w where w.name = g.name and w.version = g.version;
        end if;
        -- The limit was removed or lowered since the claim: these slots go.
        delete from pgflow.slots s
        where s.scope = g.scope and s.slot = any (g.slots)
          and (v_limit is null or s.slot > v_limit) and s.run_id is null;
        v_freed := (select count(*) from unnest(g.slots) x where x <= v_limit);
        continue when coalesce(v_freed, 0) = 0;
        if exists (select 1 from pgflow.slots h
                   where h.scope = g.scope and h.slot > v_limit and h.run_id is not null) then
            foreach v_slot in array g.slots loop
                continue when v_slot > v_limit;
                if pgflow._hand_down_slot(g.scope, v_slot, v_limit) then
                    v_freed := v_freed - 1;
                end if;
            end loop;
            continue when v_freed = 0;
        end if;

        if g.scope like 'queue:%' then
            if v_starved then
                perform pgflow._notify_ready(g.queue);  -- an idle worker waits for it
            end if;
            continue;
        end if;
        if not pg_catalog.pg_try_advisory_xact_lock(7366505, pg_catalog.hashtext(g.scope)) then
            -- A claimer may be parking a run here right now: the leader looks
            -- again once it is done (see the header).
            insert into pgflow.scope_rechecks (scope, queued_at) values (g.scope, pgflow.now());
            perform pg_catalog.pg_notify('pgflow_timer', '');
            continue;
        end if;
        perform pgflow._unpark(g.scope, v_freed);
    end loop;
end;
$$;

-- A run leaves 'running' (any procedure, any reason) holding slots: give
-- them back (complete_batch does it for its batch at once and clears
-- holds_slots itself). A parked run that stops being pending (cancelled) is
-- parked no more.
create function pgflow._runs_flow() returns trigger
language plpgsql
as $$
begin
    if old.status = 'running' and new.status <> 'running' and new.holds_slots then
        new.holds_slots := false;
        perform pgflow._give_back_slots(array[old.id]);
    end if;
    if old.held_by is not null and new.status <> 'pending' then
        new.held_by := null;
    end if;
    return new;
end;
$$;

-- Only the updates that matter fire it; every other update of a run pays the
-- WHEN test alone.
create trigger runs_flow
    before update of status on pgflow.runs
    for each row
    when ((old.status = 'running' and new.status <> 'running' and new.holds_slots)
          or (old.held_by is not null and new.status <> 'pending'))
    execute function pgflow._runs_flow();

-- Unpark every parked run of a workflow (its limit changed: a worker
-- announced another one); returns how many. The next claims park again those
-- still over the limit. (NOTIFY sends a payload once a transaction.)
create function pgflow._unpark_workflow(p_name text) returns integer
language sql
as $$
    with woken as (
        update pgflow.runs r set held_by = null
        where r.held_by is not null and r.name = p_name and r.status = 'pending'
        returning r.queue
    )
    select count(pgflow._notify_ready(w.queue) is null)::integer from woken w
$$;

-- ---------------------------------------------------------------------------
-- Queue settings (public)
-- ---------------------------------------------------------------------------

-- Set a queue's caps: concurrency (executing runs at most) and rate (claims
-- at most rate_limit in any window of rate_per). Null removes a cap.
-- Creates or trims the queue's slots. Returns the queue's settings row.
create function pgflow.set_queue(
    name        text,
    concurrency integer default null,
    rate_limit  integer default null,
    rate_per    interval default null
) returns pgflow.queue_settings
language plpgsql
as $$
#variable_conflict use_column
declare
    v_row pgflow.queue_settings;
begin
    perform pgflow._check_name(set_queue.name, 'queue');
    if set_queue.concurrency is not null and set_queue.concurrency not between 1 and 100000 then
        raise exception using errcode = 'PF002',
            message = format('queue concurrency must be between 1 and 100000, got %s',
                             set_queue.concurrency);
    end if;
    if (set_queue.rate_limit is null) <> (set_queue.rate_per is null) then
        raise exception using errcode = 'PF002',
            message = 'a rate limit needs both rate_limit and rate_per (or neither, to remove it)';
    end if;
    if set_queue.rate_limit is not null and set_queue.rate_limit not between 1 and 100000 then
        raise exception using errcode = 'PF002',
            message = format('rate_limit must be between 1 and 100000, got %s',
                             set_queue.rate_limit);
    end if;
    if set_queue.rate_per is not null and set_queue.rate_per <= interval '0' then
        raise exception using errcode = 'PF002',
            message = format('rate_per must be a positive interval, got %s', set_queue.rate_per);
    end if;

    insert into pgflow.queue_settings as q (name, concurrency, rate_limit, rate_per, updated_at)
    values (set_queue.name, set_queue.concurrency, set_queue.rate_limit, set_queue.rate_per,
            pgflow.now())
    on conflict (name) do update
        set concurrency = excluded.concurrency, rate_limit = excluded.rate_limit,
            rate_per = excluded.rate_per, rate_blocked_until = null,
            updated_at = excluded.updated_at
    returning * into v_row;

    -- Slots to the new limits. Taken queue slots above a lowered limit stay
    -- with their runs until they finish (and are never taken again); free
    -- ones go. Rate slots keep their last use, so a new limit starts from
    -- the recent claims.
    delete from pgflow.slots s
    where s.scope = 'queue:' || set_queue.name and s.run_id is null
      and s.slot > coalesce(set_queue.concurrency, 0);
    delete from pgflow.slots s
    where s.scope = 'rate:' || set_queue.name and s.slot > coalesce(set_queue.rate_limit, 0);
    insert into pgflow.slots (scope, slot)
    select 'queue:' || set_queue.name, g
    from pg_catalog.generate_series(1, coalesce(set_queue.concurrency, 0)) g
    on conflict do nothing;
    insert into pgflow.slots (scope, slot, free_at)  -- a rate slot's free_at is a real time
    select 'rate:' || set_queue.name, g, timestamptz '1970-01-01 00:00+00'
    from pg_catalog.generate_series(1, coalesce(set_queue.rate_limit, 0)) g
    on conflict do nothing;

    perform pgflow._notify_ready(set_queue.name);  -- a raised or removed cap frees runs now
    return v_row;
end;
$$;

-- Pause a queue: its pending runs are not claimed; executing runs go on.
create function pgflow.pause_queue(name text) returns void
language plpgsql
as $$
#variable_conflict use_column
begin
    perform pgflow._check_name(pause_queue.name, 'queue');
    insert into pgflow.queue_settings as q (name, paused, updated_at)
    values (pause_queue.name, true, pgflow.now())
    on conflict (name) do update set paused = true, updated_at = excluded.updated_at;
end;
$$;

-- Resume a paused queue (a queue never paused: nothing to do) and wake its workers.
create function pgflow.resume_queue(name text) returns void
language plpgsql
as $$
#variable_conflict use_column
begin
    perform pgflow._check_name(resume_queue.name, 'queue');
    update pgflow.queue_settings q set paused = false, updated_at = pgflow.now()
    where q.name = resume_queue.name and q.paused;
    if found then
        perform pgflow._notify_ready(resume_queue.name);
    end if;
end;
$$;

-- The scheduler leader's part: wake what flow control left waiting, the
-- queues whose rate frees a slot now and the scopes a release could not
-- look at (scope_rechecks: unpark the best parked run of each that has a
-- free slot). Returns how many queues and runs it woke.
create function pgflow.wake_queues() returns integer
language plpgsql
as $$
declare
    v_woken integer;
    v_scope text;
begin
    with woken as (
        update pgflow.queue_settings q set rate_blocked_until = null
        where q.rate_blocked_until <= pgflow.now()
        returning q.name
    )
    select count(pgflow._notify_ready(w.name) is null)::integer into v_woken from woken w;

    for v_scope in
        with taken as (delete from pgflow.scope_rechecks r returning r.scope)
        select distinct t.scope from taken t order by t.scope
    loop
        if not pg_catalog.pg_try_advisory_xact_lock(7366505, pg_catalog.hashtext(v_scope)) then
            insert into pgflow.scope_rechecks (scope, queued_at) values (v_scope, pgflow.now());
            continue;  -- next pass
        end if;
        continue when not exists (select 1 from pgflow.slots s
                                  where s.scope = v_scope and s.run_id is null);
        v_woken := v_woken + pgflow._unpark(v_scope, 1);
    end loop;
    return v_woken;
end;
$$;

-- Seconds from now (engine clock) until the leader has something to do: the
-- earliest timer, schedule tick, rate-limited queue's next slot or scope to
-- look at again; null if none. The leader sleeps that long unless pgflow_timer wakes it earlier.
create or replace function pgflow.next_wake_in() returns double precision
language sql stable
as $$
    select extract(epoch from least((select min(t.due_at) from pgflow.timers t),
                                    (select min(s.next_fire_at) from pgflow.schedules s
                                     where not s.paused),
                                    (select min(q.rate_blocked_until)
                                     from pgflow.queue_settings q),
                                    (select min(r.queued_at) from pgflow.scope_rechecks r))
                              - pgflow.now())
$$;

-- Every queue with its caps and its runs by state. held: pending runs parked
-- by a workflow or key limit (runs.held_by says which).
create view pgflow.queues as
with known as (
    select q.name from pgflow.queue_settings q
    union
    select w.queue from pgflow.workflows w
    union
    select r.queue from pgflow.runs r
    where r.status in ('pending', 'running', 'sleeping', 'waiting')
), counts as (
    select r.queue,
           count(*) filter (where r.status = 'pending') as pending,
           count(*) filter (where r.status = 'pending' and r.held_by is not null) as held,
           count(*) filter (where r.status = 'running') as running,
           count(*) filter (where r.status = 'sleeping') as sleeping,
           count(*) filter (where r.status = 'waiting') as waiting
    from pgflow.runs r
    where r.status in ('pending', 'running', 'sleeping', 'waiting')
    group by r.queue
)
select k.name, s.concurrency, s.rate_limit, s.rate_per, coalesce(s.paused, false) as paused,
       coalesce(c.pending, 0) as pending, coalesce(c.held, 0) as held,
       coalesce(c.running, 0) as running, coalesce(c.sleeping, 0) as sleeping,
       coalesce(c.waiting, 0) as waiting
from known k
left join pgflow.queue_settings s on s.name = k.name
left join counts c on c.queue = k.name;

-- ---------------------------------------------------------------------------
-- _start and start: a trailing parameter, the run's concurrency key
-- ---------------------------------------------------------------------------

-- start_child and the schedules call _start with their arguments, unchanged.
drop function pgflow._start(text, jsonb, text, text, integer, interval, text, uuid, interval,
                            text, timestamptz);

-- Start a run of workflow `name`. Runs inside the caller's transaction: the
-- run exists if and only if that transaction commits. With `key`, a second
-- start returns the existing run's id. Without `version`, the newest version
-- a live worker serves is used (else the newest any worker ever announced),
-- with its queue unless `queue` is given.
-- pgflow.start and pgflow.start_child share this body; only start_child
-- (fenced by its parent's lease) may name a parent, so _start is not public.
create function pgflow._start(
    name     text,
    input    jsonb default '[]'::jsonb,
    key      text default null,
    queue    text default null,
    priority integer default 0,
    delay    interval default null,
    version  text default null,
    parent_id uuid default null,
    timeout  interval default null,
    schedule_id    text default null,        -- a schedule's tick (12_schedules.sql)
    scheduled_time timestamptz default null,
    concurrency_key text default null        -- overrides the key read from the input (13_flow_control.sql)
) returns uuid
language plpgsql
as $$
#variable_conflict use_column
declare
    v_version text := _start.version;
    v_queue   text := _start.queue;
    v_timeout interval := _start.timeout;
    v_params  jsonb;
    v_param   text;        -- the workflow's Concurrency key parameter, if any
    v_ckey    text := _start.concurrency_key;
    v_now     timestamptz := pgflow.now();
    v_id      uuid;
    v_name    text;
begin
    perform pgflow._check_name(_start.name, 'workflow name');
    if _start.name like 'pgflow.%' then
        raise exception using errcode = 'PF002',
            message = format('workflow name %L is reserved: names beginning with "pgflow." '
                             'belong to pgflow''s internal workflows', _start.name);
    end if;
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
    if v_ckey is not null then
        perform pgflow._check_key(v_ckey, 'concurrency key');
    end if;
    perform pgflow._check_span(_start.delay, 'delay', true);
    perform pgflow._check_span(_start.timeout, 'timeout', false);

    if v_version is null or v_queue is null then
        -- The newest version a live worker serves; else the newest ever seen.
        select w.version, w.queue, w.timeout, w.params, w.concurrency_param
        into v_version, v_queue, v_timeout, v_params, v_param
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
                message = format('unknown workflow %L: no worker has registered it '
                                 '(start a worker that defines it; from SQL, version => ... '
                                 'starts it before any worker has)', _start.name);
        end if;
        v_version := coalesce(_start.version, v_version);
        v_queue := coalesce(_start.queue, v_queue, 'default');
        v_timeout := coalesce(_start.timeout, v_timeout);
    else
        -- Version and queue given (the Python client with the workflow's code):
        -- one primary-key probe for the parameters its workers announced.
        select w.params, w.concurrency_param into v_params, v_param
        from pgflow.workflows w
        where w.name = _start.name and w.version = v_version;
    end if;
    perform pgflow._check_input(_start.name, v_version, v_params, _start.input);
    if v_ckey is null and v_param is not null then
        v_ckey := pgflow._concurrency_key(v_params, v_param, _start.input);
        if octet_length(v_ckey) > 1024 then  -- it names a scope: a btree key
            raise exception using errcode = 'PF002',
                message = format('the concurrency key of workflow %L (argument %L) must be at '
                                 'most 1024 bytes, got %s', _start.name, v_param,
                                 octet_length(v_ckey));
        end if;
    end if;

    insert into pgflow.runs as r (name, version, queue, key, status, priority, input, parent_id,
                                  timeout, created_at, available_at, schedule_id,
                                  scheduled_time, concurrency_key)
    values (_start.name, v_version, v_queue, _start.key,
            case when coalesce(_start.delay, interval '0') > interval '0'
                 then 'sleeping' else 'pending' end,
            coalesce(_start.priority, 0), _start.input, _start.parent_id, v_timeout, v_now,
            v_now + coalesce(_start.delay, interval '0'), _start.schedule_id,
            _start.scheduled_time, v_ckey)
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

-- start with every option: what the Python client calls. concurrency_key
-- sets the run's key under its workflow's Concurrency limit (else it is read
-- from the input; 13_flow_control.sql).
create function pgflow.start_run(
    name     text,
    input    jsonb default '[]'::jsonb,
    key      text default null,
    queue    text default null,
    priority integer default 0,
    delay    interval default null,
    version  text default null,
    timeout  interval default null,
    concurrency_key text default null
) returns uuid
language sql
as $$
    select pgflow._start(start_run.name, start_run.input, start_run.key, start_run.queue,
                         start_run.priority, start_run.delay, start_run.version, null,
                         start_run.timeout, null, null, start_run.concurrency_key)
$$;

-- ---------------------------------------------------------------------------
-- claim_runs: the limits; register_worker: announced limits
-- ---------------------------------------------------------------------------

-- A new column, limited: re-created (claim, the wrapper of 0.1.0, is unchanged).
drop function pgflow.claim_runs(uuid, text[], text[], text[], integer);

-- Lease up to p_limit ready runs of the given queues whose (name, version)
-- the worker has code for, highest priority first, oldest first. Each comes
-- with its journal so that replay needs no further round trip, the time its
-- schedule's tick was due (ctx.scheduled_time; null if no schedule started
-- it) and since when it was ready (available_at: the claim delay). Runs
-- over a concurrency or rate limit, and runs of paused queues, stay pending
-- (13_flow_control.sql). limited: the run holds concurrency slots, which it
-- gives back when it stops executing; its worker then claims again at once
-- (it is the one that knows a slot just came free: no NOTIFY is sent for it).
create function pgflow.claim_runs(
    p_worker_id uuid,
    p_queues    text[],
    p_names     text[],
    p_versions  text[],
    p_limit     integer
) returns table (run_id uuid, name text, version text, input jsonb, lease_token bigint,
                 journal jsonb, cancel_requested boolean, cancel_seq integer,
                 scheduled_time timestamptz, ready_since timestamptz, limited boolean)
language plpgsql
-- One plan for the life of the connection: left to choose, PL/pgSQL re-plans
-- this statement on every call (its array parameters make each custom plan
-- look cheaper), which cost 0.3 ms a call, half the claim (measured). The
-- generic plan walks the same indexes (tests/sql/test_sql_procedures.py).
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_now     timestamptz := pgflow.now();
    v_chosen  uuid[];
    v_slotted uuid[] := '{}';  -- the chosen runs that took concurrency slots
    v_queue_limits    boolean;  -- a cap, rate or pause on one of p_queues
    v_rates           boolean;
    v_workflow_limits boolean;  -- a Concurrency on one of the worker's workflows
begin
    if p_limit is null or p_limit < 1 then
        raise exception using errcode = 'PF002', message = 'claim limit must be at least 1';
    end if;
    if not exists (select 1 from pgflow.workers w where w.id = p_worker_id) then
        raise exception using errcode = 'PF003',
            message = format('worker %s is not registered (declared dead?)', p_worker_id);
    end if;

    -- Flow control (13_flow_control.sql) only where a limit or a pause
    -- concerns this worker: two probes of small tables, then the claim as
    -- it always was.
    select coalesce(bool_or(s.paused or s.concurrency is not null or s.rate_limit is not null),
                    false),
           coalesce(bool_or(s.rate_limit is not null), false)
    into v_queue_limits, v_rates
    from pgflow.queue_settings s
    where s.name = any (p_queues);
    v_workflow_limits := exists (
        select 1 from pgflow.workflows w
        join unnest(p_names, p_versions) as t(n, v) on w.name = t.n and w.version = t.v
        where w.concurrency_limit is not null);
    if v_workflow_limits or v_rates then
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_under_limits(p_queues, p_names, p_versions, p_limit, v_now) l;
    elsif v_queue_limits then  -- caps and pauses only
        select l.chosen, l.slotted into v_chosen, v_slotted
        from pgflow._claim_capped(p_queues, p_names, p_versions, p_limit, v_now) l;
    else
        -- One ordered walk of runs_claimable per queue (an `= any(queues)`
        -- filter would read and sort every ready run of those queues on each
        -- claim), then the best p_limit of the per-queue candidates.
        -- Candidates beyond p_limit stay locked until this statement's
        -- transaction ends, which only makes other claimers skip them for
        -- that instant.
        v_chosen := array(
            with candidates as materialized (
                select c.id
                from pg_catalog.unnest(p_queues) as q(queue)
                cross join lateral (
                    select r.id, r.priority, r.available_at
                    from pgflow.runs r
                    where r.status = 'pending'
                      and r.held_by is null
                      and r.queue = q.queue
                      and r.available_at <= v_now
                      and (r.name, r.version) in (select t.n, t.v
                                                  from unnest(p_names, p_versions) as t(n, v))
                    order by r.priority desc, r.available_at
                    limit p_limit
                    for update skip locked
                ) c
                order by c.priority desc, c.available_at
                limit p_limit
            )
            select d.id from candidates d);
    end if;

    return query
    with claimed as (
        update pgflow.runs r
        set status = 'running', lease_owner = p_worker_id, lease_token = r.lease_token + 1,
            started_at = coalesce(r.started_at, v_now), holds_slots = r.id = any (v_slotted)
        where r.id = any (v_chosen)
        returning r.id, r.name, r.version, r.input, r.lease_token, r.cancel_requested,
                  r.cancel_seq, r.scheduled_time, r.available_at, r.holds_slots
    )
    select c.id, c.name, c.version, c.input, c.lease_token,
           coalesce((select jsonb_agg(jsonb_build_object(
                                 'seq', s.seq, 'name', s.name, 'kind', s.kind, 'status', s.status,
                                 'attempts', s.attempts, 'output', s.output, 'error', s.error)
                             order by s.seq)
                     from pgflow.steps s where s.run_id = c.id),
                    '[]'::jsonb),
           c.cancel_requested, c.cancel_seq, c.scheduled_time, c.available_at, c.holds_slots
    from claimed c;
end;
$$;

-- Register a worker and take its liveness lock on *this* session. Call it on
-- the connection that lives as long as the worker (its listener).
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

-- Group commit: the checkpoints, completions and sleeps of many runs in one
-- call and one transaction. A worker sends what its runs reported while its
-- previous batch was committing, so concurrent runs share round trips and
-- commits instead of paying one each. Element i is run p_run_ids[i] under
-- lease p_tokens[i], and does, in this order:
--   p_seqs[i] not null   record a step (p_seqs, p_names, p_kinds, p_outputs,
--                        p_durations in seconds) as complete_step does; it
--                        ended p_ages[i] seconds before this call (the time
--                        its report waited for the batch), default 0;
--   p_finish[i]          then complete the run with p_results[i], as
--                        complete_run does; or
--   p_sleep_seqs[i] not null
--                        then sleep until p_sleep_until[i] (or for
--                        p_sleep_seconds[i]) at that journal position, as
--                        pgflow.sleep does, unless cancellation was requested.
-- Each element is fenced on its own and never fails the others; the outcome
-- says what happened to it:
--   ok          recorded (a sleep: its time had already come, go on);
--   sleeping    recorded, and the run now sleeps (its worker lets go of it);
--   cancel      the step recorded, but cancellation was requested, so no
--               sleep was recorded (the workflow raises Cancelled);
--   lease_lost  the token is not current (nothing written; PF001 elsewhere);
--   duplicate   the step is already recorded (nothing written; PF004);
--   unknown     no such run (PF404).
-- A run appears at most once in a batch (it waits for its report).
create or replace function pgflow.complete_batch(
    p_run_ids         uuid[],
    p_tokens          bigint[],
    p_seqs            integer[],
    p_names           text[],
    p_kinds           text[],
    p_outputs         jsonb[],
    p_durations       double precision[],
    p_finish          boolean[],
    p_results         jsonb[],
    p_sleep_seqs      integer[] default null,
    p_sleep_until     timestamptz[] default null,
    p_sleep_seconds   double precision[] default null,
    p_ages            double precision[] default null
) returns table (run_id uuid, outcome text)
language plpgsql
-- As claim: planning the batch statement on every call cost 0.4 ms, twice a
-- one-element batch's work (measured); the generic plan probes runs_pkey.
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_now      timestamptz := pgflow.now();
    v_outcomes text[];
    v_finished uuid[];
    v_watched  uuid[];
    v_children uuid[];
    v_slotted  uuid[];   -- finished runs that held concurrency slots
    v_i        integer;
begin
    -- The payload limit, as complete_step and complete_run apply it (a worker
    -- never sends more; another client might). An offender fails the whole
    -- call; the worker then sends that batch's reports one by one.
    perform pgflow._check_payload(o.v, format('the result of step %L', o.n))
    from unnest(p_outputs, p_names) as o(v, n)
    where pg_catalog.pg_column_size(o.v) > pgflow.max_payload_bytes();
    perform pgflow._check_payload(o.v, 'the result of the workflow')
    from pg_catalog.unnest(p_results) as o(v)
    where pg_catalog.pg_column_size(o.v) > pgflow.max_payload_bytes();

    -- Every run's lock, in id order: two batches (or a batch and a cancel
    -- cascade, which also locks in order) cannot deadlock on each other.
    perform pgflow._lock_run(b.id)
    from pg_catalog.unnest(p_run_ids) as b(id)
    order by b.id;

    -- Multi-array unnest is FROM-clause syntax (ROWS FROM), hence unqualified.
    with report as (
        select *
        from unnest(p_run_ids, p_tokens, p_seqs, p_names, p_kinds, p_outputs, p_durations,
                    p_finish, p_results, p_ages)
             with ordinality as b(id, token, seq, name, kind, output, duration_s, finish, result,
                                  age_s, i)
    ), fenced as (
        -- One runs_pkey probe per report. As a plain join, the generic plan
        -- made while runs had never been analyzed (a fresh install, a
        -- truncated table) hashed a sequential scan of all runs, and the
        -- connection kept it until the next ANALYZE: OFFSET 0 keeps the
        -- lookup a parameterized subquery (tests/test_sql_batch.py).
        select b.*, r.id is not null as known,
               coalesce(r.status = 'running' and r.lease_token = b.token, false) as leased,
               coalesce(r.cancel_requested, false) as cancel_requested,
               coalesce(r.holds_slots, false) as holds_slots
        from report b
        left join lateral (
            select r.id, r.status, r.lease_token, r.cancel_requested, r.holds_slots
            from pgflow.runs r
            where r.id = b.id
            offset 0
        ) r on true
    ), recorded as (
        insert into pgflow.steps as s (run_id, seq, name, kind, status, attempts, output,
                                       started_at, finished_at)
        select f.id, f.seq, f.name, f.kind, 'completed', 1, coalesce(f.output, 'null'::jsonb),
               v_now - (coalesce(f.age_s, 0) + f.duration_s) * interval '1 second',
               v_now - coalesce(f.age_s, 0) * interval '1 second'
        from fenced f
        where f.leased and f.seq is not null
        on conflict (run_id, seq) do update
            set status = 'completed', attempts = s.attempts + 1, output = excluded.output,
                error = null, started_at = excluded.started_at,
                finished_at = excluded.finished_at
            where s.status = 'retrying' and s.name = excluded.name
        returning s.run_id
    ), finished as (
        -- holds_slots cleared here: the batch's slots go back below, in one
        -- statement, not through the trigger runs_flow run by run.
        update pgflow.runs r
        set status = 'completed', output = coalesce(f.result, 'null'::jsonb), error = null,
            finished_at = v_now, lease_owner = null, holds_slots = false
        from fenced f
        where r.id = f.id and f.leased and f.finish
          and (f.seq is null or f.id in (select d.run_id from recorded d))
        returning r.id, r.watched, r.parent_id, f.holds_slots
    )
    select pg_catalog.array_agg(case
               when not f.known then 'unknown'
               when not f.leased then 'lease_lost'
               when f.seq is not null and f.id not in (select d.run_id from recorded d)
                   then 'duplicate'
               when f.cancel_requested and not f.finish then 'cancel'
               else 'ok' end order by f.i),
           (select pg_catalog.array_agg(e.id) from finished e),
           (select pg_catalog.array_agg(e.id) from finished e where e.watched),
           (select pg_catalog.array_agg(e.id) from finished e where e.parent_id is not null),
           (select pg_catalog.array_agg(e.id) from finished e where e.holds_slots)
    into v_outcomes, v_finished, v_watched, v_children, v_slotted
    from fenced f;

    -- What complete_run does after the update, for the runs completed here.
    if v_finished is not null then
        delete from pgflow.timers t where t.run_id = any (v_finished);
        perform pg_catalog.pg_notify('pgflow_done', w::text)
        from pg_catalog.unnest(v_watched) as w;
        perform pgflow._child_finished(c) from pg_catalog.unnest(v_children) as c;
        if v_slotted is not null then
            perform pgflow._give_back_slots(v_slotted);  -- 13_flow_control.sql
        end if;
    end if;

    -- Sleeps after the checkpoints they follow, one at a time through
    -- pgflow.sleep (the lock and lease are already held; re-taking them is
    -- cheap). A cancelled run does not go to sleep: its workflow raises
    -- Cancelled at this durable point instead.
    if p_sleep_seqs is not null then
        for v_i in 1 .. coalesce(pg_catalog.array_length(p_run_ids, 1), 0) loop
            continue when p_sleep_seqs[v_i] is null or v_outcomes[v_i] <> 'ok';
            if pgflow.sleep(p_run_ids[v_i], p_tokens[v_i], p_sleep_seqs[v_i], 'sleep',
                            p_sleep_until[v_i],
                            p_sleep_seconds[v_i] * interval '1 second') then
                v_outcomes[v_i] := 'sleeping';
            end if;
        end loop;
    end if;

    return query select * from unnest(p_run_ids, v_outcomes);
end;
$$;

-- ---------------------------------------------------------------------------
-- Grants
-- ---------------------------------------------------------------------------

-- kind 'definer': an entry point, run as the owner with the fixed search_path.
-- kind 'invoker': a small SQL function kept inlinable; runs with the caller's rights.
-- kind 'relation': a table or view; the roles get SELECT on it.
-- roles '{}': owner only.
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

select pgflow._secure();
