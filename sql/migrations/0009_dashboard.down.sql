-- Undo revision 0009: the dashboard's index.

drop index pgflow.runs_concurrency_key;
