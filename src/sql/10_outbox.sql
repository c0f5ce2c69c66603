
-------------------------------------------------------------------------
-- Outbox: endpoints, retry schedules, the outbox table and enqueue.
-- API reference and design notes: doc/outbox.md.
-------------------------------------------------------------------------


-- Retry schedules: delays[k] is the wait after failed attempt k+1.  An
-- endpoint makes cardinality(delays) + 1 attempts unless max_attempts says
-- otherwise (then the last delay repeats).  Each delay is at most 30 days:
-- the worker computes in milliseconds and timestamps, which a delay of
-- centuries overflows.
CREATE TABLE callback_center.retry_schedules (
    name    text PRIMARY KEY
            CHECK (name ~ '^[a-z0-9][a-z0-9_]{0,62}$'),
    delays  interval[] NOT NULL
            CHECK (cardinality(delays) <= 10000
                   AND (cardinality(delays) = 0 OR array_ndims(delays) = 1)
                   AND array_position(delays, NULL) IS NULL
                   AND interval '0' < ALL (delays)
                   AND interval '30 days' >= ALL (delays)),
    builtin boolean NOT NULL DEFAULT false
);

COMMENT ON TABLE callback_center.retry_schedules IS
    'Named retry schedules: the delays between delivery attempts';

INSERT INTO callback_center.retry_schedules (name, delays, builtin) VALUES
    ('default', '{1s,3s,5s}', true),
    ('merchant_erp',
     (SELECT array_agg(interval '5 minutes') FROM generate_series(1, 288)),
     true);

-- Built-in schedules come with the extension (and are not dumped); they
-- cannot be changed, only copied under another name.
CREATE FUNCTION callback_center._retry_schedules_guard()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF OLD.builtin THEN
        RAISE EXCEPTION USING
            ERRCODE = '42501',
            MESSAGE = format('cannot change built-in retry schedule "%s"', OLD.name),
            HINT = 'Insert a schedule under a new name and point the endpoint at it.';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION callback_center._retry_schedules_guard() FROM PUBLIC;

CREATE TRIGGER retry_schedules_guard
    BEFORE UPDATE OR DELETE ON callback_center.retry_schedules
    FOR EACH ROW EXECUTE FUNCTION callback_center._retry_schedules_guard();

-- Endpoints: where events go and how they are delivered.  Changed only
-- through the admin functions below.
CREATE TABLE callback_center.endpoints (
    id                    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                  text NOT NULL UNIQUE
                          CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    url                   text NOT NULL CHECK (length(url) <= 2048),
    event_types           text[] NOT NULL
                          CHECK (cardinality(event_types) >= 1
                                 AND array_ndims(event_types) = 1
                                 AND array_position(event_types, NULL) IS NULL
                                 AND array_position(event_types, '') IS NULL),
    timeout_ms            integer NOT NULL DEFAULT 5000
                          CHECK (timeout_ms BETWEEN 1 AND 600000),
    retry_schedule        text NOT NULL DEFAULT 'default'
                          REFERENCES callback_center.retry_schedules (name),
    max_attempts          integer CHECK (max_attempts >= 1),
    rate_limit_per_s      numeric CHECK (rate_limit_per_s > 0),
    breaker_failure_ratio numeric NOT NULL DEFAULT 0.5
                          CHECK (breaker_failure_ratio > 0
                                 AND breaker_failure_ratio <= 1),
    breaker_window_s      integer NOT NULL DEFAULT 10
                          CHECK (breaker_window_s >= 1),
    breaker_min_requests  integer NOT NULL DEFAULT 20
                          CHECK (breaker_min_requests >= 1),
    breaker_open_ms       integer NOT NULL DEFAULT 5000
                          CHECK (breaker_open_ms >= 1),
    is_core               boolean NOT NULL DEFAULT true,
    ordered               boolean NOT NULL DEFAULT false,
    enabled               boolean NOT NULL DEFAULT true,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    -- How requests to it are shaped (46_adapters.sql): standard_webhooks,
    -- or a payment provider's own API, signed with the merchant's key.
    format                text NOT NULL DEFAULT 'standard_webhooks'
                          CHECK (format IN ('standard_webhooks', 'wechatpay_v3',
                                            'alipay', 'unionpay'))
);

COMMENT ON TABLE callback_center.endpoints IS
    'Receivers of outbox events; secrets live in endpoint_secrets';

-- Secrets apart, so that reading endpoint settings never exposes them.
CREATE TABLE callback_center.endpoint_secrets (
    endpoint_id     integer PRIMARY KEY
                    REFERENCES callback_center.endpoints (id) ON DELETE CASCADE,
    secret          text NOT NULL CHECK (secret LIKE 'whsec\_%'),
    previous_secret text CHECK (previous_secret LIKE 'whsec\_%'),
    rotated_at      timestamptz
);

