-- pgflow engine, revision 0005: a cancelled run's open journal entry ends with it.
--
-- A step row that waits (a signal, a child or map, a sleep, a retry back-off)
-- holds its deadline in finished_at. When the workflow let pgflow.Cancelled
-- through, that row stayed `waiting` after the run had ended, and tools that
-- read finished_at showed the deadline as its duration. pgflow.cancel_run now
-- marks such rows `cancelled`, finished at the moment of cancellation.
--
-- Changes: steps status `cancelled` (both status constraints widened, added
-- NOT VALID and then validated, so that a large steps table is scanned without
-- blocking writes); pgflow.cancel_run (replaced, same signature).

alter table pgflow.steps drop constraint steps_status_known;
alter table pgflow.steps add constraint steps_status_known check (
    status in ('completed', 'failed', 'retrying', 'sleeping', 'waiting', 'cancelled')) not valid;
alter table pgflow.steps validate constraint steps_status_known;

alter table pgflow.steps drop constraint steps_failure_has_error;
alter table pgflow.steps add constraint steps_failure_has_error check (
    status in ('completed', 'sleeping', 'waiting', 'cancelled') or error is not null) not valid;
alter table pgflow.steps validate constraint steps_failure_has_error;

create or replace function pgflow.cancel_run(p_run_id uuid, p_lease_token bigint) returns void
language plpgsql
as $$
begin
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    update pgflow.runs r
    set status = 'cancelled', finished_at = pgflow.now(), lease_owner = null
    where r.id = p_run_id;
    -- The entry it waited on (a signal, a child, a sleep, a back-off) ends with it,
    -- so the journal shows no wait of a finished run and no deadline as a duration.
    update pgflow.steps s
    set status = 'cancelled', finished_at = pgflow.now()
    where s.run_id = p_run_id and s.status in ('waiting', 'sleeping', 'retrying');
    delete from pgflow.timers t where t.run_id = p_run_id;
    perform pgflow._notify_done(p_run_id);
    perform pgflow._child_finished(p_run_id);
end;
$$;

select pgflow._secure();
