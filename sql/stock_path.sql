SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- deduct_stock and restore_stock are not SECURITY DEFINER and have no SET
-- search_path: the C code runs as the function's owner under a pinned
-- search path.  An application role whose search_path puts its own
-- tables, operators and functions before pg_catalog must get exactly the
-- normal behaviour, and still cannot write the stock tables itself.
\set SHOW_CONTEXT never
SET client_min_messages = warning;
DROP ROLE IF EXISTS stock_path_app;
DROP ROLE IF EXISTS stock_path_nobody;
DROP ROLE IF EXISTS stock_path_owner;
RESET client_min_messages;
CREATE ROLE stock_path_app NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO stock_path_app;
CREATE ROLE stock_path_nobody NOLOGIN;
CREATE ROLE stock_path_owner NOLOGIN;

SELECT sku_id, available, version FROM callback_center.set_stock('sp-a', 10);
SELECT sku_id, available, version FROM callback_center.set_stock('sp-b', 5);

-- The hostile schema: look-alike tables, and an operator or function for
-- every name the stock statements use.  Each one logs its use in hits
-- (their own bodies run with a safe path, or they would call each other).
CREATE SCHEMA stock_path_evil;
GRANT USAGE ON SCHEMA stock_path_evil TO PUBLIC;
CREATE TABLE stock_path_evil.hits (what text);
CREATE TABLE stock_path_evil.stock (LIKE callback_center.stock INCLUDING ALL);
CREATE TABLE stock_path_evil.stock_deductions
    (LIKE callback_center.stock_deductions INCLUDING ALL);
GRANT ALL ON stock_path_evil.hits, stock_path_evil.stock,
    stock_path_evil.stock_deductions TO PUBLIC;
