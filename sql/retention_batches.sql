-- Retention as a procedure that commits after every batch (doc/retention.md).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Seven delivered outbox rows: five old, two recent; one old dead row.
SELECT callback_center.create_endpoint('jp-sink', 'http://127.0.0.1:9/jp', '{jp.event}') > 0 AS endpoint;
SELECT sum(callback_center.enqueue('jp.event', 'jp-' || g, '{}')) AS queued
  FROM generate_series(1, 8) g;
UPDATE callback_center.outbox o
   SET status = CASE WHEN o.aggregate_id = 'jp-8' THEN 'dead' ELSE 'delivered' END,
       attempts = 1,
       delivered_at = CASE WHEN o.aggregate_id <> 'jp-8' THEN now() - v.age END,
       next_attempt_at = now() - v.age
  FROM (SELECT 'jp-' || g AS agg,
               CASE WHEN g IN (6, 7) THEN interval '1 day' ELSE interval '10 days' END AS age
          FROM generate_series(1, 8) g) v
 WHERE o.aggregate_id = v.agg;

-- Batches of 2, each committed: the 5 old rows go (and whatever other
-- tests left old).
CALL callback_center.purge_in_batches('7 days', 2, purged => NULL) \gset
SELECT :purged >= 5 AS purged_ours;
SELECT aggregate_id, status FROM callback_center.outbox
 WHERE aggregate_id LIKE 'jp-%' ORDER BY aggregate_id;
-- Nothing more of ours to do.
SELECT count(*) AS old_delivered_left FROM callback_center.outbox
 WHERE status = 'delivered' AND delivered_at < now() - interval '7 days';

-- The batch function refuses anything but a retention target.
SELECT callback_center._purge_batch('callback_center.orders', now(), 0, 10);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Same argument checks as purge().
CALL callback_center.purge_in_batches(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL callback_center.purge_in_batches('-1 day');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL callback_center.purge_in_batches('7 days', 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL callback_center.purge_in_batches('7 days', 10, attempts_older_than => '-1 day');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- It commits, so it cannot run inside a transaction block.
BEGIN;
CALL callback_center.purge_in_batches('7 days', 2);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

-- For admins only; the application role may not.
SELECT has_function_privilege('callback_center_admin',
           'callback_center.purge_in_batches(interval, integer, interval, interval, bigint)', 'EXECUTE') AS admin,
       has_function_privilege('callback_center_app',
           'callback_center.purge_in_batches(interval, integer, interval, interval, bigint)', 'EXECUTE') AS app;

SELECT callback_center.drop_endpoint('jp-sink') >= 0 AS dropped;
