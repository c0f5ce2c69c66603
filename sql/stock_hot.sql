SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Hot SKUs: units spread over slot rows, deducted without queueing on one
-- row, exactly.  Which slot a deduction takes from is random, so this file
-- shows totals, and slots only where they are determined.
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

-- Per SKU of this file ("hs-" prefix): the stored row, the true total, the
-- slots' sum, count and smallest value.
CREATE VIEW pg_temp.hs AS
    SELECT s.sku_id, s.available AS row_available, l.available AS total, s.version, s.slots,
           (SELECT sum(t.available) FROM callback_center.stock_slots t WHERE t.sku_id = s.sku_id) AS slot_sum,
           (SELECT count(*) FROM callback_center.stock_slots t WHERE t.sku_id = s.sku_id) AS slot_rows,
           (SELECT min(t.available) FROM callback_center.stock_slots t WHERE t.sku_id = s.sku_id) AS slot_min
      FROM callback_center.stock s JOIN callback_center.stock_levels l USING (sku_id)
     WHERE s.sku_id LIKE 'hs-%' ORDER BY s.sku_id;
CREATE VIEW pg_temp.hs_slots AS
    SELECT sku_id, slot, available FROM callback_center.stock_slots
     WHERE sku_id LIKE 'hs-%' ORDER BY sku_id, slot;

--
-- set_hot_sku: 10 units over 4 slots, evenly (the first 10 % 4 get one more)
--
SELECT sku_id, available FROM callback_center.set_stock('hs-a', 10);
SELECT sku_id, available, reserved, version, slots FROM callback_center.set_hot_sku('hs-a', 4);
SELECT * FROM pg_temp.hs_slots;
SELECT * FROM pg_temp.hs;   -- the row keeps 0; the view reports 10

--
-- deduct: one slot, any; a repeat changes nothing; version is untouched
--
SELECT * FROM callback_center.deduct_stock('hs-o1', 'hs-a', 3);
SELECT * FROM callback_center.deduct_stock('hs-o1', 'hs-a', 3);
SELECT * FROM pg_temp.hs;
-- only slots 0 and 1 had 3 units: one of them is now empty
SELECT count(*) FILTER (WHERE available = 0) AS emptied,
       count(*) FILTER (WHERE slot IN (2, 3) AND available = 2) AS untouched
  FROM pg_temp.hs_slots WHERE sku_id = 'hs-a';
-- 5 units: no slot holds them (3, 2, 2 left), so they are taken across slots
SELECT * FROM callback_center.deduct_stock('hs-o2', 'hs-a', 5);
-- the exact path locked the slots in order until they held 5 (3 + 0 + 2
-- or 0 + 3 + 2) and took them: either way slot 3 alone is left
SELECT * FROM pg_temp.hs_slots WHERE sku_id = 'hs-a';
-- the last 2 units, then nothing is left
SELECT * FROM callback_center.deduct_stock('hs-o3', 'hs-a', 2);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-o4', 'hs-a', 1)$$);
SELECT * FROM pg_temp.hs;
SELECT biz_id, quantity, restored FROM callback_center.stock_deductions
 WHERE sku_id = 'hs-a' ORDER BY biz_id;

--
-- exhaust exactly: 5 units over 4 slots (2, 1, 1, 1), one order takes all 5
--
SELECT sku_id, available FROM callback_center.set_stock('hs-b', 5);
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-b', 4);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-b1', 'hs-b', 6)$$);
SELECT * FROM callback_center.deduct_stock('hs-b1', 'hs-b', 5);
SELECT * FROM pg_temp.hs_slots WHERE sku_id = 'hs-b';
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-b2', 'hs-b', 1)$$);
-- nothing of the failed calls was recorded
SELECT biz_id, quantity FROM callback_center.stock_deductions WHERE sku_id = 'hs-b';

--
-- restore: exactly what the order took, once, into the slots
--
SELECT * FROM callback_center.restore_stock('hs-o2');
SELECT * FROM callback_center.restore_stock('hs-o2');
SELECT * FROM callback_center.restore_stock('hs-b1', 'hs-b');
SELECT * FROM callback_center.restore_stock('hs-b1', 'hs-b');
SELECT * FROM pg_temp.hs;
-- a retry of a restored order does not take again
SELECT * FROM callback_center.deduct_stock('hs-o2', 'hs-a', 5);

--
-- compare-and-set needs one row: refused on a hot SKU
--
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-v1', 'hs-a', 1, 1)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-v1', '[{"sku": "hs-a", "qty": 1, "version": 1}]')$$);
-- a repeat is still judged first
SELECT * FROM callback_center.deduct_stock('hs-o1', 'hs-a', 3, 99);

