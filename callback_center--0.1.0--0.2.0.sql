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
