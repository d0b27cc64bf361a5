-- Undo revision 0005: cancelled journal entries go back to `waiting` (the
-- status they had), then the constraints and pgflow.cancel_run as before.

update pgflow.steps s set status = 'waiting' where s.status = 'cancelled';

alter table pgflow.steps drop constraint steps_status_known;
alter table pgflow.steps add constraint steps_status_known check (
    status in ('completed', 'failed', 'retrying', 'sleeping', 'waiting'));
alter table pgflow.steps drop constraint steps_failure_has_error;
alter table pgflow.steps add constraint steps_failure_has_error check (
    status in ('completed', 'sleeping', 'waiting') or error is not null);

create or replace function pgflow.cancel_run(p_run_id uuid, p_lease_token bigint) returns void
language plpgsql
as $$
begin
    perform pgflow._lock_run(p_run_id);
    perform pgflow._check_lease(p_run_id, p_lease_token);
    update pgflow.runs r
    set status = 'cancelled', finished_at = pgflow.now(), lease_owner = null
    where r.id = p_run_id;
    delete from pgflow.timers t where t.run_id = p_run_id;
    perform pgflow._notify_done(p_run_id);
    perform pgflow._child_finished(p_run_id);
end;
$$;

select pgflow._secure();
