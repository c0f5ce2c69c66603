-- The end-to-end story told by `make demo` (scenarios A-D of PRODUCT.md;
-- demo.sh tells E and F).  Each act prints what happened as a small table.
\pset footer off
\set QUIET on
SET client_min_messages = warning;
\echo
\echo '=== 0. The extension, its worker, and the services it calls back ==='
CREATE EXTENSION callback_center CASCADE;
SELECT s.pid IS NOT NULL AS worker_running, a.backend_type, s.database
  FROM callback_center.worker_status() s LEFT JOIN pg_stat_activity a ON a.pid = s.pid;
SELECT callback_center.create_endpoint('merchant-erp', :'rcv' || '/erp',
           '{order.placed,merchant.erp_sync,order.pay_failed,order.closed}', :'secret',
           '{"ordered": true}') AS erp,
       callback_center.create_endpoint('settlement', :'rcv' || '/settlement',
           '{settlement.split,payment.refund_required}', :'secret') AS settlement,
       callback_center.create_endpoint('notify', :'rcv' || '/notify', '{user.notify}', :'secret',
           '{"is_core": false}') AS notify \gset
SELECT callback_center.set_provider('paychan', 'standard_webhooks', ARRAY[:'secret']);
SELECT callback_center.set_stock('burger', 10), callback_center.set_stock('cola', 20);
SELECT callback_center.issue_coupon('cp-5off', 'alice'), callback_center.issue_coupon('cp-bob', 'bob');
SELECT name, url, event_types FROM callback_center.endpoint_config ORDER BY id;

-- A signed provider request, as the payment channel would send it.
CREATE FUNCTION pg_temp.signed(body text, msg text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('webhook-id', msg,
        'webhook-timestamp', extract(epoch FROM now())::bigint::text,
        'webhook-signature', callback_center.sign_webhook(current_setting('demo.secret'),
            msg, extract(epoch FROM now())::bigint, body)) $$;
SELECT set_config('demo.secret', :'secret', false) \gset
CREATE FUNCTION pg_temp.pay_body(kind text, txn text, oid text, cents bigint) RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('type', kind,
        'data', jsonb_build_object('txn_id', txn, 'order_id', oid, 'amount_cents', cents))::text $$;

\echo
\echo '=== A. Alice orders 2 burgers and a cola with a coupon ==='
SELECT order_id, status, pay_status, payment_id, failure_reason
  FROM callback_center.place_order('A-1001', 'alice',
       '[{"sku":"burger","qty":2},{"sku":"cola","qty":1}]', 3500, 'cp-5off', 'paychan');
SELECT sku_id, available FROM callback_center.stock ORDER BY sku_id;
SELECT coupon_id, status, biz_id AS held_by FROM callback_center.coupons WHERE coupon_id = 'cp-5off';
\echo 'Bob asks for 20 burgers: the order fails, nothing is held'
SELECT order_id, status, failure_reason
  FROM callback_center.place_order('B-2001', 'bob', '[{"sku":"burger","qty":20}]', 9000, 'cp-bob');

\echo
\echo '=== B. The payment channel says Alice paid (and says it again) ==='
SELECT callback_center.start_payment('A-1001', 'paychan');
SELECT pg_temp.pay_body('payment.succeeded', 'T-77', 'A-1001', 3500) AS body \gset
SELECT 'first' AS delivery, * FROM callback_center.payment_callback('paychan', pg_temp.signed(:'body', 'evt-1'), :'body');
SELECT 'repeat' AS delivery, * FROM callback_center.payment_callback('paychan', pg_temp.signed(:'body', 'evt-1'), :'body');
\echo 'a forged one (well-formed, wrong key) is refused and records nothing:'
\set ON_ERROR_STOP off
SELECT * FROM callback_center.payment_callback('paychan',
    jsonb_set(pg_temp.signed(:'body', 'evt-1'), '{webhook-signature}', '"v1,Zm9yZ2VkIHNpZ25hdHVyZSwgMzIgYnl0ZXMgbG9uZyE="'), :'body');
\set ON_ERROR_STOP on
SELECT o.order_id, o.status, o.pay_status, p.status AS payment, c.status AS coupon
  FROM callback_center.orders o JOIN callback_center.payments p USING (order_id)
  JOIN callback_center.coupons c ON c.coupon_id = o.coupon_id WHERE o.order_id = 'A-1001';
SELECT machine, from_state, to_state, event, actor FROM callback_center.state_history
 WHERE entity_id IN ('A-1001', 'pay_A-1001') ORDER BY id;

\echo
\echo '=== C. Carol orders, then her payment fails: stock and coupon come back, once ==='
SELECT callback_center.issue_coupon('cp-carol', 'carol');
SELECT order_id, status FROM callback_center.place_order('C-3001', 'carol', '[{"sku":"burger","qty":3}]', 4500, 'cp-carol', 'paychan');
SELECT available AS burgers_after_order FROM callback_center.stock WHERE sku_id = 'burger';
SELECT pg_temp.pay_body('payment.failed', 'T-78', 'C-3001', 4500) AS fbody \gset
SELECT * FROM callback_center.payment_callback('paychan', pg_temp.signed(:'fbody', 'evt-2'), :'fbody');
SELECT * FROM callback_center.payment_callback('paychan', pg_temp.signed(:'fbody', 'evt-2'), :'fbody');
SELECT available AS burgers_after_failure FROM callback_center.stock WHERE sku_id = 'burger';
SELECT coupon_id, status FROM callback_center.coupons WHERE coupon_id = 'cp-carol';

\echo
\echo '=== D. Money arrives late for the closed order: kept, refund requested ==='
SELECT pg_temp.pay_body('payment.succeeded', 'T-79', 'C-3001', 4500) AS lbody \gset
SELECT * FROM callback_center.payment_callback('paychan', pg_temp.signed(:'lbody', 'evt-3'), :'lbody');
SELECT order_id, status, pay_status FROM callback_center.orders WHERE order_id = 'C-3001';

\echo
\echo '=== The worker delivers every event, signed (waiting for the outbox to drain) ==='
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXIT WHEN NOT EXISTS (SELECT 1 FROM callback_center.outbox WHERE status IN ('pending', 'delivering'));
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT e.name AS endpoint, o.event_type, o.aggregate_id, o.status, o.attempts
  FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 ORDER BY o.id;
SELECT endpoint, delivered, failed_attempts, dead, round(p50_ms::numeric, 2) AS p50_ms, breaker
  FROM callback_center.delivery_stats;
