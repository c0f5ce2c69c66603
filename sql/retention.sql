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

-- Reconciliation differences: flagged ones stay however old (nobody has
-- dealt with them yet); old applied and resolved ones go.
INSERT INTO callback_center.recon_diffs (channel, bill_date, provider_txn_id, kind, resolution, created_at)
VALUES ('rt-chan', '2026-01-01', 'rt-t1', 'missing_local', 'flagged', now() - interval '30 days'),
       ('rt-chan', '2026-01-02', 'rt-t2', 'missing_local', 'flagged', now()),
       ('rt-chan', '2026-01-03', 'rt-t3', 'missing_local', 'resolved', now() - interval '30 days'),
       ('rt-chan', '2026-01-04', 'rt-t4', 'missing_local', 'applied', now() - interval '30 days'),
       ('rt-chan', '2026-01-05', 'rt-t5', 'missing_local', 'resolved', now());

-- Delivery attempts: 25 old, 2 recent.
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status,
                                               latency_ms, attempted_at)
SELECT o.id, o.endpoint_id, g, 200, 1,
       now() - CASE WHEN g <= 25 THEN interval '10 days' ELSE interval '1 day' END
  FROM callback_center.outbox o, generate_series(1, 27) g
 WHERE o.aggregate_id = 'rt-7';

-- Providers' answers (one per outbox row): applied 10 days ago, applied a
-- day ago, and one recorded 30 days ago and never applied (it stays,
-- whatever the age).
INSERT INTO callback_center.provider_answers (outbox_id, endpoint_id, provider, event_type,
                                              aggregate_id, attempt, http_status, answer,
                                              recorded_at, applied_at, outcome)
SELECT o.id, o.endpoint_id, 'rt-pay', 'payment.query', o.aggregate_id, 1, 200, '{}',
       now() - v.age, now() - v.applied, CASE WHEN v.applied IS NOT NULL THEN 'no_query' END
  FROM callback_center.outbox o
  JOIN (VALUES ('rt-7', interval '10 days', interval '10 days'),
               ('rt-8', '2 days', '1 day'),
               ('rt-9', '30 days', NULL)) AS v(agg, age, applied) ON v.agg = o.aggregate_id;

-- Each relation has its own age: attempts (answers too) and history kept
-- 30 days here, so they lose nothing.  Batches of 2: the 5 old delivered
-- rows go in 3 batches (2, 2, 1).
SELECT relation, purged, batches
  FROM callback_center.purge('7 days', 2, attempts_older_than => '30 days',
                             history_older_than => '30 days');

SELECT aggregate_id, status FROM callback_center.outbox
 WHERE aggregate_id LIKE 'rt-%' ORDER BY aggregate_id;
SELECT count(*) AS history_left FROM callback_center.state_history WHERE entity_id IN ('rt-o1', 'pay_rt-o1');
SELECT biz_id, status FROM callback_center.callback_record WHERE biz_id LIKE 'rt-b%' ORDER BY 1;
SELECT provider_txn_id FROM callback_center.recon_diffs WHERE channel = 'rt-chan';

SELECT count(*) AS attempts_left FROM callback_center.delivery_attempts a
  JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = 'rt-7';
SELECT aggregate_id, applied_at IS NOT NULL AS applied FROM callback_center.provider_answers
 WHERE aggregate_id LIKE 'rt-%' ORDER BY aggregate_id;

-- Attempts kept 7 days, in batches of 10: the 25 old ones go in 3 batches
-- (10, 10, 5), the recent ones stay, and the answer applied 10 days ago
-- goes with them; history kept 10 days: the 20-day-old rows go.
SELECT relation, purged, batches
  FROM callback_center.purge('7 days', 10, history_older_than => '10 days');
SELECT count(*) AS attempts_left FROM callback_center.delivery_attempts a
  JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = 'rt-7';
SELECT aggregate_id, applied_at IS NOT NULL AS applied FROM callback_center.provider_answers
 WHERE aggregate_id LIKE 'rt-%' ORDER BY aggregate_id;
SELECT count(*) AS history_left FROM callback_center.state_history WHERE entity_id IN ('rt-o1', 'pay_rt-o1');

-- One batch deletes at most batch_size rows: 15 old attempts, a batch of 10.
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status,
                                               latency_ms, attempted_at)
SELECT o.id, o.endpoint_id, g, 200, 1, now() - interval '10 days'
  FROM callback_center.outbox o, generate_series(1, 15) g
 WHERE o.aggregate_id = 'rt-7';
SELECT purged FROM callback_center._purge_batch('callback_center.delivery_attempts',
                                                now() - interval '7 days', 0, 10);
SELECT count(*) AS old_attempts_left FROM callback_center.delivery_attempts a
  JOIN callback_center.outbox o ON o.id = a.outbox_id
 WHERE o.aggregate_id = 'rt-7' AND a.attempted_at < now() - interval '7 days';

-- A full run takes the 5 old attempts left; nothing else is due.
SELECT relation, purged, batches
  FROM callback_center.purge('7 days', 10);

-- A shorter age takes the day-old delivered row too; the default batch.
-- The 30-day-old dead row stays whatever the age (it is kept for replay),
-- as do the pending and delivering ones.
SELECT purged FROM callback_center.purge('12 hours')
 WHERE relation = 'callback_center.outbox';
SELECT aggregate_id, status FROM callback_center.outbox
 WHERE aggregate_id LIKE 'rt-%' ORDER BY aggregate_id;

-- That shorter age took the answer applied a day ago too (answers go on
-- the attempts' age, here older_than); the one never applied stays,
-- however old, until it is applied.
SELECT aggregate_id, applied_at IS NOT NULL AS applied FROM callback_center.provider_answers
 WHERE aggregate_id LIKE 'rt-%' ORDER BY aggregate_id;
SELECT purged FROM callback_center._purge_batch('callback_center.provider_answers',
                                                now(), 0, 10);
UPDATE callback_center.provider_answers SET applied_at = now() - interval '1 hour', outcome = 'no_query'
 WHERE aggregate_id = 'rt-9';
SELECT purged FROM callback_center._purge_batch('callback_center.provider_answers',
                                                now(), 0, 10);

-- Only the admin may purge.
CREATE ROLE rt_admin NOLOGIN IN ROLE callback_center_admin;
GRANT USAGE ON SCHEMA callback_center TO rt_admin;
CREATE ROLE rt_app NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO rt_app;
SET ROLE rt_admin;
SELECT count(*) AS admin_relations FROM callback_center.purge('7 days');
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
SELECT * FROM callback_center.purge('7 days', 10, attempts_older_than => '-1 day');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.purge('7 days', 10, history_older_than => '-1 day');
\echo :LAST_ERROR_SQLSTATE

-- Clean up.
REVOKE USAGE ON SCHEMA callback_center FROM rt_admin;
DROP ROLE rt_admin;
REVOKE USAGE ON SCHEMA callback_center FROM rt_app;
DROP ROLE rt_app;
SELECT callback_center.drop_endpoint('rt-sink') > 0 AS dropped;
DELETE FROM callback_center.recon_diffs WHERE channel = 'rt-chan';
DELETE FROM callback_center.callback_record WHERE biz_id LIKE 'rt-b%';