COMMENT ON TABLE callback_center.endpoint_secrets IS
    'Standard Webhooks signing secrets; readable by callback_center_admin only';

-- The outbox.  Rows are only ever inserted by enqueue; the worker moves
-- them pending -> delivering -> delivered or dead.  No foreign key to
-- endpoints: the check would lock the endpoint row (FOR KEY SHARE) in every
-- enqueuing transaction; drop_endpoint removes an endpoint's rows instead.
CREATE TABLE callback_center.outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id      integer NOT NULL,
    event_type       text NOT NULL,
    aggregate_id     text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivering', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_http_status integer,
    last_error       text
)
-- A queue table: almost every row is updated twice soon after insert and
-- then never again.  With the default 20% scale factor a table of millions
-- of delivered rows would collect hundreds of thousands of dead tuples (and
-- dead entries in the small partial indexes the drain scans) before
-- autovacuum looked at it; vacuum after 1% instead, analyze after 2%, and
-- vacuum insert-mostly stretches after 5% to keep the visibility map set.
WITH (autovacuum_vacuum_scale_factor = 0.01,
      autovacuum_vacuum_threshold = 1000,
      autovacuum_analyze_scale_factor = 0.02,
      autovacuum_vacuum_insert_scale_factor = 0.05);

COMMENT ON TABLE callback_center.outbox IS
    'Transactional outbox: one row per event per endpoint; webhook-id is ''msg_'' || id';

-- What the drain scans: only undelivered rows, so it stays small however
-- long the history grows.  The worker claims per endpoint (each with its
-- own quota from its breaker and rate limit), oldest due first.
CREATE INDEX outbox_due ON callback_center.outbox (endpoint_id, next_attempt_at)
    WHERE status IN ('pending', 'delivering');
-- Per-aggregate ordering: the oldest undelivered event of an aggregate for
-- an endpoint goes first.
CREATE INDEX outbox_aggregate ON callback_center.outbox (endpoint_id, aggregate_id, id)
    WHERE status IN ('pending', 'delivering');

