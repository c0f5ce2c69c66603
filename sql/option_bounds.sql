-- Settings that would break the worker are refused when they are set
-- (issue 10): endpoint options, retry delays, GUCs.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;
\set SHOW_CONTEXT never
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
SELECT callback_center.create_endpoint('ob-ep', 'http://127.0.0.1:9/ob', '{ob.x}') > 0 AS created;
SELECT v AS rate_limit_per_s,
       pg_temp.try(format($$SELECT callback_center.alter_endpoint('ob-ep', '{"rate_limit_per_s": %s}')$$, v)) AS result
  FROM unnest(ARRAY['1e400', '1e7', '1000000', '1e-300', '0.0001', '0.001', '50', 'null']) AS v;
SELECT rate_limit_per_s FROM callback_center.endpoint_config WHERE name = 'ob-ep';
SELECT pg_temp.try($$SELECT callback_center.create_endpoint('ob-ep2', 'http://127.0.0.1:9/ob', '{ob.x}', NULL,
    '{"rate_limit_per_s": 1e400}')$$) AS create_1e400;
-- Retry delays: at most 30 days each (300,000 years overflowed the worker).
SELECT pg_temp.try($$INSERT INTO callback_center.retry_schedules (name, delays)
    VALUES ('ob_forever', ARRAY[interval '300000 years'])$$) AS huge_delay;
SELECT pg_temp.try($$INSERT INTO callback_center.retry_schedules (name, delays)
    VALUES ('ob_month', ARRAY[interval '30 days', interval '1 s'])$$) AS month_delay;
SELECT pg_temp.try($$UPDATE callback_center.retry_schedules SET delays = ARRAY[interval '31 days']
    WHERE name = 'ob_month'$$) AS longer;
DELETE FROM callback_center.retry_schedules WHERE name = 'ob_month';
-- GUCs are range-checked by PostgreSQL when set.
SELECT pg_temp.try($$SET callback_center.signature_tolerance = '30000d'$$) AS tolerance;
SELECT pg_temp.try($$SET callback_center.signature_tolerance = '1d'$$) AS tolerance_day;
SELECT callback_center.drop_endpoint('ob-ep') >= 0 AS dropped;
DELETE FROM callback_center.retry_schedules WHERE name = 'ob_forever';
SELECT callback_center.drop_endpoint(name) >= 0 AS dropped FROM callback_center.endpoints WHERE name = 'ob-ep2';
