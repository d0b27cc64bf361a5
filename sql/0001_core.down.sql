-- Undo revision 0001. The schema itself stays: it holds Alembic's version table.
drop view if exists pgflow.waits;
drop function if exists
    pgflow.retry(uuid),
    pgflow.advance_time(interval),
    pgflow.next_timer_in(),
    pgflow.fire_timers(integer),
    pgflow.record_value(uuid, bigint, integer, text, jsonb),
    pgflow.sleep(uuid, bigint, integer, text, timestamptz, interval),
    pgflow._add_timer(uuid, text, integer, timestamptz),
    pgflow.release_run(uuid, bigint),
    pgflow.fail_run(uuid, bigint, jsonb),
    pgflow.complete_run(uuid, bigint, jsonb),
    pgflow._backoff(interval, double precision, interval, integer),
    pgflow.fail_step(uuid, bigint, integer, text, text, jsonb, interval, boolean, integer,
                     interval, double precision, interval),
    pgflow.complete_step(uuid, bigint, integer, text, text, jsonb, interval),
    pgflow.claim(uuid, text[], text[], text[], integer),
    pgflow.recover(interval),
    pgflow.unregister_worker(uuid),
    pgflow.heartbeat(uuid),
    pgflow.register_worker(uuid, text, integer, text[], jsonb),
    pgflow.start(text, jsonb, text, text, integer, interval, text, uuid, interval),
    pgflow.watch(uuid),
    pgflow._notify_done(uuid),
    pgflow._notify_ready(text),
    pgflow._check_lease(uuid, bigint),
    pgflow._lock_run(uuid);
drop table if exists pgflow.timers, pgflow.step_attempts, pgflow.workers, pgflow.steps,
    pgflow.runs, pgflow.workflows;
drop sequence if exists pgflow.worker_lock_key_seq;
drop function if exists pgflow.uuid_v7(), pgflow.now();
drop table if exists pgflow.clock;
