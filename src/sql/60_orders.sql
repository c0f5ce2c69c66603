
-- Orders, payments and coupons: the business flows built from the kernel
-- (stock, state machines, inbound callbacks, outbox).  Plain SQL/PL/pgSQL:
-- each step is a call into the C kernel, so clarity wins here.

-- Coupons: available -> frozen (by an order) -> used, or back to available.
CREATE TABLE callback_center.coupons (
    coupon_id text PRIMARY KEY,
    user_id text,
    status text NOT NULL DEFAULT 'available',
    biz_id text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT coupons_holder CHECK ((status = 'available') = (biz_id IS NULL))
);
COMMENT ON TABLE callback_center.coupons IS
    'Coupons; biz_id is the order that froze or used it';

CREATE TABLE callback_center.orders (
    order_id text PRIMARY KEY,
    user_id text NOT NULL,
    items jsonb NOT NULL,
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    currency text NOT NULL DEFAULT 'CNY',
    coupon_id text,
    provider text,
    status text NOT NULL DEFAULT 'pending_confirmation',
    pay_status text NOT NULL DEFAULT 'unpaid',
    failure_reason text,
    pay_deadline timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE callback_center.orders IS
    'Orders: status follows machine "order", pay_status machine "order_pay"';

-- The timeout-close job looks orders up by deadline; only confirmed orders
-- still waiting for money are in the index, so it stays small.
CREATE INDEX orders_pay_deadline ON callback_center.orders (pay_deadline)
    WHERE status = 'confirmed' AND pay_status IN ('unpaid', 'paying');

CREATE TABLE callback_center.payments (
    payment_id text PRIMARY KEY,
    order_id text NOT NULL UNIQUE REFERENCES callback_center.orders,
    provider text,
    provider_txn_id text UNIQUE,
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    status text NOT NULL DEFAULT 'CREATED',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    paid_at timestamptz
);
COMMENT ON TABLE callback_center.payments IS
    'One payment per order; status follows machine "payment"';

-- Payments waiting for money are found by the time they started paying
-- (query_stuck_payments, 90_jobs.sql).
CREATE INDEX payments_paying ON callback_center.payments (updated_at)
    WHERE status = 'PAYING';
-- Reconciliation looks local payments up by provider and paid time
-- (85_recon.sql).
CREATE INDEX payments_provider_paid_at
    ON callback_center.payments (provider, paid_at) WHERE paid_at IS NOT NULL;

SELECT pg_catalog.pg_extension_config_dump('callback_center.coupons', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.orders', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.payments', '');

-- The coupon machine, and the machines on our own tables.
SELECT callback_center.create_state_machine('coupon', 'Coupon held by an order');
SELECT callback_center.add_state('coupon', 'available', true, false);
SELECT callback_center.add_state('coupon', 'frozen', false, false);
SELECT callback_center.add_state('coupon', 'used', false, true);
SELECT callback_center.add_transition('coupon', 'available', 'frozen', 'freeze');
SELECT callback_center.add_transition('coupon', 'frozen', 'used', 'use');
SELECT callback_center.add_transition('coupon', 'frozen', 'available', 'unfreeze');
UPDATE callback_center.state_machines SET builtin = true WHERE machine = 'coupon';
UPDATE callback_center.machine_states SET builtin = true WHERE machine = 'coupon';
UPDATE callback_center.transitions SET builtin = true WHERE machine = 'coupon';

-- Their events carry the whole row (payload_columns '{*}'): only the
-- admin reads outbox payloads.
SELECT callback_center.attach_state_machine('callback_center.coupons', 'status', 'coupon', 'coupon_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.orders', 'status', 'order', 'order_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.orders', 'pay_status', 'order_pay', 'order_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.payments', 'status', 'payment', 'payment_id', '{*}');

-- Callbacks follow state changes: these transitions emit outbox events.
SELECT callback_center.set_transition_emits('order', 'pending_confirmation', 'confirmed', '{order.placed}');
SELECT callback_center.set_transition_emits('order', 'pending_confirmation', 'failed', '{order.failed}');
SELECT callback_center.set_transition_emits('order', 'confirmed', 'closed', '{order.closed}');
SELECT callback_center.set_transition_emits('order_pay', 'unpaid', 'paid',
    '{merchant.erp_sync,settlement.split,user.notify}');
SELECT callback_center.set_transition_emits('order_pay', 'paying', 'paid',
    '{merchant.erp_sync,settlement.split,user.notify}');
SELECT callback_center.set_transition_emits('order_pay', 'unpaid', 'pay_failed', '{order.pay_failed}');
SELECT callback_center.set_transition_emits('order_pay', 'paying', 'pay_failed', '{order.pay_failed}');
SELECT callback_center.set_transition_emits('order_pay', 'paid', 'refunded', '{order.refunded}');

-- Issues a coupon, available.  Issuing an existing coupon id again for the
-- same user changes nothing, whatever the coupon's state (a retried admin
-- script must not give a used coupon back); for another user it is 23505.
CREATE FUNCTION callback_center.issue_coupon(coupon_id text, user_id text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    owner text;
BEGIN
    PERFORM callback_center._require_key(issue_coupon.coupon_id, 'coupon_id');
    IF issue_coupon.user_id IS NOT NULL THEN
        PERFORM callback_center._require_key(issue_coupon.user_id, 'user_id');
    END IF;
    INSERT INTO callback_center.coupons (coupon_id, user_id)
    VALUES (issue_coupon.coupon_id, issue_coupon.user_id)
    ON CONFLICT ON CONSTRAINT coupons_pkey DO NOTHING;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT k.user_id INTO owner FROM callback_center.coupons k
     WHERE k.coupon_id = issue_coupon.coupon_id;
    IF owner IS DISTINCT FROM issue_coupon.user_id THEN
        RAISE EXCEPTION USING ERRCODE = '23505',
            MESSAGE = format('coupon "%s" already exists for another user', issue_coupon.coupon_id),
            DETAIL = format('It was issued to %s.', coalesce('user "' || owner || '"', 'no user')),
            HINT = 'Coupon ids are unique; issue this one under a new id.';
    END IF;
END
$$;

-- Freezes a coupon for an order.  True when this call froze it, false when
-- that order already holds it; CB051 when it is missing or held elsewhere.
CREATE FUNCTION callback_center.freeze_coupon(coupon_id text, biz_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    c callback_center.coupons;
BEGIN
    PERFORM callback_center._require_key(freeze_coupon.coupon_id, 'coupon_id');
    PERFORM callback_center._require_key(freeze_coupon.biz_id, 'biz_id');
    SELECT * INTO c FROM callback_center.coupons k
     WHERE k.coupon_id = freeze_coupon.coupon_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB051',
            MESSAGE = format('coupon "%s" does not exist', freeze_coupon.coupon_id);
    END IF;
    IF c.status = 'frozen' AND c.biz_id = freeze_coupon.biz_id THEN
        RETURN false;
    END IF;
    IF c.status <> 'available' THEN
        RAISE EXCEPTION USING ERRCODE = 'CB051',
            MESSAGE = format('coupon "%s" is not available', c.coupon_id),
            DETAIL = format('It is %s by order "%s".', c.status, c.biz_id);
    END IF;
    UPDATE callback_center.coupons k
       SET status = 'frozen', biz_id = freeze_coupon.biz_id, updated_at = now()
     WHERE k.coupon_id = c.coupon_id;
    RETURN true;
END
$$;

-- Marks a coupon frozen by biz_id as used.  True when this call used it,
-- false when biz_id had already used it; CB051 otherwise (missing, free,
-- or held by another order, which is left as it is).
CREATE FUNCTION callback_center.use_coupon(coupon_id text, biz_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    c callback_center.coupons;
BEGIN
    PERFORM callback_center._require_key(use_coupon.coupon_id, 'coupon_id');
    PERFORM callback_center._require_key(use_coupon.biz_id, 'biz_id');
    SELECT * INTO c FROM callback_center.coupons k
     WHERE k.coupon_id = use_coupon.coupon_id FOR UPDATE;
    IF FOUND AND c.biz_id = use_coupon.biz_id THEN
        IF c.status = 'used' THEN
            RETURN false;
        END IF;
        UPDATE callback_center.coupons k SET status = 'used', updated_at = now()
         WHERE k.coupon_id = c.coupon_id;
        RETURN true;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'CB051',
        MESSAGE = format('coupon "%s" is not frozen by order "%s"',
                         use_coupon.coupon_id, use_coupon.biz_id),
        DETAIL = CASE WHEN NOT FOUND THEN 'No such coupon exists.'
                      WHEN c.biz_id IS NULL THEN 'It is available, held by no order.'
                      ELSE format('It is %s by another order.', c.status) END;
END
$$;

-- Gives a coupon back, once: true when this call unfroze it, false when it
-- was not frozen by biz_id (already unfrozen, used, someone else's, or no
-- such coupon: compensation paths call it without knowing which).
CREATE FUNCTION callback_center.unfreeze_coupon(coupon_id text, biz_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require_key(unfreeze_coupon.coupon_id, 'coupon_id');
    PERFORM callback_center._require_key(unfreeze_coupon.biz_id, 'biz_id');
    UPDATE callback_center.coupons k
       SET status = 'available', biz_id = NULL, updated_at = now()
     WHERE k.coupon_id = unfreeze_coupon.coupon_id
       AND k.status = 'frozen' AND k.biz_id = unfreeze_coupon.biz_id;
    RETURN FOUND;
END
$$;

-- What place_order returns for an order that already existed (placed false)
-- or that this call placed (placed true).
CREATE FUNCTION callback_center._order_summary(id text, placed boolean)
RETURNS TABLE (order_id text, status text, pay_status text, payment_id text,
               pay_deadline timestamptz, failure_reason text, is_new boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT o.order_id, o.status, o.pay_status, p.payment_id, o.pay_deadline,
           o.failure_reason, _order_summary.placed
      FROM callback_center.orders o
      LEFT JOIN callback_center.payments p ON p.order_id = o.order_id
     WHERE o.order_id = _order_summary.id
$$;
REVOKE ALL ON FUNCTION callback_center._order_summary(text, boolean) FROM PUBLIC;

-- Places an order in one transaction: records it pending confirmation,
-- deducts the stock of every item and freezes the coupon (all or nothing;
-- only the coupon's owner, or anyone for a coupon issued to no user),
-- confirms it (emitting order.placed) and creates its payment.  Short stock
-- or an unavailable coupon is an outcome, not an error: the order is
-- recorded as failed with the reason (emitting order.failed) and nothing is
-- held.  Calling it again with the same order_id returns the order as it
-- is, changing nothing.  A provider must be registered (CB033); keys are
-- bounded (_require_key).
CREATE FUNCTION callback_center.place_order(
    p_order_id text,
    p_user_id text,
    p_items jsonb,
    p_amount_cents bigint,
    p_coupon_id text DEFAULT NULL,
    p_provider text DEFAULT NULL)
RETURNS TABLE (
    order_id text,
    status text,
    pay_status text,
    payment_id text,
    pay_deadline timestamptz,
    failure_reason text,
    is_new boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    timeout interval := current_setting('callback_center.pay_timeout')::interval;
    reason text;
BEGIN
    PERFORM callback_center._require_key(place_order.p_order_id, 'order_id');
    PERFORM callback_center._require_key(place_order.p_user_id, 'user_id');
    PERFORM callback_center._require(place_order.p_items, 'items');
    PERFORM callback_center._require(place_order.p_amount_cents, 'amount_cents');
    IF place_order.p_coupon_id IS NOT NULL THEN
        PERFORM callback_center._require_key(place_order.p_coupon_id, 'coupon_id');
    END IF;
    IF place_order.p_provider IS NOT NULL THEN
        PERFORM callback_center._require_provider(place_order.p_provider);
    END IF;
    IF place_order.p_amount_cents < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('amount_cents must not be negative, got %s', place_order.p_amount_cents);
    END IF;
    IF jsonb_typeof(place_order.p_items) <> 'array' OR jsonb_array_length(place_order.p_items) = 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'items must be a non-empty JSON array',
            HINT = 'Pass [{"sku": "A", "qty": 1}, ...].';
    END IF;

    -- Serialise calls for one order id, then look: a repeat (or a call
    -- that waited for a concurrent first one) returns the order as it is.
    -- Not INSERT ... ON CONFLICT: BEFORE INSERT triggers (state history)
    -- would fire for a row that is then skipped.
    PERFORM pg_advisory_xact_lock(hashtextextended('callback_center.order:' || place_order.p_order_id, 0));
    IF EXISTS (SELECT 1 FROM callback_center.orders o WHERE o.order_id = place_order.p_order_id) THEN
        RETURN QUERY SELECT * FROM callback_center._order_summary(place_order.p_order_id, false);
        RETURN;
    END IF;
    INSERT INTO callback_center.orders
           (order_id, user_id, items, amount_cents, coupon_id, provider, pay_deadline)
    VALUES (place_order.p_order_id, place_order.p_user_id, place_order.p_items,
            place_order.p_amount_cents, place_order.p_coupon_id, place_order.p_provider,
            now() + timeout);

    BEGIN
        PERFORM callback_center.deduct_stock(place_order.p_order_id, place_order.p_items);
        IF place_order.p_coupon_id IS NOT NULL THEN
            -- A coupon is its owner's: another user's order cannot hold it
            -- (one issued to no user is anyone's).
            IF EXISTS (SELECT 1 FROM callback_center.coupons k
                        WHERE k.coupon_id = place_order.p_coupon_id
                          AND k.user_id <> place_order.p_user_id) THEN
                RAISE EXCEPTION USING ERRCODE = 'CB051',
                    MESSAGE = format('coupon "%s" belongs to another user', place_order.p_coupon_id);
            END IF;
            PERFORM callback_center.freeze_coupon(place_order.p_coupon_id, place_order.p_order_id);
        END IF;
    EXCEPTION WHEN SQLSTATE 'CB001' OR SQLSTATE 'CB051' THEN
        -- The subtransaction is gone: no stock taken, no coupon held.
        reason := SQLERRM;
    END;

    -- The order was inserted above, pending_confirmation, under the lock:
    -- confirm and fail are its legal events (pending_confirmation ->
    -- confirmed / failed, the only transitions to those states), so the
    -- state is set directly rather than through apply_event; the machine's
    -- trigger still checks the move, records it and emits.  The row is
    -- read back as it is left, for the answer.
    IF reason IS NOT NULL THEN
        UPDATE callback_center.orders o
           SET failure_reason = reason, updated_at = now(), status = 'failed'
         WHERE o.order_id = place_order.p_order_id
        RETURNING o.order_id, o.status, o.pay_status, o.pay_deadline, o.failure_reason
             INTO place_order.order_id, place_order.status, place_order.pay_status,
                  place_order.pay_deadline, place_order.failure_reason;
    ELSE
        UPDATE callback_center.orders o SET status = 'confirmed'
         WHERE o.order_id = place_order.p_order_id
        RETURNING o.order_id, o.status, o.pay_status, o.pay_deadline, o.failure_reason
             INTO place_order.order_id, place_order.status, place_order.pay_status,
                  place_order.pay_deadline, place_order.failure_reason;
        INSERT INTO callback_center.payments AS p (payment_id, order_id, provider, amount_cents)
        VALUES ('pay_' || place_order.p_order_id, place_order.p_order_id, place_order.p_provider,
                place_order.p_amount_cents)
        RETURNING p.payment_id INTO place_order.payment_id;
    END IF;
    place_order.is_new := true;
    RETURN NEXT;
END
$$;

-- The user went to the cashier: payment CREATED -> PAYING and the order's
-- pay status unpaid -> paying.  Returns the payment id.  A repeat while the
-- payment is PAYING (the user came back to the cashier) returns the same id
-- and moves nothing; a different provider replaces the recorded one (the
-- user switched channels).  Any other payment state is CB010 from the
-- machine.  CB033 for a provider that is not registered.
CREATE FUNCTION callback_center.start_payment(order_id text, provider text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    pay callback_center.payments;
BEGIN
    PERFORM callback_center._require_key(start_payment.order_id, 'order_id');
    PERFORM callback_center._require_provider(start_payment.provider);
    SELECT * INTO pay FROM callback_center.payments p
     WHERE p.order_id = start_payment.order_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB050',
            MESSAGE = format('order "%s" has no payment', start_payment.order_id),
            HINT = 'Only confirmed orders have a payment.';
    END IF;
    IF pay.provider IS DISTINCT FROM start_payment.provider THEN
        UPDATE callback_center.payments p SET provider = start_payment.provider, updated_at = now()
         WHERE p.payment_id = pay.payment_id;
    END IF;
    IF pay.status = 'PAYING' THEN
        RETURN pay.payment_id;
    END IF;
    PERFORM callback_center.apply_event('callback_center.payments', 'status', pay.payment_id, 'submit');
    PERFORM callback_center.apply_event('callback_center.orders', 'pay_status', pay.order_id, 'pay');
    RETURN pay.payment_id;
END
$$;

-- Reads a provider's notification into (event_id, event_type, txn_id,
-- order_id, amount_cents, verdict, currency).  verdict is 'success', 'failure'
-- (terminal: the order's payment is over), 'attempt_failed' (one attempt
-- failed, the customer may try again: nothing moves) or NULL for event
-- types we do not act on.  Acted-on events must carry a transaction and an
-- order id (22023); others need not.  event_id is Stripe's evt_ id (the
-- Standard Webhooks message id is a header, not in the body).  currency
-- is the message's (data.currency, Stripe's object currency), NULL when it
-- carries none.  See doc/orders.md for the event types of each scheme.
CREATE FUNCTION callback_center._parse_payment_body(scheme text, body text,
    OUT txn_id text, OUT order_id text, OUT amount_cents bigint, OUT verdict text,
    OUT event_id text, OUT event_type text, OUT currency text)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ev jsonb;
    obj jsonb;
BEGIN
    BEGIN
        ev := body::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION USING ERRCODE = '22P02', MESSAGE = 'payment callback body is not valid JSON';
    END;
    IF jsonb_typeof(ev) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'payment callback body is not a JSON object';
    END IF;
    event_type := ev->>'type';
    IF scheme = 'stripe' THEN
        event_id := ev->>'id';
        obj := ev->'data'->'object';
        txn_id := obj->>'id';
        order_id := obj->'metadata'->>'order_id';
        currency := obj->>'currency';
        -- One event type means money: payment_intent.succeeded.  charge.*
        -- events describe the same money again and are ignored, so that a
        -- payment is never applied twice under two ids (pi_ and ch_).
        verdict := CASE event_type
            WHEN 'payment_intent.succeeded' THEN 'success'
            WHEN 'payment_intent.payment_failed' THEN 'attempt_failed'
            WHEN 'payment_intent.canceled' THEN 'failure' END;
        amount_cents := (CASE WHEN verdict = 'success'
                              THEN coalesce(obj->>'amount_received', obj->>'amount')
                              ELSE obj->>'amount' END)::bigint;
        IF event_id IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = 'payment callback body lacks an event id',
                DETAIL = format('Scheme stripe, event type %s.', coalesce(event_type, '(none)'));
        END IF;
    ELSE
        obj := ev->'data';
        txn_id := obj->>'txn_id';
        order_id := obj->>'order_id';
        amount_cents := (obj->>'amount_cents')::bigint;
        currency := obj->>'currency';
        verdict := CASE event_type WHEN 'payment.succeeded' THEN 'success'
                                   WHEN 'payment.failed' THEN 'failure' END;
    END IF;
    IF verdict IS NOT NULL AND (txn_id IS NULL OR order_id IS NULL) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'payment callback body lacks a transaction id or an order id',
            DETAIL = format('Scheme %s, event type %s.', scheme, event_type);
    END IF;
END
$$;

-- Money the provider took for an order that could no longer take it (closed
-- by timeout, failed, or paid by another transaction): kept here, once per
-- provider transaction, until it is refunded.  source says who brought the
-- news: a callback, an active query or reconciliation.
CREATE TABLE callback_center.late_payments (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider        text NOT NULL,
    provider_txn_id text NOT NULL,
    order_id        text NOT NULL,
    payment_id      text,
    amount_cents    bigint,
    order_status    text NOT NULL,
    pay_status      text NOT NULL,
    payment_status  text,
    source          text NOT NULL CHECK (source IN ('callback', 'query', 'reconciliation')),
    status          text NOT NULL DEFAULT 'refund_required'
                    CHECK (status IN ('refund_required', 'refunded')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    refunded_at     timestamptz,
    UNIQUE (provider, provider_txn_id)
);
COMMENT ON TABLE callback_center.late_payments IS
    'Payments that arrived for orders that could not take them; each needs a refund';
CREATE INDEX late_payments_open ON callback_center.late_payments (order_id)
    WHERE status = 'refund_required';

SELECT pg_catalog.pg_extension_config_dump('callback_center.late_payments', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.late_payments_id_seq', '');
GRANT SELECT ON callback_center.late_payments TO callback_center_admin;

-- Whose word counts, the one rule for every verdict (a callback of any
-- scheme, the answer to an active query, a reconciliation line): under the
-- order's and then the payment's row lock (held to the end of the
-- transaction, so that nothing can change what was checked before the
-- verdict is applied), returns refusal NULL when the verdict may be
-- applied, else unknown_order (no such order), provider_mismatch (the
-- payment is not provider's: the payment's provider, set by place_order
-- or start_payment, or the order's when it has no payment; a payment with
-- none takes nobody's verdict), amount_mismatch (a success whose amount is
-- missing or differs from the payment's, or a failure naming another
-- amount) or currency_mismatch (a currency, when the message carries one,
-- that is not the order's, compared in upper case).  A non-terminal
-- failure (attempt_failed) is checked for its provider only; a message
-- with no verdict, for the order's existence only.  payment_provider,
-- expected_cents and expected_currency say what was expected.
CREATE FUNCTION callback_center._payment_check(
    provider text, order_id text, amount_cents bigint, currency text, verdict text,
    OUT refusal text, OUT payment_provider text, OUT expected_cents bigint,
    OUT expected_currency text)
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    o callback_center.orders;
    pay callback_center.payments;
BEGIN
    SELECT * INTO o FROM callback_center.orders x
     WHERE x.order_id = _payment_check.order_id FOR UPDATE;
    IF NOT FOUND THEN
        refusal := 'unknown_order';
        RETURN;
    END IF;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;
    payment_provider := CASE WHEN pay.payment_id IS NOT NULL THEN pay.provider ELSE o.provider END;
    expected_cents := coalesce(pay.amount_cents, o.amount_cents);
    expected_currency := o.currency;
    IF _payment_check.verdict IS NULL THEN
        RETURN;
    END IF;
    -- Another provider's word on a payment, signed or not, is no word at all.
    IF payment_provider IS DISTINCT FROM _payment_check.provider THEN
        refusal := 'provider_mismatch';
    ELSIF _payment_check.verdict = 'attempt_failed' THEN
        -- It moves nothing, so its amount cannot pay or fail anything.
        RETURN;
    ELSIF (_payment_check.verdict = 'success'
           AND _payment_check.amount_cents IS DISTINCT FROM expected_cents)
          OR (_payment_check.verdict <> 'success' AND _payment_check.amount_cents <> expected_cents) THEN
        refusal := 'amount_mismatch';
    ELSIF upper(_payment_check.currency) <> o.currency THEN
        refusal := 'currency_mismatch';
    END IF;
END
$$;

-- Moves an order's payment by a verdict _payment_check accepted, in the
-- same transaction (its row locks held): through their machines (which
-- emit the follow-ups), returning the outcome: paid, pay_failed,
-- refund_required (money for an order that cannot take it: recorded once
-- per transaction in late_payments, payment.refund_required emitted, the
-- order never reopened), already_applied (this transaction already paid
-- this payment), attempt_failed (a non-terminal failure: nothing moves) or
-- ignored (no verdict, or a failure for an order no longer waiting).
CREATE FUNCTION callback_center._move_payment(
    provider text, txn_id text, order_id text, amount_cents bigint,
    verdict text, source text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    o callback_center.orders;
    pay callback_center.payments;
BEGIN
    SELECT * INTO o FROM callback_center.orders x
     WHERE x.order_id = _move_payment.order_id FOR UPDATE;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;
    IF _move_payment.verdict IS NULL THEN
        RETURN 'ignored';
    END IF;
    IF _move_payment.verdict = 'attempt_failed' THEN
        -- The customer may retry on the same transaction: the payment stays
        -- open until a success, a terminal failure or the timeout close.
        RETURN 'attempt_failed';
    END IF;

    IF _move_payment.verdict = 'success' THEN
        IF pay.provider_txn_id = _move_payment.txn_id THEN
            -- Told twice of the same money (a callback and a query answer).
            RETURN CASE WHEN pay.status IN ('REFUND_REQUIRED', 'REFUNDED')
                        THEN 'refund_required' ELSE 'already_applied' END;
        END IF;
        IF o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying') THEN
            IF pay.status IN ('CREATED', 'PAYING') THEN
                -- Event success from CREATED or PAYING is the move to PAID
                -- (the machine's only way there): set with the money in one
                -- UPDATE; the trigger still checks, records and emits.
                UPDATE callback_center.payments x
                   SET provider = _move_payment.provider, provider_txn_id = _move_payment.txn_id,
                       paid_at = now(), updated_at = now(), status = 'PAID'
                 WHERE x.payment_id = pay.payment_id;
            ELSE
                UPDATE callback_center.payments x
                   SET provider = _move_payment.provider, provider_txn_id = _move_payment.txn_id,
                       paid_at = now(), updated_at = now()
                 WHERE x.payment_id = pay.payment_id;
                -- Any other state is the machine's error (CB010; 22004
                -- without a payment).
                PERFORM callback_center.apply_event('callback_center.payments', 'status',
                                                    pay.payment_id, 'success');
            END IF;
            IF o.coupon_id IS NOT NULL THEN
                PERFORM callback_center.use_coupon(o.coupon_id, o.order_id);
            END IF;
            -- Event pay_success from unpaid or paying, checked above under
            -- the row lock: the move to paid.
            UPDATE callback_center.orders x SET pay_status = 'paid' WHERE x.order_id = o.order_id;
            RETURN 'paid';
        END IF;
        -- Late money: kept once per transaction, never reopening the order.
        INSERT INTO callback_center.late_payments
               (provider, provider_txn_id, order_id, payment_id, amount_cents,
                order_status, pay_status, payment_status, source)
        VALUES (_move_payment.provider, _move_payment.txn_id, o.order_id, pay.payment_id,
                coalesce(_move_payment.amount_cents, pay.amount_cents),
                o.status, o.pay_status, pay.status, _move_payment.source)
        ON CONFLICT ON CONSTRAINT late_payments_provider_provider_txn_id_key DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'refund_required';
        END IF;
        IF pay.status IN ('CLOSED', 'FAILED') AND pay.provider_txn_id IS NULL THEN
            UPDATE callback_center.payments x
               SET provider = _move_payment.provider, provider_txn_id = _move_payment.txn_id,
                   paid_at = now(), updated_at = now()
             WHERE x.payment_id = pay.payment_id;
            PERFORM callback_center.apply_event('callback_center.payments', 'status',
                                                pay.payment_id, 'late_success');
        END IF;
        PERFORM callback_center.enqueue('payment.refund_required', o.order_id,
            jsonb_build_object('order_id', o.order_id, 'txn_id', _move_payment.txn_id,
                               'provider', _move_payment.provider,
                               'amount_cents', coalesce(_move_payment.amount_cents, pay.amount_cents),
                               'order_status', o.status, 'pay_status', o.pay_status,
                               'source', _move_payment.source));
        RETURN 'refund_required';
    END IF;

    IF o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying') THEN
        PERFORM callback_center.apply_event('callback_center.payments', 'status', pay.payment_id, 'fail');
        PERFORM callback_center.apply_event('callback_center.orders', 'pay_status', o.order_id, 'pay_fail');
        PERFORM callback_center.apply_event('callback_center.orders', 'status', o.order_id, 'close');
        PERFORM callback_center.restore_stock(o.order_id);
        IF o.coupon_id IS NOT NULL THEN
            PERFORM callback_center.unfreeze_coupon(o.coupon_id, o.order_id);
        END IF;
        RETURN 'pay_failed';
    END IF;
    RETURN 'ignored';
END
$$;


-- Applies a verdict that no provider is waiting an answer for (the answer
-- to an active query, a reconciliation line): _payment_check, then
-- _move_payment.  A refused verdict is flagged instead, for people:
-- provider_mismatch emits payment.provider_mismatch, amount_mismatch and
-- currency_mismatch emit payment.amount_mismatch; nothing moves.  CB050
-- when the order does not exist.  (payment_callback calls the two itself:
-- a provider's refused notification is answered with its failure answer
-- and recorded nowhere.)
CREATE FUNCTION callback_center._apply_payment_result(
    provider text, txn_id text, order_id text, amount_cents bigint,
    currency text, verdict text, source text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    chk record;
BEGIN
    chk := callback_center._payment_check(_apply_payment_result.provider,
                                          _apply_payment_result.order_id,
                                          _apply_payment_result.amount_cents,
                                          _apply_payment_result.currency,
                                          _apply_payment_result.verdict);
    IF chk.refusal = 'unknown_order' THEN
        RAISE EXCEPTION USING ERRCODE = 'CB050',
            MESSAGE = format('order "%s" does not exist', _apply_payment_result.order_id),
            DETAIL = format('Transaction %s from provider %s.', _apply_payment_result.txn_id,
                            _apply_payment_result.provider),
            HINT = 'Nothing was recorded; the provider will deliver it again.';
    ELSIF chk.refusal = 'provider_mismatch' THEN
        PERFORM callback_center.enqueue('payment.provider_mismatch', _apply_payment_result.order_id,
            jsonb_build_object('order_id', _apply_payment_result.order_id,
                               'txn_id', _apply_payment_result.txn_id,
                               'provider', _apply_payment_result.provider,
                               'payment_provider', chk.payment_provider,
                               'verdict', _apply_payment_result.verdict,
                               'source', _apply_payment_result.source));
        RETURN chk.refusal;
    ELSIF chk.refusal IS NOT NULL THEN
        PERFORM callback_center.enqueue('payment.amount_mismatch', _apply_payment_result.order_id,
            jsonb_build_object('order_id', _apply_payment_result.order_id,
                               'txn_id', _apply_payment_result.txn_id,
                               'provider', _apply_payment_result.provider,
                               'expected_cents', chk.expected_cents,
                               'received_cents', _apply_payment_result.amount_cents,
                               'expected_currency', chk.expected_currency,
                               'received_currency', _apply_payment_result.currency,
                               'source', _apply_payment_result.source));
        RETURN chk.refusal;
    END IF;
    RETURN callback_center._move_payment(_apply_payment_result.provider,
                                         _apply_payment_result.txn_id,
                                         _apply_payment_result.order_id,
                                         _apply_payment_result.amount_cents,
                                         _apply_payment_result.verdict,
                                         _apply_payment_result.source);
END
$$;

-- Marks a late payment refunded (admin, once the money went back by
-- hand): through the refund path, so that the late payment's refund (the
-- automatic one, or one created here in manual mode, refund id
-- "late_<id>", sending nothing) becomes SUCCESS and emits
-- refund.succeeded, the late_payments row becomes refunded and a payment
-- holding that transaction moves REFUND_REQUIRED -> REFUNDED
-- (_apply_refund_answer).  When the late payment's refund had failed at
-- the provider, the late payment is marked refunded beside it.  True when
-- this call marked it, false when it already was; 42704 when there is no
-- such late payment.
CREATE FUNCTION callback_center.mark_refunded(provider text, provider_txn_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    lp callback_center.late_payments;
    rid text;
BEGIN
    PERFORM callback_center._require_key(mark_refunded.provider, 'provider', 63);
    PERFORM callback_center._require_key(mark_refunded.provider_txn_id, 'provider_txn_id');
    SELECT * INTO lp FROM callback_center.late_payments l
     WHERE l.provider = mark_refunded.provider AND l.provider_txn_id = mark_refunded.provider_txn_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('no late payment %s from provider "%s"',
                             mark_refunded.provider_txn_id, mark_refunded.provider),
            HINT = 'See callback_center.late_payments.';
    END IF;
    -- Locks order, payment and late payment, in the order of every payment path.
    rid := callback_center._late_refund(lp.id, 'manual');
    SELECT * INTO lp FROM callback_center.late_payments l WHERE l.id = lp.id;
    IF lp.status = 'refunded' THEN
        RETURN false;
    END IF;
    IF rid IS NOT NULL
       AND callback_center._apply_refund_answer(rid,
               '{"status": "success", "error": "marked refunded by hand"}') = 'succeeded' THEN
        RETURN true;
    END IF;
    RETURN callback_center._late_payment_refunded(lp.id);
END
$$;

-- A payment notification in one call: verify the signature, record it once
-- (keyed by the provider's message id: Stripe's event id, the Standard
-- Webhooks webhook-id header, a channel's notification id), move payment
-- and order, emit the follow-ups (through the transitions' emits), and
-- return the acknowledgement to send back.  A repeat returns the first
-- answer and changes nothing.  The payment row guards the money itself: a
-- second message about a transaction already applied is already_applied,
-- and success on an order that can no longer be paid is kept and emits
-- payment.refund_required.  Event types we do not act on are recorded and
-- acknowledged (ignored).  What the provider gets wrong is an answer,
-- never an error: a bad, stale or malformed signature (401), an unknown
-- order (404), a verdict for another provider's payment or with another
-- amount or currency (400: _payment_check, the one rule) record nothing;
-- a signed body that cannot be read is recorded and refused once (400).
-- Errors are for misuse: NULL arguments (22004), an unknown provider
-- (CB033), no key loaded (55000).  See doc/orders.md and doc/inbound.md.
CREATE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    cb_type text := 'payment:' || payment_callback.provider;
    scheme text;
    channel boolean;
    msg record;
    msg_id text;
    rec record;
    result text;
    refusal text;
    sig_failure text;
    ack text := '{"received":true}';
    ch record;
    refused text;
    rec_payload text := payment_callback.body;
BEGIN
    PERFORM callback_center._require(payment_callback.provider, 'provider');
    PERFORM callback_center._require(payment_callback.headers, 'headers');
    PERFORM callback_center._require(payment_callback.body, 'body');
    SELECT p.scheme INTO scheme FROM callback_center.providers p
     WHERE p.name = payment_callback.provider;
    channel := scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay', 'unionpay');
    -- Payment channels (45_channels.sql: wechatpay_v3, wechatpay_v2, alipay, unionpay):
    -- verified and decoded by _channel_parse; whatever the provider got
    -- wrong is answered in its own format, recording nothing.  Its
    -- acknowledgement replaces ack.
    IF channel THEN
        SELECT * INTO ch FROM callback_center._channel_parse(scheme, payment_callback.provider,
                                                             payment_callback.headers,
                                                             payment_callback.body);
        IF NOT ch.ok THEN
            RETURN QUERY SELECT ch.http_status, ch.response_body, false, ch.failure;
            RETURN;
        END IF;
        SELECT ch.txn_id, ch.order_id, ch.amount_cents, ch.verdict,
               ch.msg_id AS event_id, ch.event_type, ch.currency
          INTO msg;
        msg_id := ch.msg_id;
        ack := ch.response_body;
        rec_payload := ch.payload;
    ELSE
        -- Verification comes first: a bad signature is answered 401 and
        -- records nothing (verify_signature raises CB033 for an unknown
        -- provider, which is misuse).  A signed body we cannot read (not
        -- JSON, \u0000, an amount beyond bigint, ids missing) will never
        -- read better: it is recorded and refused once, with 400, and
        -- every redelivery gets that answer.
        BEGIN
            PERFORM callback_center.verify_signature(payment_callback.provider,
                                                     payment_callback.headers,
                                                     payment_callback.body);
            msg := callback_center._parse_payment_body(scheme, payment_callback.body);
        EXCEPTION
            WHEN SQLSTATE 'CB030' THEN sig_failure := 'invalid_signature';
            WHEN SQLSTATE 'CB031' THEN sig_failure := 'signature_expired';
            WHEN SQLSTATE 'CB032' THEN sig_failure := 'malformed_signature';
            WHEN data_exception THEN refusal := format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE);
        END;
        IF sig_failure IS NOT NULL THEN
            RETURN QUERY SELECT 401,
                format('{"received":false,"reason":"%s"}', replace(sig_failure, '_', ' ')),
                false, sig_failure;
            RETURN;
        END IF;
        IF scheme = 'stripe' AND refusal IS NULL THEN
            msg_id := msg.event_id;
        ELSIF scheme = 'stripe' THEN
            -- An unreadable Stripe body has no event id: keyed by its hash.
            msg_id := 'sha256:' || encode(sha256(convert_to(payment_callback.body, 'UTF8')), 'hex');
        ELSE
            -- verify_signature found exactly one, whatever its spelling.
            SELECT h.value INTO msg_id FROM jsonb_each_text(payment_callback.headers) h
             WHERE lower(h.key) = 'webhook-id';
        END IF;
    END IF;

    -- Whose word counts, under the order's and the payment's row locks
    -- (held until commit, so that what was checked stays true while the
    -- message is recorded and applied; a duplicate delivered at the same
    -- time waits here for the first).  A refusal is the provider's failure
    -- answer and records nothing, so that the provider keeps the message
    -- failing (and reconciliation finds the money: doc/inbound.md): an
    -- unknown order (the order may be in a database being restored, or the
    -- message for another system), another provider's payment, another
    -- amount or currency.  A message recorded before keeps its first
    -- answer, even if the payment has changed hands since.
    -- (msg is unassigned when refusal is set.)
    IF refusal IS NULL THEN
        -- (A refund notification, verdict refund_*, is checked against its
        -- refund by _apply_refund_notification, which answers a mismatch
        -- as an outcome.)
        IF msg.verdict IS NOT NULL AND msg.verdict NOT LIKE 'refund\_%' THEN
            refused := (callback_center._payment_check(payment_callback.provider, msg.order_id,
                                                       msg.amount_cents, msg.currency,
                                                       msg.verdict)).refusal;
        END IF;
    END IF;
    IF refused IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM callback_center.callback_record r
                        WHERE r.biz_id = msg_id AND r.callback_type = cb_type) THEN
        IF channel THEN
            RETURN QUERY SELECT a.http_status, a.response_body, false, refused
              FROM callback_center._channel_answer(scheme, false,
                       CASE WHEN refused = 'unknown_order' THEN 404 ELSE 400 END,
                       replace(refused, '_', ' ')) a;
        ELSE
            RETURN QUERY SELECT CASE WHEN refused = 'unknown_order' THEN 404 ELSE 400 END,
                                format('{"received":false,"reason":"%s"}', replace(refused, '_', ' ')),
                                false, refused;
        END IF;
        RETURN;
    END IF;

    SELECT * INTO rec FROM callback_center.record_callback(msg_id, cb_type, rec_payload);
    IF NOT rec.is_first THEN
        IF channel AND (rec.payload_mismatch OR rec.status <> 2) THEN
            -- Payment channels: the other repeats in the provider's format.
            RETURN QUERY SELECT a.http_status, a.response_body, false, o.outcome
              FROM (SELECT CASE WHEN rec.payload_mismatch THEN 'payload_mismatch'
                                WHEN rec.status = 1 THEN 'in_progress' ELSE 'failed' END) o(outcome),
                   callback_center._channel_answer(scheme, false,
                       CASE WHEN rec.payload_mismatch THEN 409 WHEN rec.status = 1 THEN 503 ELSE 500 END,
                       replace(o.outcome, '_', ' ')) a;
        ELSIF rec.payload_mismatch THEN
            RETURN QUERY SELECT 409, '{"received":false,"reason":"payload differs from the first delivery"}',
                                false, 'payload_mismatch';
        ELSIF rec.status = 2 THEN
            RETURN QUERY SELECT coalesce((rec.result->>'http_status')::int, 200),
                                coalesce(rec.result->>'body', ack), false,
                                coalesce(rec.result->>'outcome', 'processed');
        ELSIF rec.status = 1 THEN
            -- Recorded but not finished (by a handler that records and
            -- processes in separate transactions): the provider must come back.
            RETURN QUERY SELECT 503, '{"received":false,"reason":"in progress"}', false, 'in_progress';
        ELSE
            -- Failed with no retries left (see reclaim_stale_callbacks): not
            -- acknowledged, so the provider keeps it visible as failing.
            RETURN QUERY SELECT 500, '{"received":false,"reason":"processing failed"}', false, 'failed';
        END IF;
        RETURN;
    END IF;

    IF refusal IS NOT NULL THEN
        PERFORM callback_center.complete_callback(msg_id, cb_type, true,
            jsonb_build_object('http_status', 400,
                               'body', jsonb_build_object('received', false,
                                                          'reason', 'unreadable payment message')::text,
                               'outcome', 'rejected', 'error', refusal));
        RETURN QUERY SELECT 400, '{"reason": "unreadable payment message", "received": false}', true, 'rejected';
        RETURN;
    END IF;
    IF msg.verdict IS NULL THEN
        result := 'ignored';
    ELSIF msg.verdict LIKE 'refund\_%' THEN
        -- A channel's refund notification (45_channels.sql): order_id is
        -- our refund id, txn_id the provider's refund id (62_refunds.sql).
        result := callback_center._apply_refund_notification(payment_callback.provider,
                                                             msg.order_id, msg.txn_id,
                                                             msg.amount_cents, msg.verdict,
                                                             msg.event_type);
    ELSE
        result := callback_center._move_payment(payment_callback.provider, msg.txn_id,
                                                msg.order_id, msg.amount_cents, msg.verdict,
                                                'callback');
    END IF;

    PERFORM callback_center.complete_callback(msg_id, cb_type, true,
        jsonb_build_object('http_status', 200, 'body', ack, 'outcome', result,
                           'order_id', msg.order_id, 'txn_id', msg.txn_id,
                           'event_type', msg.event_type));
    RETURN QUERY SELECT 200, ack, true, result;
END
$$;

-- payment_callback with the body as the bytes the provider posted: a form
-- in GBK or GB18030 (Alipay's charset, UnionPay's encoding) need not be
-- valid text in the database's encoding.  For alipay and unionpay the
-- bytes beyond printable ASCII are %-escaped, so that the form parser
-- reads back exactly those bytes and decodes them per the form's own
-- charset; every other scheme's body is UTF-8 JSON or XML, and bytes that
-- are not UTF-8 are answered 400 malformed_body, recording nothing.  Then
-- as payment_callback(text, jsonb, text).
CREATE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body bytea)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    scheme text;
    t text;
BEGIN
    PERFORM callback_center._require(payment_callback.provider, 'provider');
    PERFORM callback_center._require(payment_callback.headers, 'headers');
    PERFORM callback_center._require(payment_callback.body, 'body');
    PERFORM callback_center._require_provider(payment_callback.provider);
    SELECT p.scheme INTO scheme FROM callback_center.providers p
     WHERE p.name = payment_callback.provider;
    IF scheme IN ('alipay', 'unionpay') THEN
        t := callback_center._form_escape(payment_callback.body);
    ELSE
        BEGIN
            t := convert_from(payment_callback.body, 'UTF8');
        EXCEPTION WHEN character_not_in_repertoire THEN
            IF scheme IN ('wechatpay_v3', 'wechatpay_v2') THEN
                RETURN QUERY SELECT a.http_status, a.response_body, false, 'malformed_body'
                  FROM callback_center._channel_answer(scheme, false, 400, 'malformed body') a;
            ELSE
                RETURN QUERY SELECT 400, '{"received":false,"reason":"malformed body"}', false,
                                    'malformed_body';
            END IF;
            RETURN;
        END;
    END IF;
    RETURN QUERY SELECT * FROM callback_center.payment_callback(payment_callback.provider,
                                                               payment_callback.headers, t);
END
$$;

REVOKE ALL ON FUNCTION callback_center.issue_coupon(text, text),
    callback_center.freeze_coupon(text, text),
    callback_center.use_coupon(text, text),
    callback_center.unfreeze_coupon(text, text),
    callback_center.place_order(text, text, jsonb, bigint, text, text),
    callback_center.start_payment(text, text),
    callback_center._parse_payment_body(text, text),
    callback_center._payment_check(text, text, bigint, text, text),
    callback_center._move_payment(text, text, text, bigint, text, text),
    callback_center._apply_payment_result(text, text, text, bigint, text, text, text),
    callback_center.mark_refunded(text, text),
    callback_center.payment_callback(text, jsonb, text),
    callback_center.payment_callback(text, jsonb, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.mark_refunded(text, text) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.issue_coupon(text, text),
    callback_center.freeze_coupon(text, text),
    callback_center.use_coupon(text, text),
    callback_center.unfreeze_coupon(text, text),
    callback_center.place_order(text, text, jsonb, bigint, text, text),
    callback_center.start_payment(text, text),
    callback_center.payment_callback(text, jsonb, text),
    callback_center.payment_callback(text, jsonb, bytea)
    TO callback_center_app, callback_center_admin;
GRANT SELECT ON callback_center.orders, callback_center.payments, callback_center.coupons
    TO callback_center_app, callback_center_admin;