-- pg_dump keeps what users created.
SELECT pg_catalog.pg_extension_config_dump('callback_center.retry_schedules', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('callback_center.endpoints', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.endpoints_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.endpoint_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.outbox_id_seq', '');

-- Settings without secrets, for everyone who may know where events go.
CREATE VIEW callback_center.endpoint_config AS
SELECT e.id, e.name, e.url, e.event_types, e.timeout_ms, e.retry_schedule,
       coalesce(e.max_attempts, cardinality(s.delays) + 1) AS max_attempts,
       e.rate_limit_per_s, e.breaker_failure_ratio, e.breaker_window_s,
       e.breaker_min_requests, e.breaker_open_ms, e.is_core, e.ordered,
       e.enabled, e.created_at, e.updated_at, e.format
  FROM callback_center.endpoints e
  JOIN callback_center.retry_schedules s ON s.name = e.retry_schedule;

COMMENT ON VIEW callback_center.endpoint_config IS
    'Endpoint settings without secrets; max_attempts is the effective limit';

-- Grants.  The app reads settings and the outbox it writes, but not the
-- payloads: an event may carry columns of a table some members of the app
-- role may not read (doc/fsm.md); the admin also reads payloads and
-- secrets and manages retry schedules (built-ins are guarded).
GRANT SELECT ON callback_center.endpoint_config TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.outbox TO callback_center_admin;
GRANT SELECT (id, endpoint_id, event_type, aggregate_id, status, attempts, next_attempt_at,
              created_at, delivered_at, last_http_status, last_error)
    ON callback_center.outbox TO callback_center_app;
GRANT SELECT ON callback_center.retry_schedules TO callback_center_admin, callback_center_app;
GRANT INSERT (name, delays), UPDATE (delays), DELETE
    ON callback_center.retry_schedules TO callback_center_admin;
GRANT SELECT ON callback_center.endpoints TO callback_center_admin;
GRANT SELECT ON callback_center.endpoint_secrets TO callback_center_admin;
-- The delivery worker: claims and settles events, signs with the secrets,
-- disables an endpoint whose URL stopped passing (src/queue.c).
GRANT SELECT, UPDATE ON callback_center.outbox TO callback_center_worker;
GRANT SELECT ON callback_center.endpoints, callback_center.endpoint_secrets,
    callback_center.retry_schedules TO callback_center_worker;
GRANT UPDATE (enabled, updated_at) ON callback_center.endpoints TO callback_center_worker;

-------------------------------------------------------------------------
-- Internal helpers (not granted to anyone; the SECURITY DEFINER functions
-- below run as the extension owner).
-------------------------------------------------------------------------

-- Returns url when its host may be delivered to under the destination list
-- allowed (NULL: callback_center.allowed_destinations), raises CB041
-- otherwise (src/url_check.c).  The worker checks every connection
-- again, on the resolved address.
CREATE FUNCTION callback_center._check_destination(url text, allowed text DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_check_destination'
LANGUAGE C STABLE PARALLEL SAFE;
REVOKE ALL ON FUNCTION callback_center._check_destination(text, text) FROM PUBLIC;

-- Returns url when it is an absolute http(s) URL with a host and no
-- credentials, at most 2048 characters, as libcurl's URL parser (the one
-- the delivery uses) reads it, and callback_center.allowed_destinations
-- allows its host; raises 22004 for NULL, 22023 naming the problem, or
-- CB041 for a destination not allowed (src/url_check.c).
CREATE FUNCTION callback_center._check_url(url text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_check_url'
LANGUAGE C STABLE;
REVOKE ALL ON FUNCTION callback_center._check_url(text) FROM PUBLIC;

-- A new endpoint secret: whsec_ and 32 random bytes in base64, from the
-- generator of every secret (src/signature.c, as new_webhook_secret).
CREATE FUNCTION callback_center._new_endpoint_secret()
RETURNS text
AS 'MODULE_PATHNAME', 'cc_new_endpoint_secret'
LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION callback_center._new_endpoint_secret() FROM PUBLIC;

-- Returns secret when it is a Standard Webhooks secret (whsec_ and the
-- base64 of 24 to 64 bytes), or a new random one when secret is NULL.
CREATE FUNCTION callback_center._check_secret(secret text)
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
REVOKE ALL ON FUNCTION callback_center._check_secret(text) FROM PUBLIC;

-- Returns the id of endpoint name, raising CB040 when there is none.
-- lock_row takes FOR UPDATE on it (admin changes serialize on the row).
CREATE FUNCTION callback_center._endpoint_id(name text, lock_row boolean)
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
REVOKE ALL ON FUNCTION callback_center._endpoint_id(text, boolean) FROM PUBLIC;

-- Raises 22023 unless value is a JSON number that is a whole number in
-- [lo, hi]; returns it.
CREATE FUNCTION callback_center._option_int(key text, value jsonb, lo integer, hi integer)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    n numeric;
BEGIN
    IF jsonb_typeof(value) <> 'number' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('endpoint option "%s" must be a number', key);
    END IF;
    n := value::numeric;
    IF n <> trunc(n) OR n < lo OR n > hi THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('endpoint option "%s" must be a whole number between %s and %s',
                             key, lo, hi),
            DETAIL = format('The value given was %s.', value);
    END IF;
    RETURN n::integer;
END
$$;
REVOKE ALL ON FUNCTION callback_center._option_int(text, jsonb, integer, integer) FROM PUBLIC;

-- Applies options (a JSON object of endpoint settings) to endpoint id.
-- Every key is checked before anything changes; unknown keys, wrong types
-- and out-of-range values raise 22023 naming the option.
CREATE FUNCTION callback_center._endpoint_apply(id integer, options jsonb)
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
REVOKE ALL ON FUNCTION callback_center._endpoint_apply(integer, jsonb) FROM PUBLIC;

-------------------------------------------------------------------------
-- Admin functions (callback_center_admin only).
-------------------------------------------------------------------------

-- Creates an endpoint and its secret; returns its id.
CREATE FUNCTION callback_center.create_endpoint(
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

-- Changes any of the settings named in options.
CREATE FUNCTION callback_center.alter_endpoint(name text, options jsonb)
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

-- Turns delivery of new events to the endpoint on or off.
CREATE FUNCTION callback_center.set_endpoint_enabled(name text, enabled boolean)
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

-- Replaces the secret (keeping the old one as previous_secret, so the
-- worker can sign with both during the switch); returns the new secret.
CREATE FUNCTION callback_center.rotate_endpoint_secret(name text, new_secret text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep_id integer := callback_center._endpoint_id(rotate_endpoint_secret.name, true);
    s text := callback_center._check_secret(new_secret);
BEGIN
    UPDATE callback_center.endpoint_secrets es
       SET previous_secret = es.secret, secret = s, rotated_at = now()
     WHERE es.endpoint_id = ep_id;
    RETURN s;
END
$$;

-- Removes the endpoint, its secret and all its outbox rows; returns how
-- many outbox rows went.  The SHARE lock waits for transactions that are
-- enqueuing and keeps new ones out until we commit, so no row for the
-- endpoint can be added behind our back (outbox has no foreign key).
CREATE FUNCTION callback_center.drop_endpoint(name text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep_id integer;
    removed bigint;
BEGIN
    LOCK TABLE callback_center.outbox IN SHARE MODE;
    ep_id := callback_center._endpoint_id(drop_endpoint.name, true);
    DELETE FROM callback_center.outbox o WHERE o.endpoint_id = ep_id;
    GET DIAGNOSTICS removed = ROW_COUNT;
    DELETE FROM callback_center.endpoints e WHERE e.id = ep_id;
    RETURN removed;
END
$$;

-- The endpoint's current signing secret.
CREATE FUNCTION callback_center.endpoint_secret(name text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER STABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep_id integer := callback_center._endpoint_id(endpoint_secret.name, false);
BEGIN
    RETURN (SELECT es.secret FROM callback_center.endpoint_secrets es
             WHERE es.endpoint_id = ep_id);
END
$$;

REVOKE ALL ON FUNCTION
    callback_center.create_endpoint(text, text, text[], text, jsonb),
    callback_center.alter_endpoint(text, jsonb),
    callback_center.set_endpoint_enabled(text, boolean),
    callback_center.rotate_endpoint_secret(text, text),
    callback_center.drop_endpoint(text),
    callback_center.endpoint_secret(text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    callback_center.create_endpoint(text, text, text[], text, jsonb),
    callback_center.alter_endpoint(text, jsonb),
    callback_center.set_endpoint_enabled(text, boolean),
    callback_center.rotate_endpoint_secret(text, text),
    callback_center.drop_endpoint(text),
    callback_center.endpoint_secret(text)
    TO callback_center_admin;

-------------------------------------------------------------------------
-- Enqueue (the application's way to emit events).
-------------------------------------------------------------------------

-- Marks the current transaction as having queued work, so that its commit
-- wakes the worker (src/outbox.c).
CREATE FUNCTION callback_center._outbox_note_enqueue()
RETURNS void
AS 'MODULE_PATHNAME', 'cc_outbox_note_enqueue'
LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION callback_center._outbox_note_enqueue() FROM PUBLIC;

-- The size of an event as callback_center.max_event_size counts it: the
-- bytes of event type, aggregate id and payload (in its jsonb form),
-- uncompressed (src/outbox.c).  The worker's claim reads it.
CREATE FUNCTION callback_center._event_size(event_type text, aggregate_id text, payload jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cc_event_size_sql'
LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
REVOKE ALL ON FUNCTION callback_center._event_size(text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center._event_size(text, text, jsonb) TO callback_center_worker;

-- Queues one row per enabled endpoint subscribed to event_type (or to
-- '*'), in the caller's transaction; returns how many (0: no subscriber).
-- In C (src/outbox.c): a per-backend subscription list and a prepared
-- INSERT keep it close to the cost of a plain INSERT.
CREATE FUNCTION callback_center.enqueue(event_type text, aggregate_id text, payload jsonb)
RETURNS integer
AS 'MODULE_PATHNAME', 'cc_enqueue'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, callback_center;

-- Any change to endpoints makes every backend reload its subscription
-- list (a relcache invalidation; see src/outbox.c).
CREATE FUNCTION callback_center._outbox_endpoints_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cc_outbox_endpoints_changed'
LANGUAGE C;
REVOKE ALL ON FUNCTION callback_center._outbox_endpoints_changed() FROM PUBLIC;

CREATE TRIGGER endpoints_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callback_center.endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION callback_center._outbox_endpoints_changed();

-- The outbox's one writer for a single endpoint (src/outbox.c, beside
-- enqueue): queues one event for endpoint_id whatever it subscribes to,
-- with enqueue's checks (22004, 22023, 54000), ordering lock and wake-up;
-- returns the row's id, NULL when the endpoint is disabled or gone.
CREATE FUNCTION callback_center._enqueue_one(
    endpoint_id integer, event_type text, aggregate_id text, payload jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cc_enqueue_one'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
REVOKE ALL ON FUNCTION callback_center._enqueue_one(integer, text, text, jsonb) FROM PUBLIC;

-- Queues one event for one named endpoint, whatever it subscribes to;
-- returns 1, or 0 when the endpoint is disabled.  CB040 if unknown.
CREATE FUNCTION callback_center.enqueue_to(
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

REVOKE ALL ON FUNCTION
    callback_center.enqueue(text, text, jsonb),
    callback_center.enqueue_to(text, text, text, jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    callback_center.enqueue(text, text, jsonb),
    callback_center.enqueue_to(text, text, text, jsonb)
    TO callback_center_admin, callback_center_app;
