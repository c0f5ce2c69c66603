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
SELECT callback_center.set_provider('ord-other', 'stripe', ARRAY['whsec_other_channel']);

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
-- A Stripe event and its signed headers, timestamped now.
CREATE FUNCTION ord_stripe_body(kind text, evt text, obj text, oid text, cents bigint)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('id', evt, 'type', kind,
        'data', jsonb_build_object('object', jsonb_strip_nulls(jsonb_build_object('id', obj,
            'amount', cents, 'metadata', jsonb_build_object('order_id', oid)))))::text $$;
CREATE FUNCTION ord_stripe_headers(body text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('Stripe-Signature', callback_center.sign_stripe('whsec_stripe_test_secret',
        extract(epoch FROM now())::bigint, body)) $$;
-- Runs a statement; prints its value, or SQLSTATE: message.
CREATE FUNCTION ord_try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text;
BEGIN
    EXECUTE q INTO r;
    RETURN coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
-- Everything a payment callback could write for an order and a message id:
-- callback rows, conflicts, outbox rows, history rows, the payment.
CREATE FUNCTION ord_trace(oid text, msg text) RETURNS text LANGUAGE sql AS $$
    SELECT format('records=%s conflicts=%s outbox=%s history=%s payment=%s/%s order=%s/%s',
        (SELECT count(*) FROM callback_center.callback_record WHERE biz_id = msg),
        (SELECT count(*) FROM callback_center.callback_conflicts WHERE biz_id = msg),
        (SELECT count(*) FROM callback_center.outbox WHERE aggregate_id = oid),
        (SELECT count(*) FROM callback_center.state_history WHERE entity_id IN (oid, 'pay_' || oid)),
        p.status, coalesce(p.provider_txn_id, '-'), o.status, o.pay_status)
      FROM callback_center.orders o JOIN callback_center.payments p USING (order_id)
     WHERE o.order_id = oid $$;

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
-- Back at the cashier: the same payment, no move; another channel replaces
-- the provider, still no move.
SELECT callback_center.start_payment('ord-1', 'ord-pay') AS payment_again;
SELECT callback_center.start_payment('ord-1', 'ord-other') AS other_channel;
SELECT provider, status FROM callback_center.payments WHERE order_id = 'ord-1';
SELECT callback_center.start_payment('ord-1', 'ord-pay') AS back_to_first;
SELECT provider FROM callback_center.payments WHERE order_id = 'ord-1';
SELECT count(*) AS pay_moves FROM callback_center.state_history
 WHERE entity_id IN ('ord-1', 'pay_ord-1') AND event = ANY ('{pay,submit}');
SELECT ord_pay_body('payment.succeeded', 'txn-1', 'ord-1', 4200) AS body \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body', 'msg_1'), :'body');
SELECT p.status, p.provider_txn_id, o.status AS order_status, o.pay_status
  FROM callback_center.payments p JOIN callback_center.orders o USING (order_id) WHERE order_id = 'ord-1';
SELECT status FROM callback_center.coupons WHERE coupon_id = 'ord-cp1';
SELECT ord_events('ord-1') AS events;
-- The provider retries: same answer, nothing processed again.
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body', 'msg_1'), :'body');
SELECT ord_events('ord-1') AS events;
-- Keyed by the message id (webhook-id), not the transaction.
SELECT biz_id, callback_type, status, retry_count, result->>'txn_id' AS txn
  FROM callback_center.callback_record WHERE callback_type = 'payment:ord-pay' AND biz_id = 'msg_1';
-- Same message id, different body: flagged, not processed.
SELECT ord_pay_body('payment.succeeded', 'txn-1', 'ord-1', 1) AS body2 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body2', 'msg_1'), :'body2');
SELECT count(*) AS flagged FROM callback_center.callback_conflicts WHERE biz_id = 'msg_1';
-- Another message about the same transaction: the payment already holds
-- it, so nothing moves and nothing is queued.
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body', 'msg_2'), :'body');
SELECT ord_events('ord-1') AS events;
-- Started again once paid: the machine refuses.
SELECT ord_try($$SELECT callback_center.start_payment('ord-1', 'ord-pay')$$) AS start_paid;

-- History of the order's pay status: one row per move.
SELECT from_state, to_state, event FROM callback_center.state_history
 WHERE entity_id = 'ord-1' AND machine = 'order_pay' ORDER BY id;

-- A malformed, forged or stale signature is answered 401 (outcome
-- malformed_signature, signature_expired) and records nothing; raising
-- made the application map SQLSTATEs to HTTP.  An unknown provider is
-- misuse: it raises CB033.
\set SHOW_CONTEXT never
SELECT * FROM callback_center.payment_callback('ord-pay',
    jsonb_set(ord_headers(:'body', 'msg_3'), '{webhook-signature}', '"v1,AAAA"'), :'body');
SELECT * FROM callback_center.payment_callback('ord-pay',
    jsonb_build_object('webhook-id', 'msg_4', 'webhook-timestamp', '1000000000',
        'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
            'msg_4', 1000000000, :'body')), :'body');
