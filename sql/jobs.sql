-- Compensation jobs: timeout close, late payments, active query (doc/jobs.md).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Fixtures: stock, coupons, a sink for every event, a provider.
SELECT callback_center.set_stock('jb-A', 10) IS NOT NULL AS a,
       callback_center.set_stock('jb-B', 5) IS NOT NULL AS b;
SELECT callback_center.issue_coupon('jb-cp1', 'u1'), callback_center.issue_coupon('jb-cp3', 'u3');
SELECT callback_center.create_endpoint('jb-sink', 'http://127.0.0.1:9/sink', '{*}') > 0 AS sink;
SELECT callback_center.create_endpoint('jb-query', 'http://127.0.0.1:9/query', '{payment.query}') > 0 AS query;
SELECT callback_center.set_provider('jb-pay', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);

CREATE FUNCTION jb_events(oid text) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(e.name || ':' || o.event_type, ',' ORDER BY o.id), '')
      FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
     WHERE o.aggregate_id = oid $$;
CREATE FUNCTION jb_headers(body text, msg text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('webhook-id', msg,
        'webhook-timestamp', extract(epoch FROM now())::bigint::text,
        'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
            msg, extract(epoch FROM now())::bigint, body)) $$;
CREATE FUNCTION jb_body(kind text, txn text, oid text, cents bigint) RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('type', kind,
        'data', jsonb_build_object('txn_id', txn, 'order_id', oid, 'amount_cents', cents))::text $$;
CREATE FUNCTION jb_state(oid text) RETURNS TABLE (status text, pay_status text, payment text,
                                                  provider_txn_id text) LANGUAGE sql AS $$
    SELECT o.status, o.pay_status, p.status, p.provider_txn_id
      FROM callback_center.orders o LEFT JOIN callback_center.payments p USING (order_id)
     WHERE o.order_id = oid $$;
