-- callback_center 0.1.0 install script, frozen: what release 0.1.0 installed.
-- Never edit this file; src/sql/ builds the current version.
\echo Use "CREATE EXTENSION callback_center" to load this file. \quit

-- Every object lives in this schema and every name in these scripts is
-- qualified.  The control file names pg_catalog so that the schema is
-- created here, as a member, and goes with DROP EXTENSION.
CREATE SCHEMA callback_center;


COMMENT ON SCHEMA callback_center IS
    'callback_center: stock, state machines, idempotent callbacks, outbox and delivery worker';

-- Worker status and wake-up need the library preloaded (they read the
-- shared memory the worker publishes); every other function does not.
CREATE FUNCTION callback_center.worker_status(
    OUT pid integer,
    OUT started_at timestamptz,
    OUT database text,
    OUT reloads bigint,
    OUT loops bigint,
    OUT wakeups bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_worker_status'
LANGUAGE C STRICT VOLATILE;

COMMENT ON FUNCTION callback_center.worker_status() IS
    'State of the background worker; requires shared_preload_libraries';

CREATE FUNCTION callback_center.wake()
RETURNS boolean
AS 'MODULE_PATHNAME', 'cc_wake'
LANGUAGE C STRICT VOLATILE;

COMMENT ON FUNCTION callback_center.wake() IS
    'Wakes the background worker now; returns whether one was running';

-- Roles.  Roles are cluster-wide: they are created once, if missing, and
-- survive DROP EXTENSION (another database may use them).
--   callback_center_admin: manages endpoints, secrets, stock, machines.
--   callback_center_app:   runs the business functions; cannot read
--                          secrets or change endpoints.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'callback_center_admin') THEN
        CREATE ROLE callback_center_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'callback_center_app') THEN
        CREATE ROLE callback_center_app NOLOGIN;
    END IF;
END
$roles$;

GRANT USAGE ON SCHEMA callback_center TO callback_center_admin, callback_center_app;
-- No function in the schema is executable by PUBLIC (sql/roles.sql checks).
REVOKE ALL ON FUNCTION callback_center.wake(), callback_center.worker_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.worker_status()
    TO callback_center_admin, callback_center_app;
GRANT EXECUTE ON FUNCTION callback_center.wake() TO callback_center_admin, callback_center_app;

-------------------------------------------------------------------------
-- Outbox: endpoints, retry schedules, the outbox table and enqueue.
-- API reference and design notes: doc/outbox.md.
-------------------------------------------------------------------------


