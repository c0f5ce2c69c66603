
-- Refunds (doc/refunds.md): a refund row per request, idempotent by the
-- caller's refund id; the request goes to the provider's API endpoint
-- (providers.query_endpoint) as a refund.request event, or waits for an
-- administrator when the provider has none (manual mode).  Every status
-- change of a refund, whoever brings the news (the synchronous answer, a
-- refund notification, a status query, an administrator, reconciliation),
-- goes through _apply_refund_answer, under the order's, the payment's and
-- the refund's row locks, in that order (the order every payment path
-- takes).

-- ------------------------------------------------------------------------
-- Machines
-- ------------------------------------------------------------------------

-- payment and order_pay: a partial refund, then more of them, then the
-- rest.  REFUNDED stays final.
SELECT callback_center.add_state('payment', 'PARTIALLY_REFUNDED');
SELECT callback_center.add_transition('payment', 'PAID', 'PARTIALLY_REFUNDED', 'partial_refund');
SELECT callback_center.add_transition('payment', 'PARTIALLY_REFUNDED', 'REFUNDED', 'refund');
SELECT callback_center.add_state('order_pay', 'partially_refunded');
SELECT callback_center.add_transition('order_pay', 'paid', 'partially_refunded', 'partial_refund',
    '{order.partially_refunded}');
SELECT callback_center.add_transition('order_pay', 'partially_refunded', 'refunded', 'refund',
    '{order.refunded}');
