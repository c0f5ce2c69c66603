SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Runs a statement and prints its SQLSTATE, message and detail, so that
-- every error below shows the code it raises.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    st text; msg text; det text;
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN others THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL;
    RETURN st || ': ' || msg || CASE WHEN det <> '' THEN ' | ' || det ELSE '' END;
END
$$;

-- Stock and deductions of this file's SKUs ("rs-" prefix).
CREATE VIEW pg_temp.rs_stock AS
    SELECT sku_id, available, reserved, version
      FROM callback_center.stock WHERE sku_id LIKE 'rs-%' ORDER BY sku_id;
CREATE VIEW pg_temp.rs_deductions AS
    SELECT biz_id, sku_id, quantity, restored, restored_at IS NOT NULL AS has_restored_at
      FROM callback_center.stock_deductions WHERE sku_id LIKE 'rs-%'
     ORDER BY biz_id, sku_id COLLATE "C";

--
-- set_stock / adjust_stock
--
SELECT sku_id, available, reserved, version, updated_at IS NOT NULL AS stamped
  FROM callback_center.set_stock('rs-a', 10);
SELECT sku_id, available, version FROM callback_center.set_stock('rs-a', 5);   -- replaces, version 1
SELECT sku_id, available, version FROM callback_center.set_stock('rs-b', 5);
SELECT sku_id, available, version FROM callback_center.set_stock('rs-c', 1);
SELECT sku_id, available, version FROM callback_center.set_stock('rs-z', 0);
SELECT sku_id, available, version FROM callback_center.adjust_stock('rs-a', 5);  -- 10, version 2
SELECT sku_id, available, version FROM callback_center.adjust_stock('rs-a', -10); -- 0 is allowed
SELECT sku_id, available, version FROM callback_center.set_stock('rs-a', 10);
SELECT pg_temp.try($$SELECT callback_center.adjust_stock('rs-a', -11)$$);
SELECT pg_temp.try($$SELECT callback_center.adjust_stock('rs-nope', 1)$$);
SELECT pg_temp.try($$SELECT callback_center.adjust_stock(NULL, 1)$$);
SELECT pg_temp.try($$SELECT callback_center.adjust_stock('rs-a', NULL)$$);
SELECT pg_temp.try($$SELECT callback_center.set_stock('rs-a', -1)$$);
SELECT pg_temp.try($$SELECT callback_center.set_stock(NULL, 1)$$);
SELECT pg_temp.try($$SELECT callback_center.set_stock('rs-a', NULL)$$);
SELECT * FROM pg_temp.rs_stock;

--
-- deduct_stock, one SKU
--
SELECT * FROM callback_center.deduct_stock('rs-o1', 'rs-a', 3);
-- the same biz id again: nothing changes, the recorded quantity is reported
SELECT * FROM callback_center.deduct_stock('rs-o1', 'rs-a', 3);
SELECT * FROM callback_center.deduct_stock('rs-o1', 'rs-a', 7);
-- compare-and-set on the version: the current one (5) succeeds
SELECT * FROM callback_center.deduct_stock('rs-o2', 'rs-a', 2, 5);
-- a stale version is CB002, with expected and current version
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-a', 1, 5)$$);
-- stale version and too few units: the version conflict is reported
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-a', 100, 5)$$);
-- right version, too few units: CB001
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-a', 6, 6)$$);
-- without a version
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-a', 6)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-z', 1)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-nope', 1)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-nope', 1, 0)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-a', 0)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-a', -2)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock(NULL, 'rs-a', 1)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', NULL, 1)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o3', 'rs-a', NULL::bigint)$$);
-- failed calls left no record behind
SELECT * FROM pg_temp.rs_deductions;
-- exactly the last units, then none
SELECT * FROM callback_center.deduct_stock('rs-o4', 'rs-a', 5);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('rs-o5', 'rs-a', 1)$$);
SELECT * FROM pg_temp.rs_stock;

--
-- deduct_stock, several SKUs (jsonb and arrays)
--
SELECT sku_id, available, version FROM callback_center.set_stock('rs-c', 5);
SELECT sku_id, available, version FROM callback_center.set_stock('rs-d', 1);
-- returned in bytewise sku order, duplicates merged (rs-b 1 + 2)
SELECT * FROM callback_center.deduct_stock('rs-m1',
    '[{"sku": "rs-c", "qty": 1}, {"sku": "rs-b", "qty": 1}, {"sku": "rs-d", "qty": 1, "version": 0},
      {"sku": "rs-b", "qty": 2, "version": null}]');
SELECT * FROM pg_temp.rs_stock;
-- all or nothing: the third SKU (in lock order) is short, the first two stay untouched
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m2',
    '[{"sku": "rs-d", "qty": 1}, {"sku": "rs-c", "qty": 1}, {"sku": "rs-b", "qty": 1}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m2',
    ARRAY['rs-nope', 'rs-c', 'rs-b'], ARRAY[1, 1, 1])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m2',
    ARRAY['rs-b', 'rs-c'], ARRAY[1, 1], ARRAY[1, 0])$$);
