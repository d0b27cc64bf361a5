-- ---------------------------------------------------------------------------
-- Clock
-- ---------------------------------------------------------------------------

-- One row: how far the engine clock runs ahead of the database clock.
create table pgflow.clock (
    singleton boolean primary key default true,
    offset_by interval not null default interval '0',
    constraint clock_one_row check (singleton)
);
insert into pgflow.clock default values;

-- The engine clock: every engine timestamp comes from here.
-- PL/pgSQL, not SQL: a SQL function that reads a table cannot be inlined, and
-- called from a procedure it was parsed and planned again on every call (60 us
-- of a 0.8 ms pgflow.start, measured); PL/pgSQL keeps its plan.
create function pgflow.now() returns timestamptz
language plpgsql stable
as $$
begin
    return pg_catalog.statement_timestamp() + (select c.offset_by from pgflow.clock c);
end;
$$;

-- Time-ordered UUIDs (version 7 layout): new runs land on the right edge of
-- the primary-key index instead of on random pages.
create function pgflow.uuid_v7() returns uuid
language sql volatile
as $$
    select pg_catalog.encode(
        pg_catalog.set_bit(
            pg_catalog.set_bit(
                overlay(
                    pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
                    placing substring(
                        pg_catalog.int8send(
                            (extract(epoch from pg_catalog.clock_timestamp()) * 1000)::bigint
                        ) from 3)
                    from 1 for 6),
                52, 1),
            53, 1),
        'hex')::uuid
$$;
