-- ---------------------------------------------------------------------------
-- Flow control: concurrency limits, rate limits, paused queues
-- ---------------------------------------------------------------------------
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
-- The runs of one concurrency key, newest first: the dashboard's runs list
-- filtered by key (pgflow/web/listing.py; revision 0010). Partial, like the one above.
create index runs_concurrency_key on pgflow.runs (concurrency_key, created_at desc)
    where concurrency_key is not null;

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
--
-- p_handed (revision 0015): runs whose code returned, fenced by the caller
-- (_code_ended_runs), whose queue slots are not given back yet. The claim
-- hands those slots straight to the runs it takes, before any free one: one
-- update of the slot instead of two. Not where the cap was lowered below a
-- slot still held (the hand-down of _give_back_slots comes first there).
-- The caller gives back what the handed runs still hold afterwards.
create function pgflow._claim_capped(
    p_queues   text[],
    p_names    text[],
    p_versions text[],
    p_limit    integer,
    p_now      timestamptz,
    p_handed   uuid[] default '{}',
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
            v_slots := '{}';
            if cardinality(p_handed) > 0
               and not exists (select 1 from pgflow.slots h
                               where h.scope = 'queue:' || q.queue and h.slot > q.concurrency
                                 and h.run_id is not null) then
                v_slots := array(
                    select f.slot from pgflow.slots f
                    where f.run_id = any (p_handed) and f.scope = 'queue:' || q.queue
                      and f.slot <= q.concurrency
                    order by f.slot
                    limit p_limit - cardinality(chosen)
                    for update);
            end if;
            v_slots := v_slots || array(
                select f.slot from pgflow.slots f
                where f.scope = 'queue:' || q.queue and f.run_id is null
                  and f.slot <= q.concurrency
                order by f.slot
                limit p_limit - cardinality(chosen) - cardinality(v_slots)
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
-- one run, complete_batch for a batch, a claim for runs whose code returned),
-- scope by scope in scope order: wake the queue of a freed queue slot if an
-- idle worker asked for it (queue_settings.starved), unpark as many of a
-- workflow or key scope's parked runs as it freed slots, best first. Slots
-- above a lowered limit (or of a removed one) free no capacity and go; under
-- a lowered limit a run still holding a slot above it takes a freed one
-- first. Returns those starved queues; with p_wake false it leaves waking
-- them to the caller (a claim that may take the slots itself, revision 0015).
create function pgflow._give_back_slots(p_run_ids uuid[], p_wake boolean default true)
returns text[]
language plpgsql
as $$
declare
    g         record;
    v_limit   integer;
    v_starved boolean;
    v_freed   integer;  -- slots of the scope that free capacity
    v_slot    integer;
    v_waiting text[] := '{}';  -- starved queues that got a slot back
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
                v_waiting := v_waiting || g.queue;
                if p_wake then
                    perform pgflow._notify_ready(g.queue);  -- an idle worker waits for it
                end if;
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
    return v_waiting;
end;
$$;

-- The code of these runs of p_worker_id returned (claim_runs' p_ended): their
-- slots go back in this claim, before their completion commits (handed to
-- the runs it takes, or given back). Fenced as a report is: only runs this
-- worker still leases at these tokens, running and holding slots, which it
-- marks as holding none and returns. A row locked by a report of the run on
-- its way is skipped: that report gives the slots back itself. The worker
-- sends the completion after this claim, so the two rarely meet.
create function pgflow._code_ended_runs(p_worker_id uuid, p_runs uuid[], p_tokens bigint[])
returns uuid[]
language plpgsql  -- not sql: PL/pgSQL keeps the statement's plan from call to call
as $$
declare
    v_ended uuid[];
begin
    with ended as (
        select r.id from pgflow.runs r
        join unnest(p_runs, p_tokens) as t(id, token)
          on r.id = t.id and r.lease_token = t.token
        where r.status = 'running' and r.lease_owner = p_worker_id and r.holds_slots
        for update of r skip locked
    ), cleared as (
        update pgflow.runs r set holds_slots = false
        from ended e
        where r.id = e.id
        returning r.id
    )
    select coalesce(pg_catalog.array_agg(c.id), '{}') into v_ended from cleared c;
    return v_ended;
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
create function pgflow.next_wake_in() returns double precision
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
