-- Who may pay what (issues 10 and 11): a verdict applies only to a payment
-- of the provider that signed it, with amount and currency equal; coupons
-- are used by their owner; providers must exist; keys, numbers and
-- intervals from outside are bounded.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;
SET timezone = 'UTC';
\set SHOW_CONTEXT never

SELECT callback_center.set_stock('pc-A', 100) IS NOT NULL AS stock;
SELECT callback_center.create_endpoint('pc-sink', 'http://127.0.0.1:9/pc', '{*}') > 0 AS sink;
SELECT callback_center.create_endpoint('pc-query', 'http://127.0.0.1:9/q', '{payment.query}') > 0 AS query;
SELECT callback_center.set_provider('pc-acme', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.set_provider('pc-sandbox', 'standard_webhooks',
    ARRAY['whsec_c2FuZGJveCBzZWNyZXQga2V5IDEyMzQ1']);
SELECT callback_center.set_provider('pc-stripe', 'stripe', ARRAY['whsec_pc_stripe']);
SELECT callback_center.set_provider_query_endpoint('pc-acme', 'pc-query', allow_plain_http => true);

-- A Standard Webhooks request signed with secret, timestamped now.
CREATE FUNCTION pc_headers(secret text, body text, msg text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('webhook-id', msg,
        'webhook-timestamp', extract(epoch FROM now())::bigint::text,
        'webhook-signature', callback_center.sign_webhook(secret, msg,
            extract(epoch FROM now())::bigint, body)) $$;
CREATE FUNCTION pc_acme(body text, msg text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT pc_headers('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', body, msg) $$;
CREATE FUNCTION pc_sandbox(body text, msg text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT pc_headers('whsec_c2FuZGJveCBzZWNyZXQga2V5IDEyMzQ1', body, msg) $$;
-- A body; data holds txn_id, order_id and, when not null, amount_cents and currency.
CREATE FUNCTION pc_body(kind text, txn text, oid text, cents bigint, cur text DEFAULT NULL)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('type', kind, 'data', jsonb_strip_nulls(jsonb_build_object(
        'txn_id', txn, 'order_id', oid, 'amount_cents', cents, 'currency', cur)))::text $$;
CREATE FUNCTION pc_stripe_headers(body text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('Stripe-Signature', callback_center.sign_stripe('whsec_pc_stripe',
        extract(epoch FROM now())::bigint, body)) $$;
CREATE FUNCTION pc_state(oid text) RETURNS text LANGUAGE sql AS $$
    SELECT format('%s/%s payment=%s txn=%s', o.status, o.pay_status, p.status,
                  coalesce(p.provider_txn_id, '-'))
      FROM callback_center.orders o LEFT JOIN callback_center.payments p USING (order_id)
     WHERE o.order_id = oid $$;
CREATE FUNCTION pc_try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text;
BEGIN
    EXECUTE q INTO r;
    RETURN coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || left(SQLERRM, 120);
END $$;
CREATE FUNCTION pc_place(oid text, cents bigint, provider text DEFAULT 'pc-acme') RETURNS text
LANGUAGE sql AS $$
    SELECT status FROM callback_center.place_order(oid, 'pc-user', '[{"sku":"pc-A","qty":1}]',
                                                   cents, NULL, provider) $$;

-- ------------------------------------------------------------------------
-- 1. A verdict applies only to a payment of the provider that signed it.
-- ------------------------------------------------------------------------
SELECT pc_place('pc-1', 420000) AS placed, callback_center.start_payment('pc-1', 'pc-acme') AS payment;
-- The sandbox provider's correctly signed success for acme's order: refused.
SELECT pc_body('payment.succeeded', 'sbx-1', 'pc-1', 420000) AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-sandbox', pc_sandbox(:'b', 'pc-m1'), :'b');
-- Without an amount, from the sandbox: refused.
SELECT pc_body('payment.succeeded', 'sbx-2', 'pc-1', NULL) AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-sandbox', pc_sandbox(:'b', 'pc-m2'), :'b');
-- A sandbox failure does not close acme's order either.
SELECT pc_body('payment.failed', 'sbx-3', 'pc-1', 420000) AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-sandbox', pc_sandbox(:'b', 'pc-m3'), :'b');
SELECT pc_state('pc-1') AS untouched;
-- acme's own success without an amount is not a success.
SELECT pc_body('payment.succeeded', 'acme-1', 'pc-1', NULL) AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m4'), :'b');
SELECT pc_state('pc-1') AS still_paying;
-- A payment that never chose a provider takes no one's verdict.
SELECT pc_place('pc-2', 500, NULL) AS placed;
SELECT pc_body('payment.succeeded', 'acme-2', 'pc-2', 500) AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m5'), :'b');
SELECT pc_state('pc-2') AS unpaid;
-- acme's own, with the amount: paid.
SELECT pc_body('payment.succeeded', 'acme-1', 'pc-1', 420000) AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m6'), :'b');
SELECT pc_state('pc-1') AS paid;

-- Active query answers: the answer is the query's provider's; it applies
-- only while the payment is still that provider's, with the amount.
SELECT pc_place('pc-3', 300) AS placed, callback_center.start_payment('pc-3', 'pc-acme') AS payment;
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent;
SELECT id AS q3 FROM callback_center.payment_queries WHERE order_id = 'pc-3' \gset
-- Meanwhile the user switched to the sandbox channel.
SELECT callback_center.start_payment('pc-3', 'pc-sandbox') AS switched;
SELECT callback_center._apply_query_answer(:q3, pc_body('payment.succeeded', 'acme-3', 'pc-3', 300)) AS other_provider;
SELECT pc_state('pc-3') AS still_paying;
SELECT callback_center.start_payment('pc-3', 'pc-acme') AS back;
SELECT callback_center.query_stuck_payments(10, '0 s', '0 s') AS sent;
SELECT max(id) AS q3 FROM callback_center.payment_queries WHERE order_id = 'pc-3' \gset
SELECT callback_center._apply_query_answer(:q3, pc_body('payment.succeeded', 'acme-3', 'pc-3', NULL)) AS no_amount;
SELECT pc_state('pc-3') AS still_paying;

-- Reconciliation: a sandbox statement line for acme's unpaid order is a
-- difference for people, never a payment.
SELECT pc_place('pc-4', 400) AS placed, callback_center.start_payment('pc-4', 'pc-acme') AS payment;
INSERT INTO callback_center.provider_statement (channel, bill_date, provider_txn_id, order_id,
                                                amount_cents, status)
VALUES ('pc-sandbox', '2026-02-01', 'sbx-4', 'pc-4', 400, 'success');
SELECT * FROM callback_center.reconcile('pc-sandbox', '2026-02-01') WHERE count > 0;
SELECT kind, resolution FROM callback_center.recon_diffs WHERE channel = 'pc-sandbox';
SELECT pc_state('pc-4') AS still_paying;

-- ------------------------------------------------------------------------
-- 2. Currency: checked when the message carries one.
-- ------------------------------------------------------------------------
SELECT pc_place('pc-5', 1000) AS placed, callback_center.start_payment('pc-5', 'pc-acme') AS payment;
SELECT currency FROM callback_center.orders WHERE order_id = 'pc-5';
SELECT pc_body('payment.succeeded', 'acme-5', 'pc-5', 1000, 'JPY') AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m7'), :'b');
SELECT pc_state('pc-5') AS still_paying;
-- Refused: nothing recorded, nothing emitted (before 0.2.0 it was recorded,
-- acknowledged and flagged with payment.amount_mismatch).
SELECT (SELECT count(*) FROM callback_center.callback_record WHERE biz_id = 'pc-m7') AS records,
       (SELECT count(*) FROM callback_center.outbox
         WHERE aggregate_id = 'pc-5' AND event_type = 'payment.amount_mismatch') AS flagged;
SELECT pc_body('payment.succeeded', 'acme-5', 'pc-5', 1000, 'cny') AS b \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m8'), :'b');
-- Stripe carries currency in lower case, on the PaymentIntent.
SELECT pc_place('pc-6', 600, 'pc-stripe') AS placed;
SELECT jsonb_build_object('id', 'evt_pc6', 'type', 'payment_intent.succeeded', 'data',
    jsonb_build_object('object', jsonb_build_object('id', 'pi_pc6', 'amount', 600,
        'amount_received', 600, 'currency', 'jpy', 'metadata', jsonb_build_object('order_id', 'pc-6'))))::text AS s \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-stripe', pc_stripe_headers(:'s'), :'s');
SELECT replace(:'s', '"jpy"', '"cny"') AS s \gset
SELECT replace(:'s', 'evt_pc6', 'evt_pc6b') AS s \gset
SELECT http_status, outcome FROM callback_center.payment_callback('pc-stripe', pc_stripe_headers(:'s'), :'s');
SELECT pc_state('pc-6') AS paid;

-- A message recorded before keeps its first answer when the payment has
-- changed hands since: a Stripe failed attempt, the user switches to acme,
-- Stripe resends it.  A new Stripe message is refused.
SELECT pc_place('pc-20', 2000, 'pc-stripe') AS placed,
       callback_center.start_payment('pc-20', 'pc-stripe') AS payment;
SELECT jsonb_build_object('id', 'evt_pc20', 'type', 'payment_intent.payment_failed', 'data',
    jsonb_build_object('object', jsonb_build_object('id', 'pi_pc20', 'amount', 2000,
        'currency', 'cny', 'metadata', jsonb_build_object('order_id', 'pc-20'))))::text AS s \gset
SELECT http_status, is_first, outcome FROM callback_center.payment_callback('pc-stripe', pc_stripe_headers(:'s'), :'s');
SELECT callback_center.start_payment('pc-20', 'pc-acme') AS switched;
SELECT http_status, is_first, outcome FROM callback_center.payment_callback('pc-stripe', pc_stripe_headers(:'s'), :'s');
SELECT replace(:'s', 'evt_pc20', 'evt_pc20b') AS s \gset
SELECT http_status, is_first, outcome FROM callback_center.payment_callback('pc-stripe', pc_stripe_headers(:'s'), :'s');

-- Reconciliation finds the money of a success we refused: the statement
-- line is a flagged difference (amount_mismatch here; another provider's
-- line is missing_local, section 1), never applied.
SELECT pc_place('pc-21', 700) AS placed, callback_center.start_payment('pc-21', 'pc-acme') AS payment;
SELECT pc_body('payment.succeeded', 'acme-21', 'pc-21', 650) AS b \gset
SELECT http_status, is_first, outcome FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m21'), :'b');
INSERT INTO callback_center.provider_statement (channel, bill_date, provider_txn_id, order_id,
                                                amount_cents, status)
VALUES ('pc-acme', '2026-02-02', 'acme-21', 'pc-21', 650, 'success');
SELECT * FROM callback_center.reconcile('pc-acme', '2026-02-02') WHERE count > 0;
SELECT kind, provider_amount, local_amount, resolution FROM callback_center.recon_diffs
 WHERE channel = 'pc-acme' AND provider_txn_id = 'acme-21';
SELECT pc_state('pc-21') AS still_paying;
-- A success refused for its currency whose statement line has the amount:
-- the line says its currency, and the one rule keeps it from being applied.
SELECT pc_place('pc-22', 1000) AS placed, callback_center.start_payment('pc-22', 'pc-acme') AS payment;
SELECT pc_body('payment.succeeded', 'acme-22', 'pc-22', 1000, 'USD') AS b \gset
SELECT http_status, is_first, outcome FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m22'), :'b');
INSERT INTO callback_center.provider_statement (channel, bill_date, provider_txn_id, order_id,
                                                amount_cents, status, currency)
VALUES ('pc-acme', '2026-02-04', 'acme-22', 'pc-22', 1000, 'success', 'USD');
SELECT * FROM callback_center.reconcile('pc-acme', '2026-02-04') WHERE count > 0;
SELECT kind, resolution, note FROM callback_center.recon_diffs
 WHERE channel = 'pc-acme' AND provider_txn_id = 'acme-22';
SELECT pc_state('pc-22') AS still_paying;

-- ------------------------------------------------------------------------
-- 3. A coupon is used only by its owner.
-- ------------------------------------------------------------------------
SELECT callback_center.issue_coupon('pc-cp1', 'u1'), callback_center.issue_coupon('pc-cp-any');
SELECT status, failure_reason FROM callback_center.place_order('pc-7', 'u2', '[{"sku":"pc-A","qty":1}]',
    100, 'pc-cp1', 'pc-acme');
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'pc-cp1';
SELECT status FROM callback_center.place_order('pc-8', 'u1', '[{"sku":"pc-A","qty":1}]',
    100, 'pc-cp1', 'pc-acme');
SELECT status, biz_id FROM callback_center.coupons WHERE coupon_id = 'pc-cp1';
-- A coupon issued to no user is anyone's.
SELECT status FROM callback_center.place_order('pc-9', 'u9', '[{"sku":"pc-A","qty":1}]',
    100, 'pc-cp-any', 'pc-acme');

-- ------------------------------------------------------------------------
-- 4. Providers must be registered.
-- ------------------------------------------------------------------------
SELECT pc_try($$SELECT status FROM callback_center.place_order('pc-10', 'u', '[{"sku":"pc-A","qty":1}]',
    1, NULL, 'no-such-psp')$$) AS unknown_provider;
SELECT pc_try(format($$SELECT status FROM callback_center.place_order('pc-10', 'u', '[{"sku":"pc-A","qty":1}]',
    1, NULL, %L)$$, repeat('p', 1000000))) AS huge_provider;
SELECT count(*) AS written FROM callback_center.orders WHERE order_id = 'pc-10';
SELECT pc_place('pc-11', 100) AS placed;
SELECT pc_try($$SELECT callback_center.start_payment('pc-11', 'no-such-psp')$$) AS unknown_provider;
SELECT pc_try(format($$SELECT callback_center.start_payment('pc-11', %L)$$, repeat('p', 1000000))) AS huge_provider;
SELECT left(provider, 20) AS provider FROM callback_center.payments WHERE order_id = 'pc-11';

-- ------------------------------------------------------------------------
-- 5. Bounds: keys, numbers and intervals from outside.
-- ------------------------------------------------------------------------
SELECT pc_try(format($$SELECT status FROM callback_center.place_order(%L, 'u', '[{"sku":"pc-A","qty":1}]', 1)$$,
    repeat('o', 1000000))) AS huge_order_id;
SELECT pc_try(format($$SELECT status FROM callback_center.place_order('pc-12', %L, '[{"sku":"pc-A","qty":1}]', 1)$$,
    repeat('u', 1000000))) AS huge_user_id;
SELECT pc_try(format($$SELECT status FROM callback_center.place_order('pc-12', 'u', '[{"sku":"pc-A","qty":1}]', 1, %L)$$,
    repeat('c', 1000000))) AS huge_coupon_id;
SELECT pc_try(format($$SELECT is_first::text FROM callback_center.record_callback(%L, 't', '')$$,
    repeat('b', 1000000))) AS huge_biz_id;
SELECT pc_try(format($$SELECT callback_center.issue_coupon(%L, 'u')$$, repeat('c', 1000000))) AS huge_coupon;
SELECT pc_try(format($$SELECT callback_center.barrier(%L, 'b', 'try')$$, repeat('g', 1000000))) AS huge_gid;
SELECT pc_try(format($$SELECT callback_center.saga_start(%L, '[{"action":"SELECT 1"}]')$$,
    repeat('s', 1000000))) AS huge_saga_id;
-- A signed body whose amount overflows bigint, or holds \u0000: answered
-- once, as a refusal, and the same answer on every redelivery.
SELECT pc_place('pc-13', 100) AS placed, callback_center.start_payment('pc-13', 'pc-acme') AS payment;
SELECT '{"type":"payment.succeeded","data":{"txn_id":"acme-13","order_id":"pc-13","amount_cents":1e30}}' AS b \gset
SELECT http_status, response_body, is_first, outcome
  FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m13'), :'b');
SELECT http_status, response_body, is_first, outcome
  FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m13'), :'b');
SELECT '{"type":"payment.succeeded","data":{"txn_id":"acme-13","order_id":"pc-13","amount_cents":100000000000000000000}}' AS b \gset
SELECT http_status, is_first, outcome
  FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m14'), :'b');
SELECT '{"type":"payment.succeeded","data":{"txn_id":"acme-13\u0000","order_id":"pc-13","amount_cents":100}}' AS b \gset
SELECT http_status, is_first, outcome
  FROM callback_center.payment_callback('pc-acme', pc_acme(:'b', 'pc-m15'), :'b');
SELECT pc_state('pc-13') AS still_paying;
SELECT biz_id, status, result->>'outcome' AS outcome FROM callback_center.callback_record
 WHERE biz_id IN ('pc-m13', 'pc-m14', 'pc-m15') ORDER BY biz_id;
-- A Stripe body that is not JSON cannot be keyed by its event id: keyed by
-- its hash, answered once.
SELECT http_status, is_first, outcome
  FROM callback_center.payment_callback('pc-stripe', pc_stripe_headers('{"id": 1e'), '{"id": 1e');
SELECT http_status, is_first, outcome
  FROM callback_center.payment_callback('pc-stripe', pc_stripe_headers('{"id": 1e'), '{"id": 1e');
-- Intervals: ages and tolerances beyond 100 years are refused.
SELECT pc_try($$SELECT callback_center.reclaim_stale_callbacks('300000 years')::text$$) AS reclaim;
SELECT pc_try($$SELECT count(*)::text FROM callback_center.purge('300000 years')$$) AS purge;
SELECT pc_try($$SELECT count(*)::text FROM callback_center.reconcile('pc-acme', '2026-02-01', '300000 years')$$) AS grace;
SELECT pc_try($$SELECT callback_center.set_provider('pc-x', 'stripe', ARRAY['s'], '300000 years')::text$$) AS tolerance;

-- ------------------------------------------------------------------------
-- 6. Provider secrets: generated, so that they never appear in a
-- statement (and in the server log with it); no error repeats one.
-- ------------------------------------------------------------------------
SELECT pc_try($$SELECT callback_center.set_provider('pc-gen', 'standard_webhooks', NULL)::text$$) AS generated;
SELECT pc_try($$SELECT (callback_center.provider_secret('pc-gen') ~ '^whsec_[A-Za-z0-9+/]{32}$')::text$$) AS looks_right;
SELECT pc_try($$SELECT (callback_center.provider_secret('pc-gen') = secrets[1])::text
                  FROM callback_center.providers WHERE name = 'pc-gen'$$) AS is_stored;
SELECT pc_try($$SELECT callback_center.provider_secret('no-such-psp')$$) AS unknown;
-- A Stripe provider gets one too (for test set-ups; Stripe itself issues
-- the real ones).
SELECT pc_try($$SELECT callback_center.set_provider('pc-gen-s', 'stripe', NULL)::text$$) AS generated_stripe;
SELECT pc_try($$SELECT (callback_center.provider_secret('pc-gen-s') ~ '^whsec_')::text$$) AS stripe_looks_right;
-- Errors about a bad secret never carry it, in any field (the secret is
-- a bind parameter here, as the docs advise, so the statement text does
-- not hold it either).
CREATE FUNCTION pg_temp.error_fields(q text, secret text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    m text; d text; h text; c text;
BEGIN
    EXECUTE q USING secret;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT,
                            c = PG_EXCEPTION_CONTEXT;
    RETURN concat_ws(' | ', m, d, h, c);
END $$;
SELECT position('TOPSECRET' IN pg_temp.error_fields(q, s)) = 0 AS secret_not_in_error,
       left(pg_temp.error_fields(q, s), 50) AS error
  FROM (VALUES ($$SELECT callback_center.set_provider('pc-bad', 'standard_webhooks', ARRAY[$1])$$, 'whsec_TOPSECRET!!'),
               ($$SELECT callback_center.set_provider('pc-bad', 'standard_webhooks', ARRAY[$1])$$, 'TOPSECRET'),
               ($$SELECT callback_center.set_provider('pc-bad', 'standard_webhooks',
                     ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', $1])$$, 'TOPSECRET'),
               ($$SELECT callback_center.set_provider('pc-bad', 'stripe', ARRAY[$1, ''])$$, 'TOPSECRET'),
               ($$SELECT callback_center.sign_webhook($1, 'm', 0, '')$$, 'whsec_TOPSECRET!!')) AS v(q, s);
SELECT callback_center.drop_provider('pc-gen'), callback_center.drop_provider('pc-gen-s');

DROP FUNCTION pc_headers(text, text, text), pc_acme(text, text), pc_sandbox(text, text),
    pc_body(text, text, text, bigint, text), pc_stripe_headers(text), pc_state(text), pc_try(text),
    pc_place(text, bigint, text);
DELETE FROM callback_center.outbox WHERE aggregate_id LIKE 'pc-%';
SELECT callback_center.drop_endpoint('pc-sink') >= 0 AS dropped;
SELECT callback_center.set_provider_query_endpoint('pc-acme', NULL);
SELECT callback_center.drop_endpoint('pc-query') >= 0 AS dropped;
UPDATE callback_center.payments SET status = 'CLOSED' WHERE order_id LIKE 'pc-%' AND status = 'PAYING';
