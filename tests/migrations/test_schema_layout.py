"""The readable engine (``sql/schema/``) and the migration chain (``sql/migrations/``) agree.

``sql/schema/`` is the engine as it is now, one file a concern; ``sql/migrations/``
is what Alembic applies, frozen once released. A database built from each must
have the same catalog: every function with its body, settings and security,
every table, column, constraint, index, view, sequence and grant.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgflow import schema

# One query a kind of object, each row naming the object first. alembic_version
# exists only in the migrated database (it records the chain's position).
CATALOG: dict[str, str] = {
    "functions": """
        select p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), l.lanname,
               p.prosrc, p.provolatile, p.prosecdef, p.proisstrict, p.proparallel,
               coalesce(p.proconfig, '{}'), coalesce(p.proacl::text, ''),
               pg_get_userbyid(p.proowner)
        from pg_proc p join pg_language l on l.oid = p.prolang
        where p.pronamespace = 'pgflow'::regnamespace""",
    "relations": """
        select c.relname, c.relkind, c.relpersistence, coalesce(c.reloptions, '{}'),
               coalesce(c.relacl::text, ''), pg_get_userbyid(c.relowner)
        from pg_class c
        where c.relnamespace = 'pgflow'::regnamespace and c.relname not like 'alembic_version%'""",
    "columns": """
        select c.relname || '.' || a.attname,
               row_number() over (partition by c.oid order by a.attnum),
               format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity, a.attgenerated,
               coalesce(a.attacl::text, '')
        from pg_attribute a
        join pg_class c on c.oid = a.attrelid
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
        where c.relnamespace = 'pgflow'::regnamespace and c.relname not like 'alembic_version%'
          and a.attnum > 0 and not a.attisdropped""",
    "constraints": """
        select c.relname || '.' || k.conname, k.contype, pg_get_constraintdef(k.oid), k.convalidated,
               k.condeferrable, k.condeferred
        from pg_constraint k join pg_class c on c.oid = k.conrelid
        where k.connamespace = 'pgflow'::regnamespace and c.relname <> 'alembic_version'""",
    "indexes": """
        select indexname, tablename, indexdef from pg_indexes
        where schemaname = 'pgflow' and tablename <> 'alembic_version'""",
    "views": """
        select viewname, definition from pg_views where schemaname = 'pgflow'""",
    "sequences": """
        select sequencename, data_type::text, start_value, min_value, max_value, increment_by,
               cycle, cache_size
        from pg_sequences where schemaname = 'pgflow'""",
    "triggers": """
        select c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid)
        from pg_trigger t join pg_class c on c.oid = t.tgrelid
        where c.relnamespace = 'pgflow'::regnamespace and not t.tgisinternal""",
    "comments": """
        select d.classoid::regclass::text || ':' || d.objoid || ':' || d.objsubid, d.description
        from pg_description d
        where d.objoid in (select oid from pg_class where relnamespace = 'pgflow'::regnamespace
                           union all
                           select oid from pg_proc where pronamespace = 'pgflow'::regnamespace)""",
    "schema": """
        select nspname, coalesce(nspacl::text, ''), pg_get_userbyid(nspowner)
        from pg_namespace where nspname = 'pgflow'""",
}


def catalog(dsn: str) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Every object of schema pgflow by kind and name, with what defines it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {kind: {str(row[0]): tuple(row[1:]) for row in conn.execute(query)}
                for kind, query in CATALOG.items()}


def build_from_schema_files(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:  # one transaction: all or nothing
        for path in schema.schema_files():
            conn.execute(path.read_text(encoding="utf-8"))


def differences(left: dict[str, dict[str, Any]], right: dict[str, dict[str, Any]]) -> list[str]:
    found = []
    for kind in CATALOG:
        a, b = left[kind], right[kind]
        for name in sorted(a.keys() - b.keys()):
            found.append(f"{kind} {name}: only in sql/schema/")
        for name in sorted(b.keys() - a.keys()):
            found.append(f"{kind} {name}: only in the migration chain")
        for name in sorted(a.keys() & b.keys()):
            if a[name] != b[name]:
                found.append(f"{kind} {name}: differs\n  schema: {a[name]}\n  chain:  {b[name]}")
    return found


def test_the_schema_files_and_the_migration_chain_build_the_same_catalog(empty_dsn, dsn):
    # dsn: the test template, migrated through the whole chain
    build_from_schema_files(empty_dsn)
    from_files, from_chain = catalog(empty_dsn), catalog(dsn)
    assert len(from_chain["functions"]) > 50 and len(from_chain["relations"]) > 15
    assert differences(from_files, from_chain) == []


def test_the_comparison_sees_a_changed_function_body(empty_dsn, dsn):
    build_from_schema_files(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("create or replace function pgflow.max_payload_bytes() returns integer"
                     " language sql immutable as $$ select 1 $$")
    [difference] = differences(catalog(empty_dsn), catalog(dsn))
    assert difference.startswith("functions max_payload_bytes(): differs")