-- Retry schedules: delays[k] is the wait after failed attempt k+1.  An
-- endpoint makes cardinality(delays) + 1 attempts unless max_attempts says
-- otherwise (then the last delay repeats).
CREATE TABLE callback_center.retry_schedules (
    name    text PRIMARY KEY
            CHECK (name ~ '^[a-z0-9][a-z0-9_]{0,62}$'),
    delays  interval[] NOT NULL
            CHECK (cardinality(delays) <= 10000
                   AND (cardinality(delays) = 0 OR array_ndims(delays) = 1)
                   AND array_position(delays, NULL) IS NULL
                   AND interval '0' < ALL (delays)),
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
    updated_at            timestamptz NOT NULL DEFAULT now()
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
       e.enabled, e.created_at, e.updated_at
  FROM callback_center.endpoints e
  JOIN callback_center.retry_schedules s ON s.name = e.retry_schedule;

COMMENT ON VIEW callback_center.endpoint_config IS
    'Endpoint settings without secrets; max_attempts is the effective limit';

-- Grants.  The app reads settings and the outbox it writes; the admin also
-- reads secrets and manages retry schedules (built-ins are guarded).
GRANT SELECT ON callback_center.endpoint_config TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.outbox TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.retry_schedules TO callback_center_admin, callback_center_app;
GRANT INSERT (name, delays), UPDATE (delays), DELETE
    ON callback_center.retry_schedules TO callback_center_admin;
GRANT SELECT ON callback_center.endpoints TO callback_center_admin;
GRANT SELECT ON callback_center.endpoint_secrets TO callback_center_admin;

-------------------------------------------------------------------------
-- Internal helpers (not granted to anyone; the SECURITY DEFINER functions
-- below run as the extension owner).
-------------------------------------------------------------------------

-- Returns url when its host may be delivered to under the destination list
-- allowed (NULL: callback_center.allowed_destinations), raises CB041
-- otherwise (src/allowlist_guc.c).  The worker checks every connection
-- again, on the resolved address.
CREATE FUNCTION callback_center._check_destination(url text, allowed text DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_check_destination'
LANGUAGE C STABLE PARALLEL SAFE;
REVOKE ALL ON FUNCTION callback_center._check_destination(text, text) FROM PUBLIC;

-- Returns url when it is an absolute http(s) URL with a host that
-- callback_center.allowed_destinations allows; raises 22023 naming the
-- problem, or CB041 for a destination not allowed.
CREATE FUNCTION callback_center._check_url(url text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    authority text;
    host text;
BEGIN
    IF url IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'url must not be null';
    END IF;
    IF length(url) > 2048 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'url is too long',
            DETAIL = format('The url has %s characters; at most 2048 are allowed.', length(url));
    END IF;
    IF url ~ '[[:space:][:cntrl:]]' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'url must not contain whitespace or control characters';
    END IF;
    IF url !~* '^https?://' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('url "%s" must start with http:// or https://', url);
    END IF;
    authority := substring(url FROM '^[A-Za-z]+://([^/?#]*)');
    IF position('@' IN authority) > 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'url must not contain credentials',
            HINT = 'Receivers authenticate deliveries by their signature.';
    END IF;
    -- host, [ipv6] or host:port with a port of 1 to 65535
    host := substring(authority FROM '^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(:[0-9]{1,5})?$');
    IF host IS NULL
       OR coalesce(substring(authority FROM ':([0-9]{1,5})$')::integer, 1)
          NOT BETWEEN 1 AND 65535 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('url "%s" has no valid host', url);
    END IF;
    RETURN callback_center._check_destination(url);
END
$$;
REVOKE ALL ON FUNCTION callback_center._check_url(text) FROM PUBLIC;

-- Returns secret when it is a Standard Webhooks secret (whsec_ and the
-- base64 of 24 to 64 bytes), or a new random one when secret is NULL.
CREATE FUNCTION callback_center._check_secret(secret text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    crypto_schema name;
    raw bytea;
BEGIN
    IF secret IS NULL THEN
        -- pgcrypto is relocatable: find where it lives.
        SELECT n.nspname INTO crypto_schema
          FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
         WHERE x.extname = 'pgcrypto';
        EXECUTE format('SELECT %I.gen_random_bytes(32)', crypto_schema) INTO raw;
        RETURN 'whsec_' || encode(raw, 'base64');
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
    IF name IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'endpoint name must not be null';
    END IF;
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
            ELSIF jsonb_typeof(v) <> 'number' OR v::numeric <= 0 THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = 'endpoint option "rate_limit_per_s" must be a positive number or null';
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
    IF name IS NULL OR url IS NULL OR event_types IS NULL OR options IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'name, url, event_types and options must not be null';
    END IF;
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
    ep_id integer := callback_center._endpoint_id(set_endpoint_enabled.name, true);
BEGIN
    IF enabled IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'enabled must not be null';
    END IF;
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

-- Internal: the lock that makes an aggregate's ids follow commit order for
-- ordered endpoints (src/outbox.c); enqueue() takes it itself.
CREATE FUNCTION callback_center._outbox_lock_aggregate(aggregate_id text)
RETURNS void
AS 'MODULE_PATHNAME', 'cc_outbox_lock_aggregate_sql'
LANGUAGE C STRICT VOLATILE;
REVOKE ALL ON FUNCTION callback_center._outbox_lock_aggregate(text) FROM PUBLIC;

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

-- Queues one event for one named endpoint, whatever it subscribes to;
-- returns 1, or 0 when the endpoint is disabled.  CB040 if unknown.
CREATE FUNCTION callback_center.enqueue_to(
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

REVOKE ALL ON FUNCTION
    callback_center.enqueue(text, text, jsonb),
    callback_center.enqueue_to(text, text, text, jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    callback_center.enqueue(text, text, jsonb),
    callback_center.enqueue_to(text, text, text, jsonb)
    TO callback_center_admin, callback_center_app;

-- HTTP probe (src/http_probe.c over src/http.c): POSTs a body to URLs from
-- SQL with the worker's HTTP layer, to test a receiver by hand.  Admin only:
-- it makes the server open connections to any http(s) address.
CREATE FUNCTION callback_center.http_probe(
    urls text[],
    request_body text DEFAULT '{}',
    headers text[] DEFAULT '{}',
    timeout_ms integer DEFAULT 5000,
    max_concurrent integer DEFAULT 16,
    max_body_bytes integer DEFAULT 65536,
    max_per_host integer DEFAULT NULL)
RETURNS TABLE(
    url text,
    status integer,
    latency_ms double precision,
    body text,
    truncated boolean,
    retry_after_s integer,
    error text)
AS 'MODULE_PATHNAME', 'cc_http_probe'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION callback_center.http_probe(text[], text, text[], integer, integer, integer, integer) IS
    'POSTs request_body to every URL concurrently, as the worker would, and returns one row per URL';

REVOKE ALL ON FUNCTION callback_center.http_probe(text[], text, text[], integer, integer, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.http_probe(text[], text, text[], integer, integer, integer, integer)
    TO callback_center_admin;

-- Stock: one row per SKU, deducted with optimistic locking, and a record of
-- what each order (biz id) took so that a deduction happens once and its
-- restore (the compensation) gives back exactly that, once.  The hot path
-- (deduct_stock, restore_stock) is C in src/stock.c; doc/stock.md explains
-- the locking.  A hot SKU (set_hot_sku) keeps its units in stock_slots.

CREATE TABLE callback_center.stock (
    sku_id      text PRIMARY KEY,
    available   bigint NOT NULL CHECK (available >= 0),
    reserved    bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    version     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz,
    slots       integer NOT NULL DEFAULT 0
);

COMMENT ON TABLE callback_center.stock IS
    'Units per SKU; version goes up by one on every change (optimistic locking); a hot SKU (slots > 0) keeps its units in stock_slots';

-- Hot SKUs (set_hot_sku): the units of a flash-sale SKU are spread over
-- slots 0 .. slots - 1 here, so that buyers lock different rows; the stock
-- row keeps the SKU's identity, version and reserved units, and holds 0
-- available.  Only set_hot_sku inserts or deletes slot rows, always with
-- the stock row locked first; src/stock.c explains the locking.  No foreign
-- key to stock: its RI trigger would fire on every deduction of a normal
-- SKU, and the API never deletes a SKU.  fillfactor 10: a slot row is
-- updated by every buyer, and with many buyers pinning a full page
-- PostgreSQL can rarely prune it, so updates stop being HOT (new index
-- entries, a growing table).  Measured with 32 clients on 32 slots: 60%
-- of updates HOT and 5,400 deductions/s at the default fillfactor, all
-- HOT and 7,800/s at 10 (the slots then spread over 3 pages, not 1).
CREATE TABLE callback_center.stock_slots (
    sku_id      text NOT NULL,
    slot        integer NOT NULL CHECK (slot >= 0),
    available   bigint NOT NULL CHECK (available >= 0),
    PRIMARY KEY (sku_id, slot)
) WITH (fillfactor = 10);

COMMENT ON TABLE callback_center.stock_slots IS
    'Units of hot SKUs, spread over slots that are deducted independently';

-- One row per (order, SKU): what that order took.  A second deduction for
-- the same pair finds the row and changes nothing; a restore flips
-- restored once and gives the quantity back.  There is no foreign key to
-- stock: SKUs are never deleted by the API, and the check would cost every
-- deduction a lookup the UPDATE of the stock row already makes.
CREATE TABLE callback_center.stock_deductions (
    biz_id       text NOT NULL,
    sku_id       text NOT NULL,
    quantity     bigint NOT NULL CHECK (quantity > 0),
    restored     boolean NOT NULL DEFAULT false,
    deducted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    restored_at  timestamptz,
    PRIMARY KEY (biz_id, sku_id),
    CHECK (restored = (restored_at IS NOT NULL))
);

COMMENT ON TABLE callback_center.stock_deductions IS
    'What each biz id (order) deducted per SKU, and whether it was restored';

SELECT pg_catalog.pg_extension_config_dump('callback_center.stock', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.stock_deductions', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.stock_slots', '');

-- The true units of every SKU: a hot SKU's units are in its slots.
CREATE VIEW callback_center.stock_levels AS
SELECT s.sku_id,
       s.available + COALESCE((SELECT sum(t.available)
                                 FROM callback_center.stock_slots AS t
                                WHERE t.sku_id = s.sku_id), 0)::bigint AS available,
       s.reserved,
       s.version,
       s.slots,
       s.updated_at
  FROM callback_center.stock AS s;

COMMENT ON VIEW callback_center.stock_levels IS
    'Available units per SKU, summed over the slots of a hot SKU';

GRANT SELECT ON callback_center.stock TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.stock_deductions TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.stock_slots, callback_center.stock_levels
    TO callback_center_admin, callback_center_app;

-- Internal: sets the units of a hot SKU whose stock row the caller holds
-- locked, spread evenly over its slots (the first total % n slots get one
-- more).  The slots are locked in slot order first, the order every
-- blocking lock on them follows (src/stock.c), before any is changed.
CREATE FUNCTION callback_center._stock_spread(p_sku text, p_total bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    n integer;
BEGIN
    PERFORM 1 FROM callback_center.stock_slots AS t
      WHERE t.sku_id = p_sku ORDER BY t.slot FOR UPDATE;
    SELECT count(*) INTO n FROM callback_center.stock_slots AS t WHERE t.sku_id = p_sku;
    UPDATE callback_center.stock_slots AS t
       SET available = p_total / n + CASE WHEN t.slot < p_total % n THEN 1 ELSE 0 END
     WHERE t.sku_id = p_sku;
END
$fn$;

REVOKE ALL ON FUNCTION callback_center._stock_spread(text, bigint) FROM PUBLIC;

-- Internal: the units of a hot SKU's slots, locked in slot order.
CREATE FUNCTION callback_center._stock_lock_slots(p_sku text)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT COALESCE(sum(l.available), 0)::bigint
      FROM (SELECT t.available FROM callback_center.stock_slots AS t
             WHERE t.sku_id = p_sku ORDER BY t.slot FOR UPDATE) AS l
$fn$;

REVOKE ALL ON FUNCTION callback_center._stock_lock_slots(text) FROM PUBLIC;

-- Admin: sets the units of a SKU, creating it (version 0) or replacing its
-- units (version + 1).
CREATE FUNCTION callback_center.set_stock(
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
    IF p_sku IS NULL OR p_avail IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'sku_id and available must not be null';
    END IF;
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

COMMENT ON FUNCTION callback_center.set_stock(text, bigint) IS
    'Admin: creates a SKU or sets its available units; bumps version';

-- Admin: adds delta (may be negative) to the units of an existing SKU.
-- Never takes available below zero.
CREATE FUNCTION callback_center.adjust_stock(
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
    IF p_sku IS NULL OR p_delta IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'sku_id and delta must not be null';
    END IF;
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

COMMENT ON FUNCTION callback_center.adjust_stock(text, bigint) IS
    'Admin: adds delta to the available units of a SKU, never below zero';

-- Admin: makes a SKU hot, its units spread evenly over slots rows of
-- callback_center.stock_slots (2 to 256), or normal again (slots = 1), its
-- slots gathered back into the stock row.  Run again on a hot SKU, it
-- spreads the current total afresh.  Locks the stock row, then the slots
-- in slot order, so it waits for deductions in flight and counts them.
CREATE FUNCTION callback_center.set_hot_sku(
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
    IF p_sku IS NULL OR p_slots IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'sku_id and slots must not be null';
    END IF;
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

COMMENT ON FUNCTION callback_center.set_hot_sku(text, integer) IS
    'Admin: spreads a SKU over 2 to 256 slot rows (hot) or gathers it back (1); bumps version';

-- The C functions below (deduct_stock, restore_stock) are neither SECURITY
-- DEFINER nor declared with SET search_path: the C code switches to the
-- function's owner and pins the search path (pg_catalog, callback_center,
-- no temp schema) around its own statements, which qualify every name, and
-- saves the GUC save/restore that SET costs on every call.  src/stock.c
-- (stock_enter) gives the reasoning.  EXECUTE is granted as for the others.

-- Deducts quantity units of one SKU for biz_id, once.  With
-- expected_version the deduction is a compare-and-set on the version.
CREATE FUNCTION callback_center.deduct_stock(
    biz_id text,
    sku_id text,
    quantity bigint,
    expected_version bigint DEFAULT NULL,
    OUT sku text,
    OUT qty bigint,
    OUT available bigint,
    OUT version bigint,
    OUT status text)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_deduct_stock'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION callback_center.deduct_stock(text, text, bigint, bigint) IS
    'Deducts units of one SKU for a biz id, once; optional version compare-and-set';

-- Deducts several SKUs for biz_id, all or nothing.  items is a JSON array
-- of {"sku": text, "qty": number, "version": number (optional)}.
CREATE FUNCTION callback_center.deduct_stock(
    biz_id text,
    items jsonb)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint,
    status text)
AS 'MODULE_PATHNAME', 'cc_deduct_stock_items'
LANGUAGE C VOLATILE
ROWS 4;

COMMENT ON FUNCTION callback_center.deduct_stock(text, jsonb) IS
    'Deducts several SKUs for a biz id, all or nothing, once';

-- The same with parallel arrays (no JSON parsing); expected_versions may
-- be NULL as a whole or hold NULL for SKUs without a version check.
CREATE FUNCTION callback_center.deduct_stock(
    biz_id text,
    sku_ids text[],
    quantities bigint[],
    expected_versions bigint[] DEFAULT NULL)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint,
    status text)
AS 'MODULE_PATHNAME', 'cc_deduct_stock_arrays'
LANGUAGE C VOLATILE
ROWS 4;

COMMENT ON FUNCTION callback_center.deduct_stock(text, text[], bigint[], bigint[]) IS
    'Deducts several SKUs for a biz id, all or nothing, once (array form)';

-- Gives back what biz_id deducted and has not yet been restored; returns
-- one row per SKU restored by this call.
CREATE FUNCTION callback_center.restore_stock(
    biz_id text)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint)
AS 'MODULE_PATHNAME', 'cc_restore_stock'
LANGUAGE C VOLATILE
ROWS 4;

COMMENT ON FUNCTION callback_center.restore_stock(text) IS
    'Restores, once, every SKU a biz id deducted; returns what this call restored';

CREATE FUNCTION callback_center.restore_stock(
    biz_id text,
    sku_id text)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint)
AS 'MODULE_PATHNAME', 'cc_restore_stock_sku'
LANGUAGE C VOLATILE
ROWS 1;

COMMENT ON FUNCTION callback_center.restore_stock(text, text) IS
    'Restores, once, one SKU a biz id deducted; returns what this call restored';

REVOKE ALL ON FUNCTION callback_center.set_stock(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.adjust_stock(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.set_hot_sku(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, text, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, text[], bigint[], bigint[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.restore_stock(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.restore_stock(text, text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center.set_stock(text, bigint) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.adjust_stock(text, bigint) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.set_hot_sku(text, integer) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.deduct_stock(text, text, bigint, bigint)
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.deduct_stock(text, jsonb)
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.deduct_stock(text, text[], bigint[], bigint[])
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.restore_stock(text)
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.restore_stock(text, text)
    TO callback_center_app, callback_center_admin;

-- ------------------------------------------------------------------------
-- State machines as data.
--
-- A machine is a set of states and the legal moves between them.  Attaching
-- a machine to a text column of any table puts a C trigger on it
-- (callback_center.fsm_trigger, fired BEFORE and AFTER) that refuses every
-- other move before the row is written, then records each move actually
-- written in state_history and emits the outbox events the transition
-- names.  Rows the install script writes are marked builtin; pg_dump keeps
-- only the others (the script recreates the built-in ones), and keeps the
-- emits chosen later for built-in transitions in builtin_emits.
-- ------------------------------------------------------------------------

CREATE TABLE callback_center.state_machines (
    machine     text PRIMARY KEY
                CHECK (machine <> '' AND octet_length(machine) < 64),
    description text NOT NULL DEFAULT '',
    builtin     boolean NOT NULL DEFAULT false
);

CREATE TABLE callback_center.machine_states (
    machine     text NOT NULL
                REFERENCES callback_center.state_machines ON DELETE CASCADE,
    state       text NOT NULL CHECK (state <> ''),
    is_initial  boolean NOT NULL DEFAULT false,
    is_final    boolean NOT NULL DEFAULT false,
    builtin     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (machine, state)
);

CREATE TABLE callback_center.transitions (
    machine     text NOT NULL,
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    event       text NOT NULL CHECK (event <> ''),
    emits       text[] NOT NULL DEFAULT '{}'
                CHECK (array_position(emits, NULL) IS NULL),
    builtin     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (machine, from_state, to_state),
    UNIQUE (machine, from_state, event),
    -- A move to the same state is no move: the trigger ignores it.
    CHECK (from_state <> to_state),
    FOREIGN KEY (machine, from_state)
        REFERENCES callback_center.machine_states ON DELETE CASCADE,
    FOREIGN KEY (machine, to_state)
        REFERENCES callback_center.machine_states ON DELETE CASCADE
);

-- set_transition_emits() on a built-in transition after installation.
-- pg_dump skips built-in transitions (CREATE EXTENSION makes them again,
-- with the install script's emits), so such a change is kept here too,
-- where pg_dump keeps it; restoring a row applies it again (trigger
-- cc_fsm_builtin_emits).  Changes the install script makes are not kept
-- here: the script makes them again itself.
CREATE TABLE callback_center.builtin_emits (
    machine     text NOT NULL,
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    emits       text[] NOT NULL CHECK (array_position(emits, NULL) IS NULL),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (machine, from_state, to_state),
    FOREIGN KEY (machine, from_state, to_state)
        REFERENCES callback_center.transitions ON DELETE CASCADE
);

CREATE TABLE callback_center.state_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    machine     text NOT NULL,
    table_name  text NOT NULL,          -- schema-qualified, quoted as needed
    entity_id   text NOT NULL,
    from_state  text,                   -- NULL: the row was inserted
    to_state    text NOT NULL,
    event       text,                   -- NULL on insert
    actor       text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX state_history_entity_idx
    ON callback_center.state_history (machine, entity_id, id);

COMMENT ON TABLE callback_center.state_machines IS
    'State machines; rows with builtin = true come with the extension';
COMMENT ON TABLE callback_center.transitions IS
    'Legal moves of each machine; emits lists the outbox event types queued on the move';
COMMENT ON TABLE callback_center.builtin_emits IS
    'Emits set on built-in transitions after installation; pg_dump keeps them and a restore applies them again';
COMMENT ON TABLE callback_center.state_history IS
    'One row per state a row entered under an attached machine';

SELECT pg_catalog.pg_extension_config_dump('callback_center.state_machines', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('callback_center.machine_states', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('callback_center.transitions', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('callback_center.builtin_emits', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.state_history', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.state_history_id_seq', '');

-- Machine definitions are harmless to read; history is for admins.
GRANT SELECT ON callback_center.state_machines, callback_center.machine_states,
    callback_center.transitions, callback_center.builtin_emits
    TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.state_history TO callback_center_admin;

-- The trigger keeps the definitions in a per-backend cache; this statement
-- trigger tells every backend (at commit) to drop it.
CREATE FUNCTION callback_center.fsm_invalidate()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cc_fsm_invalidate'
LANGUAGE C;

REVOKE ALL ON FUNCTION callback_center.fsm_invalidate() FROM PUBLIC;

CREATE TRIGGER cc_fsm_invalidate
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callback_center.state_machines
    FOR EACH STATEMENT EXECUTE FUNCTION callback_center.fsm_invalidate();
CREATE TRIGGER cc_fsm_invalidate
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callback_center.machine_states
    FOR EACH STATEMENT EXECUTE FUNCTION callback_center.fsm_invalidate();
CREATE TRIGGER cc_fsm_invalidate
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callback_center.transitions
    FOR EACH STATEMENT EXECUTE FUNCTION callback_center.fsm_invalidate();

-- A row of builtin_emits sets the transition's emits: when
-- set_transition_emits() writes it, and when a restore does.  Only the
-- extension owner writes the table.
CREATE FUNCTION callback_center._fsm_builtin_emits()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    UPDATE callback_center.transitions t
       SET emits = NEW.emits
     WHERE t.machine = NEW.machine AND t.from_state = NEW.from_state
       AND t.to_state = NEW.to_state;
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION callback_center._fsm_builtin_emits() FROM PUBLIC;

CREATE TRIGGER cc_fsm_builtin_emits
    AFTER INSERT OR UPDATE ON callback_center.builtin_emits
    FOR EACH ROW EXECUTE FUNCTION callback_center._fsm_builtin_emits();

-- True while the callback_center install (or update) script runs.
CREATE FUNCTION callback_center._fsm_installing()
RETURNS boolean
AS 'MODULE_PATHNAME', 'cc_fsm_installing'
LANGUAGE C STABLE;

REVOKE ALL ON FUNCTION callback_center._fsm_installing() FROM PUBLIC;

-- fsm_trigger(machine, state_column, id_column): INSERT OR UPDATE OF
-- state_column FOR EACH ROW, twice: BEFORE (checks the move) and AFTER
-- (records the rows written).  Made by attach_state_machine().
CREATE FUNCTION callback_center.fsm_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cc_fsm_trigger'
LANGUAGE C;

COMMENT ON FUNCTION callback_center.fsm_trigger() IS
    'Enforces an attached state machine; use attach_state_machine() to install it';

-- Creating a trigger needs EXECUTE on its function; firing it does not.
REVOKE ALL ON FUNCTION callback_center.fsm_trigger() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.fsm_trigger() TO callback_center_admin;

-- ------------------------------------------------------------------------
-- Defining machines (callback_center_admin)
-- ------------------------------------------------------------------------

-- Creates an empty machine.  Raises 22004 on NULL, 22023 on a bad name,
-- 42710 if it exists.
CREATE FUNCTION callback_center.create_state_machine(
    machine text,
    description text DEFAULT '')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF machine IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'state machine name cannot be null';
    END IF;
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

-- Raises CB011 when the machine does not exist.  Internal.
CREATE FUNCTION callback_center._fsm_require_machine(machine text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF machine IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'state machine name cannot be null';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM callback_center.state_machines m
                    WHERE m.machine = _fsm_require_machine.machine) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB011',
            MESSAGE = format('state machine "%s" does not exist', machine),
            HINT = 'Create it with callback_center.create_state_machine().';
    END IF;
END
$$;

-- Raises CB011 when the state is not one of the machine's.  Internal.
CREATE FUNCTION callback_center._fsm_require_state(machine text, state text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF state IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'state cannot be null';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM callback_center.machine_states s
                    WHERE s.machine = _fsm_require_state.machine
                      AND s.state = _fsm_require_state.state) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB011',
            MESSAGE = format('unknown state "%s" in state machine "%s"', state, machine),
            HINT = 'Add it with callback_center.add_state().';
    END IF;
END
$$;

-- Adds a state.  Raises 22004, CB011 (no such machine), 42710 (exists).
CREATE FUNCTION callback_center.add_state(
    machine text,
    state text,
    is_initial boolean DEFAULT false,
    is_final boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._fsm_require_machine(machine);
    IF state IS NULL OR is_initial IS NULL OR is_final IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'state, is_initial and is_final cannot be null';
    END IF;
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

-- Adds a legal move.  Raises 22004, CB011 (no such machine or state),
-- 22023 (empty event, from = to, leaves a final state), 42710 (the move or
-- the event from that state exists).
CREATE FUNCTION callback_center.add_transition(
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
    PERFORM callback_center._fsm_require_machine(machine);
    IF from_state IS NULL OR to_state IS NULL OR event IS NULL OR emits IS NULL
       OR array_position(emits, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'from_state, to_state, event and emits (and its elements) cannot be null';
    END IF;
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

-- Replaces the event types a move emits.  On a built-in transition, outside
-- the install script, the choice goes to builtin_emits (whose trigger sets
-- it) so that pg_dump keeps it.  Raises 22004, 22023 (empty name), CB011
-- (no such machine), 42704 (no such transition).
CREATE FUNCTION callback_center.set_transition_emits(
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
    PERFORM callback_center._fsm_require_machine(machine);
    IF from_state IS NULL OR to_state IS NULL OR emits IS NULL
       OR array_position(emits, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'from_state, to_state and emits (and its elements) cannot be null';
    END IF;
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

-- ------------------------------------------------------------------------
-- Attaching machines to tables
-- ------------------------------------------------------------------------

-- Splits pg_trigger.tgargs (NUL-terminated strings).  Internal.
CREATE FUNCTION callback_center._fsm_trigger_args(args bytea)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    result text[] := '{}';
    p integer;
BEGIN
    LOOP
        p := position('\x00'::bytea IN args);
        EXIT WHEN p = 0;
        result := result || convert_from(substring(args FROM 1 FOR p - 1),
                                         getdatabaseencoding());
        args := substring(args FROM p + 1);
    END LOOP;
    RETURN result;
END
$$;

-- A trigger name on tbl starting with base (cut to fit) that no trigger
-- there has yet.  Internal.
CREATE FUNCTION callback_center._fsm_trigger_name(tbl regclass, base text)
RETURNS name
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    candidate text;
    suffix text := '';
    n integer := 1;
BEGIN
    LOOP
        candidate := base;
        WHILE octet_length(candidate || suffix) > 63 LOOP
            candidate := left(candidate, -1);
        END LOOP;
        candidate := candidate || suffix;
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_trigger t
                               WHERE t.tgrelid = tbl AND t.tgname = candidate);
        n := n + 1;
        suffix := '_' || n;
    END LOOP;
    RETURN candidate;
END
$$;

-- Every attached machine, read from the triggers themselves (so it cannot
-- drift from them): one row per BEFORE trigger; its AFTER twin, which
-- records history, has the same arguments.
CREATE VIEW callback_center.state_machine_attachments AS
SELECT t.tgrelid::regclass AS table_name,
       a[2]::name AS state_column,
       a[1] AS machine,
       a[3]::name AS id_column,
       t.tgname AS trigger_name
  FROM pg_catalog.pg_trigger t
  CROSS JOIN LATERAL callback_center._fsm_trigger_args(t.tgargs) AS a
 WHERE t.tgfoid = 'callback_center.fsm_trigger()'::pg_catalog.regprocedure
   AND t.tgnargs = 3
   AND (t.tgtype & 2) <> 0;            -- TRIGGER_TYPE_BEFORE

GRANT SELECT ON callback_center.state_machine_attachments
    TO callback_center_admin, callback_center_app;

-- Puts the triggers enforcing machine on tbl.state_column: cc_fsm_<column>
-- BEFORE INSERT OR UPDATE OF it (checks each move under the row lock) and
-- cc_fsm_<column>_log AFTER INSERT OR UPDATE OF it (records history and
-- emits, only for rows actually written); a suffix _2, _3... is added
-- should a name be taken.  Runs with the
-- caller's rights (creating the trigger needs TRIGGER on tbl).  Returns
-- true when it attached, false when the same machine was already attached
-- the same way.  Raises 22004, 42809 (not a table), 42703 (no such column),
-- 42804 (state column not text or varchar), CB011 (no such machine, or a
-- row holds a state the machine does not know), 42710 (another machine or
-- id column is attached to that column).
CREATE FUNCTION callback_center.attach_state_machine(
    tbl regclass,
    state_column name,
    machine text,
    id_column name DEFAULT 'id')
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    kind "char";
    state_type oid;
    existing record;
    bad text;
    trigger_name name;
    log_trigger_name name;
BEGIN
    IF tbl IS NULL OR state_column IS NULL OR machine IS NULL OR id_column IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'tbl, state_column, machine and id_column cannot be null';
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
    PERFORM callback_center._fsm_require_machine(machine);

    SELECT * INTO existing FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = attach_state_machine.state_column;
    IF FOUND THEN
        IF existing.machine = machine AND existing.id_column = id_column THEN
            RETURN false;
        END IF;
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('column "%s" of table %s already has state machine "%s" attached',
                             state_column, tbl, existing.machine),
            HINT = 'Detach it first with callback_center.detach_state_machine().';
    END IF;

    -- Rows already there must be in states the machine knows.
    EXECUTE format('SELECT %1$I::text FROM %2$s WHERE %1$I IS NOT NULL AND %1$I::text NOT IN '
                   '(SELECT s.state FROM callback_center.machine_states s WHERE s.machine = $1) LIMIT 1',
                   state_column, tbl)
       INTO bad USING machine;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CB011',
            MESSAGE = format('unknown state "%s" in state machine "%s"', bad, machine),
            DETAIL = format('Table %s already has rows in that state.', tbl);
    END IF;

    trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column);
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%L, %L, %L)',
                   trigger_name, state_column, tbl, machine, state_column, id_column);
    log_trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column || '_log');
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%L, %L, %L)',
                   log_trigger_name, state_column, tbl, machine, state_column, id_column);
    RETURN true;
END
$$;

-- Removes the two triggers attach_state_machine() made.  History stays.
-- Raises 22004, 42704 (nothing attached there).
CREATE FUNCTION callback_center.detach_state_machine(
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
           AND t.tgnargs = 3
           AND callback_center._fsm_trigger_args(t.tgargs)
               = ARRAY[att.machine, state_column::text, att.id_column::text]
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION callback_center.create_state_machine(text, text),
    callback_center._fsm_require_machine(text),
    callback_center._fsm_require_state(text, text),
    callback_center._fsm_trigger_name(regclass, text),
    callback_center.add_state(text, text, boolean, boolean),
    callback_center.add_transition(text, text, text, text, text[]),
    callback_center.set_transition_emits(text, text, text, text[]),
    callback_center.attach_state_machine(regclass, name, text, name),
    callback_center.detach_state_machine(regclass, name)
    FROM PUBLIC;
-- attach_state_machine() runs with the caller's rights: its two helpers
-- are granted too.  _fsm_require_state is called only by SECURITY DEFINER
-- functions (as the owner) and granted to no one.
GRANT EXECUTE ON FUNCTION callback_center.create_state_machine(text, text),
    callback_center._fsm_require_machine(text),
    callback_center._fsm_trigger_name(regclass, text),
    callback_center.add_state(text, text, boolean, boolean),
    callback_center.add_transition(text, text, text, text, text[]),
    callback_center.set_transition_emits(text, text, text, text[]),
    callback_center.attach_state_machine(regclass, name, text, name),
    callback_center.detach_state_machine(regclass, name)
    TO callback_center_admin;

-- ------------------------------------------------------------------------
-- Moving entities (callback_center_app)
-- ------------------------------------------------------------------------

-- Applies event to the row of tbl whose id column equals entity_id: locks
-- the row, finds the transition from its current state and updates the
-- state column (the trigger records history and emits).  Returns the new
-- state.  Runs with the caller's rights on tbl.  Raises 22004 (NULL
-- argument or NULL state), 42704 (no machine attached there), P0002 (no
-- such row), CB011 (the machine has no such event), CB010 (the event is
-- not legal from the current state).
CREATE FUNCTION callback_center.apply_event(
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
    IF tbl IS NULL OR state_column IS NULL OR entity_id IS NULL OR event IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'tbl, state_column, entity_id and event cannot be null';
    END IF;
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

REVOKE ALL ON FUNCTION callback_center.apply_event(regclass, name, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.apply_event(regclass, name, text, text)
    TO callback_center_app, callback_center_admin;
-- The view state_machine_attachments calls it with the reader's rights
-- (apply_event and detach_state_machine read the view).
REVOKE ALL ON FUNCTION callback_center._fsm_trigger_args(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center._fsm_trigger_args(bytea)
    TO callback_center_app, callback_center_admin;

-- ------------------------------------------------------------------------
-- Built-in machines.  emits stay empty here; 60_orders.sql wires them.
-- ------------------------------------------------------------------------

INSERT INTO callback_center.state_machines (machine, description, builtin) VALUES
    ('order', 'Merchant-side order status', true),
    ('order_pay', 'Pay status of an order', true),
    ('payment', 'Payment with a provider', true);

INSERT INTO callback_center.machine_states (machine, state, is_initial, is_final, builtin) VALUES
    ('order', 'pending_confirmation', true, false, true),
    ('order', 'confirmed', false, false, true),
    ('order', 'failed', false, true, true),
    ('order', 'closed', false, true, true),
    ('order', 'refunded', false, true, true),
    ('order_pay', 'unpaid', true, false, true),
    ('order_pay', 'paying', false, false, true),
    ('order_pay', 'paid', false, false, true),
    ('order_pay', 'pay_failed', false, true, true),
    ('order_pay', 'closed', false, true, true),
    ('order_pay', 'refunded', false, true, true),
    ('payment', 'CREATED', true, false, true),
    ('payment', 'PAYING', false, false, true),
    ('payment', 'PAID', false, false, true),
    ('payment', 'FAILED', false, false, true),
    ('payment', 'CLOSED', false, false, true),
    ('payment', 'REFUND_REQUIRED', false, false, true),
    ('payment', 'REFUNDED', false, true, true);

-- payment: FAILED -> REFUNDED is deliberately absent: no money moved.  Money
-- that arrives after the payment failed or was closed (late_success) must go
-- back: REFUND_REQUIRED, then REFUNDED once refunded.
INSERT INTO callback_center.transitions (machine, from_state, to_state, event, builtin) VALUES
    ('order', 'pending_confirmation', 'confirmed', 'confirm', true),
    ('order', 'pending_confirmation', 'failed', 'fail', true),
    ('order', 'confirmed', 'closed', 'close', true),
    ('order', 'confirmed', 'refunded', 'refund', true),
    ('order_pay', 'unpaid', 'paying', 'pay', true),
    ('order_pay', 'unpaid', 'paid', 'pay_success', true),
    ('order_pay', 'paying', 'paid', 'pay_success', true),
    ('order_pay', 'unpaid', 'pay_failed', 'pay_fail', true),
    ('order_pay', 'paying', 'pay_failed', 'pay_fail', true),
    ('order_pay', 'unpaid', 'closed', 'timeout', true),
    ('order_pay', 'paying', 'closed', 'timeout', true),
    ('order_pay', 'paid', 'refunded', 'refund', true),
    ('payment', 'CREATED', 'PAYING', 'submit', true),
    ('payment', 'CREATED', 'PAID', 'success', true),
    ('payment', 'PAYING', 'PAID', 'success', true),
    ('payment', 'CREATED', 'FAILED', 'fail', true),
    ('payment', 'PAYING', 'FAILED', 'fail', true),
    ('payment', 'CREATED', 'CLOSED', 'close', true),
    ('payment', 'PAYING', 'CLOSED', 'close', true),
    ('payment', 'PAID', 'REFUNDED', 'refund', true),
    ('payment', 'CLOSED', 'REFUND_REQUIRED', 'late_success', true),
    ('payment', 'FAILED', 'REFUND_REQUIRED', 'late_success', true),
    ('payment', 'REFUND_REQUIRED', 'REFUNDED', 'refund', true);

-- Inbound callbacks: idempotent recording of provider and internal
-- callbacks, and webhook signature verification (doc/inbound.md).

-- One row per (biz_id, callback_type): the first delivery inserts it, every
-- repeat reads it.  status: 0 pending, 1 processing, 2 succeeded, 3 failed.
CREATE TABLE callback_center.callback_record (
    id            bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    biz_id        text NOT NULL CHECK (biz_id <> ''),
    callback_type text NOT NULL CHECK (callback_type <> ''),
    status        smallint NOT NULL CHECK (status BETWEEN 0 AND 3),
    retry_count   integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    payload       text,
    payload_hash  bytea CHECK (octet_length(payload_hash) = 32),
    result        jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    UNIQUE (biz_id, callback_type),
    CHECK ((completed_at IS NOT NULL) = (status IN (2, 3)))
);

COMMENT ON TABLE callback_center.callback_record IS
    'Inbound callbacks, one row per (biz_id, callback_type); status 0 pending, 1 processing, 2 succeeded, 3 failed';

-- Repeats whose body differed from the recorded one: flagged, never
-- processed.
CREATE TABLE callback_center.callback_conflicts (
    id            bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    biz_id        text NOT NULL,
    callback_type text NOT NULL,
    payload_hash  bytea NOT NULL,
    payload       text,
    seen_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX callback_conflicts_key_idx
    ON callback_center.callback_conflicts (biz_id, callback_type);

COMMENT ON TABLE callback_center.callback_conflicts IS
    'Repeated callbacks whose payload differed from the recorded one';

-- Webhook providers and their secrets.  Nobody but the owner reads this
-- table: the verification functions are SECURITY DEFINER.
CREATE TABLE callback_center.providers (
    name       text PRIMARY KEY CHECK (name <> ''),
    scheme     text NOT NULL CHECK (scheme IN ('standard_webhooks', 'stripe')),
    secrets    text[] NOT NULL
               CHECK (cardinality(secrets) >= 1 AND array_position(secrets, NULL) IS NULL),
    tolerance  interval CHECK (tolerance > interval '0'),
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE callback_center.providers IS
    'Webhook signature providers: scheme, secrets (several during rotation), time tolerance';

SELECT pg_catalog.pg_extension_config_dump('callback_center.callback_record', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.callback_record_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.callback_conflicts', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.callback_conflicts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.providers', '');

REVOKE ALL ON callback_center.callback_record, callback_center.callback_conflicts,
    callback_center.providers FROM PUBLIC;
GRANT SELECT ON callback_center.callback_record, callback_center.callback_conflicts
    TO callback_center_admin;

-- record_callback: the first call for a key returns is_first = true (the
-- caller processes); repeats return the stored outcome.  See doc/inbound.md.
CREATE FUNCTION callback_center.record_callback(
    biz_id text, callback_type text, payload text)
RETURNS TABLE (callback_id bigint, is_first boolean, status smallint,
               result jsonb, payload_mismatch boolean)
AS 'MODULE_PATHNAME', 'cc_record_callback'
LANGUAGE C VOLATILE ROWS 1
SECURITY DEFINER SET search_path = pg_catalog, callback_center;

COMMENT ON FUNCTION callback_center.record_callback(text, text, text) IS
    'Records an inbound callback idempotently; is_first says whether the caller must process it';

-- complete_callback: the outcome of processing.  Completing again with the
-- same outcome returns it unchanged; with the other outcome is an error.
CREATE FUNCTION callback_center.complete_callback(
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
    IF p_biz_id IS NULL OR p_callback_type IS NULL OR p_succeeded IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'biz_id, callback_type and succeeded must not be null';
    END IF;
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

CREATE FUNCTION callback_center.get_callback(p_biz_id text, p_callback_type text)
RETURNS callback_center.callback_record
LANGUAGE plpgsql STABLE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    r callback_center.callback_record;
BEGIN
    IF p_biz_id IS NULL OR p_callback_type IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'biz_id and callback_type must not be null';
    END IF;
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

-- reclaim_stale_callbacks: a callback left processing (1) by a handler
-- that recorded it, committed, and died before completing it would answer
-- "in progress" forever.  Marking it failed (3) hands it to the retry path
-- of record_callback: the provider's next delivery processes it again,
-- counted in retry_count and bounded by callback_center.callback_max_retries.
-- older_than must exceed the longest a live handler may take: a handler
-- still running when its row is reclaimed finds it failed (22023 on
-- completing as succeeded) or re-claimed by a redelivery.
CREATE FUNCTION callback_center.reclaim_stale_callbacks(older_than interval)
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
    IF older_than < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'older_than must not be negative';
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

-- Signatures.
CREATE FUNCTION callback_center.sign_webhook(
    secret text, msg_id text, ts bigint, body text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_sign_webhook_sql'
LANGUAGE C IMMUTABLE;

COMMENT ON FUNCTION callback_center.sign_webhook(text, text, bigint, text) IS
    'Standard Webhooks signature "v1,<base64>" of <msg_id>.<ts>.<body> under a whsec_ secret';

CREATE FUNCTION callback_center.sign_stripe(secret text, ts bigint, body text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_sign_stripe_sql'
LANGUAGE C IMMUTABLE;

COMMENT ON FUNCTION callback_center.sign_stripe(text, bigint, text) IS
    'Stripe-Signature header value "t=<ts>,v1=<hex>" of <ts>.<body>';

CREATE FUNCTION callback_center.new_webhook_secret()
RETURNS text
AS 'MODULE_PATHNAME', 'cc_new_webhook_secret'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION callback_center.new_webhook_secret() IS
    'A new random Standard Webhooks secret, whsec_ and 24 random bytes in base64';

CREATE FUNCTION callback_center.verify_signature(
    provider text, headers jsonb, body text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cc_verify_signature'
LANGUAGE C VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center;

COMMENT ON FUNCTION callback_center.verify_signature(text, jsonb, text) IS
    'True when the headers carry a valid, timely signature of body by the provider; raises otherwise';

-- set_provider: creates or replaces a provider.  Standard Webhooks secrets
-- must be whsec_<base64>; a tolerance of NULL means the GUC
-- callback_center.signature_tolerance.
CREATE FUNCTION callback_center.set_provider(
    p_name text, p_scheme text, p_secrets text[],
    p_tolerance interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    s text;
BEGIN
    IF p_name IS NULL OR p_scheme IS NULL OR p_secrets IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'name, scheme and secrets must not be null';
    END IF;
    IF p_name = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'provider name must not be empty';
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
    IF p_tolerance IS NOT NULL AND p_tolerance <= interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'tolerance must be positive';
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
    'Creates or replaces a webhook provider (admin)';

CREATE FUNCTION callback_center.drop_provider(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF p_name IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'name must not be null';
    END IF;
    DELETE FROM callback_center.providers WHERE name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', p_name);
    END IF;
END
$$;

COMMENT ON FUNCTION callback_center.drop_provider(text) IS
    'Removes a webhook provider and its secrets (admin)';

REVOKE ALL ON FUNCTION
    callback_center.record_callback(text, text, text),
    callback_center.complete_callback(text, text, boolean, jsonb),
    callback_center.get_callback(text, text),
    callback_center.sign_webhook(text, text, bigint, text),
    callback_center.sign_stripe(text, bigint, text),
    callback_center.new_webhook_secret(),
    callback_center.verify_signature(text, jsonb, text),
    callback_center.set_provider(text, text, text[], interval),
    callback_center.drop_provider(text),
    callback_center.reclaim_stale_callbacks(interval)
FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    callback_center.record_callback(text, text, text),
    callback_center.complete_callback(text, text, boolean, jsonb),
    callback_center.get_callback(text, text),
    callback_center.sign_webhook(text, text, bigint, text),
    callback_center.sign_stripe(text, bigint, text),
    callback_center.new_webhook_secret(),
    callback_center.verify_signature(text, jsonb, text)
TO callback_center_app, callback_center_admin;

GRANT EXECUTE ON FUNCTION
    callback_center.set_provider(text, text, text[], interval),
    callback_center.drop_provider(text),
    callback_center.reclaim_stale_callbacks(interval)
TO callback_center_admin;

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

SELECT callback_center.attach_state_machine('callback_center.coupons', 'status', 'coupon', 'coupon_id');
SELECT callback_center.attach_state_machine('callback_center.orders', 'status', 'order', 'order_id');
SELECT callback_center.attach_state_machine('callback_center.orders', 'pay_status', 'order_pay', 'order_id');
SELECT callback_center.attach_state_machine('callback_center.payments', 'status', 'payment', 'payment_id');

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
    IF issue_coupon.coupon_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'coupon_id must not be null';
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
    IF freeze_coupon.coupon_id IS NULL OR freeze_coupon.biz_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'coupon_id and biz_id must not be null';
    END IF;
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
    IF use_coupon.coupon_id IS NULL OR use_coupon.biz_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'coupon_id and biz_id must not be null';
    END IF;
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
    IF unfreeze_coupon.coupon_id IS NULL OR unfreeze_coupon.biz_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'coupon_id and biz_id must not be null';
    END IF;
    UPDATE callback_center.coupons k
       SET status = 'available', biz_id = NULL, updated_at = now()
     WHERE k.coupon_id = unfreeze_coupon.coupon_id
       AND k.status = 'frozen' AND k.biz_id = unfreeze_coupon.biz_id;
    RETURN FOUND;
END
$$;

-- What place_order returns for an order.
CREATE FUNCTION callback_center._order_summary(p_order_id text, p_is_new boolean)
RETURNS TABLE (order_id text, status text, pay_status text, payment_id text,
               pay_deadline timestamptz, failure_reason text, is_new boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT o.order_id, o.status, o.pay_status, p.payment_id, o.pay_deadline,
           o.failure_reason, p_is_new
      FROM callback_center.orders o
      LEFT JOIN callback_center.payments p ON p.order_id = o.order_id
     WHERE o.order_id = p_order_id
$$;
REVOKE ALL ON FUNCTION callback_center._order_summary(text, boolean) FROM PUBLIC;

-- Places an order in one transaction: records it pending confirmation,
-- deducts the stock of every item and freezes the coupon (all or nothing),
-- confirms it (emitting order.placed) and creates its payment.  Short stock
-- or an unavailable coupon is an outcome, not an error: the order is
-- recorded as failed with the reason (emitting order.failed) and nothing is
-- held.  Calling it again with the same order_id returns the order as it
-- is, changing nothing.
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
#variable_conflict use_column
DECLARE
    timeout interval := current_setting('callback_center.pay_timeout')::interval;
    reason text;
BEGIN
    IF p_order_id IS NULL OR p_user_id IS NULL OR p_items IS NULL
       OR p_amount_cents IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'order_id, user_id, items and amount_cents must not be null';
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

-- The user went to the cashier: payment CREATED -> PAYING and the order's
-- pay status unpaid -> paying.  Returns the payment id.  A repeat while the
-- payment is PAYING (the user came back to the cashier) returns the same id
-- and moves nothing; a different provider replaces the recorded one (the
-- user switched channels).  Any other payment state is CB010 from the
-- machine.
CREATE FUNCTION callback_center.start_payment(order_id text, provider text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    pay callback_center.payments;
BEGIN
    IF start_payment.order_id IS NULL OR start_payment.provider IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'order_id and provider must not be null';
    END IF;
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
-- order_id, amount_cents, verdict).  verdict is 'success', 'failure'
-- (terminal: the order's payment is over), 'attempt_failed' (one attempt
-- failed, the customer may try again: nothing moves) or NULL for event
-- types we do not act on.  Acted-on events must carry a transaction and an
-- order id (22023); others need not.  event_id is Stripe's evt_ id (the
-- Standard Webhooks message id is a header, not in the body).  See
-- doc/orders.md for the event types of each scheme.
CREATE FUNCTION callback_center._parse_payment_body(scheme text, body text,
    OUT txn_id text, OUT order_id text, OUT amount_cents bigint, OUT verdict text,
    OUT event_id text, OUT event_type text)
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

-- Applies a provider's verdict on an order's payment, whoever brought it
-- (payment_callback after verifying and recording it, the answer to an
-- active query, reconciliation): under the order's and then the payment's
-- row lock, moves them through their machines (which emit the follow-ups)
-- and returns the outcome: paid, pay_failed, refund_required (money for an
-- order that cannot take it: recorded once per transaction in
-- late_payments, payment.refund_required emitted, the order never
-- reopened), already_applied (this transaction already paid this payment),
-- amount_mismatch (not applied, payment.amount_mismatch emitted),
-- attempt_failed (a non-terminal failure: nothing moves) or ignored (no
-- verdict, or a failure for an order no longer waiting).  CB050 when the
-- order does not exist.  verdict is 'success', 'failure', 'attempt_failed'
-- or NULL.
CREATE FUNCTION callback_center._apply_payment_result(
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
    IF p_verdict = 'attempt_failed' THEN
        -- The customer may retry on the same transaction: the payment stays
        -- open until a success, a terminal failure or the timeout close.
        RETURN 'attempt_failed';
    END IF;
    IF p_amount_cents IS NOT NULL AND pay.payment_id IS NOT NULL
       AND p_amount_cents <> pay.amount_cents THEN
        PERFORM callback_center.enqueue('payment.amount_mismatch', o.order_id,
            jsonb_build_object('order_id', o.order_id, 'txn_id', p_txn_id, 'provider', p_provider,
                               'expected_cents', pay.amount_cents, 'received_cents', p_amount_cents,
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

-- Marks a late payment refunded (admin, once the money went back): the
-- late_payments row becomes refunded and a payment holding that
-- transaction moves REFUND_REQUIRED -> REFUNDED.  True when this call
-- marked it, false when it already was; 42704 when there is no such late
-- payment.
CREATE FUNCTION callback_center.mark_refunded(provider text, provider_txn_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    lp callback_center.late_payments;
BEGIN
    IF mark_refunded.provider IS NULL OR mark_refunded.provider_txn_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'provider and provider_txn_id must not be null';
    END IF;
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

-- A payment notification in one call: verify the signature, record it once
-- (keyed by the provider's message id: Stripe's event id, the Standard
-- Webhooks webhook-id header), move payment and order, emit the follow-ups
-- (through the transitions' emits), and return the acknowledgement to send
-- back.  A repeat returns the first answer and changes nothing.  The
-- payment row guards the money itself: a second message about a
-- transaction already applied is already_applied, and success on an order
-- that can no longer be paid is kept and emits payment.refund_required.
-- Event types we do not act on are recorded and acknowledged (ignored).
-- See doc/orders.md.
CREATE FUNCTION callback_center.payment_callback(provider text, headers jsonb, body text)
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
    ack constant text := '{"received":true}';
BEGIN
    IF p_provider IS NULL OR payment_callback.headers IS NULL OR payment_callback.body IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'provider, headers and body must not be null';
    END IF;
    -- Verification comes first: a bad signature raises and records nothing.
    PERFORM callback_center.verify_signature(p_provider, payment_callback.headers, payment_callback.body);
    SELECT p.scheme INTO scheme FROM callback_center.providers p WHERE p.name = p_provider;
    msg := callback_center._parse_payment_body(scheme, payment_callback.body);
    IF scheme = 'stripe' THEN
        msg_id := msg.event_id;
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

    IF msg.verdict IS NULL THEN
        result := 'ignored';
    ELSE
        result := callback_center._apply_payment_result(p_provider, msg.txn_id, msg.order_id,
                                                        msg.amount_cents, msg.verdict, 'callback');
    END IF;

    PERFORM callback_center.complete_callback(msg_id, cb_type, true,
        jsonb_build_object('http_status', 200, 'body', ack, 'outcome', result,
                           'order_id', msg.order_id, 'txn_id', msg.txn_id,
                           'event_type', msg.event_type));
    RETURN QUERY SELECT 200, ack, true, result;
END
$$;

REVOKE ALL ON FUNCTION callback_center.issue_coupon(text, text),
    callback_center.freeze_coupon(text, text),
    callback_center.use_coupon(text, text),
    callback_center.unfreeze_coupon(text, text),
    callback_center.place_order(text, text, jsonb, bigint, text, text),
    callback_center.start_payment(text, text),
    callback_center._parse_payment_body(text, text),
    callback_center._apply_payment_result(text, text, text, bigint, text, text),
    callback_center.mark_refunded(text, text),
    callback_center.payment_callback(text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.mark_refunded(text, text) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.issue_coupon(text, text),
    callback_center.freeze_coupon(text, text),
    callback_center.use_coupon(text, text),
    callback_center.unfreeze_coupon(text, text),
    callback_center.place_order(text, text, jsonb, bigint, text, text),
    callback_center.start_payment(text, text),
    callback_center.payment_callback(text, jsonb, text)
    TO callback_center_app, callback_center_admin;
GRANT SELECT ON callback_center.orders, callback_center.payments, callback_center.coupons
    TO callback_center_app, callback_center_admin;

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
    replayed_by text NOT NULL DEFAULT current_user,
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
    IF replay_dead.outbox_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'outbox_id must not be null';
    END IF;
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
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
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
     ORDER BY e.name
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
GRANT SELECT ON callback_center.dead_letters, callback_center.delivery_stats, callback_center.health,
    callback_center.endpoint_state, callback_center.delivery_attempts, callback_center.replay_audit
    TO callback_center_admin;
GRANT SELECT ON callback_center.delivery_stats, callback_center.health TO callback_center_app;

-- TCC branches and sagas, guarded by a barrier table.  A branch calls
-- callback_center.barrier() first, inside its own transaction, and does its
-- work only when the answer is 'proceed'.  The barrier makes every branch
-- idempotent, turns a cancel that arrives before its try into an empty
-- compensation, and refuses a try that arrives after its cancel (no hanging
-- reservation).  Plain PL/pgSQL: the unique index and row locks do the
-- work, there is no hot loop worth C.  doc/tcc.md has the rules.

-- One row per (global transaction, branch, operation) that ever arrived.
-- written_by is the operation whose call inserted the row: a 'try' row
-- written by a cancel is the mark an empty compensation leaves so that a
-- late try is refused.  repeats and last_outcome record the later calls
-- that found the row (duplicates, refusals), so nothing is swallowed.
CREATE TABLE callback_center.tcc_barrier (
    gid           text NOT NULL,
    branch_id     text NOT NULL,
    op            text NOT NULL CHECK (op IN ('try', 'confirm', 'cancel')),
    written_by    text NOT NULL CHECK (written_by IN ('try', 'confirm', 'cancel')),
    last_outcome  text NOT NULL CHECK (last_outcome IN
                      ('proceed', 'duplicate', 'empty_compensation', 'refused')),
    repeats       integer NOT NULL DEFAULT 0 CHECK (repeats >= 0),
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (gid, branch_id, op)
);

COMMENT ON TABLE callback_center.tcc_barrier IS
    'TCC/saga barrier: one row per (gid, branch, op) that arrived, with the outcome of the last call';

-- What a TCC branch reserved, so that confirm and cancel know what and how
-- much.  One row per (gid, branch): a stock reservation (resource_id is the
-- SKU, quantity the units) or a frozen coupon (resource_id is the coupon).
CREATE TABLE callback_center.tcc_reservations (
    gid          text NOT NULL,
    branch_id    text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('stock', 'coupon')),
    resource_id  text NOT NULL,
    quantity     bigint NOT NULL CHECK (quantity > 0),
    status       text NOT NULL DEFAULT 'reserved'
                 CHECK (status IN ('reserved', 'confirmed', 'cancelled')),
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (gid, branch_id)
);

COMMENT ON TABLE callback_center.tcc_reservations IS
    'What each TCC try reserved (stock units or a coupon) and whether it was confirmed or cancelled';

-- Sagas: ordered steps, each an SQL call with a compensation.
CREATE TABLE callback_center.sagas (
    saga_id     text PRIMARY KEY,
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'completed', 'compensating', 'compensated')),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);

COMMENT ON TABLE callback_center.sagas IS
    'Sagas declared with saga_start(); saga_run() moves them to completed or compensated';

CREATE TABLE callback_center.saga_steps (
    saga_id       text NOT NULL REFERENCES callback_center.sagas ON DELETE CASCADE,
    step_no       integer NOT NULL CHECK (step_no > 0),
    action        text NOT NULL,
    compensation  text,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'done', 'compensated', 'skipped')),
    error         text,
    updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (saga_id, step_no)
);

COMMENT ON TABLE callback_center.saga_steps IS
    'Steps of a saga: action and compensation are SQL run with the caller''s rights, $1 = saga id';

SELECT pg_catalog.pg_extension_config_dump('callback_center.tcc_barrier', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.tcc_reservations', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.sagas', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.saga_steps', '');

GRANT SELECT ON callback_center.tcc_barrier, callback_center.tcc_reservations,
    callback_center.sagas, callback_center.saga_steps
    TO callback_center_admin, callback_center_app;

-- The barrier.  Returns 'proceed' (do the branch's work), 'duplicate' (this
-- op already ran for the branch: do nothing), 'empty_compensation' (a
-- cancel whose try never ran: it is recorded, do nothing) or 'refused' (a
-- try after its cancel: do nothing, so nothing is left reserved).  A cancel
-- first inserts the branch's 'try' row: if that succeeds the try never
-- happened.  Racing calls meet on the primary key: ON CONFLICT waits for
-- the other transaction and, once it commits, sees its row; after an abort
-- the insert goes ahead.  The row is in the caller's transaction, so it
-- commits or rolls back with the branch's own work.
CREATE FUNCTION callback_center.barrier(
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
BEGIN
    IF p_gid IS NULL OR p_branch IS NULL OR p_op IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'gid, branch_id and op must not be null';
    END IF;
    IF p_op NOT IN ('try', 'confirm', 'cancel') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('invalid barrier op "%s"', p_op),
            HINT = 'Use try, confirm or cancel.';
    END IF;
    IF p_op = 'cancel' THEN
        INSERT INTO callback_center.tcc_barrier AS b
               (gid, branch_id, op, written_by, last_outcome)
        VALUES (p_gid, p_branch, 'try', 'cancel', 'empty_compensation')
        ON CONFLICT ON CONSTRAINT tcc_barrier_pkey DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 1 THEN
            -- The try never ran; no cancel row can exist (a cancel always
            -- writes the try row first, in the same transaction).
            INSERT INTO callback_center.tcc_barrier
                   (gid, branch_id, op, written_by, last_outcome)
            VALUES (p_gid, p_branch, 'cancel', 'cancel', 'empty_compensation');
            RETURN 'empty_compensation';
        END IF;
    END IF;
    INSERT INTO callback_center.tcc_barrier AS b
           (gid, branch_id, op, written_by, last_outcome)
    VALUES (p_gid, p_branch, p_op, p_op, 'proceed')
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

-- Raises 22004 when any of the named values is null.
CREATE FUNCTION callback_center._tcc_require(what text, VARIADIC vals text[])
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $fn$
BEGIN
    IF pg_catalog.array_position(vals, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = pg_catalog.format('%s must not be null', what);
    END IF;
END
$fn$;

-- Marks the reservation of (gid, branch) of the given kind confirmed or
-- cancelled and returns it; 55000 when there is none still reserved.
CREATE FUNCTION callback_center._tcc_settle(
    p_gid text, p_branch text, p_kind text, p_status text)
RETURNS callback_center.tcc_reservations
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    r callback_center.tcc_reservations;
BEGIN
    UPDATE callback_center.tcc_reservations AS t
       SET status = p_status, updated_at = pg_catalog.now()
     WHERE t.gid = p_gid AND t.branch_id = p_branch
       AND t.kind = p_kind AND t.status = 'reserved'
    RETURNING t.* INTO r;
    IF FOUND THEN
        RETURN r;
    END IF;
    SELECT * INTO r FROM callback_center.tcc_reservations AS t
     WHERE t.gid = p_gid AND t.branch_id = p_branch;
    RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = pg_catalog.format('no %s reservation of gid "%s" branch "%s" to %s',
                                    p_kind, p_gid, p_branch,
                                    CASE p_status WHEN 'confirmed' THEN 'confirm' ELSE 'cancel' END),
        DETAIL = CASE WHEN r.gid IS NULL THEN 'The branch reserved nothing.'
                      ELSE pg_catalog.format('The branch holds a %s reservation that is %s.',
                                             r.kind, r.status) END;
END
$fn$;

-- The second phase of a TCC branch (op 'confirm' or 'cancel') on a
-- reservation of the given kind: through the barrier, then, only on
-- 'proceed', settles the reservation and applies it (stock: reserved goes,
-- back to available on cancel; coupon: used on confirm, unfrozen on
-- cancel).  Returns the barrier outcome.  Runs as the SECURITY DEFINER
-- wrapper that calls it.
CREATE FUNCTION callback_center._tcc_second_phase(
    p_gid text, p_branch text, p_kind text, p_op text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome text;
    r       callback_center.tcc_reservations;
BEGIN
    PERFORM callback_center._tcc_require('gid and branch_id', p_gid, p_branch);
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

-- TCC try on stock: moves qty units of sku from available to reserved for
-- (gid, branch), once.  Returns the barrier outcome; only 'proceed' changes
-- anything.
CREATE FUNCTION callback_center.tcc_stock_try(
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
    PERFORM callback_center._tcc_require('gid, branch_id, sku_id and qty',
                                         p_gid, p_branch, p_sku, p_qty::text);
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

-- TCC confirm on stock: consumes the reservation (reserved -= qty), once.
CREATE FUNCTION callback_center.tcc_stock_confirm(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'stock', 'confirm');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_stock_confirm(text, text) IS
    'TCC confirm: consumes the stock reserved by (gid, branch); returns the barrier outcome';

-- TCC cancel on stock: gives the reservation back to available, once; an
-- empty compensation when the try never ran.
CREATE FUNCTION callback_center.tcc_stock_cancel(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'stock', 'cancel');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_stock_cancel(text, text) IS
    'TCC cancel: returns the stock reserved by (gid, branch) to available; returns the barrier outcome';

-- TCC try on a coupon: freezes it with biz_id = gid, once.
CREATE FUNCTION callback_center.tcc_coupon_try(gid text, branch_id text, coupon_id text)
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
    PERFORM callback_center._tcc_require('gid, branch_id and coupon_id',
                                         p_gid, p_branch, p_coupon);
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

-- TCC confirm on a coupon: marks it used by gid, once.
CREATE FUNCTION callback_center.tcc_coupon_confirm(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'coupon', 'confirm');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_coupon_confirm(text, text) IS
    'TCC confirm: uses the coupon frozen by (gid, branch); returns the barrier outcome';

-- TCC cancel on a coupon: unfreezes it, once; an empty compensation when
-- the try never ran.
CREATE FUNCTION callback_center.tcc_coupon_cancel(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'coupon', 'cancel');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_coupon_cancel(text, text) IS
    'TCC cancel: unfreezes the coupon frozen by (gid, branch); returns the barrier outcome';

-- Declares a saga: steps is a JSON array of {"action": sql, "compensation":
-- sql or null}, numbered from 1 in array order.  Returns the step count.
CREATE FUNCTION callback_center.saga_start(saga_id text, steps jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    p_saga  ALIAS FOR $1;
    p_steps ALIAS FOR $2;
    bad     text;
BEGIN
    IF p_saga IS NULL OR p_steps IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'saga_id and steps must not be null';
    END IF;
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
    INSERT INTO callback_center.sagas (saga_id) VALUES (p_saga);
    INSERT INTO callback_center.saga_steps (saga_id, step_no, action, compensation)
    SELECT p_saga, e.n::integer, e.v ->> 'action', e.v ->> 'compensation'
      FROM pg_catalog.jsonb_array_elements(p_steps) WITH ORDINALITY AS e(v, n);
    RETURN pg_catalog.jsonb_array_length(p_steps);
END
$fn$;

COMMENT ON FUNCTION callback_center.saga_start(text, jsonb) IS
    'Declares a saga of ordered steps (action, compensation); returns the step count';

-- Bookkeeping for saga_run (which runs with the caller's rights): locks the
-- saga row until the end of the transaction and returns its status; 42704
-- when there is no such saga.
CREATE FUNCTION callback_center._saga_lock(saga_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    st text;
BEGIN
    SELECT s.status INTO st FROM callback_center.sagas AS s
     WHERE s.saga_id = _saga_lock.saga_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = pg_catalog.format('unknown saga "%s"', _saga_lock.saga_id),
            HINT = 'Declare it with callback_center.saga_start().';
    END IF;
    RETURN st;
END
$fn$;

-- Bookkeeping for saga_run: sets a step's status and error (step_no given)
-- or the saga's status and last error (step_no null).  Only forward moves:
-- pending -> done/skipped, done -> compensated; running -> completed or
-- compensating, compensating -> compensated.
CREATE FUNCTION callback_center._saga_mark(
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

-- Runs a saga: its pending steps in order, each through the barrier (gid =
-- saga id, branch = step number, op try) in a subtransaction.  When a step
-- raises, its work is rolled back, the error recorded, and the saga
-- compensates: from the last step down, every step goes through the
-- barrier with op cancel; done steps run their compensation, the failed
-- step and those never run are empty compensations (marked skipped, and a
-- late try of them would be refused).  SECURITY INVOKER: actions and
-- compensations run with the caller's rights and search_path, with the
-- saga id as $1.  Returns the final status; re-running a finished saga
-- changes nothing.  A compensation that raises is rolled back and recorded
-- and the saga stays 'compensating' for a later run to finish.
CREATE FUNCTION callback_center.saga_run(saga_id text)
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

REVOKE ALL ON FUNCTION callback_center.barrier(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._tcc_require(text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._tcc_settle(text, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._tcc_second_phase(text, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_stock_try(text, text, text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_stock_confirm(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_stock_cancel(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_coupon_try(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_coupon_confirm(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_coupon_cancel(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.saga_start(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._saga_lock(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._saga_mark(text, integer, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.saga_run(text) FROM PUBLIC;

-- _saga_lock and _saga_mark are granted because saga_run, which calls
-- them, is SECURITY INVOKER (its steps run with the caller's rights).
-- Called directly they move only the bookkeeping, forward (a step or a
-- saga can be marked done without running it; nothing is reserved or
-- released that way, the branches go through the barrier); _tcc_require and _tcc_settle are called only by SECURITY
-- DEFINER functions and granted to no one.
GRANT EXECUTE ON FUNCTION
    callback_center.barrier(text, text, text),
    callback_center.tcc_stock_try(text, text, text, bigint),
    callback_center.tcc_stock_confirm(text, text),
    callback_center.tcc_stock_cancel(text, text),
    callback_center.tcc_coupon_try(text, text, text),
    callback_center.tcc_coupon_confirm(text, text),
    callback_center.tcc_coupon_cancel(text, text),
    callback_center.saga_start(text, jsonb),
    callback_center._saga_lock(text),
    callback_center._saga_mark(text, integer, text, text),
    callback_center.saga_run(text)
    TO callback_center_app, callback_center_admin;

-- Reconciliation against providers' daily statements, maintenance
-- scheduling through pg_cron (optional), and retention (doc/recon.md).

-- A provider's statement for one bill date, loaded with COPY.  status is
-- the provider's word: 'success', 'refund', 'closed' (others are kept and
-- compared as they are).
CREATE TABLE callback_center.provider_statement (
    channel         text NOT NULL,
    bill_date       date NOT NULL,
    provider_txn_id text NOT NULL,
    order_id        text,
    amount_cents    bigint NOT NULL,
    status          text NOT NULL,
    loaded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, bill_date, provider_txn_id)
);
COMMENT ON TABLE callback_center.provider_statement IS
    'Provider statements, one row per transaction per bill date; load with COPY';

-- What reconcile found.  One row per (statement line or local payment,
-- kind); refund_required is money the provider took for an order that could
-- not take it (callback_center.late_payments), for people to refund;
-- resolution says what was done: applied (settled by reconcile),
-- flagged (for people), pending_grace (may be a cross-midnight timing
-- difference; the next run decides), resolved (a person settled a flagged
-- one with resolve_recon_diff; later runs leave it so).  Retention purges
-- only applied and resolved rows: a flagged difference stays until someone
-- has dealt with it, however old.
CREATE TABLE callback_center.recon_diffs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel         text NOT NULL,
    bill_date       date NOT NULL,
    provider_txn_id text NOT NULL,
    order_id        text,
    kind            text NOT NULL CHECK (kind IN ('missing_local', 'missing_provider',
                                                  'amount_mismatch', 'status_mismatch',
                                                  'refund_required')),
    provider_amount bigint,
    local_amount    bigint,
    provider_status text,
    local_status    text,
    resolution      text NOT NULL CHECK (resolution IN ('applied', 'flagged', 'pending_grace',
                                                        'resolved')),
    note            text,
    resolved_by     text,
    resolved_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    checked_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel, bill_date, provider_txn_id, kind)
);
COMMENT ON TABLE callback_center.recon_diffs IS
    'Differences between provider statements and local payments, by (channel, bill_date)';

-- Local payments are looked up by provider and paid time.
CREATE INDEX payments_provider_paid_at
    ON callback_center.payments (provider, paid_at) WHERE paid_at IS NOT NULL;

SELECT pg_catalog.pg_extension_config_dump('callback_center.provider_statement', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.recon_diffs', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.recon_diffs_id_seq', '');

GRANT SELECT ON callback_center.provider_statement, callback_center.recon_diffs
    TO callback_center_admin;
GRANT INSERT, DELETE ON callback_center.provider_statement TO callback_center_admin;

-- Does the provider's statement status agree with our payment status?
CREATE FUNCTION callback_center._recon_status_agrees(provider_status text, local_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT CASE provider_status
        WHEN 'success' THEN local_status = 'PAID'
        WHEN 'refund' THEN local_status = 'REFUNDED'
        WHEN 'closed' THEN local_status IN ('CLOSED', 'FAILED')
        ELSE false END
$$;

-- Reconciles one channel's statement for one bill date against local
-- payments in one set-based pass, records every difference in recon_diffs
-- (upsert: a rerun adds nothing twice, and drops differences that are gone
-- unless applied), settles provider-paid / locally-unpaid payments like a
-- callback would, and returns the count of recorded differences per kind
-- for (channel, bill_date).  The bill date's day is midnight to midnight in
-- the session's TimeZone.
CREATE FUNCTION callback_center.reconcile(channel text, bill_date date,
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
    IF p_channel IS NULL OR p_date IS NULL OR reconcile.grace IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'channel, bill_date and grace must not be null';
    END IF;
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
                                                         r.provider_amount, 'success',
                                                         'reconciliation');
        UPDATE callback_center.recon_diffs d
           SET kind = CASE outcome WHEN 'refund_required' THEN 'refund_required' ELSE d.kind END,
               resolution = CASE outcome WHEN 'refund_required' THEN 'flagged' ELSE d.resolution END,
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

-- A person settles a flagged difference (refunded by hand, booked in the
-- ERP, written off): resolution becomes resolved, with who, when and why.
-- Later runs of reconcile leave it resolved, and retention may then purge
-- it.  Returns false when it was already resolved (a repeat changes
-- nothing).  22004 for NULLs, P0002 for an unknown id, 22023 for a
-- difference that is not flagged (applied ones are settled already;
-- pending_grace ones are still the next run's to judge).
CREATE FUNCTION callback_center.resolve_recon_diff(diff_id bigint, note text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    d callback_center.recon_diffs;
BEGIN
    IF diff_id IS NULL OR note IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'diff_id and note must not be null',
            HINT = 'Say how the difference was settled.';
    END IF;
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

-- What retention deletes, per relation, in order: delivered outbox rows,
-- delivery attempts (when that table exists), state history, succeeded
-- callback records and settled (applied or resolved) reconciliation
-- differences older than the cutoff
-- ($1).  Pending, delivering and dead outbox rows (dead ones stay for
-- replay) and pending, processing and failed callback records are never
-- touched.  age says which of purge's ages applies: attempts, history, or
-- events (older_than).
CREATE FUNCTION callback_center._purge_targets()
RETURNS TABLE (rel text, cond text, age text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT v.rel, v.cond, v.age
      FROM (VALUES
        (1, 'callback_center.outbox', 'status = ''delivered'' AND delivered_at < $1', 'events'),
        (2, 'callback_center.delivery_attempts', 'attempted_at < $1', 'attempts'),
        (3, 'callback_center.state_history', 'at < $1', 'history'),
        (4, 'callback_center.callback_record', 'status = 2 AND completed_at < $1', 'events'),
        (5, 'callback_center.recon_diffs',
         'resolution IN (''applied'', ''resolved'') AND created_at < $1', 'events')) AS v(ord, rel, cond, age)
     WHERE to_regclass(v.rel) IS NOT NULL
     ORDER BY v.ord
$$;

-- Deletes one batch of at most batch_size rows of one retention target
-- (see _purge_targets) older than cutoff with an id above after_id, rows
-- locked by others skipped.  Returns how many it deleted and the highest id
-- it passed (the next batch's after_id).  22023 for a relation that is not
-- a retention target.
CREATE FUNCTION callback_center._purge_batch(rel text, cutoff timestamptz, after_id bigint,
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
    -- rescans what an earlier one passed.
    EXECUTE format(
        'WITH b AS (SELECT id FROM %s WHERE id > $2 AND %s ORDER BY id LIMIT $3'
        ' FOR UPDATE SKIP LOCKED),'
        ' d AS (DELETE FROM %s WHERE id IN (SELECT id FROM b) RETURNING id)'
        ' SELECT (SELECT count(*) FROM b), (SELECT max(id) FROM b)'
        ' FROM (SELECT count(*) FROM d) AS x',
        _purge_batch.rel, condition, _purge_batch.rel)
        INTO purged, last_id USING cutoff, after_id, batch_size;
END
$$;

-- Checks purge's arguments; raises 22004 or 22023.  The per-relation ages
-- may be NULL (the same as older_than).
CREATE FUNCTION callback_center._purge_check(older_than interval, batch_size integer,
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
       OR history_older_than < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('retention ages must not be negative, got %s, %s and %s',
                             older_than, coalesce(attempts_older_than::text, 'NULL'),
                             coalesce(history_older_than::text, 'NULL'));
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('batch_size must be positive, got %s', batch_size);
    END IF;
END
$$;

-- The retention targets with the cutoff of each: now() less its age.
CREATE FUNCTION callback_center._purge_plan(older_than interval,
    attempts_older_than interval, history_older_than interval)
RETURNS TABLE (rel text, cutoff timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT t.rel,
           now() - CASE t.age
                     WHEN 'attempts' THEN coalesce(attempts_older_than, older_than)
                     WHEN 'history' THEN coalesce(history_older_than, older_than)
                     ELSE older_than END
      FROM callback_center._purge_targets() t
$$;

-- Deletes, in batches of at most batch_size rows, what is older than its
-- age and no longer needed (see _purge_targets), all in the caller's
-- transaction: delivered events, callback records and reconciliation
-- differences older than older_than, delivery attempts older than
-- attempts_older_than and state history older than history_older_than
-- (each NULL: older_than).  Rows locked by others are skipped, never
-- waited for.  Returns the rows deleted and the batches run per relation.
-- purge_in_batches does the same, committing after every batch.
CREATE FUNCTION callback_center.purge(older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 10000, attempts_older_than interval DEFAULT NULL,
    history_older_than interval DEFAULT NULL)
RETURNS TABLE (relation text, purged bigint, batches integer)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    t record;
    b record;
    last_id bigint;
BEGIN
    PERFORM callback_center._purge_check(older_than, batch_size, attempts_older_than,
                                         history_older_than);
    FOR t IN SELECT * FROM callback_center._purge_plan(older_than, attempts_older_than,
                                                       history_older_than) LOOP
        relation := t.rel;
        purged := 0;
        batches := 0;
        last_id := 0;
        LOOP
            b := callback_center._purge_batch(t.rel, t.cutoff, last_id, batch_size);
            purged := purged + b.purged;
            batches := batches + 1;
            last_id := b.last_id;
            EXIT WHEN b.purged < batch_size;
        END LOOP;
        RETURN NEXT;
    END LOOP;
END
$$;

-- purge() as a procedure that commits after every batch, so a large purge
-- holds no long transaction (no bloat held back, no locks kept) and what
-- it deleted stays deleted if it is interrupted.  Must be CALLed outside a
-- transaction block (2D000 inside one).  Not SECURITY DEFINER (a procedure
-- that commits cannot be): it runs the batches through _purge_batch, which
-- is.  purged returns the total number of rows deleted.  The pg_cron
-- retention job (schedule_maintenance) calls this.
CREATE PROCEDURE callback_center.purge_in_batches(older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 10000, attempts_older_than interval DEFAULT NULL,
    history_older_than interval DEFAULT NULL, INOUT purged bigint DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    plan record;
    targets text[];
    cutoffs timestamptz[];
    i integer;
    b record;
    last_id bigint;
BEGIN
    PERFORM callback_center._purge_check(older_than, batch_size, attempts_older_than,
                                         history_older_than);
    -- Cutoffs fixed once, at the start: later batches do not chase now().
    SELECT pg_catalog.array_agg(p.rel), pg_catalog.array_agg(p.cutoff) INTO targets, cutoffs
      FROM callback_center._purge_plan(older_than, attempts_older_than, history_older_than) p;
    purged := 0;
    FOR i IN 1 .. coalesce(pg_catalog.cardinality(targets), 0) LOOP
        last_id := 0;
        LOOP
            b := callback_center._purge_batch(targets[i], cutoffs[i], last_id, batch_size);
            purged := purged + b.purged;
            last_id := b.last_id;
            COMMIT;
            EXIT WHEN b.purged < batch_size;
        END LOOP;
    END LOOP;
END
$$;

-- Schedules the maintenance jobs with pg_cron (when it is installed in this
-- database): callback_center_retention CALLing purge_in_batches() with the
-- given ages and batch size on retention_cron, and
-- callback_center_recon_<channel> running reconcile() for yesterday on
-- recon_cron for each channel.  Jobs of the same names are replaced and
-- recon jobs of channels no longer listed are removed, so calling it again
-- is safe.  Returns the job ids.
CREATE FUNCTION callback_center.schedule_maintenance(
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
    IF reconcile_channels IS NULL OR retention_cron IS NULL OR recon_cron IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'reconcile_channels, retention_cron and recon_cron must not be null';
    END IF;
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

-- Removes every job schedule_maintenance made.  Returns how many.
CREATE FUNCTION callback_center.unschedule_maintenance()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    n integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = 'pg_cron is not installed in this database',
            HINT = 'Install pg_cron: set shared_preload_libraries = ''pg_cron'' and '
                   'cron.database_name to this database, restart, then run CREATE EXTENSION pg_cron.';
    END IF;
    EXECUTE 'SELECT count(cron.unschedule(jobid)) FROM cron.job'
            ' WHERE jobname LIKE ''callback\_center\_%'''
        INTO n;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION callback_center._recon_status_agrees(text, text),
    callback_center.reconcile(text, date, interval),
    callback_center.resolve_recon_diff(bigint, text),
    callback_center._purge_targets(),
    callback_center._purge_batch(text, timestamptz, bigint, integer),
    callback_center._purge_check(interval, integer, interval, interval),
    callback_center._purge_plan(interval, interval, interval),
    callback_center.purge(interval, integer, interval, interval),
    callback_center.schedule_maintenance(text[], text, text, interval, interval, interval, integer),
    callback_center.unschedule_maintenance() FROM PUBLIC;
REVOKE ALL ON PROCEDURE callback_center.purge_in_batches(interval, integer, interval, interval, bigint)
    FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE callback_center.purge_in_batches(interval, integer, interval, interval, bigint)
    TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.reconcile(text, date, interval),
    callback_center.resolve_recon_diff(bigint, text),
    callback_center._purge_targets(),
    callback_center._purge_batch(text, timestamptz, bigint, integer),
    callback_center._purge_check(interval, integer, interval, interval),
    callback_center._purge_plan(interval, interval, interval),
    callback_center.purge(interval, integer, interval, interval),
    callback_center.schedule_maintenance(text[], text, text, interval, interval, interval, integer),
    callback_center.unschedule_maintenance()
    TO callback_center_admin;

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

-- The orders due for the timeout close: confirmed, still waiting for money,
-- past their deadline, not backing off after a failure.  Read through the
-- partial index orders_pay_deadline.  The one definition that both
-- close_expired_orders and the worker's one-by-one fallback read, so they
-- agree on what is due.
CREATE VIEW callback_center._orders_due AS
    SELECT o.order_id, o.pay_deadline
      FROM callback_center.orders o
     WHERE o.status = 'confirmed' AND o.pay_status IN ('unpaid', 'paying')
       AND o.pay_deadline <= pg_catalog.now()
       AND NOT EXISTS (SELECT 1 FROM callback_center.close_failures f
                        WHERE f.order_id = o.order_id AND f.retry_at > pg_catalog.now());

-- Records that closing p_order_id raised error: one more failure, tried
-- again after 2^(failures - 1) seconds, at most 5 minutes.  Also drops the
-- rows of orders no longer waiting for money.  Returns when it is retried.
CREATE FUNCTION callback_center._note_close_failure(p_order_id text, error text)
RETURNS timestamptz
LANGUAGE plpgsql
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
CREATE FUNCTION callback_center._close_order(p_order_id text)
RETURNS boolean
LANGUAGE plpgsql
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

-- Closes up to max_orders orders whose pay deadline has passed, oldest
-- deadline first, found through the partial index orders_pay_deadline
-- (the view _orders_due, which passes over orders backing off after a
-- failed close) and locked with SKIP LOCKED (under READ COMMITTED the lock re-checks the
-- condition against the newest row version, so an order paid meanwhile is
-- passed over); orders or payments locked by others are skipped, never
-- waited for.  Each order is closed entirely in the caller's transaction,
-- exactly once.  Returns how many were closed.
CREATE FUNCTION callback_center.close_expired_orders(max_orders integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF max_orders IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'max_orders must not be null';
    END IF;
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

-- Where each provider answers status queries: an endpoint (10_outbox.sql)
-- that receives payment.query events; NULL: the provider is not queried.
ALTER TABLE callback_center.providers
    ADD COLUMN query_endpoint text
        REFERENCES callback_center.endpoints (name) ON UPDATE CASCADE ON DELETE SET NULL;

-- Payments waiting for money are found by the time they started paying.
CREATE INDEX payments_paying ON callback_center.payments (updated_at)
    WHERE status = 'PAYING';

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

-- Names the endpoint that answers a provider's status queries (admin);
-- NULL stops querying it.  CB033 unknown provider, CB040 unknown endpoint.
CREATE FUNCTION callback_center.set_provider_query_endpoint(provider text, endpoint text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF set_provider_query_endpoint.provider IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'provider must not be null';
    END IF;
    IF set_provider_query_endpoint.endpoint IS NOT NULL THEN
        PERFORM callback_center._endpoint_id(set_provider_query_endpoint.endpoint, false);
    END IF;
    UPDATE callback_center.providers p
       SET query_endpoint = set_provider_query_endpoint.endpoint
     WHERE p.name = set_provider_query_endpoint.provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_provider_query_endpoint.provider);
    END IF;
END
$$;

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
    ob_id bigint;
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
        INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
        VALUES (r.endpoint_id, 'payment.query', r.order_id,
                jsonb_build_object('payment_id', r.payment_id, 'order_id', r.order_id,
                                   'provider', r.provider, 'amount_cents', r.amount_cents))
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

-- Applies a provider's answer (the response body of the delivered
-- payment.query) to the query's payment through the same path as
-- payment_callback (_apply_payment_result, source 'query'), once: the
-- query becomes answered with the outcome, or failed (outcome bad_answer)
-- when the body is not a payment message for that order.  Calling it again
-- for a finished query changes nothing and returns the recorded outcome.
-- 42704 when the query does not exist.
CREATE FUNCTION callback_center._apply_query_answer(query_id bigint, answer text)
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
                                                    msg.amount_cents, msg.verdict, 'query');
    UPDATE callback_center.payment_queries x
       SET status = 'answered', answer = _apply_query_answer.answer, outcome = result,
           finished_at = now()
     WHERE x.id = q.id;
    RETURN result;
END
$$;

-- Finishes up to max_queries queries whose event has been delivered (the
-- answer is the 2xx response body the worker kept), has died, or is gone.
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
    IF max_queries IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'max_queries must not be null';
    END IF;
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

REVOKE ALL ON callback_center._orders_due FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._close_locked_orders(text[]),
    callback_center._note_close_failure(text, text),
    callback_center._close_order(text),
    callback_center.close_expired_orders(integer),
    callback_center.set_provider_query_endpoint(text, text),
    callback_center.query_stuck_payments(integer, interval, interval),
    callback_center._apply_query_answer(bigint, text),
    callback_center.apply_query_answers(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.close_expired_orders(integer),
    callback_center.set_provider_query_endpoint(text, text),
    callback_center.query_stuck_payments(integer, interval, interval),
    callback_center.apply_query_answers(integer)
    TO callback_center_admin;

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
