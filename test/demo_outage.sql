-- Scenario E of the demo, in two phases (psql variable "phase").
\pset footer off
\set QUIET on
SELECT :'phase' = 'down' AS down \gset
\if :down
SELECT sum(callback_center.enqueue('settlement.split', 'E-' || i, jsonb_build_object('n', i))) AS queued
  FROM generate_series(1, 3) i;
\echo 'the receiver answers 500: retries after 1 s, 3 s, 5 s (with jitter), then dead letters ...'
DO $$
BEGIN
    FOR i IN 1..200 LOOP
        EXIT WHEN (SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'E-%' AND status = 'dead') = 3;
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT aggregate_id, status, attempts, last_http_status, last_error FROM callback_center.outbox
 WHERE aggregate_id LIKE 'E-%' ORDER BY id;
SELECT endpoint, alerts FROM callback_center.health WHERE endpoint = 'settlement';
\else
SELECT callback_center.replay_dead('settlement', reason => 'settlement back online') AS replayed;
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXIT WHEN (SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'E-%' AND status = 'delivered') = 3;
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT aggregate_id, status, attempts FROM callback_center.outbox WHERE aggregate_id LIKE 'E-%' ORDER BY id;
SELECT outbox_id, attempts_before, reason FROM callback_center.replay_audit ORDER BY outbox_id;
\endif
