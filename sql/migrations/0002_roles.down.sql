-- Undo revision 0002: every function back to the caller's rights and
-- PUBLIC's EXECUTE (PostgreSQL's default), the three roles' grants in this
-- database revoked. The roles themselves stay: they are cluster-wide and
-- other databases of the server may use them (drop them by hand when none
-- does: `drop role pgflow_worker, pgflow_client, pgflow_reader;`).
do $$
declare
    v record;
begin
    for v in
        select format('pgflow.%I(%s)', p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid))
                   as signature,
               exists (select 1 from pgflow._privileges() pol
                       where pol.kind = 'definer' and pol.object = p.proname) as definer
        from pg_catalog.pg_proc p
        where p.pronamespace = 'pgflow'::regnamespace
    loop
        execute pg_catalog.format(
            'revoke all on function %s from pgflow_worker, pgflow_client, pgflow_reader',
            v.signature);
        execute pg_catalog.format('grant execute on function %s to public', v.signature);
        if v.definer then
            execute pg_catalog.format('alter function %s security invoker reset search_path',
                                      v.signature);
        end if;
    end loop;

    for v in
        select pg_catalog.format('pgflow.%I', c.relname) as relation
        from pg_catalog.pg_class c
        where c.relnamespace = 'pgflow'::regnamespace and c.relkind in ('r', 'p', 'v', 'm')
    loop
        execute pg_catalog.format(
            'revoke all on %s from pgflow_worker, pgflow_client, pgflow_reader', v.relation);
    end loop;
    revoke usage on schema pgflow from pgflow_worker, pgflow_client, pgflow_reader;
end;
$$;

drop function if exists pgflow._secure(), pgflow._privileges();
