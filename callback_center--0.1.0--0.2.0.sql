-- callback_center 0.1.0 -> 0.2.0, run by ALTER EXTENSION callback_center UPDATE.
--
-- The difference between the frozen callback_center--0.1.0.sql and what
-- src/sql/ installs today, written by hand as each change lands.  TAP test
-- 095_upgrade.pl checks that 0.1.0 plus this script gives a catalog equal to
-- a fresh install of 0.2.0, and that the data of 0.1.0 keeps working.
--
-- Rules for whoever adds to it:
--   * every function whose definition changed in src/sql/ is re-created here
--     (CREATE OR REPLACE, or DROP and CREATE when its signature changed),
--     with the same grants;
--   * new columns are added with ALTER TABLE ... ADD COLUMN, so in src/sql/
--     they go last in their CREATE TABLE (a fresh install and an upgraded one
--     keep the same column order);
--   * a C function whose behaviour needs the 0.2.0 schema gets a new C
--     symbol (name_v2); the old symbol stays in the library and refuses with
--     a hint to run this script, as pg_stat_statements does across versions.
\echo Use "ALTER EXTENSION callback_center UPDATE TO '0.2.0'" to load this file. \quit

-- State machines and restore: a restore loads rows as they are (the
-- trigger's new symbol lets COPY FROM by the table's owner or a superuser
-- through untouched), history records the session's role beside the
-- application's actor (session_role), attach_state_machine() scans existing
-- rows as the table's owner and takes payload_columns (emitted events carry
-- only the columns an attachment names; the built-in tables name the whole
-- row), the app role no longer reads outbox payloads, and replay_audit
-- records session_user.

ALTER TABLE callback_center.state_history ADD COLUMN session_role text;

CREATE OR REPLACE FUNCTION callback_center.fsm_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cc_fsm_trigger_v2'
LANGUAGE C;

CREATE OR REPLACE VIEW callback_center.state_machine_attachments AS
SELECT t.tgrelid::regclass AS table_name,
       a[2]::name AS state_column,
       a[1] AS machine,
       a[3]::name AS id_column,
       t.tgname AS trigger_name,
       a[4:]::name[] AS payload_columns
  FROM pg_catalog.pg_trigger t
  CROSS JOIN LATERAL callback_center._fsm_trigger_args(t.tgargs) AS a
 WHERE t.tgfoid = 'callback_center.fsm_trigger()'::pg_catalog.regprocedure
   AND t.tgnargs >= 3
   AND (t.tgtype & 2) <> 0;            -- TRIGGER_TYPE_BEFORE

CREATE FUNCTION callback_center._fsm_unknown_state(tbl regclass, state_column name,
                                                   states text[])
RETURNS text
AS 'MODULE_PATHNAME', 'cc_fsm_unknown_state'
LANGUAGE C;

DROP FUNCTION callback_center.attach_state_machine(regclass, name, text, name);
CREATE FUNCTION callback_center.attach_state_machine(
    tbl regclass,
    state_column name,
    machine text,
    id_column name DEFAULT 'id',
    payload_columns name[] DEFAULT '{}')
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    kind "char";
    state_type oid;
    existing record;
    bad text;
    col name;
    trigger_args text;
    trigger_name name;
    log_trigger_name name;
BEGIN
    IF tbl IS NULL OR state_column IS NULL OR machine IS NULL OR id_column IS NULL
       OR payload_columns IS NULL OR array_position(payload_columns, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'tbl, state_column, machine, id_column and payload_columns (and its elements) cannot be null';
    END IF;
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = tbl;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION USING ERRCODE = '42809',
            MESSAGE = format('"%s" is not a table', tbl);
    END IF;
    SELECT a.atttypid INTO state_type FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = state_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42703',
            MESSAGE = format('column "%s" of table %s does not exist', state_column, tbl);
    END IF;
    IF state_type NOT IN ('text'::regtype, 'varchar'::regtype) THEN
        RAISE EXCEPTION USING ERRCODE = '42804',
            MESSAGE = format('state column "%s" of table %s has type %s', state_column, tbl,
                             format_type(state_type, NULL)),
            DETAIL = 'A state column must be of type text or varchar.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = tbl AND a.attname = id_column
                      AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION USING ERRCODE = '42703',
            MESSAGE = format('column "%s" of table %s does not exist', id_column, tbl),
            HINT = 'Pass the column that identifies a row as id_column.';
    END IF;
    IF '*' = ANY (payload_columns) AND cardinality(payload_columns) > 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'payload column "*" (the whole row) cannot be listed with other columns';
    END IF;
    IF (SELECT count(DISTINCT c) FROM unnest(payload_columns) c) < cardinality(payload_columns) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'payload columns cannot repeat';
    END IF;
    FOREACH col IN ARRAY payload_columns LOOP
        CONTINUE WHEN col = '*';
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = tbl AND a.attname = col
                          AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION USING ERRCODE = '42703',
                MESSAGE = format('column "%s" of table %s does not exist', col, tbl),
                HINT = 'payload_columns names the columns emitted events carry.';
        END IF;
    END LOOP;
    PERFORM callback_center._fsm_require_machine(machine);

    SELECT * INTO existing FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = attach_state_machine.state_column;
    IF FOUND THEN
        IF existing.machine <> machine OR existing.id_column <> id_column THEN
            RAISE EXCEPTION USING ERRCODE = '42710',
                MESSAGE = format('column "%s" of table %s already has state machine "%s" attached',
                                 state_column, tbl, existing.machine),
                HINT = 'Detach it first with callback_center.detach_state_machine().';
        END IF;
        IF existing.payload_columns = payload_columns THEN
            RETURN false;
        END IF;
        -- Only the payload changes: the pair is made again.
        PERFORM callback_center.detach_state_machine(tbl, state_column);
    ELSE
        -- Rows already there must be in states the machine knows.
        bad := callback_center._fsm_unknown_state(tbl, state_column,
                   ARRAY(SELECT s.state FROM callback_center.machine_states s
                          WHERE s.machine = attach_state_machine.machine));
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'CB011',
                MESSAGE = format('unknown state "%s" in state machine "%s"', bad, machine),
                DETAIL = format('Table %s already has rows in that state.', tbl);
        END IF;
    END IF;

    SELECT string_agg(quote_literal(a), ', ' ORDER BY n) INTO trigger_args
      FROM unnest(ARRAY[machine, state_column::text, id_column::text]
                  || payload_columns::text[]) WITH ORDINALITY AS u(a, n);
    trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column);
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%s)',
                   trigger_name, state_column, tbl, trigger_args);
    log_trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column || '_log');
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%s)',
                   log_trigger_name, state_column, tbl, trigger_args);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.detach_state_machine(
    tbl regclass,
    state_column name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    att record;
    trigger_name name;
BEGIN
    IF tbl IS NULL OR state_column IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'tbl and state_column cannot be null';
    END IF;
    SELECT * INTO att
      FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = detach_state_machine.state_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('no state machine is attached to column "%s" of table %s',
                             state_column, tbl);
    END IF;
    -- The BEFORE trigger and its AFTER twin: same function, same arguments.
    FOR trigger_name IN
        SELECT t.tgname FROM pg_trigger t
         WHERE t.tgrelid = tbl
           AND t.tgfoid = 'callback_center.fsm_trigger()'::regprocedure
           AND t.tgnargs >= 3
           AND (callback_center._fsm_trigger_args(t.tgargs))[1:3]
               = ARRAY[att.machine, state_column::text, att.id_column::text]
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION callback_center._fsm_unknown_state(regclass, name, text[]),
    callback_center.attach_state_machine(regclass, name, text, name, name[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center._fsm_unknown_state(regclass, name, text[]),
    callback_center.attach_state_machine(regclass, name, text, name, name[])
    TO callback_center_admin;

-- The built-in tables' events keep carrying the whole row.
SELECT callback_center.attach_state_machine('callback_center.coupons', 'status', 'coupon', 'coupon_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.orders', 'status', 'order', 'order_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.orders', 'pay_status', 'order_pay', 'order_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.payments', 'status', 'payment', 'payment_id', '{*}');

-- Machines users attached under 0.1.0 keep emitting the whole row, as they
-- did: what receivers of their events read must not change with the update.
-- New attachments name their payload columns (none by default).
DO $$
DECLARE
    att record;
BEGIN
    FOR att IN
        SELECT a.table_name, a.state_column, a.machine, a.id_column
          FROM callback_center.state_machine_attachments a
          JOIN pg_catalog.pg_class c ON c.oid = a.table_name
         WHERE c.relnamespace <> 'callback_center'::pg_catalog.regnamespace
    LOOP
        PERFORM callback_center.attach_state_machine(att.table_name, att.state_column,
                                                     att.machine, att.id_column, '{*}');
    END LOOP;
END
$$;

REVOKE SELECT ON callback_center.outbox FROM callback_center_app;
GRANT SELECT (id, endpoint_id, event_type, aggregate_id, status, attempts, next_attempt_at,
              created_at, delivered_at, last_http_status, last_error)
    ON callback_center.outbox TO callback_center_app;

ALTER TABLE callback_center.replay_audit ALTER COLUMN replayed_by SET DEFAULT session_user;

-- Orders, payments, TCC and sagas: a verdict (callback, active-query answer,
-- reconciliation line) applies only to a payment of the provider that
-- brought it, with amount and currency equal.

-- The parsed message carries its currency; the verdict takes it.
DROP FUNCTION callback_center._parse_payment_body(text, text);
CREATE OR REPLACE FUNCTION callback_center._parse_payment_body(scheme text, body text,
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
REVOKE ALL ON FUNCTION callback_center._parse_payment_body(text, text) FROM PUBLIC;
DROP FUNCTION callback_center._apply_payment_result(text, text, text, bigint, text, text);
CREATE OR REPLACE FUNCTION callback_center._apply_payment_result(
    p_provider text, p_txn_id text, p_order_id text, p_amount_cents bigint,
    p_currency text, p_verdict text, p_source text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    o callback_center.orders;
    pay callback_center.payments;
    owner text;
    expected bigint;
BEGIN
    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB050',
            MESSAGE = format('order "%s" does not exist', p_order_id),
            DETAIL = format('Transaction %s from provider %s.', p_txn_id, p_provider),
            HINT = 'Nothing was recorded; the provider will deliver it again.';
    END IF;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;

    IF p_verdict IS NULL THEN
        RETURN 'ignored';
    END IF;
    -- Whose payment it is: another provider's word on it, signed or not,
    -- is no word at all.
    owner := CASE WHEN pay.payment_id IS NOT NULL THEN pay.provider ELSE o.provider END;
    IF owner IS DISTINCT FROM p_provider THEN
        PERFORM callback_center.enqueue('payment.provider_mismatch', o.order_id,
            jsonb_build_object('order_id', o.order_id, 'txn_id', p_txn_id, 'provider', p_provider,
                               'payment_provider', owner, 'verdict', p_verdict,
                               'source', p_source));
        RETURN 'provider_mismatch';
    END IF;
    IF p_verdict = 'attempt_failed' THEN
        -- The customer may retry on the same transaction: the payment stays
        -- open until a success, a terminal failure or the timeout close.
        RETURN 'attempt_failed';
    END IF;
    expected := coalesce(pay.amount_cents, o.amount_cents);
    IF (p_verdict = 'success' AND p_amount_cents IS DISTINCT FROM expected)
       OR (p_verdict <> 'success' AND p_amount_cents <> expected)
       OR upper(p_currency) <> o.currency THEN
        PERFORM callback_center.enqueue('payment.amount_mismatch', o.order_id,
            jsonb_build_object('order_id', o.order_id, 'txn_id', p_txn_id, 'provider', p_provider,
                               'expected_cents', expected, 'received_cents', p_amount_cents,
                               'expected_currency', o.currency, 'received_currency', p_currency,
                               'source', p_source));
        RETURN 'amount_mismatch';
    END IF;

    IF p_verdict = 'success' THEN
        IF pay.provider_txn_id = p_txn_id THEN
            -- Told twice of the same money (a callback and a query answer).
            RETURN CASE WHEN pay.status IN ('REFUND_REQUIRED', 'REFUNDED')
                        THEN 'refund_required' ELSE 'already_applied' END;
        END IF;
        IF o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying') THEN
            UPDATE callback_center.payments x
               SET provider = p_provider, provider_txn_id = p_txn_id, paid_at = now(), updated_at = now()
             WHERE x.payment_id = pay.payment_id;
            PERFORM callback_center.apply_event('callback_center.payments', 'status', pay.payment_id, 'success');
            IF o.coupon_id IS NOT NULL THEN
                PERFORM callback_center.use_coupon(o.coupon_id, o.order_id);
            END IF;
            PERFORM callback_center.apply_event('callback_center.orders', 'pay_status', o.order_id, 'pay_success');
            RETURN 'paid';
        END IF;
        -- Late money: kept once per transaction, never reopening the order.
        INSERT INTO callback_center.late_payments
               (provider, provider_txn_id, order_id, payment_id, amount_cents,
                order_status, pay_status, payment_status, source)
        VALUES (p_provider, p_txn_id, o.order_id, pay.payment_id,
                coalesce(p_amount_cents, pay.amount_cents),
                o.status, o.pay_status, pay.status, p_source)
        ON CONFLICT (provider, provider_txn_id) DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'refund_required';
        END IF;
        IF pay.status IN ('CLOSED', 'FAILED') AND pay.provider_txn_id IS NULL THEN
            UPDATE callback_center.payments x
               SET provider = p_provider, provider_txn_id = p_txn_id, paid_at = now(), updated_at = now()
             WHERE x.payment_id = pay.payment_id;
            PERFORM callback_center.apply_event('callback_center.payments', 'status',
                                                pay.payment_id, 'late_success');
        END IF;
        PERFORM callback_center.enqueue('payment.refund_required', o.order_id,
            jsonb_build_object('order_id', o.order_id, 'txn_id', p_txn_id, 'provider', p_provider,
                               'amount_cents', coalesce(p_amount_cents, pay.amount_cents),
                               'order_status', o.status, 'pay_status', o.pay_status,
                               'source', p_source));
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
REVOKE ALL ON FUNCTION callback_center._apply_payment_result(text, text, text, bigint, text, text, text)
    FROM PUBLIC;
CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_provider text := payment_callback.provider;
    cb_type text := 'payment:' || p_provider;
    scheme text;
    msg record;
    msg_id text;
    rec record;
    result text;
    refusal text;
    ack constant text := '{"received":true}';
BEGIN
    PERFORM callback_center._require(p_provider, 'provider');
    PERFORM callback_center._require(payment_callback.headers, 'headers');
    PERFORM callback_center._require(payment_callback.body, 'body');
    -- Verification comes first: a bad signature raises and records nothing.
    PERFORM callback_center.verify_signature(p_provider, payment_callback.headers, payment_callback.body);
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = p_provider;
    -- A signed body we cannot read (not JSON, \u0000, an amount beyond
    -- bigint, ids missing) will never read better: it is recorded and
    -- refused once, with 400, and every redelivery gets that answer.  An
    -- exception here made the provider redeliver it forever.
    BEGIN
        msg := callback_center._parse_payment_body(scheme, payment_callback.body);
    EXCEPTION WHEN data_exception THEN
        refusal := format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE);
    END;
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

    SELECT * INTO rec FROM callback_center.record_callback(msg_id, cb_type, payment_callback.body);
    IF NOT rec.is_first THEN
        IF rec.payload_mismatch THEN
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
    ELSE
        result := callback_center._apply_payment_result(p_provider, msg.txn_id, msg.order_id,
                                                        msg.amount_cents, msg.currency, msg.verdict,
                                                        'callback');
    END IF;

    PERFORM callback_center.complete_callback(msg_id, cb_type, true,
        jsonb_build_object('http_status', 200, 'body', ack, 'outcome', result,
                           'order_id', msg.order_id, 'txn_id', msg.txn_id,
                           'event_type', msg.event_type));
    RETURN QUERY SELECT 200, ack, true, result;
END
$$;
CREATE OR REPLACE FUNCTION callback_center._apply_query_answer(query_id bigint, answer text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    q callback_center.payment_queries;
    scheme text;
    msg record;
    result text;
BEGIN
    SELECT * INTO q FROM callback_center.payment_queries x WHERE x.id = query_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('payment query %s does not exist', query_id);
    END IF;
    IF q.status <> 'sent' THEN
        RETURN q.outcome;
    END IF;
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = q.provider;
    BEGIN
        msg := callback_center._parse_payment_body(scheme, coalesce(answer, ''));
    EXCEPTION WHEN data_exception THEN
        UPDATE callback_center.payment_queries x
           SET status = 'failed', answer = _apply_query_answer.answer, outcome = 'bad_answer',
               error = SQLERRM, finished_at = now()
         WHERE x.id = q.id;
        RETURN 'bad_answer';
    END;
    IF msg.order_id IS DISTINCT FROM q.order_id THEN
        UPDATE callback_center.payment_queries x
           SET status = 'failed', answer = _apply_query_answer.answer, outcome = 'bad_answer',
               error = format('the answer is about order "%s", not "%s"', msg.order_id, q.order_id),
               finished_at = now()
         WHERE x.id = q.id;
        RETURN 'bad_answer';
    END IF;
    result := callback_center._apply_payment_result(q.provider, msg.txn_id, msg.order_id,
                                                    msg.amount_cents, msg.currency, msg.verdict,
                                                    'query');
    UPDATE callback_center.payment_queries x
       SET status = 'answered', answer = _apply_query_answer.answer, outcome = result,
           finished_at = now()
     WHERE x.id = q.id;
    RETURN result;
END
$$;
CREATE OR REPLACE FUNCTION callback_center.reconcile(channel text, bill_date date,
    grace interval DEFAULT '30 minutes')
RETURNS TABLE (kind text, count bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_channel text := reconcile.channel;
    p_date date := reconcile.bill_date;
    day_start timestamptz;
    day_end timestamptz;
    run_at timestamptz := clock_timestamp();
    r record;
    applied_ids bigint[];
    o callback_center.orders;
    pay callback_center.payments;
    outcome text;
BEGIN
    PERFORM callback_center._require_key(p_channel, 'channel', 63);
    PERFORM callback_center._require(p_date, 'bill_date');
    PERFORM callback_center._require(reconcile.grace, 'grace');
    IF reconcile.grace < interval '0' OR reconcile.grace >= interval '12 hours' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('grace must be between 0 and 12 hours, got %s', reconcile.grace);
    END IF;
    day_start := p_date::timestamptz;
    day_end := (p_date + 1)::timestamptz;

    -- Serialise runs for one (channel, bill_date).
    PERFORM pg_advisory_xact_lock(hashtextextended(
        'callback_center.recon:' || p_channel || ':' || p_date::text, 0));

    -- One pass: statement lines of the day FULL JOIN local payments of the
    -- provider paid in the day widened by grace at both edges, matched on
    -- the provider's transaction id.  Lines left unmatched look further:
    -- the same transaction id paid on any other day (x: the provider booked
    -- it across midnight from us, or later; compared like a match), or the
    -- unpaid payment of the line's order (u).  Local payments left
    -- unmatched are differences only when paid in the day and not on a
    -- neighbouring day's statement (that day's run compares them); grace is
    -- how long before or after midnight one may still turn up on the
    -- neighbour's statement, so those wait as pending_grace.  Lines already
    -- settled by an earlier run are left alone.
    WITH s AS (
        SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status
          FROM callback_center.provider_statement st
         WHERE st.channel = p_channel AND st.bill_date = p_date
           AND NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                            WHERE d.channel = p_channel AND d.bill_date = p_date
                              AND d.provider_txn_id = st.provider_txn_id
                              AND d.resolution = 'applied')
    ), l AS (
        SELECT p.payment_id, p.order_id, p.provider_txn_id, p.amount_cents, p.status, p.paid_at
          FROM callback_center.payments p
         WHERE p.provider = p_channel
           AND p.paid_at >= day_start - reconcile.grace
           AND p.paid_at < day_end + reconcile.grace
           AND p.provider_txn_id IS NOT NULL
    ), j AS (
        SELECT s.provider_txn_id AS s_txn, s.order_id AS s_order, s.amount_cents AS s_amount,
               s.status AS s_status,
               l.provider_txn_id AS l_txn, l.order_id AS l_order, l.amount_cents AS l_amount,
               l.status AS l_status, l.paid_at AS l_paid_at
          FROM s FULL JOIN l ON l.provider_txn_id = s.provider_txn_id
    ), c AS (
        SELECT coalesce(j.s_txn, j.l_txn) AS txn,
               coalesce(j.s_order, j.l_order, x.order_id, u.order_id) AS order_id,
               j.s_amount, j.s_status,
               coalesce(j.l_amount, x.amount_cents, u.amount_cents) AS local_amount,
               coalesce(j.l_status, x.status, u.status) AS local_status,
               CASE
                 WHEN j.s_txn IS NOT NULL AND j.l_txn IS NOT NULL THEN
                   CASE WHEN j.s_amount <> j.l_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, j.l_status)
                             THEN 'status_mismatch' END
                 WHEN j.l_txn IS NOT NULL THEN
                   -- Local only; rows in the grace margins, and rows on a
                   -- neighbouring day's statement, are that day's to judge.
                   CASE WHEN j.l_paid_at >= day_start AND j.l_paid_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = p_channel
                                    AND n.bill_date IN (p_date - 1, p_date + 1)
                                    AND n.provider_txn_id = j.l_txn)
                        THEN 'missing_provider' END
                 WHEN x.payment_id IS NOT NULL THEN
                   CASE WHEN x.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, x.status)
                             THEN 'status_mismatch' END
                 WHEN u.payment_id IS NOT NULL THEN
                   CASE WHEN u.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, u.status)
                             THEN 'status_mismatch' END
                 ELSE 'missing_local'
               END AS kind,
               CASE
                 WHEN j.l_txn IS NOT NULL AND j.s_txn IS NULL THEN
                   CASE WHEN j.l_paid_at < day_start + reconcile.grace
                          OR j.l_paid_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN u.payment_id IS NOT NULL AND j.s_status = 'success'
                      AND u.amount_cents = j.s_amount
                      AND u.status IN ('CREATED', 'PAYING', 'CLOSED', 'FAILED') THEN 'applied'
                 ELSE 'flagged'
               END AS resolution,
               u.payment_id AS apply_payment_id
          -- Index probes for the unmatched lines only (LIMIT 1 keeps
          -- them per-row lookups, not hash joins over every payment).
          FROM j
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND p.provider_txn_id = j.s_txn
                   AND p.provider = p_channel
                 LIMIT 1) x ON true
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND x.payment_id IS NULL
                   AND p.order_id = j.s_order AND p.provider_txn_id IS NULL
                   AND p.provider = p_channel
                 LIMIT 1) u ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at)
        SELECT p_channel, p_date, c.txn, c.order_id,
               -- Known late money is a refund for people, whatever else
               -- differs; once refunded, the provider's refund agrees.
               CASE WHEN lp.status = 'refund_required' AND c.resolution <> 'applied'
                    THEN 'refund_required' ELSE c.kind END,
               c.s_amount, c.local_amount, c.s_status, c.local_status,
               CASE WHEN lp.status = 'refund_required' AND c.resolution = 'pending_grace'
                    THEN 'flagged' ELSE c.resolution END,
               run_at
          FROM c
          LEFT JOIN LATERAL (
                SELECT l.status FROM callback_center.late_payments l
                 WHERE l.provider = p_channel AND l.provider_txn_id = c.txn) lp ON true
         WHERE c.kind IS NOT NULL
           AND NOT (lp.status IS NOT DISTINCT FROM 'refunded' AND c.s_status = 'refund')
        ON CONFLICT (channel, bill_date, provider_txn_id, kind) DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.provider_txn_id, d.order_id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO applied_ids
      FROM ins;

    -- Differences an earlier run recorded that this run no longer finds.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = p_channel AND d.bill_date = p_date
       AND d.resolution NOT IN ('applied', 'resolved') AND d.checked_at <> run_at;

    -- Local payments a neighbouring day's run left waiting for a
    -- statement line that turned up on this day's statement: compared
    -- above, so no longer differences of that day.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = p_channel AND d.bill_date IN (p_date - 1, p_date + 1)
       AND d.kind = 'missing_provider' AND d.resolution = 'pending_grace'
       AND EXISTS (SELECT 1 FROM callback_center.provider_statement st
                    WHERE st.channel = p_channel AND st.bill_date = p_date
                      AND st.provider_txn_id = d.provider_txn_id);

    -- Settle what the provider was paid for and we were not told, through
    -- the same path as a callback (state machines, follow-up events; on an
    -- order that can no longer take the money, a late payment to refund).
    FOR r IN
        SELECT d.id, d.provider_txn_id, d.order_id, d.provider_amount
          FROM callback_center.recon_diffs d
         WHERE d.id = ANY (coalesce(applied_ids, '{}'))
         ORDER BY d.id
    LOOP
        SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = r.order_id FOR UPDATE;
        SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = r.order_id FOR UPDATE;
        IF pay.provider_txn_id IS NOT NULL THEN
            -- A callback got there first, after the pass read the row.
            UPDATE callback_center.recon_diffs d
               SET resolution = 'flagged',
                   note = format('payment took transaction %s meanwhile', pay.provider_txn_id)
             WHERE d.id = r.id;
            CONTINUE;
        END IF;
        outcome := callback_center._apply_payment_result(p_channel, r.provider_txn_id, r.order_id,
                                                         r.provider_amount, NULL, 'success',
                                                         'reconciliation');
        UPDATE callback_center.recon_diffs d
           SET kind = CASE outcome WHEN 'refund_required' THEN 'refund_required' ELSE d.kind END,
               resolution = CASE outcome WHEN 'paid' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome
                        WHEN 'paid' THEN 'payment marked paid'
                        WHEN 'refund_required'
                          THEN format('order is %s/%s: payment.refund_required emitted',
                                      o.status, o.pay_status)
                        ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    RETURN QUERY
        SELECT k.kind, count(d.id)
          FROM unnest(ARRAY['missing_local', 'missing_provider', 'amount_mismatch',
                            'status_mismatch', 'refund_required']) WITH ORDINALITY AS k(kind, ord)
          LEFT JOIN callback_center.recon_diffs d
                 ON d.channel = p_channel AND d.bill_date = p_date AND d.kind = k.kind
         GROUP BY k.kind, k.ord
         ORDER BY k.ord;
END
$$;

-- Sagas and TCC branches belong to the role that made them: created_by
-- (NULL for rows written by 0.1.0), _caller(), the owner checks.
ALTER TABLE callback_center.tcc_barrier ADD COLUMN created_by text;
ALTER TABLE callback_center.sagas ADD COLUMN created_by text;
COMMENT ON TABLE callback_center.saga_steps IS
    'Steps of a saga: action and compensation are SQL run with the rights of the saga''s creator, $1 = saga id';
CREATE OR REPLACE FUNCTION callback_center._caller()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT CASE WHEN pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) 'none'
                THEN session_user::text
                ELSE pg_catalog.current_setting('role') END;
$fn$;
REVOKE ALL ON FUNCTION callback_center._caller() FROM PUBLIC;
CREATE OR REPLACE FUNCTION callback_center.barrier(
    gid text,
    branch_id text,
    op text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    p_gid    ALIAS FOR $1;
    p_branch ALIAS FOR $2;
    p_op     ALIAS FOR $3;
    n        integer;
    outcome  text;
    me       text := callback_center._caller();
    owner    text;
BEGIN
    PERFORM callback_center._require_key(p_gid, 'gid');
    PERFORM callback_center._require_key(p_branch, 'branch_id');
    PERFORM callback_center._require(p_op, 'op');
    IF p_op NOT IN ('try', 'confirm', 'cancel') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('invalid barrier op "%s"', p_op),
            HINT = 'Use try, confirm or cancel.';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        'callback_center.tcc:' || p_gid || ':' || p_branch, 0));
    SELECT b.created_by INTO owner FROM callback_center.tcc_barrier AS b
     WHERE b.gid = p_gid AND b.branch_id = p_branch AND b.created_by IS NOT NULL
     LIMIT 1;
    IF owner IS DISTINCT FROM me AND owner IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('gid "%s" branch "%s" belongs to another role',
                                        p_gid, p_branch),
            DETAIL = pg_catalog.format('It was begun by role "%s"; this call acts for "%s".',
                                       owner, me),
            HINT = 'Each role confirms and cancels only its own branches.';
    END IF;
    IF p_op = 'cancel' THEN
        INSERT INTO callback_center.tcc_barrier AS b
               (gid, branch_id, op, written_by, last_outcome, created_by)
        VALUES (p_gid, p_branch, 'try', 'cancel', 'empty_compensation', me)
        ON CONFLICT ON CONSTRAINT tcc_barrier_pkey DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 1 THEN
            -- The try never ran; no cancel row can exist (a cancel always
            -- writes the try row first, in the same transaction).
            INSERT INTO callback_center.tcc_barrier
                   (gid, branch_id, op, written_by, last_outcome, created_by)
            VALUES (p_gid, p_branch, 'cancel', 'cancel', 'empty_compensation', me);
            RETURN 'empty_compensation';
        END IF;
    END IF;
    INSERT INTO callback_center.tcc_barrier AS b
           (gid, branch_id, op, written_by, last_outcome, created_by)
    VALUES (p_gid, p_branch, p_op, p_op, 'proceed', me)
    ON CONFLICT ON CONSTRAINT tcc_barrier_pkey DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 1 THEN
        RETURN 'proceed';
    END IF;
    -- The row was there (committed: ON CONFLICT waited for its writer).
    UPDATE callback_center.tcc_barrier AS b
       SET repeats = b.repeats + 1,
           last_outcome = CASE WHEN p_op = 'try' AND b.written_by = 'cancel'
                               THEN 'refused' ELSE 'duplicate' END,
           updated_at = pg_catalog.now()
     WHERE b.gid = p_gid AND b.branch_id = p_branch AND b.op = p_op
    RETURNING b.last_outcome INTO outcome;
    RETURN outcome;
END
$fn$;
COMMENT ON FUNCTION callback_center.barrier(text, text, text) IS
    'TCC/saga barrier: proceed, duplicate, empty_compensation or refused for (gid, branch, op)';

CREATE OR REPLACE FUNCTION callback_center.saga_start(saga_id text, steps jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    p_saga  ALIAS FOR $1;
    p_steps ALIAS FOR $2;
    bad     text;
BEGIN
    PERFORM callback_center._require_key(p_saga, 'saga_id');
    PERFORM callback_center._require(p_steps, 'steps');
    IF pg_catalog.jsonb_typeof(p_steps) <> 'array' OR pg_catalog.jsonb_array_length(p_steps) = 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'steps must be a non-empty JSON array',
            HINT = 'Pass [{"action": "SELECT ...", "compensation": "SELECT ..."}, ...].';
    END IF;
    SELECT e::text INTO bad
      FROM pg_catalog.jsonb_array_elements(p_steps) AS e
     WHERE pg_catalog.jsonb_typeof(e) <> 'object'
        OR pg_catalog.jsonb_typeof(e -> 'action') IS DISTINCT FROM 'string'
        OR pg_catalog.btrim(e ->> 'action') = ''
        OR pg_catalog.jsonb_typeof(e -> 'compensation') NOT IN ('string', 'null')
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('invalid saga step: %s', bad),
            DETAIL = 'Each step needs a non-empty "action" string; "compensation" is a string or null.';
    END IF;
    INSERT INTO callback_center.sagas (saga_id, created_by) VALUES (p_saga, callback_center._caller());
    INSERT INTO callback_center.saga_steps (saga_id, step_no, action, compensation)
    SELECT p_saga, e.n::integer, e.v ->> 'action', e.v ->> 'compensation'
      FROM pg_catalog.jsonb_array_elements(p_steps) WITH ORDINALITY AS e(v, n);
    RETURN pg_catalog.jsonb_array_length(p_steps);
END
$fn$;
COMMENT ON FUNCTION callback_center.saga_start(text, jsonb) IS
    'Declares a saga of ordered steps (action, compensation); returns the step count';

CREATE OR REPLACE FUNCTION callback_center._saga_lock(saga_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    st text;
    creator text;
BEGIN
    SELECT s.status, s.created_by INTO st, creator FROM callback_center.sagas AS s
     WHERE s.saga_id = _saga_lock.saga_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = pg_catalog.format('unknown saga "%s"', _saga_lock.saga_id),
            HINT = 'Declare it with callback_center.saga_start().';
    END IF;
    IF creator IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" has no recorded creator', _saga_lock.saga_id),
            DETAIL = 'It was declared before callback_center 0.2.0, which records who declares a saga.',
            HINT = 'A superuser who has read its steps sets callback_center.sagas.created_by to the role they may run as.';
    END IF;
    IF creator IS DISTINCT FROM callback_center._caller() THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" belongs to role "%s"', _saga_lock.saga_id, creator),
            DETAIL = 'A saga''s steps run only as the role that declared it.',
            HINT = pg_catalog.format('Run it as that role: SET ROLE %I, then saga_run().', creator);
    END IF;
    RETURN st;
END
$fn$;
CREATE OR REPLACE FUNCTION callback_center._saga_mark(
    saga_id text, step_no integer, new_status text, error text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
#variable_conflict use_variable
DECLARE
    p_saga   ALIAS FOR $1;
    p_step   ALIAS FOR $2;
    p_status ALIAS FOR $3;
    p_error  ALIAS FOR $4;
BEGIN
    PERFORM callback_center._saga_lock(p_saga);
    IF p_step IS NULL THEN
        UPDATE callback_center.sagas AS s
           SET status = p_status, last_error = COALESCE(p_error, s.last_error),
               updated_at = pg_catalog.now()
         WHERE s.saga_id = p_saga
           AND (s.status, p_status) IN (('running', 'completed'), ('running', 'compensating'),
                                        ('compensating', 'compensated'),
                                        ('compensating', 'compensating'));
    ELSE
        UPDATE callback_center.saga_steps AS t
           SET status = p_status, error = COALESCE(p_error, t.error),
               updated_at = pg_catalog.now()
         WHERE t.saga_id = p_saga AND t.step_no = p_step
           AND (t.status, p_status) IN (('pending', 'done'), ('pending', 'skipped'),
                                        ('done', 'compensated'), ('done', 'done'),
                                        ('skipped', 'skipped'));
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = pg_catalog.format('cannot move saga "%s" step %s to %s',
                                        p_saga, COALESCE(p_step::text, '-'), p_status);
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION callback_center.saga_run(saga_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $fn$
DECLARE
    p_saga   ALIAS FOR $1;
    st       text;
    step     record;
    outcome  text;
    err      text;
BEGIN
    IF p_saga IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'saga_id must not be null';
    END IF;
    st := callback_center._saga_lock(p_saga);
    -- _saga_lock checked the session's role; this is the role the steps
    -- would run as (not the same inside another SECURITY DEFINER function).
    IF NOT EXISTS (SELECT FROM callback_center.sagas AS s
                    WHERE s.saga_id OPERATOR(pg_catalog.=) p_saga
                      AND s.created_by OPERATOR(pg_catalog.=) current_user::text) THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" does not belong to role "%s"', p_saga, current_user),
            DETAIL = 'A saga''s steps run only as the role that declared it.';
    END IF;
    IF st IN ('completed', 'compensated') THEN
        RETURN st;
    END IF;
    IF st = 'running' THEN
        FOR step IN SELECT t.step_no, t.action FROM callback_center.saga_steps AS t
                     WHERE t.saga_id = p_saga AND t.status = 'pending'
                     ORDER BY t.step_no
        LOOP
            BEGIN
                outcome := callback_center.barrier(p_saga, step.step_no::text, 'try');
                IF outcome = 'proceed' THEN
                    EXECUTE step.action USING p_saga;
                ELSIF outcome = 'refused' THEN
                    RAISE EXCEPTION USING ERRCODE = '55000',
                        MESSAGE = pg_catalog.format('step %s refused by the barrier', step.step_no),
                        DETAIL = 'Its compensation already ran.';
                END IF;
                PERFORM callback_center._saga_mark(p_saga, step.step_no, 'done', NULL);
            EXCEPTION WHEN OTHERS THEN
                err := pg_catalog.format('step %s: %s: %s', step.step_no, SQLSTATE, SQLERRM);
                PERFORM callback_center._saga_mark(p_saga, step.step_no, 'skipped', err);
                EXIT;
            END;
        END LOOP;
        IF err IS NULL THEN
            PERFORM callback_center._saga_mark(p_saga, NULL, 'completed', NULL);
            RETURN 'completed';
        END IF;
        PERFORM callback_center._saga_mark(p_saga, NULL, 'compensating', err);
    END IF;
    -- Compensating: from the last step down, each through the barrier.
    FOR step IN SELECT t.step_no, t.status, t.compensation FROM callback_center.saga_steps AS t
                 WHERE t.saga_id = p_saga AND t.status <> 'compensated'
                 ORDER BY t.step_no DESC
    LOOP
        BEGIN
            outcome := callback_center.barrier(p_saga, step.step_no::text, 'cancel');
            IF outcome = 'proceed' AND step.compensation IS NOT NULL THEN
                EXECUTE step.compensation USING p_saga;
            END IF;
            PERFORM callback_center._saga_mark(p_saga, step.step_no,
                CASE WHEN step.status = 'done' THEN 'compensated' ELSE 'skipped' END, NULL);
        EXCEPTION WHEN OTHERS THEN
            err := pg_catalog.format('compensation of step %s: %s: %s',
                                     step.step_no, SQLSTATE, SQLERRM);
            PERFORM callback_center._saga_mark(p_saga, NULL, 'compensating', err);
            RETURN 'compensating';
        END;
    END LOOP;
    PERFORM callback_center._saga_mark(p_saga, NULL, 'compensated', NULL);
    RETURN 'compensated';
END
$fn$;
COMMENT ON FUNCTION callback_center.saga_run(text) IS
    'Runs a saga''s pending steps through the barrier; on failure compensates done steps in reverse';


-- place_order: a coupon is used only by its owner; providers must exist;
-- keys are bounded.
CREATE OR REPLACE FUNCTION callback_center.place_order(
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
#variable_conflict use_column
DECLARE
    timeout interval := current_setting('callback_center.pay_timeout')::interval;
    reason text;
BEGIN
    PERFORM callback_center._require_key(p_order_id, 'order_id');
    PERFORM callback_center._require_key(p_user_id, 'user_id');
    PERFORM callback_center._require(p_items, 'items');
    PERFORM callback_center._require(p_amount_cents, 'amount_cents');
    IF p_coupon_id IS NOT NULL THEN
        PERFORM callback_center._require_key(p_coupon_id, 'coupon_id');
    END IF;
    IF p_provider IS NOT NULL THEN
        PERFORM callback_center._require_provider(p_provider);
    END IF;
    IF p_amount_cents < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('amount_cents must not be negative, got %s', p_amount_cents);
    END IF;
    IF jsonb_typeof(p_items) <> 'array' OR jsonb_array_length(p_items) = 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'items must be a non-empty JSON array',
            HINT = 'Pass [{"sku": "A", "qty": 1}, ...].';
    END IF;

    -- Serialise calls for one order id, then look: a repeat (or a call
    -- that waited for a concurrent first one) returns the order as it is.
    -- Not INSERT ... ON CONFLICT: BEFORE INSERT triggers (state history)
    -- would fire for a row that is then skipped.
    PERFORM pg_advisory_xact_lock(hashtextextended('callback_center.order:' || p_order_id, 0));
    IF EXISTS (SELECT 1 FROM callback_center.orders o WHERE o.order_id = p_order_id) THEN
        RETURN QUERY SELECT * FROM callback_center._order_summary(p_order_id, false);
        RETURN;
    END IF;
    INSERT INTO callback_center.orders
           (order_id, user_id, items, amount_cents, coupon_id, provider, pay_deadline)
    VALUES (p_order_id, p_user_id, p_items, p_amount_cents, p_coupon_id, p_provider,
            now() + timeout);

    BEGIN
        PERFORM callback_center.deduct_stock(p_order_id, p_items);
        IF p_coupon_id IS NOT NULL THEN
            -- A coupon is its owner's: another user's order cannot hold it
            -- (one issued to no user is anyone's).
            IF EXISTS (SELECT 1 FROM callback_center.coupons k
                        WHERE k.coupon_id = p_coupon_id AND k.user_id <> p_user_id) THEN
                RAISE EXCEPTION USING ERRCODE = 'CB051',
                    MESSAGE = format('coupon "%s" belongs to another user', p_coupon_id);
            END IF;
            PERFORM callback_center.freeze_coupon(p_coupon_id, p_order_id);
        END IF;
    EXCEPTION WHEN SQLSTATE 'CB001' OR SQLSTATE 'CB051' THEN
        -- The subtransaction is gone: no stock taken, no coupon held.
        reason := SQLERRM;
    END;

    IF reason IS NOT NULL THEN
        UPDATE callback_center.orders o SET failure_reason = reason, updated_at = now()
         WHERE o.order_id = p_order_id;
        PERFORM callback_center.apply_event('callback_center.orders', 'status', p_order_id, 'fail');
    ELSE
        PERFORM callback_center.apply_event('callback_center.orders', 'status', p_order_id, 'confirm');
        INSERT INTO callback_center.payments (payment_id, order_id, provider, amount_cents)
        VALUES ('pay_' || p_order_id, p_order_id, p_provider, p_amount_cents);
    END IF;

    RETURN QUERY SELECT * FROM callback_center._order_summary(p_order_id, true);
END
$$;
CREATE OR REPLACE FUNCTION callback_center.start_payment(order_id text, provider text)
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
CREATE OR REPLACE FUNCTION callback_center.set_provider(
    p_name text, p_scheme text, p_secrets text[],
    p_tolerance interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    PERFORM callback_center._require_key(p_name, 'provider', 63);
    PERFORM callback_center._require(p_scheme, 'scheme');
    IF p_secrets IS NULL THEN
        p_secrets := ARRAY[callback_center.new_webhook_secret()];
    END IF;
    IF p_scheme NOT IN ('standard_webhooks', 'stripe') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('unknown signature scheme "%s"', p_scheme),
            HINT = 'The schemes are standard_webhooks and stripe.';
    END IF;
    IF cardinality(p_secrets) = 0 OR array_position(p_secrets, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'secrets must hold at least one secret and no nulls';
    END IF;
    IF p_tolerance <= interval '0' OR p_tolerance > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'tolerance must be positive and at most 100 years',
            DETAIL = format('The value given was %s.', p_tolerance);
    END IF;
    FOREACH s IN ARRAY p_secrets LOOP
        IF s = '' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'secrets must not be empty';
        END IF;
        IF p_scheme = 'standard_webhooks' THEN
            -- raises 22023 for anything but whsec_<base64>
            PERFORM callback_center.sign_webhook(s, 'probe', 0, '');
        END IF;
    END LOOP;

    INSERT INTO callback_center.providers (name, scheme, secrets, tolerance)
    VALUES (p_name, p_scheme, p_secrets, p_tolerance)
    ON CONFLICT (name) DO UPDATE
       SET scheme = EXCLUDED.scheme, secrets = EXCLUDED.secrets,
           tolerance = EXCLUDED.tolerance;
END
$$;
COMMENT ON FUNCTION callback_center.set_provider(text, text, text[], interval) IS
    'Creates or replaces a webhook provider; NULL secrets: one is generated (admin)';


-- The shared argument checks (one NULL check, one key check) and the
-- provider check.
CREATE OR REPLACE FUNCTION callback_center._require(value anyelement, name text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $fn$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = pg_catalog.format('%s must not be null', name);
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION callback_center._require_key(value text, name text,
    max_bytes integer DEFAULT 200)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $fn$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = pg_catalog.format('%s must not be null', name);
    END IF;
    IF value OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('%s must not be empty', name);
    END IF;
    IF pg_catalog.octet_length(value) OPERATOR(pg_catalog.>) max_bytes THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('%s is too long: %s bytes, at most %s',
                                        name, pg_catalog.octet_length(value), max_bytes),
            DETAIL = pg_catalog.format('It begins "%s".', pg_catalog.left(value, 20));
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION callback_center._require(anyelement, text),
    callback_center._require_key(text, text, integer) FROM PUBLIC;
CREATE OR REPLACE FUNCTION callback_center._require_provider(p_name text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require_key(p_name, 'provider', 63);
    IF NOT EXISTS (SELECT 1 FROM callback_center.providers p WHERE p.name = p_name) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_name),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
END
$$;
REVOKE ALL ON FUNCTION callback_center._require_provider(text) FROM PUBLIC;

-- Settings that broke the worker are refused when set: rate_limit_per_s
-- between 0.001 and 1,000,000, retry delays at most 30 days, provider
-- tolerances at most 100 years.  Values 0.1.0 accepted are brought into range
-- first, so that the worker stops tripping over them.
UPDATE callback_center.endpoints
   SET rate_limit_per_s = least(greatest(rate_limit_per_s, 0.001), 1000000)
 WHERE rate_limit_per_s < 0.001 OR rate_limit_per_s > 1000000;
UPDATE callback_center.retry_schedules
   SET delays = ARRAY(SELECT least(d, interval '30 days') FROM unnest(delays) WITH ORDINALITY AS u(d, n)
                       ORDER BY n)
 WHERE NOT builtin AND NOT (interval '30 days' >= ALL (delays));
UPDATE callback_center.providers SET tolerance = interval '100 years' WHERE tolerance > interval '100 years';
ALTER TABLE callback_center.retry_schedules
    DROP CONSTRAINT retry_schedules_delays_check,
    ADD CONSTRAINT retry_schedules_delays_check
        CHECK (cardinality(delays) <= 10000
               AND (cardinality(delays) = 0 OR array_ndims(delays) = 1)
               AND array_position(delays, NULL) IS NULL
               AND interval '0' < ALL (delays)
               AND interval '30 days' >= ALL (delays));
CREATE OR REPLACE FUNCTION callback_center._endpoint_apply(id integer, options jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    known constant text[] := ARRAY['url', 'event_types', 'timeout_ms',
        'retry_schedule', 'max_attempts', 'rate_limit_per_s',
        'breaker_failure_ratio', 'breaker_window_s', 'breaker_min_requests',
        'breaker_open_ms', 'is_core', 'ordered', 'enabled'];
    bad text;
    k text;
    v jsonb;
    ep callback_center.endpoints;
    n numeric;
BEGIN
    IF options IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'options must not be null';
    END IF;
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'options must be a JSON object',
            DETAIL = format('A JSON %s was given.', jsonb_typeof(options));
    END IF;
    SELECT string_agg(format('"%s"', o), ', ' ORDER BY o) INTO bad
      FROM jsonb_object_keys(options) o
     WHERE o <> ALL (known);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('unknown endpoint option %s', bad),
            HINT = format('Known options: %s.', array_to_string(known, ', '));
    END IF;

    SELECT * INTO ep FROM callback_center.endpoints e WHERE e.id = _endpoint_apply.id;
    FOR k, v IN SELECT * FROM jsonb_each(options)
    LOOP
        CASE k
        WHEN 'url' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "url" must be a string';
            END IF;
            ep.url := callback_center._check_url(v #>> '{}');
        WHEN 'event_types' THEN
            IF jsonb_typeof(v) <> 'array' OR jsonb_array_length(v) = 0
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(v) x
                           WHERE jsonb_typeof(x) <> 'string' OR x #>> '{}' = '') THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "event_types" must be a non-empty array of non-empty strings';
            END IF;
            ep.event_types := ARRAY(SELECT jsonb_array_elements_text(v));
        WHEN 'timeout_ms' THEN
            ep.timeout_ms := callback_center._option_int(k, v, 1, 600000);
        WHEN 'retry_schedule' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "retry_schedule" must be a string';
            END IF;
            IF NOT EXISTS (SELECT 1 FROM callback_center.retry_schedules s
                            WHERE s.name = v #>> '{}') THEN
                RAISE EXCEPTION USING ERRCODE = '42704',
                    MESSAGE = format('retry schedule "%s" does not exist', v #>> '{}'),
                    HINT = 'The retry_schedules table lists them.';
            END IF;
            ep.retry_schedule := v #>> '{}';
        WHEN 'max_attempts' THEN
            ep.max_attempts := CASE WHEN jsonb_typeof(v) = 'null' THEN NULL
                ELSE callback_center._option_int(k, v, 1, 1000000) END;
        WHEN 'rate_limit_per_s' THEN
            IF jsonb_typeof(v) = 'null' THEN
                ep.rate_limit_per_s := NULL;
            ELSIF jsonb_typeof(v) <> 'number' OR v::numeric < 0.001 OR v::numeric > 1000000 THEN
                -- The worker's token bucket works in doubles: 1e400 was
                -- infinity there and stopped every delivery.
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "rate_limit_per_s" must be a number between 0.001 and 1000000, or null',
                    DETAIL = format('The value given was %s.', left(v::text, 40));
            ELSE
                ep.rate_limit_per_s := v::numeric;
            END IF;
        WHEN 'breaker_failure_ratio' THEN
            IF jsonb_typeof(v) <> 'number' OR v::numeric <= 0 OR v::numeric > 1 THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "breaker_failure_ratio" must be a number in (0, 1]';
            END IF;
            ep.breaker_failure_ratio := v::numeric;
        WHEN 'breaker_window_s' THEN
            ep.breaker_window_s := callback_center._option_int(k, v, 1, 86400);
        WHEN 'breaker_min_requests' THEN
            ep.breaker_min_requests := callback_center._option_int(k, v, 1, 1000000);
        WHEN 'breaker_open_ms' THEN
            ep.breaker_open_ms := callback_center._option_int(k, v, 1, 86400000);
        ELSE
            -- is_core, ordered, enabled
            IF jsonb_typeof(v) <> 'boolean' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('endpoint option "%s" must be true or false', k);
            END IF;
            CASE k
            WHEN 'is_core' THEN ep.is_core := v::boolean;
            WHEN 'ordered' THEN ep.ordered := v::boolean;
            ELSE ep.enabled := v::boolean;
            END CASE;
        END CASE;
    END LOOP;

    UPDATE callback_center.endpoints e
       SET url = ep.url, event_types = ep.event_types, timeout_ms = ep.timeout_ms,
           retry_schedule = ep.retry_schedule, max_attempts = ep.max_attempts,
           rate_limit_per_s = ep.rate_limit_per_s,
           breaker_failure_ratio = ep.breaker_failure_ratio,
           breaker_window_s = ep.breaker_window_s,
           breaker_min_requests = ep.breaker_min_requests,
           breaker_open_ms = ep.breaker_open_ms, is_core = ep.is_core,
           ordered = ep.ordered, enabled = ep.enabled, updated_at = now()
     WHERE e.id = _endpoint_apply.id;
END
$$;

-- NULL arguments are 22004 everywhere (sql/nulls.sql): checks moved before
-- the look-ups that hid them, and added where missing, through _require.
CREATE OR REPLACE FUNCTION callback_center.add_state(
    machine text,
    state text,
    is_initial boolean DEFAULT false,
    is_final boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(state, 'state');
    PERFORM callback_center._require(is_initial, 'is_initial');
    PERFORM callback_center._require(is_final, 'is_final');
    PERFORM callback_center._fsm_require_machine(machine);
    IF state = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'state name cannot be empty';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.machine_states s
                WHERE s.machine = add_state.machine AND s.state = add_state.state) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state "%s" already exists in state machine "%s"', state, machine);
    END IF;
    INSERT INTO callback_center.machine_states (machine, state, is_initial, is_final)
    VALUES (machine, state, is_initial, is_final);
END
$$;
CREATE OR REPLACE FUNCTION callback_center.add_transition(
    machine text,
    from_state text,
    to_state text,
    event text,
    emits text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(from_state, 'from_state');
    PERFORM callback_center._require(to_state, 'to_state');
    PERFORM callback_center._require(event, 'event');
    PERFORM callback_center._require(emits, 'emits');
    PERFORM callback_center._require(array_position(emits, NULL) IS NULL OR NULL, 'an element of emits');
    PERFORM callback_center._fsm_require_machine(machine);
    PERFORM callback_center._fsm_require_state(machine, from_state);
    PERFORM callback_center._fsm_require_state(machine, to_state);
    IF event = '' OR '' = ANY (emits) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'event names cannot be empty';
    END IF;
    IF from_state = to_state THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('transition "%s" -> "%s" does not change the state', from_state, to_state),
            DETAIL = 'The trigger ignores updates that keep the state, so such a transition could never fire.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.machine_states s
                WHERE s.machine = add_transition.machine
                  AND s.state = add_transition.from_state AND s.is_final) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('state "%s" of state machine "%s" is final', from_state, machine),
            DETAIL = 'No transition may leave a final state.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.transitions t
                WHERE t.machine = add_transition.machine
                  AND t.from_state = add_transition.from_state
                  AND (t.to_state = add_transition.to_state OR t.event = add_transition.event)) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state machine "%s" already has a transition "%s" -> "%s" or event "%s" from "%s"',
                             machine, from_state, to_state, event, from_state),
            HINT = 'Each pair of states has at most one transition and each event at most one target per state.';
    END IF;
    INSERT INTO callback_center.transitions (machine, from_state, to_state, event, emits)
    VALUES (machine, from_state, to_state, event, emits);
END
$$;
CREATE OR REPLACE FUNCTION callback_center.set_transition_emits(
    machine text,
    from_state text,
    to_state text,
    emits text[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    is_builtin boolean;
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(from_state, 'from_state');
    PERFORM callback_center._require(to_state, 'to_state');
    PERFORM callback_center._require(emits, 'emits');
    PERFORM callback_center._require(array_position(emits, NULL) IS NULL OR NULL, 'an element of emits');
    PERFORM callback_center._fsm_require_machine(machine);
    IF '' = ANY (emits) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'event names cannot be empty';
    END IF;
    SELECT t.builtin INTO is_builtin FROM callback_center.transitions t
     WHERE t.machine = set_transition_emits.machine
       AND t.from_state = set_transition_emits.from_state
       AND t.to_state = set_transition_emits.to_state
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('state machine "%s" has no transition "%s" -> "%s"',
                             machine, from_state, to_state);
    END IF;
    IF is_builtin AND NOT callback_center._fsm_installing() THEN
        INSERT INTO callback_center.builtin_emits AS b (machine, from_state, to_state, emits)
        VALUES (set_transition_emits.machine, set_transition_emits.from_state,
                set_transition_emits.to_state, set_transition_emits.emits)
        ON CONFLICT ON CONSTRAINT builtin_emits_pkey
        DO UPDATE SET emits = EXCLUDED.emits, changed_at = now();
    ELSE
        UPDATE callback_center.transitions t
           SET emits = set_transition_emits.emits
         WHERE t.machine = set_transition_emits.machine
           AND t.from_state = set_transition_emits.from_state
           AND t.to_state = set_transition_emits.to_state;
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION callback_center.alter_endpoint(name text, options jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(alter_endpoint.name, 'name');
    PERFORM callback_center._require(options, 'options');
    PERFORM callback_center._endpoint_apply(
        callback_center._endpoint_id(alter_endpoint.name, true), options);
END
$$;
CREATE OR REPLACE FUNCTION callback_center.set_endpoint_enabled(name text, enabled boolean)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep_id integer;
BEGIN
    PERFORM callback_center._require(set_endpoint_enabled.name, 'name');
    PERFORM callback_center._require(enabled, 'enabled');
    ep_id := callback_center._endpoint_id(set_endpoint_enabled.name, true);
    UPDATE callback_center.endpoints e
       SET enabled = set_endpoint_enabled.enabled, updated_at = now()
     WHERE e.id = ep_id;
END
$$;
CREATE OR REPLACE FUNCTION callback_center.replay_dead(endpoint text, since timestamptz DEFAULT '-infinity',
                                            until timestamptz DEFAULT 'infinity', reason text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep integer;
    n bigint;
BEGIN
    -- A NULL bound replayed nothing and reported success.
    PERFORM callback_center._require(since, 'since');
    PERFORM callback_center._require(until, 'until');
    IF replay_dead.endpoint IS NOT NULL THEN
        SELECT e.id INTO ep FROM callback_center.endpoints e WHERE e.name = replay_dead.endpoint;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'CB040',
                MESSAGE = format('endpoint "%s" does not exist', replay_dead.endpoint);
        END IF;
    END IF;
    n := callback_center._replay(ARRAY(
            SELECT o.id FROM callback_center.outbox o
             WHERE o.status = 'dead'
               AND (ep IS NULL OR o.endpoint_id = ep)
               AND o.next_attempt_at >= since AND o.next_attempt_at < until),
         reason);
    IF n > 0 THEN
        PERFORM callback_center._outbox_note_enqueue();
    END IF;
    RETURN n;
END
$$;
CREATE OR REPLACE FUNCTION callback_center.delivery_stats(window_len interval DEFAULT '1 hour')
RETURNS TABLE (
    endpoint text,
    enabled boolean,
    delivered bigint,
    failed_attempts bigint,
    retries bigint,
    failure_rate double precision,
    dead bigint,
    pending bigint,
    p50_ms double precision,
    p95_ms double precision,
    p99_ms double precision,
    breaker text,
    breaker_opened_at timestamptz,
    tokens double precision,
    degraded boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
BEGIN
    -- plpgsql, not sql, only for this check: a NULL window returned
    -- every endpoint with nothing counted.
    PERFORM callback_center._require(window_len, 'window_len');
    RETURN QUERY
    SELECT e.name, e.enabled,
           coalesce(a.delivered, 0), coalesce(a.failed, 0), coalesce(a.retries, 0),
           CASE WHEN coalesce(a.total, 0) = 0 THEN 0 ELSE a.failed::float8 / a.total END,
           coalesce(q.dead, 0), coalesce(q.pending, 0),
           a.p50, a.p95, a.p99,
           coalesce(s.breaker, 'closed'), s.opened_at, s.tokens, coalesce(s.degraded, false)
      FROM callback_center.endpoints e
      LEFT JOIN LATERAL (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE d.http_status BETWEEN 200 AND 299) AS delivered,
               count(*) FILTER (WHERE d.http_status IS NULL OR d.http_status NOT BETWEEN 200 AND 299) AS failed,
               count(*) FILTER (WHERE d.attempt > 1) AS retries,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY d.latency_ms) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY d.latency_ms) AS p95,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY d.latency_ms) AS p99
          FROM callback_center.delivery_attempts d
         WHERE d.endpoint_id = e.id AND d.attempted_at >= now() - window_len) a ON true
      LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE o.status = 'dead') AS dead,
               count(*) FILTER (WHERE o.status IN ('pending', 'delivering')) AS pending
          FROM callback_center.outbox o
         WHERE o.endpoint_id = e.id AND o.status IN ('pending', 'delivering', 'dead')) q ON true
      LEFT JOIN callback_center.endpoint_state s ON s.endpoint_id = e.id
     ORDER BY e.name;
END
$$;

-- Bounds on what comes from outside: keys through _require_key (the
-- generalised _tcc_require goes), ages at most 100 years; an unreadable
-- signed payment message is recorded and refused once (400, rejected).
CREATE OR REPLACE FUNCTION callback_center._tcc_second_phase(
    p_gid text, p_branch text, p_kind text, p_op text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome text;
    r       callback_center.tcc_reservations;
BEGIN
    -- barrier() checks gid and branch_id (_require_key).
    outcome := callback_center.barrier(p_gid, p_branch, p_op);
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    r := callback_center._tcc_settle(p_gid, p_branch, p_kind,
                                     CASE p_op WHEN 'confirm' THEN 'confirmed' ELSE 'cancelled' END);
    IF p_kind = 'stock' THEN
        UPDATE callback_center.stock AS s
           SET available = s.available + CASE p_op WHEN 'cancel' THEN r.quantity ELSE 0 END,
               reserved = s.reserved - r.quantity,
               version = s.version + 1,
               updated_at = pg_catalog.now()
         WHERE s.sku_id = r.resource_id;
    ELSIF p_op = 'confirm' THEN
        PERFORM callback_center.use_coupon(r.resource_id, p_gid);
    ELSE
        PERFORM callback_center.unfreeze_coupon(r.resource_id, p_gid);
    END IF;
    RETURN outcome;
END
$fn$;
CREATE OR REPLACE FUNCTION callback_center.tcc_stock_try(
    gid text,
    branch_id text,
    sku_id text,
    qty bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    p_gid    ALIAS FOR $1;
    p_branch ALIAS FOR $2;
    p_sku    ALIAS FOR $3;
    p_qty    ALIAS FOR $4;
    outcome  text;
    cur      bigint;
    nslots   integer;
BEGIN
    PERFORM callback_center._require_key(p_gid, 'gid');
    PERFORM callback_center._require_key(p_branch, 'branch_id');
    PERFORM callback_center._require_key(p_sku, 'sku_id');
    PERFORM callback_center._require(p_qty, 'qty');
    IF p_qty <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('qty must be positive: %s', p_qty);
    END IF;
    outcome := callback_center.barrier(p_gid, p_branch, 'try');
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    UPDATE callback_center.stock AS s
       SET available = s.available - p_qty,
           reserved = s.reserved + p_qty,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = p_sku AND s.available >= p_qty;
    IF NOT FOUND THEN
        SELECT s.available, s.slots INTO cur, nslots FROM callback_center.stock AS s WHERE s.sku_id = p_sku;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'CB004',
                MESSAGE = pg_catalog.format('unknown SKU "%s"', p_sku),
                HINT = 'Create it with callback_center.set_stock().';
        END IF;
        -- A hot SKU's units are in its slots, not on the row: a reservation
        -- there would have to be given back to a slot by the cancel, which
        -- the reservation model (one row) does not do.
        IF nslots > 0 THEN
            RAISE EXCEPTION USING ERRCODE = '0A000',
                MESSAGE = pg_catalog.format('cannot reserve hot SKU "%s" through TCC', p_sku),
                DETAIL = pg_catalog.format('Its units are spread over %s slots.', nslots),
                HINT = 'Deduct it with deduct_stock() (restore_stock() compensates), or make it normal with set_hot_sku(sku, 1).';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', p_sku),
            DETAIL = pg_catalog.format('Reserving %s units needs more than the %s available.',
                                       p_qty, cur);
    END IF;
    INSERT INTO callback_center.tcc_reservations (gid, branch_id, kind, resource_id, quantity)
    VALUES (p_gid, p_branch, 'stock', p_sku, p_qty);
    RETURN outcome;
END
$fn$;
COMMENT ON FUNCTION callback_center.tcc_stock_try(text, text, text, bigint) IS
    'TCC try: reserves qty units of a SKU for (gid, branch); returns the barrier outcome';

CREATE OR REPLACE FUNCTION callback_center.tcc_coupon_try(gid text, branch_id text, coupon_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    p_gid    ALIAS FOR $1;
    p_branch ALIAS FOR $2;
    p_coupon ALIAS FOR $3;
    outcome  text;
BEGIN
    PERFORM callback_center._require_key(p_gid, 'gid');
    PERFORM callback_center._require_key(p_branch, 'branch_id');
    PERFORM callback_center._require_key(p_coupon, 'coupon_id');
    outcome := callback_center.barrier(p_gid, p_branch, 'try');
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    PERFORM callback_center.freeze_coupon(p_coupon, p_gid);
    INSERT INTO callback_center.tcc_reservations (gid, branch_id, kind, resource_id, quantity)
    VALUES (p_gid, p_branch, 'coupon', p_coupon, 1);
    RETURN outcome;
END
$fn$;
COMMENT ON FUNCTION callback_center.tcc_coupon_try(text, text, text) IS
    'TCC try: freezes a coupon for gid; returns the barrier outcome';

DROP FUNCTION callback_center._tcc_require(text, text[]);
CREATE OR REPLACE FUNCTION callback_center.issue_coupon(coupon_id text, user_id text DEFAULT NULL)
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
CREATE OR REPLACE FUNCTION callback_center.freeze_coupon(coupon_id text, biz_id text)
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
CREATE OR REPLACE FUNCTION callback_center.use_coupon(coupon_id text, biz_id text)
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
CREATE OR REPLACE FUNCTION callback_center.unfreeze_coupon(coupon_id text, biz_id text)
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
CREATE OR REPLACE FUNCTION callback_center.mark_refunded(provider text, provider_txn_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    lp callback_center.late_payments;
BEGIN
    PERFORM callback_center._require_key(mark_refunded.provider, 'provider', 63);
    PERFORM callback_center._require_key(mark_refunded.provider_txn_id, 'provider_txn_id');
    SELECT * INTO lp FROM callback_center.late_payments l
     WHERE l.provider = mark_refunded.provider AND l.provider_txn_id = mark_refunded.provider_txn_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('no late payment %s from provider "%s"',
                             mark_refunded.provider_txn_id, mark_refunded.provider),
            HINT = 'See callback_center.late_payments.';
    END IF;
    IF lp.status = 'refunded' THEN
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
CREATE OR REPLACE FUNCTION callback_center.complete_callback(
    p_biz_id text, p_callback_type text, p_succeeded boolean,
    p_result jsonb DEFAULT NULL)
RETURNS smallint
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.callback_record;
    v_status smallint;
BEGIN
    PERFORM callback_center._require_key(p_biz_id, 'biz_id');
    PERFORM callback_center._require_key(p_callback_type, 'callback_type');
    PERFORM callback_center._require(p_succeeded, 'succeeded');
    v_status := CASE WHEN p_succeeded THEN 2 ELSE 3 END;

    SELECT * INTO r FROM callback_center.callback_record c
     WHERE c.biz_id = p_biz_id AND c.callback_type = p_callback_type
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB021',
            MESSAGE = format('unknown callback (%s, %s)', p_biz_id, p_callback_type),
            HINT = 'Record the callback with callback_center.record_callback() first.';
    END IF;

    IF r.status IN (2, 3) THEN
        IF r.status = v_status THEN
            RETURN r.status;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('callback (%s, %s) is already completed', p_biz_id, p_callback_type),
            DETAIL = format('It completed as %s and cannot now complete as %s.',
                            CASE r.status WHEN 2 THEN 'succeeded' ELSE 'failed' END,
                            CASE v_status WHEN 2 THEN 'succeeded' ELSE 'failed' END);
    END IF;

    UPDATE callback_center.callback_record c
       SET status = v_status, result = p_result,
           completed_at = now(), updated_at = now()
     WHERE c.id = r.id;
    RETURN v_status;
END
$$;
COMMENT ON FUNCTION callback_center.complete_callback(text, text, boolean, jsonb) IS
    'Marks a recorded callback succeeded (2) or failed (3) with its result';

CREATE OR REPLACE FUNCTION callback_center.get_callback(p_biz_id text, p_callback_type text)
RETURNS callback_center.callback_record
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.callback_record;
BEGIN
    PERFORM callback_center._require_key(p_biz_id, 'biz_id');
    PERFORM callback_center._require_key(p_callback_type, 'callback_type');
    SELECT * INTO r FROM callback_center.callback_record c
     WHERE c.biz_id = p_biz_id AND c.callback_type = p_callback_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB021',
            MESSAGE = format('unknown callback (%s, %s)', p_biz_id, p_callback_type);
    END IF;
    RETURN r;
END
$$;
COMMENT ON FUNCTION callback_center.get_callback(text, text) IS
    'The recorded callback for (biz_id, callback_type)';

CREATE OR REPLACE FUNCTION callback_center.reclaim_stale_callbacks(older_than interval)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    n integer;
BEGIN
    IF older_than IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'older_than must not be null';
    END IF;
    IF older_than < interval '0' OR older_than > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'older_than must be between 0 and 100 years',
            DETAIL = format('The value given was %s.', older_than);
    END IF;
    -- A row a handler is completing right now is locked: the UPDATE waits,
    -- then rechecks status and skips it.
    UPDATE callback_center.callback_record c
       SET status = 3,
           result = jsonb_build_object('error', 'processing abandoned',
                                       'reclaimed_after', older_than::text),
           completed_at = now(), updated_at = now()
     WHERE c.status = 1 AND c.updated_at < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION callback_center.reclaim_stale_callbacks(interval) IS
    'Marks callbacks processing for longer than older_than failed, so that a redelivery retries them (admin)';

CREATE OR REPLACE FUNCTION callback_center._purge_check(older_than interval, batch_size integer,
    attempts_older_than interval, history_older_than interval)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF older_than IS NULL OR batch_size IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'older_than and batch_size must not be null';
    END IF;
    IF older_than < interval '0' OR attempts_older_than < interval '0'
       OR history_older_than < interval '0' OR older_than > interval '100 years'
       OR attempts_older_than > interval '100 years' OR history_older_than > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('retention ages must be between 0 and 100 years, got %s, %s and %s',
                             older_than, coalesce(attempts_older_than::text, 'NULL'),
                             coalesce(history_older_than::text, 'NULL'));
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('batch_size must be positive, got %s', batch_size);
    END IF;
END
$$;

-- Provider secrets can be generated (set_provider with NULL secrets) and
-- read back by the admin (provider_secret), so that none need be written
-- into a statement.
CREATE OR REPLACE FUNCTION callback_center.provider_secret(p_name text)
RETURNS text
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    PERFORM callback_center._require_key(p_name, 'provider', 63);
    SELECT p.secrets[1] INTO s FROM callback_center.providers p WHERE p.name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_name);
    END IF;
    RETURN s;
END
$$;
COMMENT ON FUNCTION callback_center.provider_secret(text) IS
    'The first secret of a webhook provider, to configure on its side (admin)';

REVOKE ALL ON FUNCTION callback_center.provider_secret(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.provider_secret(text) TO callback_center_admin;
COMMENT ON FUNCTION callback_center.set_provider(text, text, text[], interval) IS
    'Creates or replaces a webhook provider; NULL secrets: one is generated (admin)';

-- Stock: the hot-SKU slot statements (src/stock.c) choose their slot in a
-- MATERIALIZED CTE and check the rows they change; restore_stock follows a
-- built-in order's state (CB005); neither needs a catalog change, the C
-- symbols stay.  In SQL, the purge batch's LIMIT ... FOR UPDATE SKIP
-- LOCKED pick is MATERIALIZED too, so that one pick is counted and deleted
-- whatever the plan.
CREATE OR REPLACE FUNCTION callback_center._purge_batch(rel text, cutoff timestamptz, after_id bigint,
    batch_size integer, OUT purged bigint, OUT last_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    condition text;
BEGIN
    SELECT t.cond INTO condition FROM callback_center._purge_targets() t
     WHERE t.rel = _purge_batch.rel;
    IF condition IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('"%s" is not a retention target', _purge_batch.rel);
    END IF;
    -- Walk the primary key upwards: old rows have low ids, and no batch
    -- rescans what an earlier one passed.  b is MATERIALIZED: evaluated
    -- once whatever the plan, so that the rows counted, the rows deleted
    -- and the batch's last id are the same LIMIT ... SKIP LOCKED pick (a
    -- sub-select run again per row of a join would pick more rows).
    EXECUTE format(
        'WITH b AS MATERIALIZED (SELECT id FROM %s WHERE id > $2 AND %s ORDER BY id LIMIT $3'
        ' FOR UPDATE SKIP LOCKED),'
        ' d AS (DELETE FROM %s WHERE id IN (SELECT id FROM b) RETURNING id)'
        ' SELECT (SELECT count(*) FROM b), (SELECT max(id) FROM b)'
        ' FROM (SELECT count(*) FROM d) AS x',
        _purge_batch.rel, condition, _purge_batch.rel)
        INTO purged, last_id USING cutoff, after_id, batch_size;
END
$$;

-- Payment channels: WeChat Pay v3 and v2 and Alipay notifications through
-- payment_callback (45_channels.sql, doc/inbound.md).  providers takes the
-- three schemes; set_provider validates their secrets; payment_callback
-- hands them to _channel_parse; provider_keys holds WeChat Pay platform keys.
ALTER TABLE callback_center.providers
    DROP CONSTRAINT providers_scheme_check,
    ADD CONSTRAINT providers_scheme_check CHECK (scheme IN ('standard_webhooks', 'stripe',
                                                            'wechatpay_v3', 'wechatpay_v2', 'alipay'));

-- Platform keys of wechatpay_v3 providers, selected by the
-- Wechatpay-Serial header: a certificate's serial (certificate mode) or a
-- public-key id PUB_KEY_ID_... (public-key mode).  Several at once during
-- a rotation.
CREATE TABLE callback_center.provider_keys (
    provider   text NOT NULL REFERENCES callback_center.providers (name)
               ON DELETE CASCADE ON UPDATE CASCADE,
    key_id     text NOT NULL CHECK (key_id <> '' AND length(key_id) <= 128),
    kind       text NOT NULL CHECK (kind IN ('certificate', 'public_key')),
    pem        text NOT NULL,
    not_after  timestamptz CHECK ((kind = 'certificate') = (not_after IS NOT NULL)),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, key_id)
);

COMMENT ON TABLE callback_center.provider_keys IS
    'WeChat Pay v3 platform certificates and public keys by serial or public-key id';

SELECT pg_catalog.pg_extension_config_dump('callback_center.provider_keys', '');
REVOKE ALL ON callback_center.provider_keys FROM PUBLIC;

-- The cryptography of src/crypto.c (see src/channels.c).
CREATE FUNCTION callback_center._key_info(key text,
    OUT kind text, OUT bits integer, OUT serial text,
    OUT not_before timestamptz, OUT not_after timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_key_info'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._rsa_sha256_check(key text, data bytea, signature bytea)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_rsa_sha256_check'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._aes256gcm_decrypt(
    key bytea, nonce bytea, associated_data bytea, ciphertext bytea)
RETURNS bytea
AS 'MODULE_PATHNAME', 'cc_aes256gcm_decrypt_sql'
LANGUAGE C IMMUTABLE;

CREATE FUNCTION callback_center._form_decode(s text)
RETURNS bytea
AS 'MODULE_PATHNAME', 'cc_form_decode'
LANGUAGE C IMMUTABLE;

CREATE FUNCTION callback_center._hmac_sha256(key bytea, data bytea)
RETURNS bytea
AS 'MODULE_PATHNAME', 'cc_hmac_sha256_sql'
LANGUAGE C IMMUTABLE;

-- Checks one entry of set_provider's secrets for a channel scheme: 22023
-- with a detail that never quotes it.
CREATE FUNCTION callback_center._channel_check_secret(p_scheme text, p_secret text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF p_scheme = 'wechatpay_v3' THEN
        IF octet_length(convert_to(p_secret, 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid APIv3 key',
                DETAIL = format('The key is %s bytes; WeChat Pay APIv3 keys are 32.',
                                octet_length(convert_to(p_secret, 'UTF8'))),
                HINT = 'Give the APIv3 key set in the merchant platform; platform certificates go to callback_center.set_platform_keys().';
        END IF;
    ELSIF p_scheme = 'wechatpay_v2' THEN
        IF octet_length(convert_to(regexp_replace(p_secret, '^md5:', ''), 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid API key',
                DETAIL = format('The key is %s bytes; WeChat Pay API keys are 32.',
                                octet_length(convert_to(regexp_replace(p_secret, '^md5:', ''), 'UTF8'))),
                HINT = 'Give the API key set in the merchant platform, with md5: before it to accept the legacy MD5 sign.';
        END IF;
    ELSIF p_scheme = 'alipay' THEN
        -- raises 22023 for a malformed key, not RSA, under 2048 bits
        PERFORM callback_center._key_info(p_secret);
    END IF;
END
$$;

-- set_platform_keys: replaces the platform keys of a wechatpay_v3
-- provider with keys, a JSON object of serial (or public-key id) to PEM
-- certificate or public key.  Pass the old and the new key together while
-- WeChat Pay rotates.  Each key is checked (RSA, 2048 bits or more, a
-- certificate valid now whose serial is its name); returns how many are
-- loaded.
CREATE FUNCTION callback_center.set_platform_keys(p_provider text, p_keys jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    k record;
    info record;
    why text;
    n integer := 0;
BEGIN
    IF p_provider IS NULL OR p_keys IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'provider and keys must not be null';
    END IF;
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = p_provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'Create it first with callback_center.set_provider(name, ''wechatpay_v3'', ARRAY[apiv3_key]).';
    END IF;
    IF v_scheme <> 'wechatpay_v3' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not wechatpay_v3', p_provider, v_scheme);
    END IF;
    IF jsonb_typeof(p_keys) <> 'object' OR p_keys = '{}' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'keys must be a non-empty JSON object of serial to PEM';
    END IF;

    DELETE FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
    FOR k IN SELECT e.key, e.value FROM jsonb_each(p_keys) e ORDER BY e.key LOOP
        IF jsonb_typeof(k.value) <> 'string' OR k.key = '' OR length(k.key) > 128 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid platform key',
                DETAIL = 'Every key needs a non-empty serial of at most 128 characters and a PEM string.';
        END IF;
        BEGIN
            info := callback_center._key_info(k.value #>> '{}');
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = why,
                HINT = 'Give the platform certificate or platform public key as PEM.';
        END;
        IF info.kind = 'certificate' AND upper(k.key) <> info.serial THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = 'The certificate''s serial number is not the name it is given.',
                HINT = 'Name each certificate by its serial number in hex, as the Wechatpay-Serial header carries it.';
        END IF;
        INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)
        VALUES (p_provider, k.key, info.kind, k.value #>> '{}', info.not_after);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

COMMENT ON FUNCTION callback_center.set_platform_keys(text, jsonb) IS
    'Replaces a wechatpay_v3 provider''s platform certificates and public keys, by serial (admin)';

-- A header's value, ASCII case-insensitive; NULL when absent or not a
-- string, and '' marks it present twice (the caller refuses both).
CREATE FUNCTION callback_center._channel_header(p_headers jsonb, p_name text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v text[];
BEGIN
    IF jsonb_typeof(p_headers) <> 'object' THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(CASE WHEN jsonb_typeof(h.value) = 'string' THEN h.value #>> '{}' END)
      INTO v
      FROM jsonb_each(p_headers) h WHERE lower(h.key) = lower(p_name);
    IF cardinality(v) > 1 THEN
        RETURN '';
    END IF;
    RETURN v[1];
END
$$;

-- The answer a channel's provider expects: success, or failure with a
-- short reason (never key material or the request).
CREATE FUNCTION callback_center._channel_answer(
    p_scheme text, p_ok boolean, p_status integer, p_reason text,
    OUT http_status integer, OUT response_body text)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF p_scheme = 'wechatpay_v3' THEN
        -- WeChat Pay: 200 or 204 with no body acknowledges; any 4xx/5xx
        -- with {"code":"FAIL","message":...} makes it resend.
        IF p_ok THEN
            http_status := 200;
            response_body := '';
        ELSE
            http_status := p_status;
            response_body := jsonb_build_object('code', 'FAIL', 'message', p_reason)::text;
        END IF;
    ELSIF p_scheme = 'wechatpay_v2' THEN
        -- WeChat Pay v2: return_code SUCCESS acknowledges; FAIL (or no
        -- answer) makes it resend.
        http_status := CASE WHEN p_ok THEN 200 ELSE p_status END;
        response_body := format('<xml><return_code><![CDATA[%s]]></return_code>'
                                '<return_msg><![CDATA[%s]]></return_msg></xml>',
                                CASE WHEN p_ok THEN 'SUCCESS' ELSE 'FAIL' END,
                                CASE WHEN p_ok THEN 'OK' ELSE p_reason END);
    ELSIF p_scheme = 'alipay' THEN
        -- Alipay: the exact body "success" acknowledges; anything else
        -- makes it resend.
        http_status := CASE WHEN p_ok THEN 200 ELSE p_status END;
        response_body := CASE WHEN p_ok THEN 'success' ELSE 'fail' END;
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;
END
$$;

-- The timestamp tolerance of a provider: its own, else the GUC
-- callback_center.signature_tolerance.
CREATE FUNCTION callback_center._channel_tolerance(p_tolerance interval)
RETURNS interval
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    RETURN coalesce(p_tolerance,
                    current_setting('callback_center.signature_tolerance', true)::interval,
                    interval '300 seconds');
END
$$;

-- WeChat Pay v3 (APIv3 payment notifications).  The signed string is
-- Wechatpay-Timestamp, Wechatpay-Nonce and the body, each followed by \n,
-- signed SHA256withRSA by the platform key Wechatpay-Serial names; the
-- resource is AEAD_AES_256_GCM under the APIv3 key.  failure is NULL when
-- the message is good; else the outcome, with fail_status the HTTP status
-- to answer.
CREATE FUNCTION callback_center._wechatpay_v3_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ts text := callback_center._channel_header(p_headers, 'Wechatpay-Timestamp');
    nonce text := callback_center._channel_header(p_headers, 'Wechatpay-Nonce');
    sig_b64 text := callback_center._channel_header(p_headers, 'Wechatpay-Signature');
    serial text := callback_center._channel_header(p_headers, 'Wechatpay-Serial');
    sig_type text := callback_center._channel_header(p_headers, 'Wechatpay-Signature-Type');
    sig bytea;
    key_pem text;
    why text;
    ev jsonb;
    res jsonb;
    plain bytea;
    tx jsonb;
    s text;
    total text;
BEGIN
    payload := p_body;
    IF nullif(ts, '') IS NULL OR nullif(nonce, '') IS NULL
       OR nullif(sig_b64, '') IS NULL OR nullif(serial, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF sig_type IS NOT NULL AND sig_type <> 'WECHATPAY2-SHA256-RSA2048' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF ts !~ '^[0-9]{1,12}$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF abs(extract(epoch FROM now()) - ts::bigint)
       > extract(epoch FROM callback_center._channel_tolerance(p_tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(sig_b64, 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    IF NOT EXISTS (SELECT 1 FROM callback_center.provider_keys pk WHERE pk.provider = p_provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no platform keys', p_provider),
            HINT = 'An administrator loads them with callback_center.set_platform_keys().';
    END IF;
    SELECT pk.pem INTO key_pem FROM callback_center.provider_keys pk
     WHERE pk.provider = p_provider AND pk.key_id = serial;
    IF NOT FOUND THEN
        failure := 'unknown_key'; fail_status := 401;
        RETURN;
    END IF;
    why := callback_center._rsa_sha256_check(key_pem,
        convert_to(ts || E'\n' || nonce || E'\n' || p_body || E'\n', 'UTF8'), sig);
    IF why IS NOT NULL THEN
        failure := CASE WHEN why LIKE '%expired%' OR why LIKE '%not valid yet%'
                        THEN 'key_expired' ELSE 'invalid_signature' END;
        fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    BEGIN
        ev := p_body::jsonb;
    EXCEPTION WHEN OTHERS THEN
        ev := NULL;
    END;
    res := ev->'resource';
    msg_id := ev->>'id';
    event_type := ev->>'event_type';
    IF jsonb_typeof(ev) IS DISTINCT FROM 'object' OR nullif(msg_id, '') IS NULL
       OR jsonb_typeof(res) IS DISTINCT FROM 'object'
       OR res->>'algorithm' IS DISTINCT FROM 'AEAD_AES_256_GCM'
       OR res->>'ciphertext' IS NULL OR res->>'nonce' IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    FOREACH s IN ARRAY p_secrets LOOP
        BEGIN
            plain := callback_center._aes256gcm_decrypt(convert_to(s, 'UTF8'),
                convert_to(res->>'nonce', 'UTF8'),
                convert_to(coalesce(res->>'associated_data', ''), 'UTF8'),
                decode(res->>'ciphertext', 'base64'));
        EXCEPTION WHEN invalid_parameter_value THEN
            plain := NULL;
        END;
        EXIT WHEN plain IS NOT NULL;
    END LOOP;
    IF plain IS NULL THEN
        failure := 'decryption_failed'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        tx := convert_from(plain, 'UTF8')::jsonb;
    EXCEPTION WHEN OTHERS THEN
        tx := NULL;
    END;
    IF jsonb_typeof(tx) IS DISTINCT FROM 'object' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    -- Only transactions move payments; refunds and other resources are
    -- acknowledged and recorded (verdict NULL).
    IF coalesce(res->>'original_type', 'transaction') = 'transaction'
       AND coalesce(event_type, '') LIKE 'TRANSACTION.%' THEN
        order_id := tx->>'out_trade_no';
        txn_id := tx->>'transaction_id';
        verdict := CASE tx->>'trade_state'
            WHEN 'SUCCESS' THEN 'success'
            WHEN 'CLOSED' THEN 'failure'
            WHEN 'REVOKED' THEN 'failure'
            WHEN 'PAYERROR' THEN 'failure' END;
        total := tx->'amount'->>'total';
        currency := tx->'amount'->>'currency';
        IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                    OR total IS NULL OR total !~ '^[0-9]{1,15}$'
                                    OR nullif(currency, '') IS NULL) THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
END
$$;

-- bytes as text when they are printable ASCII, else NULL.
CREATE FUNCTION callback_center._channel_ascii(p bytea)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT CASE WHEN pg_catalog.encode(p, 'hex') ~ '^([2-6][0-9a-f]|7[0-9a-e])*$'
                THEN pg_catalog.convert_from(p, 'UTF8') END
$$;

-- Alipay asynchronous notifications (RSA2).  The body is the form as
-- posted; names and values are %-decoded to the bytes of the form's
-- charset (UTF-8 or GBK), so the signed string is built from those bytes
-- as Alipay built it: every parameter but sign and sign_type, empty values
-- left out, sorted by name in byte order, joined as k=v&...
CREATE FUNCTION callback_center._alipay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[] := '{}';
    vals bytea[] := '{}';
    pair text;
    eq integer;
    n bytea;
    v bytea;
    nm text;
    charset text := 'UTF8';
    cs text;
    content bytea;
    sig bytea;
    ok boolean := false;
    s text;
    f jsonb := '{}';
    notify_time timestamptz;
    total text;
BEGIN
    IF p_body = '' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    FOREACH pair IN ARRAY string_to_array(p_body, '&') LOOP
        CONTINUE WHEN pair = '';
        eq := strpos(pair, '=');
        IF eq = 0 THEN
            n := callback_center._form_decode(pair);
            v := '';
        ELSE
            n := callback_center._form_decode(left(pair, eq - 1));
            v := callback_center._form_decode(substr(pair, eq + 1));
        END IF;
        -- Names are printable ASCII.
        IF n IS NULL OR v IS NULL OR encode(n, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e])+$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        nm := convert_from(n, 'UTF8');
        IF nm = ANY (names) THEN
            -- A parameter twice: which one did Alipay sign?
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        names := names || nm;
        vals := vals || v;
    END LOOP;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'charset')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs IN ('GBK', 'GB2312') THEN 'GBK' END;
    IF charset IS NULL OR array_position(names, 'sign') IS NULL THEN
        failure := CASE WHEN charset IS NULL THEN 'malformed_body' ELSE 'malformed_signature' END;
        fail_status := CASE WHEN charset IS NULL THEN 400 ELSE 401 END;
        RETURN;
    END IF;
    IF coalesce(callback_center._channel_ascii(vals[array_position(names, 'sign_type')]), 'RSA2') <> 'RSA2' THEN
        -- RSA (SHA1withRSA) is Alipay's legacy; only RSA2 is accepted.
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'sign')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('sign', 'sign_type') AND x.v <> '';
    FOREACH s IN ARRAY p_secrets LOOP
        ok := ok OR callback_center._rsa_sha256_check(s, coalesce(content, ''), sig) IS NULL;
    END LOOP;
    IF NOT ok THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by Alipay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('notify_id', 'notify_time', 'notify_type', 'out_trade_no',
                        'trade_no', 'trade_status', 'total_amount', 'trans_currency');
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('sign', 'sign_type', 'notify_time');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    msg_id := f->>'notify_id';
    event_type := f->>'notify_type';
    IF nullif(msg_id, '') IS NULL
       OR coalesce(f->>'notify_time', '') !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        notify_time := (f->>'notify_time')::timestamp AT TIME ZONE 'Asia/Shanghai';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF abs(extract(epoch FROM now() - notify_time))
       > extract(epoch FROM callback_center._channel_tolerance(p_tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;

    order_id := f->>'out_trade_no';
    txn_id := f->>'trade_no';
    verdict := CASE f->>'trade_status'
        WHEN 'TRADE_SUCCESS' THEN 'success'
        WHEN 'TRADE_FINISHED' THEN 'success'
        WHEN 'TRADE_CLOSED' THEN 'failure' END;
    currency := coalesce(nullif(f->>'trans_currency', ''), 'CNY');
    total := f->>'total_amount';
    IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                OR total IS NULL
                                OR total !~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$') THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    IF total ~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$' THEN
        amount_cents := (total::numeric * 100)::bigint;
    END IF;
END
$$;

-- WeChat Pay v2 payment result notifications (XML).  sign is over every
-- parameter but sign with an empty value left out, sorted by name, joined
-- as k=v&... and followed by &key=<API key>: HMAC-SHA256 under the API key
-- (sign_type HMAC-SHA256, the default here), or MD5 for a key given as
-- "md5:<key>" (the legacy default of WeChat Pay, allowed only so).  Upper
-- case hex.  v2 signs no timestamp: there is no replay window to check,
-- and a replay is a repeat of a recorded message (keyed by transaction_id).
CREATE FUNCTION callback_center._wechatpay_v2_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    doc xml;
    f jsonb;
    n integer;
    content text;
    given text;
    sign_type text;
    s text;
    key text;
    calc text;
    ok boolean := false;
BEGIN
    payload := p_body;
    IF position('<!' IN regexp_replace(p_body, '<!\[CDATA\[', '', 'g')) > 0 THEN
        -- No DTD, no comments: WeChat sends neither.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        doc := xmlparse(DOCUMENT p_body);
        SELECT jsonb_object_agg(x.name, coalesce(x.value, '')), count(*)
          INTO f, n
          FROM XMLTABLE('/xml/*' PASSING doc
                        COLUMNS name text PATH 'local-name()', value text PATH 'string(.)') x;
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF f IS NULL OR n <> (SELECT count(*) FROM jsonb_object_keys(f)) THEN
        -- A parameter twice.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    given := f->>'sign';
    IF nullif(given, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    sign_type := coalesce(nullif(f->>'sign_type', ''), 'HMAC-SHA256');
    IF sign_type NOT IN ('HMAC-SHA256', 'MD5') THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(e.key || '=' || e.value, '&' ORDER BY e.key COLLATE "C")
      INTO content
      FROM jsonb_each_text(f) e WHERE e.key <> 'sign' AND e.value <> '';
    FOREACH s IN ARRAY p_secrets LOOP
        key := regexp_replace(s, '^md5:', '');
        IF sign_type = 'HMAC-SHA256' THEN
            calc := upper(encode(callback_center._hmac_sha256(convert_to(key, 'UTF8'),
                convert_to(content || '&key=' || key, 'UTF8')), 'hex'));
        ELSIF s LIKE 'md5:%' THEN
            calc := upper(md5(convert_to(content || '&key=' || key, 'UTF8')));
        ELSE
            CONTINUE;
        END IF;
        -- Compared as digests: the time taken says nothing about the sign.
        ok := ok OR sha256(convert_to(calc, 'UTF8')) = sha256(convert_to(upper(given), 'UTF8'));
    END LOOP;
    IF NOT ok THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    IF f->>'return_code' IS DISTINCT FROM 'SUCCESS' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := f->>'transaction_id';
    txn_id := f->>'transaction_id';
    order_id := f->>'out_trade_no';
    event_type := coalesce(f->>'trade_type', 'payment');
    -- result_code FAIL is one failed attempt: the order stays payable.
    verdict := CASE f->>'result_code' WHEN 'SUCCESS' THEN 'success'
                                      WHEN 'FAIL' THEN 'attempt_failed' END;
    currency := coalesce(nullif(f->>'fee_type', ''), 'CNY');
    IF nullif(msg_id, '') IS NULL OR nullif(order_id, '') IS NULL OR verdict IS NULL
       OR coalesce(f->>'total_fee', '') !~ '^[0-9]{1,15}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    amount_cents := (f->>'total_fee')::bigint;
END
$$;

-- _channel_parse: verifies and decodes a channel provider's notification
-- and checks it against the payment it names, before anything is
-- recorded.  One row: ok with the message and the provider's
-- acknowledgement (http_status, response_body), or not ok with failure
-- (the outcome: malformed_signature, signature_expired, unknown_key,
-- key_expired, invalid_signature, malformed_body, decryption_failed,
-- unknown_order, provider_mismatch, amount_mismatch, currency_mismatch)
-- and the provider's failure answer.  payload is what record_callback
-- should hash (the body; for Alipay the signed parameters without
-- notify_time, which changes on every resend).  Raises only for misuse:
-- CB033 unknown provider, 55000 no key loaded, 22023 not a channel.
CREATE FUNCTION callback_center._channel_parse(
    p_scheme text, p_provider text, p_headers jsonb, p_body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_variable
DECLARE
    prov callback_center.providers;
    m record;
    o record;
    a record;
BEGIN
    IF p_scheme IS NULL OR p_provider IS NULL OR p_headers IS NULL OR p_body IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'scheme, provider, headers and body must not be null';
    END IF;
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> p_scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', p_provider, prov.scheme, p_scheme);
    END IF;

    IF p_scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'alipay' THEN
        m := callback_center._alipay_parse(p_provider, prov.secrets, prov.tolerance,
                                           p_headers, p_body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;

    -- The message must be about a payment we have, for its amount and
    -- currency, and from the provider it is with.  Checked here so that a
    -- refusal records nothing; _apply_payment_result checks again under
    -- the row locks.
    IF m.failure IS NULL AND m.verdict IS NOT NULL THEN
        SELECT x.currency AS order_currency, p.amount_cents AS pay_cents, p.provider AS pay_provider
          INTO o
          FROM callback_center.orders x
          LEFT JOIN callback_center.payments p ON p.order_id = x.order_id
         WHERE x.order_id = m.order_id;
        IF NOT FOUND OR o.pay_cents IS NULL THEN
            m.failure := 'unknown_order'; m.fail_status := 404;
        ELSIF o.pay_provider IS NOT NULL AND o.pay_provider <> p_provider THEN
            m.failure := 'provider_mismatch'; m.fail_status := 400;
        ELSIF m.amount_cents IS DISTINCT FROM o.pay_cents THEN
            m.failure := 'amount_mismatch'; m.fail_status := 400;
        ELSIF m.currency IS DISTINCT FROM o.order_currency THEN
            m.failure := 'currency_mismatch'; m.fail_status := 400;
        END IF;
    END IF;

    a := callback_center._channel_answer(p_scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
END
$$;

REVOKE ALL ON FUNCTION
    callback_center._key_info(text),
    callback_center._rsa_sha256_check(text, bytea, bytea),
    callback_center._aes256gcm_decrypt(bytea, bytea, bytea, bytea),
    callback_center._form_decode(text),
    callback_center._channel_check_secret(text, text),
    callback_center.set_platform_keys(text, jsonb),
    callback_center._channel_header(jsonb, text),
    callback_center._channel_answer(text, boolean, integer, text),
    callback_center._channel_tolerance(interval),
    callback_center._wechatpay_v3_parse(text, text[], interval, jsonb, text),
    callback_center._channel_ascii(bytea),
    callback_center._alipay_parse(text, text[], interval, jsonb, text),
    callback_center._wechatpay_v2_parse(text, text[], interval, jsonb, text),
    callback_center._hmac_sha256(bytea, bytea),
    callback_center._channel_parse(text, text, jsonb, text)
FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center.set_platform_keys(text, jsonb)
    TO callback_center_admin;

CREATE OR REPLACE FUNCTION callback_center.set_provider(
    p_name text, p_scheme text, p_secrets text[],
    p_tolerance interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    PERFORM callback_center._require_key(p_name, 'provider', 63);
    PERFORM callback_center._require(p_scheme, 'scheme');
    IF p_secrets IS NULL THEN
        p_secrets := ARRAY[callback_center.new_webhook_secret()];
    END IF;
    -- Payment channels (45_channels.sql): wechatpay_v3, wechatpay_v2, alipay.
    IF p_scheme NOT IN ('standard_webhooks', 'stripe', 'wechatpay_v3', 'wechatpay_v2', 'alipay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('unknown signature scheme "%s"', p_scheme),
            HINT = 'The schemes are standard_webhooks, stripe, wechatpay_v3, wechatpay_v2 and alipay.';
    END IF;
    IF cardinality(p_secrets) = 0 OR array_position(p_secrets, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'secrets must hold at least one secret and no nulls';
    END IF;
    IF p_tolerance <= interval '0' OR p_tolerance > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'tolerance must be positive and at most 100 years',
            DETAIL = format('The value given was %s.', p_tolerance);
    END IF;
    FOREACH s IN ARRAY p_secrets LOOP
        IF s = '' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'secrets must not be empty';
        END IF;
        IF p_scheme = 'standard_webhooks' THEN
            -- raises 22023 for anything but whsec_<base64>
            PERFORM callback_center.sign_webhook(s, 'probe', 0, '');
        ELSIF p_scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay') THEN
            -- Payment channels: the APIv3 key, API key, Alipay public key (22023)
            PERFORM callback_center._channel_check_secret(p_scheme, s);
        END IF;
    END LOOP;

    INSERT INTO callback_center.providers (name, scheme, secrets, tolerance)
    VALUES (p_name, p_scheme, p_secrets, p_tolerance)
    ON CONFLICT (name) DO UPDATE
       SET scheme = EXCLUDED.scheme, secrets = EXCLUDED.secrets,
           tolerance = EXCLUDED.tolerance;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_provider text := payment_callback.provider;
    cb_type text := 'payment:' || p_provider;
    scheme text;
    msg record;
    msg_id text;
    rec record;
    result text;
    refusal text;
    ack text := '{"received":true}';
    ch record;
    rec_payload text := payment_callback.body;
BEGIN
    PERFORM callback_center._require(p_provider, 'provider');
    PERFORM callback_center._require(payment_callback.headers, 'headers');
    PERFORM callback_center._require(payment_callback.body, 'body');
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = p_provider;
    -- Payment channels (45_channels.sql: wechatpay_v3, wechatpay_v2, alipay): verified,
    -- decoded and checked against the payment by _channel_parse; whatever
    -- the provider got wrong is answered in its own format, recording
    -- nothing.  Its acknowledgement replaces ack.
    IF scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay') THEN
        SELECT * INTO ch FROM callback_center._channel_parse(scheme, p_provider,
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
    -- End of the payment channels' hunk (and its END IF below).
    -- Verification comes first: a bad signature raises and records nothing.
    PERFORM callback_center.verify_signature(p_provider, payment_callback.headers, payment_callback.body);
    -- A signed body we cannot read (not JSON, \u0000, an amount beyond
    -- bigint, ids missing) will never read better: it is recorded and
    -- refused once, with 400, and every redelivery gets that answer.  An
    -- exception here made the provider redeliver it forever.
    BEGIN
        msg := callback_center._parse_payment_body(scheme, payment_callback.body);
    EXCEPTION WHEN data_exception THEN
        refusal := format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE);
    END;
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

    SELECT * INTO rec FROM callback_center.record_callback(msg_id, cb_type, rec_payload);
    IF NOT rec.is_first THEN
        IF scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay') AND (rec.payload_mismatch OR rec.status <> 2) THEN
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
    ELSE
        result := callback_center._apply_payment_result(p_provider, msg.txn_id, msg.order_id,
                                                        msg.amount_cents, msg.currency, msg.verdict,
                                                        'callback');
    END IF;

    PERFORM callback_center.complete_callback(msg_id, cb_type, true,
        jsonb_build_object('http_status', 200, 'body', ack, 'outcome', result,
                           'order_id', msg.order_id, 'txn_id', msg.txn_id,
                           'event_type', msg.event_type));
    RETURN QUERY SELECT 200, ack, true, result;
END
$$;

-- Payment channels, UnionPay and provider answers: scheme unionpay (acp
-- SDK 5.1.0, signMethod 01: SHA256withRSA over the hex SHA-256 digest of
-- the sorted parameters, by the certificate in signPubKeyCert, which must
-- chain to the root and intermediate loaded with set_platform_keys and name
-- the provider's organisation); Stripe and Standard Webhooks answer a bad,
-- stale or malformed signature (401) and an unknown order (404) instead of
-- raising CB030, CB031, CB032 and CB050 (45_channels.sql, 60_orders.sql,
-- doc/inbound.md, doc/orders.md).
ALTER TABLE callback_center.providers
    DROP CONSTRAINT providers_scheme_check,
    ADD CONSTRAINT providers_scheme_check CHECK (scheme IN ('standard_webhooks', 'stripe',
                                                            'wechatpay_v3', 'wechatpay_v2', 'alipay',
                                                            'unionpay'));

CREATE FUNCTION callback_center._x509_chain_check(certificate text, cas text[], names text[],
    OUT verdict text, OUT detail text)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_x509_chain_check_sql'
LANGUAGE C VOLATILE;

-- Checks one entry of set_provider's secrets for a channel scheme: 22023
-- with a detail that never quotes it.
CREATE OR REPLACE FUNCTION callback_center._channel_check_secret(p_scheme text, p_secret text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF p_scheme = 'wechatpay_v3' THEN
        IF octet_length(convert_to(p_secret, 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid APIv3 key',
                DETAIL = format('The key is %s bytes; WeChat Pay APIv3 keys are 32.',
                                octet_length(convert_to(p_secret, 'UTF8'))),
                HINT = 'Give the APIv3 key set in the merchant platform; platform certificates go to callback_center.set_platform_keys().';
        END IF;
    ELSIF p_scheme = 'wechatpay_v2' THEN
        IF octet_length(convert_to(regexp_replace(p_secret, '^md5:', ''), 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid API key',
                DETAIL = format('The key is %s bytes; WeChat Pay API keys are 32.',
                                octet_length(convert_to(regexp_replace(p_secret, '^md5:', ''), 'UTF8'))),
                HINT = 'Give the API key set in the merchant platform, with md5: before it to accept the legacy MD5 sign.';
        END IF;
    ELSIF p_scheme = 'alipay' THEN
        -- raises 22023 for a malformed key, not RSA, under 2048 bits
        PERFORM callback_center._key_info(p_secret);
    ELSIF p_scheme = 'unionpay' THEN
        -- The organisation the signing certificate names (the third
        -- "@" field of its common name, as UnionPay's SDK reads it).
        IF length(p_secret) > 128 OR p_secret ~ '[@[:cntrl:]]' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid UnionPay organisation name',
                DETAIL = 'The name is at most 128 characters, without "@" or control characters.',
                HINT = 'Give the organisation of UnionPay''s signing certificates, 中国银联股份有限公司 (the default when secrets are NULL); the certificates go to callback_center.set_platform_keys().';
        END IF;
    END IF;
END
$$;

-- set_platform_keys: replaces the platform keys of a wechatpay_v3 or
-- unionpay provider with keys, a JSON object of name to PEM.  wechatpay_v3:
-- serial (or public-key id) to platform certificate or public key; pass the
-- old and the new key together while WeChat Pay rotates.  unionpay: any
-- name to the UnionPay root certificate(s) (self-signed: the trust
-- anchors) and intermediate certificate(s), which must chain to a root.
-- Each key is checked (RSA, 2048 bits or more, a certificate valid now
-- whose serial is its name for wechatpay_v3); returns how many are loaded.
CREATE OR REPLACE FUNCTION callback_center.set_platform_keys(p_provider text, p_keys jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    k record;
    info record;
    chk record;
    cas text[];
    why text;
    n integer := 0;
BEGIN
    IF p_provider IS NULL OR p_keys IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'provider and keys must not be null';
    END IF;
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = p_provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'Create it first with callback_center.set_provider(name, ''wechatpay_v3'', ARRAY[apiv3_key]) or set_provider(name, ''unionpay'', NULL).';
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not wechatpay_v3 or unionpay', p_provider, v_scheme);
    END IF;
    IF jsonb_typeof(p_keys) <> 'object' OR p_keys = '{}' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'keys must be a non-empty JSON object of serial to PEM';
    END IF;

    DELETE FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
    FOR k IN SELECT e.key, e.value FROM jsonb_each(p_keys) e ORDER BY e.key LOOP
        IF jsonb_typeof(k.value) <> 'string' OR k.key = '' OR length(k.key) > 128 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid platform key',
                DETAIL = 'Every key needs a non-empty serial of at most 128 characters and a PEM string.';
        END IF;
        BEGIN
            info := callback_center._key_info(k.value #>> '{}');
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = why,
                HINT = 'Give the platform certificate or platform public key as PEM.';
        END;
        IF v_scheme = 'wechatpay_v3' AND info.kind = 'certificate' AND upper(k.key) <> info.serial THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = 'The certificate''s serial number is not the name it is given.',
                HINT = 'Name each certificate by its serial number in hex, as the Wechatpay-Serial header carries it.';
        END IF;
        IF v_scheme = 'unionpay' AND info.kind <> 'certificate' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid UnionPay certificate "%s"', k.key),
                DETAIL = 'UnionPay''s root and intermediate are X.509 certificates, not public keys.';
        END IF;
        INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)
        VALUES (p_provider, k.key, info.kind, k.value #>> '{}', info.not_after);
        n := n + 1;
    END LOOP;

    IF v_scheme = 'unionpay' THEN
        -- Every certificate must chain to a self-signed root among them
        -- (a root chains to itself), or no notification ever verifies.
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
          FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = p_provider ORDER BY pk.key_id LOOP
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    MESSAGE = format('invalid UnionPay certificate "%s"', k.key_id),
                    DETAIL = chk.detail,
                    HINT = 'Load the UnionPay root certificate and the intermediate certificate together (acp_prod_root.cer and acp_prod_middle.cer of the SDK).';
            END IF;
        END LOOP;
    END IF;
    RETURN n;
END
$$;

COMMENT ON FUNCTION callback_center.set_platform_keys(text, jsonb) IS
    'Replaces a wechatpay_v3 provider''s platform certificates and public keys, by serial, or a unionpay provider''s root and intermediate certificates (admin)';

-- The answer a channel's provider expects: success, or failure with a
-- short reason (never key material or the request).
CREATE OR REPLACE FUNCTION callback_center._channel_answer(
    p_scheme text, p_ok boolean, p_status integer, p_reason text,
    OUT http_status integer, OUT response_body text)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF p_scheme = 'wechatpay_v3' THEN
        -- WeChat Pay: 200 or 204 with no body acknowledges; any 4xx/5xx
        -- with {"code":"FAIL","message":...} makes it resend.
        IF p_ok THEN
            http_status := 200;
            response_body := '';
        ELSE
            http_status := p_status;
            response_body := jsonb_build_object('code', 'FAIL', 'message', p_reason)::text;
        END IF;
    ELSIF p_scheme = 'wechatpay_v2' THEN
        -- WeChat Pay v2: return_code SUCCESS acknowledges; FAIL (or no
        -- answer) makes it resend.
        http_status := CASE WHEN p_ok THEN 200 ELSE p_status END;
        response_body := format('<xml><return_code><![CDATA[%s]]></return_code>'
                                '<return_msg><![CDATA[%s]]></return_msg></xml>',
                                CASE WHEN p_ok THEN 'SUCCESS' ELSE 'FAIL' END,
                                CASE WHEN p_ok THEN 'OK' ELSE p_reason END);
    ELSIF p_scheme = 'alipay' THEN
        -- Alipay: the exact body "success" acknowledges; anything else
        -- makes it resend.
        http_status := CASE WHEN p_ok THEN 200 ELSE p_status END;
        response_body := CASE WHEN p_ok THEN 'success' ELSE 'fail' END;
    ELSIF p_scheme = 'unionpay' THEN
        -- UnionPay: HTTP 200 acknowledges (the acp SDK's demo answers
        -- "ok"); any other status makes it resend.
        http_status := CASE WHEN p_ok THEN 200 ELSE p_status END;
        response_body := CASE WHEN p_ok THEN 'ok' ELSE 'fail' END;
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;
END
$$;

-- UnionPay (China UnionPay online payments, acp SDK 5.1.0) back-end
-- notifications.  The body is the form as posted; names and values are
-- %-decoded to the bytes of the form's encoding (UTF-8 or GBK).  The
-- signed string is every parameter but signature, empty values left out
-- (the SDK neither sends nor reads them), sorted by name, joined as
-- k=v&...; signature is SHA256withRSA (signMethod 01, version 5.1.0) over
-- the lower-case hex SHA-256 digest of it, by the key of the certificate
-- in signPubKeyCert, which must chain to the root and intermediate
-- certificates loaded with set_platform_keys, be valid now and name one of
-- the provider's organisation names (p_secrets).  UnionPay signs no
-- notification time: a replay is a repeat of the recorded message, keyed
-- by queryId and txnType.
CREATE FUNCTION callback_center._unionpay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[] := '{}';
    vals bytea[] := '{}';
    pair text;
    eq integer;
    n bytea;
    v bytea;
    nm text;
    charset text;
    cs text;
    cert bytea;
    cert_pem text;
    content bytea;
    sig bytea;
    cas text[];
    chk record;
    f jsonb;
    total text;
BEGIN
    IF p_body = '' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    FOREACH pair IN ARRAY string_to_array(p_body, '&') LOOP
        CONTINUE WHEN pair = '';
        eq := strpos(pair, '=');
        IF eq = 0 THEN
            n := callback_center._form_decode(pair);
            v := '';
        ELSE
            n := callback_center._form_decode(left(pair, eq - 1));
            v := callback_center._form_decode(substr(pair, eq + 1));
        END IF;
        -- Names are printable ASCII.
        IF n IS NULL OR v IS NULL OR encode(n, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e])+$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        nm := convert_from(n, 'UTF8');
        IF nm = ANY (names) THEN
            -- A parameter twice: which one did UnionPay sign?
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        names := names || nm;
        vals := vals || v;
    END LOOP;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'encoding')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs = 'GBK' THEN 'GBK' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- signMethod 01 of version 5.1.0 only: 5.0.0 signs SHA-1 digests with
    -- a certificate chosen by certId, 11 and 12 are symmetric keys.
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        sig := NULL;
    END;
    IF sig IS NULL OR sig = '' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;

    SELECT array_agg(pk.pem) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = p_provider;
    IF cas IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no UnionPay certificates', p_provider),
            HINT = 'An administrator loads the root and intermediate certificates with callback_center.set_platform_keys().';
    END IF;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, cas, p_secrets);
    IF chk.verdict <> 'ok' THEN
        failure := CASE chk.verdict WHEN 'malformed' THEN 'malformed_signature'
                                    WHEN 'expired' THEN 'key_expired'
                                    WHEN 'wrong_name' THEN 'wrong_organisation'
                                    ELSE 'untrusted_key' END;
        fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by UnionPay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('orderId', 'queryId', 'txnType', 'txnSubType', 'respCode',
                        'txnAmt', 'currencyCode');
        -- What a resend repeats: the signed parameters but the certificate
        -- (UnionPay may sign a resend under its next certificate).
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('signature', 'signPubKeyCert') AND x.v <> '';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF nullif(f->>'queryId', '') IS NULL OR nullif(f->>'txnType', '') IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := (f->>'queryId') || ':' || (f->>'txnType');
    event_type := 'txnType ' || (f->>'txnType') || coalesce('/' || (f->>'txnSubType'), '');
    IF f->>'txnType' = '01' THEN
        -- Consumption: respCode 00 (success) and A6 (success with a
        -- defect) pay; any other is one failed attempt.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'success' ELSE 'attempt_failed' END;
        -- ISO 4217 numeric codes.
        currency := CASE f->>'currencyCode'
            WHEN '156' THEN 'CNY' WHEN '344' THEN 'HKD' WHEN '446' THEN 'MOP'
            WHEN '901' THEN 'TWD' WHEN '840' THEN 'USD' WHEN '978' THEN 'EUR'
            WHEN '826' THEN 'GBP' WHEN '392' THEN 'JPY' WHEN '410' THEN 'KRW'
            WHEN '702' THEN 'SGD' WHEN '036' THEN 'AUD' WHEN '124' THEN 'CAD'
            ELSE f->>'currencyCode' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$'
           OR nullif(currency, '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    -- Other transaction types (refunds 04, cancellations 31, ...) are
    -- recorded and acknowledged (verdict NULL).
END
$$;

-- _channel_parse: verifies and decodes a channel provider's notification
-- and checks it against the payment it names, before anything is
-- recorded.  One row: ok with the message and the provider's
-- acknowledgement (http_status, response_body), or not ok with failure
-- (the outcome: malformed_signature, signature_expired, unknown_key,
-- key_expired, untrusted_key, wrong_organisation, invalid_signature,
-- malformed_body, decryption_failed, unknown_order, provider_mismatch,
-- amount_mismatch, currency_mismatch) and the provider's failure answer.
-- payload is what record_callback should hash (the body; for Alipay the
-- signed parameters without notify_time, which changes on every resend;
-- for UnionPay the signed parameters without the certificate).  Raises only for misuse:
-- CB033 unknown provider, 55000 no key loaded, 22023 not a channel.
CREATE OR REPLACE FUNCTION callback_center._channel_parse(
    p_scheme text, p_provider text, p_headers jsonb, p_body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_variable
DECLARE
    prov callback_center.providers;
    m record;
    o record;
    a record;
BEGIN
    IF p_scheme IS NULL OR p_provider IS NULL OR p_headers IS NULL OR p_body IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'scheme, provider, headers and body must not be null';
    END IF;
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> p_scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', p_provider, prov.scheme, p_scheme);
    END IF;

    IF p_scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'alipay' THEN
        m := callback_center._alipay_parse(p_provider, prov.secrets, prov.tolerance,
                                           p_headers, p_body);
    ELSIF p_scheme = 'unionpay' THEN
        m := callback_center._unionpay_parse(p_provider, prov.secrets, prov.tolerance,
                                             p_headers, p_body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;

    -- The message must be about a payment we have, for its amount and
    -- currency, and from the provider it is with.  Checked here so that a
    -- refusal records nothing; _apply_payment_result checks again under
    -- the row locks.
    IF m.failure IS NULL AND m.verdict IS NOT NULL THEN
        SELECT x.currency AS order_currency, p.amount_cents AS pay_cents, p.provider AS pay_provider
          INTO o
          FROM callback_center.orders x
          LEFT JOIN callback_center.payments p ON p.order_id = x.order_id
         WHERE x.order_id = m.order_id;
        IF NOT FOUND OR o.pay_cents IS NULL THEN
            m.failure := 'unknown_order'; m.fail_status := 404;
        ELSIF o.pay_provider IS NOT NULL AND o.pay_provider <> p_provider THEN
            m.failure := 'provider_mismatch'; m.fail_status := 400;
        ELSIF m.amount_cents IS DISTINCT FROM o.pay_cents THEN
            m.failure := 'amount_mismatch'; m.fail_status := 400;
        ELSIF m.currency IS DISTINCT FROM o.order_currency THEN
            m.failure := 'currency_mismatch'; m.fail_status := 400;
        END IF;
    END IF;

    a := callback_center._channel_answer(p_scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
END
$$;

REVOKE ALL ON FUNCTION
    callback_center._x509_chain_check(text, text[], text[]),
    callback_center._unionpay_parse(text, text[], interval, jsonb, text)
FROM PUBLIC;

-- set_provider: creates or replaces a provider.  Standard Webhooks secrets
-- must be whsec_<base64>; secrets NULL generates one (new_webhook_secret(),
-- read back with provider_secret()), so that no secret need be written
-- into a statement, which the server logs with any error it raises; a
-- tolerance of NULL means the GUC callback_center.signature_tolerance.  No
-- message raised here contains a secret.
CREATE OR REPLACE FUNCTION callback_center.set_provider(
    p_name text, p_scheme text, p_secrets text[],
    p_tolerance interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    PERFORM callback_center._require_key(p_name, 'provider', 63);
    PERFORM callback_center._require(p_scheme, 'scheme');
    IF p_secrets IS NULL AND p_scheme = 'unionpay' THEN
        -- UnionPay has no shared secret: what is kept is the organisation
        -- its signing certificates name.
        p_secrets := ARRAY['中国银联股份有限公司'];
    ELSIF p_secrets IS NULL THEN
        p_secrets := ARRAY[callback_center.new_webhook_secret()];
    END IF;
    -- Payment channels (45_channels.sql): wechatpay_v3, wechatpay_v2, alipay, unionpay.
    IF p_scheme NOT IN ('standard_webhooks', 'stripe', 'wechatpay_v3', 'wechatpay_v2', 'alipay',
                        'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('unknown signature scheme "%s"', p_scheme),
            HINT = 'The schemes are standard_webhooks, stripe, wechatpay_v3, wechatpay_v2, alipay and unionpay.';
    END IF;
    IF cardinality(p_secrets) = 0 OR array_position(p_secrets, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'secrets must hold at least one secret and no nulls';
    END IF;
    IF p_tolerance <= interval '0' OR p_tolerance > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'tolerance must be positive and at most 100 years',
            DETAIL = format('The value given was %s.', p_tolerance);
    END IF;
    FOREACH s IN ARRAY p_secrets LOOP
        IF s = '' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'secrets must not be empty';
        END IF;
        IF p_scheme = 'standard_webhooks' THEN
            -- raises 22023 for anything but whsec_<base64>
            PERFORM callback_center.sign_webhook(s, 'probe', 0, '');
        ELSIF p_scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay', 'unionpay') THEN
            -- Payment channels: the APIv3 key, API key, Alipay public key,
            -- UnionPay organisation name (22023)
            PERFORM callback_center._channel_check_secret(p_scheme, s);
        END IF;
    END LOOP;

    INSERT INTO callback_center.providers (name, scheme, secrets, tolerance)
    VALUES (p_name, p_scheme, p_secrets, p_tolerance)
    ON CONFLICT (name) DO UPDATE
       SET scheme = EXCLUDED.scheme, secrets = EXCLUDED.secrets,
           tolerance = EXCLUDED.tolerance;
END
$$;

-- A payment notification in one call: verify the signature, record it once
-- (keyed by the provider's message id: Stripe's event id, the Standard
-- Webhooks webhook-id header), move payment and order, emit the follow-ups
-- (through the transitions' emits), and return the acknowledgement to send
-- back.  A repeat returns the first answer and changes nothing.  The
-- payment row guards the money itself: a second message about a
-- transaction already applied is already_applied, and success on an order
-- that can no longer be paid is kept and emits payment.refund_required.
-- Event types we do not act on are recorded and acknowledged (ignored).
-- What the provider gets wrong is an answer, never an error: a bad,
-- stale or malformed signature (401) and an unknown order (404) record
-- nothing; a signed body that cannot be read is recorded and refused once
-- (400).  Errors are for misuse: NULL arguments (22004), an unknown
-- provider (CB033), no key loaded (55000).  See doc/orders.md.
CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_provider text := payment_callback.provider;
    cb_type text := 'payment:' || p_provider;
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
    rec_payload text := payment_callback.body;
BEGIN
    PERFORM callback_center._require(p_provider, 'provider');
    PERFORM callback_center._require(payment_callback.headers, 'headers');
    PERFORM callback_center._require(payment_callback.body, 'body');
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = p_provider;
    channel := scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay', 'unionpay');
    -- Payment channels (45_channels.sql: wechatpay_v3, wechatpay_v2, alipay, unionpay):
    -- verified, decoded and checked against the payment by _channel_parse;
    -- whatever the provider got wrong is answered in its own format,
    -- recording nothing.  Its acknowledgement replaces ack.
    IF channel THEN
        SELECT * INTO ch FROM callback_center._channel_parse(scheme, p_provider,
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
            PERFORM callback_center.verify_signature(p_provider, payment_callback.headers,
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
        -- An order we do not have: answered 404, nothing recorded, so
        -- that the provider delivers it again (the order may be in a
        -- database being restored, or the message for another system).
        -- (msg is unassigned when refusal is set.)
        IF refusal IS NULL THEN
            IF msg.verdict IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM callback_center.orders o WHERE o.order_id = msg.order_id) THEN
                RETURN QUERY SELECT 404, '{"received":false,"reason":"unknown order"}', false, 'unknown_order';
                RETURN;
            END IF;
        END IF;
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
    ELSE
        result := callback_center._apply_payment_result(p_provider, msg.txn_id, msg.order_id,
                                                        msg.amount_cents, msg.currency, msg.verdict,
                                                        'callback');
    END IF;

    PERFORM callback_center.complete_callback(msg_id, cb_type, true,
        jsonb_build_object('http_status', 200, 'body', ack, 'outcome', result,
                           'order_id', msg.order_id, 'txn_id', msg.txn_id,
                           'event_type', msg.event_type));
    RETURN QUERY SELECT 200, ack, true, result;
END
$$;

-- Workers: search_path pinned and every name qualified (issue 11); events
-- bounded by callback_center.max_event_size (SQLSTATE 54000) in every
-- writer of the outbox, and counted by the worker's claim, which makes an
-- event too large to send dead instead of failing every round.
CREATE FUNCTION callback_center._event_size(event_type text, aggregate_id text, payload jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cc_event_size_sql'
LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
REVOKE ALL ON FUNCTION callback_center._event_size(text, text, jsonb) FROM PUBLIC;

-- Raises 54000 (program_limit_exceeded) when an event is larger than
-- callback_center.max_event_size; every writer of the outbox calls it
-- (enqueue in C).
CREATE FUNCTION callback_center._check_event_size(event_type text, aggregate_id text, payload jsonb)
RETURNS void
AS 'MODULE_PATHNAME', 'cc_check_event_size_sql'
LANGUAGE C STRICT STABLE PARALLEL SAFE;
REVOKE ALL ON FUNCTION callback_center._check_event_size(text, text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION callback_center.enqueue_to(
    endpoint text, event_type text, aggregate_id text, payload jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    queued integer;
    ep_id integer;
BEGIN
    IF endpoint IS NULL OR event_type IS NULL OR aggregate_id IS NULL
       OR payload IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'endpoint, event_type, aggregate_id and payload must not be null';
    END IF;
    IF event_type = '' OR event_type = '*' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid event type "%s"', event_type),
            DETAIL = 'An event type is a non-empty name; "*" only subscribes to all of them.';
    END IF;
    PERFORM callback_center._check_event_size(event_type, aggregate_id, payload);
    ep_id := callback_center._endpoint_id(endpoint, false);
    -- An ordered endpoint delivers an aggregate's events in id order: the
    -- lock enqueue() takes (src/outbox.c) makes ids follow commit order.
    IF EXISTS (SELECT 1 FROM callback_center.endpoints e
                WHERE e.id = ep_id AND e.enabled AND e.ordered) THEN
        PERFORM callback_center._outbox_lock_aggregate(enqueue_to.aggregate_id);
    END IF;
    INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
    SELECT e.id, enqueue_to.event_type, enqueue_to.aggregate_id, enqueue_to.payload
      FROM callback_center.endpoints e
     WHERE e.id = ep_id AND e.enabled;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM callback_center._outbox_note_enqueue();
    END IF;
    RETURN queued;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.query_stuck_payments(max_payments integer DEFAULT 100,
    older_than interval DEFAULT NULL, min_interval interval DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    stuck interval := coalesce(older_than,
        current_setting('callback_center.pay_query_after', true)::interval, '5 minutes');
    again interval := coalesce(min_interval,
        current_setting('callback_center.pay_query_interval', true)::interval, '1 minute');
    r record;
    ob_id bigint;
    body jsonb;
    n integer := 0;
BEGIN
    IF max_payments IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'max_payments must not be null';
    END IF;
    IF max_payments < 1 OR stuck < interval '0' OR again < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'max_payments must be positive and the intervals not negative';
    END IF;
    FOR r IN
        SELECT p.payment_id, p.order_id, p.provider, p.amount_cents, e.id AS endpoint_id
          FROM callback_center.payments p
          JOIN callback_center.providers pr ON pr.name = p.provider
          JOIN callback_center.endpoints e ON e.name = pr.query_endpoint AND e.enabled
         WHERE p.status = 'PAYING' AND p.updated_at <= now() - stuck
           AND NOT EXISTS (SELECT 1 FROM callback_center.payment_queries q
                            WHERE q.payment_id = p.payment_id
                              AND (q.status = 'sent' OR q.queried_at > now() - again))
         ORDER BY p.updated_at
         LIMIT max_payments
           FOR UPDATE OF p SKIP LOCKED
    LOOP
        -- To the query endpoint only, whatever else subscribes.
        body := jsonb_build_object('payment_id', r.payment_id, 'order_id', r.order_id,
                                   'provider', r.provider, 'amount_cents', r.amount_cents);
        PERFORM callback_center._check_event_size('payment.query', r.order_id, body);
        INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
        VALUES (r.endpoint_id, 'payment.query', r.order_id, body)
        RETURNING id INTO ob_id;
        INSERT INTO callback_center.payment_queries
               (payment_id, order_id, provider, endpoint_id, outbox_id)
        VALUES (r.payment_id, r.order_id, r.provider, r.endpoint_id, ob_id);
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        PERFORM callback_center._outbox_note_enqueue();
    END IF;
    RETURN n;
END
$$;

-- Destinations and text from outside: endpoint URLs are checked by the URL
-- parser the delivery itself uses (libcurl's, in C) instead of regular
-- expressions, and against the new default destination rules (reserved
-- addresses refused unless listed).  _check_destination keeps its C symbol.
CREATE OR REPLACE FUNCTION callback_center._check_url(url text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_check_url'
LANGUAGE C STABLE;
REVOKE ALL ON FUNCTION callback_center._check_url(text) FROM PUBLIC;

-- Query endpoints over https (issue 11, item 6): answers to status queries
-- carry no signature the extension verifies yet, so only TLS vouches for
-- them.  set_provider_query_endpoint refuses an endpoint that is not https
-- unless allow_plain_http (recorded in providers.query_allow_plain_http,
-- shown by the view provider_query_endpoints); _apply_query_answer refuses
-- an answer from a plain-http endpoint without that opt-out (an endpoint
-- altered to http afterwards, or a former query endpoint).  Existing
-- plain-http query endpoints are not opted in: a warning names them.
ALTER TABLE callback_center.providers
    ADD COLUMN query_allow_plain_http boolean NOT NULL DEFAULT false;

CREATE FUNCTION callback_center._url_is_https(url text)
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
    SELECT lower(left(url, 8)) = 'https://'
$$;
REVOKE ALL ON FUNCTION callback_center._url_is_https(text) FROM PUBLIC;

DROP FUNCTION callback_center.set_provider_query_endpoint(text, text);
CREATE FUNCTION callback_center.set_provider_query_endpoint(provider text, endpoint text,
    allow_plain_http boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    url text;
BEGIN
    IF set_provider_query_endpoint.provider IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'provider must not be null';
    END IF;
    IF set_provider_query_endpoint.allow_plain_http IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'allow_plain_http must not be null';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM callback_center.providers p
                    WHERE p.name = set_provider_query_endpoint.provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_provider_query_endpoint.provider);
    END IF;
    IF set_provider_query_endpoint.endpoint IS NOT NULL THEN
        SELECT e.url INTO url FROM callback_center.endpoints e
         WHERE e.id = callback_center._endpoint_id(set_provider_query_endpoint.endpoint, false);
        IF NOT callback_center._url_is_https(url)
           AND NOT set_provider_query_endpoint.allow_plain_http THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = format('query endpoint "%s" does not use https',
                                 set_provider_query_endpoint.endpoint),
                DETAIL = 'Answers to status queries are applied to payments; over plain http anyone on the path can forge them.',
                HINT = 'Give the endpoint an https:// URL, or pass allow_plain_http => true to accept its answers over plain http.';
        END IF;
    END IF;
    UPDATE callback_center.providers p
       SET query_endpoint = set_provider_query_endpoint.endpoint,
           query_allow_plain_http = set_provider_query_endpoint.endpoint IS NOT NULL
                                    AND set_provider_query_endpoint.allow_plain_http
     WHERE p.name = set_provider_query_endpoint.provider;
END
$$;
REVOKE ALL ON FUNCTION callback_center.set_provider_query_endpoint(text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.set_provider_query_endpoint(text, text, boolean)
    TO callback_center_admin;

CREATE VIEW callback_center.provider_query_endpoints AS
    SELECT p.name AS provider, p.query_endpoint AS endpoint, e.url,
           p.query_allow_plain_http AS allow_plain_http
      FROM callback_center.providers p
      JOIN callback_center.endpoints e ON e.name = p.query_endpoint;
REVOKE ALL ON callback_center.provider_query_endpoints FROM PUBLIC;
GRANT SELECT ON callback_center.provider_query_endpoints TO callback_center_admin;

CREATE OR REPLACE FUNCTION callback_center._apply_query_answer(query_id bigint, answer text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    q callback_center.payment_queries;
    ep record;
    scheme text;
    msg record;
    result text;
BEGIN
    SELECT * INTO q FROM callback_center.payment_queries x WHERE x.id = query_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('payment query %s does not exist', query_id);
    END IF;
    IF q.status <> 'sent' THEN
        RETURN q.outcome;
    END IF;
    -- Only TLS vouches for an answer (no response signature is verified):
    -- one from an http endpoint counts only if the admin allowed it there.
    SELECT e.name, e.url INTO ep FROM callback_center.endpoints e WHERE e.id = q.endpoint_id;
    IF NOT FOUND OR NOT (callback_center._url_is_https(ep.url)
                         OR EXISTS (SELECT 1 FROM callback_center.providers p
                                     WHERE p.name = q.provider AND p.query_endpoint = ep.name
                                       AND p.query_allow_plain_http)) THEN
        UPDATE callback_center.payment_queries x
           SET status = 'failed', answer = _apply_query_answer.answer,
               outcome = CASE WHEN ep.name IS NULL THEN 'endpoint_gone' ELSE 'plain_http' END,
               error = CASE WHEN ep.name IS NULL THEN 'the query endpoint is gone'
                            ELSE format('the answer came over plain http from endpoint "%s", which is not allowed to answer over http (set_provider_query_endpoint''s allow_plain_http)',
                                        ep.name) END,
               finished_at = now()
         WHERE x.id = q.id;
        RETURN CASE WHEN ep.name IS NULL THEN 'endpoint_gone' ELSE 'plain_http' END;
    END IF;
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = q.provider;
    BEGIN
        msg := callback_center._parse_payment_body(scheme, coalesce(answer, ''));
    EXCEPTION WHEN data_exception THEN
        UPDATE callback_center.payment_queries x
           SET status = 'failed', answer = _apply_query_answer.answer, outcome = 'bad_answer',
               error = SQLERRM, finished_at = now()
         WHERE x.id = q.id;
        RETURN 'bad_answer';
    END;
    IF msg.order_id IS DISTINCT FROM q.order_id THEN
        UPDATE callback_center.payment_queries x
           SET status = 'failed', answer = _apply_query_answer.answer, outcome = 'bad_answer',
               error = format('the answer is about order "%s", not "%s"', msg.order_id, q.order_id),
               finished_at = now()
         WHERE x.id = q.id;
        RETURN 'bad_answer';
    END IF;
    result := callback_center._apply_payment_result(q.provider, msg.txn_id, msg.order_id,
                                                    msg.amount_cents, msg.currency, msg.verdict,
                                                    'query');
    UPDATE callback_center.payment_queries x
       SET status = 'answered', answer = _apply_query_answer.answer, outcome = result,
           finished_at = now()
     WHERE x.id = q.id;
    RETURN result;
END
$$;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.name, p.query_endpoint, e.url
          FROM callback_center.providers p
          JOIN callback_center.endpoints e ON e.name = p.query_endpoint
         WHERE NOT callback_center._url_is_https(e.url)
         ORDER BY p.name
    LOOP
        RAISE WARNING 'the answers of query endpoint "%" (provider "%", %) will be refused: it does not use https',
            r.query_endpoint, r.name, r.url
            USING HINT = 'Give the endpoint an https:// URL, or run callback_center.set_provider_query_endpoint(provider, endpoint, allow_plain_http => true).';
    END LOOP;
END
$$;

-- One NULL helper: the NULL checks of these functions are calls of
-- _require (00_schema.sql), 22004 naming each argument.  Functions that run
-- with the caller's rights (attach_state_machine, detach_state_machine,
-- apply_event, _fsm_require_machine, saga_run, _purge_check) keep their
-- inline checks: the caller may not execute _require.

CREATE OR REPLACE FUNCTION callback_center.set_stock(
    sku_id text,
    available bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
#variable_conflict use_column
DECLARE
    result callback_center.stock;
    p_sku  ALIAS FOR $1;
    p_avail ALIAS FOR $2;
    n      integer;
BEGIN
    PERFORM callback_center._require(p_sku, 'sku_id');
    PERFORM callback_center._require(p_avail, 'available');
    IF p_avail < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('available must not be negative: %s', p_avail),
            DETAIL = pg_catalog.format('SKU "%s" was given %s units.', p_sku, p_avail);
    END IF;
    LOOP
        SELECT s.slots INTO n FROM callback_center.stock AS s
         WHERE s.sku_id = p_sku FOR UPDATE;
        IF n > 0 THEN
            -- A hot SKU: the units go to its slots, evenly.
            PERFORM callback_center._stock_spread(p_sku, p_avail);
            UPDATE callback_center.stock AS s
               SET version = s.version + 1, updated_at = pg_catalog.now()
             WHERE s.sku_id = p_sku
            RETURNING s.* INTO result;
            result.available := p_avail;
            RETURN result;
        END IF;
        -- The WHERE skips a row made hot since the SELECT found none.
        INSERT INTO callback_center.stock AS s (sku_id, available, updated_at)
        VALUES (p_sku, p_avail, pg_catalog.now())
        ON CONFLICT ON CONSTRAINT stock_pkey DO UPDATE
            SET available = EXCLUDED.available,
                version = s.version + 1,
                updated_at = EXCLUDED.updated_at
            WHERE s.slots = 0
        RETURNING s.* INTO result;
        IF FOUND THEN
            RETURN result;
        END IF;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.adjust_stock(
    sku_id text,
    delta bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
#variable_conflict use_column
DECLARE
    result callback_center.stock;
    p_sku   ALIAS FOR $1;
    p_delta ALIAS FOR $2;
    cur     bigint;
    n       integer;
BEGIN
    PERFORM callback_center._require(p_sku, 'sku_id');
    PERFORM callback_center._require(p_delta, 'delta');
    SELECT s.available, s.slots INTO cur, n FROM callback_center.stock AS s
     WHERE s.sku_id = p_sku FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = pg_catalog.format('unknown SKU "%s"', p_sku),
            HINT = 'Create it with callback_center.set_stock().';
    END IF;
    IF n > 0 THEN
        -- A hot SKU: the new total is spread over its slots again, so no
        -- slot goes below zero while the total covers the change.
        cur := cur + callback_center._stock_lock_slots(p_sku);
    END IF;
    IF cur + p_delta < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', p_sku),
            DETAIL = pg_catalog.format('Adjusting by %s would leave %s units; %s are available.',
                                       p_delta, cur + p_delta, cur);
    END IF;
    IF n > 0 THEN
        PERFORM callback_center._stock_spread(p_sku, cur + p_delta);
        UPDATE callback_center.stock AS s
           SET available = 0, version = s.version + 1, updated_at = pg_catalog.now()
         WHERE s.sku_id = p_sku
        RETURNING s.* INTO result;
        result.available := cur + p_delta;
        RETURN result;
    END IF;
    UPDATE callback_center.stock AS s
       SET available = s.available + p_delta,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = p_sku
    RETURNING s.* INTO result;
    RETURN result;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.set_hot_sku(
    sku_id text,
    slots integer)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
#variable_conflict use_column
DECLARE
    result  callback_center.stock;
    p_sku   ALIAS FOR $1;
    p_slots ALIAS FOR $2;
    cur     callback_center.stock;
    total   bigint;
BEGIN
    PERFORM callback_center._require(p_sku, 'sku_id');
    PERFORM callback_center._require(p_slots, 'slots');
    IF p_slots < 1 OR p_slots > 256 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('slots must be between 1 and 256: %s', p_slots),
            HINT = 'Use 2 to 256 slots to make a SKU hot, 1 to make it normal again.';
    END IF;
    SELECT s.* INTO cur FROM callback_center.stock AS s WHERE s.sku_id = p_sku FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = pg_catalog.format('unknown SKU "%s"', p_sku),
            HINT = 'Create it with callback_center.set_stock().';
    END IF;
    IF p_slots > 1 AND cur.reserved > 0 THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = pg_catalog.format('SKU "%s" has reserved units', p_sku),
            DETAIL = pg_catalog.format('TCC tries hold %s units of it.', cur.reserved),
            HINT = 'Confirm or cancel its reservations first: a hot SKU cannot be reserved.';
    END IF;
    total := cur.available + callback_center._stock_lock_slots(p_sku);
    DELETE FROM callback_center.stock_slots AS t WHERE t.sku_id = p_sku;
    IF p_slots > 1 THEN
        INSERT INTO callback_center.stock_slots (sku_id, slot, available)
        SELECT p_sku, i, 0 FROM pg_catalog.generate_series(0, p_slots - 1) AS i;
        PERFORM callback_center._stock_spread(p_sku, total);
    END IF;
    UPDATE callback_center.stock AS s
       SET available = CASE WHEN p_slots > 1 THEN 0 ELSE total END,
           slots = CASE WHEN p_slots > 1 THEN p_slots ELSE 0 END,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = p_sku
    RETURNING s.* INTO result;
    result.available := total;
    RETURN result;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.create_state_machine(
    machine text,
    description text DEFAULT '')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'state machine name');
    IF machine = '' OR octet_length(machine) > 63 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid state machine name "%s"', machine),
            DETAIL = 'A machine name has 1 to 63 bytes.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.state_machines m
                WHERE m.machine = create_state_machine.machine) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state machine "%s" already exists', machine);
    END IF;
    INSERT INTO callback_center.state_machines (machine, description)
    VALUES (machine, coalesce(description, ''));
END
$$;

CREATE OR REPLACE FUNCTION callback_center._fsm_require_state(machine text, state text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(state, 'state');
    IF NOT EXISTS (SELECT 1 FROM callback_center.machine_states s
                    WHERE s.machine = _fsm_require_state.machine
                      AND s.state = _fsm_require_state.state) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB011',
            MESSAGE = format('unknown state "%s" in state machine "%s"', state, machine),
            HINT = 'Add it with callback_center.add_state().';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.resolve_recon_diff(diff_id bigint, note text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    d callback_center.recon_diffs;
BEGIN
    PERFORM callback_center._require(diff_id, 'diff_id');
    PERFORM callback_center._require(resolve_recon_diff.note, 'note');
    SELECT * INTO d FROM callback_center.recon_diffs x WHERE x.id = diff_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002',
            MESSAGE = format('no reconciliation difference %s', diff_id);
    END IF;
    IF d.resolution = 'resolved' THEN
        RETURN false;
    END IF;
    IF d.resolution <> 'flagged' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('reconciliation difference %s is %s, not flagged', diff_id, d.resolution),
            DETAIL = 'Only flagged differences are waiting for a person.';
    END IF;
    UPDATE callback_center.recon_diffs x
       SET resolution = 'resolved',
           note = CASE WHEN x.note IS NULL THEN resolve_recon_diff.note
                       ELSE x.note || '; ' || resolve_recon_diff.note END,
           resolved_by = session_user, resolved_at = now()
     WHERE x.id = diff_id;
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.schedule_maintenance(
    reconcile_channels text[] DEFAULT '{}',
    retention_cron text DEFAULT '*/10 * * * *',
    recon_cron text DEFAULT '30 1 * * *',
    older_than interval DEFAULT '7 days',
    attempts_older_than interval DEFAULT NULL,
    history_older_than interval DEFAULT NULL,
    batch_size integer DEFAULT 10000)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ch text;
    jobid bigint;
BEGIN
    PERFORM callback_center._require(reconcile_channels, 'reconcile_channels');
    PERFORM callback_center._require(retention_cron, 'retention_cron');
    PERFORM callback_center._require(recon_cron, 'recon_cron');
    IF array_position(reconcile_channels, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'a channel must not be null';
    END IF;
    PERFORM callback_center._purge_check(older_than, batch_size, attempts_older_than,
                                         history_older_than);
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = 'pg_cron is not installed in this database',
            HINT = 'Install pg_cron: set shared_preload_libraries = ''pg_cron'' and '
                   'cron.database_name to this database, restart, then run CREATE EXTENSION pg_cron.';
    END IF;

    EXECUTE 'SELECT cron.unschedule(jobid) FROM cron.job'
            ' WHERE jobname LIKE ''callback\_center\_recon\_%'' AND jobname <> ALL ($1)'
        USING ARRAY(SELECT 'callback_center_recon_' || c FROM unnest(reconcile_channels) c);

    -- A CALL alone in the job: pg_cron runs it outside a transaction block,
    -- so the procedure may commit after each batch.
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO jobid
        USING 'callback_center_retention', retention_cron,
              format('CALL callback_center.purge_in_batches(older_than => %L, batch_size => %s,'
                     ' attempts_older_than => %L, history_older_than => %L)',
                     older_than, batch_size, attempts_older_than, history_older_than);
    RETURN NEXT jobid;
    FOREACH ch IN ARRAY reconcile_channels LOOP
        EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO jobid
            USING 'callback_center_recon_' || ch, recon_cron,
                  format('SELECT * FROM callback_center.reconcile(%L, current_date - 1)', ch);
        RETURN NEXT jobid;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.close_expired_orders(max_orders integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(max_orders, 'max_orders');
    IF max_orders < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('max_orders must be positive, got %s', max_orders);
    END IF;
    RETURN callback_center._close_locked_orders(ARRAY(
        SELECT d.order_id FROM callback_center._orders_due d
         ORDER BY d.pay_deadline
         LIMIT max_orders
           FOR UPDATE SKIP LOCKED));
END
$$;

CREATE OR REPLACE FUNCTION callback_center.set_provider_query_endpoint(provider text, endpoint text,
    allow_plain_http boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    url text;
BEGIN
    PERFORM callback_center._require(set_provider_query_endpoint.provider, 'provider');
    PERFORM callback_center._require(set_provider_query_endpoint.allow_plain_http,
                                     'allow_plain_http');
    IF NOT EXISTS (SELECT 1 FROM callback_center.providers p
                    WHERE p.name = set_provider_query_endpoint.provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_provider_query_endpoint.provider);
    END IF;
    IF set_provider_query_endpoint.endpoint IS NOT NULL THEN
        SELECT e.url INTO url FROM callback_center.endpoints e
         WHERE e.id = callback_center._endpoint_id(set_provider_query_endpoint.endpoint, false);
        IF NOT callback_center._url_is_https(url)
           AND NOT set_provider_query_endpoint.allow_plain_http THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = format('query endpoint "%s" does not use https',
                                 set_provider_query_endpoint.endpoint),
                DETAIL = 'Answers to status queries are applied to payments; over plain http anyone on the path can forge them.',
                HINT = 'Give the endpoint an https:// URL, or pass allow_plain_http => true to accept its answers over plain http.';
        END IF;
    END IF;
    UPDATE callback_center.providers p
       SET query_endpoint = set_provider_query_endpoint.endpoint,
           query_allow_plain_http = set_provider_query_endpoint.endpoint IS NOT NULL
                                    AND set_provider_query_endpoint.allow_plain_http
     WHERE p.name = set_provider_query_endpoint.provider;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.query_stuck_payments(max_payments integer DEFAULT 100,
    older_than interval DEFAULT NULL, min_interval interval DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    stuck interval := coalesce(older_than,
        current_setting('callback_center.pay_query_after', true)::interval, '5 minutes');
    again interval := coalesce(min_interval,
        current_setting('callback_center.pay_query_interval', true)::interval, '1 minute');
    r record;
    ob_id bigint;
    body jsonb;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_payments, 'max_payments');
    IF max_payments < 1 OR stuck < interval '0' OR again < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'max_payments must be positive and the intervals not negative';
    END IF;
    FOR r IN
        SELECT p.payment_id, p.order_id, p.provider, p.amount_cents, e.id AS endpoint_id
          FROM callback_center.payments p
          JOIN callback_center.providers pr ON pr.name = p.provider
          JOIN callback_center.endpoints e ON e.name = pr.query_endpoint AND e.enabled
         WHERE p.status = 'PAYING' AND p.updated_at <= now() - stuck
           AND NOT EXISTS (SELECT 1 FROM callback_center.payment_queries q
                            WHERE q.payment_id = p.payment_id
                              AND (q.status = 'sent' OR q.queried_at > now() - again))
         ORDER BY p.updated_at
         LIMIT max_payments
           FOR UPDATE OF p SKIP LOCKED
    LOOP
        -- To the query endpoint only, whatever else subscribes.
        body := jsonb_build_object('payment_id', r.payment_id, 'order_id', r.order_id,
                                   'provider', r.provider, 'amount_cents', r.amount_cents);
        PERFORM callback_center._check_event_size('payment.query', r.order_id, body);
        INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
        VALUES (r.endpoint_id, 'payment.query', r.order_id, body)
        RETURNING id INTO ob_id;
        INSERT INTO callback_center.payment_queries
               (payment_id, order_id, provider, endpoint_id, outbox_id)
        VALUES (r.payment_id, r.order_id, r.provider, r.endpoint_id, ob_id);
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        PERFORM callback_center._outbox_note_enqueue();
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.apply_query_answers(max_queries integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r record;
    body text;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_queries, 'max_queries');
    IF max_queries < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('max_queries must be positive, got %s', max_queries);
    END IF;
    FOR r IN
        SELECT q.id, q.outbox_id, ob.status AS event_status, ob.last_error
          FROM callback_center.payment_queries q
          LEFT JOIN callback_center.outbox ob ON ob.id = q.outbox_id
         WHERE q.status = 'sent'
           AND (ob.id IS NULL OR ob.status IN ('delivered', 'dead'))
         ORDER BY q.id
         LIMIT max_queries
           FOR UPDATE OF q SKIP LOCKED
    LOOP
        n := n + 1;
        IF r.event_status IS DISTINCT FROM 'delivered' THEN
            UPDATE callback_center.payment_queries x
               SET status = 'failed', finished_at = now(),
                   error = CASE WHEN r.event_status IS NULL THEN 'the query event is gone'
                                ELSE format('the query was not delivered: %s', r.last_error) END
             WHERE x.id = r.id;
            CONTINUE;
        END IF;
        SELECT a.response_body INTO body FROM callback_center.delivery_attempts a
         WHERE a.outbox_id = r.outbox_id AND a.http_status BETWEEN 200 AND 299
         ORDER BY a.id DESC LIMIT 1;
        BEGIN
            PERFORM callback_center._apply_query_answer(r.id, body);
        EXCEPTION WHEN OTHERS THEN
            UPDATE callback_center.payment_queries x
               SET status = 'failed', answer = body, outcome = 'error',
                   error = format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE), finished_at = now()
             WHERE x.id = r.id;
        END;
    END LOOP;
    RETURN n;
END
$$;

-- Stock keys: set_stock bounds a new SKU id like every key (200 bytes, 22023);
-- deduct_stock does the same in C.
CREATE OR REPLACE FUNCTION callback_center.set_stock(
    sku_id text,
    available bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
#variable_conflict use_column
DECLARE
    result callback_center.stock;
    p_sku  ALIAS FOR $1;
    p_avail ALIAS FOR $2;
    n      integer;
BEGIN
    PERFORM callback_center._require_key(p_sku, 'sku_id');
    PERFORM callback_center._require(p_avail, 'available');
    IF p_avail < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('available must not be negative: %s', p_avail),
            DETAIL = pg_catalog.format('SKU "%s" was given %s units.', p_sku, p_avail);
    END IF;
    LOOP
        SELECT s.slots INTO n FROM callback_center.stock AS s
         WHERE s.sku_id = p_sku FOR UPDATE;
        IF n > 0 THEN
            -- A hot SKU: the units go to its slots, evenly.
            PERFORM callback_center._stock_spread(p_sku, p_avail);
            UPDATE callback_center.stock AS s
               SET version = s.version + 1, updated_at = pg_catalog.now()
             WHERE s.sku_id = p_sku
            RETURNING s.* INTO result;
            result.available := p_avail;
            RETURN result;
        END IF;
        -- The WHERE skips a row made hot since the SELECT found none.
        INSERT INTO callback_center.stock AS s (sku_id, available, updated_at)
        VALUES (p_sku, p_avail, pg_catalog.now())
        ON CONFLICT ON CONSTRAINT stock_pkey DO UPDATE
            SET available = EXCLUDED.available,
                version = s.version + 1,
                updated_at = EXCLUDED.updated_at
            WHERE s.slots = 0
        RETURNING s.* INTO result;
        IF FOUND THEN
            RETURN result;
        END IF;
    END LOOP;
END
$fn$;

-- Key limits: state and event names are bounded like every key (200 bytes,
-- 22023).
CREATE OR REPLACE FUNCTION callback_center.add_state(
    machine text,
    state text,
    is_initial boolean DEFAULT false,
    is_final boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(state, 'state');
    PERFORM callback_center._require(is_initial, 'is_initial');
    PERFORM callback_center._require(is_final, 'is_final');
    PERFORM callback_center._fsm_require_machine(machine);
    IF state = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'state name cannot be empty';
    END IF;
    PERFORM callback_center._require_key(state, 'state');
    IF EXISTS (SELECT 1 FROM callback_center.machine_states s
                WHERE s.machine = add_state.machine AND s.state = add_state.state) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state "%s" already exists in state machine "%s"', state, machine);
    END IF;
    INSERT INTO callback_center.machine_states (machine, state, is_initial, is_final)
    VALUES (machine, state, is_initial, is_final);
END
$$;

CREATE OR REPLACE FUNCTION callback_center.add_transition(
    machine text,
    from_state text,
    to_state text,
    event text,
    emits text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(from_state, 'from_state');
    PERFORM callback_center._require(to_state, 'to_state');
    PERFORM callback_center._require(event, 'event');
    PERFORM callback_center._require(emits, 'emits');
    PERFORM callback_center._require(array_position(emits, NULL) IS NULL OR NULL, 'an element of emits');
    PERFORM callback_center._fsm_require_machine(machine);
    PERFORM callback_center._fsm_require_state(machine, from_state);
    PERFORM callback_center._fsm_require_state(machine, to_state);
    IF event = '' OR '' = ANY (emits) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'event names cannot be empty';
    END IF;
    PERFORM callback_center._require_key(event, 'event');
    PERFORM callback_center._require_key(e, 'an event of emits') FROM unnest(emits) AS e;
    IF from_state = to_state THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('transition "%s" -> "%s" does not change the state', from_state, to_state),
            DETAIL = 'The trigger ignores updates that keep the state, so such a transition could never fire.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.machine_states s
                WHERE s.machine = add_transition.machine
                  AND s.state = add_transition.from_state AND s.is_final) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('state "%s" of state machine "%s" is final', from_state, machine),
            DETAIL = 'No transition may leave a final state.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.transitions t
                WHERE t.machine = add_transition.machine
                  AND t.from_state = add_transition.from_state
                  AND (t.to_state = add_transition.to_state OR t.event = add_transition.event)) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state machine "%s" already has a transition "%s" -> "%s" or event "%s" from "%s"',
                             machine, from_state, to_state, event, from_state),
            HINT = 'Each pair of states has at most one transition and each event at most one target per state.';
    END IF;
    INSERT INTO callback_center.transitions (machine, from_state, to_state, event, emits)
    VALUES (machine, from_state, to_state, event, emits);
END
$$;

-- Access per database (issue 11): membership of callback_center_app or
-- callback_center_admin counts only where the login also has USAGE on this
-- schema, granted in each database.  0.1.0 granted USAGE to the two
-- cluster-wide roles, so a member reached every database.  A grant made
-- here would be recorded as the extension's initial privilege, which
-- pg_dump leaves out and a restore into a fresh install would lose: the
-- DBA grants each login before updating (README, Upgrading), and members
-- still without a grant of their own are named in a warning.
DO $access$
DECLARE
    missing text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(r.rolname), ', ' ORDER BY r.rolname)
      INTO missing
      FROM pg_catalog.pg_roles r
     WHERE NOT r.rolsuper
       AND r.rolname NOT IN ('callback_center_app', 'callback_center_admin')
       AND (pg_catalog.pg_has_role(r.oid, 'callback_center_app', 'MEMBER')
            OR pg_catalog.pg_has_role(r.oid, 'callback_center_admin', 'MEMBER'))
       AND NOT EXISTS (
           SELECT 1
             FROM pg_catalog.pg_namespace n,
                  pg_catalog.aclexplode(n.nspacl) a
            WHERE n.nspname = 'callback_center'
              AND a.privilege_type = 'USAGE'
              AND a.grantee <> ALL (ARRAY['callback_center_app'::regrole,
                                          'callback_center_admin'::regrole]::oid[])
              AND (a.grantee = 0 OR pg_catalog.pg_has_role(r.oid, a.grantee, 'MEMBER')));
    IF missing IS NOT NULL THEN
        RAISE WARNING 'these members of callback_center_app or callback_center_admin lose access to callback_center in database %: %',
            pg_catalog.current_database(), missing
            USING DETAIL = 'Membership counts only in databases where the role also has USAGE on schema callback_center.',
                  HINT = pg_catalog.format('Grant each that uses this database: GRANT USAGE ON SCHEMA callback_center TO %s;', missing);
    END IF;
END
$access$;
REVOKE USAGE ON SCHEMA callback_center FROM callback_center_app, callback_center_admin;

-- The workers' role (issue 11): the two workers connect as the bootstrap
-- superuser and run each transaction as callback_center_worker
-- (src/worker_role.c), which holds only the queue tables and the jobs'
-- functions; the two jobs helpers they call directly run as their owner.
DO $worker_role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'callback_center_worker') THEN
        CREATE ROLE callback_center_worker NOLOGIN;
    END IF;
END
$worker_role$;
GRANT USAGE ON SCHEMA callback_center TO callback_center_worker;
GRANT SELECT, UPDATE ON callback_center.outbox TO callback_center_worker;
GRANT SELECT ON callback_center.endpoints, callback_center.endpoint_secrets,
    callback_center.retry_schedules TO callback_center_worker;
GRANT UPDATE (enabled, updated_at) ON callback_center.endpoints TO callback_center_worker;
GRANT EXECUTE ON FUNCTION callback_center._event_size(text, text, jsonb) TO callback_center_worker;
GRANT INSERT ON callback_center.delivery_attempts TO callback_center_worker;
GRANT SELECT, INSERT, UPDATE ON callback_center.endpoint_state TO callback_center_worker;
ALTER FUNCTION callback_center._note_close_failure(text, text) SECURITY DEFINER;
ALTER FUNCTION callback_center._close_order(text) SECURITY DEFINER;
GRANT EXECUTE ON FUNCTION callback_center.close_expired_orders(integer),
    callback_center.query_stuck_payments(integer, interval, interval),
    callback_center.apply_query_answers(integer),
    callback_center._close_order(text),
    callback_center._note_close_failure(text, text)
    TO callback_center_worker;
GRANT SELECT ON callback_center._orders_due TO callback_center_worker;

-- Argument checks: the remaining inline NULL checks go through _require
-- (same messages; several arguments checked at once keep their one message).

CREATE OR REPLACE FUNCTION callback_center._endpoint_id(name text, lock_row boolean)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    found_id integer;
BEGIN
    PERFORM callback_center._require(name, 'endpoint name');
    IF lock_row THEN
        SELECT e.id INTO found_id FROM callback_center.endpoints e
         WHERE e.name = _endpoint_id.name FOR UPDATE;
    ELSE
        SELECT e.id INTO found_id FROM callback_center.endpoints e
         WHERE e.name = _endpoint_id.name;
    END IF;
    IF found_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CB040',
            MESSAGE = format('unknown endpoint "%s"', name),
            HINT = 'The endpoint_config view lists the endpoints.';
    END IF;
    RETURN found_id;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._endpoint_apply(id integer, options jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    known constant text[] := ARRAY['url', 'event_types', 'timeout_ms',
        'retry_schedule', 'max_attempts', 'rate_limit_per_s',
        'breaker_failure_ratio', 'breaker_window_s', 'breaker_min_requests',
        'breaker_open_ms', 'is_core', 'ordered', 'enabled'];
    bad text;
    k text;
    v jsonb;
    ep callback_center.endpoints;
    n numeric;
BEGIN
    PERFORM callback_center._require(options, 'options');
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'options must be a JSON object',
            DETAIL = format('A JSON %s was given.', jsonb_typeof(options));
    END IF;
    SELECT string_agg(format('"%s"', o), ', ' ORDER BY o) INTO bad
      FROM jsonb_object_keys(options) o
     WHERE o <> ALL (known);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('unknown endpoint option %s', bad),
            HINT = format('Known options: %s.', array_to_string(known, ', '));
    END IF;

    SELECT * INTO ep FROM callback_center.endpoints e WHERE e.id = _endpoint_apply.id;
    FOR k, v IN SELECT * FROM jsonb_each(options)
    LOOP
        CASE k
        WHEN 'url' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "url" must be a string';
            END IF;
            ep.url := callback_center._check_url(v #>> '{}');
        WHEN 'event_types' THEN
            IF jsonb_typeof(v) <> 'array' OR jsonb_array_length(v) = 0
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(v) x
                           WHERE jsonb_typeof(x) <> 'string' OR x #>> '{}' = '') THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "event_types" must be a non-empty array of non-empty strings';
            END IF;
            ep.event_types := ARRAY(SELECT jsonb_array_elements_text(v));
        WHEN 'timeout_ms' THEN
            ep.timeout_ms := callback_center._option_int(k, v, 1, 600000);
        WHEN 'retry_schedule' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "retry_schedule" must be a string';
            END IF;
            IF NOT EXISTS (SELECT 1 FROM callback_center.retry_schedules s
                            WHERE s.name = v #>> '{}') THEN
                RAISE EXCEPTION USING ERRCODE = '42704',
                    MESSAGE = format('retry schedule "%s" does not exist', v #>> '{}'),
                    HINT = 'The retry_schedules table lists them.';
            END IF;
            ep.retry_schedule := v #>> '{}';
        WHEN 'max_attempts' THEN
            ep.max_attempts := CASE WHEN jsonb_typeof(v) = 'null' THEN NULL
                ELSE callback_center._option_int(k, v, 1, 1000000) END;
        WHEN 'rate_limit_per_s' THEN
            IF jsonb_typeof(v) = 'null' THEN
                ep.rate_limit_per_s := NULL;
            ELSIF jsonb_typeof(v) <> 'number' OR v::numeric < 0.001 OR v::numeric > 1000000 THEN
                -- The worker's token bucket works in doubles: 1e400 was
                -- infinity there and stopped every delivery.
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "rate_limit_per_s" must be a number between 0.001 and 1000000, or null',
                    DETAIL = format('The value given was %s.', left(v::text, 40));
            ELSE
                ep.rate_limit_per_s := v::numeric;
            END IF;
        WHEN 'breaker_failure_ratio' THEN
            IF jsonb_typeof(v) <> 'number' OR v::numeric <= 0 OR v::numeric > 1 THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "breaker_failure_ratio" must be a number in (0, 1]';
            END IF;
            ep.breaker_failure_ratio := v::numeric;
        WHEN 'breaker_window_s' THEN
            ep.breaker_window_s := callback_center._option_int(k, v, 1, 86400);
        WHEN 'breaker_min_requests' THEN
            ep.breaker_min_requests := callback_center._option_int(k, v, 1, 1000000);
        WHEN 'breaker_open_ms' THEN
            ep.breaker_open_ms := callback_center._option_int(k, v, 1, 86400000);
        ELSE
            -- is_core, ordered, enabled
            IF jsonb_typeof(v) <> 'boolean' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('endpoint option "%s" must be true or false', k);
            END IF;
            CASE k
            WHEN 'is_core' THEN ep.is_core := v::boolean;
            WHEN 'ordered' THEN ep.ordered := v::boolean;
            ELSE ep.enabled := v::boolean;
            END CASE;
        END CASE;
    END LOOP;

    UPDATE callback_center.endpoints e
       SET url = ep.url, event_types = ep.event_types, timeout_ms = ep.timeout_ms,
           retry_schedule = ep.retry_schedule, max_attempts = ep.max_attempts,
           rate_limit_per_s = ep.rate_limit_per_s,
           breaker_failure_ratio = ep.breaker_failure_ratio,
           breaker_window_s = ep.breaker_window_s,
           breaker_min_requests = ep.breaker_min_requests,
           breaker_open_ms = ep.breaker_open_ms, is_core = ep.is_core,
           ordered = ep.ordered, enabled = ep.enabled, updated_at = now()
     WHERE e.id = _endpoint_apply.id;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.create_endpoint(
    name text, url text, event_types text[],
    secret text DEFAULT NULL, options jsonb DEFAULT '{}')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    new_id integer;
BEGIN
    PERFORM callback_center._require(num_nulls(name, url, event_types, options) = 0 OR NULL,
                                     'name, url, event_types and options');
    IF name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid endpoint name "%s"', name),
            DETAIL = 'Names are 1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit.';
    END IF;
    IF cardinality(event_types) = 0 OR array_ndims(event_types) <> 1
       OR array_position(event_types, NULL) IS NOT NULL
       OR array_position(event_types, '') IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'event_types must be a non-empty list of non-empty event types',
            HINT = 'Use ''{*}'' to subscribe to every event type.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.endpoints e
                WHERE e.name = create_endpoint.name) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('endpoint "%s" already exists', name);
    END IF;
    INSERT INTO callback_center.endpoints (name, url, event_types)
    VALUES (create_endpoint.name, callback_center._check_url(url), event_types)
    RETURNING id INTO new_id;
    INSERT INTO callback_center.endpoint_secrets (endpoint_id, secret)
    VALUES (new_id, callback_center._check_secret(secret));
    PERFORM callback_center._endpoint_apply(new_id, options);
    RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.enqueue_to(
    endpoint text, event_type text, aggregate_id text, payload jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    queued integer;
    ep_id integer;
BEGIN
    PERFORM callback_center._require(num_nulls(endpoint, event_type, aggregate_id, payload) = 0 OR NULL,
                                     'endpoint, event_type, aggregate_id and payload');
    IF event_type = '' OR event_type = '*' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid event type "%s"', event_type),
            DETAIL = 'An event type is a non-empty name; "*" only subscribes to all of them.';
    END IF;
    PERFORM callback_center._check_event_size(event_type, aggregate_id, payload);
    ep_id := callback_center._endpoint_id(endpoint, false);
    -- An ordered endpoint delivers an aggregate's events in id order: the
    -- lock enqueue() takes (src/outbox.c) makes ids follow commit order.
    IF EXISTS (SELECT 1 FROM callback_center.endpoints e
                WHERE e.id = ep_id AND e.enabled AND e.ordered) THEN
        PERFORM callback_center._outbox_lock_aggregate(enqueue_to.aggregate_id);
    END IF;
    INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
    SELECT e.id, enqueue_to.event_type, enqueue_to.aggregate_id, enqueue_to.payload
      FROM callback_center.endpoints e
     WHERE e.id = ep_id AND e.enabled;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM callback_center._outbox_note_enqueue();
    END IF;
    RETURN queued;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.reclaim_stale_callbacks(older_than interval)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    n integer;
BEGIN
    PERFORM callback_center._require(older_than, 'older_than');
    IF older_than < interval '0' OR older_than > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'older_than must be between 0 and 100 years',
            DETAIL = format('The value given was %s.', older_than);
    END IF;
    -- A row a handler is completing right now is locked: the UPDATE waits,
    -- then rechecks status and skips it.
    UPDATE callback_center.callback_record c
       SET status = 3,
           result = jsonb_build_object('error', 'processing abandoned',
                                       'reclaimed_after', older_than::text),
           completed_at = now(), updated_at = now()
     WHERE c.status = 1 AND c.updated_at < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.drop_provider(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(p_name, 'name');
    DELETE FROM callback_center.providers WHERE name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_name);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.set_platform_keys(p_provider text, p_keys jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    k record;
    info record;
    chk record;
    cas text[];
    why text;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(num_nulls(p_provider, p_keys) = 0 OR NULL, 'provider and keys');
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = p_provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'Create it first with callback_center.set_provider(name, ''wechatpay_v3'', ARRAY[apiv3_key]) or set_provider(name, ''unionpay'', NULL).';
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not wechatpay_v3 or unionpay', p_provider, v_scheme);
    END IF;
    IF jsonb_typeof(p_keys) <> 'object' OR p_keys = '{}' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'keys must be a non-empty JSON object of serial to PEM';
    END IF;

    DELETE FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
    FOR k IN SELECT e.key, e.value FROM jsonb_each(p_keys) e ORDER BY e.key LOOP
        IF jsonb_typeof(k.value) <> 'string' OR k.key = '' OR length(k.key) > 128 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid platform key',
                DETAIL = 'Every key needs a non-empty serial of at most 128 characters and a PEM string.';
        END IF;
        BEGIN
            info := callback_center._key_info(k.value #>> '{}');
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = why,
                HINT = 'Give the platform certificate or platform public key as PEM.';
        END;
        IF v_scheme = 'wechatpay_v3' AND info.kind = 'certificate' AND upper(k.key) <> info.serial THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = 'The certificate''s serial number is not the name it is given.',
                HINT = 'Name each certificate by its serial number in hex, as the Wechatpay-Serial header carries it.';
        END IF;
        IF v_scheme = 'unionpay' AND info.kind <> 'certificate' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid UnionPay certificate "%s"', k.key),
                DETAIL = 'UnionPay''s root and intermediate are X.509 certificates, not public keys.';
        END IF;
        INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)
        VALUES (p_provider, k.key, info.kind, k.value #>> '{}', info.not_after);
        n := n + 1;
    END LOOP;

    IF v_scheme = 'unionpay' THEN
        -- Every certificate must chain to a self-signed root among them
        -- (a root chains to itself), or no notification ever verifies.
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
          FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = p_provider ORDER BY pk.key_id LOOP
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    MESSAGE = format('invalid UnionPay certificate "%s"', k.key_id),
                    DETAIL = chk.detail,
                    HINT = 'Load the UnionPay root certificate and the intermediate certificate together (acp_prod_root.cer and acp_prod_middle.cer of the SDK).';
            END IF;
        END LOOP;
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._channel_parse(
    p_scheme text, p_provider text, p_headers jsonb, p_body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_variable
DECLARE
    prov callback_center.providers;
    m record;
    o record;
    a record;
BEGIN
    PERFORM callback_center._require(num_nulls(p_scheme, p_provider, p_headers, p_body) = 0 OR NULL,
                                     'scheme, provider, headers and body');
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> p_scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', p_provider, prov.scheme, p_scheme);
    END IF;

    IF p_scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'alipay' THEN
        m := callback_center._alipay_parse(p_provider, prov.secrets, prov.tolerance,
                                           p_headers, p_body);
    ELSIF p_scheme = 'unionpay' THEN
        m := callback_center._unionpay_parse(p_provider, prov.secrets, prov.tolerance,
                                             p_headers, p_body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;

    -- The message must be about a payment we have, for its amount and
    -- currency, and from the provider it is with.  Checked here so that a
    -- refusal records nothing; _apply_payment_result checks again under
    -- the row locks.
    IF m.failure IS NULL AND m.verdict IS NOT NULL THEN
        SELECT x.currency AS order_currency, p.amount_cents AS pay_cents, p.provider AS pay_provider
          INTO o
          FROM callback_center.orders x
          LEFT JOIN callback_center.payments p ON p.order_id = x.order_id
         WHERE x.order_id = m.order_id;
        IF NOT FOUND OR o.pay_cents IS NULL THEN
            m.failure := 'unknown_order'; m.fail_status := 404;
        ELSIF o.pay_provider IS NOT NULL AND o.pay_provider <> p_provider THEN
            m.failure := 'provider_mismatch'; m.fail_status := 400;
        ELSIF m.amount_cents IS DISTINCT FROM o.pay_cents THEN
            m.failure := 'amount_mismatch'; m.fail_status := 400;
        ELSIF m.currency IS DISTINCT FROM o.order_currency THEN
            m.failure := 'currency_mismatch'; m.fail_status := 400;
        END IF;
    END IF;

    a := callback_center._channel_answer(p_scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.replay_dead(outbox_id bigint, reason text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM callback_center._require(replay_dead.outbox_id, 'outbox_id');
    n := callback_center._replay(ARRAY[replay_dead.outbox_id], reason);
    IF n = 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('outbox event %s is not a dead letter', replay_dead.outbox_id),
            HINT = 'Only events with status dead can be replayed; see callback_center.dead_letters.';
    END IF;
    PERFORM callback_center._outbox_note_enqueue();
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._purge_check(older_than interval, batch_size integer,
    attempts_older_than interval, history_older_than interval)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(num_nulls(older_than, batch_size) = 0 OR NULL,
                                     'older_than and batch_size');
    IF older_than < interval '0' OR attempts_older_than < interval '0'
       OR history_older_than < interval '0' OR older_than > interval '100 years'
       OR attempts_older_than > interval '100 years' OR history_older_than > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('retention ages must be between 0 and 100 years, got %s, %s and %s',
                             older_than, coalesce(attempts_older_than::text, 'NULL'),
                             coalesce(history_older_than::text, 'NULL'));
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('batch_size must be positive, got %s', batch_size);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.schedule_maintenance(
    reconcile_channels text[] DEFAULT '{}',
    retention_cron text DEFAULT '*/10 * * * *',
    recon_cron text DEFAULT '30 1 * * *',
    older_than interval DEFAULT '7 days',
    attempts_older_than interval DEFAULT NULL,
    history_older_than interval DEFAULT NULL,
    batch_size integer DEFAULT 10000)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ch text;
    jobid bigint;
BEGIN
    PERFORM callback_center._require(reconcile_channels, 'reconcile_channels');
    PERFORM callback_center._require(retention_cron, 'retention_cron');
    PERFORM callback_center._require(recon_cron, 'recon_cron');
    PERFORM callback_center._require(array_position(reconcile_channels, NULL) IS NULL OR NULL,
                                     'a channel');
    PERFORM callback_center._purge_check(older_than, batch_size, attempts_older_than,
                                         history_older_than);
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = 'pg_cron is not installed in this database',
            HINT = 'Install pg_cron: set shared_preload_libraries = ''pg_cron'' and '
                   'cron.database_name to this database, restart, then run CREATE EXTENSION pg_cron.';
    END IF;

    EXECUTE 'SELECT cron.unschedule(jobid) FROM cron.job'
            ' WHERE jobname LIKE ''callback\_center\_recon\_%'' AND jobname <> ALL ($1)'
        USING ARRAY(SELECT 'callback_center_recon_' || c FROM unnest(reconcile_channels) c);

    -- A CALL alone in the job: pg_cron runs it outside a transaction block,
    -- so the procedure may commit after each batch.
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO jobid
        USING 'callback_center_retention', retention_cron,
              format('CALL callback_center.purge_in_batches(older_than => %L, batch_size => %s,'
                     ' attempts_older_than => %L, history_older_than => %L)',
                     older_than, batch_size, attempts_older_than, history_older_than);
    RETURN NEXT jobid;
    FOREACH ch IN ARRAY reconcile_channels LOOP
        EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO jobid
            USING 'callback_center_recon_' || ch, recon_cron,
                  format('SELECT * FROM callback_center.reconcile(%L, current_date - 1)', ch);
        RETURN NEXT jobid;
    END LOOP;
END
$$;

-- One writer of the outbox: enqueue, enqueue_to and query_stuck_payments
-- insert through src/outbox.c (_enqueue_one for a single endpoint), with
-- the same checks, ordering lock and wake-up; the SQL faces the PL/pgSQL
-- writers used go.

CREATE FUNCTION callback_center._enqueue_one(
    endpoint_id integer, event_type text, aggregate_id text, payload jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cc_enqueue_one'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION callback_center._enqueue_one(integer, text, text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION callback_center.enqueue_to(
    endpoint text, event_type text, aggregate_id text, payload jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(num_nulls(endpoint, event_type, aggregate_id, payload) = 0 OR NULL,
                                     'endpoint, event_type, aggregate_id and payload');
    IF callback_center._enqueue_one(callback_center._endpoint_id(endpoint, false),
                                    event_type, aggregate_id, payload) IS NULL THEN
        RETURN 0;
    END IF;
    RETURN 1;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.query_stuck_payments(max_payments integer DEFAULT 100,
    older_than interval DEFAULT NULL, min_interval interval DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    stuck interval := coalesce(older_than,
        current_setting('callback_center.pay_query_after', true)::interval, '5 minutes');
    again interval := coalesce(min_interval,
        current_setting('callback_center.pay_query_interval', true)::interval, '1 minute');
    r record;
    ob_id bigint;
    body jsonb;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_payments, 'max_payments');
    IF max_payments < 1 OR stuck < interval '0' OR again < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'max_payments must be positive and the intervals not negative';
    END IF;
    FOR r IN
        SELECT p.payment_id, p.order_id, p.provider, p.amount_cents, e.id AS endpoint_id
          FROM callback_center.payments p
          JOIN callback_center.providers pr ON pr.name = p.provider
          JOIN callback_center.endpoints e ON e.name = pr.query_endpoint AND e.enabled
         WHERE p.status = 'PAYING' AND p.updated_at <= now() - stuck
           AND NOT EXISTS (SELECT 1 FROM callback_center.payment_queries q
                            WHERE q.payment_id = p.payment_id
                              AND (q.status = 'sent' OR q.queried_at > now() - again))
         ORDER BY p.updated_at
         LIMIT max_payments
           FOR UPDATE OF p SKIP LOCKED
    LOOP
        -- To the query endpoint only, whatever else subscribes.
        body := jsonb_build_object('payment_id', r.payment_id, 'order_id', r.order_id,
                                   'provider', r.provider, 'amount_cents', r.amount_cents);
        ob_id := callback_center._enqueue_one(r.endpoint_id, 'payment.query', r.order_id, body);
        -- Disabled since the scan: no query for this payment this time.
        CONTINUE WHEN ob_id IS NULL;
        INSERT INTO callback_center.payment_queries
               (payment_id, order_id, provider, endpoint_id, outbox_id)
        VALUES (r.payment_id, r.order_id, r.provider, r.endpoint_id, ob_id);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

DROP FUNCTION callback_center._outbox_lock_aggregate(text);
DROP FUNCTION callback_center._check_event_size(text, text, jsonb);

-- One rule for whose word counts (issue 13): _payment_check (provider,
-- amount, currency, under the order's and the payment's row locks) is asked
-- once, by payment_callback before recording for every scheme (a refusal is
-- the provider's failure answer, nothing recorded: Stripe and Standard
-- Webhooks no longer record, acknowledge and flag it) and by
-- _apply_payment_result for query answers and reconciliation (flagged);
-- _move_payment moves what it accepted; _channel_parse no longer checks.

-- Whose word counts, the one rule for every verdict (a callback of any
-- scheme, the answer to an active query, a reconciliation line): under the
-- order's and then the payment's row lock (held to the end of the
-- transaction, so that nothing can change what was checked before the
-- verdict is applied), returns refusal NULL when the verdict may be
-- applied, else unknown_order (no such order), provider_mismatch (the
-- payment is not p_provider's: the payment's provider, set by place_order
-- or start_payment, or the order's when it has no payment; a payment with
-- none takes nobody's verdict), amount_mismatch (a success whose amount is
-- missing or differs from the payment's, or a failure naming another
-- amount) or currency_mismatch (a currency, when the message carries one,
-- that is not the order's, compared in upper case).  A non-terminal
-- failure (attempt_failed) is checked for its provider only; a message
-- with no verdict, for the order's existence only.  payment_provider,
-- expected_cents and expected_currency say what was expected.
CREATE OR REPLACE FUNCTION callback_center._payment_check(
    p_provider text, p_order_id text, p_amount_cents bigint, p_currency text, p_verdict text,
    OUT refusal text, OUT payment_provider text, OUT expected_cents bigint,
    OUT expected_currency text)
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    o callback_center.orders;
    pay callback_center.payments;
BEGIN
    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        refusal := 'unknown_order';
        RETURN;
    END IF;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;
    payment_provider := CASE WHEN pay.payment_id IS NOT NULL THEN pay.provider ELSE o.provider END;
    expected_cents := coalesce(pay.amount_cents, o.amount_cents);
    expected_currency := o.currency;
    IF p_verdict IS NULL THEN
        RETURN;
    END IF;
    -- Another provider's word on a payment, signed or not, is no word at all.
    IF payment_provider IS DISTINCT FROM p_provider THEN
        refusal := 'provider_mismatch';
    ELSIF p_verdict = 'attempt_failed' THEN
        -- It moves nothing, so its amount cannot pay or fail anything.
        RETURN;
    ELSIF (p_verdict = 'success' AND p_amount_cents IS DISTINCT FROM expected_cents)
          OR (p_verdict <> 'success' AND p_amount_cents <> expected_cents) THEN
        refusal := 'amount_mismatch';
    ELSIF upper(p_currency) <> o.currency THEN
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
CREATE OR REPLACE FUNCTION callback_center._move_payment(
    p_provider text, p_txn_id text, p_order_id text, p_amount_cents bigint,
    p_verdict text, p_source text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    o callback_center.orders;
    pay callback_center.payments;
BEGIN
    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = p_order_id FOR UPDATE;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;
    IF p_verdict IS NULL THEN
        RETURN 'ignored';
    END IF;
    IF p_verdict = 'attempt_failed' THEN
        -- The customer may retry on the same transaction: the payment stays
        -- open until a success, a terminal failure or the timeout close.
        RETURN 'attempt_failed';
    END IF;

    IF p_verdict = 'success' THEN
        IF pay.provider_txn_id = p_txn_id THEN
            -- Told twice of the same money (a callback and a query answer).
            RETURN CASE WHEN pay.status IN ('REFUND_REQUIRED', 'REFUNDED')
                        THEN 'refund_required' ELSE 'already_applied' END;
        END IF;
        IF o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying') THEN
            UPDATE callback_center.payments x
               SET provider = p_provider, provider_txn_id = p_txn_id, paid_at = now(), updated_at = now()
             WHERE x.payment_id = pay.payment_id;
            PERFORM callback_center.apply_event('callback_center.payments', 'status', pay.payment_id, 'success');
            IF o.coupon_id IS NOT NULL THEN
                PERFORM callback_center.use_coupon(o.coupon_id, o.order_id);
            END IF;
            PERFORM callback_center.apply_event('callback_center.orders', 'pay_status', o.order_id, 'pay_success');
            RETURN 'paid';
        END IF;
        -- Late money: kept once per transaction, never reopening the order.
        INSERT INTO callback_center.late_payments
               (provider, provider_txn_id, order_id, payment_id, amount_cents,
                order_status, pay_status, payment_status, source)
        VALUES (p_provider, p_txn_id, o.order_id, pay.payment_id,
                coalesce(p_amount_cents, pay.amount_cents),
                o.status, o.pay_status, pay.status, p_source)
        ON CONFLICT (provider, provider_txn_id) DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'refund_required';
        END IF;
        IF pay.status IN ('CLOSED', 'FAILED') AND pay.provider_txn_id IS NULL THEN
            UPDATE callback_center.payments x
               SET provider = p_provider, provider_txn_id = p_txn_id, paid_at = now(), updated_at = now()
             WHERE x.payment_id = pay.payment_id;
            PERFORM callback_center.apply_event('callback_center.payments', 'status',
                                                pay.payment_id, 'late_success');
        END IF;
        PERFORM callback_center.enqueue('payment.refund_required', o.order_id,
            jsonb_build_object('order_id', o.order_id, 'txn_id', p_txn_id, 'provider', p_provider,
                               'amount_cents', coalesce(p_amount_cents, pay.amount_cents),
                               'order_status', o.status, 'pay_status', o.pay_status,
                               'source', p_source));
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
CREATE OR REPLACE FUNCTION callback_center._apply_payment_result(
    p_provider text, p_txn_id text, p_order_id text, p_amount_cents bigint,
    p_currency text, p_verdict text, p_source text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    chk record;
BEGIN
    chk := callback_center._payment_check(p_provider, p_order_id, p_amount_cents, p_currency,
                                          p_verdict);
    IF chk.refusal = 'unknown_order' THEN
        RAISE EXCEPTION USING ERRCODE = 'CB050',
            MESSAGE = format('order "%s" does not exist', p_order_id),
            DETAIL = format('Transaction %s from provider %s.', p_txn_id, p_provider),
            HINT = 'Nothing was recorded; the provider will deliver it again.';
    ELSIF chk.refusal = 'provider_mismatch' THEN
        PERFORM callback_center.enqueue('payment.provider_mismatch', p_order_id,
            jsonb_build_object('order_id', p_order_id, 'txn_id', p_txn_id, 'provider', p_provider,
                               'payment_provider', chk.payment_provider, 'verdict', p_verdict,
                               'source', p_source));
        RETURN chk.refusal;
    ELSIF chk.refusal IS NOT NULL THEN
        PERFORM callback_center.enqueue('payment.amount_mismatch', p_order_id,
            jsonb_build_object('order_id', p_order_id, 'txn_id', p_txn_id, 'provider', p_provider,
                               'expected_cents', chk.expected_cents, 'received_cents', p_amount_cents,
                               'expected_currency', chk.expected_currency,
                               'received_currency', p_currency, 'source', p_source));
        RETURN chk.refusal;
    END IF;
    RETURN callback_center._move_payment(p_provider, p_txn_id, p_order_id, p_amount_cents,
                                         p_verdict, p_source);
END
$$;



-- _channel_parse: verifies and decodes a channel provider's notification.
-- One row: ok with the message and the provider's acknowledgement
-- (http_status, response_body), or not ok with failure (the outcome:
-- malformed_signature, signature_expired, unknown_key, key_expired,
-- untrusted_key, wrong_organisation, invalid_signature, malformed_body,
-- decryption_failed) and the provider's failure answer.  Whether the
-- message may touch the payment it names is payment_callback's question
-- (_payment_check, 60_orders.sql), asked under the payment's row lock.
-- payload is what record_callback should hash (the body; for Alipay the
-- signed parameters without notify_time, which changes on every resend;
-- for UnionPay the signed parameters without the certificate).  Raises only for misuse:
-- CB033 unknown provider, 55000 no key loaded, 22023 not a channel.
CREATE OR REPLACE FUNCTION callback_center._channel_parse(
    p_scheme text, p_provider text, p_headers jsonb, p_body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_variable
DECLARE
    prov callback_center.providers;
    m record;
    a record;
BEGIN
    IF p_scheme IS NULL OR p_provider IS NULL OR p_headers IS NULL OR p_body IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'scheme, provider, headers and body must not be null';
    END IF;
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> p_scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', p_provider, prov.scheme, p_scheme);
    END IF;

    IF p_scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'alipay' THEN
        m := callback_center._alipay_parse(p_provider, prov.secrets, prov.tolerance,
                                           p_headers, p_body);
    ELSIF p_scheme = 'unionpay' THEN
        m := callback_center._unionpay_parse(p_provider, prov.secrets, prov.tolerance,
                                             p_headers, p_body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;

    a := callback_center._channel_answer(p_scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
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
CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_provider text := payment_callback.provider;
    cb_type text := 'payment:' || p_provider;
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
    PERFORM callback_center._require(p_provider, 'provider');
    PERFORM callback_center._require(payment_callback.headers, 'headers');
    PERFORM callback_center._require(payment_callback.body, 'body');
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = p_provider;
    channel := scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay', 'unionpay');
    -- Payment channels (45_channels.sql: wechatpay_v3, wechatpay_v2, alipay, unionpay):
    -- verified and decoded by _channel_parse; whatever the provider got
    -- wrong is answered in its own format, recording nothing.  Its
    -- acknowledgement replaces ack.
    IF channel THEN
        SELECT * INTO ch FROM callback_center._channel_parse(scheme, p_provider,
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
            PERFORM callback_center.verify_signature(p_provider, payment_callback.headers,
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
        IF msg.verdict IS NOT NULL THEN
            refused := (callback_center._payment_check(p_provider, msg.order_id, msg.amount_cents,
                                                       msg.currency, msg.verdict)).refusal;
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
    ELSE
        result := callback_center._move_payment(p_provider, msg.txn_id, msg.order_id,
                                                msg.amount_cents, msg.verdict, 'callback');
    END IF;

    PERFORM callback_center.complete_callback(msg_id, cb_type, true,
        jsonb_build_object('http_status', 200, 'body', ack, 'outcome', result,
                           'order_id', msg.order_id, 'txn_id', msg.txn_id,
                           'event_type', msg.event_type));
    RETURN QUERY SELECT 200, ack, true, result;
END
$$;


REVOKE ALL ON FUNCTION callback_center._payment_check(text, text, bigint, text, text),
    callback_center._move_payment(text, text, text, bigint, text, text) FROM PUBLIC;

-- One form parser (issue 13): _form_parse reads the Alipay and UnionPay
-- bodies (names and %-decoded values, the same edge cases as before).

-- The one parser of application/x-www-form-urlencoded bodies (Alipay,
-- UnionPay): names and values in body order, %-decoded ("+" a space) to
-- the bytes of the form's own charset, which the caller decodes; a pair
-- without "=" is a name with an empty value, empty pairs are skipped.
-- names is NULL for a body that cannot be one form: empty, a "%" not
-- followed by two hex digits, a name that is not printable ASCII, or a
-- parameter twice (which one did the provider sign?).
CREATE OR REPLACE FUNCTION callback_center._form_parse(p_body text, OUT names text[], OUT vals bytea[])
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    pair text;
    eq integer;
    n bytea;
    v bytea;
    nm text;
BEGIN
    IF p_body = '' THEN
        RETURN;
    END IF;
    names := '{}';
    vals := '{}';
    FOREACH pair IN ARRAY string_to_array(p_body, '&') LOOP
        CONTINUE WHEN pair = '';
        eq := strpos(pair, '=');
        IF eq = 0 THEN
            n := callback_center._form_decode(pair);
            v := '';
        ELSE
            n := callback_center._form_decode(left(pair, eq - 1));
            v := callback_center._form_decode(substr(pair, eq + 1));
        END IF;
        IF n IS NULL OR v IS NULL OR encode(n, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e])+$' THEN
            names := NULL; vals := NULL;
            RETURN;
        END IF;
        nm := convert_from(n, 'UTF8');
        IF nm = ANY (names) THEN
            names := NULL; vals := NULL;
            RETURN;
        END IF;
        names := names || nm;
        vals := vals || v;
    END LOOP;
END
$$;


-- Alipay asynchronous notifications (RSA2).  The body is the form as
-- posted; names and values are %-decoded to the bytes of the form's
-- charset (UTF-8 or GBK), so the signed string is built from those bytes
-- as Alipay built it: every parameter but sign and sign_type, empty values
-- left out, sorted by name in byte order, joined as k=v&...
CREATE OR REPLACE FUNCTION callback_center._alipay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    charset text := 'UTF8';
    cs text;
    content bytea;
    sig bytea;
    ok boolean := false;
    s text;
    f jsonb := '{}';
    notify_time timestamptz;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(p_body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'charset')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs IN ('GBK', 'GB2312') THEN 'GBK' END;
    IF charset IS NULL OR array_position(names, 'sign') IS NULL THEN
        failure := CASE WHEN charset IS NULL THEN 'malformed_body' ELSE 'malformed_signature' END;
        fail_status := CASE WHEN charset IS NULL THEN 400 ELSE 401 END;
        RETURN;
    END IF;
    IF coalesce(callback_center._channel_ascii(vals[array_position(names, 'sign_type')]), 'RSA2') <> 'RSA2' THEN
        -- RSA (SHA1withRSA) is Alipay's legacy; only RSA2 is accepted.
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'sign')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('sign', 'sign_type') AND x.v <> '';
    FOREACH s IN ARRAY p_secrets LOOP
        ok := ok OR callback_center._rsa_sha256_check(s, coalesce(content, ''), sig) IS NULL;
    END LOOP;
    IF NOT ok THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by Alipay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('notify_id', 'notify_time', 'notify_type', 'out_trade_no',
                        'trade_no', 'trade_status', 'total_amount', 'trans_currency');
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('sign', 'sign_type', 'notify_time');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    msg_id := f->>'notify_id';
    event_type := f->>'notify_type';
    IF nullif(msg_id, '') IS NULL
       OR coalesce(f->>'notify_time', '') !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        notify_time := (f->>'notify_time')::timestamp AT TIME ZONE 'Asia/Shanghai';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF abs(extract(epoch FROM now() - notify_time))
       > extract(epoch FROM callback_center._channel_tolerance(p_tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;

    order_id := f->>'out_trade_no';
    txn_id := f->>'trade_no';
    verdict := CASE f->>'trade_status'
        WHEN 'TRADE_SUCCESS' THEN 'success'
        WHEN 'TRADE_FINISHED' THEN 'success'
        WHEN 'TRADE_CLOSED' THEN 'failure' END;
    currency := coalesce(nullif(f->>'trans_currency', ''), 'CNY');
    total := f->>'total_amount';
    IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                OR total IS NULL
                                OR total !~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$') THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    IF total ~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$' THEN
        amount_cents := (total::numeric * 100)::bigint;
    END IF;
END
$$;


-- UnionPay (China UnionPay online payments, acp SDK 5.1.0) back-end
-- notifications.  The body is the form as posted; names and values are
-- %-decoded to the bytes of the form's encoding (UTF-8 or GBK).  The
-- signed string is every parameter but signature, empty values left out
-- (the SDK neither sends nor reads them), sorted by name, joined as
-- k=v&...; signature is SHA256withRSA (signMethod 01, version 5.1.0) over
-- the lower-case hex SHA-256 digest of it, by the key of the certificate
-- in signPubKeyCert, which must chain to the root and intermediate
-- certificates loaded with set_platform_keys, be valid now and name one of
-- the provider's organisation names (p_secrets).  UnionPay signs no
-- notification time: a replay is a repeat of the recorded message, keyed
-- by queryId and txnType.
CREATE OR REPLACE FUNCTION callback_center._unionpay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    charset text;
    cs text;
    cert bytea;
    cert_pem text;
    content bytea;
    sig bytea;
    cas text[];
    chk record;
    f jsonb;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(p_body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'encoding')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs = 'GBK' THEN 'GBK' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- signMethod 01 of version 5.1.0 only: 5.0.0 signs SHA-1 digests with
    -- a certificate chosen by certId, 11 and 12 are symmetric keys.
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        sig := NULL;
    END;
    IF sig IS NULL OR sig = '' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;

    SELECT array_agg(pk.pem) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = p_provider;
    IF cas IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no UnionPay certificates', p_provider),
            HINT = 'An administrator loads the root and intermediate certificates with callback_center.set_platform_keys().';
    END IF;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, cas, p_secrets);
    IF chk.verdict <> 'ok' THEN
        failure := CASE chk.verdict WHEN 'malformed' THEN 'malformed_signature'
                                    WHEN 'expired' THEN 'key_expired'
                                    WHEN 'wrong_name' THEN 'wrong_organisation'
                                    ELSE 'untrusted_key' END;
        fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by UnionPay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('orderId', 'queryId', 'txnType', 'txnSubType', 'respCode',
                        'txnAmt', 'currencyCode');
        -- What a resend repeats: the signed parameters but the certificate
        -- (UnionPay may sign a resend under its next certificate).
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('signature', 'signPubKeyCert') AND x.v <> '';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF nullif(f->>'queryId', '') IS NULL OR nullif(f->>'txnType', '') IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := (f->>'queryId') || ':' || (f->>'txnType');
    event_type := 'txnType ' || (f->>'txnType') || coalesce('/' || (f->>'txnSubType'), '');
    IF f->>'txnType' = '01' THEN
        -- Consumption: respCode 00 (success) and A6 (success with a
        -- defect) pay; any other is one failed attempt.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'success' ELSE 'attempt_failed' END;
        -- ISO 4217 numeric codes.
        currency := CASE f->>'currencyCode'
            WHEN '156' THEN 'CNY' WHEN '344' THEN 'HKD' WHEN '446' THEN 'MOP'
            WHEN '901' THEN 'TWD' WHEN '840' THEN 'USD' WHEN '978' THEN 'EUR'
            WHEN '826' THEN 'GBP' WHEN '392' THEN 'JPY' WHEN '410' THEN 'KRW'
            WHEN '702' THEN 'SGD' WHEN '036' THEN 'AUD' WHEN '124' THEN 'CAD'
            ELSE f->>'currencyCode' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$'
           OR nullif(currency, '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    -- Other transaction types (refunds 04, cancellations 31, ...) are
    -- recorded and acknowledged (verdict NULL).
END
$$;


REVOKE ALL ON FUNCTION callback_center._form_parse(text) FROM PUBLIC;

-- Raw bodies (issue 13): payment_callback(text, jsonb, bytea) takes the bytes
-- the provider posted (a GBK or GB18030 form need not be valid text);
-- _form_escape carries a form's bytes to the form parser; Alipay decodes
-- every value per its charset (GB18030 added) before verifying.

CREATE OR REPLACE FUNCTION callback_center._form_escape(b bytea)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_form_escape'
LANGUAGE C IMMUTABLE;


-- Alipay asynchronous notifications (RSA2).  The body is the form as
-- posted (a bytea body reaches here through payment_callback's bytea
-- overload, its bytes beyond ASCII %-escaped); names and values are
-- %-decoded to the bytes of the form's charset (UTF-8, GBK or GB18030) and
-- decoded from it, so the signed string is built from those bytes as
-- Alipay built it: every parameter but sign and sign_type, empty values
-- left out, sorted by name in byte order, joined as k=v&...
CREATE OR REPLACE FUNCTION callback_center._alipay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    texts text[];
    charset text := 'UTF8';
    cs text;
    content bytea;
    sig bytea;
    ok boolean := false;
    s text;
    f jsonb := '{}';
    notify_time timestamptz;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(p_body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'charset')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs IN ('GBK', 'GB2312') THEN 'GBK'
                    WHEN cs = 'GB18030' THEN 'GB18030' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- Characters of a text body beyond ASCII were decoded by the web tier:
    -- on the wire they were the bytes of the form's charset.
    IF charset <> 'UTF8' AND p_body ~ '[^\x01-\x7f]' THEN
        BEGIN
            SELECT f.names, f.vals INTO names, vals
              FROM callback_center._form_parse(
                       callback_center._form_escape(convert_to(p_body, charset))) f;
        EXCEPTION WHEN untranslatable_character THEN
            names := NULL;
        END;
        IF names IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
    END IF;
    -- Every value decoded from the charset before anything is verified:
    -- Alipay signs the decoded values (encoded in that charset again, which
    -- gives back the %-decoded bytes), and bytes that are not text in it
    -- were not signed by Alipay.
    BEGIN
        texts := ARRAY(SELECT convert_from(x.v, charset)
                         FROM unnest(vals) WITH ORDINALITY AS x(v, i) ORDER BY x.i);
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF array_position(names, 'sign') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF coalesce(callback_center._channel_ascii(vals[array_position(names, 'sign_type')]), 'RSA2') <> 'RSA2' THEN
        -- RSA (SHA1withRSA) is Alipay's legacy; only RSA2 is accepted.
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'sign')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('sign', 'sign_type') AND x.v <> '';
    FOREACH s IN ARRAY p_secrets LOOP
        ok := ok OR callback_center._rsa_sha256_check(s, coalesce(content, ''), sig) IS NULL;
    END LOOP;
    IF NOT ok THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by Alipay: from here on a problem is the body's.
    SELECT jsonb_object_agg(x.nm, x.t)
      INTO f FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm IN ('notify_id', 'notify_time', 'notify_type', 'out_trade_no',
                    'trade_no', 'trade_status', 'total_amount', 'trans_currency');
    SELECT string_agg(x.nm || '=' || x.t, '&' ORDER BY x.nm COLLATE "C")
      INTO payload FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm NOT IN ('sign', 'sign_type', 'notify_time');
    msg_id := f->>'notify_id';
    event_type := f->>'notify_type';
    IF nullif(msg_id, '') IS NULL
       OR coalesce(f->>'notify_time', '') !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        notify_time := (f->>'notify_time')::timestamp AT TIME ZONE 'Asia/Shanghai';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF abs(extract(epoch FROM now() - notify_time))
       > extract(epoch FROM callback_center._channel_tolerance(p_tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;

    order_id := f->>'out_trade_no';
    txn_id := f->>'trade_no';
    verdict := CASE f->>'trade_status'
        WHEN 'TRADE_SUCCESS' THEN 'success'
        WHEN 'TRADE_FINISHED' THEN 'success'
        WHEN 'TRADE_CLOSED' THEN 'failure' END;
    currency := coalesce(nullif(f->>'trans_currency', ''), 'CNY');
    total := f->>'total_amount';
    IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                OR total IS NULL
                                OR total !~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$') THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    IF total ~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$' THEN
        amount_cents := (total::numeric * 100)::bigint;
    END IF;
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
CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body bytea)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
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


REVOKE ALL ON FUNCTION callback_center._form_escape(bytea),
    callback_center.payment_callback(text, jsonb, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.payment_callback(text, jsonb, bytea)
    TO callback_center_app, callback_center_admin;

-- Alipay certificate mode (issue 13): alipay_cert_sn and alipay_root_cert_sn
-- compute the SNs as Alipay documents them; set_provider(name, 'alipay',
-- NULL) makes a certificate-mode provider; set_platform_keys loads its
-- certificates by SN; _alipay_parse verifies with those that chain to the
-- loaded roots.

ALTER TABLE callback_center.providers
    DROP CONSTRAINT providers_secrets_check,
    ADD CONSTRAINT providers_secrets_check
        CHECK ((cardinality(secrets) >= 1 OR scheme = 'alipay')
               AND array_position(secrets, NULL) IS NULL);

-- Alipay's certificate SNs, as AlipaySignature.getCertSN and getRootCertSN
-- compute them: the hex MD5 of the issuer's name (RFC 2253, as Java writes
-- it) and the serial number in decimal; for the root certificate file,
-- those of its RSA-signed certificates joined by "_".  The app sends
-- app_cert_sn and alipay_root_cert_sn with its requests; certificate mode
-- names the loaded certificates by them.  22023 for what is not a PEM
-- certificate.
CREATE OR REPLACE FUNCTION callback_center.alipay_cert_sn(certificate text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_alipay_cert_sn_sql'
LANGUAGE C IMMUTABLE;


CREATE OR REPLACE FUNCTION callback_center.alipay_root_cert_sn(certificates text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_alipay_root_cert_sn_sql'
LANGUAGE C IMMUTABLE;


COMMENT ON FUNCTION callback_center.alipay_cert_sn(text) IS
    'Alipay''s SN of a certificate (app_cert_sn, alipay_cert_sn)';
COMMENT ON FUNCTION callback_center.alipay_root_cert_sn(text) IS
    'Alipay''s SN of its root certificate file (alipay_root_cert_sn)';
REVOKE ALL ON FUNCTION callback_center.alipay_cert_sn(text),
    callback_center.alipay_root_cert_sn(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.alipay_cert_sn(text),
    callback_center.alipay_root_cert_sn(text) TO callback_center_app, callback_center_admin;

-- set_provider: creates or replaces a provider.  Standard Webhooks secrets
-- must be whsec_<base64>; secrets NULL generates one (new_webhook_secret(),
-- read back with provider_secret()), so that no secret need be written
-- into a statement, which the server logs with any error it raises; a
-- tolerance of NULL means the GUC callback_center.signature_tolerance.  No
-- message raised here contains a secret.
CREATE OR REPLACE FUNCTION callback_center.set_provider(
    p_name text, p_scheme text, p_secrets text[],
    p_tolerance interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    PERFORM callback_center._require_key(p_name, 'provider', 63);
    PERFORM callback_center._require(p_scheme, 'scheme');
    IF p_secrets IS NULL AND p_scheme = 'unionpay' THEN
        -- UnionPay has no shared secret: what is kept is the organisation
        -- its signing certificates name.
        p_secrets := ARRAY['中国银联股份有限公司'];
    ELSIF p_secrets IS NULL AND p_scheme = 'alipay' THEN
        -- Alipay's certificate mode: no public key, the certificates come
        -- with set_platform_keys.
        p_secrets := '{}';
    ELSIF p_secrets IS NULL THEN
        p_secrets := ARRAY[callback_center.new_webhook_secret()];
    END IF;
    -- Payment channels (45_channels.sql): wechatpay_v3, wechatpay_v2, alipay, unionpay.
    IF p_scheme NOT IN ('standard_webhooks', 'stripe', 'wechatpay_v3', 'wechatpay_v2', 'alipay',
                        'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('unknown signature scheme "%s"', p_scheme),
            HINT = 'The schemes are standard_webhooks, stripe, wechatpay_v3, wechatpay_v2, alipay and unionpay.';
    END IF;
    IF (cardinality(p_secrets) = 0 AND p_scheme <> 'alipay')
       OR array_position(p_secrets, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'secrets must hold at least one secret and no nulls';
    END IF;
    IF p_tolerance <= interval '0' OR p_tolerance > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'tolerance must be positive and at most 100 years',
            DETAIL = format('The value given was %s.', p_tolerance);
    END IF;
    FOREACH s IN ARRAY p_secrets LOOP
        IF s = '' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'secrets must not be empty';
        END IF;
        IF p_scheme = 'standard_webhooks' THEN
            -- raises 22023 for anything but whsec_<base64>
            PERFORM callback_center.sign_webhook(s, 'probe', 0, '');
        ELSIF p_scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay', 'unionpay') THEN
            -- Payment channels: the APIv3 key, API key, Alipay public key,
            -- UnionPay organisation name (22023)
            PERFORM callback_center._channel_check_secret(p_scheme, s);
        END IF;
    END LOOP;

    INSERT INTO callback_center.providers (name, scheme, secrets, tolerance)
    VALUES (p_name, p_scheme, p_secrets, p_tolerance)
    ON CONFLICT (name) DO UPDATE
       SET scheme = EXCLUDED.scheme, secrets = EXCLUDED.secrets,
           tolerance = EXCLUDED.tolerance;
END
$$;


-- set_platform_keys: replaces the platform keys of a wechatpay_v3,
-- unionpay or alipay provider with keys, a JSON object of name to PEM.
-- wechatpay_v3: serial (or public-key id) to platform certificate or
-- public key; pass the old and the new key together while WeChat Pay
-- rotates.  unionpay: any name to the UnionPay root certificate(s)
-- (self-signed: the trust anchors) and intermediate certificate(s), which
-- must chain to a root.  alipay (certificate mode): each certificate's SN
-- (alipay_cert_sn) to the Alipay public-key certificate, its intermediate
-- and the RSA root certificates, which all must chain to a root.
-- Each key is checked (RSA, 2048 bits or more, a certificate valid now
-- whose serial is its name for wechatpay_v3); returns how many are loaded.
CREATE OR REPLACE FUNCTION callback_center.set_platform_keys(p_provider text, p_keys jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    k record;
    info record;
    chk record;
    cas text[];
    why text;
    n integer := 0;
BEGIN
    IF p_provider IS NULL OR p_keys IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'provider and keys must not be null';
    END IF;
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = p_provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'Create it first with callback_center.set_provider(name, ''wechatpay_v3'', ARRAY[apiv3_key]) or set_provider(name, ''unionpay'', NULL).';
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'unionpay', 'alipay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not wechatpay_v3, unionpay or alipay', p_provider, v_scheme);
    END IF;
    IF jsonb_typeof(p_keys) <> 'object' OR p_keys = '{}' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'keys must be a non-empty JSON object of serial to PEM';
    END IF;

    DELETE FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
    FOR k IN SELECT e.key, e.value FROM jsonb_each(p_keys) e ORDER BY e.key LOOP
        IF jsonb_typeof(k.value) <> 'string' OR k.key = '' OR length(k.key) > 128 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid platform key',
                DETAIL = 'Every key needs a non-empty serial of at most 128 characters and a PEM string.';
        END IF;
        BEGIN
            info := callback_center._key_info(k.value #>> '{}');
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = why,
                HINT = 'Give the platform certificate or platform public key as PEM.';
        END;
        IF v_scheme = 'wechatpay_v3' AND info.kind = 'certificate' AND upper(k.key) <> info.serial THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = 'The certificate''s serial number is not the name it is given.',
                HINT = 'Name each certificate by its serial number in hex, as the Wechatpay-Serial header carries it.';
        END IF;
        IF v_scheme = 'unionpay' AND info.kind <> 'certificate' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid UnionPay certificate "%s"', k.key),
                DETAIL = 'UnionPay''s root and intermediate are X.509 certificates, not public keys.';
        END IF;
        IF v_scheme = 'alipay' AND (info.kind <> 'certificate'
                                    OR k.key <> callback_center.alipay_cert_sn(k.value #>> '{}')) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid Alipay certificate "%s"', k.key),
                DETAIL = CASE WHEN info.kind <> 'certificate'
                              THEN 'Certificate mode takes X.509 certificates; give a public key to callback_center.set_provider().'
                              ELSE 'The certificate''s SN is not the name it is given.' END,
                HINT = 'Name each certificate by its SN, callback_center.alipay_cert_sn(pem).';
        END IF;
        INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)
        VALUES (p_provider, k.key, info.kind, k.value #>> '{}', info.not_after);
        n := n + 1;
    END LOOP;

    IF v_scheme IN ('unionpay', 'alipay') THEN
        -- Every certificate must chain to a self-signed root among them
        -- (a root chains to itself), or no notification ever verifies.
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
          FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = p_provider ORDER BY pk.key_id LOOP
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    MESSAGE = format('invalid %s certificate "%s"',
                                     CASE v_scheme WHEN 'alipay' THEN 'Alipay' ELSE 'UnionPay' END, k.key_id),
                    DETAIL = chk.detail,
                    HINT = CASE v_scheme
                        WHEN 'alipay' THEN 'Load the Alipay public-key certificate with the intermediate it holds (alipayCertPublicKey_RSA2.crt) and the RSA root certificates of alipayRootCert.crt together.'
                        ELSE 'Load the UnionPay root certificate and the intermediate certificate together (acp_prod_root.cer and acp_prod_middle.cer of the SDK).' END;
            END IF;
        END LOOP;
    END IF;
    RETURN n;
END
$$;


-- Alipay asynchronous notifications (RSA2).  The body is the form as
-- posted (a bytea body reaches here through payment_callback's bytea
-- overload, its bytes beyond ASCII %-escaped); names and values are
-- %-decoded to the bytes of the form's charset (UTF-8, GBK or GB18030) and
-- decoded from it, so the signed string is built from those bytes as
-- Alipay built it: every parameter but sign and sign_type, empty values
-- left out, sorted by name in byte order, joined as k=v&...  It is
-- verified with the provider's Alipay public keys (public-key mode) or
-- Alipay public-key certificates that chain to the loaded Alipay roots
-- (certificate mode, set_platform_keys).
CREATE OR REPLACE FUNCTION callback_center._alipay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    texts text[];
    cert_sn text;
    cas text[];
    k record;
    chk record;
    candidates integer := 0;
    chain_failure text;
    charset text := 'UTF8';
    cs text;
    content bytea;
    sig bytea;
    ok boolean := false;
    s text;
    f jsonb := '{}';
    notify_time timestamptz;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(p_body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'charset')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs IN ('GBK', 'GB2312') THEN 'GBK'
                    WHEN cs = 'GB18030' THEN 'GB18030' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- Characters of a text body beyond ASCII were decoded by the web tier:
    -- on the wire they were the bytes of the form's charset.
    IF charset <> 'UTF8' AND p_body ~ '[^\x01-\x7f]' THEN
        BEGIN
            SELECT f.names, f.vals INTO names, vals
              FROM callback_center._form_parse(
                       callback_center._form_escape(convert_to(p_body, charset))) f;
        EXCEPTION WHEN untranslatable_character THEN
            names := NULL;
        END;
        IF names IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
    END IF;
    -- Every value decoded from the charset before anything is verified:
    -- Alipay signs the decoded values (encoded in that charset again, which
    -- gives back the %-decoded bytes), and bytes that are not text in it
    -- were not signed by Alipay.
    BEGIN
        texts := ARRAY(SELECT convert_from(x.v, charset)
                         FROM unnest(vals) WITH ORDINALITY AS x(v, i) ORDER BY x.i);
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF array_position(names, 'sign') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF coalesce(callback_center._channel_ascii(vals[array_position(names, 'sign_type')]), 'RSA2') <> 'RSA2' THEN
        -- RSA (SHA1withRSA) is Alipay's legacy; only RSA2 is accepted.
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'sign')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('sign', 'sign_type') AND x.v <> '';
    -- Public-key mode: the Alipay public keys of secrets.
    FOREACH s IN ARRAY p_secrets LOOP
        ok := ok OR callback_center._rsa_sha256_check(s, coalesce(content, ''), sig) IS NULL;
    END LOOP;
    -- Certificate mode: the Alipay public-key certificates loaded with
    -- set_platform_keys (named by their SN), each checked against the
    -- loaded roots now, since a certificate expires after it was loaded;
    -- alipay_cert_sn, when the notification carries it, names the one.
    -- The roots themselves sign no notification.
    IF NOT ok THEN
        cert_sn := callback_center._channel_ascii(vals[array_position(names, 'alipay_cert_sn')]);
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
         WHERE pk.provider = p_provider;
        IF cas IS NULL AND cardinality(p_secrets) = 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
                MESSAGE = format('provider "%s" has no Alipay public key or certificate', p_provider),
                HINT = 'An administrator gives the Alipay public key to callback_center.set_provider(), or loads the Alipay certificates with callback_center.set_platform_keys().';
        END IF;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = p_provider
                    AND (cert_sn IS NULL OR pk.key_id = cert_sn)
                  ORDER BY pk.key_id LOOP
            CONTINUE WHEN (callback_center._x509_chain_check(k.pem, ARRAY[k.pem], NULL)).verdict = 'ok';
            candidates := candidates + 1;
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                chain_failure := chk.verdict;
            ELSIF callback_center._rsa_sha256_check(k.pem, coalesce(content, ''), sig) IS NULL THEN
                ok := true;
                EXIT;
            END IF;
        END LOOP;
        IF NOT ok THEN
            failure := CASE WHEN cert_sn IS NOT NULL AND cas IS NOT NULL AND candidates = 0
                            THEN 'unknown_key'
                            WHEN chain_failure = 'expired' THEN 'key_expired'
                            WHEN chain_failure IS NOT NULL THEN 'untrusted_key'
                            ELSE 'invalid_signature' END;
            fail_status := 401;
            RETURN;
        END IF;
    END IF;

    -- Signed by Alipay: from here on a problem is the body's.
    SELECT jsonb_object_agg(x.nm, x.t)
      INTO f FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm IN ('notify_id', 'notify_time', 'notify_type', 'out_trade_no',
                    'trade_no', 'trade_status', 'total_amount', 'trans_currency');
    SELECT string_agg(x.nm || '=' || x.t, '&' ORDER BY x.nm COLLATE "C")
      INTO payload FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm NOT IN ('sign', 'sign_type', 'notify_time');
    msg_id := f->>'notify_id';
    event_type := f->>'notify_type';
    IF nullif(msg_id, '') IS NULL
       OR coalesce(f->>'notify_time', '') !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        notify_time := (f->>'notify_time')::timestamp AT TIME ZONE 'Asia/Shanghai';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF abs(extract(epoch FROM now() - notify_time))
       > extract(epoch FROM callback_center._channel_tolerance(p_tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;

    order_id := f->>'out_trade_no';
    txn_id := f->>'trade_no';
    verdict := CASE f->>'trade_status'
        WHEN 'TRADE_SUCCESS' THEN 'success'
        WHEN 'TRADE_FINISHED' THEN 'success'
        WHEN 'TRADE_CLOSED' THEN 'failure' END;
    currency := coalesce(nullif(f->>'trans_currency', ''), 'CNY');
    total := f->>'total_amount';
    IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                OR total IS NULL
                                OR total !~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$') THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    IF total ~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$' THEN
        amount_cents := (total::numeric * 100)::bigint;
    END IF;
END
$$;


COMMENT ON FUNCTION callback_center.set_platform_keys(text, jsonb) IS
    'Replaces a wechatpay_v3 provider''s platform certificates and public keys, by serial, a unionpay provider''s root and intermediate certificates, or an alipay provider''s certificates, by SN (admin)';

-- Merge of the argument checks (one NULL check) with the channels' changes: the final definitions of the functions both changed.

CREATE OR REPLACE FUNCTION callback_center.set_platform_keys(p_provider text, p_keys jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    k record;
    info record;
    chk record;
    cas text[];
    why text;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(num_nulls(p_provider, p_keys) = 0 OR NULL, 'provider and keys');
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = p_provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'Create it first with callback_center.set_provider(name, ''wechatpay_v3'', ARRAY[apiv3_key]) or set_provider(name, ''unionpay'', NULL).';
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'unionpay', 'alipay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not wechatpay_v3, unionpay or alipay', p_provider, v_scheme);
    END IF;
    IF jsonb_typeof(p_keys) <> 'object' OR p_keys = '{}' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'keys must be a non-empty JSON object of serial to PEM';
    END IF;

    DELETE FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
    FOR k IN SELECT e.key, e.value FROM jsonb_each(p_keys) e ORDER BY e.key LOOP
        IF jsonb_typeof(k.value) <> 'string' OR k.key = '' OR length(k.key) > 128 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid platform key',
                DETAIL = 'Every key needs a non-empty serial of at most 128 characters and a PEM string.';
        END IF;
        BEGIN
            info := callback_center._key_info(k.value #>> '{}');
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = why,
                HINT = 'Give the platform certificate or platform public key as PEM.';
        END;
        IF v_scheme = 'wechatpay_v3' AND info.kind = 'certificate' AND upper(k.key) <> info.serial THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = 'The certificate''s serial number is not the name it is given.',
                HINT = 'Name each certificate by its serial number in hex, as the Wechatpay-Serial header carries it.';
        END IF;
        IF v_scheme = 'unionpay' AND info.kind <> 'certificate' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid UnionPay certificate "%s"', k.key),
                DETAIL = 'UnionPay''s root and intermediate are X.509 certificates, not public keys.';
        END IF;
        IF v_scheme = 'alipay' AND (info.kind <> 'certificate'
                                    OR k.key <> callback_center.alipay_cert_sn(k.value #>> '{}')) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid Alipay certificate "%s"', k.key),
                DETAIL = CASE WHEN info.kind <> 'certificate'
                              THEN 'Certificate mode takes X.509 certificates; give a public key to callback_center.set_provider().'
                              ELSE 'The certificate''s SN is not the name it is given.' END,
                HINT = 'Name each certificate by its SN, callback_center.alipay_cert_sn(pem).';
        END IF;
        INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)
        VALUES (p_provider, k.key, info.kind, k.value #>> '{}', info.not_after);
        n := n + 1;
    END LOOP;

    IF v_scheme IN ('unionpay', 'alipay') THEN
        -- Every certificate must chain to a self-signed root among them
        -- (a root chains to itself), or no notification ever verifies.
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
          FROM callback_center.provider_keys pk WHERE pk.provider = p_provider;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = p_provider ORDER BY pk.key_id LOOP
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    MESSAGE = format('invalid %s certificate "%s"',
                                     CASE v_scheme WHEN 'alipay' THEN 'Alipay' ELSE 'UnionPay' END, k.key_id),
                    DETAIL = chk.detail,
                    HINT = CASE v_scheme
                        WHEN 'alipay' THEN 'Load the Alipay public-key certificate with the intermediate it holds (alipayCertPublicKey_RSA2.crt) and the RSA root certificates of alipayRootCert.crt together.'
                        ELSE 'Load the UnionPay root certificate and the intermediate certificate together (acp_prod_root.cer and acp_prod_middle.cer of the SDK).' END;
            END IF;
        END LOOP;
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._channel_parse(
    p_scheme text, p_provider text, p_headers jsonb, p_body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_variable
DECLARE
    prov callback_center.providers;
    m record;
    a record;
BEGIN
    PERFORM callback_center._require(num_nulls(p_scheme, p_provider, p_headers, p_body) = 0 OR NULL,
                                     'scheme, provider, headers and body');
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> p_scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', p_provider, prov.scheme, p_scheme);
    END IF;

    IF p_scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'alipay' THEN
        m := callback_center._alipay_parse(p_provider, prov.secrets, prov.tolerance,
                                           p_headers, p_body);
    ELSIF p_scheme = 'unionpay' THEN
        m := callback_center._unionpay_parse(p_provider, prov.secrets, prov.tolerance,
                                             p_headers, p_body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;

    a := callback_center._channel_answer(p_scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._note_close_failure(p_order_id text, error text)
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    retry timestamptz;
BEGIN
    DELETE FROM callback_center.close_failures f
     WHERE NOT EXISTS (SELECT 1 FROM callback_center.orders o
                        WHERE o.order_id = f.order_id AND o.status = 'confirmed'
                          AND o.pay_status IN ('unpaid', 'paying'));
    INSERT INTO callback_center.close_failures AS f
           (order_id, failures, last_error, failed_at, retry_at)
    VALUES (p_order_id, 1, error, now(), now() + interval '1 second')
    ON CONFLICT (order_id) DO UPDATE
       SET failures = f.failures + 1, last_error = excluded.last_error, failed_at = now(),
           retry_at = now() + least(interval '1 second' * power(2, least(f.failures, 20)),
                                    interval '5 minutes')
    RETURNING f.retry_at INTO retry;
    RETURN retry;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._close_order(p_order_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    o callback_center.orders;
BEGIN
    SELECT * INTO o FROM callback_center.orders x
     WHERE x.order_id = p_order_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM callback_center.orders x WHERE x.order_id = p_order_id) THEN
            RAISE EXCEPTION USING ERRCODE = 'CB050',
                MESSAGE = format('order "%s" does not exist', p_order_id);
        END IF;
        RETURN false;
    END IF;
    IF NOT (o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')
            AND o.pay_deadline <= now()) THEN
        RETURN false;
    END IF;
    RETURN callback_center._close_locked_orders(ARRAY[o.order_id]) = 1;
END
$$;

-- Certificate cache (issue 13): _unionpay_parse passes the loaded certificates
-- in a fixed order (the cache in crypto.c is keyed by them).

-- UnionPay (China UnionPay online payments, acp SDK 5.1.0) back-end
-- notifications.  The body is the form as posted; names and values are
-- %-decoded to the bytes of the form's encoding (UTF-8 or GBK).  The
-- signed string is every parameter but signature, empty values left out
-- (the SDK neither sends nor reads them), sorted by name, joined as
-- k=v&...; signature is SHA256withRSA (signMethod 01, version 5.1.0) over
-- the lower-case hex SHA-256 digest of it, by the key of the certificate
-- in signPubKeyCert, which must chain to the root and intermediate
-- certificates loaded with set_platform_keys, be valid now and name one of
-- the provider's organisation names (p_secrets).  UnionPay signs no
-- notification time: a replay is a repeat of the recorded message, keyed
-- by queryId and txnType.
CREATE OR REPLACE FUNCTION callback_center._unionpay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    charset text;
    cs text;
    cert bytea;
    cert_pem text;
    content bytea;
    sig bytea;
    cas text[];
    chk record;
    f jsonb;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(p_body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'encoding')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs = 'GBK' THEN 'GBK' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- signMethod 01 of version 5.1.0 only: 5.0.0 signs SHA-1 digests with
    -- a certificate chosen by certId, 11 and 12 are symmetric keys.
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        sig := NULL;
    END;
    IF sig IS NULL OR sig = '' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- In a fixed order: the certificate cache (crypto.c) is keyed by them.
    SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = p_provider;
    IF cas IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no UnionPay certificates', p_provider),
            HINT = 'An administrator loads the root and intermediate certificates with callback_center.set_platform_keys().';
    END IF;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, cas, p_secrets);
    IF chk.verdict <> 'ok' THEN
        failure := CASE chk.verdict WHEN 'malformed' THEN 'malformed_signature'
                                    WHEN 'expired' THEN 'key_expired'
                                    WHEN 'wrong_name' THEN 'wrong_organisation'
                                    ELSE 'untrusted_key' END;
        fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by UnionPay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('orderId', 'queryId', 'txnType', 'txnSubType', 'respCode',
                        'txnAmt', 'currencyCode');
        -- What a resend repeats: the signed parameters but the certificate
        -- (UnionPay may sign a resend under its next certificate).
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('signature', 'signPubKeyCert') AND x.v <> '';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF nullif(f->>'queryId', '') IS NULL OR nullif(f->>'txnType', '') IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := (f->>'queryId') || ':' || (f->>'txnType');
    event_type := 'txnType ' || (f->>'txnType') || coalesce('/' || (f->>'txnSubType'), '');
    IF f->>'txnType' = '01' THEN
        -- Consumption: respCode 00 (success) and A6 (success with a
        -- defect) pay; any other is one failed attempt.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'success' ELSE 'attempt_failed' END;
        -- ISO 4217 numeric codes.
        currency := CASE f->>'currencyCode'
            WHEN '156' THEN 'CNY' WHEN '344' THEN 'HKD' WHEN '446' THEN 'MOP'
            WHEN '901' THEN 'TWD' WHEN '840' THEN 'USD' WHEN '978' THEN 'EUR'
            WHEN '826' THEN 'GBP' WHEN '392' THEN 'JPY' WHEN '410' THEN 'KRW'
            WHEN '702' THEN 'SGD' WHEN '036' THEN 'AUD' WHEN '124' THEN 'CAD'
            ELSE f->>'currencyCode' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$'
           OR nullif(currency, '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    -- Other transaction types (refunds 04, cancellations 31, ...) are
    -- recorded and acknowledged (verdict NULL).
END
$$;


-- Reconciliation and the one rule (issue 13): provider_statement.currency (the
-- line's currency when the statement says it); reconcile passes it to
-- _apply_payment_result, so a success in another currency is flagged, never
-- applied.
ALTER TABLE callback_center.provider_statement ADD COLUMN currency text;

-- Reconciles one channel's statement for one bill date against local
-- payments in one set-based pass, records every difference in recon_diffs
-- (upsert: a rerun adds nothing twice, and drops differences that are gone
-- unless applied), settles provider-paid / locally-unpaid payments like a
-- callback would, and returns the count of recorded differences per kind
-- for (channel, bill_date).  The bill date's day is midnight to midnight in
-- the session's TimeZone.
CREATE OR REPLACE FUNCTION callback_center.reconcile(channel text, bill_date date,
    grace interval DEFAULT '30 minutes')
RETURNS TABLE (kind text, count bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_channel text := reconcile.channel;
    p_date date := reconcile.bill_date;
    day_start timestamptz;
    day_end timestamptz;
    run_at timestamptz := clock_timestamp();
    r record;
    applied_ids bigint[];
    o callback_center.orders;
    pay callback_center.payments;
    outcome text;
BEGIN
    PERFORM callback_center._require_key(p_channel, 'channel', 63);
    PERFORM callback_center._require(p_date, 'bill_date');
    PERFORM callback_center._require(reconcile.grace, 'grace');
    IF reconcile.grace < interval '0' OR reconcile.grace >= interval '12 hours' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('grace must be between 0 and 12 hours, got %s', reconcile.grace);
    END IF;
    day_start := p_date::timestamptz;
    day_end := (p_date + 1)::timestamptz;

    -- Serialise runs for one (channel, bill_date).
    PERFORM pg_advisory_xact_lock(hashtextextended(
        'callback_center.recon:' || p_channel || ':' || p_date::text, 0));

    -- One pass: statement lines of the day FULL JOIN local payments of the
    -- provider paid in the day widened by grace at both edges, matched on
    -- the provider's transaction id.  Lines left unmatched look further:
    -- the same transaction id paid on any other day (x: the provider booked
    -- it across midnight from us, or later; compared like a match), or the
    -- unpaid payment of the line's order (u).  Local payments left
    -- unmatched are differences only when paid in the day and not on a
    -- neighbouring day's statement (that day's run compares them); grace is
    -- how long before or after midnight one may still turn up on the
    -- neighbour's statement, so those wait as pending_grace.  Lines already
    -- settled by an earlier run are left alone.
    WITH s AS (
        SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status
          FROM callback_center.provider_statement st
         WHERE st.channel = p_channel AND st.bill_date = p_date
           AND NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                            WHERE d.channel = p_channel AND d.bill_date = p_date
                              AND d.provider_txn_id = st.provider_txn_id
                              AND d.resolution = 'applied')
    ), l AS (
        SELECT p.payment_id, p.order_id, p.provider_txn_id, p.amount_cents, p.status, p.paid_at
          FROM callback_center.payments p
         WHERE p.provider = p_channel
           AND p.paid_at >= day_start - reconcile.grace
           AND p.paid_at < day_end + reconcile.grace
           AND p.provider_txn_id IS NOT NULL
    ), j AS (
        SELECT s.provider_txn_id AS s_txn, s.order_id AS s_order, s.amount_cents AS s_amount,
               s.status AS s_status,
               l.provider_txn_id AS l_txn, l.order_id AS l_order, l.amount_cents AS l_amount,
               l.status AS l_status, l.paid_at AS l_paid_at
          FROM s FULL JOIN l ON l.provider_txn_id = s.provider_txn_id
    ), c AS (
        SELECT coalesce(j.s_txn, j.l_txn) AS txn,
               coalesce(j.s_order, j.l_order, x.order_id, u.order_id) AS order_id,
               j.s_amount, j.s_status,
               coalesce(j.l_amount, x.amount_cents, u.amount_cents) AS local_amount,
               coalesce(j.l_status, x.status, u.status) AS local_status,
               CASE
                 WHEN j.s_txn IS NOT NULL AND j.l_txn IS NOT NULL THEN
                   CASE WHEN j.s_amount <> j.l_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, j.l_status)
                             THEN 'status_mismatch' END
                 WHEN j.l_txn IS NOT NULL THEN
                   -- Local only; rows in the grace margins, and rows on a
                   -- neighbouring day's statement, are that day's to judge.
                   CASE WHEN j.l_paid_at >= day_start AND j.l_paid_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = p_channel
                                    AND n.bill_date IN (p_date - 1, p_date + 1)
                                    AND n.provider_txn_id = j.l_txn)
                        THEN 'missing_provider' END
                 WHEN x.payment_id IS NOT NULL THEN
                   CASE WHEN x.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, x.status)
                             THEN 'status_mismatch' END
                 WHEN u.payment_id IS NOT NULL THEN
                   CASE WHEN u.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, u.status)
                             THEN 'status_mismatch' END
                 ELSE 'missing_local'
               END AS kind,
               CASE
                 WHEN j.l_txn IS NOT NULL AND j.s_txn IS NULL THEN
                   CASE WHEN j.l_paid_at < day_start + reconcile.grace
                          OR j.l_paid_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN u.payment_id IS NOT NULL AND j.s_status = 'success'
                      AND u.amount_cents = j.s_amount
                      AND u.status IN ('CREATED', 'PAYING', 'CLOSED', 'FAILED') THEN 'applied'
                 ELSE 'flagged'
               END AS resolution,
               u.payment_id AS apply_payment_id
          -- Index probes for the unmatched lines only (LIMIT 1 keeps
          -- them per-row lookups, not hash joins over every payment).
          FROM j
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND p.provider_txn_id = j.s_txn
                   AND p.provider = p_channel
                 LIMIT 1) x ON true
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND x.payment_id IS NULL
                   AND p.order_id = j.s_order AND p.provider_txn_id IS NULL
                   AND p.provider = p_channel
                 LIMIT 1) u ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at)
        SELECT p_channel, p_date, c.txn, c.order_id,
               -- Known late money is a refund for people, whatever else
               -- differs; once refunded, the provider's refund agrees.
               CASE WHEN lp.status = 'refund_required' AND c.resolution <> 'applied'
                    THEN 'refund_required' ELSE c.kind END,
               c.s_amount, c.local_amount, c.s_status, c.local_status,
               CASE WHEN lp.status = 'refund_required' AND c.resolution = 'pending_grace'
                    THEN 'flagged' ELSE c.resolution END,
               run_at
          FROM c
          LEFT JOIN LATERAL (
                SELECT l.status FROM callback_center.late_payments l
                 WHERE l.provider = p_channel AND l.provider_txn_id = c.txn) lp ON true
         WHERE c.kind IS NOT NULL
           AND NOT (lp.status IS NOT DISTINCT FROM 'refunded' AND c.s_status = 'refund')
        ON CONFLICT (channel, bill_date, provider_txn_id, kind) DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.provider_txn_id, d.order_id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO applied_ids
      FROM ins;

    -- Differences an earlier run recorded that this run no longer finds.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = p_channel AND d.bill_date = p_date
       AND d.resolution NOT IN ('applied', 'resolved') AND d.checked_at <> run_at;

    -- Local payments a neighbouring day's run left waiting for a
    -- statement line that turned up on this day's statement: compared
    -- above, so no longer differences of that day.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = p_channel AND d.bill_date IN (p_date - 1, p_date + 1)
       AND d.kind = 'missing_provider' AND d.resolution = 'pending_grace'
       AND EXISTS (SELECT 1 FROM callback_center.provider_statement st
                    WHERE st.channel = p_channel AND st.bill_date = p_date
                      AND st.provider_txn_id = d.provider_txn_id);

    -- Settle what the provider was paid for and we were not told, through
    -- the same path as a callback (state machines, follow-up events; on an
    -- order that can no longer take the money, a late payment to refund).
    FOR r IN
        SELECT d.id, d.provider_txn_id, d.order_id, d.provider_amount, st.currency
          FROM callback_center.recon_diffs d
          LEFT JOIN callback_center.provider_statement st
                 ON st.channel = p_channel AND st.bill_date = p_date
                AND st.provider_txn_id = d.provider_txn_id
         WHERE d.id = ANY (coalesce(applied_ids, '{}'))
         ORDER BY d.id
    LOOP
        SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = r.order_id FOR UPDATE;
        SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = r.order_id FOR UPDATE;
        IF pay.provider_txn_id IS NOT NULL THEN
            -- A callback got there first, after the pass read the row.
            UPDATE callback_center.recon_diffs d
               SET resolution = 'flagged',
                   note = format('payment took transaction %s meanwhile', pay.provider_txn_id)
             WHERE d.id = r.id;
            CONTINUE;
        END IF;
        outcome := callback_center._apply_payment_result(p_channel, r.provider_txn_id, r.order_id,
                                                         r.provider_amount, r.currency, 'success',
                                                         'reconciliation');
        UPDATE callback_center.recon_diffs d
           SET kind = CASE outcome WHEN 'refund_required' THEN 'refund_required' ELSE d.kind END,
               resolution = CASE outcome WHEN 'paid' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome
                        WHEN 'paid' THEN 'payment marked paid'
                        WHEN 'refund_required'
                          THEN format('order is %s/%s: payment.refund_required emitted',
                                      o.status, o.pay_status)
                        ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    RETURN QUERY
        SELECT k.kind, count(d.id)
          FROM unnest(ARRAY['missing_local', 'missing_provider', 'amount_mismatch',
                            'status_mismatch', 'refund_required']) WITH ORDINALITY AS k(kind, ord)
          LEFT JOIN callback_center.recon_diffs d
                 ON d.channel = p_channel AND d.bill_date = p_date AND d.kind = k.kind
         GROUP BY k.kind, k.ord
         ORDER BY k.ord;
END
$$;


-- One secret generator: an endpoint's generated secret comes from the C
-- generator new_webhook_secret uses (32 bytes, as before), not from
-- pgcrypto's gen_random_bytes.

CREATE FUNCTION callback_center._new_endpoint_secret()
RETURNS text
AS 'MODULE_PATHNAME', 'cc_new_endpoint_secret'
LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION callback_center._new_endpoint_secret() FROM PUBLIC;

CREATE OR REPLACE FUNCTION callback_center._check_secret(secret text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    raw bytea;
BEGIN
    IF secret IS NULL THEN
        RETURN callback_center._new_endpoint_secret();
    END IF;
    IF secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'secret must be "whsec_" followed by base64',
            HINT = 'Pass NULL to have a secret generated.';
    END IF;
    BEGIN
        raw := decode(substr(secret, 7), 'base64');
    EXCEPTION WHEN invalid_parameter_value THEN
        raw := NULL;
    END;
    IF raw IS NULL OR length(raw) NOT BETWEEN 24 AND 64 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'secret must encode 24 to 64 bytes',
            HINT = 'Pass NULL to have a secret generated.';
    END IF;
    RETURN secret;
END
$$;

-- One convention for parameter/column name clashes: parameters qualified by
-- their function's name.  Internal functions whose p_ parameters are renamed
-- are dropped and created again (a parameter name cannot change in place);
-- the others keep their signatures.

DROP FUNCTION callback_center._stock_spread(text, bigint);
DROP FUNCTION callback_center._stock_lock_slots(text);
DROP FUNCTION callback_center._require_provider(text);
DROP FUNCTION callback_center._tcc_settle(text, text, text, text);
DROP FUNCTION callback_center._tcc_second_phase(text, text, text, text);

CREATE FUNCTION callback_center._stock_spread(sku_id text, total bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    n integer;
BEGIN
    PERFORM 1 FROM callback_center.stock_slots AS t
      WHERE t.sku_id = _stock_spread.sku_id ORDER BY t.slot FOR UPDATE;
    SELECT count(*) INTO n FROM callback_center.stock_slots AS t WHERE t.sku_id = _stock_spread.sku_id;
    UPDATE callback_center.stock_slots AS t
       SET available = _stock_spread.total / n + CASE WHEN t.slot < _stock_spread.total % n THEN 1 ELSE 0 END
     WHERE t.sku_id = _stock_spread.sku_id;
END
$fn$;

CREATE FUNCTION callback_center._stock_lock_slots(sku_id text)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT COALESCE(sum(l.available), 0)::bigint
      FROM (SELECT t.available FROM callback_center.stock_slots AS t
             WHERE t.sku_id = _stock_lock_slots.sku_id ORDER BY t.slot FOR UPDATE) AS l
$fn$;

REVOKE ALL ON FUNCTION callback_center._stock_spread(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._stock_lock_slots(text) FROM PUBLIC;

CREATE FUNCTION callback_center._require_provider(name text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require_key(_require_provider.name, 'provider', 63);
    IF NOT EXISTS (SELECT 1 FROM callback_center.providers p WHERE p.name = _require_provider.name) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', _require_provider.name),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
END
$$;

REVOKE ALL ON FUNCTION callback_center._require_provider(text) FROM PUBLIC;

CREATE FUNCTION callback_center._tcc_settle(
    gid text, branch_id text, kind text, status text)
RETURNS callback_center.tcc_reservations
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    r callback_center.tcc_reservations;
BEGIN
    UPDATE callback_center.tcc_reservations AS t
       SET status = _tcc_settle.status, updated_at = pg_catalog.now()
     WHERE t.gid = _tcc_settle.gid AND t.branch_id = _tcc_settle.branch_id
       AND t.kind = _tcc_settle.kind AND t.status = 'reserved'
    RETURNING t.* INTO r;
    IF FOUND THEN
        RETURN r;
    END IF;
    SELECT * INTO r FROM callback_center.tcc_reservations AS t
     WHERE t.gid = _tcc_settle.gid AND t.branch_id = _tcc_settle.branch_id;
    RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = pg_catalog.format('no %s reservation of gid "%s" branch "%s" to %s',
                                    _tcc_settle.kind, _tcc_settle.gid, _tcc_settle.branch_id,
                                    CASE _tcc_settle.status WHEN 'confirmed' THEN 'confirm' ELSE 'cancel' END),
        DETAIL = CASE WHEN r.gid IS NULL THEN 'The branch reserved nothing.'
                      ELSE pg_catalog.format('The branch holds a %s reservation that is %s.',
                                             r.kind, r.status) END;
END
$fn$;

CREATE FUNCTION callback_center._tcc_second_phase(
    gid text, branch_id text, kind text, op text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome text;
    r       callback_center.tcc_reservations;
BEGIN
    -- barrier() checks gid and branch_id (_require_key).
    outcome := callback_center.barrier(_tcc_second_phase.gid, _tcc_second_phase.branch_id, _tcc_second_phase.op);
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    r := callback_center._tcc_settle(_tcc_second_phase.gid, _tcc_second_phase.branch_id, _tcc_second_phase.kind,
                                     CASE _tcc_second_phase.op WHEN 'confirm' THEN 'confirmed' ELSE 'cancelled' END);
    IF _tcc_second_phase.kind = 'stock' THEN
        UPDATE callback_center.stock AS s
           SET available = s.available + CASE _tcc_second_phase.op WHEN 'cancel' THEN r.quantity ELSE 0 END,
               reserved = s.reserved - r.quantity,
               version = s.version + 1,
               updated_at = pg_catalog.now()
         WHERE s.sku_id = r.resource_id;
    ELSIF _tcc_second_phase.op = 'confirm' THEN
        PERFORM callback_center.use_coupon(r.resource_id, _tcc_second_phase.gid);
    ELSE
        PERFORM callback_center.unfreeze_coupon(r.resource_id, _tcc_second_phase.gid);
    END IF;
    RETURN outcome;
END
$fn$;

REVOKE ALL ON FUNCTION callback_center._tcc_settle(text, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._tcc_second_phase(text, text, text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION callback_center.set_stock(
    sku_id text,
    available bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    result callback_center.stock;
    n      integer;
BEGIN
    PERFORM callback_center._require_key(set_stock.sku_id, 'sku_id');
    PERFORM callback_center._require(set_stock.available, 'available');
    IF set_stock.available < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('available must not be negative: %s', set_stock.available),
            DETAIL = pg_catalog.format('SKU "%s" was given %s units.', set_stock.sku_id, set_stock.available);
    END IF;
    LOOP
        SELECT s.slots INTO n FROM callback_center.stock AS s
         WHERE s.sku_id = set_stock.sku_id FOR UPDATE;
        IF n > 0 THEN
            -- A hot SKU: the units go to its slots, evenly.
            PERFORM callback_center._stock_spread(set_stock.sku_id, set_stock.available);
            UPDATE callback_center.stock AS s
               SET version = s.version + 1, updated_at = pg_catalog.now()
             WHERE s.sku_id = set_stock.sku_id
            RETURNING s.* INTO result;
            result.available := set_stock.available;
            RETURN result;
        END IF;
        -- The WHERE skips a row made hot since the SELECT found none.
        INSERT INTO callback_center.stock AS s (sku_id, available, updated_at)
        VALUES (set_stock.sku_id, set_stock.available, pg_catalog.now())
        ON CONFLICT ON CONSTRAINT stock_pkey DO UPDATE
            SET available = EXCLUDED.available,
                version = s.version + 1,
                updated_at = EXCLUDED.updated_at
            WHERE s.slots = 0
        RETURNING s.* INTO result;
        IF FOUND THEN
            RETURN result;
        END IF;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.adjust_stock(
    sku_id text,
    delta bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    result callback_center.stock;
    cur     bigint;
    n       integer;
BEGIN
    PERFORM callback_center._require(adjust_stock.sku_id, 'sku_id');
    PERFORM callback_center._require(adjust_stock.delta, 'delta');
    SELECT s.available, s.slots INTO cur, n FROM callback_center.stock AS s
     WHERE s.sku_id = adjust_stock.sku_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = pg_catalog.format('unknown SKU "%s"', adjust_stock.sku_id),
            HINT = 'Create it with callback_center.set_stock().';
    END IF;
    IF n > 0 THEN
        -- A hot SKU: the new total is spread over its slots again, so no
        -- slot goes below zero while the total covers the change.
        cur := cur + callback_center._stock_lock_slots(adjust_stock.sku_id);
    END IF;
    IF cur + adjust_stock.delta < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', adjust_stock.sku_id),
            DETAIL = pg_catalog.format('Adjusting by %s would leave %s units; %s are available.',
                                       adjust_stock.delta, cur + adjust_stock.delta, cur);
    END IF;
    IF n > 0 THEN
        PERFORM callback_center._stock_spread(adjust_stock.sku_id, cur + adjust_stock.delta);
        UPDATE callback_center.stock AS s
           SET available = 0, version = s.version + 1, updated_at = pg_catalog.now()
         WHERE s.sku_id = adjust_stock.sku_id
        RETURNING s.* INTO result;
        result.available := cur + adjust_stock.delta;
        RETURN result;
    END IF;
    UPDATE callback_center.stock AS s
       SET available = s.available + adjust_stock.delta,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = adjust_stock.sku_id
    RETURNING s.* INTO result;
    RETURN result;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.set_hot_sku(
    sku_id text,
    slots integer)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    result  callback_center.stock;
    cur     callback_center.stock;
    total   bigint;
BEGIN
    PERFORM callback_center._require(set_hot_sku.sku_id, 'sku_id');
    PERFORM callback_center._require(set_hot_sku.slots, 'slots');
    IF set_hot_sku.slots < 1 OR set_hot_sku.slots > 256 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('slots must be between 1 and 256: %s', set_hot_sku.slots),
            HINT = 'Use 2 to 256 slots to make a SKU hot, 1 to make it normal again.';
    END IF;
    SELECT s.* INTO cur FROM callback_center.stock AS s WHERE s.sku_id = set_hot_sku.sku_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = pg_catalog.format('unknown SKU "%s"', set_hot_sku.sku_id),
            HINT = 'Create it with callback_center.set_stock().';
    END IF;
    IF set_hot_sku.slots > 1 AND cur.reserved > 0 THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = pg_catalog.format('SKU "%s" has reserved units', set_hot_sku.sku_id),
            DETAIL = pg_catalog.format('TCC tries hold %s units of it.', cur.reserved),
            HINT = 'Confirm or cancel its reservations first: a hot SKU cannot be reserved.';
    END IF;
    total := cur.available + callback_center._stock_lock_slots(set_hot_sku.sku_id);
    DELETE FROM callback_center.stock_slots AS t WHERE t.sku_id = set_hot_sku.sku_id;
    IF set_hot_sku.slots > 1 THEN
        INSERT INTO callback_center.stock_slots (sku_id, slot, available)
        SELECT set_hot_sku.sku_id, i, 0 FROM pg_catalog.generate_series(0, set_hot_sku.slots - 1) AS i;
        PERFORM callback_center._stock_spread(set_hot_sku.sku_id, total);
    END IF;
    UPDATE callback_center.stock AS s
       SET available = CASE WHEN set_hot_sku.slots > 1 THEN 0 ELSE total END,
           slots = CASE WHEN set_hot_sku.slots > 1 THEN set_hot_sku.slots ELSE 0 END,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = set_hot_sku.sku_id
    RETURNING s.* INTO result;
    result.available := total;
    RETURN result;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.barrier(
    gid text,
    branch_id text,
    op text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    n        integer;
    outcome  text;
    me       text := callback_center._caller();
    owner    text;
BEGIN
    PERFORM callback_center._require_key(barrier.gid, 'gid');
    PERFORM callback_center._require_key(barrier.branch_id, 'branch_id');
    PERFORM callback_center._require(barrier.op, 'op');
    IF barrier.op NOT IN ('try', 'confirm', 'cancel') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('invalid barrier op "%s"', barrier.op),
            HINT = 'Use try, confirm or cancel.';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        'callback_center.tcc:' || barrier.gid || ':' || barrier.branch_id, 0));
    SELECT b.created_by INTO owner FROM callback_center.tcc_barrier AS b
     WHERE b.gid = barrier.gid AND b.branch_id = barrier.branch_id AND b.created_by IS NOT NULL
     LIMIT 1;
    IF owner IS DISTINCT FROM me AND owner IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('gid "%s" branch "%s" belongs to another role',
                                        barrier.gid, barrier.branch_id),
            DETAIL = pg_catalog.format('It was begun by role "%s"; this call acts for "%s".',
                                       owner, me),
            HINT = 'Each role confirms and cancels only its own branches.';
    END IF;
    IF barrier.op = 'cancel' THEN
        INSERT INTO callback_center.tcc_barrier AS b
               (gid, branch_id, op, written_by, last_outcome, created_by)
        VALUES (barrier.gid, barrier.branch_id, 'try', 'cancel', 'empty_compensation', me)
        ON CONFLICT ON CONSTRAINT tcc_barrier_pkey DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 1 THEN
            -- The try never ran; no cancel row can exist (a cancel always
            -- writes the try row first, in the same transaction).
            INSERT INTO callback_center.tcc_barrier
                   (gid, branch_id, op, written_by, last_outcome, created_by)
            VALUES (barrier.gid, barrier.branch_id, 'cancel', 'cancel', 'empty_compensation', me);
            RETURN 'empty_compensation';
        END IF;
    END IF;
    INSERT INTO callback_center.tcc_barrier AS b
           (gid, branch_id, op, written_by, last_outcome, created_by)
    VALUES (barrier.gid, barrier.branch_id, barrier.op, barrier.op, 'proceed', me)
    ON CONFLICT ON CONSTRAINT tcc_barrier_pkey DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 1 THEN
        RETURN 'proceed';
    END IF;
    -- The row was there (committed: ON CONFLICT waited for its writer).
    UPDATE callback_center.tcc_barrier AS b
       SET repeats = b.repeats + 1,
           last_outcome = CASE WHEN barrier.op = 'try' AND b.written_by = 'cancel'
                               THEN 'refused' ELSE 'duplicate' END,
           updated_at = pg_catalog.now()
     WHERE b.gid = barrier.gid AND b.branch_id = barrier.branch_id AND b.op = barrier.op
    RETURNING b.last_outcome INTO outcome;
    RETURN outcome;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.tcc_stock_try(
    gid text,
    branch_id text,
    sku_id text,
    qty bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome  text;
    cur      bigint;
    nslots   integer;
BEGIN
    PERFORM callback_center._require_key(tcc_stock_try.gid, 'gid');
    PERFORM callback_center._require_key(tcc_stock_try.branch_id, 'branch_id');
    PERFORM callback_center._require_key(tcc_stock_try.sku_id, 'sku_id');
    PERFORM callback_center._require(tcc_stock_try.qty, 'qty');
    IF tcc_stock_try.qty <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('qty must be positive: %s', tcc_stock_try.qty);
    END IF;
    outcome := callback_center.barrier(tcc_stock_try.gid, tcc_stock_try.branch_id, 'try');
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    UPDATE callback_center.stock AS s
       SET available = s.available - tcc_stock_try.qty,
           reserved = s.reserved + tcc_stock_try.qty,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = tcc_stock_try.sku_id AND s.available >= tcc_stock_try.qty;
    IF NOT FOUND THEN
        SELECT s.available, s.slots INTO cur, nslots FROM callback_center.stock AS s WHERE s.sku_id = tcc_stock_try.sku_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'CB004',
                MESSAGE = pg_catalog.format('unknown SKU "%s"', tcc_stock_try.sku_id),
                HINT = 'Create it with callback_center.set_stock().';
        END IF;
        -- A hot SKU's units are in its slots, not on the row: a reservation
        -- there would have to be given back to a slot by the cancel, which
        -- the reservation model (one row) does not do.
        IF nslots > 0 THEN
            RAISE EXCEPTION USING ERRCODE = '0A000',
                MESSAGE = pg_catalog.format('cannot reserve hot SKU "%s" through TCC', tcc_stock_try.sku_id),
                DETAIL = pg_catalog.format('Its units are spread over %s slots.', nslots),
                HINT = 'Deduct it with deduct_stock() (restore_stock() compensates), or make it normal with set_hot_sku(sku, 1).';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', tcc_stock_try.sku_id),
            DETAIL = pg_catalog.format('Reserving %s units needs more than the %s available.',
                                       tcc_stock_try.qty, cur);
    END IF;
    INSERT INTO callback_center.tcc_reservations (gid, branch_id, kind, resource_id, quantity)
    VALUES (tcc_stock_try.gid, tcc_stock_try.branch_id, 'stock', tcc_stock_try.sku_id, tcc_stock_try.qty);
    RETURN outcome;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.tcc_coupon_try(gid text, branch_id text, coupon_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome  text;
BEGIN
    PERFORM callback_center._require_key(tcc_coupon_try.gid, 'gid');
    PERFORM callback_center._require_key(tcc_coupon_try.branch_id, 'branch_id');
    PERFORM callback_center._require_key(tcc_coupon_try.coupon_id, 'coupon_id');
    outcome := callback_center.barrier(tcc_coupon_try.gid, tcc_coupon_try.branch_id, 'try');
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    PERFORM callback_center.freeze_coupon(tcc_coupon_try.coupon_id, tcc_coupon_try.gid);
    INSERT INTO callback_center.tcc_reservations (gid, branch_id, kind, resource_id, quantity)
    VALUES (tcc_coupon_try.gid, tcc_coupon_try.branch_id, 'coupon', tcc_coupon_try.coupon_id, 1);
    RETURN outcome;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.saga_start(saga_id text, steps jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    bad     text;
BEGIN
    PERFORM callback_center._require_key(saga_start.saga_id, 'saga_id');
    PERFORM callback_center._require(saga_start.steps, 'steps');
    IF pg_catalog.jsonb_typeof(saga_start.steps) <> 'array' OR pg_catalog.jsonb_array_length(saga_start.steps) = 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'steps must be a non-empty JSON array',
            HINT = 'Pass [{"action": "SELECT ...", "compensation": "SELECT ..."}, ...].';
    END IF;
    SELECT e::text INTO bad
      FROM pg_catalog.jsonb_array_elements(saga_start.steps) AS e
     WHERE pg_catalog.jsonb_typeof(e) <> 'object'
        OR pg_catalog.jsonb_typeof(e -> 'action') IS DISTINCT FROM 'string'
        OR pg_catalog.btrim(e ->> 'action') = ''
        OR pg_catalog.jsonb_typeof(e -> 'compensation') NOT IN ('string', 'null')
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('invalid saga step: %s', bad),
            DETAIL = 'Each step needs a non-empty "action" string; "compensation" is a string or null.';
    END IF;
    INSERT INTO callback_center.sagas (saga_id, created_by) VALUES (saga_start.saga_id, callback_center._caller());
    INSERT INTO callback_center.saga_steps (saga_id, step_no, action, compensation)
    SELECT saga_start.saga_id, e.n::integer, e.v ->> 'action', e.v ->> 'compensation'
      FROM pg_catalog.jsonb_array_elements(saga_start.steps) WITH ORDINALITY AS e(v, n);
    RETURN pg_catalog.jsonb_array_length(saga_start.steps);
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center._saga_mark(
    saga_id text, step_no integer, new_status text, error text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
BEGIN
    PERFORM callback_center._saga_lock(_saga_mark.saga_id);
    IF _saga_mark.step_no IS NULL THEN
        UPDATE callback_center.sagas AS s
           SET status = _saga_mark.new_status, last_error = COALESCE(_saga_mark.error, s.last_error),
               updated_at = pg_catalog.now()
         WHERE s.saga_id = _saga_mark.saga_id
           AND (s.status, _saga_mark.new_status) IN (('running', 'completed'), ('running', 'compensating'),
                                        ('compensating', 'compensated'),
                                        ('compensating', 'compensating'));
    ELSE
        UPDATE callback_center.saga_steps AS t
           SET status = _saga_mark.new_status, error = COALESCE(_saga_mark.error, t.error),
               updated_at = pg_catalog.now()
         WHERE t.saga_id = _saga_mark.saga_id AND t.step_no = _saga_mark.step_no
           AND (t.status, _saga_mark.new_status) IN (('pending', 'done'), ('pending', 'skipped'),
                                        ('done', 'compensated'), ('done', 'done'),
                                        ('skipped', 'skipped'));
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = pg_catalog.format('cannot move saga "%s" step %s to %s',
                                        _saga_mark.saga_id, COALESCE(_saga_mark.step_no::text, '-'), _saga_mark.new_status);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION callback_center.saga_run(saga_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $fn$
DECLARE
    st       text;
    step     record;
    outcome  text;
    err      text;
BEGIN
    IF saga_run.saga_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'saga_id must not be null';
    END IF;
    st := callback_center._saga_lock(saga_run.saga_id);
    -- _saga_lock checked the session's role; this is the role the steps
    -- would run as (not the same inside another SECURITY DEFINER function).
    IF NOT EXISTS (SELECT FROM callback_center.sagas AS s
                    WHERE s.saga_id OPERATOR(pg_catalog.=) saga_run.saga_id
                      AND s.created_by OPERATOR(pg_catalog.=) current_user::text) THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" does not belong to role "%s"', saga_run.saga_id, current_user),
            DETAIL = 'A saga''s steps run only as the role that declared it.';
    END IF;
    IF st IN ('completed', 'compensated') THEN
        RETURN st;
    END IF;
    IF st = 'running' THEN
        FOR step IN SELECT t.step_no, t.action FROM callback_center.saga_steps AS t
                     WHERE t.saga_id = saga_run.saga_id AND t.status = 'pending'
                     ORDER BY t.step_no
        LOOP
            BEGIN
                outcome := callback_center.barrier(saga_run.saga_id, step.step_no::text, 'try');
                IF outcome = 'proceed' THEN
                    EXECUTE step.action USING saga_run.saga_id;
                ELSIF outcome = 'refused' THEN
                    RAISE EXCEPTION USING ERRCODE = '55000',
                        MESSAGE = pg_catalog.format('step %s refused by the barrier', step.step_no),
                        DETAIL = 'Its compensation already ran.';
                END IF;
                PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no, 'done', NULL);
            EXCEPTION WHEN OTHERS THEN
                err := pg_catalog.format('step %s: %s: %s', step.step_no, SQLSTATE, SQLERRM);
                PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no, 'skipped', err);
                EXIT;
            END;
        END LOOP;
        IF err IS NULL THEN
            PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'completed', NULL);
            RETURN 'completed';
        END IF;
        PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensating', err);
    END IF;
    -- Compensating: from the last step down, each through the barrier.
    FOR step IN SELECT t.step_no, t.status, t.compensation FROM callback_center.saga_steps AS t
                 WHERE t.saga_id = saga_run.saga_id AND t.status <> 'compensated'
                 ORDER BY t.step_no DESC
    LOOP
        BEGIN
            outcome := callback_center.barrier(saga_run.saga_id, step.step_no::text, 'cancel');
            IF outcome = 'proceed' AND step.compensation IS NOT NULL THEN
                EXECUTE step.compensation USING saga_run.saga_id;
            END IF;
            PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no,
                CASE WHEN step.status = 'done' THEN 'compensated' ELSE 'skipped' END, NULL);
        EXCEPTION WHEN OTHERS THEN
            err := pg_catalog.format('compensation of step %s: %s: %s',
                                     step.step_no, SQLSTATE, SQLERRM);
            PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensating', err);
            RETURN 'compensating';
        END;
    END LOOP;
    PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensated', NULL);
    RETURN 'compensated';
END
$fn$;

-- ------------------------------------------------------------------------
-- Payment channels, outbound (issue 14, sections 1 and 2): the adapter
-- layer.  Endpoints get a format (standard_webhooks, wechatpay_v3, alipay,
-- unionpay); merchant settings, provider_answers and the request builders
-- and answer checks of 46_adapters.sql; the jobs worker asks the provider
-- before closing an order whose payment was started (_orders_due,
-- query_expired_orders, _apply_query_result, apply_provider_answers);
-- query endpoints of a provider format need no https (their answers are
-- verified); apply_query_answers leaves providers' answers to
-- apply_provider_answers.
-- ------------------------------------------------------------------------

ALTER TABLE callback_center.endpoints
    ADD COLUMN format text NOT NULL DEFAULT 'standard_webhooks'
        CHECK (format IN ('standard_webhooks', 'wechatpay_v3', 'alipay', 'unionpay'));

-- endpoint_config shows the format (a column at its end).
CREATE OR REPLACE VIEW callback_center.endpoint_config AS
SELECT e.id, e.name, e.url, e.event_types, e.timeout_ms, e.retry_schedule,
       coalesce(e.max_attempts, cardinality(s.delays) + 1) AS max_attempts,
       e.rate_limit_per_s, e.breaker_failure_ratio, e.breaker_window_s,
       e.breaker_min_requests, e.breaker_open_ms, e.is_core, e.ordered,
       e.enabled, e.created_at, e.updated_at, e.format
  FROM callback_center.endpoints e
  JOIN callback_center.retry_schedules s ON s.name = e.retry_schedule;
-- Payment channels, outbound: the adapter layer (doc/adapters.md).  An
-- endpoint whose format is a provider's (wechatpay_v3, alipay, unionpay)
-- receives payment.query, payment.close, refund.request and refund.query
-- events as that provider's own API calls: the delivery worker's claim
-- builds each request here (_adapter_request: method, URL, headers, body,
-- signed with the merchant's private key, fresh for every attempt), the
-- worker sends it, checks the response here (_adapter_check: the
-- provider's signature, then the answer normalized), and records the
-- normalized answer with the attempt (_adapter_record, provider_answers).
-- A response whose signature does not verify is a failed attempt, retried
-- on the endpoint's schedule.  The jobs worker applies the answers
-- (apply_provider_answers, 90_jobs.sql).
--
-- Where the material lives (nothing of it readable by the application, the
-- private key readable by nobody but the extension's owner):
--   merchant_settings   the merchant's id (WeChat Pay mchid, Alipay app_id,
--                       UnionPay merId), RSA private key, certificate serial
--                       (WeChat Pay serial_no, UnionPay certId), options
--   provider_keys and providers.secrets (45_channels.sql) verify answers:
--                       WeChat Pay platform keys, the Alipay public key,
--                       UnionPay's root certificates

-- The merchant's side of a provider, for outbound calls.  Loaded by
-- set_merchant (admin); private_key is read only by _merchant_sign
-- (src/merchant.c), never returned by any function.
CREATE TABLE callback_center.merchant_settings (
    provider    text PRIMARY KEY REFERENCES callback_center.providers (name)
                ON DELETE CASCADE ON UPDATE CASCADE,
    merchant_id text NOT NULL CHECK (merchant_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    private_key text NOT NULL,
    key_bits    integer NOT NULL CHECK (key_bits >= 2048),
    key_serial  text CHECK (key_serial ~ '^[A-Za-z0-9]{1,128}$'),
    options     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE callback_center.merchant_settings IS
    'Merchant ids, private keys and certificate serials for outbound provider calls; readable by the owner only';
SELECT pg_catalog.pg_extension_config_dump('callback_center.merchant_settings', '');
REVOKE ALL ON callback_center.merchant_settings FROM PUBLIC;

-- The merchant settings without the private key (admin).
CREATE VIEW callback_center.merchants AS
    SELECT m.provider, p.scheme AS format, m.merchant_id, m.key_serial, m.key_bits,
           m.options, m.updated_at
      FROM callback_center.merchant_settings m
      JOIN callback_center.providers p ON p.name = m.provider;
REVOKE ALL ON callback_center.merchants FROM PUBLIC;
GRANT SELECT ON callback_center.merchants TO callback_center_admin;

-- Every answer a provider gave to an outbound call (or the worker's giving
-- up on it), normalized, one row per event: kept in the transaction that
-- records the attempt, applied once by the jobs worker (applied_at,
-- outcome).  answer: see doc/adapters.md ("Normalized answers").
CREATE TABLE callback_center.provider_answers (
    outbox_id    bigint PRIMARY KEY,
    endpoint_id  integer NOT NULL,
    provider     text,
    event_type   text NOT NULL,
    aggregate_id text NOT NULL,
    attempt      integer NOT NULL,
    http_status  integer,
    answer       jsonb NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    applied_at   timestamptz,
    outcome      text
);
COMMENT ON TABLE callback_center.provider_answers IS
    'Normalized answers of payment providers to outbound calls, and how they were applied';
CREATE INDEX provider_answers_pending ON callback_center.provider_answers (outbox_id)
    WHERE applied_at IS NULL;
SELECT pg_catalog.pg_extension_config_dump('callback_center.provider_answers', '');
REVOKE ALL ON callback_center.provider_answers FROM PUBLIC;
GRANT SELECT ON callback_center.provider_answers TO callback_center_admin;

-- The C helpers (src/merchant.c).
CREATE FUNCTION callback_center._merchant_key_bits(private_key text)
RETURNS integer
AS 'MODULE_PATHNAME', 'cc_merchant_key_bits'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._merchant_sign(provider text, data bytea)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_merchant_sign'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._adapter_nonce()
RETURNS text
AS 'MODULE_PATHNAME', 'cc_adapter_nonce'
LANGUAGE C VOLATILE;

-- Loads the merchant's side of a payment provider (admin): merchant_id
-- (WeChat Pay mchid, Alipay app_id, UnionPay merId), the merchant's RSA
-- private key (PEM, unencrypted, 2048 bits or more), key_serial (the
-- serial of the merchant API certificate for WeChat Pay, the certId of the
-- signing certificate for UnionPay; none for Alipay) and options
-- (notify_url: WeChat Pay's refund notification URL; back_url: UnionPay's
-- backUrl; Alipay's certificate mode: app_cert_sn and
-- alipay_root_cert_sn, sent with every request).  Replaces what was
-- loaded.  Refused, with nothing written: 22004 NULL, CB033 unknown provider, 22023 a provider whose scheme has no
-- outbound API, a bad merchant id, key (detail says why, never quoting
-- it), serial or option.
CREATE FUNCTION callback_center.set_merchant(provider text, merchant_id text,
    private_key text, key_serial text DEFAULT NULL, options jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    bits integer;
    opt record;
BEGIN
    PERFORM callback_center._require(set_merchant.provider, 'provider');
    PERFORM callback_center._require(set_merchant.merchant_id, 'merchant_id');
    PERFORM callback_center._require(set_merchant.private_key, 'private_key');
    PERFORM callback_center._require(set_merchant.options, 'options');
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = set_merchant.provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_merchant.provider);
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'alipay', 'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('provider "%s" has scheme %s, which has no outbound API',
                             set_merchant.provider, v_scheme),
            HINT = 'Merchant settings are for wechatpay_v3, alipay and unionpay providers.';
    END IF;
    IF set_merchant.merchant_id !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'invalid merchant id',
            DETAIL = 'A merchant id is 1 to 64 letters, digits, "_", "." or "-".';
    END IF;
    bits := callback_center._merchant_key_bits(set_merchant.private_key);
    IF v_scheme IN ('wechatpay_v3', 'unionpay') AND set_merchant.key_serial IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('a %s merchant needs key_serial', v_scheme),
            DETAIL = CASE WHEN v_scheme = 'wechatpay_v3'
                          THEN 'WeChat Pay names the merchant API certificate by its serial number (serial_no).'
                          ELSE 'UnionPay names the signing certificate by its certId.' END;
    END IF;
    IF v_scheme = 'alipay' AND set_merchant.key_serial IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'an alipay merchant takes no key_serial',
            DETAIL = 'Alipay public-key mode names the application by app_id only.';
    END IF;
    IF set_merchant.key_serial !~ '^[A-Za-z0-9]{1,128}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'invalid key serial',
            DETAIL = 'A certificate serial or certId is 1 to 128 letters or digits.';
    END IF;
    IF jsonb_typeof(set_merchant.options) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'options must be a JSON object';
    END IF;
    FOR opt IN SELECT o.key, o.value FROM jsonb_each(set_merchant.options) o LOOP
        IF NOT ((v_scheme = 'wechatpay_v3' AND opt.key = 'notify_url')
                OR (v_scheme = 'unionpay' AND opt.key = 'back_url')
                OR (v_scheme = 'alipay' AND opt.key IN ('app_cert_sn', 'alipay_root_cert_sn'))) THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = format('unknown option "%s" for %s merchants', opt.key, v_scheme),
                HINT = 'wechatpay_v3 takes notify_url, unionpay back_url, alipay (certificate mode) app_cert_sn and alipay_root_cert_sn.';
        END IF;
        IF opt.key IN ('app_cert_sn', 'alipay_root_cert_sn') THEN
            -- SNs: hex MD5s, several joined by "_" for the root.
            IF jsonb_typeof(opt.value) <> 'string'
               OR (opt.value #>> '{}') !~ '^[0-9a-f]{32}(_[0-9a-f]{32})*$' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('invalid option "%s"', opt.key),
                    DETAIL = 'The value is an Alipay certificate SN (callback_center.alipay_cert_sn() of the certificate, alipay_root_cert_sn() of the root file).';
            END IF;
        ELSIF jsonb_typeof(opt.value) <> 'string' OR length(opt.value #>> '{}') > 2048
           OR (opt.value #>> '{}') !~ '^https?://[^[:space:][:cntrl:]]+$' THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = format('invalid option "%s"', opt.key),
                DETAIL = 'The value is an http:// or https:// URL of at most 2048 characters.';
        END IF;
    END LOOP;
    INSERT INTO callback_center.merchant_settings AS m
           (provider, merchant_id, private_key, key_bits, key_serial, options)
    VALUES (set_merchant.provider, set_merchant.merchant_id, set_merchant.private_key, bits,
            set_merchant.key_serial, set_merchant.options)
    ON CONFLICT ON CONSTRAINT merchant_settings_pkey DO UPDATE
       SET merchant_id = excluded.merchant_id, private_key = excluded.private_key,
           key_bits = excluded.key_bits, key_serial = excluded.key_serial,
           options = excluded.options, updated_at = now();
END
$$;

-- Sets how requests to an endpoint are shaped (admin): standard_webhooks
-- (the default: signed POSTs of the event) or a provider's API
-- (wechatpay_v3, alipay, unionpay), whose requests go to the endpoint's
-- URL as the provider's gateway.  22004 NULL, CB040 unknown endpoint,
-- 22023 unknown format.
CREATE FUNCTION callback_center.set_endpoint_format(endpoint text, format text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep_id integer;
BEGIN
    PERFORM callback_center._require(set_endpoint_format.endpoint, 'endpoint');
    PERFORM callback_center._require(set_endpoint_format.format, 'format');
    IF set_endpoint_format.format NOT IN ('standard_webhooks', 'wechatpay_v3', 'alipay', 'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('unknown endpoint format "%s"', set_endpoint_format.format),
            HINT = 'The formats are standard_webhooks, wechatpay_v3, alipay and unionpay.';
    END IF;
    ep_id := callback_center._endpoint_id(set_endpoint_format.endpoint, true);
    UPDATE callback_center.endpoints e
       SET format = set_endpoint_format.format, updated_at = now()
     WHERE e.id = ep_id;
END
$$;

-- s percent-encoded as RFC 3986 asks of a URL component or form value
-- (UTF-8; unreserved characters kept).
CREATE FUNCTION callback_center._url_encode(s text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    b bytea := convert_to(s, 'UTF8');
    out text := '';
    c integer;
    i integer;
BEGIN
    FOR i IN 0 .. length(b) - 1 LOOP
        c := get_byte(b, i);
        IF (c BETWEEN 48 AND 57) OR (c BETWEEN 65 AND 90) OR (c BETWEEN 97 AND 122)
           OR c IN (45, 46, 95, 126) THEN
            out := out || chr(c);
        ELSE
            out := out || '%' || upper(lpad(to_hex(c), 2, '0'));
        END IF;
    END LOOP;
    RETURN out;
END
$$;

-- cents as the decimal yuan string Alipay and the like expect ("88.88").
CREATE FUNCTION callback_center._yuan(cents bigint)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
    SELECT to_char(cents / 100.0, 'FM999999999999990.00')
$$;

-- The request of one event to a provider-format endpoint, as the delivery
-- worker sends it (src/adapter.c reads it): "METHOD URL", header lines, an
-- empty line, the body.  Signed now with the merchant's key, so every
-- attempt (every claim) carries a fresh timestamp and nonce.  Raises, and
-- the worker makes the event dead with the message: CB070 the provider has
-- no merchant settings, CB071 the provider's scheme is not the endpoint's
-- format, CB072 an event type the format does not send.
CREATE FUNCTION callback_center._adapter_request(endpoint_id integer, event_type text,
    aggregate_id text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep record;
    m callback_center.merchant_settings;
    v_provider text := _adapter_request.payload->>'provider';
    v_scheme text;
BEGIN
    SELECT e.url, e.format INTO ep FROM callback_center.endpoints e WHERE e.id = _adapter_request.endpoint_id;
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p WHERE p.name = v_provider;
    SELECT * INTO m FROM callback_center.merchant_settings x WHERE x.provider = v_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB070',
            MESSAGE = format('provider "%s" has no merchant settings', v_provider),
            HINT = 'An administrator loads them with callback_center.set_merchant().';
    END IF;
    IF v_scheme IS DISTINCT FROM ep.format THEN
        RAISE EXCEPTION USING ERRCODE = 'CB071',
            MESSAGE = format('provider "%s" has scheme %s, the endpoint format %s',
                             v_provider, v_scheme, ep.format);
    END IF;
    IF ep.format = 'wechatpay_v3' THEN
        RETURN callback_center._wechatpay_v3_request(ep.url, m, _adapter_request.event_type, _adapter_request.payload);
    ELSIF ep.format = 'alipay' THEN
        RETURN callback_center._alipay_request(ep.url, m, _adapter_request.event_type, _adapter_request.payload);
    ELSIF ep.format = 'unionpay' THEN
        RETURN callback_center._unionpay_request(ep.url, m, _adapter_request.event_type, _adapter_request.payload);
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'CB071',
        MESSAGE = format('endpoint format %s has no adapter', ep.format);
END
$$;

-- The "unsupported event" error of a format.
CREATE FUNCTION callback_center._adapter_unsupported(format text, event_type text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'CB072',
        MESSAGE = format('event type "%s" cannot be sent to a %s endpoint', _adapter_unsupported.event_type, _adapter_unsupported.format),
        HINT = 'Provider endpoints take payment.query, payment.close, refund.request and refund.query.';
END
$$;

-- WeChat Pay APIv3: JSON over HTTPS, Authorization WECHATPAY2-SHA256-RSA2048
-- over "METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n" by the merchant key.
CREATE FUNCTION callback_center._wechatpay_v3_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    base text := rtrim(_wechatpay_v3_request.url, '/');
    method text;
    path text;
    body text := '';
    full_url text;
    signed_path text;
    ts text := extract(epoch FROM clock_timestamp())::bigint::text;
    nonce text := callback_center._adapter_nonce();
    sig text;
    req jsonb;
BEGIN
    IF _wechatpay_v3_request.event_type = 'payment.query' THEN
        method := 'GET';
        path := '/v3/pay/transactions/out-trade-no/'
                || callback_center._url_encode(_wechatpay_v3_request.payload->>'order_id')
                || '?mchid=' || callback_center._url_encode(m.merchant_id);
    ELSIF _wechatpay_v3_request.event_type = 'payment.close' THEN
        method := 'POST';
        path := '/v3/pay/transactions/out-trade-no/'
                || callback_center._url_encode(_wechatpay_v3_request.payload->>'order_id') || '/close';
        body := jsonb_build_object('mchid', m.merchant_id)::text;
    ELSIF _wechatpay_v3_request.event_type = 'refund.request' THEN
        method := 'POST';
        path := '/v3/refund/domestic/refunds';
        req := jsonb_build_object(
            'out_trade_no', _wechatpay_v3_request.payload->>'order_id',
            'out_refund_no', _wechatpay_v3_request.payload->>'refund_id',
            'amount', jsonb_build_object('refund', (_wechatpay_v3_request.payload->>'amount_cents')::bigint,
                                         'total', (_wechatpay_v3_request.payload->>'total_cents')::bigint,
                                         'currency', coalesce(_wechatpay_v3_request.payload->>'currency', 'CNY')));
        IF _wechatpay_v3_request.payload->>'provider_txn_id' IS NOT NULL THEN
            req := req || jsonb_build_object('transaction_id', _wechatpay_v3_request.payload->>'provider_txn_id');
        END IF;
        IF _wechatpay_v3_request.payload->>'reason' IS NOT NULL THEN
            req := req || jsonb_build_object('reason', left(_wechatpay_v3_request.payload->>'reason', 80));
        END IF;
        IF m.options->>'notify_url' IS NOT NULL THEN
            req := req || jsonb_build_object('notify_url', m.options->>'notify_url');
        END IF;
        body := req::text;
    ELSIF _wechatpay_v3_request.event_type = 'refund.query' THEN
        method := 'GET';
        path := '/v3/refund/domestic/refunds/' || callback_center._url_encode(_wechatpay_v3_request.payload->>'refund_id');
    ELSE
        PERFORM callback_center._adapter_unsupported('wechatpay_v3', _wechatpay_v3_request.event_type);
    END IF;
    full_url := base || path;
    -- The signed path is the request URL's absolute path with its query.
    signed_path := coalesce(substring(full_url FROM '^[A-Za-z]+://[^/?#]+(/[^#]*)$'), path);
    sig := callback_center._merchant_sign(m.provider,
        convert_to(method || E'\n' || signed_path || E'\n' || ts || E'\n' || nonce || E'\n'
                   || body || E'\n', 'UTF8'));
    RETURN method || ' ' || full_url || E'\n'
        || format('Authorization: WECHATPAY2-SHA256-RSA2048 mchid="%s",nonce_str="%s",signature="%s",timestamp="%s",serial_no="%s"',
                  m.merchant_id, nonce, sig, ts, m.key_serial) || E'\n'
        || E'Accept: application/json\n'
        || E'Content-Type: application/json\n'
        || E'\n' || body;
END
$$;

-- Alipay OpenAPI: a form POST to the gateway of app_id, method, format,
-- charset, sign_type RSA2, timestamp (Beijing time), version and
-- biz_content, signed over "k=v&..." of every non-empty parameter but
-- sign, sorted by name.
CREATE FUNCTION callback_center._alipay_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    api text;
    biz jsonb;
    params jsonb;
    signed text;
    body text;
BEGIN
    IF _alipay_request.event_type = 'payment.query' THEN
        api := 'alipay.trade.query';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id');
    ELSIF _alipay_request.event_type = 'payment.close' THEN
        api := 'alipay.trade.close';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id');
    ELSIF _alipay_request.event_type = 'refund.request' THEN
        api := 'alipay.trade.refund';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id',
                                  'out_request_no', _alipay_request.payload->>'refund_id',
                                  'refund_amount',
                                  callback_center._yuan((_alipay_request.payload->>'amount_cents')::bigint));
        IF _alipay_request.payload->>'reason' IS NOT NULL THEN
            biz := biz || jsonb_build_object('refund_reason', left(_alipay_request.payload->>'reason', 256));
        END IF;
    ELSIF _alipay_request.event_type = 'refund.query' THEN
        api := 'alipay.trade.fastpay.refund.query';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id',
                                  'out_request_no', _alipay_request.payload->>'refund_id');
    ELSE
        PERFORM callback_center._adapter_unsupported('alipay', _alipay_request.event_type);
    END IF;
    params := jsonb_build_object(
        'app_id', m.merchant_id, 'method', api, 'format', 'JSON', 'charset', 'utf-8',
        'sign_type', 'RSA2', 'version', '1.0', 'biz_content', biz::text,
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'Asia/Shanghai',
                             'YYYY-MM-DD HH24:MI:SS'));
    -- Certificate mode: the application's and Alipay's root certificate SNs.
    params := params || jsonb_strip_nulls(jsonb_build_object(
        'app_cert_sn', m.options->>'app_cert_sn',
        'alipay_root_cert_sn', m.options->>'alipay_root_cert_sn'));
    SELECT string_agg(p.key || '=' || (p.value #>> '{}'), '&' ORDER BY p.key COLLATE "C")
      INTO signed FROM jsonb_each(params) p WHERE (p.value #>> '{}') <> '';
    params := params || jsonb_build_object('sign',
        callback_center._merchant_sign(m.provider, convert_to(signed, 'UTF8')));
    SELECT string_agg(p.key || '=' || callback_center._url_encode(p.value #>> '{}'), '&'
                      ORDER BY p.key COLLATE "C")
      INTO body FROM jsonb_each(params) p;
    RETURN 'POST ' || _alipay_request.url || E'\n'
        || E'Content-Type: application/x-www-form-urlencoded;charset=utf-8\n'
        || E'\n' || body;
END
$$;

-- UnionPay acp 5.1.0 back-channel requests: a form POST of sorted k=v
-- fields, signMethod 01, certId of the merchant's signing certificate and
-- signature = base64(SHA256withRSA(hex(SHA-256("k=v&..." sorted)))).  A
-- query goes to /gateway/api/queryTrans.do, a refund to
-- /gateway/api/backTransReq.do under the endpoint's URL.  UnionPay has no
-- close of an unpaid order (an order ends at its payTimeout), so no
-- payment.close is ever sent to a unionpay endpoint (90_jobs.sql).
CREATE FUNCTION callback_center._unionpay_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    base text := rtrim(_unionpay_request.url, '/');
    path text;
    f jsonb;
    started timestamptz;
    signed text;
    body text;
    now_bj text := to_char(clock_timestamp() AT TIME ZONE 'Asia/Shanghai', 'YYYYMMDDHH24MISS');
BEGIN
    f := jsonb_build_object('version', '5.1.0', 'encoding', 'UTF-8', 'signMethod', '01',
                            'certId', m.key_serial, 'merId', m.merchant_id, 'accessType', '0');
    IF _unionpay_request.event_type = 'payment.query' THEN
        -- The order is named by orderId and the txnTime it was sent with:
        -- the time its payment started (start_payment), in Beijing time.
        SELECT p.updated_at INTO started FROM callback_center.payments p
         WHERE p.order_id = _unionpay_request.payload->>'order_id';
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'order_id',
                                     'txnTime', to_char(coalesce(started, clock_timestamp())
                                                        AT TIME ZONE 'Asia/Shanghai',
                                                        'YYYYMMDDHH24MISS'));
    ELSIF _unionpay_request.event_type = 'refund.request' THEN
        path := '/gateway/api/backTransReq.do';
        f := f || jsonb_build_object('txnType', '04', 'txnSubType', '00', 'bizType', '000201',
                                     'channelType', '07', 'currencyCode', '156',
                                     'orderId', _unionpay_request.payload->>'refund_id', 'txnTime', now_bj,
                                     'origQryId', _unionpay_request.payload->>'provider_txn_id',
                                     'txnAmt', (_unionpay_request.payload->>'amount_cents')::bigint::text);
        IF m.options->>'back_url' IS NOT NULL THEN
            f := f || jsonb_build_object('backUrl', m.options->>'back_url');
        END IF;
    ELSIF _unionpay_request.event_type = 'refund.query' THEN
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'refund_id', 'txnTime', now_bj);
    ELSE
        PERFORM callback_center._adapter_unsupported('unionpay', _unionpay_request.event_type);
    END IF;
    SELECT string_agg(x.key || '=' || (x.value #>> '{}'), '&' ORDER BY x.key COLLATE "C")
      INTO signed FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    f := f || jsonb_build_object('signature',
        callback_center._merchant_sign(m.provider,
            convert_to(encode(sha256(convert_to(signed, 'UTF8')), 'hex'), 'UTF8')));
    SELECT string_agg(x.key || '=' || callback_center._url_encode(x.value #>> '{}'), '&'
                      ORDER BY x.key COLLATE "C")
      INTO body FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    RETURN 'POST ' || base || path || E'\n'
        || E'Content-Type: application/x-www-form-urlencoded;charset=UTF-8\n'
        || E'\n' || body;
END
$$;

-- The normalized answer for an event type: payment.* {status, ...} with
-- status error, refund.* the refunds' contract with status unknown.
CREATE FUNCTION callback_center._adapter_error_answer(event_type text, payload jsonb,
    error text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT CASE WHEN _adapter_error_answer.event_type LIKE 'refund.%'
                THEN jsonb_build_object('refund_id', _adapter_error_answer.payload->>'refund_id', 'status', 'unknown',
                                        'provider_refund_id', NULL, 'amount_cents', NULL,
                                        'error', _adapter_error_answer.error)
                ELSE jsonb_build_object('status', 'error', 'error', _adapter_error_answer.error) END
$$;

-- A WeChat Pay APIv3 answer, normalized (its signature already checked).
-- payment.query: trade_state SUCCESS -> paid; NOTPAY, USERPAYING -> unpaid;
-- CLOSED, REVOKED -> closed; PAYERROR -> failed; REFUND -> paid (it was
-- paid); 404 ORDER_NOT_EXIST -> not_found.  payment.close: 204 -> closed.
-- refund.*: status SUCCESS / PROCESSING / ABNORMAL, CLOSED.  Any other
-- answer (a 4xx with code and message) -> error.
CREATE FUNCTION callback_center._wechatpay_v3_answer(event_type text, payload jsonb,
    status integer, body text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    j jsonb;
    st text;
BEGIN
    IF _wechatpay_v3_answer.body <> '' THEN
        j := _wechatpay_v3_answer.body::jsonb;
    END IF;
    IF _wechatpay_v3_answer.status NOT BETWEEN 200 AND 299 THEN
        IF _wechatpay_v3_answer.event_type = 'payment.query' AND j->>'code' = 'ORDER_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', j->>'code');
        END IF;
        RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
            format('HTTP %s %s: %s', _wechatpay_v3_answer.status, j->>'code', j->>'message'));
    END IF;
    IF _wechatpay_v3_answer.event_type = 'payment.query' THEN
        IF j->>'out_trade_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about order "%s"', j->>'out_trade_no'));
        END IF;
        st := CASE j->>'trade_state'
                WHEN 'SUCCESS' THEN 'paid' WHEN 'REFUND' THEN 'paid'
                WHEN 'NOTPAY' THEN 'unpaid' WHEN 'USERPAYING' THEN 'unpaid'
                WHEN 'CLOSED' THEN 'closed' WHEN 'REVOKED' THEN 'closed'
                WHEN 'PAYERROR' THEN 'failed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('unknown trade_state "%s"', j->>'trade_state'));
        END IF;
        RETURN jsonb_build_object('status', st, 'provider_status', j->>'trade_state',
                                  'txn_id', j->>'transaction_id',
                                  'amount_cents', (j->'amount'->>'total')::bigint,
                                  'currency', j->'amount'->>'currency');
    ELSIF _wechatpay_v3_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSE
        IF j->>'out_refund_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'refund_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about refund "%s"', j->>'out_refund_no'));
        END IF;
        RETURN jsonb_build_object(
            'refund_id', _wechatpay_v3_answer.payload->>'refund_id',
            'status', CASE j->>'status' WHEN 'SUCCESS' THEN 'success'
                                        WHEN 'PROCESSING' THEN 'processing'
                                        WHEN 'ABNORMAL' THEN 'failed'
                                        WHEN 'CLOSED' THEN 'failed' ELSE 'unknown' END,
            'provider_refund_id', j->>'refund_id',
            'amount_cents', (j->'amount'->>'refund')::bigint,
            'error', CASE WHEN j->>'status' IN ('SUCCESS', 'PROCESSING') THEN NULL
                          ELSE j->>'status' END);
    END IF;
END
$$;

-- The value of node in an Alipay response, as the exact bytes Alipay
-- signed: the JSON object after "node": up to its matching brace (strings
-- and their escapes skipped), whatever members follow it (sign,
-- alipay_cert_sn); NULL when the body has no such object.
CREATE FUNCTION callback_center._alipay_node_text(body text, node text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    start integer := strpos(_alipay_node_text.body, '"' || _alipay_node_text.node || '":');
    i integer;
    n integer := length(_alipay_node_text.body);
    c text;
    depth integer := 0;
    in_string boolean := false;
BEGIN
    IF start = 0 THEN
        RETURN NULL;
    END IF;
    i := start + length(_alipay_node_text.node) + 3;
    WHILE i <= n AND substr(_alipay_node_text.body, i, 1) IN (' ', E'\t', E'\n', E'\r') LOOP
        i := i + 1;
    END LOOP;
    IF substr(_alipay_node_text.body, i, 1) <> '{' THEN
        RETURN NULL;
    END IF;
    start := i;
    WHILE i <= n LOOP
        c := substr(_alipay_node_text.body, i, 1);
        IF in_string THEN
            IF c = '\' THEN
                i := i + 1;
            ELSIF c = '"' THEN
                in_string := false;
            END IF;
        ELSIF c = '"' THEN
            in_string := true;
        ELSIF c = '{' THEN
            depth := depth + 1;
        ELSIF c = '}' THEN
            depth := depth - 1;
            IF depth = 0 THEN
                RETURN substr(_alipay_node_text.body, start, i - start + 1);
            END IF;
        END IF;
        i := i + 1;
    END LOOP;
    RETURN NULL;
END
$$;

-- An Alipay answer, normalized (its signature already checked).  code
-- 10000 is success; 40004 with sub_code ACQ.TRADE_NOT_EXIST to a query is
-- not_found; any other code an error.  trade_status TRADE_SUCCESS and
-- TRADE_FINISHED -> paid, WAIT_BUYER_PAY -> unpaid, TRADE_CLOSED -> closed.
-- A refund: fund_change Y (or a refund query's refund_status
-- REFUND_SUCCESS) -> success, else processing.
CREATE FUNCTION callback_center._alipay_answer(event_type text, payload jsonb,
    node jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    st text;
BEGIN
    IF _alipay_answer.node->>'code' IS DISTINCT FROM '10000' THEN
        IF _alipay_answer.event_type = 'payment.query' AND _alipay_answer.node->>'sub_code' = 'ACQ.TRADE_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', _alipay_answer.node->>'sub_code');
        END IF;
        RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
            format('%s %s: %s', _alipay_answer.node->>'code', _alipay_answer.node->>'sub_code',
                   coalesce(_alipay_answer.node->>'sub_msg', _alipay_answer.node->>'msg')));
    END IF;
    IF _alipay_answer.event_type = 'payment.query' THEN
        IF _alipay_answer.node->>'out_trade_no' IS DISTINCT FROM _alipay_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('the answer is about order "%s"', _alipay_answer.node->>'out_trade_no'));
        END IF;
        st := CASE _alipay_answer.node->>'trade_status'
                WHEN 'TRADE_SUCCESS' THEN 'paid' WHEN 'TRADE_FINISHED' THEN 'paid'
                WHEN 'WAIT_BUYER_PAY' THEN 'unpaid' WHEN 'TRADE_CLOSED' THEN 'closed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('unknown trade_status "%s"', _alipay_answer.node->>'trade_status'));
        END IF;
        RETURN jsonb_build_object('status', st, 'provider_status', _alipay_answer.node->>'trade_status',
                                  'txn_id', _alipay_answer.node->>'trade_no',
                                  'amount_cents',
                                  round((_alipay_answer.node->>'total_amount')::numeric * 100)::bigint,
                                  'currency', 'CNY');
    ELSIF _alipay_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSIF _alipay_answer.event_type = 'refund.request' THEN
        RETURN jsonb_build_object(
            'refund_id', _alipay_answer.payload->>'refund_id',
            'status', CASE WHEN _alipay_answer.node->>'fund_change' = 'Y' THEN 'success' ELSE 'processing' END,
            'provider_refund_id', _alipay_answer.node->>'trade_no',
            'amount_cents', round((_alipay_answer.node->>'refund_fee')::numeric * 100)::bigint,
            'error', NULL);
    ELSE
        RETURN jsonb_build_object(
            'refund_id', _alipay_answer.payload->>'refund_id',
            'status', CASE WHEN _alipay_answer.node->>'refund_status' = 'REFUND_SUCCESS' THEN 'success'
                           ELSE 'processing' END,
            'provider_refund_id', _alipay_answer.node->>'trade_no',
            'amount_cents', round((_alipay_answer.node->>'refund_amount')::numeric * 100)::bigint,
            'error', NULL);
    END IF;
END
$$;

-- A UnionPay answer, normalized (its signature already checked).  A query:
-- respCode 00 and origRespCode 00 -> paid, origRespCode 03/04/05 ->
-- unpaid (still processing), another origRespCode -> failed; respCode 34
-- (no such transaction) -> not_found.  A refund request: respCode 00 ->
-- processing (the result comes in the notification).  A refund query:
-- origRespCode 00 -> success, 03/04/05 -> processing, else failed.
CREATE FUNCTION callback_center._unionpay_answer(event_type text, payload jsonb,
    f jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    orig text := f->>'origRespCode';
BEGIN
    IF _unionpay_answer.event_type = 'payment.query' THEN
        IF f->>'respCode' = '34' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', '34');
        END IF;
        IF f->>'respCode' IS DISTINCT FROM '00' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('respCode %s: %s', f->>'respCode', f->>'respMsg'));
        END IF;
        IF f->>'orderId' IS DISTINCT FROM _unionpay_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('the answer is about order "%s"', f->>'orderId'));
        END IF;
        RETURN jsonb_build_object(
            'status', CASE WHEN orig = '00' THEN 'paid'
                           WHEN orig IN ('03', '04', '05') THEN 'unpaid' ELSE 'failed' END,
            'provider_status', orig, 'txn_id', f->>'queryId',
            'amount_cents', (f->>'txnAmt')::bigint, 'currency', 'CNY');
    ELSIF _unionpay_answer.event_type = 'refund.request' THEN
        RETURN jsonb_build_object(
            'refund_id', _unionpay_answer.payload->>'refund_id',
            'status', CASE WHEN f->>'respCode' = '00' THEN 'processing' ELSE 'failed' END,
            'provider_refund_id', f->>'queryId',
            'amount_cents', (f->>'txnAmt')::bigint,
            'error', CASE WHEN f->>'respCode' = '00' THEN NULL
                          ELSE format('respCode %s: %s', f->>'respCode', f->>'respMsg') END);
    ELSE
        IF f->>'respCode' IS DISTINCT FROM '00' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('respCode %s: %s', f->>'respCode', f->>'respMsg'));
        END IF;
        RETURN jsonb_build_object(
            'refund_id', _unionpay_answer.payload->>'refund_id',
            'status', CASE WHEN orig = '00' THEN 'success'
                           WHEN orig IN ('03', '04', '05') THEN 'processing' ELSE 'failed' END,
            'provider_refund_id', f->>'queryId',
            'amount_cents', (f->>'txnAmt')::bigint,
            'error', CASE WHEN orig IN ('00', '03', '04', '05') THEN NULL
                          ELSE format('origRespCode %s: %s', orig, f->>'origRespMsg') END);
    END IF;
END
$$;

-- A UnionPay back-channel answer (a form, acp 5.1.0, signMethod 01)
-- verified as _unionpay_parse verifies notifications: signPubKeyCert
-- chained to the loaded roots and naming the organisation, then the
-- signature over the hex SHA-256 of the sorted fields.  Unlike a
-- notification an answer need not carry a queryId (respCode 34, no such
-- transaction, names none).  failure is NULL when it verifies, with
-- fields every field decoded; else why not.
CREATE FUNCTION callback_center._unionpay_answer_fields(provider text, secrets text[],
    body text, OUT failure text, OUT fields jsonb)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    cert bytea;
    cert_pem text;
    sig bytea;
    cas text[];
    chk record;
    content bytea;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_unionpay_answer_fields.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body';
        RETURN;
    END IF;
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature';
        RETURN;
    END IF;
    sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    SELECT array_agg(pk.pem) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = _unionpay_answer_fields.provider;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, coalesce(cas, '{}'), _unionpay_answer_fields.secrets);
    IF chk.verdict <> 'ok' THEN
        failure := 'untrusted_key: ' || chk.verdict;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature';
        RETURN;
    END IF;
    SELECT jsonb_object_agg(x.nm, convert_from(x.v, 'UTF8')) INTO fields
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('signature', 'signPubKeyCert');
END
$$;

-- Checks one response of a provider-format endpoint, as the delivery
-- worker judges it (src/delivery.c): ok when the provider's signature
-- verifies (wechatpay_v3: the Wechatpay-* headers, within the provider's
-- timestamp tolerance, and the platform key; alipay: the *_response
-- node's exact bytes and the Alipay public key, or in certificate mode the
-- certificate alipay_cert_sn names, chained to a loaded root; unionpay: as its
-- notifications, signPubKeyCert chained to the loaded root), with answer
-- the normalized answer; else ok false and error why (the attempt failed:
-- retried on the schedule, never applied).  headers are the captured
-- "Name: value" lines.  Never raises.
CREATE FUNCTION callback_center._adapter_check(outbox_id bigint, http_status integer,
    headers text, body text, OUT ok boolean, OUT answer jsonb, OUT error text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ob record;
    pr callback_center.providers;
    h jsonb := '{}';
    line text;
    ts text;
    nonce text;
    sig text;
    serial text;
    key_pem text;
    why text;
    node text;
    parsed jsonb;
    s text;
    up record;
    f jsonb;
    cas text[];
BEGIN
    ok := false;
    SELECT o.event_type, o.payload, e.format INTO ob
      FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
     WHERE o.id = _adapter_check.outbox_id;
    IF NOT FOUND THEN
        error := 'the event or its endpoint is gone';
        RETURN;
    END IF;
    SELECT * INTO pr FROM callback_center.providers p WHERE p.name = ob.payload->>'provider';
    IF NOT FOUND THEN
        error := format('provider "%s" is gone', ob.payload->>'provider');
        RETURN;
    END IF;
    BEGIN
        IF ob.format = 'wechatpay_v3' THEN
            FOREACH line IN ARRAY string_to_array(coalesce(_adapter_check.headers, ''), E'\n') LOOP
                CONTINUE WHEN strpos(line, ':') = 0;
                h := h || jsonb_build_object(lower(split_part(line, ':', 1)),
                                             btrim(substr(line, strpos(line, ':') + 1)));
            END LOOP;
            ts := h->>'wechatpay-timestamp';
            nonce := h->>'wechatpay-nonce';
            sig := h->>'wechatpay-signature';
            serial := h->>'wechatpay-serial';
            IF ts IS NULL OR nonce IS NULL OR sig IS NULL OR serial IS NULL THEN
                error := 'the response carries no Wechatpay-Signature, -Timestamp, -Nonce and -Serial';
                RETURN;
            END IF;
            IF ts !~ '^[0-9]{1,12}$' OR abs(extract(epoch FROM now()) - ts::bigint)
               > extract(epoch FROM callback_center._channel_tolerance(pr.tolerance)) THEN
                error := 'the response''s Wechatpay-Timestamp is outside the tolerance';
                RETURN;
            END IF;
            SELECT pk.pem INTO key_pem FROM callback_center.provider_keys pk
             WHERE pk.provider = pr.name AND pk.key_id = serial;
            IF NOT FOUND THEN
                error := format('the response is signed by unknown platform key "%s"', left(serial, 128));
                RETURN;
            END IF;
            why := callback_center._rsa_sha256_check(key_pem,
                convert_to(ts || E'\n' || nonce || E'\n' || coalesce(_adapter_check.body, '') || E'\n', 'UTF8'),
                decode(sig, 'base64'));
            IF why IS NOT NULL THEN
                error := 'the response signature does not verify: ' || why;
                RETURN;
            END IF;
            answer := callback_center._wechatpay_v3_answer(ob.event_type, ob.payload,
                                                           _adapter_check.http_status, coalesce(_adapter_check.body, ''));
        ELSIF ob.format = 'alipay' THEN
            node := CASE ob.event_type
                WHEN 'payment.query' THEN 'alipay_trade_query_response'
                WHEN 'payment.close' THEN 'alipay_trade_close_response'
                WHEN 'refund.request' THEN 'alipay_trade_refund_response'
                WHEN 'refund.query' THEN 'alipay_trade_fastpay_refund_query_response' END;
            parsed := _adapter_check.body::jsonb;
            s := callback_center._alipay_node_text(_adapter_check.body, node);
            IF s IS NULL OR parsed->>'sign' IS NULL THEN
                error := format('the response has no signed %s', node);
                RETURN;
            END IF;
            why := 'signature does not match';
            -- Public-key mode: the Alipay public keys of secrets.
            FOREACH key_pem IN ARRAY coalesce(pr.secrets, '{}') LOOP
                why := callback_center._rsa_sha256_check(key_pem, convert_to(s, 'UTF8'),
                                                         decode(parsed->>'sign', 'base64'));
                EXIT WHEN why IS NULL;
            END LOOP;
            -- Certificate mode, as for notifications: the Alipay public-key
            -- certificate the answer's alipay_cert_sn names (else each),
            -- chained to a loaded root now; roots sign nothing.
            IF why IS NOT NULL THEN
                SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
                  FROM callback_center.provider_keys pk WHERE pk.provider = pr.name;
                FOR key_pem IN SELECT pk.pem FROM callback_center.provider_keys pk
                                WHERE pk.provider = pr.name
                                  AND (parsed->>'alipay_cert_sn' IS NULL
                                       OR pk.key_id = parsed->>'alipay_cert_sn')
                                ORDER BY pk.key_id LOOP
                    CONTINUE WHEN (callback_center._x509_chain_check(key_pem, ARRAY[key_pem], NULL)).verdict = 'ok';
                    CONTINUE WHEN (callback_center._x509_chain_check(key_pem, cas, NULL)).verdict <> 'ok';
                    why := callback_center._rsa_sha256_check(key_pem, convert_to(s, 'UTF8'),
                                                             decode(parsed->>'sign', 'base64'));
                    EXIT WHEN why IS NULL;
                END LOOP;
            END IF;
            IF why IS NOT NULL THEN
                error := 'the response signature does not verify: ' || why;
                RETURN;
            END IF;
            answer := callback_center._alipay_answer(ob.event_type, ob.payload, s::jsonb);
        ELSIF ob.format = 'unionpay' THEN
            up := callback_center._unionpay_answer_fields(pr.name, pr.secrets, coalesce(_adapter_check.body, ''));
            IF up.failure IS NOT NULL THEN
                error := 'the response does not verify: ' || up.failure;
                RETURN;
            END IF;
            answer := callback_center._unionpay_answer(ob.event_type, ob.payload, up.fields);
        ELSE
            error := format('endpoint format %s has no adapter', ob.format);
            RETURN;
        END IF;
        ok := true;
    EXCEPTION WHEN OTHERS THEN
        ok := false;
        answer := NULL;
        error := format('the response cannot be read: %s', SQLERRM);
    END;
END
$$;

-- Keeps, with the attempts the delivery worker records (same
-- transaction), the normalized answers of provider-format events that are
-- done: delivered (answers[i], checked by _adapter_check) or dead
-- (errors[i]: an error answer in the event's shape).  A replayed event's
-- new answer replaces the old one, to be applied again.
CREATE FUNCTION callback_center._adapter_record(ids bigint[], attempts integer[],
    statuses integer[], answers jsonb[], errors text[])
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
    INSERT INTO callback_center.provider_answers AS a
           (outbox_id, endpoint_id, provider, event_type, aggregate_id, attempt, http_status,
            answer)
    SELECT o.id, o.endpoint_id, o.payload->>'provider', o.event_type, o.aggregate_id, r.attempt,
           r.http_status,
           coalesce(r.answer, callback_center._adapter_error_answer(o.event_type, o.payload,
                                                                    coalesce(r.error, 'no answer')))
      FROM ROWS FROM (unnest(ids), unnest(attempts), unnest(statuses), unnest(answers),
                      unnest(errors)) AS r(id, attempt, http_status, answer, error)
      JOIN callback_center.outbox o ON o.id = r.id
    ON CONFLICT (outbox_id) DO UPDATE
       SET attempt = excluded.attempt, http_status = excluded.http_status,
           answer = excluded.answer, recorded_at = now(), applied_at = NULL, outcome = NULL
$$;

REVOKE ALL ON FUNCTION
    callback_center._merchant_key_bits(text),
    callback_center._merchant_sign(text, bytea),
    callback_center._adapter_nonce(),
    callback_center.set_merchant(text, text, text, text, jsonb),
    callback_center.set_endpoint_format(text, text),
    callback_center._url_encode(text),
    callback_center._yuan(bigint),
    callback_center._adapter_request(integer, text, text, jsonb),
    callback_center._adapter_unsupported(text, text),
    callback_center._wechatpay_v3_request(text, callback_center.merchant_settings, text, jsonb),
    callback_center._alipay_request(text, callback_center.merchant_settings, text, jsonb),
    callback_center._unionpay_request(text, callback_center.merchant_settings, text, jsonb),
    callback_center._adapter_error_answer(text, jsonb, text),
    callback_center._wechatpay_v3_answer(text, jsonb, integer, text),
    callback_center._alipay_node_text(text, text),
    callback_center._alipay_answer(text, jsonb, jsonb),
    callback_center._unionpay_answer(text, jsonb, jsonb),
    callback_center._unionpay_answer_fields(text, text[], text),
    callback_center._adapter_check(bigint, integer, text, text),
    callback_center._adapter_record(bigint[], integer[], integer[], jsonb[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    callback_center.set_merchant(text, text, text, text, jsonb),
    callback_center.set_endpoint_format(text, text)
    TO callback_center_admin;
-- The delivery worker (src/queue.c) builds requests, checks and keeps
-- answers through these; they run as their owner (the worker role reads
-- no merchant key, no provider key and writes no answer of its own).
GRANT EXECUTE ON FUNCTION
    callback_center._adapter_request(integer, text, text, jsonb),
    callback_center._adapter_check(bigint, integer, text, text),
    callback_center._adapter_record(bigint[], integer[], integer[], jsonb[], text[])
    TO callback_center_worker;

-- callback_center.close_query_max_wait: how long after its deadline an
-- order whose provider is asked first may wait for an answer.
CREATE FUNCTION callback_center._close_query_max_wait()
RETURNS interval
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT coalesce(nullif(current_setting('callback_center.close_query_max_wait', true), '')::interval,
                    interval '10 minutes')
$$;

-- The payments whose provider is asked before their order is closed:
-- PAYING with a provider whose (enabled) query endpoint speaks the
-- provider's API, with the endpoint to ask.
CREATE VIEW callback_center._asked_before_close AS
    SELECT p.payment_id, p.order_id, p.provider, p.amount_cents, e.id AS endpoint_id,
           e.name AS endpoint, e.format
      FROM callback_center.payments p
      JOIN callback_center.providers pr ON pr.name = p.provider
      JOIN callback_center.endpoints e ON e.name = pr.query_endpoint
     WHERE p.status = 'PAYING' AND e.enabled AND e.format <> 'standard_webhooks';

-- The orders due for the timeout close: confirmed, still waiting for money,
-- past their deadline, not backing off after a failure, and not to be
-- asked first: an order whose payment is PAYING with a provider whose
-- query endpoint speaks the provider's API is closed only after its
-- provider says unpaid (_apply_query_result), or once
-- callback_center.close_query_max_wait has passed since its deadline.
-- Read through the partial index orders_pay_deadline.  The one definition
-- that both close_expired_orders and the worker's one-by-one fallback
-- read, so they agree on what is due.
CREATE OR REPLACE VIEW callback_center._orders_due AS
    SELECT o.order_id, o.pay_deadline
      FROM callback_center.orders o
     WHERE o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')
       AND o.pay_deadline <= pg_catalog.now()
       AND NOT EXISTS (SELECT 1 FROM callback_center.close_failures f
                        WHERE f.order_id = o.order_id AND f.retry_at > pg_catalog.now())
       AND (o.pay_deadline <= pg_catalog.now() - callback_center._close_query_max_wait()
            OR NOT EXISTS (SELECT 1 FROM callback_center._asked_before_close a
                            WHERE a.order_id = o.order_id));

-- Names the endpoint that answers a provider's status queries (admin);
-- NULL stops querying it.  The answers of a standard_webhooks endpoint are
-- applied to payments and carry no signature the extension verifies, so
-- only TLS vouches for them: such an endpoint whose URL is not https is
-- refused (22023) unless allow_plain_http, recorded in
-- providers.query_allow_plain_http.  An endpoint of a provider format
-- (set_endpoint_format) is the provider's API: its answers are verified
-- with the provider's key, over any scheme.
-- CB033 unknown provider, CB040 unknown endpoint.
CREATE OR REPLACE FUNCTION callback_center.set_provider_query_endpoint(provider text, endpoint text,
    allow_plain_http boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    url text;
    fmt text;
BEGIN
    PERFORM callback_center._require(set_provider_query_endpoint.provider, 'provider');
    PERFORM callback_center._require(set_provider_query_endpoint.allow_plain_http,
                                     'allow_plain_http');
    IF NOT EXISTS (SELECT 1 FROM callback_center.providers p
                    WHERE p.name = set_provider_query_endpoint.provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_provider_query_endpoint.provider);
    END IF;
    IF set_provider_query_endpoint.endpoint IS NOT NULL THEN
        SELECT e.url, e.format INTO url, fmt FROM callback_center.endpoints e
         WHERE e.id = callback_center._endpoint_id(set_provider_query_endpoint.endpoint, false);
        -- A provider-format endpoint's answers carry the provider's
        -- signature (46_adapters.sql): they are verified, whatever the scheme.
        IF fmt = 'standard_webhooks' AND NOT callback_center._url_is_https(url)
           AND NOT set_provider_query_endpoint.allow_plain_http THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = format('query endpoint "%s" does not use https',
                                 set_provider_query_endpoint.endpoint),
                DETAIL = 'Answers to status queries are applied to payments; over plain http anyone on the path can forge them.',
                HINT = 'Give the endpoint an https:// URL, or pass allow_plain_http => true to accept its answers over plain http.';
        END IF;
    END IF;
    UPDATE callback_center.providers p
       SET query_endpoint = set_provider_query_endpoint.endpoint,
           query_allow_plain_http = set_provider_query_endpoint.endpoint IS NOT NULL
                                    AND set_provider_query_endpoint.allow_plain_http
     WHERE p.name = set_provider_query_endpoint.provider;
END
$$;

-- Finishes up to max_queries queries whose event has been delivered (the
-- answer is the 2xx response body the worker kept), has died, or is gone;
-- not those a provider-format endpoint answered (apply_provider_answers).
-- Each is applied in its own subtransaction: one that raises is recorded
-- as failed with the error, and the payment is queried again later.
-- Queries locked by others are skipped.  Returns how many were finished.
CREATE OR REPLACE FUNCTION callback_center.apply_query_answers(max_queries integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r record;
    body text;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_queries, 'max_queries');
    IF max_queries < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('max_queries must be positive, got %s', max_queries);
    END IF;
    FOR r IN
        SELECT q.id, q.outbox_id, ob.status AS event_status, ob.last_error
          FROM callback_center.payment_queries q
          LEFT JOIN callback_center.outbox ob ON ob.id = q.outbox_id
         WHERE q.status = 'sent'
           AND (ob.id IS NULL OR ob.status IN ('delivered', 'dead'))
           -- a provider's own answer: apply_provider_answers applies it
           AND NOT EXISTS (SELECT 1 FROM callback_center.provider_answers pa
                            WHERE pa.outbox_id = q.outbox_id)
         ORDER BY q.id
         LIMIT max_queries
           FOR UPDATE OF q SKIP LOCKED
    LOOP
        n := n + 1;
        IF r.event_status IS DISTINCT FROM 'delivered' THEN
            UPDATE callback_center.payment_queries x
               SET status = 'failed', finished_at = now(),
                   error = CASE WHEN r.event_status IS NULL THEN 'the query event is gone'
                                ELSE format('the query was not delivered: %s', r.last_error) END
             WHERE x.id = r.id;
            CONTINUE;
        END IF;
        SELECT a.response_body INTO body FROM callback_center.delivery_attempts a
         WHERE a.outbox_id = r.outbox_id AND a.http_status BETWEEN 200 AND 299
         ORDER BY a.id DESC LIMIT 1;
        BEGIN
            PERFORM callback_center._apply_query_answer(r.id, body);
        EXCEPTION WHEN OTHERS THEN
            UPDATE callback_center.payment_queries x
               SET status = 'failed', answer = body, outcome = 'error',
                   error = format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE), finished_at = now()
             WHERE x.id = r.id;
        END;
    END LOOP;
    RETURN n;
END
$$;

-- Sends a status query (payment.query to the provider's query endpoint) for
-- up to max_orders orders past their pay deadline whose payment is PAYING
-- with a provider that is asked before closing (_asked_before_close), and
-- not yet past callback_center.close_query_max_wait: none in flight, and
-- after a failed one a backoff of 1 s doubling per query since the
-- deadline, at most 5 minutes.  Payments locked by others are skipped.
-- Returns how many queries were sent.
CREATE FUNCTION callback_center.query_expired_orders(max_orders integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r record;
    ob_id bigint;
    body jsonb;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_orders, 'max_orders');
    IF max_orders < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('max_orders must be positive, got %s', max_orders);
    END IF;
    FOR r IN
        SELECT a.payment_id, a.order_id, a.provider, a.amount_cents, a.endpoint_id
          FROM callback_center.orders o
          JOIN callback_center._asked_before_close a ON a.order_id = o.order_id
          JOIN callback_center.payments p ON p.payment_id = a.payment_id
         WHERE o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')
           AND o.pay_deadline <= now()
           AND o.pay_deadline > now() - callback_center._close_query_max_wait()
           AND NOT EXISTS (SELECT 1 FROM callback_center.payment_queries q
                            WHERE q.payment_id = a.payment_id AND q.status = 'sent')
           AND coalesce((SELECT max(q.finished_at)
                                + least(interval '1 second' * power(2, least(count(*) - 1, 20)),
                                        interval '5 minutes')
                           FROM callback_center.payment_queries q
                          WHERE q.payment_id = a.payment_id AND q.queried_at >= o.pay_deadline),
                        '-infinity') <= now()
         ORDER BY o.pay_deadline
         LIMIT max_orders
           FOR UPDATE OF p SKIP LOCKED
    LOOP
        -- To the query endpoint only, whatever else subscribes.
        body := jsonb_build_object('payment_id', r.payment_id, 'order_id', r.order_id,
                                   'provider', r.provider, 'amount_cents', r.amount_cents);
        ob_id := callback_center._enqueue_one(r.endpoint_id, 'payment.query', r.order_id, body);
        -- Disabled since the scan: no query for this order this time.
        CONTINUE WHEN ob_id IS NULL;
        INSERT INTO callback_center.payment_queries
               (payment_id, order_id, provider, endpoint_id, outbox_id)
        VALUES (r.payment_id, r.order_id, r.provider, r.endpoint_id, ob_id);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Applies a provider's normalized answer (46_adapters.sql) to the query's
-- payment, once: paid -> _apply_payment_result success (as a callback
-- would), failed -> its failure; unpaid, closed, not_found -> when the
-- order is past its deadline and still waiting, closed here
-- (_close_locked_orders: payment CLOSED, stock and coupon back), and for
-- unpaid a payment.close to the provider queued in the same transaction
-- (not to unionpay, which has no close); before the deadline nothing
-- moves.  The order, then the payment, are locked (waiting, in
-- _apply_payment_result's order) and read again, so a success callback
-- and this close never both win: a callback after the close takes the
-- late-payment path, one before it leaves the order paid and this answer
-- stale.  error -> the query failed (retried with backoff).  Returns the
-- outcome.  42704 when the query does not exist.
CREATE FUNCTION callback_center._apply_query_result(query_id bigint, answer jsonb)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    q callback_center.payment_queries;
    o callback_center.orders;
    st text := answer->>'status';
    result text;
    ep record;
BEGIN
    SELECT * INTO q FROM callback_center.payment_queries x WHERE x.id = query_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('payment query %s does not exist', query_id);
    END IF;
    IF q.status <> 'sent' THEN
        RETURN q.outcome;
    END IF;
    IF st IS NULL OR st NOT IN ('paid', 'failed', 'unpaid', 'closed', 'not_found') THEN
        UPDATE callback_center.payment_queries x
           SET status = 'failed', answer = _apply_query_result.answer::text, outcome = 'error',
               error = coalesce(_apply_query_result.answer->>'error', 'no usable answer'),
               finished_at = now()
         WHERE x.id = q.id;
        RETURN 'error';
    END IF;
    IF st IN ('paid', 'failed') THEN
        result := callback_center._apply_payment_result(q.provider, answer->>'txn_id', q.order_id,
            (answer->>'amount_cents')::bigint, answer->>'currency',
            CASE st WHEN 'paid' THEN 'success' ELSE 'failure' END, 'query');
    ELSE
        SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = q.order_id FOR UPDATE;
        PERFORM 1 FROM callback_center.payments p WHERE p.order_id = q.order_id FOR UPDATE;
        IF NOT (o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')) THEN
            result := 'not_waiting';
        ELSIF o.pay_deadline > now() THEN
            result := 'unpaid';
        ELSIF callback_center._close_locked_orders(ARRAY[o.order_id]) = 1 THEN
            result := 'closed';
            SELECT e.name, e.format INTO ep
              FROM callback_center.providers pr
              JOIN callback_center.endpoints e ON e.name = pr.query_endpoint
             WHERE pr.name = q.provider;
            IF st = 'unpaid' AND ep.format IN ('wechatpay_v3', 'alipay') THEN
                PERFORM callback_center.enqueue_to(ep.name, 'payment.close', o.order_id,
                    jsonb_build_object('order_id', o.order_id, 'provider', q.provider));
            END IF;
        ELSE
            result := 'busy';
        END IF;
    END IF;
    UPDATE callback_center.payment_queries x
       SET status = 'answered', answer = _apply_query_result.answer::text, outcome = result,
           finished_at = now()
     WHERE x.id = q.id;
    RETURN result;
END
$$;

-- Applies up to max_answers providers' answers not yet applied
-- (provider_answers, kept by the delivery worker), each once and in its
-- own subtransaction: payment.query through _apply_query_result;
-- payment.close recorded (a provider refusing to close a paid order is
-- followed by its payment notification: the late-payment path);
-- refund.request and refund.query handed to _apply_refund_answer(refund_id,
-- answer) when it is installed (until then they wait).  An answer whose
-- application raises is recorded with the error as its outcome.  Returns
-- how many were applied.
CREATE FUNCTION callback_center.apply_provider_answers(max_answers integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r record;
    qid bigint;
    result text;
    refunds boolean := to_regprocedure('callback_center._apply_refund_answer(text,jsonb)') IS NOT NULL;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_answers, 'max_answers');
    IF max_answers < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('max_answers must be positive, got %s', max_answers);
    END IF;
    FOR r IN
        SELECT a.outbox_id, a.event_type, a.answer
          FROM callback_center.provider_answers a
         WHERE a.applied_at IS NULL
           AND (refunds OR a.event_type NOT IN ('refund.request', 'refund.query'))
         ORDER BY a.outbox_id
         LIMIT max_answers
           FOR UPDATE SKIP LOCKED
    LOOP
        n := n + 1;
        BEGIN
            IF r.event_type = 'payment.query' THEN
                SELECT q.id INTO qid FROM callback_center.payment_queries q
                 WHERE q.outbox_id = r.outbox_id;
                result := CASE WHEN qid IS NULL THEN 'no_query'
                               ELSE callback_center._apply_query_result(qid, r.answer) END;
            ELSIF r.event_type IN ('refund.request', 'refund.query') THEN
                EXECUTE 'SELECT callback_center._apply_refund_answer($1, $2)'
                   INTO result USING r.answer->>'refund_id', r.answer;
            ELSE
                result := coalesce(r.answer->>'status', 'error');
            END IF;
        EXCEPTION WHEN OTHERS THEN
            result := format('error: %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
            IF r.event_type = 'payment.query' AND qid IS NOT NULL THEN
                UPDATE callback_center.payment_queries x
                   SET status = 'failed', answer = r.answer::text, outcome = 'error',
                       error = result, finished_at = now()
                 WHERE x.id = qid AND x.status = 'sent';
            END IF;
        END;
        UPDATE callback_center.provider_answers a
           SET applied_at = now(), outcome = result
         WHERE a.outbox_id = r.outbox_id;
    END LOOP;
    RETURN n;
END
$$;

REVOKE ALL ON callback_center._asked_before_close FROM PUBLIC;
REVOKE ALL ON FUNCTION
    callback_center._close_query_max_wait(),
    callback_center.query_expired_orders(integer),
    callback_center._apply_query_result(bigint, jsonb),
    callback_center.apply_provider_answers(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    callback_center.query_expired_orders(integer),
    callback_center.apply_provider_answers(integer)
    TO callback_center_admin;
GRANT EXECUTE ON FUNCTION
    callback_center.query_expired_orders(integer),
    callback_center.apply_provider_answers(integer),
    callback_center._close_query_max_wait()
    TO callback_center_worker;

-- Refunds end to end (issue 14 section 3): the refunds table and machine (62_refunds.sql:
-- request_refund, _apply_refund_answer, record_refund_outcome,
-- refund_jobs, PARTIALLY_REFUNDED / partially_refunded, order fulfilled,
-- coupon used -> available), refund notifications in the channel parsers
-- and payment_callback, mark_refunded through the refund path, refunds in
-- reconciliation (provider_statement.refund_id, recon_diffs.refund_id).
-- restore_stock (same C symbol) also gives stock back to an order in
-- status refunded; no schema is needed for it.  The adapters' refund
-- answers: WeChat Pay ABNORMAL is processing, Alipay's refund answers name
-- no amount (a request's refund_fee is the trade's total) and no refund id.

ALTER TABLE callback_center.provider_statement ADD COLUMN refund_id text;
ALTER TABLE callback_center.recon_diffs ADD COLUMN refund_id text;

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
CREATE FUNCTION callback_center.request_refund(
    p_order_id text,
    p_amount_cents bigint,
    p_reason text,
    p_refund_id text)
RETURNS TABLE (refund_id text, status text, mode text, amount_cents bigint, is_new boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    r callback_center.refunds;
    o callback_center.orders;
    pay callback_center.payments;
    taken bigint;
BEGIN
    PERFORM callback_center._require_key(p_order_id, 'order_id');
    PERFORM callback_center._require(p_amount_cents, 'amount_cents');
    PERFORM callback_center._require_key(p_refund_id, 'refund_id', 64);
    IF p_reason IS NOT NULL THEN
        PERFORM callback_center._require_key(p_reason, 'reason');
    END IF;
    IF p_refund_id !~ '^[A-Za-z0-9_|*@-]+$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid refund_id "%s"', p_refund_id),
            DETAIL = 'A refund id is 1 to 64 letters, digits and _-|*@ (what providers take as out_refund_no).';
    END IF;
    IF p_amount_cents <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('amount_cents must be positive, got %s', p_amount_cents);
    END IF;

    -- Serialise calls for one refund id, then look: a repeat (or a call
    -- that waited for a concurrent first one) finds the refund.
    PERFORM pg_advisory_xact_lock(hashtextextended('callback_center.refund:' || p_refund_id, 0));
    SELECT * INTO r FROM callback_center.refunds x WHERE x.refund_id = p_refund_id;
    IF FOUND THEN
        IF r.order_id = p_order_id AND r.amount_cents = p_amount_cents
           AND r.reason IS NOT DISTINCT FROM p_reason AND r.late_payment_id IS NULL THEN
            RETURN QUERY SELECT r.refund_id, r.status, r.mode, r.amount_cents, false;
            RETURN;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'CB062',
            MESSAGE = format('refund "%s" already exists with other arguments', p_refund_id),
            DETAIL = format('It refunds %s cents of order "%s"%s.', r.amount_cents, r.order_id,
                            CASE WHEN r.late_payment_id IS NOT NULL
                                 THEN format(' (late payment %s)', r.late_payment_id)
                                 ELSE coalesce(format(', reason "%s"', r.reason), ', no reason') END),
            HINT = 'A refund id names one refund; use a new id for another refund.';
    END IF;

    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB050',
            MESSAGE = format('order "%s" does not exist', p_order_id);
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
            MESSAGE = format('order "%s" has no paid payment to refund', p_order_id),
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
    IF taken + p_amount_cents > pay.amount_cents THEN
        RAISE EXCEPTION USING ERRCODE = 'CB061',
            MESSAGE = format('refund of %s cents exceeds what is left to refund of order "%s"',
                             p_amount_cents, p_order_id),
            DETAIL = format('Paid %s cents; %s refunded or being refunded; %s left.',
                            pay.amount_cents, taken, pay.amount_cents - taken),
            HINT = 'Refunds of a payment, failed ones aside, sum to at most what was paid.';
    END IF;

    r := NULL;
    r.refund_id := p_refund_id;
    r.order_id := o.order_id;
    r.payment_id := pay.payment_id;
    r.provider := pay.provider;
    r.provider_txn_id := pay.provider_txn_id;
    r.amount_cents := p_amount_cents;
    r.total_cents := pay.amount_cents;
    r.currency := o.currency;
    r.reason := p_reason;
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
CREATE FUNCTION callback_center._refund_check_answer(p_refund_id text, answer jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF jsonb_typeof(answer) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a refund answer must be a JSON object';
    END IF;
    IF answer ? 'refund_id' AND answer->>'refund_id' IS DISTINCT FROM p_refund_id THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('the answer is about refund "%s", not "%s"',
                             answer->>'refund_id', p_refund_id);
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
    p_refund_id text := _apply_refund_answer.refund_id;
    r callback_center.refunds;
    o callback_center.orders;
    pay callback_center.payments;
    verdict text;
    prid text;
    amount bigint;
    refunded bigint;
BEGIN
    PERFORM callback_center._require(p_refund_id, 'refund_id');
    PERFORM callback_center._require(answer, 'answer');
    PERFORM callback_center._refund_check_answer(p_refund_id, answer);
    verdict := answer->>'status';
    prid := nullif(answer->>'provider_refund_id', '');
    amount := (answer->>'amount_cents')::bigint;

    SELECT x.order_id INTO o.order_id FROM callback_center.refunds x WHERE x.refund_id = p_refund_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('refund "%s" does not exist', p_refund_id);
    END IF;
    -- The lock order of every payment path: order, payment, refund.
    SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = o.order_id FOR UPDATE;
    SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = o.order_id FOR UPDATE;
    SELECT * INTO r FROM callback_center.refunds x WHERE x.refund_id = p_refund_id FOR UPDATE;

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
    p_provider text, p_refund_id text, p_provider_refund_id text,
    p_amount_cents bigint, p_verdict text, p_event_type text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    owner text;
BEGIN
    SELECT x.provider INTO owner FROM callback_center.refunds x WHERE x.refund_id = p_refund_id;
    IF NOT FOUND THEN
        RETURN 'unknown_refund';
    END IF;
    IF owner IS DISTINCT FROM p_provider THEN
        RETURN 'provider_mismatch';
    END IF;
    RETURN callback_center._apply_refund_answer(p_refund_id,
        jsonb_build_object('refund_id', p_refund_id,
                           'status', CASE p_verdict WHEN 'refund_success' THEN 'success'
                                                    WHEN 'refund_failed' THEN 'failed'
                                                    ELSE 'processing' END,
                           'provider_refund_id', p_provider_refund_id,
                           'amount_cents', p_amount_cents,
                           'error', CASE WHEN p_verdict <> 'refund_success'
                                         THEN format('notification %s', p_event_type) END));
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
-- brought the money; p_mode NULL: api or manual by the provider's
-- endpoint, 'manual': settled by the caller at once, nothing sent), under
-- the order's, the payment's and the late payment's locks.  Returns its
-- refund id; NULL when the late payment's amount is unknown (nothing to
-- ask for).
CREATE FUNCTION callback_center._late_refund(lp_id bigint, p_mode text DEFAULT NULL)
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
    r.mode := p_mode;
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

CREATE OR REPLACE FUNCTION callback_center._wechatpay_v3_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ts text := callback_center._channel_header(p_headers, 'Wechatpay-Timestamp');
    nonce text := callback_center._channel_header(p_headers, 'Wechatpay-Nonce');
    sig_b64 text := callback_center._channel_header(p_headers, 'Wechatpay-Signature');
    serial text := callback_center._channel_header(p_headers, 'Wechatpay-Serial');
    sig_type text := callback_center._channel_header(p_headers, 'Wechatpay-Signature-Type');
    sig bytea;
    key_pem text;
    why text;
    ev jsonb;
    res jsonb;
    plain bytea;
    tx jsonb;
    s text;
    total text;
BEGIN
    payload := p_body;
    IF nullif(ts, '') IS NULL OR nullif(nonce, '') IS NULL
       OR nullif(sig_b64, '') IS NULL OR nullif(serial, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF sig_type IS NOT NULL AND sig_type <> 'WECHATPAY2-SHA256-RSA2048' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF ts !~ '^[0-9]{1,12}$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF abs(extract(epoch FROM now()) - ts::bigint)
       > extract(epoch FROM callback_center._channel_tolerance(p_tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(sig_b64, 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    IF NOT EXISTS (SELECT 1 FROM callback_center.provider_keys pk WHERE pk.provider = p_provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no platform keys', p_provider),
            HINT = 'An administrator loads them with callback_center.set_platform_keys().';
    END IF;
    SELECT pk.pem INTO key_pem FROM callback_center.provider_keys pk
     WHERE pk.provider = p_provider AND pk.key_id = serial;
    IF NOT FOUND THEN
        failure := 'unknown_key'; fail_status := 401;
        RETURN;
    END IF;
    why := callback_center._rsa_sha256_check(key_pem,
        convert_to(ts || E'\n' || nonce || E'\n' || p_body || E'\n', 'UTF8'), sig);
    IF why IS NOT NULL THEN
        failure := CASE WHEN why LIKE '%expired%' OR why LIKE '%not valid yet%'
                        THEN 'key_expired' ELSE 'invalid_signature' END;
        fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    BEGIN
        ev := p_body::jsonb;
    EXCEPTION WHEN OTHERS THEN
        ev := NULL;
    END;
    res := ev->'resource';
    msg_id := ev->>'id';
    event_type := ev->>'event_type';
    IF jsonb_typeof(ev) IS DISTINCT FROM 'object' OR nullif(msg_id, '') IS NULL
       OR jsonb_typeof(res) IS DISTINCT FROM 'object'
       OR res->>'algorithm' IS DISTINCT FROM 'AEAD_AES_256_GCM'
       OR res->>'ciphertext' IS NULL OR res->>'nonce' IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    FOREACH s IN ARRAY p_secrets LOOP
        BEGIN
            plain := callback_center._aes256gcm_decrypt(convert_to(s, 'UTF8'),
                convert_to(res->>'nonce', 'UTF8'),
                convert_to(coalesce(res->>'associated_data', ''), 'UTF8'),
                decode(res->>'ciphertext', 'base64'));
        EXCEPTION WHEN invalid_parameter_value THEN
            plain := NULL;
        END;
        EXIT WHEN plain IS NOT NULL;
    END LOOP;
    IF plain IS NULL THEN
        failure := 'decryption_failed'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        tx := convert_from(plain, 'UTF8')::jsonb;
    EXCEPTION WHEN OTHERS THEN
        tx := NULL;
    END;
    IF jsonb_typeof(tx) IS DISTINCT FROM 'object' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    -- Refunds (original_type refund, REFUND.SUCCESS / ABNORMAL / CLOSED):
    -- order_id is our refund id (out_refund_no), txn_id WeChat Pay's
    -- refund_id, amount_cents amount.refund; ABNORMAL (the money could
    -- not reach the buyer; the merchant settles it in the merchant
    -- platform) keeps the refund open.
    IF res->>'original_type' = 'refund' AND coalesce(event_type, '') LIKE 'REFUND.%' THEN
        order_id := tx->>'out_refund_no';
        txn_id := tx->>'refund_id';
        verdict := CASE tx->>'refund_status'
            WHEN 'SUCCESS' THEN 'refund_success'
            WHEN 'CLOSED' THEN 'refund_failed'
            WHEN 'ABNORMAL' THEN 'refund_processing' END;
        total := tx->'amount'->>'refund';
        IF verdict IS NULL OR nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
           OR total IS NULL OR total !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
        RETURN;
    END IF;
    -- Only transactions move payments; other resources are acknowledged
    -- and recorded (verdict NULL).
    IF coalesce(res->>'original_type', 'transaction') = 'transaction'
       AND coalesce(event_type, '') LIKE 'TRANSACTION.%' THEN
        order_id := tx->>'out_trade_no';
        txn_id := tx->>'transaction_id';
        verdict := CASE tx->>'trade_state'
            WHEN 'SUCCESS' THEN 'success'
            WHEN 'CLOSED' THEN 'failure'
            WHEN 'REVOKED' THEN 'failure'
            WHEN 'PAYERROR' THEN 'failure' END;
        total := tx->'amount'->>'total';
        currency := tx->'amount'->>'currency';
        IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                    OR total IS NULL OR total !~ '^[0-9]{1,15}$'
                                    OR nullif(currency, '') IS NULL) THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._wechatpay_v2_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    doc xml;
    f jsonb;
    n integer;
    content text;
    given text;
    sign_type text;
    s text;
    key text;
    calc text;
    ok boolean := false;
    crypto_schema name;
    ct bytea;
    plain bytea;
    r jsonb;
BEGIN
    payload := p_body;
    IF position('<!' IN regexp_replace(p_body, '<!\[CDATA\[', '', 'g')) > 0 THEN
        -- No DTD, no comments: WeChat sends neither.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        doc := xmlparse(DOCUMENT p_body);
        SELECT jsonb_object_agg(x.name, coalesce(x.value, '')), count(*)
          INTO f, n
          FROM XMLTABLE('/xml/*' PASSING doc
                        COLUMNS name text PATH 'local-name()', value text PATH 'string(.)') x;
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF f IS NULL OR n <> (SELECT count(*) FROM jsonb_object_keys(f)) THEN
        -- A parameter twice.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- A refund notification carries no sign: req_info is AES-256-ECB
    -- (PKCS#7 padding) under the lower-case hex MD5 of the API key, and
    -- only the key opens it (WeChat Pay authenticates refund notifications
    -- so, and no other way).  Read: order_id our refund id (out_refund_no),
    -- txn_id WeChat Pay's refund_id, amount_cents refund_fee; refund_status
    -- SUCCESS refunded, REFUNDCLOSE failed, CHANGE (abnormal: settled in
    -- the merchant platform) still open.  Keyed by refund_id and status.
    IF f ? 'req_info' AND NOT f ? 'sign' THEN
        BEGIN
            ct := decode(f->>'req_info', 'base64');
        EXCEPTION WHEN OTHERS THEN
            ct := NULL;
        END;
        IF ct IS NULL OR ct = '' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        -- pgcrypto is relocatable: find where it lives.
        SELECT x.nspname INTO crypto_schema
          FROM pg_extension e JOIN pg_namespace x ON x.oid = e.extnamespace
         WHERE e.extname = 'pgcrypto';
        FOREACH s IN ARRAY p_secrets LOOP
            BEGIN
                EXECUTE format('SELECT %I.decrypt($1, $2, %L)', crypto_schema, 'aes-ecb/pad:pkcs')
                   INTO plain USING ct, convert_to(md5(regexp_replace(s, '^md5:', '')), 'UTF8');
                IF position('<!' IN regexp_replace(convert_from(plain, 'UTF8'), '<!\[CDATA\[', '', 'g')) > 0 THEN
                    plain := NULL;
                END IF;
                SELECT jsonb_object_agg(x.name, coalesce(x.value, '')) INTO r
                  FROM XMLTABLE('/root/*' PASSING xmlparse(DOCUMENT convert_from(plain, 'UTF8'))
                                COLUMNS name text PATH 'local-name()', value text PATH 'string(.)') x;
            EXCEPTION WHEN OTHERS THEN
                r := NULL;
            END;
            EXIT WHEN r IS NOT NULL;
        END LOOP;
        IF r IS NULL THEN
            -- Nothing but the key makes a req_info that opens.
            failure := 'invalid_signature'; fail_status := 401;
            RETURN;
        END IF;
        order_id := r->>'out_refund_no';
        txn_id := r->>'refund_id';
        verdict := CASE r->>'refund_status' WHEN 'SUCCESS' THEN 'refund_success'
                                            WHEN 'REFUNDCLOSE' THEN 'refund_failed'
                                            WHEN 'CHANGE' THEN 'refund_processing' END;
        event_type := 'refund ' || coalesce(r->>'refund_status', '');
        msg_id := 'refund:' || (r->>'refund_id') || ':' || (r->>'refund_status');
        IF f->>'return_code' IS DISTINCT FROM 'SUCCESS' OR verdict IS NULL
           OR nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
           OR coalesce(r->>'refund_fee', '') !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := (r->>'refund_fee')::bigint;
        RETURN;
    END IF;
    given := f->>'sign';
    IF nullif(given, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    sign_type := coalesce(nullif(f->>'sign_type', ''), 'HMAC-SHA256');
    IF sign_type NOT IN ('HMAC-SHA256', 'MD5') THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(e.key || '=' || e.value, '&' ORDER BY e.key COLLATE "C")
      INTO content
      FROM jsonb_each_text(f) e WHERE e.key <> 'sign' AND e.value <> '';
    FOREACH s IN ARRAY p_secrets LOOP
        key := regexp_replace(s, '^md5:', '');
        IF sign_type = 'HMAC-SHA256' THEN
            calc := upper(encode(callback_center._hmac_sha256(convert_to(key, 'UTF8'),
                convert_to(content || '&key=' || key, 'UTF8')), 'hex'));
        ELSIF s LIKE 'md5:%' THEN
            calc := upper(md5(convert_to(content || '&key=' || key, 'UTF8')));
        ELSE
            CONTINUE;
        END IF;
        -- Compared as digests: the time taken says nothing about the sign.
        ok := ok OR sha256(convert_to(calc, 'UTF8')) = sha256(convert_to(upper(given), 'UTF8'));
    END LOOP;
    IF NOT ok THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    IF f->>'return_code' IS DISTINCT FROM 'SUCCESS' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := f->>'transaction_id';
    txn_id := f->>'transaction_id';
    order_id := f->>'out_trade_no';
    event_type := coalesce(f->>'trade_type', 'payment');
    -- result_code FAIL is one failed attempt: the order stays payable.
    verdict := CASE f->>'result_code' WHEN 'SUCCESS' THEN 'success'
                                      WHEN 'FAIL' THEN 'attempt_failed' END;
    currency := coalesce(nullif(f->>'fee_type', ''), 'CNY');
    IF nullif(msg_id, '') IS NULL OR nullif(order_id, '') IS NULL OR verdict IS NULL
       OR coalesce(f->>'total_fee', '') !~ '^[0-9]{1,15}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    amount_cents := (f->>'total_fee')::bigint;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._alipay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    texts text[];
    cert_sn text;
    cas text[];
    k record;
    chk record;
    candidates integer := 0;
    chain_failure text;
    charset text := 'UTF8';
    cs text;
    content bytea;
    sig bytea;
    ok boolean := false;
    s text;
    f jsonb := '{}';
    notify_time timestamptz;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(p_body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'charset')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs IN ('GBK', 'GB2312') THEN 'GBK'
                    WHEN cs = 'GB18030' THEN 'GB18030' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- Characters of a text body beyond ASCII were decoded by the web tier:
    -- on the wire they were the bytes of the form's charset.
    IF charset <> 'UTF8' AND p_body ~ '[^\x01-\x7f]' THEN
        BEGIN
            SELECT f.names, f.vals INTO names, vals
              FROM callback_center._form_parse(
                       callback_center._form_escape(convert_to(p_body, charset))) f;
        EXCEPTION WHEN untranslatable_character THEN
            names := NULL;
        END;
        IF names IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
    END IF;
    -- Every value decoded from the charset before anything is verified:
    -- Alipay signs the decoded values (encoded in that charset again, which
    -- gives back the %-decoded bytes), and bytes that are not text in it
    -- were not signed by Alipay.
    BEGIN
        texts := ARRAY(SELECT convert_from(x.v, charset)
                         FROM unnest(vals) WITH ORDINALITY AS x(v, i) ORDER BY x.i);
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF array_position(names, 'sign') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF coalesce(callback_center._channel_ascii(vals[array_position(names, 'sign_type')]), 'RSA2') <> 'RSA2' THEN
        -- RSA (SHA1withRSA) is Alipay's legacy; only RSA2 is accepted.
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'sign')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('sign', 'sign_type') AND x.v <> '';
    -- Public-key mode: the Alipay public keys of secrets.
    FOREACH s IN ARRAY p_secrets LOOP
        ok := ok OR callback_center._rsa_sha256_check(s, coalesce(content, ''), sig) IS NULL;
    END LOOP;
    -- Certificate mode: the Alipay public-key certificates loaded with
    -- set_platform_keys (named by their SN), each checked against the
    -- loaded roots now, since a certificate expires after it was loaded;
    -- alipay_cert_sn, when the notification carries it, names the one.
    -- The roots themselves sign no notification.
    IF NOT ok THEN
        cert_sn := callback_center._channel_ascii(vals[array_position(names, 'alipay_cert_sn')]);
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
         WHERE pk.provider = p_provider;
        IF cas IS NULL AND cardinality(p_secrets) = 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
                MESSAGE = format('provider "%s" has no Alipay public key or certificate', p_provider),
                HINT = 'An administrator gives the Alipay public key to callback_center.set_provider(), or loads the Alipay certificates with callback_center.set_platform_keys().';
        END IF;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = p_provider
                    AND (cert_sn IS NULL OR pk.key_id = cert_sn)
                  ORDER BY pk.key_id LOOP
            CONTINUE WHEN (callback_center._x509_chain_check(k.pem, ARRAY[k.pem], NULL)).verdict = 'ok';
            candidates := candidates + 1;
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                chain_failure := chk.verdict;
            ELSIF callback_center._rsa_sha256_check(k.pem, coalesce(content, ''), sig) IS NULL THEN
                ok := true;
                EXIT;
            END IF;
        END LOOP;
        IF NOT ok THEN
            failure := CASE WHEN cert_sn IS NOT NULL AND cas IS NOT NULL AND candidates = 0
                            THEN 'unknown_key'
                            WHEN chain_failure = 'expired' THEN 'key_expired'
                            WHEN chain_failure IS NOT NULL THEN 'untrusted_key'
                            ELSE 'invalid_signature' END;
            fail_status := 401;
            RETURN;
        END IF;
    END IF;

    -- Signed by Alipay: from here on a problem is the body's.
    SELECT jsonb_object_agg(x.nm, x.t)
      INTO f FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm IN ('notify_id', 'notify_time', 'notify_type', 'out_trade_no',
                    'trade_no', 'trade_status', 'total_amount', 'trans_currency',
                    'out_biz_no', 'refund_fee', 'gmt_refund');
    SELECT string_agg(x.nm || '=' || x.t, '&' ORDER BY x.nm COLLATE "C")
      INTO payload FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm NOT IN ('sign', 'sign_type', 'notify_time');
    msg_id := f->>'notify_id';
    event_type := f->>'notify_type';
    IF nullif(msg_id, '') IS NULL
       OR coalesce(f->>'notify_time', '') !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        notify_time := (f->>'notify_time')::timestamp AT TIME ZONE 'Asia/Shanghai';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF abs(extract(epoch FROM now() - notify_time))
       > extract(epoch FROM callback_center._channel_tolerance(p_tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;

    -- A refund arrives as a trade notification carrying refund_fee and
    -- gmt_refund (TRADE_SUCCESS after a partial refund, TRADE_CLOSED after
    -- a full one), out_biz_no naming the refund (our out_request_no), and
    -- only once it succeeded.  order_id is our refund id; txn_id NULL
    -- (Alipay gives a refund no id of its own).  refund_fee is the
    -- trade's total refunded so far, not this refund's amount: not
    -- compared (amount_cents NULL); reconciliation compares amounts.
    IF f ? 'gmt_refund' OR f ? 'refund_fee' THEN
        order_id := f->>'out_biz_no';
        verdict := 'refund_success';
        IF nullif(order_id, '') IS NULL OR nullif(f->>'trade_no', '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
        END IF;
        RETURN;
    END IF;
    order_id := f->>'out_trade_no';
    txn_id := f->>'trade_no';
    verdict := CASE f->>'trade_status'
        WHEN 'TRADE_SUCCESS' THEN 'success'
        WHEN 'TRADE_FINISHED' THEN 'success'
        WHEN 'TRADE_CLOSED' THEN 'failure' END;
    currency := coalesce(nullif(f->>'trans_currency', ''), 'CNY');
    total := f->>'total_amount';
    IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                OR total IS NULL
                                OR total !~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$') THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    IF total ~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$' THEN
        amount_cents := (total::numeric * 100)::bigint;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._unionpay_parse(
    p_provider text, p_secrets text[], p_tolerance interval,
    p_headers jsonb, p_body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    charset text;
    cs text;
    cert bytea;
    cert_pem text;
    content bytea;
    sig bytea;
    cas text[];
    chk record;
    f jsonb;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(p_body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'encoding')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs = 'GBK' THEN 'GBK' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- signMethod 01 of version 5.1.0 only: 5.0.0 signs SHA-1 digests with
    -- a certificate chosen by certId, 11 and 12 are symmetric keys.
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        sig := NULL;
    END;
    IF sig IS NULL OR sig = '' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- In a fixed order: the certificate cache (crypto.c) is keyed by them.
    SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = p_provider;
    IF cas IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no UnionPay certificates', p_provider),
            HINT = 'An administrator loads the root and intermediate certificates with callback_center.set_platform_keys().';
    END IF;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, cas, p_secrets);
    IF chk.verdict <> 'ok' THEN
        failure := CASE chk.verdict WHEN 'malformed' THEN 'malformed_signature'
                                    WHEN 'expired' THEN 'key_expired'
                                    WHEN 'wrong_name' THEN 'wrong_organisation'
                                    ELSE 'untrusted_key' END;
        fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by UnionPay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('orderId', 'queryId', 'txnType', 'txnSubType', 'respCode',
                        'txnAmt', 'currencyCode', 'origQryId');
        -- What a resend repeats: the signed parameters but the certificate
        -- (UnionPay may sign a resend under its next certificate).
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('signature', 'signPubKeyCert') AND x.v <> '';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF nullif(f->>'queryId', '') IS NULL OR nullif(f->>'txnType', '') IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := (f->>'queryId') || ':' || (f->>'txnType');
    event_type := 'txnType ' || (f->>'txnType') || coalesce('/' || (f->>'txnSubType'), '');
    IF f->>'txnType' = '01' THEN
        -- Consumption: respCode 00 (success) and A6 (success with a
        -- defect) pay; any other is one failed attempt.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'success' ELSE 'attempt_failed' END;
        -- ISO 4217 numeric codes.
        currency := CASE f->>'currencyCode'
            WHEN '156' THEN 'CNY' WHEN '344' THEN 'HKD' WHEN '446' THEN 'MOP'
            WHEN '901' THEN 'TWD' WHEN '840' THEN 'USD' WHEN '978' THEN 'EUR'
            WHEN '826' THEN 'GBP' WHEN '392' THEN 'JPY' WHEN '410' THEN 'KRW'
            WHEN '702' THEN 'SGD' WHEN '036' THEN 'AUD' WHEN '124' THEN 'CAD'
            ELSE f->>'currencyCode' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$'
           OR nullif(currency, '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    IF f->>'txnType' = '04' THEN
        -- Refund (back notification): orderId is the refund's own order
        -- id, our refund id; queryId UnionPay's id of the refund; txnAmt
        -- its amount.  respCode 00 and A6 refunded; any other failed.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'refund_success' ELSE 'refund_failed' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    -- Other transaction types (cancellations 31, ...) are recorded and
    -- acknowledged (verdict NULL).
END
$$;

CREATE OR REPLACE FUNCTION callback_center._channel_parse(
    p_scheme text, p_provider text, p_headers jsonb, p_body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_variable
DECLARE
    prov callback_center.providers;
    m record;
    a record;
BEGIN
    PERFORM callback_center._require(num_nulls(p_scheme, p_provider, p_headers, p_body) = 0 OR NULL,
                                     'scheme, provider, headers and body');
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = p_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> p_scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', p_provider, prov.scheme, p_scheme);
    END IF;

    IF p_scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(p_provider, prov.secrets, prov.tolerance,
                                                 p_headers, p_body);
    ELSIF p_scheme = 'alipay' THEN
        m := callback_center._alipay_parse(p_provider, prov.secrets, prov.tolerance,
                                           p_headers, p_body);
    ELSIF p_scheme = 'unionpay' THEN
        m := callback_center._unionpay_parse(p_provider, prov.secrets, prov.tolerance,
                                             p_headers, p_body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', p_scheme);
    END IF;

    a := callback_center._channel_answer(p_scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.mark_refunded(provider text, provider_txn_id text)
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

CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
RETURNS TABLE (http_status integer, response_body text, is_first boolean, outcome text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_provider text := payment_callback.provider;
    cb_type text := 'payment:' || p_provider;
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
    PERFORM callback_center._require(p_provider, 'provider');
    PERFORM callback_center._require(payment_callback.headers, 'headers');
    PERFORM callback_center._require(payment_callback.body, 'body');
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = p_provider;
    channel := scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay', 'unionpay');
    -- Payment channels (45_channels.sql: wechatpay_v3, wechatpay_v2, alipay, unionpay):
    -- verified and decoded by _channel_parse; whatever the provider got
    -- wrong is answered in its own format, recording nothing.  Its
    -- acknowledgement replaces ack.
    IF channel THEN
        SELECT * INTO ch FROM callback_center._channel_parse(scheme, p_provider,
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
            PERFORM callback_center.verify_signature(p_provider, payment_callback.headers,
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
            refused := (callback_center._payment_check(p_provider, msg.order_id, msg.amount_cents,
                                                       msg.currency, msg.verdict)).refusal;
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
        result := callback_center._apply_refund_notification(p_provider, msg.order_id, msg.txn_id,
                                                             msg.amount_cents, msg.verdict,
                                                             msg.event_type);
    ELSE
        result := callback_center._move_payment(p_provider, msg.txn_id, msg.order_id,
                                                msg.amount_cents, msg.verdict, 'callback');
    END IF;

    PERFORM callback_center.complete_callback(msg_id, cb_type, true,
        jsonb_build_object('http_status', 200, 'body', ack, 'outcome', result,
                           'order_id', msg.order_id, 'txn_id', msg.txn_id,
                           'event_type', msg.event_type));
    RETURN QUERY SELECT 200, ack, true, result;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._recon_status_agrees(provider_status text, local_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    -- A payment refunded since it was paid still agrees with its success
    -- line: the refunds are lines of their own (refund_id).
    SELECT CASE provider_status
        WHEN 'success' THEN local_status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')
        WHEN 'refund' THEN local_status IN ('REFUNDED', 'PARTIALLY_REFUNDED')
        WHEN 'closed' THEN local_status IN ('CLOSED', 'FAILED')
        ELSE false END
$$;

CREATE OR REPLACE FUNCTION callback_center.reconcile(channel text, bill_date date,
    grace interval DEFAULT '30 minutes')
RETURNS TABLE (kind text, count bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
#variable_conflict use_column
DECLARE
    p_channel text := reconcile.channel;
    p_date date := reconcile.bill_date;
    day_start timestamptz;
    day_end timestamptz;
    run_at timestamptz := clock_timestamp();
    r record;
    applied_ids bigint[];
    refund_ids bigint[];
    o callback_center.orders;
    pay callback_center.payments;
    outcome text;
BEGIN
    PERFORM callback_center._require_key(p_channel, 'channel', 63);
    PERFORM callback_center._require(p_date, 'bill_date');
    PERFORM callback_center._require(reconcile.grace, 'grace');
    IF reconcile.grace < interval '0' OR reconcile.grace >= interval '12 hours' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('grace must be between 0 and 12 hours, got %s', reconcile.grace);
    END IF;
    day_start := p_date::timestamptz;
    day_end := (p_date + 1)::timestamptz;

    -- Serialise runs for one (channel, bill_date).
    PERFORM pg_advisory_xact_lock(hashtextextended(
        'callback_center.recon:' || p_channel || ':' || p_date::text, 0));

    -- One pass: statement lines of the day FULL JOIN local payments of the
    -- provider paid in the day widened by grace at both edges, matched on
    -- the provider's transaction id.  Lines left unmatched look further:
    -- the same transaction id paid on any other day (x: the provider booked
    -- it across midnight from us, or later; compared like a match), or the
    -- unpaid payment of the line's order (u).  Local payments left
    -- unmatched are differences only when paid in the day and not on a
    -- neighbouring day's statement (that day's run compares them); grace is
    -- how long before or after midnight one may still turn up on the
    -- neighbour's statement, so those wait as pending_grace.  Lines already
    -- settled by an earlier run are left alone.
    WITH s AS (
        SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status
          FROM callback_center.provider_statement st
         WHERE st.channel = p_channel AND st.bill_date = p_date
           AND st.refund_id IS NULL
           AND NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                            WHERE d.channel = p_channel AND d.bill_date = p_date
                              AND d.provider_txn_id = st.provider_txn_id
                              AND d.resolution = 'applied')
    ), l AS (
        SELECT p.payment_id, p.order_id, p.provider_txn_id, p.amount_cents, p.status, p.paid_at
          FROM callback_center.payments p
         WHERE p.provider = p_channel
           AND p.paid_at >= day_start - reconcile.grace
           AND p.paid_at < day_end + reconcile.grace
           AND p.provider_txn_id IS NOT NULL
    ), j AS (
        SELECT s.provider_txn_id AS s_txn, s.order_id AS s_order, s.amount_cents AS s_amount,
               s.status AS s_status,
               l.provider_txn_id AS l_txn, l.order_id AS l_order, l.amount_cents AS l_amount,
               l.status AS l_status, l.paid_at AS l_paid_at
          FROM s FULL JOIN l ON l.provider_txn_id = s.provider_txn_id
    ), c AS (
        SELECT coalesce(j.s_txn, j.l_txn) AS txn,
               coalesce(j.s_order, j.l_order, x.order_id, u.order_id) AS order_id,
               j.s_amount, j.s_status,
               coalesce(j.l_amount, x.amount_cents, u.amount_cents) AS local_amount,
               coalesce(j.l_status, x.status, u.status) AS local_status,
               CASE
                 WHEN j.s_txn IS NOT NULL AND j.l_txn IS NOT NULL THEN
                   CASE WHEN j.s_amount <> j.l_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, j.l_status)
                             THEN 'status_mismatch' END
                 WHEN j.l_txn IS NOT NULL THEN
                   -- Local only; rows in the grace margins, and rows on a
                   -- neighbouring day's statement, are that day's to judge.
                   CASE WHEN j.l_paid_at >= day_start AND j.l_paid_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = p_channel
                                    AND n.bill_date IN (p_date - 1, p_date + 1)
                                    AND n.provider_txn_id = j.l_txn)
                        THEN 'missing_provider' END
                 WHEN x.payment_id IS NOT NULL THEN
                   CASE WHEN x.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, x.status)
                             THEN 'status_mismatch' END
                 WHEN u.payment_id IS NOT NULL THEN
                   CASE WHEN u.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, u.status)
                             THEN 'status_mismatch' END
                 ELSE 'missing_local'
               END AS kind,
               CASE
                 WHEN j.l_txn IS NOT NULL AND j.s_txn IS NULL THEN
                   CASE WHEN j.l_paid_at < day_start + reconcile.grace
                          OR j.l_paid_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN u.payment_id IS NOT NULL AND j.s_status = 'success'
                      AND u.amount_cents = j.s_amount
                      AND u.status IN ('CREATED', 'PAYING', 'CLOSED', 'FAILED') THEN 'applied'
                 ELSE 'flagged'
               END AS resolution,
               u.payment_id AS apply_payment_id
          -- Index probes for the unmatched lines only (LIMIT 1 keeps
          -- them per-row lookups, not hash joins over every payment).
          FROM j
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND p.provider_txn_id = j.s_txn
                   AND p.provider = p_channel
                 LIMIT 1) x ON true
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND x.payment_id IS NULL
                   AND p.order_id = j.s_order AND p.provider_txn_id IS NULL
                   AND p.provider = p_channel
                 LIMIT 1) u ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at)
        SELECT p_channel, p_date, c.txn, c.order_id,
               -- Known late money is a refund for people, whatever else
               -- differs; once refunded, the provider's refund agrees.
               CASE WHEN lp.status = 'refund_required' AND c.resolution <> 'applied'
                    THEN 'refund_required' ELSE c.kind END,
               c.s_amount, c.local_amount, c.s_status, c.local_status,
               CASE WHEN lp.status = 'refund_required' AND c.resolution = 'pending_grace'
                    THEN 'flagged' ELSE c.resolution END,
               run_at
          FROM c
          LEFT JOIN LATERAL (
                SELECT l.status FROM callback_center.late_payments l
                 WHERE l.provider = p_channel AND l.provider_txn_id = c.txn) lp ON true
         WHERE c.kind IS NOT NULL
           AND NOT (lp.status IS NOT DISTINCT FROM 'refunded' AND c.s_status = 'refund')
        ON CONFLICT (channel, bill_date, provider_txn_id, kind) DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.provider_txn_id, d.order_id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO applied_ids
      FROM ins;

    -- Refunds: statement refund lines of the day FULL JOIN local refunds of
    -- the provider that succeeded in the day widened by grace, matched on
    -- our refund id.  A line left unmatched looks for its refund on any
    -- day (x): missing there is missing_local; open (PENDING, PROCESSING)
    -- is status_mismatch, settled here (applied: the provider's statement
    -- says it refunded, _apply_refund_answer below); failed is
    -- status_mismatch for people.  A local refund left unmatched is
    -- missing_provider when it succeeded in the day and no statement of
    -- the day (a line settled by an earlier run is left out of s) or a
    -- neighbouring day has it (pending_grace in the margins).  provider_txn_id is
    -- the line's, else our refund id (unique; a provider's refund id need
    -- not be: Alipay's answers name the trade).
    WITH s AS (
        SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status, st.refund_id
          FROM callback_center.provider_statement st
         WHERE st.channel = p_channel AND st.bill_date = p_date AND st.refund_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                            WHERE d.channel = p_channel AND d.bill_date = p_date
                              AND d.provider_txn_id = st.provider_txn_id
                              AND d.resolution = 'applied')
    ), l AS (
        SELECT rf.refund_id, rf.order_id, rf.amount_cents, rf.status, rf.finished_at,
               rf.provider_txn_id, rf.refund_id AS txn
          FROM callback_center.refunds rf
         WHERE rf.provider = p_channel AND rf.status = 'SUCCESS'
           AND rf.finished_at >= day_start - reconcile.grace
           AND rf.finished_at < day_end + reconcile.grace
    ), c AS (
        SELECT coalesce(s.provider_txn_id, l.txn) AS txn,
               coalesce(s.refund_id, l.refund_id) AS refund_id,
               coalesce(s.order_id, l.order_id, x.order_id) AS order_id,
               s.amount_cents AS s_amount, s.status AS s_status,
               coalesce(l.amount_cents, x.amount_cents) AS local_amount,
               coalesce(l.status, x.status) AS local_status,
               CASE
                 WHEN s.refund_id IS NOT NULL AND l.refund_id IS NOT NULL THEN
                   CASE WHEN s.amount_cents <> l.amount_cents THEN 'amount_mismatch' END
                 WHEN l.refund_id IS NOT NULL THEN
                   -- A statement that lists refunds by the refunded
                   -- transaction (status refund, no refund_id) has it too.
                   CASE WHEN l.finished_at >= day_start AND l.finished_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = p_channel
                                    AND n.bill_date BETWEEN p_date - 1 AND p_date + 1
                                    AND n.refund_id = l.refund_id)
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = p_channel
                                    AND n.bill_date BETWEEN p_date - 1 AND p_date + 1
                                    AND n.refund_id IS NULL AND n.status = 'refund'
                                    AND n.provider_txn_id = l.provider_txn_id)
                        THEN 'missing_provider' END
                 WHEN x.refund_id IS NULL THEN 'missing_local'
                 WHEN x.amount_cents <> s.amount_cents THEN 'amount_mismatch'
                 WHEN x.status <> 'SUCCESS' THEN 'status_mismatch'
               END AS kind,
               CASE
                 WHEN l.refund_id IS NOT NULL AND s.refund_id IS NULL THEN
                   CASE WHEN l.finished_at < day_start + reconcile.grace
                          OR l.finished_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN x.status IN ('PENDING', 'PROCESSING') AND x.amount_cents = s.amount_cents
                      THEN 'applied'
                 ELSE 'flagged'
               END AS resolution
          FROM s FULL JOIN l ON l.refund_id = s.refund_id
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.refunds rf
                 WHERE l.refund_id IS NULL AND rf.refund_id = s.refund_id
                   AND rf.provider = p_channel) x ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at, refund_id)
        SELECT p_channel, p_date, c.txn, c.order_id, c.kind, c.s_amount, c.local_amount,
               c.s_status, c.local_status, c.resolution, run_at, c.refund_id
          FROM c
         WHERE c.kind IS NOT NULL
        ON CONFLICT (channel, bill_date, provider_txn_id, kind) DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at, refund_id = excluded.refund_id
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO refund_ids
      FROM ins;

    -- Differences an earlier run recorded that this run no longer finds.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = p_channel AND d.bill_date = p_date
       AND d.resolution NOT IN ('applied', 'resolved') AND d.checked_at <> run_at;

    -- Local payments a neighbouring day's run left waiting for a
    -- statement line that turned up on this day's statement: compared
    -- above, so no longer differences of that day.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = p_channel AND d.bill_date IN (p_date - 1, p_date + 1)
       AND d.kind = 'missing_provider' AND d.resolution = 'pending_grace'
       AND EXISTS (SELECT 1 FROM callback_center.provider_statement st
                    WHERE st.channel = p_channel AND st.bill_date = p_date
                      AND (st.provider_txn_id = d.provider_txn_id
                           OR st.refund_id = d.refund_id));

    -- Settle open refunds the provider's statement says it refunded,
    -- through the one owner of refund status changes.
    FOR r IN
        SELECT d.id, d.refund_id, d.provider_txn_id, d.provider_amount
          FROM callback_center.recon_diffs d
         WHERE d.id = ANY (coalesce(refund_ids, '{}'))
         ORDER BY d.id
    LOOP
        outcome := callback_center._apply_refund_answer(r.refund_id,
            jsonb_build_object('status', 'success', 'provider_refund_id', r.provider_txn_id,
                               'amount_cents', r.provider_amount));
        UPDATE callback_center.recon_diffs d
           SET resolution = CASE outcome WHEN 'succeeded' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome WHEN 'succeeded' THEN 'refund marked succeeded'
                               ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    -- Settle what the provider was paid for and we were not told, through
    -- the same path as a callback (state machines, follow-up events; on an
    -- order that can no longer take the money, a late payment to refund).
    FOR r IN
        SELECT d.id, d.provider_txn_id, d.order_id, d.provider_amount, st.currency
          FROM callback_center.recon_diffs d
          LEFT JOIN callback_center.provider_statement st
                 ON st.channel = p_channel AND st.bill_date = p_date
                AND st.provider_txn_id = d.provider_txn_id
         WHERE d.id = ANY (coalesce(applied_ids, '{}'))
         ORDER BY d.id
    LOOP
        SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = r.order_id FOR UPDATE;
        SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = r.order_id FOR UPDATE;
        IF pay.provider_txn_id IS NOT NULL THEN
            -- A callback got there first, after the pass read the row.
            UPDATE callback_center.recon_diffs d
               SET resolution = 'flagged',
                   note = format('payment took transaction %s meanwhile', pay.provider_txn_id)
             WHERE d.id = r.id;
            CONTINUE;
        END IF;
        outcome := callback_center._apply_payment_result(p_channel, r.provider_txn_id, r.order_id,
                                                         r.provider_amount, r.currency, 'success',
                                                         'reconciliation');
        UPDATE callback_center.recon_diffs d
           SET kind = CASE outcome WHEN 'refund_required' THEN 'refund_required' ELSE d.kind END,
               resolution = CASE outcome WHEN 'paid' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome
                        WHEN 'paid' THEN 'payment marked paid'
                        WHEN 'refund_required'
                          THEN format('order is %s/%s: payment.refund_required emitted',
                                      o.status, o.pay_status)
                        ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    RETURN QUERY
        SELECT k.kind, count(d.id)
          FROM unnest(ARRAY['missing_local', 'missing_provider', 'amount_mismatch',
                            'status_mismatch', 'refund_required']) WITH ORDINALITY AS k(kind, ord)
          LEFT JOIN callback_center.recon_diffs d
                 ON d.channel = p_channel AND d.bill_date = p_date AND d.kind = k.kind
         GROUP BY k.kind, k.ord
         ORDER BY k.ord;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._wechatpay_v3_answer(event_type text, payload jsonb,
    status integer, body text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    j jsonb;
    st text;
BEGIN
    IF _wechatpay_v3_answer.body <> '' THEN
        j := _wechatpay_v3_answer.body::jsonb;
    END IF;
    IF _wechatpay_v3_answer.status NOT BETWEEN 200 AND 299 THEN
        IF _wechatpay_v3_answer.event_type = 'payment.query' AND j->>'code' = 'ORDER_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', j->>'code');
        END IF;
        RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
            format('HTTP %s %s: %s', _wechatpay_v3_answer.status, j->>'code', j->>'message'));
    END IF;
    IF _wechatpay_v3_answer.event_type = 'payment.query' THEN
        IF j->>'out_trade_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about order "%s"', j->>'out_trade_no'));
        END IF;
        st := CASE j->>'trade_state'
                WHEN 'SUCCESS' THEN 'paid' WHEN 'REFUND' THEN 'paid'
                WHEN 'NOTPAY' THEN 'unpaid' WHEN 'USERPAYING' THEN 'unpaid'
                WHEN 'CLOSED' THEN 'closed' WHEN 'REVOKED' THEN 'closed'
                WHEN 'PAYERROR' THEN 'failed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('unknown trade_state "%s"', j->>'trade_state'));
        END IF;
        RETURN jsonb_build_object('status', st, 'provider_status', j->>'trade_state',
                                  'txn_id', j->>'transaction_id',
                                  'amount_cents', (j->'amount'->>'total')::bigint,
                                  'currency', j->'amount'->>'currency');
    ELSIF _wechatpay_v3_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSE
        IF j->>'out_refund_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'refund_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about refund "%s"', j->>'out_refund_no'));
        END IF;
        RETURN jsonb_build_object(
            'refund_id', _wechatpay_v3_answer.payload->>'refund_id',
            'status', CASE j->>'status' WHEN 'SUCCESS' THEN 'success'
                                        WHEN 'PROCESSING' THEN 'processing'
                                        -- not final: the merchant platform
                                        -- settles it (a failed refund's
                                        -- amount could be refunded again)
                                        WHEN 'ABNORMAL' THEN 'processing'
                                        WHEN 'CLOSED' THEN 'failed' ELSE 'unknown' END,
            'provider_refund_id', j->>'refund_id',
            'amount_cents', (j->'amount'->>'refund')::bigint,
            'error', CASE WHEN j->>'status' IN ('SUCCESS', 'PROCESSING') THEN NULL
                          ELSE j->>'status' END);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._alipay_answer(event_type text, payload jsonb,
    node jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    st text;
BEGIN
    IF _alipay_answer.node->>'code' IS DISTINCT FROM '10000' THEN
        IF _alipay_answer.event_type = 'payment.query' AND _alipay_answer.node->>'sub_code' = 'ACQ.TRADE_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', _alipay_answer.node->>'sub_code');
        END IF;
        RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
            format('%s %s: %s', _alipay_answer.node->>'code', _alipay_answer.node->>'sub_code',
                   coalesce(_alipay_answer.node->>'sub_msg', _alipay_answer.node->>'msg')));
    END IF;
    IF _alipay_answer.event_type = 'payment.query' THEN
        IF _alipay_answer.node->>'out_trade_no' IS DISTINCT FROM _alipay_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('the answer is about order "%s"', _alipay_answer.node->>'out_trade_no'));
        END IF;
        st := CASE _alipay_answer.node->>'trade_status'
                WHEN 'TRADE_SUCCESS' THEN 'paid' WHEN 'TRADE_FINISHED' THEN 'paid'
                WHEN 'WAIT_BUYER_PAY' THEN 'unpaid' WHEN 'TRADE_CLOSED' THEN 'closed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('unknown trade_status "%s"', _alipay_answer.node->>'trade_status'));
        END IF;
        RETURN jsonb_build_object('status', st, 'provider_status', _alipay_answer.node->>'trade_status',
                                  'txn_id', _alipay_answer.node->>'trade_no',
                                  'amount_cents',
                                  round((_alipay_answer.node->>'total_amount')::numeric * 100)::bigint,
                                  'currency', 'CNY');
    ELSIF _alipay_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSIF _alipay_answer.event_type = 'refund.request' THEN
        RETURN jsonb_build_object(
            'refund_id', _alipay_answer.payload->>'refund_id',
            'status', CASE WHEN _alipay_answer.node->>'fund_change' = 'Y' THEN 'success' ELSE 'processing' END,
            -- Alipay gives a refund no id (trade_no is the payment's), and
            -- refund_fee is the trade's total refunded, not this refund's.
            'provider_refund_id', NULL,
            'amount_cents', NULL,
            'error', NULL);
    ELSE
        RETURN jsonb_build_object(
            'refund_id', _alipay_answer.payload->>'refund_id',
            'status', CASE WHEN _alipay_answer.node->>'refund_status' = 'REFUND_SUCCESS' THEN 'success'
                           ELSE 'processing' END,
            'provider_refund_id', NULL,
            'amount_cents', round((_alipay_answer.node->>'refund_amount')::numeric * 100)::bigint,
            'error', NULL);
    END IF;
END
$$;

-- UnionPay refunds: one txnTime per refund, in its request and its queries.
-- UnionPay names a transaction by orderId and txnTime together: a refund's
-- txnTime is the time the refund was made, in Beijing time, the same in
-- every attempt of its request and in its queries (a query with another
-- txnTime finds nothing).
CREATE FUNCTION callback_center._unionpay_refund_time(refund_id text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    -- plpgsql: refunds (62_refunds.sql) is created after this piece.
    RETURN to_char(coalesce((SELECT r.created_at FROM callback_center.refunds r
                              WHERE r.refund_id = _unionpay_refund_time.refund_id),
                            clock_timestamp()) AT TIME ZONE 'Asia/Shanghai',
                   'YYYYMMDDHH24MISS');
END
$$;
REVOKE ALL ON FUNCTION callback_center._unionpay_refund_time(text) FROM PUBLIC;

-- UnionPay requests with the refund's txnTime.

CREATE OR REPLACE FUNCTION callback_center._unionpay_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    base text := rtrim(_unionpay_request.url, '/');
    path text;
    f jsonb;
    started timestamptz;
    signed text;
    body text;
BEGIN
    f := jsonb_build_object('version', '5.1.0', 'encoding', 'UTF-8', 'signMethod', '01',
                            'certId', m.key_serial, 'merId', m.merchant_id, 'accessType', '0');
    IF _unionpay_request.event_type = 'payment.query' THEN
        -- The order is named by orderId and the txnTime it was sent with:
        -- the time its payment started (start_payment), in Beijing time.
        SELECT p.updated_at INTO started FROM callback_center.payments p
         WHERE p.order_id = _unionpay_request.payload->>'order_id';
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'order_id',
                                     'txnTime', to_char(coalesce(started, clock_timestamp())
                                                        AT TIME ZONE 'Asia/Shanghai',
                                                        'YYYYMMDDHH24MISS'));
    ELSIF _unionpay_request.event_type = 'refund.request' THEN
        path := '/gateway/api/backTransReq.do';
        f := f || jsonb_build_object('txnType', '04', 'txnSubType', '00', 'bizType', '000201',
                                     'channelType', '07', 'currencyCode', '156',
                                     'orderId', _unionpay_request.payload->>'refund_id',
                                     'txnTime', callback_center._unionpay_refund_time(
                                                    _unionpay_request.payload->>'refund_id'),
                                     'origQryId', _unionpay_request.payload->>'provider_txn_id',
                                     'txnAmt', (_unionpay_request.payload->>'amount_cents')::bigint::text);
        IF m.options->>'back_url' IS NOT NULL THEN
            f := f || jsonb_build_object('backUrl', m.options->>'back_url');
        END IF;
    ELSIF _unionpay_request.event_type = 'refund.query' THEN
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'refund_id',
                                     'txnTime', callback_center._unionpay_refund_time(
                                                    _unionpay_request.payload->>'refund_id'));
    ELSE
        PERFORM callback_center._adapter_unsupported('unionpay', _unionpay_request.event_type);
    END IF;
    SELECT string_agg(x.key || '=' || (x.value #>> '{}'), '&' ORDER BY x.key COLLATE "C")
      INTO signed FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    f := f || jsonb_build_object('signature',
        callback_center._merchant_sign(m.provider,
            convert_to(encode(sha256(convert_to(signed, 'UTF8')), 'hex'), 'UTF8')));
    SELECT string_agg(x.key || '=' || callback_center._url_encode(x.value #>> '{}'), '&'
                      ORDER BY x.key COLLATE "C")
      INTO body FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    RETURN 'POST ' || base || path || E'\n'
        || E'Content-Type: application/x-www-form-urlencoded;charset=UTF-8\n'
        || E'\n' || body;
END
$$;

-- Retention: purge() covers provider_answers (46_adapters.sql), whose key
-- is outbox_id: an answer applied before the attempts' age goes, one not
-- yet applied never does.  _purge_targets names each target's key (a new
-- column: DROP and CREATE); _purge_batch walks it.
DROP FUNCTION callback_center._purge_targets();

-- What retention deletes, per relation, in order: delivered outbox rows,
-- delivery attempts (when that table exists), providers' answers applied
-- before the cutoff (the outcome of an attempt, so on the attempts' age;
-- an answer not yet applied is never touched), state history, succeeded
-- callback records and settled (applied or resolved) reconciliation
-- differences older than the cutoff ($1).  Pending, delivering and dead
-- outbox rows (dead ones stay for replay), pending, processing and failed
-- callback records, and flagged or pending_grace differences are never
-- touched.  age says which of purge's ages applies: attempts, history, or
-- events (older_than).  key is the bigint primary key the batches walk.
CREATE FUNCTION callback_center._purge_targets()
RETURNS TABLE (rel text, cond text, age text, key text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT v.rel, v.cond, v.age, v.key
      FROM (VALUES
        (1, 'callback_center.outbox', 'status = ''delivered'' AND delivered_at < $1', 'events', 'id'),
        (2, 'callback_center.delivery_attempts', 'attempted_at < $1', 'attempts', 'id'),
        (3, 'callback_center.provider_answers', 'applied_at < $1', 'attempts', 'outbox_id'),
        (4, 'callback_center.state_history', 'at < $1', 'history', 'id'),
        (5, 'callback_center.callback_record', 'status = 2 AND completed_at < $1', 'events', 'id'),
        (6, 'callback_center.recon_diffs',
         'resolution IN (''applied'', ''resolved'') AND created_at < $1', 'events', 'id'))
           AS v(ord, rel, cond, age, key)
     WHERE to_regclass(v.rel) IS NOT NULL
     ORDER BY v.ord
$$;

-- Deletes one batch of at most batch_size rows of one retention target
-- (see _purge_targets) older than cutoff with a key (its id, or outbox_id)
-- above after_id, rows locked by others skipped.  Returns how many it
-- deleted and the highest key it passed (the next batch's after_id).  22023 for a relation that is not
-- a retention target.
CREATE OR REPLACE FUNCTION callback_center._purge_batch(rel text, cutoff timestamptz, after_id bigint,
    batch_size integer, OUT purged bigint, OUT last_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    condition text;
    k text;
BEGIN
    SELECT t.cond, t.key INTO condition, k FROM callback_center._purge_targets() t
     WHERE t.rel = _purge_batch.rel;
    IF condition IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('"%s" is not a retention target', _purge_batch.rel);
    END IF;
    -- Walk the primary key upwards: old rows have low ids, and no batch
    -- rescans what an earlier one passed.  b is MATERIALIZED: evaluated
    -- once whatever the plan, so that the rows counted, the rows deleted
    -- and the batch's last id are the same LIMIT ... SKIP LOCKED pick (a
    -- sub-select run again per row of a join would pick more rows).
    EXECUTE format(
        'WITH b AS MATERIALIZED (SELECT %1$I AS id FROM %2$s WHERE %1$I > $2 AND %3$s'
        ' ORDER BY %1$I LIMIT $3 FOR UPDATE SKIP LOCKED),'
        ' d AS (DELETE FROM %2$s WHERE %1$I IN (SELECT id FROM b) RETURNING 1)'
        ' SELECT (SELECT count(*) FROM b), (SELECT max(id) FROM b)'
        ' FROM (SELECT count(*) FROM d) AS x',
        k, _purge_batch.rel, condition)
        INTO purged, last_id USING cutoff, after_id, batch_size;
END
$$;

REVOKE ALL ON FUNCTION callback_center._purge_targets() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center._purge_targets() TO callback_center_admin;

-- One NULL check in SQL, the functions that run with the caller's rights
-- too: _require and _require_key are granted to the app and admin roles
-- (they read and write nothing), so _fsm_require_machine,
-- attach_state_machine, detach_state_machine, apply_event and saga_run check
-- their arguments with _require ("... must not be null", 22004 as before).
GRANT EXECUTE ON FUNCTION callback_center._require(anyelement, text),
    callback_center._require_key(text, text, integer)
    TO callback_center_app, callback_center_admin;

CREATE OR REPLACE FUNCTION callback_center._fsm_require_machine(machine text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    IF NOT EXISTS (SELECT 1 FROM callback_center.state_machines m
                    WHERE m.machine = _fsm_require_machine.machine) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB011',
            MESSAGE = format('state machine "%s" does not exist', machine),
            HINT = 'Create it with callback_center.create_state_machine().';
    END IF;
END
$$;


CREATE OR REPLACE FUNCTION callback_center.attach_state_machine(
    tbl regclass,
    state_column name,
    machine text,
    id_column name DEFAULT 'id',
    payload_columns name[] DEFAULT '{}')
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    kind "char";
    state_type oid;
    existing record;
    bad text;
    col name;
    trigger_args text;
    trigger_name name;
    log_trigger_name name;
BEGIN
    PERFORM callback_center._require(
        num_nulls(tbl, state_column, machine, id_column, payload_columns) = 0
        AND array_position(payload_columns, NULL) IS NULL OR NULL,
        'tbl, state_column, machine, id_column and payload_columns (and its elements)');
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = tbl;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION USING ERRCODE = '42809',
            MESSAGE = format('"%s" is not a table', tbl);
    END IF;
    SELECT a.atttypid INTO state_type FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = state_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42703',
            MESSAGE = format('column "%s" of table %s does not exist', state_column, tbl);
    END IF;
    IF state_type NOT IN ('text'::regtype, 'varchar'::regtype) THEN
        RAISE EXCEPTION USING ERRCODE = '42804',
            MESSAGE = format('state column "%s" of table %s has type %s', state_column, tbl,
                             format_type(state_type, NULL)),
            DETAIL = 'A state column must be of type text or varchar.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = tbl AND a.attname = id_column
                      AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION USING ERRCODE = '42703',
            MESSAGE = format('column "%s" of table %s does not exist', id_column, tbl),
            HINT = 'Pass the column that identifies a row as id_column.';
    END IF;
    IF '*' = ANY (payload_columns) AND cardinality(payload_columns) > 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'payload column "*" (the whole row) cannot be listed with other columns';
    END IF;
    IF (SELECT count(DISTINCT c) FROM unnest(payload_columns) c) < cardinality(payload_columns) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'payload columns cannot repeat';
    END IF;
    FOREACH col IN ARRAY payload_columns LOOP
        CONTINUE WHEN col = '*';
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = tbl AND a.attname = col
                          AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION USING ERRCODE = '42703',
                MESSAGE = format('column "%s" of table %s does not exist', col, tbl),
                HINT = 'payload_columns names the columns emitted events carry.';
        END IF;
    END LOOP;
    PERFORM callback_center._fsm_require_machine(machine);

    SELECT * INTO existing FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = attach_state_machine.state_column;
    IF FOUND THEN
        IF existing.machine <> machine OR existing.id_column <> id_column THEN
            RAISE EXCEPTION USING ERRCODE = '42710',
                MESSAGE = format('column "%s" of table %s already has state machine "%s" attached',
                                 state_column, tbl, existing.machine),
                HINT = 'Detach it first with callback_center.detach_state_machine().';
        END IF;
        IF existing.payload_columns = payload_columns THEN
            RETURN false;
        END IF;
        -- Only the payload changes: the pair is made again.
        PERFORM callback_center.detach_state_machine(tbl, state_column);
    ELSE
        -- Rows already there must be in states the machine knows.
        bad := callback_center._fsm_unknown_state(tbl, state_column,
                   ARRAY(SELECT s.state FROM callback_center.machine_states s
                          WHERE s.machine = attach_state_machine.machine));
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'CB011',
                MESSAGE = format('unknown state "%s" in state machine "%s"', bad, machine),
                DETAIL = format('Table %s already has rows in that state.', tbl);
        END IF;
    END IF;

    SELECT string_agg(quote_literal(a), ', ' ORDER BY n) INTO trigger_args
      FROM unnest(ARRAY[machine, state_column::text, id_column::text]
                  || payload_columns::text[]) WITH ORDINALITY AS u(a, n);
    trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column);
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%s)',
                   trigger_name, state_column, tbl, trigger_args);
    log_trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column || '_log');
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%s)',
                   log_trigger_name, state_column, tbl, trigger_args);
    RETURN true;
END
$$;


CREATE OR REPLACE FUNCTION callback_center.detach_state_machine(
    tbl regclass,
    state_column name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    att record;
    trigger_name name;
BEGIN
    PERFORM callback_center._require(num_nulls(tbl, state_column) = 0 OR NULL,
                                     'tbl and state_column');
    SELECT * INTO att
      FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = detach_state_machine.state_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('no state machine is attached to column "%s" of table %s',
                             state_column, tbl);
    END IF;
    -- The BEFORE trigger and its AFTER twin: same function, same arguments.
    FOR trigger_name IN
        SELECT t.tgname FROM pg_trigger t
         WHERE t.tgrelid = tbl
           AND t.tgfoid = 'callback_center.fsm_trigger()'::regprocedure
           AND t.tgnargs >= 3
           AND (callback_center._fsm_trigger_args(t.tgargs))[1:3]
               = ARRAY[att.machine, state_column::text, att.id_column::text]
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END
$$;


CREATE OR REPLACE FUNCTION callback_center.apply_event(
    tbl regclass,
    state_column name,
    entity_id text,
    event text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    att record;
    id_type text;
    found_row boolean;
    current_state text;
    target text;
    legal text;
BEGIN
    PERFORM callback_center._require(num_nulls(tbl, state_column, entity_id, event) = 0 OR NULL,
                                     'tbl, state_column, entity_id and event');
    SELECT * INTO att FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = apply_event.state_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('no state machine is attached to column "%s" of table %s',
                             state_column, tbl),
            HINT = 'Attach one with callback_center.attach_state_machine().';
    END IF;
    SELECT format_type(a.atttypid, a.atttypmod) INTO id_type FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = att.id_column AND NOT a.attisdropped;

    EXECUTE format('SELECT true, %I::text FROM %s WHERE %I = CAST($1 AS %s) FOR UPDATE',
                   state_column, tbl, att.id_column, id_type)
       INTO found_row, current_state USING entity_id;
    IF found_row IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002',
            MESSAGE = format('no row of table %s has %s = %s', tbl, att.id_column,
                             quote_literal(entity_id));
    END IF;
    IF current_state IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = format('row %s of table %s has no state', quote_literal(entity_id), tbl),
            DETAIL = format('Column "%s" is null.', state_column);
    END IF;

    SELECT t.to_state INTO target FROM callback_center.transitions t
     WHERE t.machine = att.machine AND t.from_state = current_state
       AND t.event = apply_event.event;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM callback_center.transitions t
                        WHERE t.machine = att.machine AND t.event = apply_event.event) THEN
            RAISE EXCEPTION USING ERRCODE = 'CB011',
                MESSAGE = format('unknown event "%s" in state machine "%s"', event, att.machine);
        END IF;
        SELECT string_agg(quote_ident(t.event), ', ' ORDER BY t.event) INTO legal
          FROM callback_center.transitions t
         WHERE t.machine = att.machine AND t.from_state = current_state;
        RAISE EXCEPTION USING ERRCODE = 'CB010',
            MESSAGE = format('illegal event "%s" in state "%s" of state machine "%s"',
                             event, current_state, att.machine),
            DETAIL = format('Row %s of table %s is in state "%s".',
                            quote_literal(entity_id), tbl, current_state),
            HINT = CASE WHEN legal IS NULL
                        THEN format('No event leaves state "%s".', current_state)
                        ELSE format('Legal events from "%s": %s.', current_state, legal) END;
    END IF;

    EXECUTE format('UPDATE %s SET %I = $1 WHERE %I = CAST($2 AS %s)',
                   tbl, state_column, att.id_column, id_type)
      USING target, entity_id;
    RETURN target;
END
$$;


CREATE OR REPLACE FUNCTION callback_center.saga_run(saga_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $fn$
DECLARE
    st       text;
    step     record;
    outcome  text;
    err      text;
BEGIN
    PERFORM callback_center._require(saga_run.saga_id, 'saga_id');
    st := callback_center._saga_lock(saga_run.saga_id);
    -- _saga_lock checked the session's role; this is the role the steps
    -- would run as (not the same inside another SECURITY DEFINER function).
    IF NOT EXISTS (SELECT FROM callback_center.sagas AS s
                    WHERE s.saga_id OPERATOR(pg_catalog.=) saga_run.saga_id
                      AND s.created_by OPERATOR(pg_catalog.=) current_user::text) THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" does not belong to role "%s"', saga_run.saga_id, current_user),
            DETAIL = 'A saga''s steps run only as the role that declared it.';
    END IF;
    IF st IN ('completed', 'compensated') THEN
        RETURN st;
    END IF;
    IF st = 'running' THEN
        FOR step IN SELECT t.step_no, t.action FROM callback_center.saga_steps AS t
                     WHERE t.saga_id = saga_run.saga_id AND t.status = 'pending'
                     ORDER BY t.step_no
        LOOP
            BEGIN
                outcome := callback_center.barrier(saga_run.saga_id, step.step_no::text, 'try');
                IF outcome = 'proceed' THEN
                    EXECUTE step.action USING saga_run.saga_id;
                ELSIF outcome = 'refused' THEN
                    RAISE EXCEPTION USING ERRCODE = '55000',
                        MESSAGE = pg_catalog.format('step %s refused by the barrier', step.step_no),
                        DETAIL = 'Its compensation already ran.';
                END IF;
                PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no, 'done', NULL);
            EXCEPTION WHEN OTHERS THEN
                err := pg_catalog.format('step %s: %s: %s', step.step_no, SQLSTATE, SQLERRM);
                PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no, 'skipped', err);
                EXIT;
            END;
        END LOOP;
        IF err IS NULL THEN
            PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'completed', NULL);
            RETURN 'completed';
        END IF;
        PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensating', err);
    END IF;
    -- Compensating: from the last step down, each through the barrier.
    FOR step IN SELECT t.step_no, t.status, t.compensation FROM callback_center.saga_steps AS t
                 WHERE t.saga_id = saga_run.saga_id AND t.status <> 'compensated'
                 ORDER BY t.step_no DESC
    LOOP
        BEGIN
            outcome := callback_center.barrier(saga_run.saga_id, step.step_no::text, 'cancel');
            IF outcome = 'proceed' AND step.compensation IS NOT NULL THEN
                EXECUTE step.compensation USING saga_run.saga_id;
            END IF;
            PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no,
                CASE WHEN step.status = 'done' THEN 'compensated' ELSE 'skipped' END, NULL);
        EXCEPTION WHEN OTHERS THEN
            err := pg_catalog.format('compensation of step %s: %s: %s',
                                     step.step_no, SQLSTATE, SQLERRM);
            PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensating', err);
            RETURN 'compensating';
        END;
    END LOOP;
    PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensated', NULL);
    RETURN 'compensated';
END
$fn$;


REVOKE ALL ON FUNCTION callback_center._fsm_require_machine(text),
    callback_center.attach_state_machine(regclass, name, text, name, name[]),
    callback_center.detach_state_machine(regclass, name),
    callback_center.apply_event(regclass, name, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center._fsm_require_machine(text),
    callback_center.attach_state_machine(regclass, name, text, name, name[]),
    callback_center.detach_state_machine(regclass, name)
    TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.apply_event(regclass, name, text, text)
    TO callback_center_app, callback_center_admin;
REVOKE ALL ON FUNCTION callback_center.saga_run(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.saga_run(text) TO callback_center_app, callback_center_admin;

-- One sender of payment queries: query_stuck_payments and
-- query_expired_orders both call _send_payment_query.

-- Sends one status query for a payment: a payment.query event to its
-- provider's query endpoint only, whatever else subscribes, and the
-- payment_queries row that waits for its answer.  False when the endpoint
-- was disabled since the caller's scan (no query this time).  The one
-- sender of the active query and of the ask-before-close.
CREATE FUNCTION callback_center._send_payment_query(payment_id text, order_id text,
    provider text, amount_cents bigint, endpoint_id integer)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ob_id bigint;
BEGIN
    ob_id := callback_center._enqueue_one(_send_payment_query.endpoint_id, 'payment.query',
        _send_payment_query.order_id,
        jsonb_build_object('payment_id', _send_payment_query.payment_id,
                           'order_id', _send_payment_query.order_id,
                           'provider', _send_payment_query.provider,
                           'amount_cents', _send_payment_query.amount_cents));
    IF ob_id IS NULL THEN
        RETURN false;
    END IF;
    INSERT INTO callback_center.payment_queries
           (payment_id, order_id, provider, endpoint_id, outbox_id)
    VALUES (_send_payment_query.payment_id, _send_payment_query.order_id,
            _send_payment_query.provider, _send_payment_query.endpoint_id, ob_id);
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION callback_center._send_payment_query(text, text, text, bigint, integer)
    FROM PUBLIC;

-- query_stuck_payments and query_expired_orders with the one sender.

CREATE OR REPLACE FUNCTION callback_center.query_stuck_payments(max_payments integer DEFAULT 100,
    older_than interval DEFAULT NULL, min_interval interval DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    stuck interval := coalesce(older_than,
        current_setting('callback_center.pay_query_after', true)::interval, '5 minutes');
    again interval := coalesce(min_interval,
        current_setting('callback_center.pay_query_interval', true)::interval, '1 minute');
    r record;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_payments, 'max_payments');
    IF max_payments < 1 OR stuck < interval '0' OR again < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'max_payments must be positive and the intervals not negative';
    END IF;
    FOR r IN
        SELECT p.payment_id, p.order_id, p.provider, p.amount_cents, e.id AS endpoint_id
          FROM callback_center.payments p
          JOIN callback_center.providers pr ON pr.name = p.provider
          JOIN callback_center.endpoints e ON e.name = pr.query_endpoint AND e.enabled
         WHERE p.status = 'PAYING' AND p.updated_at <= now() - stuck
           AND NOT EXISTS (SELECT 1 FROM callback_center.payment_queries q
                            WHERE q.payment_id = p.payment_id
                              AND (q.status = 'sent' OR q.queried_at > now() - again))
         ORDER BY p.updated_at
         LIMIT max_payments
           FOR UPDATE OF p SKIP LOCKED
    LOOP
        IF callback_center._send_payment_query(r.payment_id, r.order_id, r.provider,
                                               r.amount_cents, r.endpoint_id) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.query_expired_orders(max_orders integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(max_orders, 'max_orders');
    IF max_orders < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('max_orders must be positive, got %s', max_orders);
    END IF;
    FOR r IN
        SELECT a.payment_id, a.order_id, a.provider, a.amount_cents, a.endpoint_id
          FROM callback_center.orders o
          JOIN callback_center._asked_before_close a ON a.order_id = o.order_id
          JOIN callback_center.payments p ON p.payment_id = a.payment_id
         WHERE o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')
           AND o.pay_deadline <= now()
           AND o.pay_deadline > now() - callback_center._close_query_max_wait()
           AND NOT EXISTS (SELECT 1 FROM callback_center.payment_queries q
                            WHERE q.payment_id = a.payment_id AND q.status = 'sent')
           AND coalesce((SELECT max(q.finished_at)
                                + least(interval '1 second' * power(2, least(count(*) - 1, 20)),
                                        interval '5 minutes')
                           FROM callback_center.payment_queries q
                          WHERE q.payment_id = a.payment_id AND q.queried_at >= o.pay_deadline),
                        '-infinity') <= now()
         ORDER BY o.pay_deadline
         LIMIT max_orders
           FOR UPDATE OF p SKIP LOCKED
    LOOP
        IF callback_center._send_payment_query(r.payment_id, r.order_id, r.provider,
                                               r.amount_cents, r.endpoint_id) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;

-- One convention for parameter/column name clashes, the last functions
-- (issue 9): a parameter is qualified by its function's name and a column
-- by its table's alias; no #variable_conflict (delivery_stats,
-- request_refund, _channel_parse) and no p_ copy of a parameter
-- (_apply_refund_answer).  Public functions of 0.1.0 keep their parameter
-- names (complete_callback, get_callback, set_provider, drop_provider) and
-- so does request_refund, whose result columns have the plain names: they
-- are re-created with qualified bodies.  The internal functions and the
-- new public ones (provider_secret, set_platform_keys) that had p_
-- parameters are dropped and created again, since CREATE OR REPLACE cannot
-- rename a parameter.

CREATE OR REPLACE FUNCTION callback_center.complete_callback(
    p_biz_id text, p_callback_type text, p_succeeded boolean,
    p_result jsonb DEFAULT NULL)
RETURNS smallint
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.callback_record;
    v_status smallint;
BEGIN
    PERFORM callback_center._require_key(complete_callback.p_biz_id, 'biz_id');
    PERFORM callback_center._require_key(complete_callback.p_callback_type, 'callback_type');
    PERFORM callback_center._require(complete_callback.p_succeeded, 'succeeded');
    v_status := CASE WHEN complete_callback.p_succeeded THEN 2 ELSE 3 END;

    SELECT * INTO r FROM callback_center.callback_record c
     WHERE c.biz_id = complete_callback.p_biz_id AND c.callback_type = complete_callback.p_callback_type
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB021',
            MESSAGE = format('unknown callback (%s, %s)', complete_callback.p_biz_id, complete_callback.p_callback_type),
            HINT = 'Record the callback with callback_center.record_callback() first.';
    END IF;

    IF r.status IN (2, 3) THEN
        IF r.status = v_status THEN
            RETURN r.status;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('callback (%s, %s) is already completed', complete_callback.p_biz_id, complete_callback.p_callback_type),
            DETAIL = format('It completed as %s and cannot now complete as %s.',
                            CASE r.status WHEN 2 THEN 'succeeded' ELSE 'failed' END,
                            CASE v_status WHEN 2 THEN 'succeeded' ELSE 'failed' END);
    END IF;

    UPDATE callback_center.callback_record c
       SET status = v_status, result = complete_callback.p_result,
           completed_at = now(), updated_at = now()
     WHERE c.id = r.id;
    RETURN v_status;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.get_callback(p_biz_id text, p_callback_type text)
RETURNS callback_center.callback_record
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.callback_record;
BEGIN
    PERFORM callback_center._require_key(get_callback.p_biz_id, 'biz_id');
    PERFORM callback_center._require_key(get_callback.p_callback_type, 'callback_type');
    SELECT * INTO r FROM callback_center.callback_record c
     WHERE c.biz_id = get_callback.p_biz_id AND c.callback_type = get_callback.p_callback_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB021',
            MESSAGE = format('unknown callback (%s, %s)', get_callback.p_biz_id, get_callback.p_callback_type);
    END IF;
    RETURN r;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.set_provider(
    p_name text, p_scheme text, p_secrets text[],
    p_tolerance interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    PERFORM callback_center._require_key(set_provider.p_name, 'provider', 63);
    PERFORM callback_center._require(set_provider.p_scheme, 'scheme');
    IF set_provider.p_secrets IS NULL AND set_provider.p_scheme = 'unionpay' THEN
        -- UnionPay has no shared secret: what is kept is the organisation
        -- its signing certificates name.
        set_provider.p_secrets := ARRAY['中国银联股份有限公司'];
    ELSIF set_provider.p_secrets IS NULL AND set_provider.p_scheme = 'alipay' THEN
        -- Alipay's certificate mode: no public key, the certificates come
        -- with set_platform_keys.
        set_provider.p_secrets := '{}';
    ELSIF set_provider.p_secrets IS NULL THEN
        set_provider.p_secrets := ARRAY[callback_center.new_webhook_secret()];
    END IF;
    -- Payment channels (45_channels.sql): wechatpay_v3, wechatpay_v2, alipay, unionpay.
    IF set_provider.p_scheme NOT IN ('standard_webhooks', 'stripe', 'wechatpay_v3', 'wechatpay_v2', 'alipay',
                        'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('unknown signature scheme "%s"', set_provider.p_scheme),
            HINT = 'The schemes are standard_webhooks, stripe, wechatpay_v3, wechatpay_v2, alipay and unionpay.';
    END IF;
    IF (cardinality(set_provider.p_secrets) = 0 AND set_provider.p_scheme <> 'alipay')
       OR array_position(set_provider.p_secrets, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'secrets must hold at least one secret and no nulls';
    END IF;
    IF set_provider.p_tolerance <= interval '0' OR set_provider.p_tolerance > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'tolerance must be positive and at most 100 years',
            DETAIL = format('The value given was %s.', set_provider.p_tolerance);
    END IF;
    FOREACH s IN ARRAY set_provider.p_secrets LOOP
        IF s = '' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'secrets must not be empty';
        END IF;
        IF set_provider.p_scheme = 'standard_webhooks' THEN
            -- raises 22023 for anything but whsec_<base64>
            PERFORM callback_center.sign_webhook(s, 'probe', 0, '');
        ELSIF set_provider.p_scheme IN ('wechatpay_v3', 'wechatpay_v2', 'alipay', 'unionpay') THEN
            -- Payment channels: the APIv3 key, API key, Alipay public key,
            -- UnionPay organisation name (22023)
            PERFORM callback_center._channel_check_secret(set_provider.p_scheme, s);
        END IF;
    END LOOP;

    INSERT INTO callback_center.providers (name, scheme, secrets, tolerance)
    VALUES (set_provider.p_name, set_provider.p_scheme, set_provider.p_secrets, set_provider.p_tolerance)
    ON CONFLICT (name) DO UPDATE
       SET scheme = EXCLUDED.scheme, secrets = EXCLUDED.secrets,
           tolerance = EXCLUDED.tolerance;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.drop_provider(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(drop_provider.p_name, 'name');
    DELETE FROM callback_center.providers p WHERE p.name = drop_provider.p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', drop_provider.p_name);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center.request_refund(
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

CREATE OR REPLACE FUNCTION callback_center._apply_refund_answer(refund_id text, answer jsonb)
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

CREATE OR REPLACE FUNCTION callback_center.delivery_stats(window_len interval DEFAULT '1 hour')
RETURNS TABLE (
    endpoint text,
    enabled boolean,
    delivered bigint,
    failed_attempts bigint,
    retries bigint,
    failure_rate double precision,
    dead bigint,
    pending bigint,
    p50_ms double precision,
    p95_ms double precision,
    p99_ms double precision,
    breaker text,
    breaker_opened_at timestamptz,
    tokens double precision,
    degraded boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    -- plpgsql, not sql, only for this check: a NULL window returned
    -- every endpoint with nothing counted.
    PERFORM callback_center._require(delivery_stats.window_len, 'window_len');
    RETURN QUERY
    SELECT e.name, e.enabled,
           coalesce(a.delivered, 0), coalesce(a.failed, 0), coalesce(a.retries, 0),
           CASE WHEN coalesce(a.total, 0) = 0 THEN 0 ELSE a.failed::float8 / a.total END,
           coalesce(q.dead, 0), coalesce(q.pending, 0),
           a.p50, a.p95, a.p99,
           coalesce(s.breaker, 'closed'), s.opened_at, s.tokens, coalesce(s.degraded, false)
      FROM callback_center.endpoints e
      LEFT JOIN LATERAL (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE d.http_status BETWEEN 200 AND 299) AS delivered,
               count(*) FILTER (WHERE d.http_status IS NULL OR d.http_status NOT BETWEEN 200 AND 299) AS failed,
               count(*) FILTER (WHERE d.attempt > 1) AS retries,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY d.latency_ms) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY d.latency_ms) AS p95,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY d.latency_ms) AS p99
          FROM callback_center.delivery_attempts d
         WHERE d.endpoint_id = e.id AND d.attempted_at >= now() - delivery_stats.window_len) a ON true
      LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE o.status = 'dead') AS dead,
               count(*) FILTER (WHERE o.status IN ('pending', 'delivering')) AS pending
          FROM callback_center.outbox o
         WHERE o.endpoint_id = e.id AND o.status IN ('pending', 'delivering', 'dead')) q ON true
      LEFT JOIN callback_center.endpoint_state s ON s.endpoint_id = e.id
     ORDER BY e.name;
END
$$;

DROP FUNCTION callback_center.provider_secret(text);

CREATE FUNCTION callback_center.provider_secret(name text)
RETURNS text
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    PERFORM callback_center._require_key(provider_secret.name, 'provider', 63);
    SELECT p.secrets[1] INTO s FROM callback_center.providers p WHERE p.name = provider_secret.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', provider_secret.name);
    END IF;
    RETURN s;
END
$$;

COMMENT ON FUNCTION callback_center.provider_secret(text) IS
    'The first secret of a webhook provider, to configure on its side (admin)';

REVOKE ALL ON FUNCTION callback_center.provider_secret(text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center.provider_secret(text) TO callback_center_admin;

DROP FUNCTION callback_center._channel_check_secret(text, text);

CREATE FUNCTION callback_center._channel_check_secret(scheme text, secret text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF _channel_check_secret.scheme = 'wechatpay_v3' THEN
        IF octet_length(convert_to(_channel_check_secret.secret, 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid APIv3 key',
                DETAIL = format('The key is %s bytes; WeChat Pay APIv3 keys are 32.',
                                octet_length(convert_to(_channel_check_secret.secret, 'UTF8'))),
                HINT = 'Give the APIv3 key set in the merchant platform; platform certificates go to callback_center.set_platform_keys().';
        END IF;
    ELSIF _channel_check_secret.scheme = 'wechatpay_v2' THEN
        IF octet_length(convert_to(regexp_replace(_channel_check_secret.secret, '^md5:', ''), 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid API key',
                DETAIL = format('The key is %s bytes; WeChat Pay API keys are 32.',
                                octet_length(convert_to(regexp_replace(_channel_check_secret.secret, '^md5:', ''), 'UTF8'))),
                HINT = 'Give the API key set in the merchant platform, with md5: before it to accept the legacy MD5 sign.';
        END IF;
    ELSIF _channel_check_secret.scheme = 'alipay' THEN
        -- raises 22023 for a malformed key, not RSA, under 2048 bits
        PERFORM callback_center._key_info(_channel_check_secret.secret);
    ELSIF _channel_check_secret.scheme = 'unionpay' THEN
        -- The organisation the signing certificate names (the third
        -- "@" field of its common name, as UnionPay's SDK reads it).
        IF length(_channel_check_secret.secret) > 128 OR _channel_check_secret.secret ~ '[@[:cntrl:]]' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid UnionPay organisation name',
                DETAIL = 'The name is at most 128 characters, without "@" or control characters.',
                HINT = 'Give the organisation of UnionPay''s signing certificates, 中国银联股份有限公司 (the default when secrets are NULL); the certificates go to callback_center.set_platform_keys().';
        END IF;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION callback_center._channel_check_secret(text, text) FROM PUBLIC;

DROP FUNCTION callback_center.set_platform_keys(text, jsonb);

CREATE FUNCTION callback_center.set_platform_keys(provider text, keys jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    k record;
    info record;
    chk record;
    cas text[];
    why text;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(num_nulls(set_platform_keys.provider, set_platform_keys.keys) = 0 OR NULL, 'provider and keys');
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = set_platform_keys.provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_platform_keys.provider),
            HINT = 'Create it first with callback_center.set_provider(name, ''wechatpay_v3'', ARRAY[apiv3_key]) or set_provider(name, ''unionpay'', NULL).';
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'unionpay', 'alipay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not wechatpay_v3, unionpay or alipay', set_platform_keys.provider, v_scheme);
    END IF;
    IF jsonb_typeof(set_platform_keys.keys) <> 'object' OR set_platform_keys.keys = '{}' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'keys must be a non-empty JSON object of serial to PEM';
    END IF;

    DELETE FROM callback_center.provider_keys pk WHERE pk.provider = set_platform_keys.provider;
    FOR k IN SELECT e.key, e.value FROM jsonb_each(set_platform_keys.keys) e ORDER BY e.key LOOP
        IF jsonb_typeof(k.value) <> 'string' OR k.key = '' OR length(k.key) > 128 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid platform key',
                DETAIL = 'Every key needs a non-empty serial of at most 128 characters and a PEM string.';
        END IF;
        BEGIN
            info := callback_center._key_info(k.value #>> '{}');
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = why,
                HINT = 'Give the platform certificate or platform public key as PEM.';
        END;
        IF v_scheme = 'wechatpay_v3' AND info.kind = 'certificate' AND upper(k.key) <> info.serial THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = 'The certificate''s serial number is not the name it is given.',
                HINT = 'Name each certificate by its serial number in hex, as the Wechatpay-Serial header carries it.';
        END IF;
        IF v_scheme = 'unionpay' AND info.kind <> 'certificate' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid UnionPay certificate "%s"', k.key),
                DETAIL = 'UnionPay''s root and intermediate are X.509 certificates, not public keys.';
        END IF;
        IF v_scheme = 'alipay' AND (info.kind <> 'certificate'
                                    OR k.key <> callback_center.alipay_cert_sn(k.value #>> '{}')) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid Alipay certificate "%s"', k.key),
                DETAIL = CASE WHEN info.kind <> 'certificate'
                              THEN 'Certificate mode takes X.509 certificates; give a public key to callback_center.set_provider().'
                              ELSE 'The certificate''s SN is not the name it is given.' END,
                HINT = 'Name each certificate by its SN, callback_center.alipay_cert_sn(pem).';
        END IF;
        INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)
        VALUES (set_platform_keys.provider, k.key, info.kind, k.value #>> '{}', info.not_after);
        n := n + 1;
    END LOOP;

    IF v_scheme IN ('unionpay', 'alipay') THEN
        -- Every certificate must chain to a self-signed root among them
        -- (a root chains to itself), or no notification ever verifies.
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
          FROM callback_center.provider_keys pk WHERE pk.provider = set_platform_keys.provider;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = set_platform_keys.provider ORDER BY pk.key_id LOOP
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    MESSAGE = format('invalid %s certificate "%s"',
                                     CASE v_scheme WHEN 'alipay' THEN 'Alipay' ELSE 'UnionPay' END, k.key_id),
                    DETAIL = chk.detail,
                    HINT = CASE v_scheme
                        WHEN 'alipay' THEN 'Load the Alipay public-key certificate with the intermediate it holds (alipayCertPublicKey_RSA2.crt) and the RSA root certificates of alipayRootCert.crt together.'
                        ELSE 'Load the UnionPay root certificate and the intermediate certificate together (acp_prod_root.cer and acp_prod_middle.cer of the SDK).' END;
            END IF;
        END LOOP;
    END IF;
    RETURN n;
END
$$;

COMMENT ON FUNCTION callback_center.set_platform_keys(text, jsonb) IS
    'Replaces a wechatpay_v3 provider''s platform certificates and public keys, by serial, a unionpay provider''s root and intermediate certificates, or an alipay provider''s certificates, by SN (admin)';

REVOKE ALL ON FUNCTION callback_center.set_platform_keys(text, jsonb) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center.set_platform_keys(text, jsonb) TO callback_center_admin;

DROP FUNCTION callback_center._channel_header(jsonb, text);

CREATE FUNCTION callback_center._channel_header(headers jsonb, name text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v text[];
BEGIN
    IF jsonb_typeof(_channel_header.headers) <> 'object' THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(CASE WHEN jsonb_typeof(h.value) = 'string' THEN h.value #>> '{}' END)
      INTO v
      FROM jsonb_each(_channel_header.headers) h WHERE lower(h.key) = lower(_channel_header.name);
    IF cardinality(v) > 1 THEN
        RETURN '';
    END IF;
    RETURN v[1];
END
$$;

REVOKE ALL ON FUNCTION callback_center._channel_header(jsonb, text) FROM PUBLIC;

DROP FUNCTION callback_center._channel_answer(text, boolean, integer, text);

CREATE FUNCTION callback_center._channel_answer(
    scheme text, ok boolean, status integer, reason text,
    OUT http_status integer, OUT response_body text)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF _channel_answer.scheme = 'wechatpay_v3' THEN
        -- WeChat Pay: 200 or 204 with no body acknowledges; any 4xx/5xx
        -- with {"code":"FAIL","message":...} makes it resend.
        IF _channel_answer.ok THEN
            http_status := 200;
            response_body := '';
        ELSE
            http_status := _channel_answer.status;
            response_body := jsonb_build_object('code', 'FAIL', 'message', _channel_answer.reason)::text;
        END IF;
    ELSIF _channel_answer.scheme = 'wechatpay_v2' THEN
        -- WeChat Pay v2: return_code SUCCESS acknowledges; FAIL (or no
        -- answer) makes it resend.
        http_status := CASE WHEN _channel_answer.ok THEN 200 ELSE _channel_answer.status END;
        response_body := format('<xml><return_code><![CDATA[%s]]></return_code>'
                                '<return_msg><![CDATA[%s]]></return_msg></xml>',
                                CASE WHEN _channel_answer.ok THEN 'SUCCESS' ELSE 'FAIL' END,
                                CASE WHEN _channel_answer.ok THEN 'OK' ELSE _channel_answer.reason END);
    ELSIF _channel_answer.scheme = 'alipay' THEN
        -- Alipay: the exact body "success" acknowledges; anything else
        -- makes it resend.
        http_status := CASE WHEN _channel_answer.ok THEN 200 ELSE _channel_answer.status END;
        response_body := CASE WHEN _channel_answer.ok THEN 'success' ELSE 'fail' END;
    ELSIF _channel_answer.scheme = 'unionpay' THEN
        -- UnionPay: HTTP 200 acknowledges (the acp SDK's demo answers
        -- "ok"); any other status makes it resend.
        http_status := CASE WHEN _channel_answer.ok THEN 200 ELSE _channel_answer.status END;
        response_body := CASE WHEN _channel_answer.ok THEN 'ok' ELSE 'fail' END;
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', _channel_answer.scheme);
    END IF;
END
$$;

REVOKE ALL ON FUNCTION callback_center._channel_answer(text, boolean, integer, text) FROM PUBLIC;

DROP FUNCTION callback_center._channel_tolerance(interval);

CREATE FUNCTION callback_center._channel_tolerance(tolerance interval)
RETURNS interval
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    RETURN coalesce(_channel_tolerance.tolerance,
                    current_setting('callback_center.signature_tolerance', true)::interval,
                    interval '300 seconds');
END
$$;

REVOKE ALL ON FUNCTION callback_center._channel_tolerance(interval) FROM PUBLIC;

DROP FUNCTION callback_center._wechatpay_v3_parse(text, text[], interval, jsonb, text);

CREATE FUNCTION callback_center._wechatpay_v3_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ts text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Timestamp');
    nonce text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Nonce');
    sig_b64 text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Signature');
    serial text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Serial');
    sig_type text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Signature-Type');
    sig bytea;
    key_pem text;
    why text;
    ev jsonb;
    res jsonb;
    plain bytea;
    tx jsonb;
    s text;
    total text;
BEGIN
    payload := _wechatpay_v3_parse.body;
    IF nullif(ts, '') IS NULL OR nullif(nonce, '') IS NULL
       OR nullif(sig_b64, '') IS NULL OR nullif(serial, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF sig_type IS NOT NULL AND sig_type <> 'WECHATPAY2-SHA256-RSA2048' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF ts !~ '^[0-9]{1,12}$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF abs(extract(epoch FROM now()) - ts::bigint)
       > extract(epoch FROM callback_center._channel_tolerance(_wechatpay_v3_parse.tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(sig_b64, 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    IF NOT EXISTS (SELECT 1 FROM callback_center.provider_keys pk WHERE pk.provider = _wechatpay_v3_parse.provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no platform keys', _wechatpay_v3_parse.provider),
            HINT = 'An administrator loads them with callback_center.set_platform_keys().';
    END IF;
    SELECT pk.pem INTO key_pem FROM callback_center.provider_keys pk
     WHERE pk.provider = _wechatpay_v3_parse.provider AND pk.key_id = serial;
    IF NOT FOUND THEN
        failure := 'unknown_key'; fail_status := 401;
        RETURN;
    END IF;
    why := callback_center._rsa_sha256_check(key_pem,
        convert_to(ts || E'\n' || nonce || E'\n' || _wechatpay_v3_parse.body || E'\n', 'UTF8'), sig);
    IF why IS NOT NULL THEN
        failure := CASE WHEN why LIKE '%expired%' OR why LIKE '%not valid yet%'
                        THEN 'key_expired' ELSE 'invalid_signature' END;
        fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    BEGIN
        ev := _wechatpay_v3_parse.body::jsonb;
    EXCEPTION WHEN OTHERS THEN
        ev := NULL;
    END;
    res := ev->'resource';
    msg_id := ev->>'id';
    event_type := ev->>'event_type';
    IF jsonb_typeof(ev) IS DISTINCT FROM 'object' OR nullif(msg_id, '') IS NULL
       OR jsonb_typeof(res) IS DISTINCT FROM 'object'
       OR res->>'algorithm' IS DISTINCT FROM 'AEAD_AES_256_GCM'
       OR res->>'ciphertext' IS NULL OR res->>'nonce' IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    FOREACH s IN ARRAY _wechatpay_v3_parse.secrets LOOP
        BEGIN
            plain := callback_center._aes256gcm_decrypt(convert_to(s, 'UTF8'),
                convert_to(res->>'nonce', 'UTF8'),
                convert_to(coalesce(res->>'associated_data', ''), 'UTF8'),
                decode(res->>'ciphertext', 'base64'));
        EXCEPTION WHEN invalid_parameter_value THEN
            plain := NULL;
        END;
        EXIT WHEN plain IS NOT NULL;
    END LOOP;
    IF plain IS NULL THEN
        failure := 'decryption_failed'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        tx := convert_from(plain, 'UTF8')::jsonb;
    EXCEPTION WHEN OTHERS THEN
        tx := NULL;
    END;
    IF jsonb_typeof(tx) IS DISTINCT FROM 'object' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    -- Refunds (original_type refund, REFUND.SUCCESS / ABNORMAL / CLOSED):
    -- order_id is our refund id (out_refund_no), txn_id WeChat Pay's
    -- refund_id, amount_cents amount.refund; ABNORMAL (the money could
    -- not reach the buyer; the merchant settles it in the merchant
    -- platform) keeps the refund open.
    IF res->>'original_type' = 'refund' AND coalesce(event_type, '') LIKE 'REFUND.%' THEN
        order_id := tx->>'out_refund_no';
        txn_id := tx->>'refund_id';
        verdict := CASE tx->>'refund_status'
            WHEN 'SUCCESS' THEN 'refund_success'
            WHEN 'CLOSED' THEN 'refund_failed'
            WHEN 'ABNORMAL' THEN 'refund_processing' END;
        total := tx->'amount'->>'refund';
        IF verdict IS NULL OR nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
           OR total IS NULL OR total !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
        RETURN;
    END IF;
    -- Only transactions move payments; other resources are acknowledged
    -- and recorded (verdict NULL).
    IF coalesce(res->>'original_type', 'transaction') = 'transaction'
       AND coalesce(event_type, '') LIKE 'TRANSACTION.%' THEN
        order_id := tx->>'out_trade_no';
        txn_id := tx->>'transaction_id';
        verdict := CASE tx->>'trade_state'
            WHEN 'SUCCESS' THEN 'success'
            WHEN 'CLOSED' THEN 'failure'
            WHEN 'REVOKED' THEN 'failure'
            WHEN 'PAYERROR' THEN 'failure' END;
        total := tx->'amount'->>'total';
        currency := tx->'amount'->>'currency';
        IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                    OR total IS NULL OR total !~ '^[0-9]{1,15}$'
                                    OR nullif(currency, '') IS NULL) THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION callback_center._wechatpay_v3_parse(text, text[], interval, jsonb, text) FROM PUBLIC;

DROP FUNCTION callback_center._form_parse(text);

CREATE FUNCTION callback_center._form_parse(body text, OUT names text[], OUT vals bytea[])
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    pair text;
    eq integer;
    n bytea;
    v bytea;
    nm text;
BEGIN
    IF _form_parse.body = '' THEN
        RETURN;
    END IF;
    names := '{}';
    vals := '{}';
    FOREACH pair IN ARRAY string_to_array(_form_parse.body, '&') LOOP
        CONTINUE WHEN pair = '';
        eq := strpos(pair, '=');
        IF eq = 0 THEN
            n := callback_center._form_decode(pair);
            v := '';
        ELSE
            n := callback_center._form_decode(left(pair, eq - 1));
            v := callback_center._form_decode(substr(pair, eq + 1));
        END IF;
        IF n IS NULL OR v IS NULL OR encode(n, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e])+$' THEN
            names := NULL; vals := NULL;
            RETURN;
        END IF;
        nm := convert_from(n, 'UTF8');
        IF nm = ANY (names) THEN
            names := NULL; vals := NULL;
            RETURN;
        END IF;
        names := names || nm;
        vals := vals || v;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION callback_center._form_parse(text) FROM PUBLIC;

DROP FUNCTION callback_center._alipay_parse(text, text[], interval, jsonb, text);

CREATE FUNCTION callback_center._alipay_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    texts text[];
    cert_sn text;
    cas text[];
    k record;
    chk record;
    candidates integer := 0;
    chain_failure text;
    charset text := 'UTF8';
    cs text;
    content bytea;
    sig bytea;
    ok boolean := false;
    s text;
    f jsonb := '{}';
    notify_time timestamptz;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_alipay_parse.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'charset')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs IN ('GBK', 'GB2312') THEN 'GBK'
                    WHEN cs = 'GB18030' THEN 'GB18030' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- Characters of a text body beyond ASCII were decoded by the web tier:
    -- on the wire they were the bytes of the form's charset.
    IF charset <> 'UTF8' AND _alipay_parse.body ~ '[^\x01-\x7f]' THEN
        BEGIN
            SELECT f.names, f.vals INTO names, vals
              FROM callback_center._form_parse(
                       callback_center._form_escape(convert_to(_alipay_parse.body, charset))) f;
        EXCEPTION WHEN untranslatable_character THEN
            names := NULL;
        END;
        IF names IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
    END IF;
    -- Every value decoded from the charset before anything is verified:
    -- Alipay signs the decoded values (encoded in that charset again, which
    -- gives back the %-decoded bytes), and bytes that are not text in it
    -- were not signed by Alipay.
    BEGIN
        texts := ARRAY(SELECT convert_from(x.v, charset)
                         FROM unnest(vals) WITH ORDINALITY AS x(v, i) ORDER BY x.i);
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF array_position(names, 'sign') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF coalesce(callback_center._channel_ascii(vals[array_position(names, 'sign_type')]), 'RSA2') <> 'RSA2' THEN
        -- RSA (SHA1withRSA) is Alipay's legacy; only RSA2 is accepted.
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'sign')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('sign', 'sign_type') AND x.v <> '';
    -- Public-key mode: the Alipay public keys of secrets.
    FOREACH s IN ARRAY _alipay_parse.secrets LOOP
        ok := ok OR callback_center._rsa_sha256_check(s, coalesce(content, ''), sig) IS NULL;
    END LOOP;
    -- Certificate mode: the Alipay public-key certificates loaded with
    -- set_platform_keys (named by their SN), each checked against the
    -- loaded roots now, since a certificate expires after it was loaded;
    -- alipay_cert_sn, when the notification carries it, names the one.
    -- The roots themselves sign no notification.
    IF NOT ok THEN
        cert_sn := callback_center._channel_ascii(vals[array_position(names, 'alipay_cert_sn')]);
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
         WHERE pk.provider = _alipay_parse.provider;
        IF cas IS NULL AND cardinality(_alipay_parse.secrets) = 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
                MESSAGE = format('provider "%s" has no Alipay public key or certificate', _alipay_parse.provider),
                HINT = 'An administrator gives the Alipay public key to callback_center.set_provider(), or loads the Alipay certificates with callback_center.set_platform_keys().';
        END IF;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = _alipay_parse.provider
                    AND (cert_sn IS NULL OR pk.key_id = cert_sn)
                  ORDER BY pk.key_id LOOP
            CONTINUE WHEN (callback_center._x509_chain_check(k.pem, ARRAY[k.pem], NULL)).verdict = 'ok';
            candidates := candidates + 1;
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                chain_failure := chk.verdict;
            ELSIF callback_center._rsa_sha256_check(k.pem, coalesce(content, ''), sig) IS NULL THEN
                ok := true;
                EXIT;
            END IF;
        END LOOP;
        IF NOT ok THEN
            failure := CASE WHEN cert_sn IS NOT NULL AND cas IS NOT NULL AND candidates = 0
                            THEN 'unknown_key'
                            WHEN chain_failure = 'expired' THEN 'key_expired'
                            WHEN chain_failure IS NOT NULL THEN 'untrusted_key'
                            ELSE 'invalid_signature' END;
            fail_status := 401;
            RETURN;
        END IF;
    END IF;

    -- Signed by Alipay: from here on a problem is the body's.
    SELECT jsonb_object_agg(x.nm, x.t)
      INTO f FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm IN ('notify_id', 'notify_time', 'notify_type', 'out_trade_no',
                    'trade_no', 'trade_status', 'total_amount', 'trans_currency',
                    'out_biz_no', 'refund_fee', 'gmt_refund');
    SELECT string_agg(x.nm || '=' || x.t, '&' ORDER BY x.nm COLLATE "C")
      INTO payload FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm NOT IN ('sign', 'sign_type', 'notify_time');
    msg_id := f->>'notify_id';
    event_type := f->>'notify_type';
    IF nullif(msg_id, '') IS NULL
       OR coalesce(f->>'notify_time', '') !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        notify_time := (f->>'notify_time')::timestamp AT TIME ZONE 'Asia/Shanghai';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF abs(extract(epoch FROM now() - notify_time))
       > extract(epoch FROM callback_center._channel_tolerance(_alipay_parse.tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;

    -- A refund arrives as a trade notification carrying refund_fee and
    -- gmt_refund (TRADE_SUCCESS after a partial refund, TRADE_CLOSED after
    -- a full one), out_biz_no naming the refund (our out_request_no), and
    -- only once it succeeded.  order_id is our refund id; txn_id NULL
    -- (Alipay gives a refund no id of its own).  refund_fee is the
    -- trade's total refunded so far, not this refund's amount: not
    -- compared (amount_cents NULL); reconciliation compares amounts.
    IF f ? 'gmt_refund' OR f ? 'refund_fee' THEN
        order_id := f->>'out_biz_no';
        verdict := 'refund_success';
        IF nullif(order_id, '') IS NULL OR nullif(f->>'trade_no', '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
        END IF;
        RETURN;
    END IF;
    order_id := f->>'out_trade_no';
    txn_id := f->>'trade_no';
    verdict := CASE f->>'trade_status'
        WHEN 'TRADE_SUCCESS' THEN 'success'
        WHEN 'TRADE_FINISHED' THEN 'success'
        WHEN 'TRADE_CLOSED' THEN 'failure' END;
    currency := coalesce(nullif(f->>'trans_currency', ''), 'CNY');
    total := f->>'total_amount';
    IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                OR total IS NULL
                                OR total !~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$') THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    IF total ~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$' THEN
        amount_cents := (total::numeric * 100)::bigint;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION callback_center._alipay_parse(text, text[], interval, jsonb, text) FROM PUBLIC;

DROP FUNCTION callback_center._wechatpay_v2_parse(text, text[], interval, jsonb, text);

CREATE FUNCTION callback_center._wechatpay_v2_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    doc xml;
    f jsonb;
    n integer;
    content text;
    given text;
    sign_type text;
    s text;
    key text;
    calc text;
    ok boolean := false;
    crypto_schema name;
    ct bytea;
    plain bytea;
    r jsonb;
BEGIN
    payload := _wechatpay_v2_parse.body;
    IF position('<!' IN regexp_replace(_wechatpay_v2_parse.body, '<!\[CDATA\[', '', 'g')) > 0 THEN
        -- No DTD, no comments: WeChat sends neither.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        doc := xmlparse(DOCUMENT _wechatpay_v2_parse.body);
        SELECT jsonb_object_agg(x.name, coalesce(x.value, '')), count(*)
          INTO f, n
          FROM XMLTABLE('/xml/*' PASSING doc
                        COLUMNS name text PATH 'local-name()', value text PATH 'string(.)') x;
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF f IS NULL OR n <> (SELECT count(*) FROM jsonb_object_keys(f)) THEN
        -- A parameter twice.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- A refund notification carries no sign: req_info is AES-256-ECB
    -- (PKCS#7 padding) under the lower-case hex MD5 of the API key, and
    -- only the key opens it (WeChat Pay authenticates refund notifications
    -- so, and no other way).  Read: order_id our refund id (out_refund_no),
    -- txn_id WeChat Pay's refund_id, amount_cents refund_fee; refund_status
    -- SUCCESS refunded, REFUNDCLOSE failed, CHANGE (abnormal: settled in
    -- the merchant platform) still open.  Keyed by refund_id and status.
    IF f ? 'req_info' AND NOT f ? 'sign' THEN
        BEGIN
            ct := decode(f->>'req_info', 'base64');
        EXCEPTION WHEN OTHERS THEN
            ct := NULL;
        END;
        IF ct IS NULL OR ct = '' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        -- pgcrypto is relocatable: find where it lives.
        SELECT x.nspname INTO crypto_schema
          FROM pg_extension e JOIN pg_namespace x ON x.oid = e.extnamespace
         WHERE e.extname = 'pgcrypto';
        FOREACH s IN ARRAY _wechatpay_v2_parse.secrets LOOP
            BEGIN
                EXECUTE format('SELECT %I.decrypt($1, $2, %L)', crypto_schema, 'aes-ecb/pad:pkcs')
                   INTO plain USING ct, convert_to(md5(regexp_replace(s, '^md5:', '')), 'UTF8');
                IF position('<!' IN regexp_replace(convert_from(plain, 'UTF8'), '<!\[CDATA\[', '', 'g')) > 0 THEN
                    plain := NULL;
                END IF;
                SELECT jsonb_object_agg(x.name, coalesce(x.value, '')) INTO r
                  FROM XMLTABLE('/root/*' PASSING xmlparse(DOCUMENT convert_from(plain, 'UTF8'))
                                COLUMNS name text PATH 'local-name()', value text PATH 'string(.)') x;
            EXCEPTION WHEN OTHERS THEN
                r := NULL;
            END;
            EXIT WHEN r IS NOT NULL;
        END LOOP;
        IF r IS NULL THEN
            -- Nothing but the key makes a req_info that opens.
            failure := 'invalid_signature'; fail_status := 401;
            RETURN;
        END IF;
        order_id := r->>'out_refund_no';
        txn_id := r->>'refund_id';
        verdict := CASE r->>'refund_status' WHEN 'SUCCESS' THEN 'refund_success'
                                            WHEN 'REFUNDCLOSE' THEN 'refund_failed'
                                            WHEN 'CHANGE' THEN 'refund_processing' END;
        event_type := 'refund ' || coalesce(r->>'refund_status', '');
        msg_id := 'refund:' || (r->>'refund_id') || ':' || (r->>'refund_status');
        IF f->>'return_code' IS DISTINCT FROM 'SUCCESS' OR verdict IS NULL
           OR nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
           OR coalesce(r->>'refund_fee', '') !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := (r->>'refund_fee')::bigint;
        RETURN;
    END IF;
    given := f->>'sign';
    IF nullif(given, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    sign_type := coalesce(nullif(f->>'sign_type', ''), 'HMAC-SHA256');
    IF sign_type NOT IN ('HMAC-SHA256', 'MD5') THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(e.key || '=' || e.value, '&' ORDER BY e.key COLLATE "C")
      INTO content
      FROM jsonb_each_text(f) e WHERE e.key <> 'sign' AND e.value <> '';
    FOREACH s IN ARRAY _wechatpay_v2_parse.secrets LOOP
        key := regexp_replace(s, '^md5:', '');
        IF sign_type = 'HMAC-SHA256' THEN
            calc := upper(encode(callback_center._hmac_sha256(convert_to(key, 'UTF8'),
                convert_to(content || '&key=' || key, 'UTF8')), 'hex'));
        ELSIF s LIKE 'md5:%' THEN
            calc := upper(md5(convert_to(content || '&key=' || key, 'UTF8')));
        ELSE
            CONTINUE;
        END IF;
        -- Compared as digests: the time taken says nothing about the sign.
        ok := ok OR sha256(convert_to(calc, 'UTF8')) = sha256(convert_to(upper(given), 'UTF8'));
    END LOOP;
    IF NOT ok THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    IF f->>'return_code' IS DISTINCT FROM 'SUCCESS' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := f->>'transaction_id';
    txn_id := f->>'transaction_id';
    order_id := f->>'out_trade_no';
    event_type := coalesce(f->>'trade_type', 'payment');
    -- result_code FAIL is one failed attempt: the order stays payable.
    verdict := CASE f->>'result_code' WHEN 'SUCCESS' THEN 'success'
                                      WHEN 'FAIL' THEN 'attempt_failed' END;
    currency := coalesce(nullif(f->>'fee_type', ''), 'CNY');
    IF nullif(msg_id, '') IS NULL OR nullif(order_id, '') IS NULL OR verdict IS NULL
       OR coalesce(f->>'total_fee', '') !~ '^[0-9]{1,15}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    amount_cents := (f->>'total_fee')::bigint;
END
$$;

REVOKE ALL ON FUNCTION callback_center._wechatpay_v2_parse(text, text[], interval, jsonb, text) FROM PUBLIC;

DROP FUNCTION callback_center._unionpay_parse(text, text[], interval, jsonb, text);

CREATE FUNCTION callback_center._unionpay_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    charset text;
    cs text;
    cert bytea;
    cert_pem text;
    content bytea;
    sig bytea;
    cas text[];
    chk record;
    f jsonb;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_unionpay_parse.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'encoding')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs = 'GBK' THEN 'GBK' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- signMethod 01 of version 5.1.0 only: 5.0.0 signs SHA-1 digests with
    -- a certificate chosen by certId, 11 and 12 are symmetric keys.
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        sig := NULL;
    END;
    IF sig IS NULL OR sig = '' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- In a fixed order: the certificate cache (crypto.c) is keyed by them.
    SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = _unionpay_parse.provider;
    IF cas IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no UnionPay certificates', _unionpay_parse.provider),
            HINT = 'An administrator loads the root and intermediate certificates with callback_center.set_platform_keys().';
    END IF;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, cas, _unionpay_parse.secrets);
    IF chk.verdict <> 'ok' THEN
        failure := CASE chk.verdict WHEN 'malformed' THEN 'malformed_signature'
                                    WHEN 'expired' THEN 'key_expired'
                                    WHEN 'wrong_name' THEN 'wrong_organisation'
                                    ELSE 'untrusted_key' END;
        fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by UnionPay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('orderId', 'queryId', 'txnType', 'txnSubType', 'respCode',
                        'txnAmt', 'currencyCode', 'origQryId');
        -- What a resend repeats: the signed parameters but the certificate
        -- (UnionPay may sign a resend under its next certificate).
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('signature', 'signPubKeyCert') AND x.v <> '';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF nullif(f->>'queryId', '') IS NULL OR nullif(f->>'txnType', '') IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := (f->>'queryId') || ':' || (f->>'txnType');
    event_type := 'txnType ' || (f->>'txnType') || coalesce('/' || (f->>'txnSubType'), '');
    IF f->>'txnType' = '01' THEN
        -- Consumption: respCode 00 (success) and A6 (success with a
        -- defect) pay; any other is one failed attempt.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'success' ELSE 'attempt_failed' END;
        -- ISO 4217 numeric codes.
        currency := CASE f->>'currencyCode'
            WHEN '156' THEN 'CNY' WHEN '344' THEN 'HKD' WHEN '446' THEN 'MOP'
            WHEN '901' THEN 'TWD' WHEN '840' THEN 'USD' WHEN '978' THEN 'EUR'
            WHEN '826' THEN 'GBP' WHEN '392' THEN 'JPY' WHEN '410' THEN 'KRW'
            WHEN '702' THEN 'SGD' WHEN '036' THEN 'AUD' WHEN '124' THEN 'CAD'
            ELSE f->>'currencyCode' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$'
           OR nullif(currency, '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    IF f->>'txnType' = '04' THEN
        -- Refund (back notification): orderId is the refund's own order
        -- id, our refund id; queryId UnionPay's id of the refund; txnAmt
        -- its amount.  respCode 00 and A6 refunded; any other failed.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'refund_success' ELSE 'refund_failed' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    -- Other transaction types (cancellations 31, ...) are recorded and
    -- acknowledged (verdict NULL).
END
$$;

REVOKE ALL ON FUNCTION callback_center._unionpay_parse(text, text[], interval, jsonb, text) FROM PUBLIC;

DROP FUNCTION callback_center._channel_parse(text, text, jsonb, text);

CREATE FUNCTION callback_center._channel_parse(
    scheme text, provider text, headers jsonb, body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    prov callback_center.providers;
    m record;
    a record;
BEGIN
    PERFORM callback_center._require(num_nulls(_channel_parse.scheme, _channel_parse.provider, _channel_parse.headers, _channel_parse.body) = 0 OR NULL,
                                     'scheme, provider, headers and body');
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = _channel_parse.provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', _channel_parse.provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> _channel_parse.scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', _channel_parse.provider, prov.scheme, _channel_parse.scheme);
    END IF;

    IF _channel_parse.scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                                 _channel_parse.headers, _channel_parse.body);
    ELSIF _channel_parse.scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                                 _channel_parse.headers, _channel_parse.body);
    ELSIF _channel_parse.scheme = 'alipay' THEN
        m := callback_center._alipay_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                           _channel_parse.headers, _channel_parse.body);
    ELSIF _channel_parse.scheme = 'unionpay' THEN
        m := callback_center._unionpay_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                             _channel_parse.headers, _channel_parse.body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', _channel_parse.scheme);
    END IF;

    a := callback_center._channel_answer(_channel_parse.scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
END
$$;

REVOKE ALL ON FUNCTION callback_center._channel_parse(text, text, jsonb, text) FROM PUBLIC;

DROP FUNCTION callback_center._refund_check_answer(text, jsonb);

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

REVOKE ALL ON FUNCTION callback_center._refund_check_answer(text, jsonb) FROM PUBLIC;

DROP FUNCTION callback_center._apply_refund_notification(text, text, text, bigint, text, text);

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

REVOKE ALL ON FUNCTION callback_center._apply_refund_notification(text, text, text, bigint, text, text) FROM PUBLIC;

DROP FUNCTION callback_center._late_refund(bigint, text);

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

REVOKE ALL ON FUNCTION callback_center._late_refund(bigint, text) FROM PUBLIC;

DROP FUNCTION callback_center._note_close_failure(text, text);

CREATE FUNCTION callback_center._note_close_failure(order_id text, error text)
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    retry timestamptz;
BEGIN
    DELETE FROM callback_center.close_failures f
     WHERE NOT EXISTS (SELECT 1 FROM callback_center.orders o
                        WHERE o.order_id = f.order_id AND o.status = 'confirmed'
                          AND o.pay_status IN ('unpaid', 'paying'));
    INSERT INTO callback_center.close_failures AS f
           (order_id, failures, last_error, failed_at, retry_at)
    VALUES (_note_close_failure.order_id, 1, _note_close_failure.error, now(), now() + interval '1 second')
    ON CONFLICT ON CONSTRAINT close_failures_pkey DO UPDATE
       SET failures = f.failures + 1, last_error = excluded.last_error, failed_at = now(),
           retry_at = now() + least(interval '1 second' * power(2, least(f.failures, 20)),
                                    interval '5 minutes')
    RETURNING f.retry_at INTO retry;
    RETURN retry;
END
$$;

REVOKE ALL ON FUNCTION callback_center._note_close_failure(text, text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center._note_close_failure(text, text) TO callback_center_worker;

DROP FUNCTION callback_center._close_order(text);

CREATE FUNCTION callback_center._close_order(order_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    o callback_center.orders;
BEGIN
    SELECT * INTO o FROM callback_center.orders x
     WHERE x.order_id = _close_order.order_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM callback_center.orders x WHERE x.order_id = _close_order.order_id) THEN
            RAISE EXCEPTION USING ERRCODE = 'CB050',
                MESSAGE = format('order "%s" does not exist', _close_order.order_id);
        END IF;
        RETURN false;
    END IF;
    IF NOT (o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')
            AND o.pay_deadline <= now()) THEN
        RETURN false;
    END IF;
    RETURN callback_center._close_locked_orders(ARRAY[o.order_id]) = 1;
END
$$;

REVOKE ALL ON FUNCTION callback_center._close_order(text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center._close_order(text) TO callback_center_worker;

-- ------------------------------------------------------------------------
-- One owner of endpoint options: an endpoint's format is the option
-- "format" of create_endpoint and alter_endpoint (_endpoint_apply checks
-- it with the others); set_endpoint_format, new in 0.2.0, is gone.
-- ------------------------------------------------------------------------

DROP FUNCTION callback_center.set_endpoint_format(text, text);

CREATE OR REPLACE FUNCTION callback_center._endpoint_apply(id integer, options jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    known constant text[] := ARRAY['url', 'event_types', 'timeout_ms',
        'retry_schedule', 'max_attempts', 'rate_limit_per_s',
        'breaker_failure_ratio', 'breaker_window_s', 'breaker_min_requests',
        'breaker_open_ms', 'is_core', 'ordered', 'enabled', 'format'];
    bad text;
    k text;
    v jsonb;
    ep callback_center.endpoints;
    n numeric;
BEGIN
    PERFORM callback_center._require(options, 'options');
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'options must be a JSON object',
            DETAIL = format('A JSON %s was given.', jsonb_typeof(options));
    END IF;
    SELECT string_agg(format('"%s"', o), ', ' ORDER BY o) INTO bad
      FROM jsonb_object_keys(options) o
     WHERE o <> ALL (known);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('unknown endpoint option %s', bad),
            HINT = format('Known options: %s.', array_to_string(known, ', '));
    END IF;

    SELECT * INTO ep FROM callback_center.endpoints e WHERE e.id = _endpoint_apply.id;
    FOR k, v IN SELECT * FROM jsonb_each(options)
    LOOP
        CASE k
        WHEN 'url' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "url" must be a string';
            END IF;
            ep.url := callback_center._check_url(v #>> '{}');
        WHEN 'event_types' THEN
            IF jsonb_typeof(v) <> 'array' OR jsonb_array_length(v) = 0
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(v) x
                           WHERE jsonb_typeof(x) <> 'string' OR x #>> '{}' = '') THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "event_types" must be a non-empty array of non-empty strings';
            END IF;
            ep.event_types := ARRAY(SELECT jsonb_array_elements_text(v));
        WHEN 'timeout_ms' THEN
            ep.timeout_ms := callback_center._option_int(k, v, 1, 600000);
        WHEN 'retry_schedule' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "retry_schedule" must be a string';
            END IF;
            IF NOT EXISTS (SELECT 1 FROM callback_center.retry_schedules s
                            WHERE s.name = v #>> '{}') THEN
                RAISE EXCEPTION USING ERRCODE = '42704',
                    MESSAGE = format('retry schedule "%s" does not exist', v #>> '{}'),
                    HINT = 'The retry_schedules table lists them.';
            END IF;
            ep.retry_schedule := v #>> '{}';
        WHEN 'max_attempts' THEN
            ep.max_attempts := CASE WHEN jsonb_typeof(v) = 'null' THEN NULL
                ELSE callback_center._option_int(k, v, 1, 1000000) END;
        WHEN 'rate_limit_per_s' THEN
            IF jsonb_typeof(v) = 'null' THEN
                ep.rate_limit_per_s := NULL;
            ELSIF jsonb_typeof(v) <> 'number' OR v::numeric < 0.001 OR v::numeric > 1000000 THEN
                -- The worker's token bucket works in doubles: 1e400 was
                -- infinity there and stopped every delivery.
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "rate_limit_per_s" must be a number between 0.001 and 1000000, or null',
                    DETAIL = format('The value given was %s.', left(v::text, 40));
            ELSE
                ep.rate_limit_per_s := v::numeric;
            END IF;
        WHEN 'breaker_failure_ratio' THEN
            IF jsonb_typeof(v) <> 'number' OR v::numeric <= 0 OR v::numeric > 1 THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "breaker_failure_ratio" must be a number in (0, 1]';
            END IF;
            ep.breaker_failure_ratio := v::numeric;
        WHEN 'breaker_window_s' THEN
            ep.breaker_window_s := callback_center._option_int(k, v, 1, 86400);
        WHEN 'breaker_min_requests' THEN
            ep.breaker_min_requests := callback_center._option_int(k, v, 1, 1000000);
        WHEN 'breaker_open_ms' THEN
            ep.breaker_open_ms := callback_center._option_int(k, v, 1, 86400000);
        WHEN 'format' THEN
            -- How requests are shaped: the adapters of 46_adapters.sql.
            IF jsonb_typeof(v) <> 'string' OR v #>> '{}' NOT IN
               ('standard_webhooks', 'wechatpay_v3', 'alipay', 'unionpay') THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('unknown endpoint format %s', v),
                    HINT = 'The formats are standard_webhooks, wechatpay_v3, alipay and unionpay.';
            END IF;
            ep.format := v #>> '{}';
        ELSE
            -- is_core, ordered, enabled
            IF jsonb_typeof(v) <> 'boolean' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('endpoint option "%s" must be true or false', k);
            END IF;
            CASE k
            WHEN 'is_core' THEN ep.is_core := v::boolean;
            WHEN 'ordered' THEN ep.ordered := v::boolean;
            ELSE ep.enabled := v::boolean;
            END CASE;
        END CASE;
    END LOOP;

    UPDATE callback_center.endpoints e
       SET url = ep.url, event_types = ep.event_types, timeout_ms = ep.timeout_ms,
           retry_schedule = ep.retry_schedule, max_attempts = ep.max_attempts,
           rate_limit_per_s = ep.rate_limit_per_s,
           breaker_failure_ratio = ep.breaker_failure_ratio,
           breaker_window_s = ep.breaker_window_s,
           breaker_min_requests = ep.breaker_min_requests,
           breaker_open_ms = ep.breaker_open_ms, is_core = ep.is_core,
           ordered = ep.ordered, enabled = ep.enabled, format = ep.format,
           updated_at = now()
     WHERE e.id = _endpoint_apply.id;
END
$$;

-- ------------------------------------------------------------------------
-- The adapters' shared skeletons: one layout of the request text
-- (_adapter_http, read by src/adapter.c), one signed form POST for Alipay
-- and UnionPay (_adapter_form_post), one shape of the normalized payment
-- and refund answers (_adapter_payment_answer, _adapter_refund_answer).
-- The same requests and answers as before.
-- ------------------------------------------------------------------------

CREATE FUNCTION callback_center._adapter_http(method text, url text, headers text[], body text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT _adapter_http.method || ' ' || _adapter_http.url || E'\n'
        || coalesce((SELECT string_agg(h.line || E'\n', '' ORDER BY h.n)
                       FROM unnest(_adapter_http.headers) WITH ORDINALITY AS h(line, n)), '')
        || E'\n' || _adapter_http.body
$$;

CREATE FUNCTION callback_center._adapter_form_post(url text, provider text, fields jsonb,
    sign_field text, digest boolean, content_type text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    f jsonb := _adapter_form_post.fields;
    signed bytea;
    body text;
BEGIN
    SELECT convert_to(string_agg(x.key || '=' || (x.value #>> '{}'), '&' ORDER BY x.key COLLATE "C"), 'UTF8')
      INTO signed FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    IF _adapter_form_post.digest THEN
        signed := convert_to(encode(sha256(signed), 'hex'), 'UTF8');
    END IF;
    f := f || jsonb_build_object(_adapter_form_post.sign_field,
                                 callback_center._merchant_sign(_adapter_form_post.provider, signed));
    SELECT string_agg(x.key || '=' || callback_center._url_encode(x.value #>> '{}'), '&'
                      ORDER BY x.key COLLATE "C")
      INTO body FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    RETURN callback_center._adapter_http('POST', _adapter_form_post.url,
        ARRAY['Content-Type: ' || _adapter_form_post.content_type], body);
END
$$;

CREATE FUNCTION callback_center._adapter_payment_answer(status text, provider_status text,
    txn_id text, amount_cents bigint, currency text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT jsonb_build_object('status', _adapter_payment_answer.status,
                              'provider_status', _adapter_payment_answer.provider_status,
                              'txn_id', _adapter_payment_answer.txn_id,
                              'amount_cents', _adapter_payment_answer.amount_cents,
                              'currency', _adapter_payment_answer.currency)
$$;

CREATE FUNCTION callback_center._adapter_refund_answer(payload jsonb, status text,
    provider_refund_id text, amount_cents bigint, error text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT jsonb_build_object('refund_id', _adapter_refund_answer.payload->>'refund_id',
                              'status', _adapter_refund_answer.status,
                              'provider_refund_id', _adapter_refund_answer.provider_refund_id,
                              'amount_cents', _adapter_refund_answer.amount_cents,
                              'error', _adapter_refund_answer.error)
$$;

REVOKE ALL ON FUNCTION
    callback_center._adapter_http(text, text, text[], text),
    callback_center._adapter_form_post(text, text, jsonb, text, boolean, text),
    callback_center._adapter_payment_answer(text, text, text, bigint, text),
    callback_center._adapter_refund_answer(jsonb, text, text, bigint, text)
    FROM PUBLIC;

-- The builders and normalizers, now calling them.

CREATE OR REPLACE FUNCTION callback_center._wechatpay_v3_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    base text := rtrim(_wechatpay_v3_request.url, '/');
    method text;
    path text;
    body text := '';
    full_url text;
    signed_path text;
    ts text := extract(epoch FROM clock_timestamp())::bigint::text;
    nonce text := callback_center._adapter_nonce();
    sig text;
    req jsonb;
BEGIN
    IF _wechatpay_v3_request.event_type = 'payment.query' THEN
        method := 'GET';
        path := '/v3/pay/transactions/out-trade-no/'
                || callback_center._url_encode(_wechatpay_v3_request.payload->>'order_id')
                || '?mchid=' || callback_center._url_encode(m.merchant_id);
    ELSIF _wechatpay_v3_request.event_type = 'payment.close' THEN
        method := 'POST';
        path := '/v3/pay/transactions/out-trade-no/'
                || callback_center._url_encode(_wechatpay_v3_request.payload->>'order_id') || '/close';
        body := jsonb_build_object('mchid', m.merchant_id)::text;
    ELSIF _wechatpay_v3_request.event_type = 'refund.request' THEN
        method := 'POST';
        path := '/v3/refund/domestic/refunds';
        req := jsonb_build_object(
            'out_trade_no', _wechatpay_v3_request.payload->>'order_id',
            'out_refund_no', _wechatpay_v3_request.payload->>'refund_id',
            'amount', jsonb_build_object('refund', (_wechatpay_v3_request.payload->>'amount_cents')::bigint,
                                         'total', (_wechatpay_v3_request.payload->>'total_cents')::bigint,
                                         'currency', coalesce(_wechatpay_v3_request.payload->>'currency', 'CNY')));
        IF _wechatpay_v3_request.payload->>'provider_txn_id' IS NOT NULL THEN
            req := req || jsonb_build_object('transaction_id', _wechatpay_v3_request.payload->>'provider_txn_id');
        END IF;
        IF _wechatpay_v3_request.payload->>'reason' IS NOT NULL THEN
            req := req || jsonb_build_object('reason', left(_wechatpay_v3_request.payload->>'reason', 80));
        END IF;
        IF m.options->>'notify_url' IS NOT NULL THEN
            req := req || jsonb_build_object('notify_url', m.options->>'notify_url');
        END IF;
        body := req::text;
    ELSIF _wechatpay_v3_request.event_type = 'refund.query' THEN
        method := 'GET';
        path := '/v3/refund/domestic/refunds/' || callback_center._url_encode(_wechatpay_v3_request.payload->>'refund_id');
    ELSE
        PERFORM callback_center._adapter_unsupported('wechatpay_v3', _wechatpay_v3_request.event_type);
    END IF;
    full_url := base || path;
    -- The signed path is the request URL's absolute path with its query.
    signed_path := coalesce(substring(full_url FROM '^[A-Za-z]+://[^/?#]+(/[^#]*)$'), path);
    sig := callback_center._merchant_sign(m.provider,
        convert_to(method || E'\n' || signed_path || E'\n' || ts || E'\n' || nonce || E'\n'
                   || body || E'\n', 'UTF8'));
    RETURN callback_center._adapter_http(method, full_url,
        ARRAY[format('Authorization: WECHATPAY2-SHA256-RSA2048 mchid="%s",nonce_str="%s",signature="%s",timestamp="%s",serial_no="%s"',
                     m.merchant_id, nonce, sig, ts, m.key_serial),
              'Accept: application/json',
              'Content-Type: application/json'],
        body);
END
$$;

CREATE OR REPLACE FUNCTION callback_center._alipay_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    api text;
    biz jsonb;
    params jsonb;
BEGIN
    IF _alipay_request.event_type = 'payment.query' THEN
        api := 'alipay.trade.query';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id');
    ELSIF _alipay_request.event_type = 'payment.close' THEN
        api := 'alipay.trade.close';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id');
    ELSIF _alipay_request.event_type = 'refund.request' THEN
        api := 'alipay.trade.refund';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id',
                                  'out_request_no', _alipay_request.payload->>'refund_id',
                                  'refund_amount',
                                  callback_center._yuan((_alipay_request.payload->>'amount_cents')::bigint));
        IF _alipay_request.payload->>'reason' IS NOT NULL THEN
            biz := biz || jsonb_build_object('refund_reason', left(_alipay_request.payload->>'reason', 256));
        END IF;
    ELSIF _alipay_request.event_type = 'refund.query' THEN
        api := 'alipay.trade.fastpay.refund.query';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id',
                                  'out_request_no', _alipay_request.payload->>'refund_id');
    ELSE
        PERFORM callback_center._adapter_unsupported('alipay', _alipay_request.event_type);
    END IF;
    params := jsonb_build_object(
        'app_id', m.merchant_id, 'method', api, 'format', 'JSON', 'charset', 'utf-8',
        'sign_type', 'RSA2', 'version', '1.0', 'biz_content', biz::text,
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'Asia/Shanghai',
                             'YYYY-MM-DD HH24:MI:SS'));
    -- Certificate mode: the application's and Alipay's root certificate SNs.
    params := params || jsonb_strip_nulls(jsonb_build_object(
        'app_cert_sn', m.options->>'app_cert_sn',
        'alipay_root_cert_sn', m.options->>'alipay_root_cert_sn'));
    RETURN callback_center._adapter_form_post(_alipay_request.url, m.provider, params, 'sign', false,
        'application/x-www-form-urlencoded;charset=utf-8');
END
$$;

CREATE OR REPLACE FUNCTION callback_center._unionpay_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    base text := rtrim(_unionpay_request.url, '/');
    path text;
    f jsonb;
    started timestamptz;
BEGIN
    f := jsonb_build_object('version', '5.1.0', 'encoding', 'UTF-8', 'signMethod', '01',
                            'certId', m.key_serial, 'merId', m.merchant_id, 'accessType', '0');
    IF _unionpay_request.event_type = 'payment.query' THEN
        -- The order is named by orderId and the txnTime it was sent with:
        -- the time its payment started (start_payment), in Beijing time.
        SELECT p.updated_at INTO started FROM callback_center.payments p
         WHERE p.order_id = _unionpay_request.payload->>'order_id';
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'order_id',
                                     'txnTime', to_char(coalesce(started, clock_timestamp())
                                                        AT TIME ZONE 'Asia/Shanghai',
                                                        'YYYYMMDDHH24MISS'));
    ELSIF _unionpay_request.event_type = 'refund.request' THEN
        path := '/gateway/api/backTransReq.do';
        f := f || jsonb_build_object('txnType', '04', 'txnSubType', '00', 'bizType', '000201',
                                     'channelType', '07', 'currencyCode', '156',
                                     'orderId', _unionpay_request.payload->>'refund_id',
                                     'txnTime', callback_center._unionpay_refund_time(
                                                    _unionpay_request.payload->>'refund_id'),
                                     'origQryId', _unionpay_request.payload->>'provider_txn_id',
                                     'txnAmt', (_unionpay_request.payload->>'amount_cents')::bigint::text);
        IF m.options->>'back_url' IS NOT NULL THEN
            f := f || jsonb_build_object('backUrl', m.options->>'back_url');
        END IF;
    ELSIF _unionpay_request.event_type = 'refund.query' THEN
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'refund_id',
                                     'txnTime', callback_center._unionpay_refund_time(
                                                    _unionpay_request.payload->>'refund_id'));
    ELSE
        PERFORM callback_center._adapter_unsupported('unionpay', _unionpay_request.event_type);
    END IF;
    RETURN callback_center._adapter_form_post(base || path, m.provider, f, 'signature', true,
        'application/x-www-form-urlencoded;charset=UTF-8');
END
$$;

CREATE OR REPLACE FUNCTION callback_center._adapter_error_answer(event_type text, payload jsonb,
    error text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT CASE WHEN _adapter_error_answer.event_type LIKE 'refund.%'
                THEN callback_center._adapter_refund_answer(_adapter_error_answer.payload, 'unknown',
                                                            NULL, NULL, _adapter_error_answer.error)
                ELSE jsonb_build_object('status', 'error', 'error', _adapter_error_answer.error) END
$$;

CREATE OR REPLACE FUNCTION callback_center._wechatpay_v3_answer(event_type text, payload jsonb,
    status integer, body text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    j jsonb;
    st text;
BEGIN
    IF _wechatpay_v3_answer.body <> '' THEN
        j := _wechatpay_v3_answer.body::jsonb;
    END IF;
    IF _wechatpay_v3_answer.status NOT BETWEEN 200 AND 299 THEN
        IF _wechatpay_v3_answer.event_type = 'payment.query' AND j->>'code' = 'ORDER_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', j->>'code');
        END IF;
        RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
            format('HTTP %s %s: %s', _wechatpay_v3_answer.status, j->>'code', j->>'message'));
    END IF;
    IF _wechatpay_v3_answer.event_type = 'payment.query' THEN
        IF j->>'out_trade_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about order "%s"', j->>'out_trade_no'));
        END IF;
        st := CASE j->>'trade_state'
                WHEN 'SUCCESS' THEN 'paid' WHEN 'REFUND' THEN 'paid'
                WHEN 'NOTPAY' THEN 'unpaid' WHEN 'USERPAYING' THEN 'unpaid'
                WHEN 'CLOSED' THEN 'closed' WHEN 'REVOKED' THEN 'closed'
                WHEN 'PAYERROR' THEN 'failed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('unknown trade_state "%s"', j->>'trade_state'));
        END IF;
        RETURN callback_center._adapter_payment_answer(st, j->>'trade_state', j->>'transaction_id',
                                                       (j->'amount'->>'total')::bigint,
                                                       j->'amount'->>'currency');
    ELSIF _wechatpay_v3_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSE
        IF j->>'out_refund_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'refund_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about refund "%s"', j->>'out_refund_no'));
        END IF;
        RETURN callback_center._adapter_refund_answer(_wechatpay_v3_answer.payload,
            CASE j->>'status' WHEN 'SUCCESS' THEN 'success'
                              WHEN 'PROCESSING' THEN 'processing'
                              -- not final: the merchant platform settles it
                              -- (a failed refund's amount could be refunded
                              -- again)
                              WHEN 'ABNORMAL' THEN 'processing'
                              WHEN 'CLOSED' THEN 'failed' ELSE 'unknown' END,
            j->>'refund_id', (j->'amount'->>'refund')::bigint,
            CASE WHEN j->>'status' IN ('SUCCESS', 'PROCESSING') THEN NULL ELSE j->>'status' END);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._alipay_answer(event_type text, payload jsonb,
    node jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    st text;
BEGIN
    IF _alipay_answer.node->>'code' IS DISTINCT FROM '10000' THEN
        IF _alipay_answer.event_type = 'payment.query' AND _alipay_answer.node->>'sub_code' = 'ACQ.TRADE_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', _alipay_answer.node->>'sub_code');
        END IF;
        RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
            format('%s %s: %s', _alipay_answer.node->>'code', _alipay_answer.node->>'sub_code',
                   coalesce(_alipay_answer.node->>'sub_msg', _alipay_answer.node->>'msg')));
    END IF;
    IF _alipay_answer.event_type = 'payment.query' THEN
        IF _alipay_answer.node->>'out_trade_no' IS DISTINCT FROM _alipay_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('the answer is about order "%s"', _alipay_answer.node->>'out_trade_no'));
        END IF;
        st := CASE _alipay_answer.node->>'trade_status'
                WHEN 'TRADE_SUCCESS' THEN 'paid' WHEN 'TRADE_FINISHED' THEN 'paid'
                WHEN 'WAIT_BUYER_PAY' THEN 'unpaid' WHEN 'TRADE_CLOSED' THEN 'closed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('unknown trade_status "%s"', _alipay_answer.node->>'trade_status'));
        END IF;
        RETURN callback_center._adapter_payment_answer(st, _alipay_answer.node->>'trade_status',
            _alipay_answer.node->>'trade_no',
            round((_alipay_answer.node->>'total_amount')::numeric * 100)::bigint, 'CNY');
    ELSIF _alipay_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSIF _alipay_answer.event_type = 'refund.request' THEN
        -- Alipay gives a refund no id (trade_no is the payment's), and
        -- refund_fee is the trade's total refunded, not this refund's.
        RETURN callback_center._adapter_refund_answer(_alipay_answer.payload,
            CASE WHEN _alipay_answer.node->>'fund_change' = 'Y' THEN 'success' ELSE 'processing' END,
            NULL, NULL, NULL);
    ELSE
        RETURN callback_center._adapter_refund_answer(_alipay_answer.payload,
            CASE WHEN _alipay_answer.node->>'refund_status' = 'REFUND_SUCCESS' THEN 'success'
                 ELSE 'processing' END,
            NULL, round((_alipay_answer.node->>'refund_amount')::numeric * 100)::bigint, NULL);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION callback_center._unionpay_answer(event_type text, payload jsonb,
    f jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    orig text := f->>'origRespCode';
BEGIN
    IF _unionpay_answer.event_type = 'payment.query' THEN
        IF f->>'respCode' = '34' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', '34');
        END IF;
        IF f->>'respCode' IS DISTINCT FROM '00' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('respCode %s: %s', f->>'respCode', f->>'respMsg'));
        END IF;
        IF f->>'orderId' IS DISTINCT FROM _unionpay_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('the answer is about order "%s"', f->>'orderId'));
        END IF;
        RETURN callback_center._adapter_payment_answer(
            CASE WHEN orig = '00' THEN 'paid'
                 WHEN orig IN ('03', '04', '05') THEN 'unpaid' ELSE 'failed' END,
            orig, f->>'queryId', (f->>'txnAmt')::bigint, 'CNY');
    ELSIF _unionpay_answer.event_type = 'refund.request' THEN
        RETURN callback_center._adapter_refund_answer(_unionpay_answer.payload,
            CASE WHEN f->>'respCode' = '00' THEN 'processing' ELSE 'failed' END,
            f->>'queryId', (f->>'txnAmt')::bigint,
            CASE WHEN f->>'respCode' = '00' THEN NULL
                 ELSE format('respCode %s: %s', f->>'respCode', f->>'respMsg') END);
    ELSE
        IF f->>'respCode' IS DISTINCT FROM '00' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('respCode %s: %s', f->>'respCode', f->>'respMsg'));
        END IF;
        RETURN callback_center._adapter_refund_answer(_unionpay_answer.payload,
            CASE WHEN orig = '00' THEN 'success'
                 WHEN orig IN ('03', '04', '05') THEN 'processing' ELSE 'failed' END,
            f->>'queryId', (f->>'txnAmt')::bigint,
            CASE WHEN orig IN ('00', '03', '04', '05') THEN NULL
                 ELSE format('origRespCode %s: %s', orig, f->>'origRespMsg') END);
    END IF;
END
$$;

-- ------------------------------------------------------------------------
-- TCC: the two tries are one internal first phase (_tcc_first_phase:
-- checks, barrier, take the resource, record the reservation) behind thin
-- SECURITY DEFINER wrappers, as the second phase already was.
-- ------------------------------------------------------------------------

CREATE FUNCTION callback_center._tcc_first_phase(
    gid text, branch_id text, kind text, resource_id text, quantity bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome  text;
    cur      bigint;
    nslots   integer;
BEGIN
    PERFORM callback_center._require_key(_tcc_first_phase.gid, 'gid');
    PERFORM callback_center._require_key(_tcc_first_phase.branch_id, 'branch_id');
    PERFORM callback_center._require_key(_tcc_first_phase.resource_id,
        CASE _tcc_first_phase.kind WHEN 'stock' THEN 'sku_id' ELSE 'coupon_id' END);
    PERFORM callback_center._require(_tcc_first_phase.quantity, 'qty');
    IF _tcc_first_phase.quantity <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('qty must be positive: %s', _tcc_first_phase.quantity);
    END IF;
    outcome := callback_center.barrier(_tcc_first_phase.gid, _tcc_first_phase.branch_id, 'try');
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    IF _tcc_first_phase.kind = 'coupon' THEN
        PERFORM callback_center.freeze_coupon(_tcc_first_phase.resource_id, _tcc_first_phase.gid);
    ELSE
        UPDATE callback_center.stock AS s
           SET available = s.available - _tcc_first_phase.quantity,
               reserved = s.reserved + _tcc_first_phase.quantity,
               version = s.version + 1,
               updated_at = pg_catalog.now()
         WHERE s.sku_id = _tcc_first_phase.resource_id AND s.available >= _tcc_first_phase.quantity;
        IF NOT FOUND THEN
            SELECT s.available, s.slots INTO cur, nslots FROM callback_center.stock AS s
             WHERE s.sku_id = _tcc_first_phase.resource_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'CB004',
                    MESSAGE = pg_catalog.format('unknown SKU "%s"', _tcc_first_phase.resource_id),
                    HINT = 'Create it with callback_center.set_stock().';
            END IF;
            -- A hot SKU's units are in its slots, not on the row: a
            -- reservation there would have to be given back to a slot by
            -- the cancel, which the reservation model (one row) does not do.
            IF nslots > 0 THEN
                RAISE EXCEPTION USING ERRCODE = '0A000',
                    MESSAGE = pg_catalog.format('cannot reserve hot SKU "%s" through TCC', _tcc_first_phase.resource_id),
                    DETAIL = pg_catalog.format('Its units are spread over %s slots.', nslots),
                    HINT = 'Deduct it with deduct_stock() (restore_stock() compensates), or make it normal with set_hot_sku(sku, 1).';
            END IF;
            RAISE EXCEPTION USING ERRCODE = 'CB001',
                MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', _tcc_first_phase.resource_id),
                DETAIL = pg_catalog.format('Reserving %s units needs more than the %s available.',
                                           _tcc_first_phase.quantity, cur);
        END IF;
    END IF;
    INSERT INTO callback_center.tcc_reservations (gid, branch_id, kind, resource_id, quantity)
    VALUES (_tcc_first_phase.gid, _tcc_first_phase.branch_id, _tcc_first_phase.kind,
            _tcc_first_phase.resource_id, _tcc_first_phase.quantity);
    RETURN outcome;
END
$fn$;

REVOKE ALL ON FUNCTION callback_center._tcc_first_phase(text, text, text, text, bigint) FROM PUBLIC;

-- The wrappers, now LANGUAGE sql (grants and comments kept).

CREATE OR REPLACE FUNCTION callback_center.tcc_stock_try(
    gid text,
    branch_id text,
    sku_id text,
    qty bigint)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_first_phase($1, $2, 'stock', $3, $4);
$fn$;

CREATE OR REPLACE FUNCTION callback_center.tcc_coupon_try(gid text, branch_id text, coupon_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_first_phase($1, $2, 'coupon', $3, 1);
$fn$;

-- Orders, payments and reconciliation, cheaper per call (issue 12, item 4).
-- place_order and _move_payment set the states they know to be legal in
-- the UPDATE itself (pending_confirmation -> confirmed / failed; CREATED or
-- PAYING -> PAID with the money; unpaid or paying -> paid) instead of
-- through apply_event's dynamic SQL: the machine's trigger still checks,
-- records and emits.  place_order answers from the rows it wrote.
-- reconcile joins in one statement and compares the few pairs that may
-- differ in a second, and a partial index finds a day's refund lines.
-- Parameters named after their function (doc/conventions.md): the
-- internal _order_summary, _payment_check, _move_payment and
-- _apply_payment_result lose their p_ prefix (DROP and CREATE; all four
-- are granted to no one), and #variable_conflict goes from place_order,
-- payment_callback and reconcile.
CREATE INDEX provider_statement_refunds
    ON callback_center.provider_statement (channel, bill_date, refund_id)
    WHERE refund_id IS NOT NULL;

DROP FUNCTION callback_center._order_summary(text, boolean);

DROP FUNCTION callback_center._payment_check(text, text, bigint, text, text);

DROP FUNCTION callback_center._move_payment(text, text, text, bigint, text, text);

DROP FUNCTION callback_center._apply_payment_result(text, text, text, bigint, text, text, text);

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

CREATE OR REPLACE FUNCTION callback_center.place_order(
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

CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
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

CREATE OR REPLACE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body bytea)
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

CREATE OR REPLACE FUNCTION callback_center.reconcile(channel text, bill_date date,
    grace interval DEFAULT '30 minutes')
RETURNS TABLE (kind text, count bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    day_start timestamptz;
    day_end timestamptz;
    run_at timestamptz := clock_timestamp();
    r record;
    applied_ids bigint[];
    refund_ids bigint[];
    -- The pairs of statement line (s_) and local payment (l_) that may differ.
    s_txns text[];
    s_orders text[];
    s_amounts bigint[];
    s_statuses text[];
    l_txns text[];
    l_orders text[];
    l_amounts bigint[];
    l_statuses text[];
    l_paid_ats timestamptz[];
    settled boolean;
    o callback_center.orders;
    pay callback_center.payments;
    outcome text;
BEGIN
    PERFORM callback_center._require_key(reconcile.channel, 'channel', 63);
    PERFORM callback_center._require(reconcile.bill_date, 'bill_date');
    PERFORM callback_center._require(reconcile.grace, 'grace');
    IF reconcile.grace < interval '0' OR reconcile.grace >= interval '12 hours' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('grace must be between 0 and 12 hours, got %s', reconcile.grace);
    END IF;
    day_start := reconcile.bill_date::timestamptz;
    day_end := (reconcile.bill_date + 1)::timestamptz;

    -- Serialise runs for one (channel, bill_date).
    PERFORM pg_advisory_xact_lock(hashtextextended(
        'callback_center.recon:' || reconcile.channel || ':' || reconcile.bill_date::text, 0));

    -- One pass: statement lines of the day FULL JOIN local payments of the
    -- provider paid in the day widened by grace at both edges, matched on
    -- the provider's transaction id.  Lines left unmatched look further:
    -- the same transaction id paid on any other day (x: the provider booked
    -- it across midnight from us, or later; compared like a match), or the
    -- unpaid payment of the line's order (u).  Local payments left
    -- unmatched are differences only when paid in the day and not on a
    -- neighbouring day's statement (that day's run compares them); grace is
    -- how long before or after midnight one may still turn up on the
    -- neighbour's statement, so those wait as pending_grace.  Lines already
    -- settled by an earlier run are left alone.
    --
    -- In two statements.  The join keeps every pair that may differ: the
    -- unmatched, and the matched ones that are not the same amount with
    -- the commonest agreeing statuses (success and PAID); the lookups and
    -- the full comparison then run on those few only.  In one statement
    -- the planner charged the two per-line lookups to each of the million
    -- matched lines (a cost 300 times the join's), which bought a JIT
    -- compilation with inlining and optimisation taking longer than the
    -- join itself, and the comparison called _recon_status_agrees a
    -- million times.

    -- Whether an earlier run settled lines of this day (only runs, which
    -- hold the lock, settle them): when none did, the plan leaves out the
    -- anti-join of every line against recon_diffs.
    settled := EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                        WHERE d.channel = reconcile.channel
                          AND d.bill_date = reconcile.bill_date
                          AND d.resolution = 'applied');
    SELECT array_agg(s.provider_txn_id), array_agg(s.order_id), array_agg(s.amount_cents),
           array_agg(s.status), array_agg(l.provider_txn_id), array_agg(l.order_id),
           array_agg(l.amount_cents), array_agg(l.status), array_agg(l.paid_at)
      INTO s_txns, s_orders, s_amounts, s_statuses, l_txns, l_orders, l_amounts, l_statuses,
           l_paid_ats
      FROM (SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status
              FROM callback_center.provider_statement st
             WHERE st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
               AND st.refund_id IS NULL
               AND (NOT settled
                    OR NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                                    WHERE d.channel = reconcile.channel
                                      AND d.bill_date = reconcile.bill_date
                                      AND d.provider_txn_id = st.provider_txn_id
                                      AND d.resolution = 'applied'))) s
      FULL JOIN
           (SELECT p.order_id, p.provider_txn_id, p.amount_cents, p.status, p.paid_at
              FROM callback_center.payments p
             WHERE p.provider = reconcile.channel
               AND p.paid_at >= day_start - reconcile.grace
               AND p.paid_at < day_end + reconcile.grace
               AND p.provider_txn_id IS NOT NULL) l
        ON l.provider_txn_id = s.provider_txn_id
     WHERE s.provider_txn_id IS NULL OR l.provider_txn_id IS NULL
        OR s.amount_cents <> l.amount_cents OR s.status <> 'success' OR l.status <> 'PAID';

    WITH j AS (
        SELECT *
          FROM unnest(s_txns, s_orders, s_amounts, s_statuses, l_txns, l_orders, l_amounts,
                      l_statuses, l_paid_ats)
               AS j(s_txn, s_order, s_amount, s_status, l_txn, l_order, l_amount, l_status,
                    l_paid_at)
    ), c AS (
        SELECT coalesce(j.s_txn, j.l_txn) AS txn,
               coalesce(j.s_order, j.l_order, x.order_id, u.order_id) AS order_id,
               j.s_amount, j.s_status,
               coalesce(j.l_amount, x.amount_cents, u.amount_cents) AS local_amount,
               coalesce(j.l_status, x.status, u.status) AS local_status,
               CASE
                 WHEN j.s_txn IS NOT NULL AND j.l_txn IS NOT NULL THEN
                   CASE WHEN j.s_amount <> j.l_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, j.l_status)
                             THEN 'status_mismatch' END
                 WHEN j.l_txn IS NOT NULL THEN
                   -- Local only; rows in the grace margins, and rows on a
                   -- neighbouring day's statement, are that day's to judge.
                   CASE WHEN j.l_paid_at >= day_start AND j.l_paid_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = reconcile.channel
                                    AND n.bill_date IN (reconcile.bill_date - 1,
                                                        reconcile.bill_date + 1)
                                    AND n.provider_txn_id = j.l_txn)
                        THEN 'missing_provider' END
                 WHEN x.payment_id IS NOT NULL THEN
                   CASE WHEN x.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, x.status)
                             THEN 'status_mismatch' END
                 WHEN u.payment_id IS NOT NULL THEN
                   CASE WHEN u.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, u.status)
                             THEN 'status_mismatch' END
                 ELSE 'missing_local'
               END AS kind,
               CASE
                 WHEN j.l_txn IS NOT NULL AND j.s_txn IS NULL THEN
                   CASE WHEN j.l_paid_at < day_start + reconcile.grace
                          OR j.l_paid_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN u.payment_id IS NOT NULL AND j.s_status = 'success'
                      AND u.amount_cents = j.s_amount
                      AND u.status IN ('CREATED', 'PAYING', 'CLOSED', 'FAILED') THEN 'applied'
                 ELSE 'flagged'
               END AS resolution,
               u.payment_id AS apply_payment_id
          -- Index probes for the unmatched lines only (LIMIT 1 keeps
          -- them per-row lookups, not hash joins over every payment).
          FROM j
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND p.provider_txn_id = j.s_txn
                   AND p.provider = reconcile.channel
                 LIMIT 1) x ON true
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND x.payment_id IS NULL
                   AND p.order_id = j.s_order AND p.provider_txn_id IS NULL
                   AND p.provider = reconcile.channel
                 LIMIT 1) u ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at)
        SELECT reconcile.channel, reconcile.bill_date, c.txn, c.order_id,
               -- Known late money is a refund for people, whatever else
               -- differs; once refunded, the provider's refund agrees.
               CASE WHEN lp.status = 'refund_required' AND c.resolution <> 'applied'
                    THEN 'refund_required' ELSE c.kind END,
               c.s_amount, c.local_amount, c.s_status, c.local_status,
               CASE WHEN lp.status = 'refund_required' AND c.resolution = 'pending_grace'
                    THEN 'flagged' ELSE c.resolution END,
               run_at
          FROM c
          LEFT JOIN LATERAL (
                SELECT l.status FROM callback_center.late_payments l
                 WHERE l.provider = reconcile.channel AND l.provider_txn_id = c.txn) lp ON true
         WHERE c.kind IS NOT NULL
           AND NOT (lp.status IS NOT DISTINCT FROM 'refunded' AND c.s_status = 'refund')
        ON CONFLICT ON CONSTRAINT recon_diffs_channel_bill_date_provider_txn_id_kind_key DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.provider_txn_id, d.order_id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO applied_ids
      FROM ins;

    -- Refunds: statement refund lines of the day FULL JOIN local refunds of
    -- the provider that succeeded in the day widened by grace, matched on
    -- our refund id.  A line left unmatched looks for its refund on any
    -- day (x): missing there is missing_local; open (PENDING, PROCESSING)
    -- is status_mismatch, settled here (applied: the provider's statement
    -- says it refunded, _apply_refund_answer below); failed is
    -- status_mismatch for people.  A local refund left unmatched is
    -- missing_provider when it succeeded in the day and no statement of
    -- the day (a line settled by an earlier run is left out of s) or a
    -- neighbouring day has it (pending_grace in the margins).  provider_txn_id is
    -- the line's, else our refund id (unique; a provider's refund id need
    -- not be: Alipay's answers name the trade).
    WITH s AS (
        SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status, st.refund_id
          FROM callback_center.provider_statement st
         WHERE st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
           AND st.refund_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                            WHERE d.channel = reconcile.channel
                              AND d.bill_date = reconcile.bill_date
                              AND d.provider_txn_id = st.provider_txn_id
                              AND d.resolution = 'applied')
    ), l AS (
        SELECT rf.refund_id, rf.order_id, rf.amount_cents, rf.status, rf.finished_at,
               rf.provider_txn_id, rf.refund_id AS txn
          FROM callback_center.refunds rf
         WHERE rf.provider = reconcile.channel AND rf.status = 'SUCCESS'
           AND rf.finished_at >= day_start - reconcile.grace
           AND rf.finished_at < day_end + reconcile.grace
    ), c AS (
        SELECT coalesce(s.provider_txn_id, l.txn) AS txn,
               coalesce(s.refund_id, l.refund_id) AS refund_id,
               coalesce(s.order_id, l.order_id, x.order_id) AS order_id,
               s.amount_cents AS s_amount, s.status AS s_status,
               coalesce(l.amount_cents, x.amount_cents) AS local_amount,
               coalesce(l.status, x.status) AS local_status,
               CASE
                 WHEN s.refund_id IS NOT NULL AND l.refund_id IS NOT NULL THEN
                   CASE WHEN s.amount_cents <> l.amount_cents THEN 'amount_mismatch' END
                 WHEN l.refund_id IS NOT NULL THEN
                   -- A statement that lists refunds by the refunded
                   -- transaction (status refund, no refund_id) has it too.
                   CASE WHEN l.finished_at >= day_start AND l.finished_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = reconcile.channel
                                    AND n.bill_date BETWEEN reconcile.bill_date - 1
                                                        AND reconcile.bill_date + 1
                                    AND n.refund_id = l.refund_id)
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = reconcile.channel
                                    AND n.bill_date BETWEEN reconcile.bill_date - 1
                                                        AND reconcile.bill_date + 1
                                    AND n.refund_id IS NULL AND n.status = 'refund'
                                    AND n.provider_txn_id = l.provider_txn_id)
                        THEN 'missing_provider' END
                 WHEN x.refund_id IS NULL THEN 'missing_local'
                 WHEN x.amount_cents <> s.amount_cents THEN 'amount_mismatch'
                 WHEN x.status <> 'SUCCESS' THEN 'status_mismatch'
               END AS kind,
               CASE
                 WHEN l.refund_id IS NOT NULL AND s.refund_id IS NULL THEN
                   CASE WHEN l.finished_at < day_start + reconcile.grace
                          OR l.finished_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN x.status IN ('PENDING', 'PROCESSING') AND x.amount_cents = s.amount_cents
                      THEN 'applied'
                 ELSE 'flagged'
               END AS resolution
          FROM s FULL JOIN l ON l.refund_id = s.refund_id
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.refunds rf
                 WHERE l.refund_id IS NULL AND rf.refund_id = s.refund_id
                   AND rf.provider = reconcile.channel) x ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at, refund_id)
        SELECT reconcile.channel, reconcile.bill_date, c.txn, c.order_id, c.kind, c.s_amount,
               c.local_amount, c.s_status, c.local_status, c.resolution, run_at, c.refund_id
          FROM c
         WHERE c.kind IS NOT NULL
        ON CONFLICT ON CONSTRAINT recon_diffs_channel_bill_date_provider_txn_id_kind_key DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at, refund_id = excluded.refund_id
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO refund_ids
      FROM ins;

    -- Differences an earlier run recorded that this run no longer finds.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = reconcile.channel AND d.bill_date = reconcile.bill_date
       AND d.resolution NOT IN ('applied', 'resolved') AND d.checked_at <> run_at;

    -- Local payments a neighbouring day's run left waiting for a
    -- statement line that turned up on this day's statement: compared
    -- above, so no longer differences of that day.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = reconcile.channel
       AND d.bill_date IN (reconcile.bill_date - 1, reconcile.bill_date + 1)
       AND d.kind = 'missing_provider' AND d.resolution = 'pending_grace'
       AND EXISTS (SELECT 1 FROM callback_center.provider_statement st
                    WHERE st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
                      AND (st.provider_txn_id = d.provider_txn_id
                           OR st.refund_id = d.refund_id));

    -- Settle open refunds the provider's statement says it refunded,
    -- through the one owner of refund status changes.
    FOR r IN
        SELECT d.id, d.refund_id, d.provider_txn_id, d.provider_amount
          FROM callback_center.recon_diffs d
         WHERE d.id = ANY (coalesce(refund_ids, '{}'))
         ORDER BY d.id
    LOOP
        outcome := callback_center._apply_refund_answer(r.refund_id,
            jsonb_build_object('status', 'success', 'provider_refund_id', r.provider_txn_id,
                               'amount_cents', r.provider_amount));
        UPDATE callback_center.recon_diffs d
           SET resolution = CASE outcome WHEN 'succeeded' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome WHEN 'succeeded' THEN 'refund marked succeeded'
                               ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    -- Settle what the provider was paid for and we were not told, through
    -- the same path as a callback (state machines, follow-up events; on an
    -- order that can no longer take the money, a late payment to refund).
    FOR r IN
        SELECT d.id, d.provider_txn_id, d.order_id, d.provider_amount, st.currency
          FROM callback_center.recon_diffs d
          LEFT JOIN callback_center.provider_statement st
                 ON st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
                AND st.provider_txn_id = d.provider_txn_id
         WHERE d.id = ANY (coalesce(applied_ids, '{}'))
         ORDER BY d.id
    LOOP
        SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = r.order_id FOR UPDATE;
        SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = r.order_id FOR UPDATE;
        IF pay.provider_txn_id IS NOT NULL THEN
            -- A callback got there first, after the pass read the row.
            UPDATE callback_center.recon_diffs d
               SET resolution = 'flagged',
                   note = format('payment took transaction %s meanwhile', pay.provider_txn_id)
             WHERE d.id = r.id;
            CONTINUE;
        END IF;
        outcome := callback_center._apply_payment_result(reconcile.channel, r.provider_txn_id,
                                                         r.order_id, r.provider_amount, r.currency,
                                                         'success', 'reconciliation');
        UPDATE callback_center.recon_diffs d
           SET kind = CASE outcome WHEN 'refund_required' THEN 'refund_required' ELSE d.kind END,
               resolution = CASE outcome WHEN 'paid' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome
                        WHEN 'paid' THEN 'payment marked paid'
                        WHEN 'refund_required'
                          THEN format('order is %s/%s: payment.refund_required emitted',
                                      o.status, o.pay_status)
                        ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    RETURN QUERY
        SELECT k.kind, count(d.id)
          FROM unnest(ARRAY['missing_local', 'missing_provider', 'amount_mismatch',
                            'status_mismatch', 'refund_required']) WITH ORDINALITY AS k(kind, ord)
          LEFT JOIN callback_center.recon_diffs d
                 ON d.channel = reconcile.channel AND d.bill_date = reconcile.bill_date
                AND d.kind = k.kind
         GROUP BY k.kind, k.ord
         ORDER BY k.ord;
END
$$;

REVOKE ALL ON FUNCTION callback_center._order_summary(text, boolean),
    callback_center._payment_check(text, text, bigint, text, text),
    callback_center._move_payment(text, text, text, bigint, text, text),
    callback_center._apply_payment_result(text, text, text, bigint, text, text, text) FROM PUBLIC;

-- Comment of _endpoint_apply: the reason for the rate_limit_per_s bound, without its history.

CREATE OR REPLACE FUNCTION callback_center._endpoint_apply(id integer, options jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    known constant text[] := ARRAY['url', 'event_types', 'timeout_ms',
        'retry_schedule', 'max_attempts', 'rate_limit_per_s',
        'breaker_failure_ratio', 'breaker_window_s', 'breaker_min_requests',
        'breaker_open_ms', 'is_core', 'ordered', 'enabled', 'format'];
    bad text;
    k text;
    v jsonb;
    ep callback_center.endpoints;
    n numeric;
BEGIN
    PERFORM callback_center._require(options, 'options');
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'options must be a JSON object',
            DETAIL = format('A JSON %s was given.', jsonb_typeof(options));
    END IF;
    SELECT string_agg(format('"%s"', o), ', ' ORDER BY o) INTO bad
      FROM jsonb_object_keys(options) o
     WHERE o <> ALL (known);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('unknown endpoint option %s', bad),
            HINT = format('Known options: %s.', array_to_string(known, ', '));
    END IF;

    SELECT * INTO ep FROM callback_center.endpoints e WHERE e.id = _endpoint_apply.id;
    FOR k, v IN SELECT * FROM jsonb_each(options)
    LOOP
        CASE k
        WHEN 'url' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "url" must be a string';
            END IF;
            ep.url := callback_center._check_url(v #>> '{}');
        WHEN 'event_types' THEN
            IF jsonb_typeof(v) <> 'array' OR jsonb_array_length(v) = 0
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(v) x
                           WHERE jsonb_typeof(x) <> 'string' OR x #>> '{}' = '') THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "event_types" must be a non-empty array of non-empty strings';
            END IF;
            ep.event_types := ARRAY(SELECT jsonb_array_elements_text(v));
        WHEN 'timeout_ms' THEN
            ep.timeout_ms := callback_center._option_int(k, v, 1, 600000);
        WHEN 'retry_schedule' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "retry_schedule" must be a string';
            END IF;
            IF NOT EXISTS (SELECT 1 FROM callback_center.retry_schedules s
                            WHERE s.name = v #>> '{}') THEN
                RAISE EXCEPTION USING ERRCODE = '42704',
                    MESSAGE = format('retry schedule "%s" does not exist', v #>> '{}'),
                    HINT = 'The retry_schedules table lists them.';
            END IF;
            ep.retry_schedule := v #>> '{}';
        WHEN 'max_attempts' THEN
            ep.max_attempts := CASE WHEN jsonb_typeof(v) = 'null' THEN NULL
                ELSE callback_center._option_int(k, v, 1, 1000000) END;
        WHEN 'rate_limit_per_s' THEN
            IF jsonb_typeof(v) = 'null' THEN
                ep.rate_limit_per_s := NULL;
            ELSIF jsonb_typeof(v) <> 'number' OR v::numeric < 0.001 OR v::numeric > 1000000 THEN
                -- The worker's token bucket works in doubles, where 1e400
                -- is infinity: it would stop every delivery.
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "rate_limit_per_s" must be a number between 0.001 and 1000000, or null',
                    DETAIL = format('The value given was %s.', left(v::text, 40));
            ELSE
                ep.rate_limit_per_s := v::numeric;
            END IF;
        WHEN 'breaker_failure_ratio' THEN
            IF jsonb_typeof(v) <> 'number' OR v::numeric <= 0 OR v::numeric > 1 THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "breaker_failure_ratio" must be a number in (0, 1]';
            END IF;
            ep.breaker_failure_ratio := v::numeric;
        WHEN 'breaker_window_s' THEN
            ep.breaker_window_s := callback_center._option_int(k, v, 1, 86400);
        WHEN 'breaker_min_requests' THEN
            ep.breaker_min_requests := callback_center._option_int(k, v, 1, 1000000);
        WHEN 'breaker_open_ms' THEN
            ep.breaker_open_ms := callback_center._option_int(k, v, 1, 86400000);
        WHEN 'format' THEN
            -- How requests are shaped: the adapters of 46_adapters.sql.
            IF jsonb_typeof(v) <> 'string' OR v #>> '{}' NOT IN
               ('standard_webhooks', 'wechatpay_v3', 'alipay', 'unionpay') THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('unknown endpoint format %s', v),
                    HINT = 'The formats are standard_webhooks, wechatpay_v3, alipay and unionpay.';
            END IF;
            ep.format := v #>> '{}';
        ELSE
            -- is_core, ordered, enabled
            IF jsonb_typeof(v) <> 'boolean' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('endpoint option "%s" must be true or false', k);
            END IF;
            CASE k
            WHEN 'is_core' THEN ep.is_core := v::boolean;
            WHEN 'ordered' THEN ep.ordered := v::boolean;
            ELSE ep.enabled := v::boolean;
            END CASE;
        END CASE;
    END LOOP;

    UPDATE callback_center.endpoints e
       SET url = ep.url, event_types = ep.event_types, timeout_ms = ep.timeout_ms,
           retry_schedule = ep.retry_schedule, max_attempts = ep.max_attempts,
           rate_limit_per_s = ep.rate_limit_per_s,
           breaker_failure_ratio = ep.breaker_failure_ratio,
           breaker_window_s = ep.breaker_window_s,
           breaker_min_requests = ep.breaker_min_requests,
           breaker_open_ms = ep.breaker_open_ms, is_core = ep.is_core,
           ordered = ep.ordered, enabled = ep.enabled, format = ep.format,
           updated_at = now()
     WHERE e.id = _endpoint_apply.id;
END
$$;

-- One check of a UnionPay signature (issue 9): notifications and
-- back-channel answers both verify through _unionpay_verify.
CREATE FUNCTION callback_center._unionpay_verify(provider text, secrets text[],
    names text[], vals bytea[], OUT failure text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    cert bytea;
    cert_pem text;
    sig bytea;
    cas text[];
    chk record;
    content bytea;
BEGIN
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature';
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        sig := NULL;
    END;
    IF sig IS NULL OR sig = '' THEN
        failure := 'malformed_signature';
        RETURN;
    END IF;

    -- In a fixed order: the certificate cache (crypto.c) is keyed by them.
    SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = _unionpay_verify.provider;
    IF cas IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no UnionPay certificates', _unionpay_verify.provider),
            HINT = 'An administrator loads the root and intermediate certificates with callback_center.set_platform_keys().';
    END IF;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, cas, _unionpay_verify.secrets);
    IF chk.verdict <> 'ok' THEN
        failure := CASE chk.verdict WHEN 'malformed' THEN 'malformed_signature'
                                    WHEN 'expired' THEN 'key_expired'
                                    WHEN 'wrong_name' THEN 'wrong_organisation'
                                    ELSE 'untrusted_key' END;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature';
    END IF;
END
$$;

REVOKE ALL ON FUNCTION callback_center._unionpay_verify(text, text[], text[], bytea[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION callback_center._unionpay_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    charset text;
    cs text;
    f jsonb;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_unionpay_parse.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'encoding')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs = 'GBK' THEN 'GBK' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    failure := callback_center._unionpay_verify(_unionpay_parse.provider,
                                                _unionpay_parse.secrets, names, vals);
    IF failure IS NOT NULL THEN
        fail_status := 401;
        RETURN;
    END IF;

    -- Signed by UnionPay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('orderId', 'queryId', 'txnType', 'txnSubType', 'respCode',
                        'txnAmt', 'currencyCode', 'origQryId');
        -- What a resend repeats: the signed parameters but the certificate
        -- (UnionPay may sign a resend under its next certificate).
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('signature', 'signPubKeyCert') AND x.v <> '';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF nullif(f->>'queryId', '') IS NULL OR nullif(f->>'txnType', '') IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := (f->>'queryId') || ':' || (f->>'txnType');
    event_type := 'txnType ' || (f->>'txnType') || coalesce('/' || (f->>'txnSubType'), '');
    IF f->>'txnType' = '01' THEN
        -- Consumption: respCode 00 (success) and A6 (success with a
        -- defect) pay; any other is one failed attempt.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'success' ELSE 'attempt_failed' END;
        -- ISO 4217 numeric codes.
        currency := CASE f->>'currencyCode'
            WHEN '156' THEN 'CNY' WHEN '344' THEN 'HKD' WHEN '446' THEN 'MOP'
            WHEN '901' THEN 'TWD' WHEN '840' THEN 'USD' WHEN '978' THEN 'EUR'
            WHEN '826' THEN 'GBP' WHEN '392' THEN 'JPY' WHEN '410' THEN 'KRW'
            WHEN '702' THEN 'SGD' WHEN '036' THEN 'AUD' WHEN '124' THEN 'CAD'
            ELSE f->>'currencyCode' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$'
           OR nullif(currency, '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    IF f->>'txnType' = '04' THEN
        -- Refund (back notification): orderId is the refund's own order
        -- id, our refund id; queryId UnionPay's id of the refund; txnAmt
        -- its amount.  respCode 00 and A6 refunded; any other failed.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'refund_success' ELSE 'refund_failed' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    -- Other transaction types (cancellations 31, ...) are recorded and
    -- acknowledged (verdict NULL).
END
$$;

CREATE OR REPLACE FUNCTION callback_center._unionpay_answer_fields(provider text, secrets text[],
    body text, OUT failure text, OUT fields jsonb)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_unionpay_answer_fields.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body';
        RETURN;
    END IF;
    failure := callback_center._unionpay_verify(_unionpay_answer_fields.provider,
                                                _unionpay_answer_fields.secrets, names, vals);
    IF failure IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT jsonb_object_agg(x.nm, convert_from(x.v, 'UTF8')) INTO fields
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('signature', 'signPubKeyCert');
END
$$;
