
-- Compensation jobs (doc/jobs.md): the timeout close of unpaid orders and
-- the active query of payments stuck in PAYING.  Plain SQL functions, so
-- they can be run by hand; the "callback_center jobs" background worker
-- (src/jobs.c) calls them on its clock, one bounded batch per transaction.

-- ------------------------------------------------------------------------
-- Timeout close
-- ------------------------------------------------------------------------

-- Orders whose close raised (a trigger of the user's refusing it, say),
-- written by the jobs worker after the failed attempt, in a transaction of
-- its own.  An order is not tried again before retry_at (backing off from
-- 1 s, doubling, to 5 minutes), so failing orders, however many, never keep
-- the job from the orders behind them.  The row goes when the order is
-- closed; a row whose order no longer waits for money goes with the next
-- failure noted.
CREATE TABLE callback_center.close_failures (
    order_id   text PRIMARY KEY,
    failures   integer NOT NULL,
    last_error text,
    failed_at  timestamptz NOT NULL,
    retry_at   timestamptz NOT NULL
);
COMMENT ON TABLE callback_center.close_failures IS
    'Orders the timeout close failed on, and when they are tried again';
SELECT pg_catalog.pg_extension_config_dump('callback_center.close_failures', '');
GRANT SELECT ON callback_center.close_failures TO callback_center_admin;

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
CREATE VIEW callback_center._orders_due AS
    SELECT o.order_id, o.pay_deadline
      FROM callback_center.orders o
     WHERE o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')
       AND o.pay_deadline <= pg_catalog.now()
       AND NOT EXISTS (SELECT 1 FROM callback_center.close_failures f
                        WHERE f.order_id = o.order_id AND f.retry_at > pg_catalog.now())
       AND (o.pay_deadline <= pg_catalog.now() - callback_center._close_query_max_wait()
            OR NOT EXISTS (SELECT 1 FROM callback_center._asked_before_close a
                            WHERE a.order_id = o.order_id));

-- Records that closing order_id raised error: one more failure, tried
-- again after 2^(failures - 1) seconds, at most 5 minutes.  Also drops the
-- rows of orders no longer waiting for money.  Returns when it is retried.
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

-- Closes orders the caller has locked and found due: locks their payments
-- (SKIP LOCKED: an order whose payment someone else holds is left for a
-- later round), then payment CLOSED, order pay status closed (timeout)
-- and status closed (emitting order.closed, which carries the closed pay
-- status), stock restored and coupon unfrozen.  Set-based: plain UPDATEs
-- under the state-machine triggers (which check every move and record
-- it), not one apply_event call per row.  Returns how many were closed.
CREATE FUNCTION callback_center._close_locked_orders(ids text[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    held text[];
    done text[];
BEGIN
    held := ARRAY(SELECT p.order_id FROM callback_center.payments p
                   WHERE p.order_id = ANY (ids)
                   ORDER BY p.order_id
                     FOR UPDATE SKIP LOCKED);
    done := ARRAY(SELECT i FROM unnest(ids) i
                   WHERE i = ANY (held)
                      OR NOT EXISTS (SELECT 1 FROM callback_center.payments p
                                      WHERE p.order_id = i));
    IF cardinality(done) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE callback_center.payments p SET status = 'CLOSED', updated_at = now()
     WHERE p.order_id = ANY (done) AND p.status IN ('CREATED', 'PAYING');
    DELETE FROM callback_center.close_failures f WHERE f.order_id = ANY (done);
    UPDATE callback_center.orders o SET pay_status = 'closed', updated_at = now()
     WHERE o.order_id = ANY (done);
    UPDATE callback_center.orders o SET status = 'closed'
     WHERE o.order_id = ANY (done);
    PERFORM count(*) FROM unnest(done) i, LATERAL callback_center.restore_stock(i) r;
    PERFORM count(callback_center.unfreeze_coupon(o.coupon_id, o.order_id))
       FROM callback_center.orders o
      WHERE o.order_id = ANY (done) AND o.coupon_id IS NOT NULL;
    RETURN cardinality(done);
END
$$;

-- Closes one order whose pay deadline has passed, in the caller's
-- transaction: payment CLOSED, order pay status and status closed (emitting
-- order.closed), stock restored, coupon unfrozen.  The order and its
-- payment are locked with SKIP LOCKED and the order is re-checked under
-- the lock, so a payment callback running at the same time and this close
-- never both win: whichever locks the order first decides, and the other
-- sees its result (the callback then takes the late-payment path).
-- Returns true when this call closed the order, false when it was not
-- due, no longer waiting for money, or busy (locked by someone else: try
-- again later).  CB050 when the order does not exist.
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

-- Closes up to max_orders orders whose pay deadline has passed, oldest
-- deadline first, found through the partial index orders_pay_deadline
-- (the view _orders_due, which passes over orders backing off after a
-- failed close) and locked with SKIP LOCKED (under READ COMMITTED the lock
-- re-checks the condition against the newest row version, so an order
-- paid meanwhile is passed over); orders or payments locked by others are
-- skipped, never waited for.  Each order is closed entirely in the caller's transaction,
-- exactly once.  Returns how many were closed.
CREATE FUNCTION callback_center.close_expired_orders(max_orders integer DEFAULT 100)
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

-- ------------------------------------------------------------------------
-- Active query
-- ------------------------------------------------------------------------

-- Every status query sent for a payment stuck in PAYING, and what came of
-- it.  status: sent (the payment.query event is in the outbox), answered
-- (the answer was applied, outcome says how), failed (no usable answer:
-- the delivery died, the event is gone, or applying it raised; error says
-- why).  Each answer is applied at most once: the row moves out of sent in
-- the transaction that applies it.
CREATE TABLE callback_center.payment_queries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id  text NOT NULL,
    order_id    text NOT NULL,
    provider    text NOT NULL,
    endpoint_id integer NOT NULL,
    outbox_id   bigint NOT NULL,
    status      text NOT NULL DEFAULT 'sent'
                CHECK (status IN ('sent', 'answered', 'failed')),
    answer      text,
    outcome     text,
    error       text,
    queried_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CHECK ((status = 'sent') = (finished_at IS NULL))
);
COMMENT ON TABLE callback_center.payment_queries IS
    'Status queries sent to providers for payments stuck in PAYING, and their outcome';
CREATE INDEX payment_queries_sent ON callback_center.payment_queries (outbox_id)
    WHERE status = 'sent';
CREATE INDEX payment_queries_payment ON callback_center.payment_queries (payment_id, queried_at);

SELECT pg_catalog.pg_extension_config_dump('callback_center.payment_queries', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.payment_queries_id_seq', '');
GRANT SELECT ON callback_center.payment_queries TO callback_center_admin;

-- True when url is https, read as the delivery reads it (http_parse_url in
-- src/http.c: the scheme is a case-insensitive prefix, http:// or https://).
CREATE FUNCTION callback_center._url_is_https(url text)
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
    SELECT lower(left(url, 8)) = 'https://'
$$;

-- Names the endpoint that answers a provider's status queries (admin);
-- NULL stops querying it.  The answers of a standard_webhooks endpoint are
-- applied to payments and carry no signature the extension verifies, so
-- only TLS vouches for them: such an endpoint whose URL is not https is
-- refused (22023) unless allow_plain_http, recorded in
-- providers.query_allow_plain_http.  An endpoint of a provider format
-- (endpoint option "format") is the provider's API: its answers are verified
-- with the provider's key, over any scheme.
-- CB033 unknown provider, CB040 unknown endpoint.
CREATE FUNCTION callback_center.set_provider_query_endpoint(provider text, endpoint text,
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

-- Each provider's query endpoint, its URL, and whether answers over plain
-- http are accepted from it (admin).
CREATE VIEW callback_center.provider_query_endpoints AS
    SELECT p.name AS provider, p.query_endpoint AS endpoint, e.url,
           p.query_allow_plain_http AS allow_plain_http
      FROM callback_center.providers p
      JOIN callback_center.endpoints e ON e.name = p.query_endpoint;
REVOKE ALL ON callback_center.provider_query_endpoints FROM PUBLIC;
GRANT SELECT ON callback_center.provider_query_endpoints TO callback_center_admin;

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

-- Sends a status query (event payment.query, to the provider's query
-- endpoint only) for up to max_payments payments that have been PAYING for
-- at least older_than (default callback_center.pay_query_after) and have no
-- query in flight nor one sent within min_interval (default
-- callback_center.pay_query_interval).  Payments locked by others are
-- skipped.  Returns how many queries were sent.
CREATE FUNCTION callback_center.query_stuck_payments(max_payments integer DEFAULT 100,
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

-- Applies a provider's answer (the response body of the delivered
-- payment.query) to the query's payment through the same path as
-- payment_callback (_apply_payment_result, source 'query'), once: the
-- query becomes answered with the outcome, or failed: outcome plain_http
-- (its endpoint is not https and the provider's query endpoint with
-- allow_plain_http is not that one), endpoint_gone (nothing vouches for
-- the channel), or bad_answer (the body is not a payment message for that
-- order).  Calling it again for a finished query changes nothing and
-- returns the recorded outcome.  42704 when the query does not exist.
CREATE FUNCTION callback_center._apply_query_answer(query_id bigint, answer text)
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

-- Finishes up to max_queries queries whose event has been delivered (the
-- answer is the 2xx response body the worker kept), has died, or is gone;
-- not those a provider-format endpoint answered (apply_provider_answers).
-- Each is applied in its own subtransaction: one that raises is recorded
-- as failed with the error, and the payment is queried again later.
-- Queries locked by others are skipped.  Returns how many were finished.
CREATE FUNCTION callback_center.apply_query_answers(max_queries integer DEFAULT 100)
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

REVOKE ALL ON callback_center._orders_due FROM PUBLIC;
REVOKE ALL ON callback_center._asked_before_close FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._close_locked_orders(text[]),
    callback_center._url_is_https(text),
    callback_center._note_close_failure(text, text),
    callback_center._close_order(text),
    callback_center.close_expired_orders(integer),
    callback_center.set_provider_query_endpoint(text, text, boolean),
    callback_center.query_stuck_payments(integer, interval, interval),
    callback_center._apply_query_answer(bigint, text),
    callback_center.apply_query_answers(integer),
    callback_center._close_query_max_wait(),
    callback_center.query_expired_orders(integer),
    callback_center._apply_query_result(bigint, jsonb),
    callback_center.apply_provider_answers(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.close_expired_orders(integer),
    callback_center.set_provider_query_endpoint(text, text, boolean),
    callback_center.query_stuck_payments(integer, interval, interval),
    callback_center.apply_query_answers(integer),
    callback_center.query_expired_orders(integer),
    callback_center.apply_provider_answers(integer)
    TO callback_center_admin;
-- The jobs worker (src/jobs.c) runs these and reads the due orders; the
-- functions run as their owner, the worker role holds nothing else of them.
GRANT EXECUTE ON FUNCTION callback_center.close_expired_orders(integer),
    callback_center.query_stuck_payments(integer, interval, interval),
    callback_center.apply_query_answers(integer),
    callback_center._close_order(text),
    callback_center._note_close_failure(text, text),
    callback_center.query_expired_orders(integer),
    callback_center.apply_provider_answers(integer)
    TO callback_center_worker;
GRANT SELECT ON callback_center._orders_due TO callback_center_worker;
-- _orders_due calls it: a view's functions run with its reader's rights.
GRANT EXECUTE ON FUNCTION callback_center._close_query_max_wait() TO callback_center_worker;

-- What the jobs worker has done since it started (needs
-- shared_preload_libraries; 55000 otherwise).
CREATE FUNCTION callback_center.jobs_status(
    OUT pid integer, OUT started_at timestamptz, OUT rounds bigint,
    OUT orders_closed bigint, OUT queries_sent bigint, OUT answers_applied bigint,
    OUT errors bigint, OUT last_error text)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_jobs_status'
LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION callback_center.jobs_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.jobs_status() TO callback_center_admin;
