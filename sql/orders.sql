-- Orders, coupons and the one-call payment callback (issue 3 section 5).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Fixtures: stock, coupons, an endpoint that takes every event, providers.
SELECT callback_center.set_stock('ord-A', 10) IS NOT NULL AS a,
       callback_center.set_stock('ord-B', 5) IS NOT NULL AS b,
       callback_center.set_stock('ord-C', 1) IS NOT NULL AS c;
SELECT callback_center.issue_coupon('ord-cp1', 'u1'), callback_center.issue_coupon('ord-cp2', 'u2');
SELECT callback_center.create_endpoint('ord-sink', 'http://127.0.0.1:9/sink', '{*}') > 0 AS endpoint;
SELECT callback_center.set_provider('ord-pay', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.set_provider('ord-stripe', 'stripe', ARRAY['whsec_stripe_test_secret']);

-- Events queued for the order, by type (the outbox is how we see them).
CREATE FUNCTION ord_events(oid text) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(event_type, ',' ORDER BY id), '')
      FROM callback_center.outbox WHERE aggregate_id = oid $$;
-- A signed Standard Webhooks request for this body, timestamped now.
CREATE FUNCTION ord_headers(body text, msg text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('webhook-id', msg,
        'webhook-timestamp', extract(epoch FROM now())::bigint::text,
        'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
            msg, extract(epoch FROM now())::bigint, body)) $$;
CREATE FUNCTION ord_pay_body(kind text, txn text, oid text, cents bigint) RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('type', kind,
        'data', jsonb_build_object('txn_id', txn, 'order_id', oid, 'amount_cents', cents))::text $$;

-- Scenario A: an order is placed: stock deducted, coupon frozen, order
-- confirmed, payment created, order.placed queued.
SELECT order_id, status, pay_status, payment_id, failure_reason, is_new
  FROM callback_center.place_order('ord-1', 'u1', '[{"sku":"ord-A","qty":2},{"sku":"ord-B","qty":1}]',
                                   4200, 'ord-cp1', 'ord-pay');
SELECT sku_id, available FROM callback_center.stock WHERE sku_id LIKE 'ord-%' ORDER BY 1;
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'ord-cp1';
SELECT status, amount_cents FROM callback_center.payments WHERE order_id = 'ord-1';
SELECT ord_events('ord-1') AS events;
SELECT pay_deadline - created_at AS pay_window FROM callback_center.orders WHERE order_id = 'ord-1';

-- Placing it again changes nothing.
SELECT order_id, status, pay_status, is_new
  FROM callback_center.place_order('ord-1', 'u1', '[{"sku":"ord-A","qty":2}]', 4200);
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';

-- Short stock is an outcome: the order fails, nothing is held.
SELECT order_id, status, pay_status, payment_id, failure_reason, is_new
  FROM callback_center.place_order('ord-2', 'u2', '[{"sku":"ord-B","qty":1},{"sku":"ord-C","qty":5}]',
                                   100, 'ord-cp2');
SELECT sku_id, available FROM callback_center.stock WHERE sku_id IN ('ord-B', 'ord-C') ORDER BY 1;
SELECT status FROM callback_center.coupons WHERE coupon_id = 'ord-cp2';
SELECT ord_events('ord-2') AS events;

-- A coupon held by another order fails the order too.
SELECT status, failure_reason FROM callback_center.place_order('ord-3', 'u3', '[{"sku":"ord-A","qty":1}]',
                                   100, 'ord-cp1');
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';

