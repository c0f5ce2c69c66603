-- Every function of the API (schema callback_center, executable by
-- callback_center_app or callback_center_admin, not an internal _ one, not
-- a trigger function), called with a NULL in each argument in turn and
-- plain values in the others, raises 22004 (README's error table), except
-- where NULL is documented as meaningful: those are listed below with what
-- NULL means, and must not raise 22004.  Each call runs in a
-- subtransaction that is rolled back, so nothing it does stays.
-- Procedures are not called (purge_in_batches commits; its arguments are
-- checked by the same _purge_check as purge's).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

CREATE TEMP TABLE null_meaningful (fn text, arg text, meaning text, PRIMARY KEY (fn, arg));
INSERT INTO null_meaningful VALUES
    ('complete_callback', 'p_result', 'no result recorded'),
    ('create_endpoint', 'secret', 'generate a whsec_ secret'),
    ('create_state_machine', 'description', 'no description'),
    ('deduct_stock', 'expected_version', 'no compare-and-set'),
    ('deduct_stock', 'expected_versions', 'no compare-and-set'),
    ('http_probe', 'max_per_host', 'no per-host cap'),
    ('issue_coupon', 'user_id', 'a coupon of no user, anyone''s'),
    ('place_order', 'p_coupon_id', 'no coupon'),
    ('place_order', 'p_provider', 'no provider yet (start_payment names it)'),
    ('purge', 'attempts_older_than', 'the same as older_than'),
    ('record_refund_outcome', 'error', 'no error recorded'),
    ('record_refund_outcome', 'provider_refund_id', 'the provider''s refund id is not known'),
    ('purge', 'history_older_than', 'the same as older_than'),
    ('query_stuck_payments', 'older_than', 'callback_center.pay_query_after'),
    ('query_stuck_payments', 'min_interval', 'callback_center.pay_query_interval'),
    ('set_merchant', 'key_serial', 'no certificate serial (alipay)'),
    ('replay_dead', 'endpoint', 'every endpoint (the range form)'),
    ('replay_dead', 'reason', 'no reason recorded'),
    ('request_refund', 'p_reason', 'no reason given to the provider'),
    ('rotate_endpoint_secret', 'new_secret', 'generate a whsec_ secret'),
    ('schedule_maintenance', 'attempts_older_than', 'the same as older_than'),
    ('schedule_maintenance', 'history_older_than', 'the same as older_than'),
    ('set_provider', 'p_secrets', 'generate a whsec_ secret'),
    ('set_provider', 'p_tolerance', 'callback_center.signature_tolerance'),
    ('set_provider_query_endpoint', 'endpoint', 'stop querying the provider');

-- A plain value of each argument type.
CREATE FUNCTION pg_temp.sample(t regtype) RETURNS text LANGUAGE sql AS $$
    SELECT CASE t
        WHEN 'text'::regtype THEN quote_literal('nulls-x') || '::text'
        WHEN 'name'::regtype THEN '''id''::name'
        WHEN 'regclass'::regtype THEN '''callback_center.orders''::regclass'
        WHEN 'integer'::regtype THEN '1'
        WHEN 'bigint'::regtype THEN '1::bigint'
        WHEN 'boolean'::regtype THEN 'false'
        WHEN 'jsonb'::regtype THEN '''{}''::jsonb'
        WHEN 'interval'::regtype THEN '''1 minute''::interval'
        WHEN 'timestamp with time zone'::regtype THEN '''2026-01-01''::timestamptz'
        WHEN 'date'::regtype THEN '''2026-01-01''::date'
        WHEN 'text[]'::regtype THEN '''{nulls-x}''::text[]'
        WHEN 'bigint[]'::regtype THEN '''{1}''::bigint[]'
        WHEN 'bytea'::regtype THEN '''x''::bytea'
        END $$;

-- The SQLSTATE a call raises, or ok, then a newline and its message;
-- rolled back either way.
CREATE FUNCTION pg_temp.outcome(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RAISE EXCEPTION USING ERRCODE = 'ZZ999';
EXCEPTION WHEN OTHERS THEN
    RETURN CASE SQLSTATE WHEN 'ZZ999' THEN 'ok' ELSE SQLSTATE END || E'\n' || SQLERRM;
END $$;

CREATE TEMP TABLE null_calls AS
WITH api AS (
    SELECT p.oid, p.proname::text AS fn, ARRAY(SELECT unnest(p.proargtypes::regtype[])) AS types,
           -- names of the input arguments only
           ARRAY(SELECT n FROM unnest(coalesce(p.proargnames, array_fill(''::text, ARRAY[p.pronargs])),
                                     coalesce(p.proargmodes, array_fill('i'::"char", ARRAY[p.pronargs])))
                            WITH ORDINALITY AS a(n, m, k)
                  WHERE m IN ('i', 'b', 'v') ORDER BY k) AS names
      FROM pg_proc p
     WHERE p.pronamespace = 'callback_center'::regnamespace
       AND p.prokind = 'f' AND p.proname !~ '^_'
       AND p.prorettype <> 'trigger'::regtype
       AND (has_function_privilege('callback_center_app', p.oid, 'EXECUTE')
            OR has_function_privilege('callback_center_admin', p.oid, 'EXECUTE'))
       AND p.pronargs > 0
)
SELECT x.function, x.argument, x.fn, split_part(x.r, E'\n', 1) AS got,
       substr(x.r, strpos(x.r, E'\n') + 1) AS message
  FROM (SELECT api.oid::regprocedure::text AS function, api.names[i] AS argument, api.fn,
               pg_temp.outcome(format('SELECT count(*) FROM callback_center.%I(%s)', api.fn,
                   (SELECT string_agg(CASE WHEN j = i THEN 'NULL::' || format_type(api.types[j], NULL)
                                           ELSE pg_temp.sample(api.types[j]) END, ', ' ORDER BY j)
                      FROM generate_subscripts(api.types, 1) AS j))) AS r
          FROM api, generate_subscripts(api.types, 1) AS i) AS x;

-- Every argument that must refuse NULL does, with 22004.
SELECT c.function, c.argument,
       CASE WHEN m.fn IS NOT NULL THEN 'NULL means: ' || m.meaning ELSE c.got END AS result
  FROM null_calls c LEFT JOIN null_meaningful m ON m.fn = c.fn AND m.arg = c.argument
 ORDER BY c.function, c.argument;
-- The summary: nothing else than 22004, and no documented NULL refused.
SELECT count(*) AS calls,
       count(*) FILTER (WHERE m.fn IS NULL AND c.got <> '22004') AS not_22004,
       count(*) FILTER (WHERE m.fn IS NOT NULL AND c.got = '22004') AS meaningful_refused
  FROM null_calls c LEFT JOIN null_meaningful m ON m.fn = c.fn AND m.arg = c.argument;
-- One wording for the whole API (_require): every 22004 says "... must
-- not be null", naming the argument or the arguments checked together.
-- Listed: those that do not (expected: none).
SELECT c.function, c.argument, c.message
  FROM null_calls c
 WHERE c.got = '22004' AND c.message NOT LIKE '% must not be null'
 ORDER BY c.function, c.argument;
-- Every listed exception is an argument of the API.
SELECT m.fn, m.arg FROM null_meaningful m
 WHERE NOT EXISTS (SELECT 1 FROM null_calls c WHERE c.fn = m.fn AND c.argument = m.arg);
-- The C helper the machines' attach runs as the table's owner is called
-- by the admin role's functions: its arguments get the same wording.
\set VERBOSITY terse
SELECT callback_center._fsm_unknown_state(NULL, 'status', '{a}');
SELECT callback_center._fsm_unknown_state('callback_center.orders', NULL, '{a}');
SELECT callback_center._fsm_unknown_state('callback_center.orders', 'status', NULL);
\set VERBOSITY default
