-- pgflow engine, revision 0010: an index for the dashboard's runs list.
--
-- Changes: index runs_concurrency_key on pgflow.runs (new). The dashboard
-- (pgflow.web) lists runs newest first through runs_status_created and
-- runs_name_created; filtered by concurrency key, it had no index to follow
-- and read the whole table. Partial: runs without a concurrency key are not
-- in it and never pay for it; no update of a run touches its columns.
-- Building it reads pgflow.runs once and blocks writes to it meanwhile.
-- No function changes: workers of every revision since 0.1.0 keep running.

create index runs_concurrency_key on pgflow.runs (concurrency_key, created_at desc)
    where concurrency_key is not null;