SELECT * FROM callback_center.payment_callback('ord-pay',
    jsonb_build_object('webhook-id', 'msg_4'), :'body');
SELECT * FROM callback_center.payment_callback('nobody', '{}', :'body');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- An unknown order is answered 404 (the provider will retry) and records
-- nothing.
SELECT ord_pay_body('payment.succeeded', 'txn-x', 'ord-none', 1) AS body3 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body3', 'msg_5'), :'body3');
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers('not json', 'msg_6'), 'not json');
\set SHOW_CONTEXT errors
SELECT count(*) AS recorded FROM callback_center.callback_record WHERE biz_id IN ('msg_3', 'msg_4', 'msg_5', 'msg_6');

-- Signature failures on a fresh transaction, through payment_callback:
-- well formed but signed with another secret (invalid_signature), or
-- correctly signed too long ago (signature_expired), for both schemes.
-- Nothing is written: no callback row, no conflict, no payment or order
-- move, no history, no outbox row.
SELECT status FROM callback_center.place_order('ord-8', 'u8', '[{"sku":"ord-A","qty":1}]', 800);
SELECT callback_center.start_payment('ord-8', 'ord-pay') AS payment;
SELECT ord_pay_body('payment.succeeded', 'txn-8', 'ord-8', 800) AS body8 \gset
SELECT ord_stripe_body('payment_intent.succeeded', 'evt_s8', 'pi_8', 'ord-8', 800) AS sbody8 \gset
SELECT ord_trace('ord-8', 'msg_s8') AS before_sw, ord_trace('ord-8', 'evt_s8') AS before_stripe;
SELECT ord_try(format($$SELECT outcome FROM callback_center.payment_callback('ord-pay', %L, %L)$$,
    jsonb_build_object('webhook-id', 'msg_s8', 'webhook-timestamp', extract(epoch FROM now())::bigint::text,
        'webhook-signature', callback_center.sign_webhook('whsec_b3RoZXIgc2VjcmV0IGtleQ==', 'msg_s8',
            extract(epoch FROM now())::bigint, :'body8')), :'body8')) AS sw_other_secret;
SELECT ord_try(format($$SELECT outcome FROM callback_center.payment_callback('ord-pay', %L, %L)$$,
    jsonb_build_object('webhook-id', 'msg_s8', 'webhook-timestamp', '1000000000',
        'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
            'msg_s8', 1000000000, :'body8')), :'body8')) AS sw_stale;
SELECT ord_try(format($$SELECT outcome FROM callback_center.payment_callback('ord-stripe', %L, %L)$$,
    jsonb_build_object('Stripe-Signature', callback_center.sign_stripe('whsec_other',
        extract(epoch FROM now())::bigint, :'sbody8')), :'sbody8')) AS stripe_other_secret;