-- order: fulfilled (the goods left; set by the application with
-- apply_event(..., 'fulfil')).  An order refunded in full before that
-- moves confirmed -> refunded and gives its stock and coupon back; a
-- fulfilled one stays fulfilled and keeps them (the goods are with the
-- buyer: a return is the merchant's business).
SELECT callback_center.add_state('order', 'fulfilled', false, true);
SELECT callback_center.add_transition('order', 'confirmed', 'fulfilled', 'fulfil');
-- coupon: a used coupon comes back when its order is refunded in full
-- before fulfilment, so used is no longer final.
UPDATE callback_center.machine_states SET is_final = false
 WHERE machine = 'coupon' AND state = 'used';
SELECT callback_center.add_transition('coupon', 'used', 'available', 'refund');

-- refund: PENDING (asked for, or waiting for an administrator) ->
-- PROCESSING (the provider accepted it) -> SUCCESS or FAILED, both final.
-- The merchant hears of the outcome through the emits.
SELECT callback_center.create_state_machine('refund', 'Refund of a payment');
SELECT callback_center.add_state('refund', 'PENDING', true, false);
SELECT callback_center.add_state('refund', 'PROCESSING', false, false);
SELECT callback_center.add_state('refund', 'SUCCESS', false, true);
SELECT callback_center.add_state('refund', 'FAILED', false, true);
SELECT callback_center.add_transition('refund', 'PENDING', 'PROCESSING', 'accept');
SELECT callback_center.add_transition('refund', 'PENDING', 'SUCCESS', 'succeed', '{refund.succeeded}');
SELECT callback_center.add_transition('refund', 'PROCESSING', 'SUCCESS', 'succeed', '{refund.succeeded}');
SELECT callback_center.add_transition('refund', 'PENDING', 'FAILED', 'fail', '{refund.failed}');
SELECT callback_center.add_transition('refund', 'PROCESSING', 'FAILED', 'fail', '{refund.failed}');

UPDATE callback_center.state_machines SET builtin = true WHERE machine = 'refund';
UPDATE callback_center.machine_states SET builtin = true
 WHERE machine = 'refund' OR (machine, state) IN (('payment', 'PARTIALLY_REFUNDED'),
                                                  ('order_pay', 'partially_refunded'),
                                                  ('order', 'fulfilled'));
UPDATE callback_center.transitions SET builtin = true
 WHERE machine = 'refund'
    OR (machine, from_state, to_state) IN (('payment', 'PAID', 'PARTIALLY_REFUNDED'),
                                           ('payment', 'PARTIALLY_REFUNDED', 'REFUNDED'),
                                           ('order_pay', 'paid', 'partially_refunded'),
                                           ('order_pay', 'partially_refunded', 'refunded'),
                                           ('order', 'confirmed', 'fulfilled'),
                                           ('coupon', 'used', 'available'));

-- ------------------------------------------------------------------------
-- The refunds table
-- ------------------------------------------------------------------------

-- One row per refund.  A refund of an order's payment has payment_id; a
-- refund of a late payment (money for an order that could not take it)
-- has late_payment_id and refunds that provider transaction.  mode api:
-- the request went to the provider's API endpoint (refund.request) and
-- open refunds are queried again (refund.query) from next_query_at on;
-- manual: the provider has no API endpoint, an administrator refunds at
-- the provider and records the outcome (record_refund_outcome).
CREATE TABLE callback_center.refunds (
    refund_id          text PRIMARY KEY,
    order_id           text NOT NULL,
    payment_id         text,
    late_payment_id    bigint UNIQUE,
    provider           text NOT NULL,
    provider_txn_id    text NOT NULL,
    amount_cents       bigint NOT NULL CHECK (amount_cents > 0),
    total_cents        bigint NOT NULL CHECK (total_cents >= amount_cents),
    currency           text NOT NULL,
    reason             text,
    mode               text NOT NULL CHECK (mode IN ('api', 'manual')),
    status             text NOT NULL DEFAULT 'PENDING',
    provider_refund_id text,
    error              text,
    queries            integer NOT NULL DEFAULT 0,
    next_query_at      timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    CHECK ((payment_id IS NULL) <> (late_payment_id IS NULL))
);
COMMENT ON TABLE callback_center.refunds IS
    'Refunds of payments and late payments; status follows machine "refund"';

-- What request_refund sums under the payment's lock.
CREATE INDEX refunds_payment ON callback_center.refunds (payment_id) WHERE payment_id IS NOT NULL;
-- What refund_jobs queries again: open refunds of the API mode.
CREATE INDEX refunds_open ON callback_center.refunds (next_query_at)
    WHERE status IN ('PENDING', 'PROCESSING') AND mode = 'api';
-- Reconciliation finds the refunds that succeeded in a day.
CREATE INDEX refunds_provider_finished ON callback_center.refunds (provider, finished_at)
    WHERE status = 'SUCCESS';

SELECT pg_catalog.pg_extension_config_dump('callback_center.refunds', '');
-- Nothing secret in it: the application sees its refunds.
GRANT SELECT ON callback_center.refunds TO callback_center_app, callback_center_admin;

-- Events of refunds carry the whole row (payload_columns '{*}').
SELECT callback_center.attach_state_machine('callback_center.refunds', 'status', 'refund',
                                            'refund_id', '{*}');

-- ------------------------------------------------------------------------
-- Requesting
-- ------------------------------------------------------------------------

-- How long an open refund of the API mode waits before its next status
-- query: one minute after the request, then doubling per query sent, at
-- most an hour.  Refunds stay open until the provider (or an
-- administrator) gives an outcome; providers take days for some.
CREATE FUNCTION callback_center._refund_backoff(queries integer)
RETURNS interval
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT LEAST(interval '1 minute' * pg_catalog.power(2, LEAST(queries, 10)), interval '1 hour')
$$;

-- The refund.request payload of the contract with the adapters.
CREATE FUNCTION callback_center._refund_request_payload(r callback_center.refunds)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT pg_catalog.jsonb_build_object('refund_id', r.refund_id, 'order_id', r.order_id,
        'provider', r.provider, 'provider_txn_id', r.provider_txn_id,
        'amount_cents', r.amount_cents, 'total_cents', r.total_cents,
        'currency', r.currency, 'reason', r.reason)
$$;

-- Sends refund.request (or refund.query) for r to its provider's API
-- endpoint; false when there is none or it is disabled (nothing sent).
CREATE FUNCTION callback_center._refund_send(r callback_center.refunds, event_type text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep text;
BEGIN
    SELECT p.query_endpoint INTO ep FROM callback_center.providers p WHERE p.name = r.provider;
    IF ep IS NULL THEN
        RETURN false;
    END IF;
    RETURN callback_center.enqueue_to(ep, event_type, r.order_id,
        CASE WHEN event_type = 'refund.request' THEN callback_center._refund_request_payload(r)
             ELSE jsonb_build_object('refund_id', r.refund_id, 'order_id', r.order_id,
                                     'provider', r.provider) END) = 1;
END
$$;

-- Inserts a refund the caller has checked and locked for (order, then
-- payment or late payment), and sends it: refund.request to the
-- provider's API endpoint (mode api), or, when the provider has none,
-- refund.manual_required to the endpoints subscribed to it (mode manual).
-- A refund whose mode the caller set to manual is the caller's to settle
-- at once (mark_refunded): nothing is sent.
CREATE FUNCTION callback_center._refund_create(r callback_center.refunds)
RETURNS callback_center.refunds
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    announce boolean := r.mode IS NULL;
BEGIN
    r.mode := coalesce(r.mode,
        CASE WHEN EXISTS (SELECT 1 FROM callback_center.providers p
                           WHERE p.name = r.provider AND p.query_endpoint IS NOT NULL)
             THEN 'api' ELSE 'manual' END);
    r.status := 'PENDING';
    r.queries := 0;
    r.next_query_at := CASE WHEN r.mode = 'api'
                            THEN now() + callback_center._refund_backoff(0) END;
    r.created_at := now();
    r.updated_at := now();
    INSERT INTO callback_center.refunds SELECT r.*;
    IF r.mode = 'api' THEN
        IF NOT callback_center._refund_send(r, 'refund.request') THEN
            -- The endpoint is disabled: refund_jobs sends the request once
            -- it is enabled again.
            UPDATE callback_center.refunds x SET next_query_at = now()
             WHERE x.refund_id = r.refund_id;
            r.next_query_at := now();
        END IF;
    ELSIF announce THEN
        PERFORM callback_center.enqueue('refund.manual_required', r.order_id,
                                        callback_center._refund_request_payload(r));
    END IF;
    RETURN r;
END
$$;

-- Asks for a refund of amount_cents of an order's payment, once per
-- refund_id: a repeat with the same arguments returns that refund as it
-- is (is_new false), with other arguments it is CB062.  The payment must
-- be paid (PAID or PARTIALLY_REFUNDED; CB060 otherwise) and the refunds
-- not failed, this one included, at most what was paid (CB061 with the
-- figures).  refund_id is what the provider gets as out_refund_no /
-- out_request_no: 1 to 64 letters, digits and _-|*@ (22023).  reason may
-- be NULL.  Any refusal writes nothing.  See doc/refunds.md.
-- The parameters keep their p_ prefix: the result columns refund_id and
-- amount_cents have the plain names, and PL/pgSQL refuses a parameter and a
-- result column of one name.
CREATE FUNCTION callback_center.request_refund(
    p_order_id text,
    p_amount_cents bigint,
    p_reason text,
    p_refund_id text)
RETURNS TABLE (refund_id text, status text, mode text, amount_cents bigint, is_new boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.refunds;
    o callback_center.orders;
    pay callback_center.payments;
    taken bigint;
BEGIN
    PERFORM callback_center._require_key(request_refund.p_order_id, 'order_id');
    PERFORM callback_center._require(request_refund.p_amount_cents, 'amount_cents');
    PERFORM callback_center._require_key(request_refund.p_refund_id, 'refund_id', 64);
    IF request_refund.p_reason IS NOT NULL THEN
        PERFORM callback_center._require_key(request_refund.p_reason, 'reason');
    END IF;
    IF request_refund.p_refund_id !~ '^[A-Za-z0-9_|*@-]+$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid refund_id "%s"', request_refund.p_refund_id),
            DETAIL = 'A refund id is 1 to 64 letters, digits and _-|*@ (what providers take as out_refund_no).';
    END IF;
    IF request_refund.p_amount_cents <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('amount_cents must be positive, got %s', request_refund.p_amount_cents);
    END IF;

    -- Serialise calls for one refund id, then look: a repeat (or a call
    -- that waited for a concurrent first one) finds the refund.
    PERFORM pg_advisory_xact_lock(hashtextextended('callback_center.refund:' || request_refund.p_refund_id, 0));
    SELECT * INTO r FROM callback_center.refunds x WHERE x.refund_id = request_refund.p_refund_id;
    IF FOUND THEN
        IF r.order_id = request_refund.p_order_id AND r.amount_cents = request_refund.p_amount_cents
           AND r.reason IS NOT DISTINCT FROM request_refund.p_reason AND r.late_payment_id IS NULL THEN
            RETURN QUERY SELECT r.refund_id, r.status, r.mode, r.amount_cents, false;
            RETURN;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'CB062',
            MESSAGE = format('refund "%s" already exists with other arguments', request_refund.p_refund_id),
            DETAIL = format('It refunds %s cents of order "%s"%s.', r.amount_cents, r.order_id,
                            CASE WHEN r.late_payment_id IS NOT NULL
                                 THEN format(' (late payment %s)', r.late_payment_id)
                                 ELSE coalesce(format(', reason "%s"', r.reason), ', no reason') END),
            HINT = 'A refund id names one refund; use a new id for another refund.';
    END IF;

    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = request_refund.p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB050',
            MESSAGE = format('order "%s" does not exist', request_refund.p_order_id);
    END IF;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;
    -- A REFUNDED payment counts as paid when its refunds refunded it (then
    -- nothing is left: CB061 below), not when it was late money given back
    -- or refunded by hand.
    IF pay.payment_id IS NULL OR pay.status NOT IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')
       OR (pay.status = 'REFUNDED'
           AND NOT EXISTS (SELECT 1 FROM callback_center.refunds x
                            WHERE x.payment_id = pay.payment_id AND x.status = 'SUCCESS')) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB060',
            MESSAGE = format('order "%s" has no paid payment to refund', request_refund.p_order_id),
            DETAIL = CASE WHEN pay.payment_id IS NULL THEN 'The order has no payment.'
                          ELSE format('Its payment is %s.', pay.status) END,
            HINT = CASE WHEN pay.status IN ('REFUND_REQUIRED', 'REFUNDED')
                        THEN 'Money that came after the order closed is refunded as a late payment (see callback_center.late_payments).'
                        ELSE 'Only a paid payment can be refunded.' END;
    END IF;
    -- Under the payment's lock: a concurrent request for the same payment
    -- waits here and then counts this one.
    SELECT coalesce(sum(x.amount_cents), 0) INTO taken FROM callback_center.refunds x
     WHERE x.payment_id = pay.payment_id AND x.status <> 'FAILED';
    IF taken + request_refund.p_amount_cents > pay.amount_cents THEN
        RAISE EXCEPTION USING ERRCODE = 'CB061',
            MESSAGE = format('refund of %s cents exceeds what is left to refund of order "%s"',
                             request_refund.p_amount_cents, request_refund.p_order_id),
            DETAIL = format('Paid %s cents; %s refunded or being refunded; %s left.',
                            pay.amount_cents, taken, pay.amount_cents - taken),
            HINT = 'Refunds of a payment, failed ones aside, sum to at most what was paid.';
    END IF;

    r := NULL;
    r.refund_id := request_refund.p_refund_id;
    r.order_id := o.order_id;
    r.payment_id := pay.payment_id;
    r.provider := pay.provider;
    r.provider_txn_id := pay.provider_txn_id;
    r.amount_cents := request_refund.p_amount_cents;
    r.total_cents := pay.amount_cents;
    r.currency := o.currency;
    r.reason := request_refund.p_reason;
    r := callback_center._refund_create(r);
    RETURN QUERY SELECT r.refund_id, r.status, r.mode, r.amount_cents, true;
END
$$;

-- ------------------------------------------------------------------------
-- Answers
-- ------------------------------------------------------------------------

-- A full refund of an order that was not fulfilled gives back what the
-- order holds: the order moves confirmed -> refunded, the stock comes
-- back through restore_stock (the compensation the timeout close uses;
-- it gives a refunded order its stock, once) and the order's coupon is
-- available again (used -> available, or unfrozen if it was still
-- frozen).  The caller holds the order's lock.
CREATE FUNCTION callback_center._refund_return_holds(o callback_center.orders)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center.apply_event('callback_center.orders', 'status', o.order_id, 'refund');
    PERFORM count(*) FROM callback_center.restore_stock(o.order_id);
    IF o.coupon_id IS NOT NULL
       AND NOT callback_center.unfreeze_coupon(o.coupon_id, o.order_id) THEN
        UPDATE callback_center.coupons k
           SET status = 'available', biz_id = NULL, updated_at = now()
         WHERE k.coupon_id = o.coupon_id AND k.status = 'used' AND k.biz_id = o.order_id;
    END IF;
END
$$;

-- Checks an answer's shape (the adapters and the channel parsers build
-- it): 22023 otherwise.
CREATE FUNCTION callback_center._refund_check_answer(refund_id text, answer jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF jsonb_typeof(answer) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a refund answer must be a JSON object';
    END IF;
    IF answer ? 'refund_id' AND answer->>'refund_id' IS DISTINCT FROM _refund_check_answer.refund_id THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('the answer is about refund "%s", not "%s"',
                             answer->>'refund_id', _refund_check_answer.refund_id);
    END IF;
    IF coalesce(answer->>'status', '') NOT IN ('success', 'processing', 'failed', 'unknown') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid refund answer status "%s"', coalesce(answer->>'status', '(none)')),
            DETAIL = 'The status is success, processing, failed or unknown.';
    END IF;
    IF jsonb_typeof(answer->'amount_cents') NOT IN ('number', 'null')
       OR (jsonb_typeof(answer->'amount_cents') = 'number'
           AND (answer->>'amount_cents') !~ '^[0-9]{1,18}$') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'the answer''s amount_cents must be a non-negative integer or null';
    END IF;
    IF jsonb_typeof(answer->'provider_refund_id') NOT IN ('string', 'null')
       OR jsonb_typeof(answer->'error') NOT IN ('string', 'null') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'the answer''s provider_refund_id and error must be strings or null';
    END IF;
    IF octet_length(answer->>'provider_refund_id') > 200 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'the answer''s provider_refund_id is longer than 200 bytes';
    END IF;
END
$$;

-- A late payment's money went back: the late payment becomes refunded
-- and a payment holding that transaction moves REFUND_REQUIRED ->
-- REFUNDED.  The caller holds the order's and the payment's locks.
CREATE FUNCTION callback_center._late_payment_refunded(lp_id bigint)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    lp callback_center.late_payments;
BEGIN
    SELECT * INTO lp FROM callback_center.late_payments l WHERE l.id = lp_id FOR UPDATE;
    IF lp.status IS DISTINCT FROM 'refund_required' THEN
        RETURN false;
    END IF;
    UPDATE callback_center.late_payments l SET status = 'refunded', refunded_at = now()
     WHERE l.id = lp.id;
    IF EXISTS (SELECT 1 FROM callback_center.payments p
                WHERE p.provider_txn_id = lp.provider_txn_id AND p.status = 'REFUND_REQUIRED') THEN
        PERFORM callback_center.apply_event('callback_center.payments', 'status',
            (SELECT p.payment_id FROM callback_center.payments p
              WHERE p.provider_txn_id = lp.provider_txn_id), 'refund');
    END IF;
    RETURN true;
END
$$;

-- The one owner of refund status changes.  answer is {"refund_id",
-- "status": success | processing | failed | unknown, "provider_refund_id",
-- "amount_cents", "error"} (doc/refunds.md); whoever brought it (the
-- synchronous answer, a notification, a status query, an administrator).
-- Under the order's, the payment's and the refund's row locks:
--   success on an open refund: SUCCESS (emits refund.succeeded); the
--     payment and the order's pay status move to REFUNDED / refunded when
--     the successful refunds add up to the payment, else to
--     PARTIALLY_REFUNDED / partially_refunded; an order refunded in full
--     and not fulfilled gives back its stock and coupon
--     (_refund_return_holds); a late payment becomes refunded.  Outcome
--     succeeded.  When the answer names an amount other than the
--     refund's, nothing moves: amount_mismatch (refund.amount_mismatch
--     emitted).
--   failed on an open refund: FAILED (emits refund.failed), its amount
--     refundable again.  Outcome failed.
--   processing: PENDING -> PROCESSING; unknown: no move; either way the
--     refund is queried again later (next_query_at).  Outcome processing
--     or unknown.
--   on a finished refund: the same verdict again only fills in a missing
--     provider_refund_id (already_applied); processing or unknown change
--     nothing (already_final); the opposite verdict changes nothing and
--     emits refund.conflict (conflict), for people.
-- Returns the outcome.  42704 when the refund does not exist, 22023 for a
-- malformed answer.
CREATE FUNCTION callback_center._apply_refund_answer(refund_id text, answer jsonb)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.refunds;
    o callback_center.orders;
    pay callback_center.payments;
    verdict text;
    prid text;
    amount bigint;
    refunded bigint;
BEGIN
    PERFORM callback_center._require(_apply_refund_answer.refund_id, 'refund_id');
    PERFORM callback_center._require(answer, 'answer');
    PERFORM callback_center._refund_check_answer(_apply_refund_answer.refund_id, answer);
    verdict := answer->>'status';
    prid := nullif(answer->>'provider_refund_id', '');
    amount := (answer->>'amount_cents')::bigint;

    SELECT x.order_id INTO o.order_id FROM callback_center.refunds x WHERE x.refund_id = _apply_refund_answer.refund_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('refund "%s" does not exist', _apply_refund_answer.refund_id);
    END IF;
    -- The lock order of every payment path: order, payment, refund.
    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = o.order_id FOR UPDATE;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;
    SELECT * INTO r FROM callback_center.refunds x WHERE x.refund_id = _apply_refund_answer.refund_id FOR UPDATE;

    IF r.status IN ('SUCCESS', 'FAILED') THEN
        IF (verdict = 'success' AND r.status = 'SUCCESS') OR (verdict = 'failed' AND r.status = 'FAILED') THEN
            IF r.provider_refund_id IS NULL AND prid IS NOT NULL THEN
                UPDATE callback_center.refunds x SET provider_refund_id = prid, updated_at = now()
                 WHERE x.refund_id = r.refund_id;
            END IF;
            RETURN 'already_applied';
        ELSIF verdict IN ('success', 'failed') THEN
            PERFORM callback_center.enqueue('refund.conflict', r.order_id,
                jsonb_build_object('refund_id', r.refund_id, 'order_id', r.order_id,
                                   'provider', r.provider, 'status', r.status, 'answer', answer));
            RETURN 'conflict';
        END IF;
        RETURN 'already_final';
    END IF;

    IF verdict = 'success' THEN
        IF amount IS NOT NULL AND amount <> r.amount_cents THEN
            UPDATE callback_center.refunds x
               SET error = format('the provider reports %s cents refunded, not %s', amount, r.amount_cents),
                   updated_at = now()
             WHERE x.refund_id = r.refund_id;
            PERFORM callback_center.enqueue('refund.amount_mismatch', r.order_id,
                jsonb_build_object('refund_id', r.refund_id, 'order_id', r.order_id,
                                   'provider', r.provider, 'expected_cents', r.amount_cents,
                                   'received_cents', amount));
            RETURN 'amount_mismatch';
        END IF;
        UPDATE callback_center.refunds x
           SET status = 'SUCCESS', provider_refund_id = coalesce(x.provider_refund_id, prid),
               error = NULL, next_query_at = NULL, finished_at = now(), updated_at = now()
         WHERE x.refund_id = r.refund_id;
        IF r.late_payment_id IS NOT NULL THEN
            PERFORM callback_center._late_payment_refunded(r.late_payment_id);
            RETURN 'succeeded';
        END IF;
        SELECT coalesce(sum(x.amount_cents), 0) INTO refunded FROM callback_center.refunds x
         WHERE x.payment_id = pay.payment_id AND x.status = 'SUCCESS';
        IF refunded >= pay.amount_cents THEN
            IF pay.status IN ('PAID', 'PARTIALLY_REFUNDED') THEN
                PERFORM callback_center.apply_event('callback_center.payments', 'status',
                                                    pay.payment_id, 'refund');
            END IF;
            IF o.pay_status IN ('paid', 'partially_refunded') THEN
                PERFORM callback_center.apply_event('callback_center.orders', 'pay_status',
                                                    o.order_id, 'refund');
            END IF;
            IF o.status = 'confirmed' THEN
                PERFORM callback_center._refund_return_holds(o);
            END IF;
        ELSE
            IF pay.status = 'PAID' THEN
                PERFORM callback_center.apply_event('callback_center.payments', 'status',
                                                    pay.payment_id, 'partial_refund');
            END IF;
            IF o.pay_status = 'paid' THEN
                PERFORM callback_center.apply_event('callback_center.orders', 'pay_status',
                                                    o.order_id, 'partial_refund');
            END IF;
        END IF;
        RETURN 'succeeded';
    ELSIF verdict = 'failed' THEN
        UPDATE callback_center.refunds x
           SET status = 'FAILED', provider_refund_id = coalesce(x.provider_refund_id, prid),
               error = coalesce(answer->>'error', 'the provider refused the refund'),
               next_query_at = NULL, finished_at = now(), updated_at = now()
         WHERE x.refund_id = r.refund_id;
        RETURN 'failed';
    END IF;

    -- processing or unknown: still open, asked again later.
    UPDATE callback_center.refunds x
       SET status = CASE WHEN verdict = 'processing' THEN 'PROCESSING' ELSE x.status END,
           provider_refund_id = coalesce(x.provider_refund_id, prid),
           error = coalesce(answer->>'error', x.error),
           next_query_at = CASE WHEN x.mode = 'api'
                                THEN now() + callback_center._refund_backoff(x.queries) END,
           updated_at = now()
     WHERE x.refund_id = r.refund_id;
    RETURN verdict;
END
$$;

-- A provider's refund notification, verified and recorded by
-- payment_callback (the channel parsers read it: verdict refund_success,
-- refund_failed or refund_processing, our refund id, the provider's refund
-- id, the amount when the notification carries this refund's own), made
-- an answer for _apply_refund_answer.  What the provider got wrong is an
-- outcome, not an error (the notification is acknowledged and recorded
-- with it): unknown_refund (no such refund: made at the provider, not
-- here; reconciliation shows it), provider_mismatch (the refund is
-- another provider's).
CREATE FUNCTION callback_center._apply_refund_notification(
    provider text, refund_id text, provider_refund_id text,
    amount_cents bigint, verdict text, event_type text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    owner text;
BEGIN
    SELECT x.provider INTO owner FROM callback_center.refunds x WHERE x.refund_id = _apply_refund_notification.refund_id;
    IF NOT FOUND THEN
        RETURN 'unknown_refund';
    END IF;
    IF owner IS DISTINCT FROM _apply_refund_notification.provider THEN
        RETURN 'provider_mismatch';
    END IF;
    RETURN callback_center._apply_refund_answer(_apply_refund_notification.refund_id,
        jsonb_build_object('refund_id', _apply_refund_notification.refund_id,
                           'status', CASE _apply_refund_notification.verdict WHEN 'refund_success' THEN 'success'
                                                    WHEN 'refund_failed' THEN 'failed'
                                                    ELSE 'processing' END,
                           'provider_refund_id', _apply_refund_notification.provider_refund_id,
                           'amount_cents', _apply_refund_notification.amount_cents,
                           'error', CASE WHEN _apply_refund_notification.verdict <> 'refund_success'
                                         THEN format('notification %s', _apply_refund_notification.event_type) END));
END
$$;

-- ------------------------------------------------------------------------
-- Manual mode, late payments, follow-up queries
-- ------------------------------------------------------------------------

-- Records what a provider did with a refund (admin): for refunds of a
-- provider with no API endpoint (manual mode), or any open refund that
-- was settled at the provider's console.  status is success, failed or
-- processing.  Goes through _apply_refund_answer and returns its outcome.
CREATE FUNCTION callback_center.record_refund_outcome(refund_id text, status text,
    provider_refund_id text DEFAULT NULL, error text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require_key(record_refund_outcome.refund_id, 'refund_id', 64);
    PERFORM callback_center._require(record_refund_outcome.status, 'status');
    IF record_refund_outcome.status NOT IN ('success', 'failed', 'processing') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid refund status "%s"', record_refund_outcome.status),
            DETAIL = 'The status is success, failed or processing.';
    END IF;
    RETURN callback_center._apply_refund_answer(record_refund_outcome.refund_id,
        jsonb_build_object('refund_id', record_refund_outcome.refund_id,
                           'status', record_refund_outcome.status,
                           'provider_refund_id', record_refund_outcome.provider_refund_id,
                           'error', record_refund_outcome.error));
END
$$;

-- The refund of a late payment, created if it has none (refund id
-- "late_<id>", the whole amount, to the provider transaction that
-- brought the money; mode NULL: api or manual by the provider's
-- endpoint, 'manual': settled by the caller at once, nothing sent), under
-- the order's, the payment's and the late payment's locks.  Returns its
-- refund id; NULL when the late payment's amount is unknown (nothing to
-- ask for).
CREATE FUNCTION callback_center._late_refund(lp_id bigint, mode text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    lp callback_center.late_payments;
    o callback_center.orders;
    r callback_center.refunds;
BEGIN
    SELECT * INTO lp FROM callback_center.late_payments l WHERE l.id = lp_id;
    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = lp.order_id FOR UPDATE;
    PERFORM 1 FROM callback_center.payments x WHERE x.order_id = lp.order_id FOR UPDATE;
    SELECT * INTO lp FROM callback_center.late_payments l WHERE l.id = lp_id FOR UPDATE;
    SELECT x.refund_id INTO r.refund_id FROM callback_center.refunds x
     WHERE x.late_payment_id = lp.id;
    IF r.refund_id IS NOT NULL OR NOT (lp.amount_cents > 0) THEN
        RETURN r.refund_id;
    END IF;
    r.refund_id := 'late_' || lp.id;
    r.order_id := lp.order_id;
    r.late_payment_id := lp.id;
    r.provider := lp.provider;
    r.provider_txn_id := lp.provider_txn_id;
    r.amount_cents := lp.amount_cents;
    r.total_cents := lp.amount_cents;
    r.currency := coalesce(o.currency, 'CNY');
    r.reason := 'late payment';
    r.mode := _late_refund.mode;
    r := callback_center._refund_create(r);
    RETURN r.refund_id;
END
$$;

-- The refund jobs, one bounded batch each (the jobs worker runs them every
-- round; they can be run by hand):
--   late payments: each late payment still refund_required and without a
--     refund gets one (_late_refund), unless callback_center.refund_late_payments
--     is off (then they wait for mark_refunded);
--   follow-up: each open refund of the API mode whose next_query_at has
--     come and whose last event to the provider is no longer in flight is
--     asked again: refund.query, or refund.request when none was ever
--     queued (its endpoint was disabled); the next one after
--     _refund_backoff(queries).
-- Rows locked by others are skipped.  Returns how many events were queued.
CREATE FUNCTION callback_center.refund_jobs(max_refunds integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.refunds;
    lp_id bigint;
    n integer := 0;
    sent boolean;
BEGIN
    PERFORM callback_center._require(max_refunds, 'max_refunds');
    IF max_refunds < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('max_refunds must be positive, got %s', max_refunds);
    END IF;
    IF coalesce(current_setting('callback_center.refund_late_payments', true), 'on')::boolean THEN
        -- Not locked here: _late_refund locks order, payment and late
        -- payment in the order every payment path takes, and looks again.
        FOR lp_id IN
            SELECT l.id FROM callback_center.late_payments l
             WHERE l.status = 'refund_required' AND l.amount_cents > 0
               AND NOT EXISTS (SELECT 1 FROM callback_center.refunds x WHERE x.late_payment_id = l.id)
             ORDER BY l.id
             LIMIT max_refunds
        LOOP
            IF callback_center._late_refund(lp_id) IS NOT NULL THEN
                n := n + 1;
            END IF;
        END LOOP;
    END IF;

    FOR r IN
        SELECT x.* FROM callback_center.refunds x
         WHERE x.status IN ('PENDING', 'PROCESSING') AND x.mode = 'api'
           AND x.next_query_at <= now()
           AND NOT EXISTS (
               SELECT 1 FROM callback_center.outbox ob
                 JOIN callback_center.providers p ON p.name = x.provider
                 JOIN callback_center.endpoints e ON e.name = p.query_endpoint AND e.id = ob.endpoint_id
                WHERE ob.aggregate_id = x.order_id AND ob.status IN ('pending', 'delivering')
                  AND ob.event_type IN ('refund.request', 'refund.query')
                  AND ob.payload->>'refund_id' = x.refund_id)
         ORDER BY x.next_query_at
         LIMIT max_refunds
           FOR UPDATE OF x SKIP LOCKED
    LOOP
        sent := callback_center._refund_send(r,
                    CASE WHEN r.queries = 0 AND NOT EXISTS (
                              SELECT 1 FROM callback_center.outbox ob
                               WHERE ob.aggregate_id = r.order_id AND ob.event_type = 'refund.request'
                                 AND ob.payload->>'refund_id' = r.refund_id)
                         THEN 'refund.request' ELSE 'refund.query' END);
        UPDATE callback_center.refunds x
           SET queries = x.queries + CASE WHEN sent THEN 1 ELSE 0 END,
               next_query_at = now() + callback_center._refund_backoff(x.queries + 1),
               updated_at = now()
         WHERE x.refund_id = r.refund_id;
        IF sent THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION callback_center._refund_backoff(integer),
    callback_center._refund_request_payload(callback_center.refunds),
    callback_center._refund_send(callback_center.refunds, text),
    callback_center._refund_create(callback_center.refunds),
    callback_center.request_refund(text, bigint, text, text),
    callback_center._refund_return_holds(callback_center.orders),
    callback_center._refund_check_answer(text, jsonb),
    callback_center._apply_refund_answer(text, jsonb),
    callback_center._apply_refund_notification(text, text, text, bigint, text, text),
    callback_center.record_refund_outcome(text, text, text, text),
    callback_center._late_refund(bigint, text),
    callback_center._late_payment_refunded(bigint),
    callback_center.refund_jobs(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.request_refund(text, bigint, text, text)
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.record_refund_outcome(text, text, text, text),
    callback_center.refund_jobs(integer)
    TO callback_center_admin;
-- The jobs worker runs it every round (as its owner: SECURITY DEFINER).
GRANT EXECUTE ON FUNCTION callback_center.refund_jobs(integer) TO callback_center_worker;