--
-- several SKUs, hot and normal, all or nothing
--
SELECT sku_id, available FROM callback_center.set_stock('hs-n', 1);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-m1',
    '[{"sku": "hs-n", "qty": 2}, {"sku": "hs-a", "qty": 2}, {"sku": "hs-b", "qty": 2}]')$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-m1',
    ARRAY['hs-b', 'hs-a', 'hs-n'], ARRAY[2, 2, 2])$$);
SELECT * FROM pg_temp.hs;   -- unchanged
SELECT count(*) AS m1_records FROM callback_center.stock_deductions WHERE biz_id = 'hs-m1';
-- the hot SKU short, the normal one fine: still nothing
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-m1',
    '[{"sku": "hs-n", "qty": 1}, {"sku": "hs-b", "qty": 6}]')$$);
SELECT count(*) AS m1_records FROM callback_center.stock_deductions WHERE biz_id = 'hs-m1';
SELECT * FROM callback_center.deduct_stock('hs-m1',
    '[{"sku": "hs-n", "qty": 1}, {"sku": "hs-a", "qty": 2}, {"sku": "hs-b", "qty": 1}, {"sku": "hs-b", "qty": 1}]');
SELECT * FROM pg_temp.hs;
SELECT * FROM callback_center.restore_stock('hs-m1');
SELECT * FROM pg_temp.hs;

--
-- set_stock and adjust_stock on a hot SKU: spread over the slots
--
SELECT sku_id, available, version, slots FROM callback_center.set_stock('hs-a', 9);
SELECT * FROM pg_temp.hs_slots WHERE sku_id = 'hs-a';
SELECT pg_temp.try($$SELECT callback_center.adjust_stock('hs-a', -10)$$);
SELECT sku_id, available, version FROM callback_center.adjust_stock('hs-a', -8);
SELECT * FROM pg_temp.hs_slots WHERE sku_id = 'hs-a';
SELECT sku_id, available, version FROM callback_center.adjust_stock('hs-a', 6);
SELECT * FROM pg_temp.hs_slots WHERE sku_id = 'hs-a';
-- again on a hot SKU: the current total spread over the new count
SELECT sku_id, available, version, slots FROM callback_center.set_hot_sku('hs-a', 2);
SELECT * FROM pg_temp.hs_slots WHERE sku_id = 'hs-a';

--
-- back to normal: the slots are gathered into the row, restores follow
--
SELECT * FROM callback_center.deduct_stock('hs-o5', 'hs-a', 4);
SELECT sku_id, available, version, slots FROM callback_center.set_hot_sku('hs-a', 1);
SELECT * FROM pg_temp.hs;
SELECT * FROM callback_center.deduct_stock('hs-o6', 'hs-a', 1);   -- the normal path: version moves
SELECT * FROM callback_center.restore_stock('hs-o5');
-- and an order taken while normal is restored into the slots once hot
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-a', 3);
SELECT * FROM callback_center.restore_stock('hs-o6');
SELECT * FROM pg_temp.hs;

--
-- errors
--
SELECT pg_temp.try($$SELECT callback_center.set_hot_sku('hs-a', 0)$$);
SELECT pg_temp.try($$SELECT callback_center.set_hot_sku('hs-a', 257)$$);
SELECT pg_temp.try($$SELECT callback_center.set_hot_sku('hs-nope', 4)$$);
SELECT pg_temp.try($$SELECT callback_center.set_hot_sku(NULL, 4)$$);
SELECT pg_temp.try($$SELECT callback_center.set_hot_sku('hs-a', NULL)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-e1', 'hs-a', 0)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-e1', 'hs-a', NULL::bigint)$$);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-e1', 'hs-nope', 1)$$);
-- TCC reservations live on the stock row: a SKU holding some cannot go hot
SELECT sku_id, available FROM callback_center.set_stock('hs-t', 5);
SELECT callback_center.tcc_stock_try('hs-g1', 'b1', 'hs-t', 2);
SELECT pg_temp.try($$SELECT callback_center.set_hot_sku('hs-t', 4)$$);
SELECT callback_center.tcc_stock_cancel('hs-g1', 'b1');
SELECT sku_id, available, reserved, slots FROM callback_center.set_hot_sku('hs-t', 4);
-- and a hot SKU cannot be reserved through TCC (0A000)
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_try('hs-g2', 'b1', 'hs-t', 1)$$);
SELECT * FROM pg_temp.hs;

