-- Sagas and TCC branches belong to the role that made them (issue 11
-- items 2 and 12): another role, an administrator or a superuser cannot run
-- someone else's saga with its own rights, nor confirm or cancel someone
-- else's branch.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
DROP ROLE IF EXISTS tcc_owner_a;
DROP ROLE IF EXISTS tcc_owner_b;
DROP ROLE IF EXISTS tcc_owner_admin;
RESET client_min_messages;
\set SHOW_CONTEXT never
CREATE ROLE tcc_owner_a NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO tcc_owner_a;
CREATE ROLE tcc_owner_b NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO tcc_owner_b;
CREATE ROLE tcc_owner_admin NOLOGIN IN ROLE callback_center_admin;
GRANT USAGE ON SCHEMA callback_center TO tcc_owner_admin;
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text;
BEGIN
    EXECUTE stmt INTO r;
    RETURN coalesce(r, 'ok');
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
GRANT EXECUTE ON FUNCTION pg_temp.try(text) TO PUBLIC;
SELECT callback_center.set_stock('to-A', 10) IS NOT NULL AS stock;

-- The attack: an app member stores a saga whose compensation needs a
-- superuser; its own run fails to compensate and leaves it compensating.
SET ROLE tcc_owner_a;
SELECT callback_center.saga_start('to-saga-1', $$[
    {"action": "SELECT 1", "compensation": "ALTER ROLE tcc_owner_a SUPERUSER"},
    {"action": "SELECT 1/0"}]$$) AS steps;
SELECT callback_center.saga_run('to-saga-1') AS own_run;
SELECT status, created_by FROM callback_center.sagas WHERE saga_id = 'to-saga-1';
RESET ROLE;
-- The operator retries the stuck saga, as the docs advise: refused, it is
-- not the operator's.
SELECT pg_temp.try($$SELECT callback_center.saga_run('to-saga-1')$$) AS superuser_run;
SELECT rolsuper AS a_became_superuser FROM pg_roles WHERE rolname = 'tcc_owner_a';
SET ROLE tcc_owner_admin;
SELECT pg_temp.try($$SELECT callback_center.saga_run('to-saga-1')$$) AS admin_run;
RESET ROLE;
-- Another app member neither runs it nor moves its bookkeeping.
SET ROLE tcc_owner_b;
SELECT pg_temp.try($$SELECT callback_center.saga_run('to-saga-1')$$) AS other_run;
SELECT pg_temp.try($$SELECT callback_center._saga_mark('to-saga-1', NULL, 'compensated', NULL)$$)
    AS other_mark;
SELECT pg_temp.try($$SELECT callback_center._saga_lock('to-saga-1')$$) AS other_lock;
-- saga_run runs with the caller's rights: its NULL check (_require) is
-- granted to the app role, so a NULL is 22004, not 42501.
SELECT pg_temp.try($$SELECT callback_center.saga_run(NULL)$$) AS app_null_run;
RESET ROLE;
-- Run as its creator (SET ROLE), it runs with the creator's rights only.
SET ROLE tcc_owner_a;
SELECT callback_center.saga_run('to-saga-1') AS creator_again;
RESET ROLE;
SELECT status FROM callback_center.sagas WHERE saga_id = 'to-saga-1';
SELECT rolsuper AS a_became_superuser FROM pg_roles WHERE rolname = 'tcc_owner_a';

-- TCC: B cannot confirm or cancel A's branch, nor try under it.
SET ROLE tcc_owner_a;
SELECT callback_center.tcc_stock_try('to-g1', 'stock', 'to-A', 2) AS a_try;
RESET ROLE;
SET ROLE tcc_owner_b;
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_cancel('to-g1', 'stock')$$) AS b_cancel;
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_confirm('to-g1', 'stock')$$) AS b_confirm;
SELECT pg_temp.try($$SELECT callback_center.barrier('to-g1', 'stock', 'cancel')$$) AS b_barrier;
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_try('to-g1', 'stock', 'to-A', 1)$$) AS b_try;
RESET ROLE;
SELECT available, reserved FROM callback_center.stock WHERE sku_id = 'to-A';
-- Nor can B pre-empt A's branch with an empty compensation that A's try
-- would then obey: the branch is B's, and A is refused instead.
SET ROLE tcc_owner_b;
SELECT callback_center.tcc_stock_cancel('to-g2', 'stock') AS b_cancel_first;
RESET ROLE;
SET ROLE tcc_owner_a;
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_try('to-g2', 'stock', 'to-A', 1)$$) AS a_try;
SELECT callback_center.tcc_stock_confirm('to-g1', 'stock') AS a_confirm;
RESET ROLE;
SELECT available, reserved FROM callback_center.stock WHERE sku_id = 'to-A';
SELECT gid, branch_id, op, created_by FROM callback_center.tcc_barrier
 WHERE gid LIKE 'to-%' ORDER BY 1, 2, 3;

DELETE FROM callback_center.tcc_barrier WHERE gid LIKE 'to-%';
DELETE FROM callback_center.tcc_reservations WHERE gid LIKE 'to-%';
DELETE FROM callback_center.sagas WHERE saga_id LIKE 'to-%';
REVOKE USAGE ON SCHEMA callback_center FROM tcc_owner_a;
DROP ROLE tcc_owner_a;
REVOKE USAGE ON SCHEMA callback_center FROM tcc_owner_b;
DROP ROLE tcc_owner_b;
REVOKE USAGE ON SCHEMA callback_center FROM tcc_owner_admin;
DROP ROLE tcc_owner_admin;
