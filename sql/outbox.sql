SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Errors are shown as SQLSTATE: message, one line each.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- Built-in retry schedules.
SELECT name, cardinality(delays) AS n, delays[1] AS first, delays[cardinality(delays)] AS last,
       builtin
  FROM callback_center.retry_schedules
 WHERE builtin ORDER BY name;
SELECT sum(d) AS merchant_erp_span
  FROM callback_center.retry_schedules, unnest(delays) d WHERE name = 'merchant_erp';

-- Endpoints.  Ids are not shown: they change from run to run.
SELECT callback_center.create_endpoint('ob_erp', 'https://erp.example.com/hooks',
       '{order.paid,order.closed}', NULL,
       '{"retry_schedule": "merchant_erp", "timeout_ms": 2000, "ordered": true}') > 0 AS created;
SELECT callback_center.create_endpoint('ob_all', 'http://127.0.0.1:8080/all', '{*}',
       'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw') > 0 AS created;
SELECT callback_center.create_endpoint('ob_off', 'http://[::1]:9/off', '{order.paid}',
       NULL, '{"enabled": false, "is_core": false}') > 0 AS created;
SELECT name, url, event_types, timeout_ms, retry_schedule, max_attempts,
       rate_limit_per_s, breaker_failure_ratio, breaker_window_s,
       breaker_min_requests, breaker_open_ms, is_core, ordered, enabled
  FROM callback_center.endpoint_config WHERE name LIKE 'ob\_%' ORDER BY name;

-- A generated secret is whsec_ and 32 random bytes; a given one is kept.
SELECT callback_center.endpoint_secret('ob_erp') ~ '^whsec_[A-Za-z0-9+/]{43}=$' AS generated,
       callback_center.endpoint_secret('ob_all') AS given,
       callback_center.endpoint_secret('ob_erp') <> callback_center.endpoint_secret('ob_off')
           AS distinct_secrets;

-- Rotation keeps the previous secret.
SELECT callback_center.rotate_endpoint_secret('ob_all',
       'whsec_c2Vjb25kIHNlY3JldCBmb3IgdGhlIG91dGJveCB0ZXN0') AS rotated;
SELECT s.secret, s.previous_secret, s.rotated_at IS NOT NULL AS rotated_at_set
  FROM callback_center.endpoint_secrets s
  JOIN callback_center.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'ob_all';
SELECT callback_center.rotate_endpoint_secret('ob_all') <> 'whsec_c2Vjb25kIHNlY3JldCBmb3IgdGhlIG91dGJveCB0ZXN0'
       AS new_random;

-- alter_endpoint changes only what it names; NULL resets the nullable ones.
SELECT callback_center.alter_endpoint('ob_erp',
       '{"max_attempts": 10, "rate_limit_per_s": 2.5, "breaker_failure_ratio": 0.25,
         "url": "https://erp.example.com/v2/hooks"}');
SELECT name, url, max_attempts, rate_limit_per_s, breaker_failure_ratio, timeout_ms, ordered
  FROM callback_center.endpoint_config WHERE name = 'ob_erp';
SELECT callback_center.alter_endpoint('ob_erp', '{"max_attempts": null, "rate_limit_per_s": null}');
SELECT name, max_attempts, rate_limit_per_s FROM callback_center.endpoint_config WHERE name = 'ob_erp';

-- Enqueue fans out to the enabled subscribers (ob_off is disabled).
BEGIN;
SELECT callback_center.enqueue('order.paid', 'ob-order-1', '{"amount": 100}') AS paid;
SELECT callback_center.enqueue('order.shipped', 'ob-order-1', '{"carrier": "x"}') AS shipped;
SELECT callback_center.enqueue('order.closed', 'ob-order-2', '{}') AS closed;
COMMIT;
SELECT e.name, o.event_type, o.aggregate_id, o.payload, o.status, o.attempts,
       o.next_attempt_at <= now() AS due, o.delivered_at, o.last_http_status, o.last_error
  FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 WHERE o.aggregate_id LIKE 'ob-order-%' ORDER BY o.aggregate_id, o.event_type, e.name;