--
-- privileges: the application deducts and reads, only the admin configures
--
SET client_min_messages = warning;
DROP ROLE IF EXISTS hs_app;
DROP ROLE IF EXISTS hs_admin;
RESET client_min_messages;
CREATE ROLE hs_app NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO hs_app;
CREATE ROLE hs_admin NOLOGIN IN ROLE callback_center_admin;
GRANT USAGE ON SCHEMA callback_center TO hs_admin;
SET ROLE hs_app;
SELECT sku, qty, status FROM callback_center.deduct_stock('hs-p1', 'hs-t', 1);
SELECT available FROM callback_center.stock_levels WHERE sku_id = 'hs-t';
SELECT count(*) AS slot_rows FROM callback_center.stock_slots WHERE sku_id = 'hs-t';
SELECT pg_temp.try($$SELECT callback_center.set_hot_sku('hs-t', 1)$$);
SELECT pg_temp.try($$UPDATE callback_center.stock_slots SET available = 100 WHERE sku_id = 'hs-t'$$);
SELECT pg_temp.try($$SELECT callback_center._stock_spread('hs-t', 100)$$);
RESET ROLE;
SET ROLE hs_admin;
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-t', 1);
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM hs_app;
DROP ROLE hs_app;
REVOKE USAGE ON SCHEMA callback_center FROM hs_admin;
DROP ROLE hs_admin;

--
-- a session remembers which SKUs it found hot (src/stock.c, hot hints) and
-- goes to their slots at once: every change of the SKU since is still seen
--
SELECT sku_id, available FROM callback_center.set_stock('hs-h', 10);
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-h', 4);
SELECT sku, qty, available, status FROM callback_center.deduct_stock('hs-h1', 'hs-h', 1);
-- made normal: the deduction takes from the row (version moves)
SELECT sku_id, available, version, slots FROM callback_center.set_hot_sku('hs-h', 1);
SELECT sku, qty, available, version, status FROM callback_center.deduct_stock('hs-h2', 'hs-h', 2);
SELECT * FROM pg_temp.hs WHERE sku_id = 'hs-h';
-- hot again with fewer slots, then more: nothing lost, nothing over
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-h', 2);
SELECT sku, qty, available, status FROM callback_center.deduct_stock('hs-h3', 'hs-h', 1);
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-h', 6);
SELECT sku, qty, available, status FROM callback_center.deduct_stock('hs-h4', 'hs-h', 1);
SELECT * FROM pg_temp.hs WHERE sku_id = 'hs-h';
-- units added by an admin since: taken across slots, then CB001 with the
-- true total
SELECT sku_id, available FROM callback_center.adjust_stock('hs-h', 3);
SELECT sku, qty, available, status FROM callback_center.deduct_stock('hs-h5', 'hs-h', 8);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-h6', 'hs-h', 2)$$);
-- made normal with units: the row has them, the hint is wrong
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-h', 1);
SELECT sku_id, available FROM callback_center.set_stock('hs-h', 5);
SELECT sku, qty, available, status FROM callback_center.deduct_stock('hs-h7', 'hs-h', 5);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-h8', 'hs-h', 1)$$);
-- a compare-and-set never uses the hint: refused while hot, done when not
SELECT sku_id, available, slots FROM callback_center.set_hot_sku('hs-h', 3);
SELECT sku_id, available FROM callback_center.adjust_stock('hs-h', 2);
SELECT sku, qty, available, status FROM callback_center.deduct_stock('hs-h9', 'hs-h', 1);
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-h10', 'hs-h', 1, 7)$$);
SELECT * FROM pg_temp.hs WHERE sku_id = 'hs-h';
SELECT count(*) AS deductions, sum(quantity) AS units FROM callback_center.stock_deductions
 WHERE sku_id = 'hs-h';

-- the slot statements run with enable_seqscan off (src/stock.c): the
-- caller's setting is back after a deduction, a restore and an error
SET enable_seqscan = on;
SELECT sku, qty, status FROM callback_center.deduct_stock('hs-h11', 'hs-h', 1);
SHOW enable_seqscan;
SELECT sku, qty FROM callback_center.restore_stock('hs-h11');
SHOW enable_seqscan;
SELECT pg_temp.try($$SELECT callback_center.deduct_stock('hs-h12', 'hs-h', 100)$$);
SHOW enable_seqscan;
BEGIN;
SET LOCAL enable_seqscan = off;
SELECT sku, qty, status FROM callback_center.deduct_stock('hs-h13', 'hs-h', 1);
SHOW enable_seqscan;
ROLLBACK;
SHOW enable_seqscan;
RESET enable_seqscan;

DELETE FROM callback_center.tcc_barrier WHERE gid LIKE 'hs-%';
DELETE FROM callback_center.tcc_reservations WHERE gid LIKE 'hs-%';
DELETE FROM callback_center.stock_deductions WHERE sku_id LIKE 'hs-%';
DELETE FROM callback_center.stock_slots WHERE sku_id LIKE 'hs-%';
DELETE FROM callback_center.stock WHERE sku_id LIKE 'hs-%';
