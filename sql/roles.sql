SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- The role model: the application enqueues and reads settings; only the
-- admin manages endpoints and reads secrets.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

SET client_min_messages = warning;
DROP ROLE IF EXISTS roles_test_app;
DROP ROLE IF EXISTS roles_test_admin;
RESET client_min_messages;
CREATE ROLE roles_test_app NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO roles_test_app;
CREATE ROLE roles_test_admin NOLOGIN IN ROLE callback_center_admin;
GRANT USAGE ON SCHEMA callback_center TO roles_test_admin;

-- The admin sets up an endpoint.
SET ROLE roles_test_admin;
SELECT callback_center.create_endpoint('roles_ep', 'https://roles.example/hook',
       '{roles.event}') > 0 AS created;
SELECT callback_center.endpoint_secret('roles_ep') LIKE 'whsec\_%' AS admin_reads_secret;
SELECT count(*) AS admin_reads_secrets_table FROM callback_center.endpoint_secrets s
  JOIN callback_center.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'roles_ep';
SELECT pg_temp.try($$INSERT INTO callback_center.retry_schedules (name, delays)
                     VALUES ('roles_sched', '{2s}')$$) AS admin_adds_schedule;
SELECT pg_temp.try($$INSERT INTO callback_center.retry_schedules (name, delays, builtin)
                     VALUES ('roles_fake', '{2s}', true)$$) AS admin_cannot_fake_builtin;
SELECT pg_temp.try($$INSERT INTO callback_center.endpoints (name, url, event_types)
                     VALUES ('roles_raw', 'https://x', '{a}')$$) AS admin_no_raw_insert;
-- Payment channel keys: the admin loads them (set_provider,
-- set_platform_keys) but reads them back from nowhere.
SELECT pg_temp.try($$SELECT callback_center.set_provider('roles_wx', 'wechatpay_v3',
       ARRAY['roles0apiv3key0of032bytes0000000'])$$) AS admin_sets_channel;
SELECT pg_temp.try($$SELECT callback_center.set_platform_keys('roles_wx', '{"01": "x"}')$$)
       AS admin_runs_set_platform_keys;
SELECT pg_temp.try($$SELECT * FROM callback_center.provider_keys$$) AS admin_reads_provider_keys;
SELECT pg_temp.try($$SELECT * FROM callback_center.providers$$) AS admin_reads_providers;
RESET ROLE;

-- The application.
SET ROLE roles_test_app;
SELECT callback_center.enqueue('roles.event', 'roles-agg-1', '{"n": 1}') AS app_enqueues;
SELECT callback_center.enqueue_to('roles_ep', 'roles.direct', 'roles-agg-1', '{}') AS app_enqueues_to;
SELECT name, url, event_types FROM callback_center.endpoint_config WHERE name = 'roles_ep';
SELECT count(*) AS app_reads_outbox FROM callback_center.outbox WHERE aggregate_id = 'roles-agg-1';
SELECT s, pg_temp.try(s) FROM (VALUES
  ($$SELECT * FROM callback_center.endpoint_secrets$$),
  ($$SELECT * FROM callback_center.endpoints$$),
  ($$SELECT callback_center.endpoint_secret('roles_ep')$$),
  ($$SELECT callback_center.create_endpoint('roles_x', 'https://x.example', '{a}')$$),
  ($$SELECT callback_center.alter_endpoint('roles_ep', '{"url": "https://evil.example"}')$$),
  ($$SELECT callback_center.set_endpoint_enabled('roles_ep', false)$$),
  ($$SELECT callback_center.rotate_endpoint_secret('roles_ep')$$),
  ($$SELECT callback_center.drop_endpoint('roles_ep')$$),
  ($$SELECT callback_center._outbox_note_enqueue()$$),
  ($$SELECT callback_center._check_secret(NULL)$$),
  ($$SELECT * FROM callback_center.providers$$),
  ($$SELECT * FROM callback_center.provider_keys$$),
  ($$SELECT callback_center.set_platform_keys('roles_wx', '{}')$$),
  ($$SELECT * FROM callback_center._channel_parse('alipay', 'roles_ali', '{}', 'a=b')$$),
  ($$SELECT callback_center._rsa_sha256_check('k', 'd', 's')$$),
  ($$INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
     VALUES (1, 'forged', 'x', '{}')$$),
  ($$UPDATE callback_center.outbox SET status = 'delivered'$$),
  ($$DELETE FROM callback_center.outbox$$),
  ($$INSERT INTO callback_center.retry_schedules (name, delays) VALUES ('roles_y', '{1s}')$$)
) AS t(s);
RESET ROLE;

-- Someone with no grant at all.
CREATE ROLE roles_test_nobody NOLOGIN;
SET ROLE roles_test_nobody;
SELECT pg_temp.try($$SELECT callback_center.enqueue('roles.event', 'roles-agg-2', '{}')$$) AS nobody_enqueue;
SELECT pg_temp.try($$SELECT * FROM callback_center.endpoint_config$$) AS nobody_config;
RESET ROLE;
DROP ROLE roles_test_nobody;

