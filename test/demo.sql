-- The end-to-end story told by `make demo`.  Each act prints what happened
-- in a table a person reads at a glance.
\pset footer off
\echo
\echo '=== 0. The extension and its worker ==='
CREATE EXTENSION callback_center CASCADE;
SELECT pg_sleep(0.3);  -- let the worker notice the extension (poll 200 ms)
SELECT s.pid IS NOT NULL AS worker_running, a.backend_type, s.database
  FROM callback_center.worker_status() s
  LEFT JOIN pg_stat_activity a ON a.pid = s.pid;
