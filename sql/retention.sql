-- Retention: purge() deletes what is old and finished, in bounded batches
-- (issue 5 item 7).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Outbox rows in every status, aged by hand (as the worker would leave them).
SELECT callback_center.create_endpoint('rt-sink', 'http://127.0.0.1:9/rt', '{rt.event}') > 0 AS endpoint;
SELECT sum(callback_center.enqueue('rt.event', 'rt-' || g, '{}')) AS queued
  FROM generate_series(1, 9) g;
UPDATE callback_center.outbox o
   SET status = v.status, attempts = 1,
       created_at = now() - v.age, next_attempt_at = now() - v.age,
       delivered_at = CASE WHEN v.status = 'delivered' THEN now() - v.age END
  FROM (VALUES ('rt-1', 'delivered', interval '10 days'),
               ('rt-2', 'delivered', '10 days'),
               ('rt-3', 'delivered', '9 days'),
               ('rt-4', 'delivered', '8 days'),
               ('rt-5', 'delivered', '8 days'),
               ('rt-6', 'delivered', '1 day'),          -- recent: stays
               ('rt-7', 'pending', '30 days'),          -- never delivered: stays
               ('rt-8', 'dead', '30 days'),             -- dead: stays
               ('rt-9', 'delivering', '30 days')) AS v(agg, status, age)
 WHERE o.aggregate_id = v.agg;

-- State history of an order, half of it aged.
SELECT callback_center.set_stock('rt-A', 10) IS NOT NULL AS stock;
SELECT status FROM callback_center.place_order('rt-o1', 'rt-user', '[{"sku":"rt-A","qty":1}]', 100);
SELECT count(*) AS history_rows FROM callback_center.state_history WHERE entity_id IN ('rt-o1', 'pay_rt-o1');
UPDATE callback_center.state_history SET at = now() - interval '20 days'
 WHERE entity_id = 'rt-o1';

-- Callback records: succeeded, failed and in progress, all old.
SELECT is_first FROM callback_center.record_callback('rt-b1', 'rt.type', 'a');
SELECT is_first FROM callback_center.record_callback('rt-b2', 'rt.type', 'b');
SELECT is_first FROM callback_center.record_callback('rt-b3', 'rt.type', 'c');
SELECT callback_center.complete_callback('rt-b1', 'rt.type', true),
       callback_center.complete_callback('rt-b2', 'rt.type', false);
UPDATE callback_center.callback_record
   SET created_at = now() - interval '20 days', updated_at = now() - interval '20 days',
       completed_at = CASE WHEN completed_at IS NOT NULL THEN now() - interval '20 days' END
 WHERE biz_id LIKE 'rt-b%';

-- Reconciliation differences, one old, one new.
INSERT INTO callback_center.recon_diffs (channel, bill_date, provider_txn_id, kind, resolution, created_at)
VALUES ('rt-chan', '2026-01-01', 'rt-t1', 'missing_local', 'flagged', now() - interval '30 days'),
       ('rt-chan', '2026-01-02', 'rt-t2', 'missing_local', 'flagged', now());

-- Batches of 2: 5 old delivered rows go in batches of 2, 2 and 1; the 4
-- aged history rows in 2 and 1.  (delivery_attempts is
-- left out of the listing: it exists only once the delivery log lands.)
SELECT relation, purged
  FROM callback_center.purge('7 days', 2)
 WHERE relation <> 'callback_center.delivery_attempts';

SELECT aggregate_id, status FROM callback_center.outbox
 WHERE aggregate_id LIKE 'rt-%' ORDER BY aggregate_id;
SELECT count(*) AS history_left FROM callback_center.state_history WHERE entity_id IN ('rt-o1', 'pay_rt-o1');
SELECT biz_id, status FROM callback_center.callback_record WHERE biz_id LIKE 'rt-b%' ORDER BY 1;
SELECT provider_txn_id FROM callback_center.recon_diffs WHERE channel = 'rt-chan';

-- Nothing more to do: a second run purges nothing.
SELECT relation, purged
  FROM callback_center.purge('7 days', 2)
 WHERE relation <> 'callback_center.delivery_attempts';

-- A shorter age takes the day-old delivered row too; the default batch.
SELECT purged FROM callback_center.purge('12 hours')
 WHERE relation = 'callback_center.outbox';
SELECT aggregate_id, status FROM callback_center.outbox
 WHERE aggregate_id LIKE 'rt-%' ORDER BY aggregate_id;

-- Only the admin may purge.
CREATE ROLE rt_admin NOLOGIN IN ROLE callback_center_admin;
CREATE ROLE rt_app NOLOGIN IN ROLE callback_center_app;
SET ROLE rt_admin;
SELECT count(*) AS admin_relations FROM callback_center.purge('7 days')
 WHERE relation <> 'callback_center.delivery_attempts';
RESET ROLE;
\set SHOW_CONTEXT never
\set ON_ERROR_STOP 0
SET ROLE rt_app;
SELECT * FROM callback_center.purge();
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- Bad input.
SELECT * FROM callback_center.purge(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.purge('7 days', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.purge('-1 day');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.purge('7 days', 0);
\echo :LAST_ERROR_SQLSTATE

-- Clean up.
DROP ROLE rt_admin;
DROP ROLE rt_app;
SELECT callback_center.drop_endpoint('rt-sink') > 0 AS dropped;
DELETE FROM callback_center.recon_diffs WHERE channel = 'rt-chan';
DELETE FROM callback_center.callback_record WHERE biz_id LIKE 'rt-b%';