-- A member of the group roles granted nothing in this database: membership
-- says what, USAGE on the schema says where (doc/outbox.md#role-model).
CREATE ROLE roles_test_elsewhere NOLOGIN IN ROLE callback_center_app, callback_center_admin;
SET ROLE roles_test_elsewhere;
SELECT pg_temp.try($$SELECT callback_center.enqueue('roles.event', 'roles-agg-3', '{}')$$) AS elsewhere_enqueue;
SELECT pg_temp.try($$SELECT * FROM callback_center.endpoint_config$$) AS elsewhere_config;
SELECT pg_temp.try($$SELECT callback_center.endpoint_secret('roles_ep')$$) AS elsewhere_secret;
RESET ROLE;
DROP ROLE roles_test_elsewhere;
SELECT has_schema_privilege('callback_center_app', 'callback_center', 'USAGE') AS app_group_usage,
       has_schema_privilege('callback_center_admin', 'callback_center', 'USAGE') AS admin_group_usage;

-- Catalog checks over the whole extension, so they stay true as areas are
-- added.  1. Every SECURITY DEFINER function pins search_path (expected:
-- no rows).
SELECT p.oid::regprocedure AS definer_without_search_path
  FROM pg_proc p
 WHERE p.pronamespace = 'callback_center'::regnamespace
   AND p.prosecdef
   AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\_path=%')
 ORDER BY p.oid::regprocedure::text;
-- 2. No function in the schema is executable by PUBLIC (expected: none).
SELECT p.oid::regprocedure AS executable_by_public
  FROM pg_proc p
 WHERE p.pronamespace = 'callback_center'::regnamespace
   AND has_function_privilege('public', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text;
-- 3. Functions the application role may run (reviewed list).
SELECT p.oid::regprocedure AS app_executable
  FROM pg_proc p
 WHERE p.pronamespace = 'callback_center'::regnamespace
   AND has_function_privilege('callback_center_app', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text;
-- 3b. Internal functions (named "_...") the roles may run.  Each is here
-- only because a SECURITY INVOKER function or view of that role calls it
-- with the role's rights; everything else internal is called by SECURITY
-- DEFINER functions, as the owner, and granted to no one.
--   app: _fsm_trigger_args (view state_machine_attachments, read by
--        apply_event); _saga_lock, _saga_mark (saga_run runs its steps with
--        the caller's rights, so it is SECURITY INVOKER; called directly
--        they only lock a saga or move its bookkeeping forward); _require,
--        _require_key (the argument checks of apply_event, saga_run and
--        the admin's attach/detach_state_machine; they only raise).
--   admin: the same; _fsm_require_machine, _fsm_trigger_name,
--        _fsm_unknown_state (attach_state_machine); _purge_batch,
--        _purge_check, _purge_targets (the procedure purge_in_batches, which
--        commits between batches and so cannot be SECURITY DEFINER).
SELECT p.oid::regprocedure AS internal_function,
       has_function_privilege('callback_center_app', p.oid, 'EXECUTE') AS app,
       has_function_privilege('callback_center_admin', p.oid, 'EXECUTE') AS admin,
       p.prosecdef AS definer
  FROM pg_proc p
 WHERE p.pronamespace = 'callback_center'::regnamespace
   AND p.proname LIKE '\_%'
   AND (has_function_privilege('callback_center_app', p.oid, 'EXECUTE')
        OR has_function_privilege('callback_center_admin', p.oid, 'EXECUTE'))
 ORDER BY p.oid::regprocedure::text;
-- 4. Tables and sequences the application role can read (reviewed list)
-- and that no secret is among them.  The outbox is not here: the app reads
-- every column of it but payload (column privileges, sql/fsm_security.sql).
SELECT c.oid::regclass AS app_readable
  FROM pg_class c
 WHERE c.relnamespace = 'callback_center'::regnamespace
   AND c.relkind IN ('r', 'v', 'm', 'p', 'S')
   AND has_table_privilege('callback_center_app', c.oid, 'SELECT')
 ORDER BY c.oid::regclass::text;
SELECT c.oid::regclass AS app_sees_secret_column
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace = 'callback_center'::regnamespace
   AND a.attname LIKE '%secret%' AND a.attnum > 0
   AND has_column_privilege('callback_center_app', c.oid, a.attnum, 'SELECT')
 ORDER BY c.oid::regclass::text;
-- 5. Tables and sequences that hold user data are dumped by pg_dump (in
-- pg_extension.extconfig), with the sequences behind their ids (else a
-- restored table hands out its ids again).  Listed here: the ones that are
-- not.  Expected: only endpoint_state, runtime state the worker publishes
-- and never reads back (70_delivery.sql).
SELECT c.oid::regclass AS not_in_extconfig
  FROM pg_class c
 WHERE c.relnamespace = 'callback_center'::regnamespace
   AND c.relkind IN ('r', 'p', 'S')
   AND c.oid <> ALL (SELECT unnest(extconfig) FROM pg_extension
                      WHERE extname = 'callback_center')
 ORDER BY c.oid::regclass::text;

-- Clean up.
SELECT callback_center.drop_endpoint('roles_ep') AS removed_rows;
SELECT callback_center.drop_provider('roles_wx');
DELETE FROM callback_center.retry_schedules WHERE name = 'roles_sched';
REVOKE USAGE ON SCHEMA callback_center FROM roles_test_app;
DROP ROLE roles_test_app;
REVOKE USAGE ON SCHEMA callback_center FROM roles_test_admin;
DROP ROLE roles_test_admin;
