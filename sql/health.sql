-- The monitoring views against the alert thresholds of the design: failure
-- rate over 1%, more than 10 dead letters, p99 latency over 3 s, a breaker
-- that is not closed, a disabled endpoint.  The attempts and dead letters
-- are written by hand (as the worker would) so that every threshold is met
-- exactly on one side and passed on the other; no event here is pending, so
-- the worker has nothing to send.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

SELECT count(*) AS created FROM (VALUES
    (callback_center.create_endpoint('h_quiet',  'http://127.0.0.1:9/q',  '{h.none}')),
    (callback_center.create_endpoint('h_fail1',  'http://127.0.0.1:9/f1', '{h.none}')),
    (callback_center.create_endpoint('h_fail2',  'http://127.0.0.1:9/f2', '{h.none}')),
    (callback_center.create_endpoint('h_dead10', 'http://127.0.0.1:9/d0', '{h.none}')),
    (callback_center.create_endpoint('h_dead11', 'http://127.0.0.1:9/d1', '{h.none}')),
    (callback_center.create_endpoint('h_slow',   'http://127.0.0.1:9/s',  '{h.none}')),
    (callback_center.create_endpoint('h_fast',   'http://127.0.0.1:9/ok', '{h.none}')),
    (callback_center.create_endpoint('h_open',   'http://127.0.0.1:9/o',  '{h.none}')),
    (callback_center.create_endpoint('h_off',    'http://127.0.0.1:9/x',  '{h.none}',
        NULL, '{"enabled": false}'))) v(id);

CREATE FUNCTION pg_temp.ep(n text) RETURNS integer LANGUAGE sql AS
$$ SELECT id FROM callback_center.endpoints WHERE name = n $$;

-- 100 attempts each.  h_fail1: exactly 1% failed (at the threshold, no
-- alert); h_fail2: 2% failed, one of them a transport error (no status).
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status, latency_ms, error)
SELECT i, pg_temp.ep('h_fail1'), 1, CASE WHEN i = 1 THEN 500 ELSE 200 END, 10, NULL
  FROM generate_series(1, 100) i;
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status, latency_ms, error)
SELECT i, pg_temp.ep('h_fail2'), CASE WHEN i <= 3 THEN 2 ELSE 1 END,
       CASE WHEN i = 1 THEN 503 WHEN i = 2 THEN NULL ELSE 200 END, 10,
       CASE WHEN i = 2 THEN 'could not connect' END
  FROM generate_series(1, 100) i;
-- Latency: h_slow has 2 of 100 attempts above 3 s (p99 above the threshold),
-- h_fast has 1 (p99 interpolates below it).
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status, latency_ms)
SELECT i, pg_temp.ep('h_slow'), 1, 200, CASE WHEN i > 98 THEN 4000 ELSE i END
  FROM generate_series(1, 100) i;
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status, latency_ms)
SELECT i, pg_temp.ep('h_fast'), 1, 200, CASE WHEN i = 100 THEN 4000 ELSE 20 END
  FROM generate_series(1, 100) i;
-- Dead letters: 10 (at the threshold) and 11.
INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload, status, attempts, last_http_status)
SELECT pg_temp.ep(n), 'h.none', 'agg-' || i, '{}', 'dead', 4, 500
  FROM (VALUES ('h_dead10', 10), ('h_dead11', 11)) v(n, k), generate_series(1, k) i;
-- A breaker the worker reported open.
INSERT INTO callback_center.endpoint_state (endpoint_id, breaker, opened_at, window_ok, window_fail, updated_at)
VALUES (pg_temp.ep('h_open'), 'open', now(), 0, 20, now());

SELECT endpoint, delivered, failed_attempts, retries, round(failure_rate::numeric, 3) AS failure_rate,
       dead, pending, round(p50_ms::numeric, 1) AS p50, round(p95_ms::numeric, 1) AS p95,
       round(p99_ms::numeric, 1) AS p99, breaker
  FROM callback_center.delivery_stats
 WHERE endpoint LIKE 'h\_%' ORDER BY endpoint;

-- One line per endpoint; an empty array means healthy.
SELECT endpoint, alerts FROM callback_center.health WHERE endpoint LIKE 'h\_%' ORDER BY endpoint;

-- Attempts older than the window do not count.
SELECT endpoint, delivered, failed_attempts
  FROM callback_center.delivery_stats('0 seconds') WHERE endpoint = 'h_fail2';

-- The application role may read the views but not the attempts log itself.
-- Members of the group roles may use this database.
GRANT USAGE ON SCHEMA callback_center TO callback_center_app, callback_center_admin;
SET ROLE callback_center_app;
SELECT count(*) > 0 AS app_sees_health FROM callback_center.health WHERE endpoint LIKE 'h\_%';
SELECT count(*) FROM callback_center.delivery_attempts;
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM callback_center_app, callback_center_admin;

SELECT callback_center.drop_endpoint(n) FROM unnest(ARRAY['h_quiet', 'h_fail1', 'h_fail2',
    'h_dead10', 'h_dead11', 'h_slow', 'h_fast', 'h_open', 'h_off']) n;
DELETE FROM callback_center.delivery_attempts WHERE endpoint_id NOT IN (SELECT id FROM callback_center.endpoints);
DELETE FROM callback_center.endpoint_state WHERE endpoint_id NOT IN (SELECT id FROM callback_center.endpoints);