SELECT ord_try(format($$SELECT outcome FROM callback_center.payment_callback('ord-stripe', %L, %L)$$,
    jsonb_build_object('Stripe-Signature', callback_center.sign_stripe('whsec_stripe_test_secret',
        1000000000, :'sbody8')), :'sbody8')) AS stripe_stale;
SELECT ord_trace('ord-8', 'msg_s8') AS after_sw, ord_trace('ord-8', 'evt_s8') AS after_stripe;
-- The same message, correctly signed, is then a first delivery.
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body8', 'msg_s8'), :'body8');
SELECT ord_trace('ord-8', 'msg_s8') AS paid;

-- Scenario C: a payment failure restores stock and unfreezes the coupon, once.
SELECT callback_center.issue_coupon('ord-cp5', 'u5');
SELECT status FROM callback_center.place_order('ord-5', 'u5', '[{"sku":"ord-A","qty":3}]', 900, 'ord-cp5', 'ord-pay');
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';
SELECT ord_pay_body('payment.failed', 'txn-5', 'ord-5', 900) AS body5 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body5', 'msg_7'), :'body5');
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body5', 'msg_7'), :'body5');
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'ord-cp5';
SELECT o.status, o.pay_status, p.status AS payment FROM callback_center.orders o
  JOIN callback_center.payments p USING (order_id) WHERE order_id = 'ord-5';
SELECT ord_events('ord-5') AS events;

-- Scenario D (late money): success for the closed order, even for the
-- transaction that failed (a new message), is kept and asks for a refund;
-- the order is not reopened.
SELECT ord_pay_body('payment.succeeded', 'txn-5', 'ord-5', 900) AS body6 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body6', 'msg_8'), :'body6');
SELECT o.status, o.pay_status FROM callback_center.orders o WHERE order_id = 'ord-5';
SELECT ord_events('ord-5') AS events;
SELECT payload->>'txn_id' AS txn, payload->>'amount_cents' AS cents FROM callback_center.outbox
 WHERE aggregate_id = 'ord-5' AND event_type = 'payment.refund_required';

-- An amount that does not match is refused (400) and recorded nowhere, so
-- that the provider keeps it failing (before 0.2.0: recorded, 200, flagged).
SELECT status FROM callback_center.place_order('ord-6', 'u6', '[{"sku":"ord-A","qty":1}]', 500, NULL, 'ord-pay');
SELECT ord_pay_body('payment.succeeded', 'txn-6', 'ord-6', 499) AS body7 \gset
SELECT * FROM callback_center.payment_callback('ord-pay', ord_headers(:'body7', 'msg_9'), :'body7');
SELECT pay_status FROM callback_center.orders WHERE order_id = 'ord-6';

-- Stripe: payment_intent.succeeded with the order id in metadata; the
-- payment keeps the PaymentIntent id, the record the event id.
SELECT status FROM callback_center.place_order('ord-7', 'u7', '[{"sku":"ord-A","qty":1}]', 700, NULL, 'ord-stripe');
SELECT ord_stripe_body('payment_intent.succeeded', 'evt_1', 'pi_7', 'ord-7', 700) AS sbody \gset
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'sbody'), :'sbody');
SELECT o.pay_status, p.status, p.provider_txn_id FROM callback_center.orders o
  JOIN callback_center.payments p USING (order_id) WHERE order_id = 'ord-7';
SELECT biz_id, result->>'txn_id' AS txn FROM callback_center.callback_record
 WHERE callback_type = 'payment:ord-stripe';