-- An event type only ob_all's '*' matches.
SELECT callback_center.enqueue('ob.only.star', 'ob-order-3', '{}') AS queued;

-- An aborted transaction leaves nothing.
BEGIN;
SELECT callback_center.enqueue('order.paid', 'ob-order-4', '{}') AS queued;
ROLLBACK;
SELECT count(*) AS after_rollback FROM callback_center.outbox WHERE aggregate_id = 'ob-order-4';

-- Disabled, then enabled again.
SELECT callback_center.set_endpoint_enabled('ob_off', true);
SELECT callback_center.enqueue('order.paid', 'ob-order-5', '{}') AS queued;
SELECT callback_center.set_endpoint_enabled('ob_off', false);
SELECT callback_center.enqueue('order.paid', 'ob-order-6', '{}') AS queued;

-- enqueue_to: one endpoint, whatever it subscribes to; 0 when disabled.
SELECT callback_center.enqueue_to('ob_erp', 'erp.resync', 'ob-order-7', '{"full": true}') AS queued;
SELECT callback_center.enqueue_to('ob_off', 'order.paid', 'ob-order-7', '{}') AS queued;
SELECT e.name, o.event_type FROM callback_center.outbox o
  JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 WHERE o.aggregate_id = 'ob-order-7';

-- The delivery id receivers see is 'msg_' || id: the same for every retry.
SELECT count(DISTINCT 'msg_' || id) = count(*) AS unique_ids
  FROM callback_center.outbox WHERE aggregate_id LIKE 'ob-order-%';

-- The pending set is found through the partial index.
SET enable_seqscan = off;
EXPLAIN (COSTS OFF)
SELECT id FROM callback_center.outbox
 WHERE endpoint_id = 1 AND status IN ('pending', 'delivering') AND next_attempt_at <= now()
 ORDER BY next_attempt_at LIMIT 10;
EXPLAIN (COSTS OFF)
SELECT id FROM callback_center.outbox
 WHERE status IN ('pending', 'delivering') AND endpoint_id = 1 AND aggregate_id = 'x'
 ORDER BY id LIMIT 1;
RESET enable_seqscan;
SELECT c.relname, c.reloptions FROM pg_class c
 WHERE c.oid = 'callback_center.outbox'::regclass;
-- No foreign key from outbox (see doc/outbox.md); the others are there.
SELECT conrelid::regclass AS tbl, confrelid::regclass AS refs, confdeltype
  FROM pg_constraint WHERE contype = 'f' AND connamespace = 'callback_center'::regnamespace
   AND conrelid IN ('callback_center.outbox'::regclass, 'callback_center.endpoints'::regclass,
                    'callback_center.endpoint_secrets'::regclass, 'callback_center.retry_schedules'::regclass)
 ORDER BY 1, 2;

