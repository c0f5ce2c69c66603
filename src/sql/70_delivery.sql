
-- Delivery: what the worker records, dead letters and replay, and the
-- views operators watch.

-- One row per HTTP attempt.  Written by the worker in one statement per
-- batch; BRIN on the time column keeps the metrics scans cheap without a
-- b-tree to maintain per insert.
CREATE TABLE callback_center.delivery_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id     bigint NOT NULL,
    endpoint_id   integer NOT NULL,
    attempt       integer NOT NULL,
    http_status   integer,
    latency_ms    real NOT NULL,
    error         text,
    response_body text,
    attempted_at  timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX delivery_attempts_outbox ON callback_center.delivery_attempts (outbox_id);
CREATE INDEX delivery_attempts_at ON callback_center.delivery_attempts USING brin (attempted_at);
COMMENT ON TABLE callback_center.delivery_attempts IS
    'Every delivery attempt: status, latency, error, capped response body';

-- Breaker and rate-limit state of each endpoint, published by the worker
-- (its own memory is the truth; this is the view of it).  Not marked for
-- pg_dump: it is runtime state the worker only writes, never reads back; a
-- restored database starts with closed breakers and full buckets, and its
-- worker publishes their state again.
CREATE TABLE callback_center.endpoint_state (
    endpoint_id integer PRIMARY KEY,
    breaker     text NOT NULL CHECK (breaker IN ('closed', 'open', 'half_open')),
    opened_at   timestamptz,
    window_ok   integer NOT NULL,
    window_fail integer NOT NULL,
    tokens      double precision,
    degraded    boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL
);
COMMENT ON TABLE callback_center.endpoint_state IS
    'Circuit breaker and token bucket of each endpoint as the worker last saw them';

-- Every replay of a dead letter, who asked and why.
CREATE TABLE callback_center.replay_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id   bigint NOT NULL,
    endpoint_id integer NOT NULL,
    attempts_before integer NOT NULL,
    last_error  text,
    replayed_by text NOT NULL DEFAULT session_user,  -- who asked (not the definer)
    reason      text,
    replayed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replay_audit_outbox ON callback_center.replay_audit (outbox_id);

-- The identity sequences too: without their state a restored table would
-- hand out its ids again from 1, and the next insert would hit a
-- duplicate key.
SELECT pg_catalog.pg_extension_config_dump('callback_center.delivery_attempts', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.delivery_attempts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.replay_audit', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.replay_audit_id_seq', '');

-- Dead letters with their endpoint, newest first.
CREATE VIEW callback_center.dead_letters AS
SELECT o.id, 'msg_' || o.id AS webhook_id, e.name AS endpoint, o.event_type, o.aggregate_id,
       o.payload, o.attempts, o.last_http_status, o.last_error, o.created_at,
       o.next_attempt_at AS died_at
  FROM callback_center.outbox o
  JOIN callback_center.endpoints e ON e.id = o.endpoint_id
 WHERE o.status = 'dead';

-- Replays selected dead letters: they become pending with a fresh attempt
-- count and are delivered again under the same webhook-id (receivers that
-- de-duplicate still can).  Each replay is audited.  Returns how many.
CREATE FUNCTION callback_center._replay(ids bigint[], reason text)
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, callback_center
AS $$
    WITH picked AS (
        SELECT o.id FROM callback_center.outbox o
         WHERE o.id = ANY (ids) AND o.status = 'dead'
         FOR UPDATE),
    audit AS (
        INSERT INTO callback_center.replay_audit (outbox_id, endpoint_id, attempts_before, last_error, reason)
        SELECT o.id, o.endpoint_id, o.attempts, o.last_error, reason
          FROM callback_center.outbox o JOIN picked USING (id)),
    upd AS (
        UPDATE callback_center.outbox o
           SET status = 'pending', attempts = 0, next_attempt_at = now()
          FROM picked WHERE o.id = picked.id
        RETURNING 1)
    SELECT count(*) FROM upd
$$;

CREATE FUNCTION callback_center.replay_dead(outbox_id bigint, reason text DEFAULT NULL)
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

-- Replays the dead letters of one endpoint (or all with NULL) that died in
-- [since, until).  Returns how many.
CREATE FUNCTION callback_center.replay_dead(endpoint text, since timestamptz DEFAULT '-infinity',
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

-- Per-endpoint delivery figures over the last `window` (default 1 hour):
-- events delivered, failed attempts, retries, dead letters now, latency
-- percentiles of the attempts, backlog, breaker and rate-limit state.
CREATE FUNCTION callback_center.delivery_stats(window_len interval DEFAULT '1 hour')
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

-- The alert thresholds of the design: failure rate over 1%, more than 10
-- dead letters, p99 latency over 3 s, or an open breaker.
CREATE VIEW callback_center.delivery_stats AS
SELECT * FROM callback_center.delivery_stats();

CREATE VIEW callback_center.health AS
SELECT s.endpoint,
       array_remove(ARRAY[
           CASE WHEN s.failure_rate > 0.01 THEN format('failure rate %s%% over 1%%', round(s.failure_rate::numeric * 100, 2)) END,
           CASE WHEN s.dead > 10 THEN format('%s dead letters (over 10)', s.dead) END,
           CASE WHEN s.p99_ms > 3000 THEN format('p99 latency %s ms (over 3000)', round(s.p99_ms::numeric)) END,
           CASE WHEN s.breaker <> 'closed' THEN format('breaker %s', s.breaker) END,
           CASE WHEN NOT s.enabled THEN 'disabled' END], NULL) AS alerts,
       s.failure_rate, s.dead, s.p99_ms, s.breaker, s.enabled
  FROM callback_center.delivery_stats() s;

REVOKE ALL ON FUNCTION callback_center._replay(bigint[], text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.replay_dead(bigint, text),
    callback_center.replay_dead(text, timestamptz, timestamptz, text),
    callback_center.delivery_stats(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.replay_dead(bigint, text),
    callback_center.replay_dead(text, timestamptz, timestamptz, text),
    callback_center.delivery_stats(interval) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.delivery_stats(interval) TO callback_center_app;
GRANT INSERT ON callback_center.delivery_attempts TO callback_center_worker;
GRANT SELECT, INSERT, UPDATE ON callback_center.endpoint_state TO callback_center_worker;
GRANT SELECT ON callback_center.dead_letters, callback_center.delivery_stats, callback_center.health,
    callback_center.endpoint_state, callback_center.delivery_attempts, callback_center.replay_audit
    TO callback_center_admin;
GRANT SELECT ON callback_center.delivery_stats, callback_center.health TO callback_center_app;