SELECT * FROM pg_temp.rs_stock;
SELECT * FROM pg_temp.rs_deductions WHERE biz_id LIKE 'rs-m%';
-- arrays, with a version for one SKU only
SELECT * FROM callback_center.deduct_stock('rs-m3', ARRAY['rs-c', 'rs-b'], ARRAY[1, 1], ARRAY[NULL, 1]);
-- a repeat with one more SKU: the known one is "already", the new one is deducted
SELECT sku_id, available, version FROM callback_center.adjust_stock('rs-d', 2);
SELECT * FROM callback_center.deduct_stock('rs-m3', '[{"sku": "rs-d", "qty": 1}, {"sku": "rs-b", "qty": 1}]');
-- the repeat check comes before the version check: a replay with a stale version is "already"
SELECT * FROM callback_center.deduct_stock('rs-m3', ARRAY['rs-b'], ARRAY[1], ARRAY[0]);
-- bad input
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '{"sku": "rs-a", "qty": 1}')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[1]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"sku": "rs-a"}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"qty": 1}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"sku": null, "qty": 1}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"sku": 1, "qty": 1}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"sku": "rs-a", "qty": 1.5}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"sku": "rs-a", "qty": "1"}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"sku": "rs-a", "qty": 0}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', '[{"sku": "rs-a", "quantity": 1}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9',
    '[{"sku": "rs-a", "qty": 1, "version": 1}, {"sku": "rs-a", "qty": 1, "version": 2}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9',
    '[{"sku": "rs-a", "qty": 9223372036854775807}, {"sku": "rs-a", "qty": 1}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', NULL::jsonb)$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock(NULL, '[{"sku": "rs-a", "qty": 1}]')$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', ARRAY['rs-a'], ARRAY[1, 2])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', ARRAY['rs-a'], ARRAY[1], ARRAY[1, 2])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', ARRAY[]::text[], ARRAY[]::bigint[])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', ARRAY[['rs-a']], ARRAY[[1]])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', ARRAY['rs-a', NULL], ARRAY[1, 1])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', ARRAY['rs-a'], ARRAY[NULL::bigint])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', ARRAY['rs-a'], ARRAY[-1])$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.deduct_stock('rs-m9', NULL::text[], ARRAY[1])$$);
SELECT count(*) AS rs_m9_rows FROM callback_center.stock_deductions WHERE biz_id = 'rs-m9';

--
-- restore_stock
--
SELECT * FROM pg_temp.rs_stock;
SELECT * FROM callback_center.restore_stock('rs-m1');
-- once: the second call restores nothing
SELECT * FROM callback_center.restore_stock('rs-m1');
-- a restored biz id cannot deduct again
SELECT * FROM callback_center.deduct_stock('rs-m1', 'rs-b', 2);
-- per SKU
SELECT * FROM callback_center.restore_stock('rs-m3', 'rs-d');
SELECT * FROM callback_center.restore_stock('rs-m3', 'rs-d');
SELECT * FROM callback_center.restore_stock('rs-m3');
SELECT * FROM callback_center.restore_stock('rs-m3');
-- unknown biz id (or SKU): no rows, no error
SELECT * FROM callback_center.restore_stock('rs-never');
SELECT * FROM callback_center.restore_stock('rs-o1', 'rs-never');
SELECT pg_temp.try($$SELECT * FROM callback_center.restore_stock(NULL)$$);
SELECT pg_temp.try($$SELECT * FROM callback_center.restore_stock('rs-o1', NULL)$$);
-- deduct and restore inside one transaction that rolls back change nothing
BEGIN;
SELECT * FROM callback_center.deduct_stock('rs-t1', 'rs-b', 1);
SELECT * FROM callback_center.restore_stock('rs-t1');
SELECT * FROM callback_center.deduct_stock('rs-t1', 'rs-b', 1);
ROLLBACK;
SELECT * FROM pg_temp.rs_stock;
SELECT * FROM pg_temp.rs_deductions;

-- Invariant: available + units held by non-restored deductions is what
-- set_stock/adjust_stock put in: rs-a 10, rs-b 5, rs-c 5, rs-d 1 + 2, rs-z 0.
SELECT s.sku_id, s.available + coalesce(sum(d.quantity) FILTER (WHERE NOT d.restored), 0) AS total
  FROM callback_center.stock s
  LEFT JOIN callback_center.stock_deductions d USING (sku_id)
 WHERE s.sku_id LIKE 'rs-%'
 GROUP BY s.sku_id, s.available ORDER BY s.sku_id;

--
-- privileges
--
SELECT p.oid::regprocedure AS function,
       has_function_privilege('callback_center_app', p.oid, 'EXECUTE') AS app,
       has_function_privilege('callback_center_admin', p.oid, 'EXECUTE') AS admin,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public,
       p.prosecdef AS definer,
       p.proconfig
  FROM pg_proc p
 WHERE p.pronamespace = 'callback_center'::regnamespace
   AND p.proname IN ('set_stock', 'adjust_stock', 'deduct_stock', 'restore_stock')
 ORDER BY p.oid::regprocedure::text;
-- Members of the group roles may use this database.
GRANT USAGE ON SCHEMA callback_center TO callback_center_app, callback_center_admin;
SET ROLE callback_center_app;
SELECT * FROM callback_center.deduct_stock('rs-app', 'rs-c', 1);
SELECT * FROM callback_center.restore_stock('rs-app');
SELECT pg_temp.try($$SELECT callback_center.set_stock('rs-c', 100)$$);
SELECT pg_temp.try($$UPDATE callback_center.stock SET available = 100 WHERE sku_id = 'rs-c'$$);
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM callback_center_app, callback_center_admin;
-- the stock tables are dumped with the extension's data
SELECT c::regclass AS dumped
  FROM pg_extension, unnest(extconfig) AS c
 WHERE extname = 'callback_center' AND c::regclass::text LIKE 'callback_center.stock%'
 ORDER BY 1;

DELETE FROM callback_center.stock_deductions WHERE sku_id LIKE 'rs-%';
DELETE FROM callback_center.stock WHERE sku_id LIKE 'rs-%';