-- Stripe, one PaymentIntent through several events: charge.succeeded is
-- ignored (the intent's success is the one that counts), a failed attempt
-- moves nothing, the later success pays, once.
SELECT status FROM callback_center.place_order('ord-9', 'u9', '[{"sku":"ord-A","qty":1}]', 900);
SELECT callback_center.start_payment('ord-9', 'ord-stripe') AS payment;
SELECT ord_stripe_body('charge.succeeded', 'evt_9a', 'ch_9', 'ord-9', 900) AS s9a,
       ord_stripe_body('payment_intent.payment_failed', 'evt_9b', 'pi_9', 'ord-9', 900) AS s9b,
       ord_stripe_body('payment_intent.succeeded', 'evt_9c', 'pi_9', 'ord-9', 900) AS s9c \gset
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s9a'), :'s9a');
SELECT ord_trace('ord-9', 'evt_9a') AS after_charge;
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s9b'), :'s9b');
SELECT ord_trace('ord-9', 'evt_9b') AS after_failed_attempt;
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s9c'), :'s9c');
SELECT ord_trace('ord-9', 'evt_9c') AS after_success;
SELECT ord_events('ord-9') AS events;
-- Each event delivered again: the same answer, nothing processed.
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s9c'), :'s9c');
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s9b'), :'s9b');
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s9a'), :'s9a');
SELECT ord_trace('ord-9', 'evt_9c') AS unchanged, ord_events('ord-9') AS events;
SELECT from_state, to_state, event FROM callback_center.state_history
 WHERE entity_id = 'ord-9' AND machine = 'order_pay' ORDER BY id;
SELECT biz_id, status, retry_count, result->>'outcome' AS outcome FROM callback_center.callback_record
 WHERE callback_type = 'payment:ord-stripe' AND biz_id LIKE 'evt_9%' ORDER BY biz_id;
-- An event type we do not handle, with no payment object at all: recorded,
-- acknowledged, ignored, and answered alike when repeated.
SELECT '{"id":"evt_cust","type":"customer.created","data":{"object":{"id":"cus_1"}}}' AS scust \gset
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'scust'), :'scust');
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'scust'), :'scust');
SELECT status, result->>'outcome' AS outcome FROM callback_center.callback_record WHERE biz_id = 'evt_cust';
-- A Stripe event without an id cannot be keyed: refused, nothing recorded.
SELECT ord_try(format($$SELECT outcome FROM callback_center.payment_callback('ord-stripe', %L, %L)$$,
    ord_stripe_headers('{"type":"payment_intent.succeeded"}'), '{"type":"payment_intent.succeeded"}'))
    AS no_event_id;
-- payment_intent.canceled is the terminal failure: stock back, order closed.
SELECT status FROM callback_center.place_order('ord-10', 'u10', '[{"sku":"ord-A","qty":1}]', 100);
SELECT callback_center.start_payment('ord-10', 'ord-stripe') AS payment;
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';
SELECT ord_stripe_body('payment_intent.canceled', 'evt_10', 'pi_10', 'ord-10', 100) AS s10 \gset
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s10'), :'s10');
SELECT ord_trace('ord-10', 'evt_10') AS canceled, ord_events('ord-10') AS events;
SELECT available FROM callback_center.stock WHERE sku_id = 'ord-A';

-- Stripe's success is judged on amount_received: less than the order's
-- amount is refused, nothing recorded, no event.
SELECT status FROM callback_center.place_order('ord-11', 'u11', '[{"sku":"ord-A","qty":1}]', 1100, NULL, 'ord-stripe');
SELECT jsonb_set(ord_stripe_body('payment_intent.succeeded', 'evt_11', 'pi_11', 'ord-11', 1100)::jsonb,
                 '{data,object,amount_received}', '1000')::text AS s11 \gset
SELECT * FROM callback_center.payment_callback('ord-stripe', ord_stripe_headers(:'s11'), :'s11');
SELECT ord_trace('ord-11', 'evt_11') AS short_payment, ord_events('ord-11') AS events;