-- Prints the SQLSTATE and message of a statement that must fail.
CREATE FUNCTION jb_err(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- ------------------------------------------------------------------------
-- 1. Timeout close.
-- jb-1 unpaid with a coupon, jb-2 not yet due, jb-3 paying, jb-4 paid:
-- all but jb-2 are past their deadline.
-- ------------------------------------------------------------------------
SELECT order_id, status FROM callback_center.place_order('jb-1', 'u1',
    '[{"sku":"jb-A","qty":2},{"sku":"jb-B","qty":1}]', 500, 'jb-cp1', 'jb-pay');
SELECT order_id, status FROM callback_center.place_order('jb-2', 'u2', '[{"sku":"jb-A","qty":1}]', 100);
SELECT order_id, status FROM callback_center.place_order('jb-3', 'u3', '[{"sku":"jb-A","qty":1}]', 300,
    'jb-cp3', 'jb-pay');
SELECT callback_center.start_payment('jb-3', 'jb-pay');
SELECT order_id, status FROM callback_center.place_order('jb-4', 'u4', '[{"sku":"jb-B","qty":1}]', 400,
    NULL, 'jb-pay');
SELECT jb_body('payment.succeeded', 'jb-t4', 'jb-4', 400) AS b4 \gset
SELECT outcome FROM callback_center.payment_callback('jb-pay', jb_headers(:'b4', 'jb-m4'), :'b4');
UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute'
 WHERE order_id IN ('jb-1', 'jb-3', 'jb-4');
SELECT sku_id, available FROM callback_center.stock WHERE sku_id LIKE 'jb-%' ORDER BY 1;

-- The job finds its candidates through the partial deadline index: the
-- function's own statement, checked by the scans it counts on the index in
-- this transaction (no EXPLAIN of a copy, no planner switches).  With
-- enough orders outside the index (2,000 not yet confirmed, rolled back
-- afterwards) and fresh statistics, the index is the natural choice.
BEGIN;
INSERT INTO callback_center.orders (order_id, user_id, items, amount_cents, pay_deadline)
SELECT 'jb-filler-' || g, 'u', '[]', 1, now() - interval '1 hour'
  FROM generate_series(1, 2000) g;
ANALYZE callback_center.orders;
SELECT pg_stat_get_xact_numscans('callback_center.orders_pay_deadline'::regclass) AS scans_before;
SELECT callback_center.close_expired_orders(1) AS closed_in_probe;
SELECT pg_stat_get_xact_numscans('callback_center.orders_pay_deadline'::regclass) > 0
       AS deadline_index_scanned;
ROLLBACK;

SELECT callback_center.close_expired_orders(10) AS closed;
SELECT 'jb-1' AS o, * FROM jb_state('jb-1') UNION ALL SELECT 'jb-2', * FROM jb_state('jb-2')
UNION ALL SELECT 'jb-3', * FROM jb_state('jb-3') UNION ALL SELECT 'jb-4', * FROM jb_state('jb-4');
-- Stock back, coupons unfrozen, order.closed emitted (carrying the closed
-- pay status), every move in the history.
SELECT sku_id, available FROM callback_center.stock WHERE sku_id LIKE 'jb-%' ORDER BY 1;
SELECT coupon_id, status, biz_id FROM callback_center.coupons WHERE coupon_id LIKE 'jb-%' ORDER BY 1;
SELECT jb_events('jb-1') AS jb1, jb_events('jb-3') AS jb3;
SELECT payload->'row'->>'pay_status' AS pay_status_in_event FROM callback_center.outbox
 WHERE aggregate_id = 'jb-1' AND event_type = 'order.closed';
SELECT entity_id, machine, from_state, to_state, event FROM callback_center.state_history
 WHERE entity_id IN ('jb-1', 'pay_jb-1') AND event IN ('close', 'timeout') ORDER BY id;
SELECT count(*) AS deductions_restored FROM callback_center.stock_deductions
 WHERE biz_id = 'jb-1' AND restored;

-- Exactly once: nothing more to close, and closing by hand is a no-op.
SELECT callback_center.close_expired_orders(10) AS closed_again;
SELECT callback_center._close_order('jb-1') AS close_jb1, callback_center._close_order('jb-2') AS close_jb2,
       callback_center._close_order('jb-4') AS close_jb4;
SELECT sku_id, available FROM callback_center.stock WHERE sku_id LIKE 'jb-%' ORDER BY 1;
SELECT jb_events('jb-1') AS jb1;

-- Errors.
SELECT jb_err($$SELECT callback_center._close_order('jb-none')$$);
SELECT jb_err($$SELECT callback_center.close_expired_orders(0)$$);
SELECT jb_err($$SELECT callback_center.close_expired_orders(NULL)$$);

-- An order whose close failed (the worker notes it after the failed
-- transaction; here by hand) is passed over until its retry time, the wait
-- doubling with each failure; then it is closed and its record goes.
SELECT order_id, status FROM callback_center.place_order('jb-8', 'u8', '[{"sku":"jb-A","qty":1}]', 100);
UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute' WHERE order_id = 'jb-8';
SELECT callback_center._note_close_failure('jb-8', 'refused') > now() AS backs_off;
SELECT callback_center._note_close_failure('jb-8', 'refused again') > now() AS backs_off;
SELECT order_id, failures, last_error, retry_at - failed_at AS wait FROM callback_center.close_failures;
SELECT callback_center.close_expired_orders(10) AS closed_while_backing_off;
UPDATE callback_center.close_failures SET retry_at = now() - interval '1 second';
SELECT callback_center.close_expired_orders(10) AS closed_after;
SELECT status, pay_status FROM callback_center.orders WHERE order_id = 'jb-8';
SELECT count(*) AS failures_left FROM callback_center.close_failures;
-- Records of orders no longer waiting for money go with the next failure noted.
SELECT callback_center._note_close_failure('jb-2', 'refused') > now() AS noted;
INSERT INTO callback_center.close_failures VALUES ('jb-4', 1, 'stale', now(), now());
SELECT callback_center._note_close_failure('jb-2', 'refused') > now() AS noted;
SELECT order_id, failures FROM callback_center.close_failures ORDER BY 1;
DELETE FROM callback_center.close_failures;

-- ------------------------------------------------------------------------
-- 2. Late payment: success for the closed order is recorded, never reopens
-- it, and asks for a refund, once per provider transaction.
-- ------------------------------------------------------------------------
SELECT jb_body('payment.succeeded', 'jb-t1', 'jb-1', 500) AS b1 \gset
SELECT * FROM callback_center.payment_callback('jb-pay', jb_headers(:'b1', 'jb-m1'), :'b1');
SELECT * FROM jb_state('jb-1');
SELECT provider, provider_txn_id, order_id, payment_id, amount_cents, order_status, pay_status,
       payment_status, source, status
  FROM callback_center.late_payments WHERE order_id = 'jb-1' ORDER BY id;
SELECT jb_events('jb-1') AS jb1;
SELECT payload - 'provider' AS refund_payload FROM callback_center.outbox
 WHERE aggregate_id = 'jb-1' AND event_type = 'payment.refund_required';
-- The provider repeats it: the first answer, nothing more.
SELECT * FROM callback_center.payment_callback('jb-pay', jb_headers(:'b1', 'jb-m1'), :'b1');
-- A second transaction for the same order: also kept, also to refund; the
-- payment keeps the first.
SELECT jb_body('payment.succeeded', 'jb-t1b', 'jb-1', 500) AS b1b \gset
SELECT outcome FROM callback_center.payment_callback('jb-pay', jb_headers(:'b1b', 'jb-m1b'), :'b1b');
SELECT provider_txn_id, payment_status, status FROM callback_center.late_payments
 WHERE order_id = 'jb-1' ORDER BY id;
SELECT * FROM jb_state('jb-1');
-- Money for an order paid by another transaction is late money too.
SELECT jb_body('payment.succeeded', 'jb-t4b', 'jb-4', 400) AS b4b \gset
SELECT outcome FROM callback_center.payment_callback('jb-pay', jb_headers(:'b4b', 'jb-m4b'), :'b4b');
SELECT * FROM jb_state('jb-4');
-- A failure for a closed order changes nothing.
SELECT jb_body('payment.failed', 'jb-t3f', 'jb-3', 300) AS b3f \gset
SELECT outcome FROM callback_center.payment_callback('jb-pay', jb_headers(:'b3f', 'jb-m3f'), :'b3f');
SELECT * FROM jb_state('jb-3');

-- The payment machine: late money leaves CLOSED or FAILED for
-- REFUND_REQUIRED, and only a refund leaves that.
SELECT from_state, to_state, event FROM callback_center.transitions
 WHERE machine = 'payment' AND (to_state LIKE 'REFUND%' OR from_state = 'REFUND_REQUIRED')
 ORDER BY 1, 2;
SELECT jb_err($$SELECT callback_center.apply_event('callback_center.payments', 'status', 'pay_jb-1', 'success')$$);

-- The refund is done: marked once.
SELECT callback_center.mark_refunded('jb-pay', 'jb-t1') AS first, callback_center.mark_refunded('jb-pay', 'jb-t1') AS again;
SELECT callback_center.mark_refunded('jb-pay', 'jb-t1b') AS other_txn;
SELECT * FROM jb_state('jb-1');
SELECT provider_txn_id, status, refunded_at IS NOT NULL AS has_refunded_at
  FROM callback_center.late_payments WHERE order_id = 'jb-1' ORDER BY id;
SELECT jb_err($$SELECT callback_center.mark_refunded('jb-pay', 'jb-nope')$$);
SELECT jb_err($$SELECT callback_center.mark_refunded(NULL, 'jb-t1')$$);

-- ------------------------------------------------------------------------
-- 3. Active query: a payment stuck in PAYING is queried at its provider's
-- query endpoint; the answer goes through the callback's path, once.
-- ------------------------------------------------------------------------
-- jb-query is plain http: refused unless the admin accepts answers over
-- http from it, which is recorded and shown.
SELECT jb_err($$SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query')$$);
SELECT jb_err($$SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query', NULL)$$);
SELECT count(*) AS configured FROM callback_center.provider_query_endpoints WHERE provider = 'jb-pay';
SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query', allow_plain_http => true);
SELECT * FROM callback_center.provider_query_endpoints WHERE provider = 'jb-pay';
SELECT jb_err($$SELECT callback_center.set_provider_query_endpoint('jb-nobody', 'jb-query')$$);
SELECT jb_err($$SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-nowhere')$$);
SELECT jb_err($$SELECT callback_center.set_provider_query_endpoint(NULL, 'jb-query')$$);
SELECT jb_err($$SELECT callback_center.query_stuck_payments(0)$$);
SELECT jb_err($$SELECT callback_center.query_stuck_payments(NULL)$$);
SELECT jb_err($$SELECT callback_center.query_stuck_payments(1, interval '-1 s')$$);
SELECT jb_err($$SELECT callback_center.apply_query_answers(0)$$);
SELECT jb_err($$SELECT callback_center.apply_query_answers(NULL)$$);
SELECT jb_err($$SELECT callback_center._apply_query_answer(-1, '{}')$$);

SELECT order_id, status FROM callback_center.place_order('jb-5', 'u5', '[{"sku":"jb-A","qty":1}]', 700,
    NULL, 'jb-pay');
-- Not paying yet: nothing to ask.
SELECT callback_center.query_stuck_payments(10, '0 s', '1 hour') AS sent;
SELECT callback_center.start_payment('jb-5', 'jb-pay');
-- Paying, but not for long enough (the default is pay_query_after).
SELECT callback_center.query_stuck_payments(10) AS sent;
SELECT callback_center.query_stuck_payments(10, '0 s', '1 hour') AS sent;
-- One query in flight at a time.
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent_again;
-- Only to the query endpoint, although jb-sink takes every event.
SELECT jb_events('jb-5') AS jb5;
SELECT payload FROM callback_center.outbox WHERE aggregate_id = 'jb-5' AND event_type = 'payment.query';
SELECT payment_id, order_id, provider, status, outcome FROM callback_center.payment_queries
 WHERE order_id = 'jb-5';
-- Not delivered yet: nothing to apply.
SELECT callback_center.apply_query_answers(10) AS applied;

-- The worker delivers it and keeps the provider's answer (simulated here:
-- the regress database has no worker).
CREATE FUNCTION jb_deliver(oid text, http_status integer, body text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status,
                                                   latency_ms, response_body)
    SELECT o.id, o.endpoint_id, 1, http_status, 1, body FROM callback_center.outbox o
     WHERE o.aggregate_id = oid AND o.event_type = 'payment.query' AND o.status = 'pending';
    UPDATE callback_center.outbox o
       SET status = CASE WHEN http_status BETWEEN 200 AND 299 THEN 'delivered' ELSE 'dead' END,
           attempts = 1, last_http_status = http_status,
           last_error = CASE WHEN http_status BETWEEN 200 AND 299 THEN NULL ELSE 'HTTP ' || http_status END,
           delivered_at = now()
     WHERE o.aggregate_id = oid AND o.event_type = 'payment.query' AND o.status = 'pending' $$;
SELECT jb_deliver('jb-5', 200, jb_body('payment.succeeded', 'jb-t5', 'jb-5', 700));
SELECT callback_center.apply_query_answers(10) AS applied;
SELECT * FROM jb_state('jb-5');
SELECT status, outcome, error FROM callback_center.payment_queries WHERE order_id = 'jb-5';
SELECT jb_events('jb-5') AS jb5;
-- Applied once.
SELECT callback_center.apply_query_answers(10) AS applied_again;
SELECT callback_center._apply_query_answer(id, jb_body('payment.succeeded', 'jb-t5', 'jb-5', 700)) AS direct_again
  FROM callback_center.payment_queries WHERE order_id = 'jb-5';
-- The provider's own callback for that transaction arrives afterwards:
-- recognised, not a second payment, no refund.
SELECT jb_body('payment.succeeded', 'jb-t5', 'jb-5', 700) AS b5 \gset
SELECT outcome FROM callback_center.payment_callback('jb-pay', jb_headers(:'b5', 'jb-m5'), :'b5');
SELECT count(*) AS late FROM callback_center.late_payments WHERE order_id = 'jb-5';
-- Paid: no more queries.
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent;

-- Answers applied directly (the function the worker uses), one query each.
SELECT order_id, status FROM callback_center.place_order('jb-6', 'u6', '[{"sku":"jb-A","qty":1}]', 600,
    NULL, 'jb-pay');
SELECT callback_center.start_payment('jb-6', 'jb-pay');
CREATE FUNCTION jb_ask(oid text) RETURNS bigint LANGUAGE sql AS $$
    SELECT callback_center.query_stuck_payments(10, '0 s', '0 s');
    SELECT max(id) FROM callback_center.payment_queries WHERE order_id = oid $$;
-- Still pending at the provider: nothing applied, asked again later.
SELECT callback_center._apply_query_answer(jb_ask('jb-6'),
    '{"type":"payment.pending","data":{"txn_id":"jb-t6","order_id":"jb-6"}}') AS pending;
-- Not JSON, no transaction id, another order's answer: bad answers, failed.
SELECT callback_center._apply_query_answer(jb_ask('jb-6'), 'not json') AS not_json;
SELECT callback_center._apply_query_answer(jb_ask('jb-6'), '{"type":"payment.succeeded","data":{}}') AS no_txn;
SELECT callback_center._apply_query_answer(jb_ask('jb-6'),
    jb_body('payment.succeeded', 'jb-t6', 'jb-5', 600)) AS other_order;
-- A wrong amount is not applied.
SELECT callback_center._apply_query_answer(jb_ask('jb-6'),
    jb_body('payment.succeeded', 'jb-t6', 'jb-6', 1)) AS wrong_amount;
SELECT status, outcome, error FROM callback_center.payment_queries WHERE order_id = 'jb-6' ORDER BY id;
SELECT * FROM jb_state('jb-6');
-- The provider says it failed: the same compensation as a failure callback.
SELECT callback_center._apply_query_answer(jb_ask('jb-6'),
    jb_body('payment.failed', 'jb-t6', 'jb-6', 600)) AS failed;
SELECT * FROM jb_state('jb-6');
SELECT jb_events('jb-6') AS jb6;

-- A dead query is finished as failed; the payment is asked again.
SELECT order_id, status FROM callback_center.place_order('jb-7', 'u7', '[{"sku":"jb-A","qty":1}]', 800,
    NULL, 'jb-pay');
SELECT callback_center.start_payment('jb-7', 'jb-pay');
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent;
SELECT jb_deliver('jb-7', 500, '{"ok":false}');
SELECT callback_center.apply_query_answers(10) AS finished;
SELECT status, outcome, error FROM callback_center.payment_queries WHERE order_id = 'jb-7';
-- Not before the interval since the last query has passed.
SELECT callback_center.query_stuck_payments(10, '0 s', '1 hour') AS sent_too_soon;
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent_after_interval;
-- Applying raises (here a trigger of the user's refuses the move): the
-- query is recorded as failed with the error; nothing is half applied.
CREATE FUNCTION jb_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'payments of jb-7 are frozen';
END $$;
CREATE TRIGGER jb_refuse BEFORE UPDATE ON callback_center.payments
    FOR EACH ROW WHEN (NEW.order_id = 'jb-7') EXECUTE FUNCTION jb_refuse();
SELECT jb_deliver('jb-7', 200, jb_body('payment.succeeded', 'jb-t7', 'jb-7', 800));
SELECT callback_center.apply_query_answers(10) AS finished;
SELECT status, outcome, error FROM callback_center.payment_queries WHERE order_id = 'jb-7' ORDER BY id;
SELECT * FROM jb_state('jb-7');
DROP TRIGGER jb_refuse ON callback_center.payments;
-- Late money found by a query: the order closed meanwhile.
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent;
UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute' WHERE order_id = 'jb-7';
SELECT callback_center.close_expired_orders(10) AS closed;
SELECT jb_deliver('jb-7', 200, jb_body('payment.succeeded', 'jb-t7', 'jb-7', 800));
SELECT callback_center.apply_query_answers(10) AS finished;
SELECT status, outcome FROM callback_center.payment_queries WHERE order_id = 'jb-7' ORDER BY id;
SELECT * FROM jb_state('jb-7');
SELECT provider_txn_id, source, status FROM callback_center.late_payments WHERE order_id = 'jb-7';

-- ------------------------------------------------------------------------
-- 4. Reconciliation reports late money as refund_required, for people.
-- ------------------------------------------------------------------------
INSERT INTO callback_center.provider_statement (channel, bill_date, provider_txn_id, order_id,
                                                amount_cents, status)
VALUES ('jb-pay', current_date, 'jb-t4', 'jb-4', 400, 'success'),
       ('jb-pay', current_date, 'jb-t4b', 'jb-4', 400, 'success'),
       ('jb-pay', current_date, 'jb-t5', 'jb-5', 700, 'success'),
       ('jb-pay', current_date, 'jb-t7', 'jb-7', 800, 'success'),
       ('jb-pay', current_date, 'jb-t1', 'jb-1', 500, 'refund'),
       ('jb-pay', current_date, 'jb-t1b', 'jb-1', 500, 'refund');
SELECT * FROM callback_center.reconcile('jb-pay', current_date, '0 s');
SELECT provider_txn_id, order_id, kind, local_status, resolution
  FROM callback_center.recon_diffs WHERE channel = 'jb-pay' ORDER BY provider_txn_id;

-- ------------------------------------------------------------------------
-- 4b. Answers count only over https, unless the admin allowed plain http
-- for that query endpoint.
-- ------------------------------------------------------------------------
-- An https query endpoint altered to plain http after it was named: its
-- answers are refused (recorded as failed, plain_http), never applied,
-- until the admin allows plain http there.
SELECT callback_center.set_stock('jb-C', 10) IS NOT NULL AS c;
SELECT callback_center.create_endpoint('jb-query-tls', 'https://127.0.0.1:9/query', '{payment.query}') > 0 AS tls;
SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query-tls');
SELECT * FROM callback_center.provider_query_endpoints WHERE provider = 'jb-pay';
SELECT order_id, status FROM callback_center.place_order('jb-h1', 'uh1', '[{"sku":"jb-C","qty":1}]', 900,
    NULL, 'jb-pay');
SELECT callback_center.start_payment('jb-h1', 'jb-pay');
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent;
SELECT callback_center.alter_endpoint('jb-query-tls', '{"url":"http://127.0.0.1:9/query"}');
SELECT jb_deliver('jb-h1', 200, jb_body('payment.succeeded', 'jb-th1', 'jb-h1', 900));
SELECT callback_center.apply_query_answers(10) AS finished;
SELECT status, outcome, error FROM callback_center.payment_queries WHERE order_id = 'jb-h1' ORDER BY id;
SELECT * FROM jb_state('jb-h1');
-- Direct application is refused the same way.
SELECT callback_center._apply_query_answer(jb_ask('jb-h1'),
    jb_body('payment.succeeded', 'jb-th1', 'jb-h1', 900)) AS direct;
SELECT * FROM jb_state('jb-h1');
-- Naming it again requires the opt-out; then its answers count.
SELECT jb_err($$SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query-tls')$$);
SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query-tls', allow_plain_http => true);
SELECT callback_center._apply_query_answer(jb_ask('jb-h1'),
    jb_body('payment.succeeded', 'jb-th1', 'jb-h1', 900)) AS allowed;
SELECT * FROM jb_state('jb-h1');
-- The opt-out belongs to the provider's current query endpoint: an answer
-- to a query sent to a former plain-http one is refused.
SELECT callback_center.alter_endpoint('jb-query-tls', '{"url":"https://127.0.0.1:9/query"}');
SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query', allow_plain_http => true);
SELECT order_id, status FROM callback_center.place_order('jb-h2', 'uh2', '[{"sku":"jb-C","qty":1}]', 900,
    NULL, 'jb-pay');
SELECT callback_center.start_payment('jb-h2', 'jb-pay');
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent;
SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query-tls');
SELECT callback_center._apply_query_answer(max(id), jb_body('payment.succeeded', 'jb-th2', 'jb-h2', 900)) AS former
  FROM callback_center.payment_queries WHERE order_id = 'jb-h2';
SELECT status, outcome, error FROM callback_center.payment_queries WHERE order_id = 'jb-h2' ORDER BY id;
SELECT * FROM jb_state('jb-h2');

-- ------------------------------------------------------------------------
-- 4c. A query goes through the outbox's writer: to an ordered query
-- endpoint it takes the aggregate's ordering lock, as enqueue does.
-- ------------------------------------------------------------------------
BEGIN;
SELECT callback_center.create_endpoint('jb-query-ord', 'https://127.0.0.1:9/query',
    '{payment.query}', NULL, '{"ordered": true}') > 0 AS ordered_query;
SELECT callback_center.set_provider_query_endpoint('jb-pay', 'jb-query-ord');
SELECT order_id, status FROM callback_center.place_order('jb-o1', 'uo1', '[{"sku":"jb-C","qty":1}]', 900,
    NULL, 'jb-pay');
SELECT callback_center.start_payment('jb-o1', 'jb-pay');
SELECT count(*) AS ordering_locks_before FROM pg_locks
 WHERE locktype = 'advisory' AND classid = 1667460978 AND pid = pg_backend_pid();
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') > 0 AS sent;
SELECT count(*) > 0 AS ordering_lock FROM pg_locks
 WHERE locktype = 'advisory' AND classid = 1667460978 AND pid = pg_backend_pid();
ROLLBACK;

-- ------------------------------------------------------------------------
-- 5. Privileges: the jobs are for admins.
-- ------------------------------------------------------------------------
SELECT p.proname, has_function_privilege('callback_center_app', p.oid, 'EXECUTE') AS app,
       has_function_privilege('callback_center_admin', p.oid, 'EXECUTE') AS admin
  FROM pg_proc p
 WHERE p.pronamespace = 'callback_center'::regnamespace
   AND p.proname IN ('close_expired_orders', '_close_order', 'query_stuck_payments',
                     'apply_query_answers', '_apply_query_answer', '_apply_payment_result',
                     'set_provider_query_endpoint', 'mark_refunded', 'jobs_status')
 ORDER BY 1;

-- Clean up what other files could trip over (a sink for every event).
SELECT callback_center.drop_endpoint('jb-sink') >= 0 AS sink, callback_center.drop_endpoint('jb-query') >= 0 AS query,
       callback_center.drop_endpoint('jb-query-tls') >= 0 AS query_tls;
DROP FUNCTION jb_events(text), jb_headers(text, text), jb_body(text, text, text, bigint),
    jb_state(text), jb_err(text), jb_deliver(text, integer, text), jb_ask(text), jb_refuse();