-- Bad input is an error and writes nothing.
\set SHOW_CONTEXT never
SELECT * FROM callback_center.place_order('ord-4', 'u', '[{"sku":"no-such-sku","qty":1}]', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.place_order('ord-4', 'u', '[]', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.place_order('ord-4', 'u', '[{"sku":"ord-A","qty":1}]', -1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.place_order(NULL, 'u', '[{"sku":"ord-A","qty":1}]', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.place_order('ord-4', 'u', '[{"sku":"ord-A","qty":0}]', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\set SHOW_CONTEXT errors
SELECT count(*) AS orders_4 FROM callback_center.orders WHERE order_id = 'ord-4';

-- Scenario B: the payment success callback, once.
SELECT callback_center.start_payment('ord-1', 'ord-pay') AS payment;
SELECT status, pay_status FROM callback_center.orders WHERE order_id = 'ord-1';
SELECT ord_pay_body('payment.succeeded', 'txn-1', 'ord-1', 4200) AS body \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body', 'msg_1'), :'body');
SELECT p.status, p.provider_txn_id, o.status AS order_status, o.pay_status
  FROM callback_center.payments p JOIN callback_center.orders o USING (order_id) WHERE order_id = 'ord-1';
SELECT status FROM callback_center.coupons WHERE coupon_id = 'ord-cp1';
SELECT ord_events('ord-1') AS events;
-- The provider retries: same answer, nothing processed again.
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body', 'msg_1'), :'body');
SELECT ord_events('ord-1') AS events;
SELECT status, retry_count FROM callback_center.callback_record WHERE biz_id = 'txn-1';
-- Same transaction id, different body: flagged, not processed.
SELECT ord_pay_body('payment.succeeded', 'txn-1', 'ord-1', 1) AS body2 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body2', 'msg_2'), :'body2');
SELECT count(*) AS flagged FROM callback_center.callback_conflicts WHERE biz_id = 'txn-1';

-- History of the order's pay status: one row per move.
SELECT from_state, to_state, event FROM callback_center.state_history
 WHERE entity_id = 'ord-1' AND machine = 'order_pay' ORDER BY id;

-- A forged or stale signature raises and records nothing.
\set SHOW_CONTEXT never
SELECT * FROM callback_center.payment_callback('ord-pay',
    jsonb_set(ord_headers(:'body', 'msg_3'), '{webhook-signature}', '"v1,AAAA"'), :'body');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.payment_callback('ord-pay',
    jsonb_build_object('webhook-id', 'msg_4', 'webhook-timestamp', '1000000000',
        'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
            'msg_4', 1000000000, :'body')), :'body');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.payment_callback('nobody', '{}', :'body');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- An unknown order raises (the provider will retry) and records nothing.
SELECT ord_pay_body('payment.succeeded', 'txn-x', 'ord-none', 1) AS body3 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body3', 'msg_5'), :'body3');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers('not json', 'msg_6'), 'not json');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\set SHOW_CONTEXT errors
SELECT count(*) AS recorded FROM callback_center.callback_record WHERE biz_id IN ('txn-x');

-- Scenario C: a payment failure restores stock and unfreezes the coupon, once.
SELECT callback_center.issue_coupon('ord-cp5', 'u5');
SELECT status FROM callback_center.place_order('ord-5', 'u5', '[{"sku":"ord-A","qty":3}]', 900, 'ord-cp5');
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';
SELECT ord_pay_body('payment.failed', 'txn-5', 'ord-5', 900) AS body5 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body5', 'msg_7'), :'body5');
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body5', 'msg_7'), :'body5');
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'ord-cp5';
SELECT o.status, o.pay_status, p.status AS payment FROM callback_center.orders o
  JOIN callback_center.payments p USING (order_id) WHERE order_id = 'ord-5';
SELECT ord_events('ord-5') AS events;

-- Scenario D (late money): success for the closed order is kept and asks
-- for a refund; the order is not reopened.
SELECT ord_pay_body('payment.succeeded', 'txn-5b', 'ord-5', 900) AS body6 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body6', 'msg_8'), :'body6');
SELECT o.status, o.pay_status FROM callback_center.orders o WHERE order_id = 'ord-5';
SELECT ord_events('ord-5') AS events;
SELECT payload->>'txn_id' AS txn, payload->>'amount_cents' AS cents FROM callback_center.outbox
 WHERE aggregate_id = 'ord-5' AND event_type = 'payment.refund_required';

-- An amount that does not match is not applied.
SELECT status FROM callback_center.place_order('ord-6', 'u6', '[{"sku":"ord-A","qty":1}]', 500);
SELECT ord_pay_body('payment.succeeded', 'txn-6', 'ord-6', 499) AS body7 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body7', 'msg_9'), :'body7');
SELECT pay_status FROM callback_center.orders WHERE order_id = 'ord-6';

-- Stripe: payment_intent.succeeded with the order id in metadata.
SELECT status FROM callback_center.place_order('ord-7', 'u7', '[{"sku":"ord-A","qty":1}]', 700);
SELECT jsonb_build_object('id', 'evt_1', 'type', 'payment_intent.succeeded',
    'data', jsonb_build_object('object', jsonb_build_object('id', 'pi_7', 'amount', 700,
        'metadata', jsonb_build_object('order_id', 'ord-7'))))::text AS sbody \gset
SELECT * FROM callback_center.payment_callback('ord-stripe',
    jsonb_build_object('Stripe-Signature', callback_center.sign_stripe('whsec_stripe_test_secret',
        extract(epoch FROM now())::bigint, :'sbody')), :'sbody');
SELECT o.pay_status, p.status, p.provider_txn_id FROM callback_center.orders o
  JOIN callback_center.payments p USING (order_id) WHERE order_id = 'ord-7';

-- Clean up what this file made.
DROP FUNCTION ord_events(text), ord_headers(text, text), ord_pay_body(text, text, text, bigint);
DELETE FROM callback_center.outbox WHERE aggregate_id LIKE 'ord-%';
SELECT callback_center.drop_endpoint('ord-sink') >= 0 AS dropped;