-- Bad input, each with its SQLSTATE.
SELECT s, pg_temp.try(s) FROM (VALUES
  ($$SELECT callback_center.enqueue(NULL, 'a', '{}')$$),
  ($$SELECT callback_center.enqueue('t', NULL, '{}')$$),
  ($$SELECT callback_center.enqueue('t', 'a', NULL)$$),
  ($$SELECT callback_center.enqueue('', 'a', '{}')$$),
  ($$SELECT callback_center.enqueue('*', 'a', '{}')$$),
  ($$SELECT callback_center.enqueue('t', 'a', '{"unterminated": ')$$),
  ($$SELECT callback_center.enqueue_to('ob_nope', 't', 'a', '{}')$$),
  ($$SELECT callback_center.enqueue_to(NULL, 't', 'a', '{}')$$),
  ($$SELECT callback_center.enqueue_to('ob_erp', '', 'a', '{}')$$),
  ($$SELECT callback_center.create_endpoint('ob_erp', 'https://x.example', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob bad', 'https://x.example', '{a}')$$),
  ($$SELECT callback_center.create_endpoint(NULL, 'https://x.example', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example', '{}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example', '{a,NULL}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example', '{a,""}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'ftp://x.example/', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https:///path', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'x.example/hook', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/a b', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', E'https://x.example/\n', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://user:pw@x.example/', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example:0/', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example:99999/', '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/' || repeat('a', 2100), '{a}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', 'secret')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', 'whsec_c2hvcnQ=')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', NULL, '[]')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', NULL, NULL)$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', NULL, '{"timeout_ms": -5}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', NULL, '{"timeout_ms": 1.5}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', NULL, '{"timeout_ms": "100"}')$$),
  ($$SELECT callback_center.create_endpoint('ob_x', 'https://x.example/', '{a}', NULL, '{"colour": 1, "speed": 2}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"timeot_ms": 10}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"max_attempts": 0}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"rate_limit_per_s": -1}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"breaker_failure_ratio": 1.5}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"breaker_window_s": 0}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"breaker_min_requests": -1}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"breaker_open_ms": 0}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"enabled": "yes"}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"event_types": []}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"event_types": ["a", 1]}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"retry_schedule": "ob_none"}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_erp', '{"url": "javascript:alert(1)"}')$$),
  ($$SELECT callback_center.alter_endpoint('ob_nope', '{}')$$),
  ($$SELECT callback_center.set_endpoint_enabled('ob_nope', true)$$),
  ($$SELECT callback_center.set_endpoint_enabled('ob_erp', NULL)$$),
  ($$SELECT callback_center.rotate_endpoint_secret('ob_nope')$$),
  ($$SELECT callback_center.rotate_endpoint_secret('ob_erp', 'whsec_!!')$$),
  ($$SELECT callback_center.drop_endpoint('ob_nope')$$),
  ($$SELECT callback_center.endpoint_secret('ob_nope')$$),
  ($$UPDATE callback_center.retry_schedules SET delays = '{1s}' WHERE name = 'default'$$),
  ($$DELETE FROM callback_center.retry_schedules WHERE name = 'merchant_erp'$$),
  ($$INSERT INTO callback_center.retry_schedules (name, delays) VALUES ('ob_neg', '{-1s}')$$)
) AS t(s);

-- A failed alter leaves the endpoint as it was.
SELECT name, timeout_ms, max_attempts, enabled, event_types
  FROM callback_center.endpoint_config WHERE name = 'ob_erp';

-- Admins add their own schedules; endpoints use them.
INSERT INTO callback_center.retry_schedules (name, delays) VALUES ('ob_twice', '{10s,1min}');
SELECT callback_center.alter_endpoint('ob_off', '{"retry_schedule": "ob_twice"}');
SELECT name, retry_schedule, max_attempts FROM callback_center.endpoint_config WHERE name = 'ob_off';
SELECT pg_temp.try($$DELETE FROM callback_center.retry_schedules WHERE name = 'ob_twice'$$);

-- drop_endpoint takes the secret and the endpoint's outbox rows with it.
SELECT callback_center.drop_endpoint('ob_erp') AS removed_rows;
SELECT callback_center.drop_endpoint('ob_all') AS removed_rows;
SELECT callback_center.drop_endpoint('ob_off') AS removed_rows;
DELETE FROM callback_center.retry_schedules WHERE name = 'ob_twice';
SELECT count(*) AS outbox_left FROM callback_center.outbox WHERE aggregate_id LIKE 'ob-order-%';
SELECT count(*) AS endpoints_left FROM callback_center.endpoints WHERE name LIKE 'ob\_%';
SELECT count(*) AS orphan_secrets FROM callback_center.endpoint_secrets s
 WHERE NOT EXISTS (SELECT 1 FROM callback_center.endpoints e WHERE e.id = s.endpoint_id);

-- Nobody subscribes: 0 rows, not an error.
SELECT callback_center.enqueue('ob.nobody.listens', 'ob-order-8', '{}') AS queued;
SELECT count(*) AS queued_rows FROM callback_center.outbox WHERE aggregate_id = 'ob-order-8';
