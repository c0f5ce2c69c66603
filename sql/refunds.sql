-- Refunds (issue 14 section 3): request_refund, _apply_refund_answer, the
-- stock and coupon rule, the manual mode, late payments.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Fixtures: stock, a coupon, an API endpoint for the provider rf-pay,
-- rf-manual with none, an endpoint taking every event.
SELECT callback_center.set_stock('rf-A', 10) IS NOT NULL AS a,
       callback_center.set_stock('rf-B', 10) IS NOT NULL AS b;
SELECT callback_center.issue_coupon('rf-cp1', 'u1'), callback_center.issue_coupon('rf-cp2', 'u1');
SELECT callback_center.create_endpoint('rf-sink', 'http://127.0.0.1:9/sink', '{*}') > 0 AS sink;
SELECT callback_center.create_endpoint('rf-api', 'http://127.0.0.1:9/api', '{nothing.here}') > 0 AS api;
SELECT callback_center.set_provider('rf-pay', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.set_provider('rf-manual', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.set_provider_query_endpoint('rf-pay', 'rf-api', allow_plain_http => true);

-- Places an order of rf-A x qty and pays it with a signed callback.
CREATE FUNCTION rf_paid(oid text, cents bigint, coupon text, provider text, qty int DEFAULT 2)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    body text := jsonb_build_object('type', 'payment.succeeded',
        'data', jsonb_build_object('txn_id', 'txn-' || oid, 'order_id', oid,
                                   'amount_cents', cents))::text;
    ts bigint := extract(epoch FROM now())::bigint;
    r record;
BEGIN
    PERFORM callback_center.place_order(oid, 'u1', jsonb_build_array(jsonb_build_object('sku', 'rf-A', 'qty', qty)),
                                        cents, coupon, provider);
    SELECT * INTO r FROM callback_center.payment_callback(provider,
        jsonb_build_object('webhook-id', 'msg-' || oid, 'webhook-timestamp', ts::text,
            'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                'msg-' || oid, ts, body)), body);
    RETURN r.outcome;
END $$;
-- Runs a statement; prints its value, or SQLSTATE: message (detail).
CREATE FUNCTION rf_try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text;
    d text;
BEGIN
    EXECUTE q INTO r;
    RETURN coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
    RETURN SQLSTATE || ': ' || SQLERRM || coalesce(' | ' || nullif(d, ''), '');
END $$;
-- What refunds of an order wrote: refund rows, outbox events, state.
CREATE FUNCTION rf_trace(oid text) RETURNS text LANGUAGE sql AS $$
    SELECT format('refunds=%s events=%s payment=%s order=%s/%s',
        (SELECT coalesce(string_agg(CASE WHEN late_payment_id IS NULL THEN refund_id ELSE 'late' END
                                    || ':' || status || ':' || amount_cents, ',' ORDER BY refund_id), '-')
           FROM callback_center.refunds WHERE order_id = oid),
        (SELECT coalesce(string_agg(x.event_type, ',' ORDER BY x.id), '-')
           FROM callback_center.outbox x JOIN callback_center.endpoints e ON e.id = x.endpoint_id
          WHERE e.name IN ('rf-sink', 'rf-api') AND x.event_type LIKE 'refund.%'
            AND oid IN (x.aggregate_id, x.payload->>'order_id', x.payload->'row'->>'order_id')),
        p.status, o.status, o.pay_status)
      FROM callback_center.orders o JOIN callback_center.payments p USING (order_id)
     WHERE o.order_id = oid $$;

SELECT rf_paid('rf-1', 1000, 'rf-cp1', 'rf-pay') AS paid;
SELECT available FROM callback_center.stock WHERE sku_id = 'rf-A';
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'rf-cp1';
SELECT status, pay_status FROM callback_center.place_order('rf-unpaid', 'u1', '[{"sku":"rf-B","qty":1}]', 500, NULL, 'rf-pay');

-- Refused: NULLs, bad values, unknown or unpaid orders.  Each writes nothing.
SELECT q, rf_try(q) FROM (VALUES
    ($$SELECT refund_id FROM callback_center.request_refund(NULL, 100, 'r', 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', NULL, 'r', 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 100, 'r', NULL)$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 0, 'r', 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', -5, 'r', 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 100, '', 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 100, repeat('r', 201), 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 100, 'r', '')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 100, 'r', repeat('x', 65))$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 100, 'r', 'rf x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-nope', 100, 'r', 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-unpaid', 100, 'r', 'rf-x')$$),
    ($$SELECT refund_id FROM callback_center.request_refund('rf-1', 1001, 'r', 'rf-x')$$)) t(q);
SELECT rf_trace('rf-1') AS rf_1, rf_trace('rf-unpaid') AS unpaid;

-- A partial refund: PENDING, sent to the API endpoint as refund.request.
SELECT * FROM callback_center.request_refund('rf-1', 300, 'broken lid', 'rf-1-a');
SELECT e.name, o.event_type, o.payload FROM callback_center.outbox o
  JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 WHERE o.event_type = 'refund.request' AND o.aggregate_id = 'rf-1';
-- The same arguments again: the same refund, nothing sent again.
SELECT * FROM callback_center.request_refund('rf-1', 300, 'broken lid', 'rf-1-a');
-- The same id with other arguments: CB062, naming what it is.
SELECT rf_try($$SELECT refund_id FROM callback_center.request_refund('rf-1', 200, 'broken lid', 'rf-1-a')$$) AS other_amount,
       rf_try($$SELECT refund_id FROM callback_center.request_refund('rf-1', 300, NULL, 'rf-1-a')$$) AS other_reason,
       rf_try($$SELECT refund_id FROM callback_center.request_refund('rf-unpaid', 300, 'broken lid', 'rf-1-a')$$) AS other_order;
-- The sum: 300 asked, 800 more is too much (CB061 with the figures).
SELECT rf_try($$SELECT refund_id FROM callback_center.request_refund('rf-1', 800, NULL, 'rf-1-b')$$) AS too_much;
SELECT rf_trace('rf-1');

-- Answers.  Bad shapes are 22023, an unknown refund 42704; nothing moves.
SELECT q, rf_try(q) FROM (VALUES
    ($$SELECT callback_center._apply_refund_answer('rf-1-a', '[]')$$),
    ($$SELECT callback_center._apply_refund_answer('rf-1-a', '{"status": "done"}')$$),
    ($$SELECT callback_center._apply_refund_answer('rf-1-a', '{"refund_id": "rf-1-b", "status": "success"}')$$),
    ($$SELECT callback_center._apply_refund_answer('rf-1-a', '{"status": "success", "amount_cents": 1.5}')$$),
    ($$SELECT callback_center._apply_refund_answer('rf-1-a', '{"status": "success", "provider_refund_id": 7}')$$),
    ($$SELECT callback_center._apply_refund_answer('rf-1-a', NULL)$$),
    ($$SELECT callback_center._apply_refund_answer('rf-none', '{"status": "success"}')$$)) t(q);
-- processing: PROCESSING, asked again later; unknown: no move.
SELECT callback_center._apply_refund_answer('rf-1-a',
    '{"refund_id": "rf-1-a", "status": "processing", "provider_refund_id": null, "amount_cents": null, "error": null}') AS processing;
SELECT callback_center._apply_refund_answer('rf-1-a', '{"status": "unknown"}') AS unknown;
SELECT status, next_query_at > now() AS queried_later FROM callback_center.refunds WHERE refund_id = 'rf-1-a';
-- A success naming another amount moves nothing.
SELECT callback_center._apply_refund_answer('rf-1-a', '{"status": "success", "amount_cents": 301}') AS wrong_amount;
SELECT status, error FROM callback_center.refunds WHERE refund_id = 'rf-1-a';
-- Success: SUCCESS, the payment partially refunded, refund.succeeded.
SELECT callback_center._apply_refund_answer('rf-1-a',
    '{"refund_id": "rf-1-a", "status": "success", "provider_refund_id": null, "amount_cents": 300, "error": null}') AS success;
SELECT rf_trace('rf-1');
-- Repeats: the same verdict fills in a missing provider id only; processing
-- changes nothing; the opposite verdict is a conflict for people.
SELECT callback_center._apply_refund_answer('rf-1-a', '{"status": "success", "provider_refund_id": "wx-r-1"}') AS again,
       callback_center._apply_refund_answer('rf-1-a', '{"status": "success", "provider_refund_id": "wx-r-other"}') AS again_other_id,
       callback_center._apply_refund_answer('rf-1-a', '{"status": "processing"}') AS late_processing,
       callback_center._apply_refund_answer('rf-1-a', '{"status": "failed"}') AS late_failed;
SELECT status, provider_refund_id, error FROM callback_center.refunds WHERE refund_id = 'rf-1-a';
SELECT payload->'answer'->>'status' AS conflict FROM callback_center.outbox o
  JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 WHERE o.event_type = 'refund.conflict' AND e.name = 'rf-sink';
-- The refund.succeeded event carries the row.
SELECT payload->'row'->>'refund_id' AS id, payload->'row'->>'amount_cents' AS cents, payload->>'to' AS state
  FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 WHERE o.event_type = 'refund.succeeded' AND e.name = 'rf-sink';

-- 700 more fits exactly; it fails at the provider: FAILED, refund.failed,
-- and the 700 is refundable again.
SELECT refund_id, status, is_new FROM callback_center.request_refund('rf-1', 700, NULL, 'rf-1-b');
SELECT rf_try($$SELECT refund_id FROM callback_center.request_refund('rf-1', 1, NULL, 'rf-1-c')$$) AS full_now;
SELECT callback_center._apply_refund_answer('rf-1-b', '{"status": "failed", "error": "NOT_ENOUGH"}') AS failed;
SELECT status, error, finished_at IS NOT NULL AS finished FROM callback_center.refunds WHERE refund_id = 'rf-1-b';
-- The rest in full: the payment REFUNDED, the order (not fulfilled)
-- refunded, its stock and coupon back.
SELECT refund_id, status, is_new FROM callback_center.request_refund('rf-1', 700, NULL, 'rf-1-c');
SELECT callback_center._apply_refund_answer('rf-1-c', '{"status": "success", "amount_cents": 700}') AS success;
SELECT rf_trace('rf-1');
SELECT available FROM callback_center.stock WHERE sku_id = 'rf-A';
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'rf-cp1';
SELECT string_agg(o.event_type, ',' ORDER BY o.id) AS order_events FROM callback_center.outbox o
  JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 WHERE e.name = 'rf-sink' AND o.aggregate_id IN ('rf-1', 'pay_rf-1') AND o.event_type LIKE 'order.%';
-- Nothing is left to refund; the stock comes back once only.
SELECT rf_try($$SELECT refund_id FROM callback_center.request_refund('rf-1', 1, NULL, 'rf-1-d')$$) AS nothing_left;
SELECT count(*) AS restored_again FROM callback_center.restore_stock('rf-1');

-- A fulfilled order refunded in full keeps its stock (the goods left) and
-- its coupon; it stays fulfilled, its pay status refunded.
SELECT rf_paid('rf-2', 500, 'rf-cp2', 'rf-pay') AS paid;
SELECT callback_center.apply_event('callback_center.orders', 'status', 'rf-2', 'fulfil');
SELECT refund_id, status FROM callback_center.request_refund('rf-2', 500, 'returned', 'rf-2-a');
SELECT callback_center._apply_refund_answer('rf-2-a', '{"status": "success"}') AS success;
SELECT rf_trace('rf-2');
SELECT available FROM callback_center.stock WHERE sku_id = 'rf-A';
SELECT status FROM callback_center.coupons WHERE coupon_id = 'rf-cp2';
SELECT rf_try($$SELECT count(*) FROM callback_center.restore_stock('rf-2')$$) AS restore;

-- Manual mode: a provider without an API endpoint.  The refund waits;
-- refund.manual_required tells the merchant; an administrator records
-- what the provider did.
SELECT rf_paid('rf-3', 400, NULL, 'rf-manual') AS paid;
SELECT * FROM callback_center.request_refund('rf-3', 400, NULL, 'rf-3-a');
SELECT rf_trace('rf-3');
SELECT q, rf_try(q) FROM (VALUES
    ($$SELECT callback_center.record_refund_outcome('rf-3-a', 'unknown')$$),
    ($$SELECT callback_center.record_refund_outcome('rf-3-a', NULL)$$),
    ($$SELECT callback_center.record_refund_outcome(NULL, 'success')$$),
    ($$SELECT callback_center.record_refund_outcome('rf-none', 'success')$$)) t(q);
SELECT callback_center.record_refund_outcome('rf-3-a', 'success', 'console-77') AS recorded;
SELECT rf_trace('rf-3');
SELECT provider_refund_id, next_query_at FROM callback_center.refunds WHERE refund_id = 'rf-3-a';

-- Follow-up queries: an open API refund whose request is no longer in
-- flight is asked again once next_query_at has come (refund.query), then
-- after a longer wait.
SELECT rf_paid('rf-4', 600, NULL, 'rf-pay') AS paid;
SELECT refund_id FROM callback_center.request_refund('rf-4', 100, NULL, 'rf-4-a');
UPDATE callback_center.refunds SET next_query_at = now() - interval '1 second' WHERE refund_id = 'rf-4-a';
-- (refund_jobs also runs for what other tests left: only rf-4-a is shown.)
SELECT callback_center.refund_jobs() AS jobs_sent \gset
SELECT queries AS in_flight_waits FROM callback_center.refunds WHERE refund_id = 'rf-4-a';
UPDATE callback_center.outbox SET status = 'delivered', delivered_at = now()
 WHERE aggregate_id = 'rf-4' AND event_type = 'refund.request';
SELECT callback_center.refund_jobs() AS jobs_sent \gset
SELECT payload FROM callback_center.outbox WHERE aggregate_id = 'rf-4' AND event_type = 'refund.query';
SELECT queries, next_query_at - now() > interval '1 minute' AS waits_longer
  FROM callback_center.refunds WHERE refund_id = 'rf-4-a';
SELECT callback_center.refund_jobs() AS jobs_sent \gset
SELECT count(*) AS not_yet FROM callback_center.outbox WHERE aggregate_id = 'rf-4' AND event_type = 'refund.query';
SELECT callback_center._apply_refund_answer('rf-4-a', '{"status": "success"}') AS success;
SELECT rf_trace('rf-4');

-- Late payments: money for an order closed by timeout is refunded through
-- the same path by refund_jobs, unless callback_center.refund_late_payments
-- is off.
SELECT status, pay_status FROM callback_center.place_order('rf-5', 'u1', '[{"sku":"rf-B","qty":1}]', 250, NULL, 'rf-pay');
UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute' WHERE order_id = 'rf-5';
SELECT callback_center.close_expired_orders() >= 1 AS closed;
SELECT outcome FROM callback_center.payment_callback('rf-pay',
    jsonb_build_object('webhook-id', 'msg-rf-5', 'webhook-timestamp', extract(epoch FROM now())::bigint::text,
        'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'msg-rf-5',
            extract(epoch FROM now())::bigint,
            '{"type":"payment.succeeded","data":{"txn_id":"txn-rf-5","order_id":"rf-5","amount_cents":250}}')),
    '{"type":"payment.succeeded","data":{"txn_id":"txn-rf-5","order_id":"rf-5","amount_cents":250}}');
SELECT id AS lp5 FROM callback_center.late_payments WHERE provider_txn_id = 'txn-rf-5' \gset
SET callback_center.refund_late_payments = off;
SELECT callback_center.refund_jobs() AS jobs_sent \gset
SELECT count(*) AS late_refunds FROM callback_center.refunds WHERE late_payment_id = :lp5;
RESET callback_center.refund_late_payments;
SELECT callback_center.refund_jobs() AS jobs_sent \gset
SELECT refund_id = 'late_' || :lp5 AS late_id, provider_txn_id, amount_cents, total_cents, mode, status
  FROM callback_center.refunds WHERE late_payment_id = :lp5;
SELECT payload->>'provider_txn_id' AS txn, payload->>'amount_cents' AS cents
  FROM callback_center.outbox WHERE event_type = 'refund.request' AND aggregate_id = 'rf-5';
SELECT rf_trace('rf-5');
SELECT callback_center.refund_jobs() AS jobs_sent \gset
SELECT count(*) AS once FROM callback_center.outbox WHERE event_type = 'refund.request' AND aggregate_id = 'rf-5';
SELECT callback_center._apply_refund_answer('late_' || :lp5, '{"status": "success"}') AS success;
SELECT l.status AS late_status, p.status AS payment FROM callback_center.late_payments l
  JOIN callback_center.payments p ON p.order_id = l.order_id WHERE l.id = :lp5;
SELECT rf_try($$SELECT refund_id FROM callback_center.request_refund('rf-5', 250, NULL, 'rf-5-a')$$) AS closed_order;
-- mark_refunded, the manual path, goes through the refund path too.
SELECT status, pay_status FROM callback_center.place_order('rf-6', 'u1', '[{"sku":"rf-B","qty":1}]', 150, NULL, 'rf-manual');
UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute' WHERE order_id = 'rf-6';
SELECT callback_center.close_expired_orders() >= 1 AS closed;
SELECT outcome FROM callback_center.payment_callback('rf-manual',
    jsonb_build_object('webhook-id', 'msg-rf-6', 'webhook-timestamp', extract(epoch FROM now())::bigint::text,
        'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'msg-rf-6',
            extract(epoch FROM now())::bigint,
            '{"type":"payment.succeeded","data":{"txn_id":"txn-rf-6","order_id":"rf-6","amount_cents":150}}')),
    '{"type":"payment.succeeded","data":{"txn_id":"txn-rf-6","order_id":"rf-6","amount_cents":150}}');
SELECT callback_center.mark_refunded('rf-manual', 'txn-rf-6') AS marked,
       callback_center.mark_refunded('rf-manual', 'txn-rf-6') AS again;
SELECT r.mode, r.status, l.status AS late_status, p.status AS payment
  FROM callback_center.refunds r JOIN callback_center.late_payments l ON l.id = r.late_payment_id
  JOIN callback_center.payments p ON p.order_id = l.order_id WHERE r.order_id = 'rf-6';
SELECT rf_trace('rf-6');

-- The adapters' answers to refund requests, as _apply_refund_answer reads
-- them.  WeChat Pay's ABNORMAL is not final (the merchant platform settles
-- it; a failed refund would make its amount refundable again: refunded
-- twice); Alipay's refund_fee is the trade's total refunded, not this
-- refund's amount, and Alipay gives a refund no id of its own (trade_no is
-- the payment's).
SELECT callback_center._wechatpay_v3_answer('refund.query', '{"refund_id": "rf-x1"}', 200,
    '{"out_refund_no": "rf-x1", "refund_id": "wx-r-x1", "status": "ABNORMAL", "amount": {"refund": 100}}')
    ->> 'status' AS abnormal;
SELECT a->>'status' AS status, a->>'amount_cents' AS cents, a->>'provider_refund_id' AS provider_id
  FROM callback_center._alipay_answer('refund.request', '{"refund_id": "rf-x2"}',
    '{"code": "10000", "fund_change": "Y", "trade_no": "2024060322001", "refund_fee": "10.00"}') a;
SELECT a->>'status' AS status, a->>'amount_cents' AS cents, a->>'provider_refund_id' AS provider_id
  FROM callback_center._alipay_answer('refund.query', '{"refund_id": "rf-x2"}',
    '{"code": "10000", "refund_status": "REFUND_SUCCESS", "trade_no": "2024060322001", "refund_amount": "3.00"}') a;

-- Reconciliation: refund lines (refund_id set) against local refunds.  The
-- payments' own lines agree (a refunded payment still agrees with its
-- success line), so only refunds differ: rf-1-a matches; rf-1-c's amount
-- differs; rf-9-x is not ours; rf-2-a, rf-4-a and the late refund are not
-- on the statement; rf-7-a, still open here, is settled by the statement.
SELECT rf_paid('rf-7', 800, NULL, 'rf-pay') AS paid;
SELECT refund_id, status FROM callback_center.request_refund('rf-7', 800, NULL, 'rf-7-a');
INSERT INTO callback_center.provider_statement
       (channel, bill_date, provider_txn_id, order_id, amount_cents, status, refund_id)