-- Coupons, directly: freeze, use and unfreeze are idempotent for their
-- order and never touch another order's hold.
SELECT callback_center.issue_coupon('ord-cpd', 'ud');
SELECT callback_center.issue_coupon('ord-cpd', 'ud') AS issued_again;
SELECT ord_try($$SELECT callback_center.issue_coupon('ord-cpd', 'someone else')$$) AS other_owner;
SELECT user_id, status FROM callback_center.coupons WHERE coupon_id = 'ord-cpd';
SELECT callback_center.freeze_coupon('ord-cpd', 'o-a') AS freeze, callback_center.freeze_coupon('ord-cpd', 'o-a') AS again;
SELECT ord_try($$SELECT callback_center.freeze_coupon('ord-cpd', 'o-b')$$) AS freeze_other;
SELECT ord_try($$SELECT callback_center.use_coupon('ord-cpd', 'o-b')$$) AS use_other;
SELECT callback_center.unfreeze_coupon('ord-cpd', 'o-b') AS unfreeze_other;
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'ord-cpd';
SELECT callback_center.unfreeze_coupon('ord-cpd', 'o-a') AS unfreeze,
       callback_center.unfreeze_coupon('ord-cpd', 'o-a') AS again;
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'ord-cpd';
SELECT ord_try($$SELECT callback_center.use_coupon('ord-cpd', 'o-a')$$) AS use_available;
SELECT callback_center.freeze_coupon('ord-cpd', 'o-b') AS freeze_b;
SELECT callback_center.use_coupon('ord-cpd', 'o-b') AS use, callback_center.use_coupon('ord-cpd', 'o-b') AS again;
SELECT callback_center.unfreeze_coupon('ord-cpd', 'o-b') AS unfreeze_used;
SELECT ord_try($$SELECT callback_center.freeze_coupon('ord-cpd', 'o-c')$$) AS freeze_used;
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'ord-cpd';
-- Issuing a used coupon again for its owner does not give it back.
SELECT callback_center.issue_coupon('ord-cpd', 'ud');
SELECT status FROM callback_center.coupons WHERE coupon_id = 'ord-cpd';
SELECT ord_try($$SELECT callback_center.freeze_coupon('ord-nope', 'o-a')$$) AS freeze_unknown,
       ord_try($$SELECT callback_center.use_coupon('ord-nope', 'o-a')$$) AS use_unknown,
       callback_center.unfreeze_coupon('ord-nope', 'o-a') AS unfreeze_unknown;

-- NULL arguments are 22004 everywhere.
SELECT q AS call, ord_try(q) AS result FROM (VALUES
    ($$SELECT callback_center.issue_coupon(NULL, 'u')$$),
    ($$SELECT callback_center.freeze_coupon(NULL, 'o-a')$$),
    ($$SELECT callback_center.freeze_coupon('ord-cpd', NULL)$$),
    ($$SELECT callback_center.use_coupon(NULL, 'o-a')$$),
    ($$SELECT callback_center.use_coupon('ord-cpd', NULL)$$),
    ($$SELECT callback_center.unfreeze_coupon(NULL, 'o-a')$$),
    ($$SELECT callback_center.unfreeze_coupon('ord-cpd', NULL)$$),
    ($$SELECT callback_center.start_payment(NULL, 'ord-pay')$$),
    ($$SELECT callback_center.start_payment('ord-1', NULL)$$),
    ($$SELECT callback_center.mark_refunded(NULL, 'x')$$),
    ($$SELECT outcome FROM callback_center.payment_callback(NULL, '{}', '')$$),
    ($$SELECT outcome FROM callback_center.payment_callback('ord-pay', NULL, '')$$),
    ($$SELECT outcome FROM callback_center.payment_callback('ord-pay', '{}', NULL)$$)) AS v(q);
SELECT ord_try($$SELECT callback_center.start_payment('ord-none', 'ord-pay')$$) AS start_unknown;

-- Clean up what this file made.
DROP FUNCTION ord_events(text), ord_headers(text, text), ord_pay_body(text, text, text, bigint),
    ord_stripe_body(text, text, text, text, bigint), ord_stripe_headers(text), ord_try(text),
    ord_trace(text, text);
DELETE FROM callback_center.outbox WHERE aggregate_id LIKE 'ord-%';
SELECT callback_center.drop_endpoint('ord-sink') >= 0 AS dropped;