CREATE FUNCTION stock_path_evil.text_eq(text, text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO stock_path_evil.hits VALUES ('text = text');
    RETURN true;
END $$;
CREATE OPERATOR stock_path_evil.= (LEFTARG = text, RIGHTARG = text,
    FUNCTION = stock_path_evil.text_eq);
CREATE FUNCTION stock_path_evil.int8_ge(bigint, bigint) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO stock_path_evil.hits VALUES ('bigint >= bigint');
    RETURN true;
END $$;
CREATE OPERATOR stock_path_evil.>= (LEFTARG = bigint, RIGHTARG = bigint,
    FUNCTION = stock_path_evil.int8_ge);
CREATE FUNCTION stock_path_evil.int8_eq(bigint, bigint) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO stock_path_evil.hits VALUES ('bigint = bigint');
    RETURN true;
END $$;
CREATE OPERATOR stock_path_evil.= (LEFTARG = bigint, RIGHTARG = bigint,
    FUNCTION = stock_path_evil.int8_eq);
CREATE FUNCTION stock_path_evil.int8_mi(a bigint, b bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO stock_path_evil.hits VALUES ('bigint - bigint');
    RETURN a + b;
END $$;
CREATE OPERATOR stock_path_evil.- (LEFTARG = bigint, RIGHTARG = bigint,
    FUNCTION = stock_path_evil.int8_mi);
CREATE FUNCTION stock_path_evil.int8_pl(a bigint, b bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO stock_path_evil.hits VALUES ('bigint + bigint');
    RETURN a + b + 1000;
END $$;
CREATE OPERATOR stock_path_evil.+ (LEFTARG = bigint, RIGHTARG = bigint,
    FUNCTION = stock_path_evil.int8_pl);
CREATE FUNCTION stock_path_evil.int84_pl(a bigint, b integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO stock_path_evil.hits VALUES ('bigint + integer');
    RETURN a + b + 1000;
END $$;
CREATE OPERATOR stock_path_evil.+ (LEFTARG = bigint, RIGHTARG = integer,
    FUNCTION = stock_path_evil.int84_pl);
CREATE FUNCTION stock_path_evil.now() RETURNS timestamptz
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO stock_path_evil.hits VALUES ('now()');
    RETURN '2000-01-01 00:00:00+00';
END $$;

-- The application role, with the hostile schema first (before pg_catalog,
-- which is then searched second) and a temp table named like ours.
SET ROLE stock_path_app;
CREATE TEMP TABLE stock (sku_id text, available bigint, version bigint);
SET search_path = stock_path_evil, pg_catalog;
-- the hostile path is in force for the caller's own statements
SELECT 'x'::text = 'y'::text AS evil_text_eq, 5::bigint - 3::bigint AS evil_minus;
SELECT what, count(*) FROM stock_path_evil.hits GROUP BY what ORDER BY what;
DELETE FROM stock_path_evil.hits;

-- The first calls of this session: the statements are prepared now.
SELECT * FROM callback_center.deduct_stock('sp-o1', 'sp-a', 3);
SELECT * FROM callback_center.deduct_stock('sp-o1', 'sp-a', 3);
SELECT * FROM callback_center.deduct_stock('sp-o2', 'sp-a', 1, 1);
SELECT * FROM callback_center.deduct_stock('sp-o3',
    '[{"sku": "sp-b", "qty": 2}, {"sku": "sp-a", "qty": 1}]');
SELECT * FROM callback_center.deduct_stock('sp-o4', ARRAY['sp-b'], ARRAY[1]);
SELECT * FROM callback_center.restore_stock('sp-o3');
SELECT * FROM callback_center.restore_stock('sp-o1', 'sp-a');
SELECT * FROM callback_center.restore_stock('sp-o1', 'sp-a');
-- every error is the normal one, and leaves the caller's user and path
SELECT * FROM callback_center.deduct_stock('sp-o5', 'sp-a', 100);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT current_user, current_setting('search_path') AS search_path;
SELECT * FROM callback_center.deduct_stock('sp-o5', 'sp-a', 1, 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.deduct_stock('sp-o5', 'sp-none', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT current_user, current_setting('search_path') AS search_path;
-- the same caught in a subtransaction
DO $$
BEGIN
    PERFORM callback_center.deduct_stock('sp-o5', 'sp-a', 100);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'caught %, running as %, search_path %',
        SQLSTATE, current_user, current_setting('search_path');
END $$;
-- the role still cannot write the tables itself
SELECT * FROM callback_center.stock_deductions LIMIT 0;
UPDATE callback_center.stock SET available = 1000 WHERE sku_id LIKE 'sp-%';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO callback_center.stock_deductions (biz_id, sku_id, quantity)
VALUES ('sp-forged', 'sp-a', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM callback_center.stock_deductions WHERE biz_id LIKE 'sp-%';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TABLE pg_temp.stock;
RESET ROLE;

-- After an invalidation the statements are analyzed again; still under
-- the pinned path.
ALTER TABLE callback_center.stock ALTER COLUMN updated_at SET STATISTICS 50;
ALTER TABLE callback_center.stock ALTER COLUMN updated_at SET STATISTICS -1;
ALTER TABLE callback_center.stock_deductions ALTER COLUMN restored_at SET STATISTICS 50;
ALTER TABLE callback_center.stock_deductions ALTER COLUMN restored_at SET STATISTICS -1;
SET ROLE stock_path_app;
SELECT * FROM callback_center.deduct_stock('sp-o6', 'sp-a', 2, 5);
SELECT * FROM callback_center.restore_stock('sp-o4');
SELECT current_user, current_setting('search_path') AS search_path;
RESET ROLE;
RESET search_path;

-- Nothing hostile was used, nothing landed in the look-alike tables, the
-- real rows are right: sp-a 10 - 3 (o1, restored) - 1 (o2) - 1 (o3,
-- restored) - 2 (o6) = 7 at version 6 (four deductions, two restores);
-- sp-b 5 - 2 (o3, restored) - 1 (o4, restored) = 5 at version 4.
SELECT what, count(*) FROM stock_path_evil.hits GROUP BY what ORDER BY what;
SELECT (SELECT count(*) FROM stock_path_evil.stock) AS evil_stock,
       (SELECT count(*) FROM stock_path_evil.stock_deductions) AS evil_deductions;
SELECT sku_id, available, version, updated_at > '2001-01-01' AS real_now
  FROM callback_center.stock WHERE sku_id LIKE 'sp-%' ORDER BY sku_id;
SELECT biz_id, sku_id, quantity, restored,
       deducted_at > '2001-01-01' AS real_now,
       coalesce(restored_at > '2001-01-01', true) AS real_now_restored
  FROM callback_center.stock_deductions
 WHERE sku_id LIKE 'sp-%' ORDER BY biz_id, sku_id;

-- No grant, no call, no read (even with usage on the schema).
GRANT USAGE ON SCHEMA callback_center TO stock_path_nobody;
SET ROLE stock_path_nobody;
SELECT * FROM callback_center.deduct_stock('sp-o7', 'sp-a', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.restore_stock('sp-o6');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) FROM callback_center.stock;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM stock_path_nobody;

-- The call runs as the function's owner, not as the caller: owned by a
-- role without rights on the tables, it fails even for a superuser; the
-- new owner is seen at once, and the old one again after the rollback.
BEGIN;
GRANT USAGE ON SCHEMA callback_center TO stock_path_owner;
ALTER FUNCTION callback_center.deduct_stock(text, text, bigint, bigint)
    OWNER TO stock_path_owner;
SELECT * FROM callback_center.deduct_stock('sp-o7', 'sp-a', 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
SELECT * FROM callback_center.deduct_stock('sp-o7', 'sp-a', 1);
SELECT p.oid::regprocedure AS function, p.prosecdef AS definer, p.proconfig,
       pg_catalog.pg_get_userbyid(p.proowner) = current_user AS owned_by_installer
  FROM pg_proc p
 WHERE p.pronamespace = 'callback_center'::regnamespace
   AND p.proname IN ('deduct_stock', 'restore_stock')
 ORDER BY p.oid::regprocedure::text;

-- Clean up.
SET client_min_messages = warning;
DROP SCHEMA stock_path_evil CASCADE;
RESET client_min_messages;
DELETE FROM callback_center.stock_deductions WHERE sku_id LIKE 'sp-%';
DELETE FROM callback_center.stock WHERE sku_id LIKE 'sp-%';
REVOKE USAGE ON SCHEMA callback_center FROM stock_path_app;
DROP ROLE stock_path_app;
DROP ROLE stock_path_nobody;
DROP ROLE stock_path_owner;