VALUES ('rf-pay', current_date, 'txn-rf-1', 'rf-1', 1000, 'success', NULL),
       ('rf-pay', current_date, 'txn-rf-2', 'rf-2', 500, 'success', NULL),
       ('rf-pay', current_date, 'txn-rf-4', 'rf-4', 600, 'success', NULL),
       ('rf-pay', current_date, 'txn-rf-5', 'rf-5', 250, 'success', NULL),
       ('rf-pay', current_date, 'txn-rf-7', 'rf-7', 800, 'success', NULL),
       ('rf-pay', current_date, 'wx-ref-a', 'rf-1', 300, 'refund', 'rf-1-a'),
       ('rf-pay', current_date, 'wx-ref-c', 'rf-1', 699, 'refund', 'rf-1-c'),
       ('rf-pay', current_date, 'wx-ref-x', 'rf-9', 50, 'refund', 'rf-9-x'),
       ('rf-pay', current_date, 'wx-ref-7', 'rf-7', 800, 'refund', 'rf-7-a');
-- Two refunds missing at the provider that carry the same provider id
-- (what an adapter reports for refunds of one trade) are two differences.
UPDATE callback_center.refunds SET provider_refund_id = 'same-trade' WHERE refund_id IN ('rf-2-a', 'rf-4-a');
SELECT * FROM callback_center.reconcile('rf-pay', current_date, '0 s');
SELECT CASE WHEN refund_id LIKE 'late\_%' THEN 'late' ELSE refund_id END AS refund,
       CASE WHEN provider_txn_id LIKE 'late\_%' THEN 'late' ELSE provider_txn_id END AS txn,
       order_id, kind, provider_amount, local_amount, local_status, resolution, note
  FROM callback_center.recon_diffs WHERE channel = 'rf-pay' ORDER BY kind, order_id, refund_id;
