-- Undo revision 0010: the dashboard's index.

drop index pgflow.runs_concurrency_key;