SELECT rf_trace('rf-7');
-- A second run finds the same (the settled one stays applied).
SELECT * FROM callback_center.reconcile('rf-pay', current_date, '0 s');
SELECT count(*) AS diffs FROM callback_center.recon_diffs WHERE channel = 'rf-pay';
DELETE FROM callback_center.recon_diffs WHERE channel = 'rf-pay';
DELETE FROM callback_center.provider_statement WHERE channel = 'rf-pay';

-- The application reads refunds and may ask for them; it may not record
-- outcomes or run the jobs.
CREATE ROLE rf_app NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO rf_app;
SET ROLE rf_app;
SELECT count(*) > 0 AS reads FROM callback_center.refunds;
SELECT rf_try($$SELECT callback_center.record_refund_outcome('rf-4-a', 'success')$$) AS record;
SELECT rf_try($$SELECT callback_center.refund_jobs()$$) AS jobs;
SELECT rf_try($$SELECT callback_center._apply_refund_answer('rf-4-a', '{"status": "success"}')$$) AS owner;
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM rf_app;
DROP ROLE rf_app;

-- Clean up: later tests count what endpoints receive.
SELECT callback_center.drop_endpoint('rf-sink') > 0 AS dropped,
       callback_center.drop_endpoint('rf-api') > 0 AS dropped_api;
