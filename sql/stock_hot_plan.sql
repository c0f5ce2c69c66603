SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Each slot statement changes one slot, whatever plan the planner picks.
-- Once stock_slots is analyzed with a 256-slot SKU in it (autovacuum does
-- that by itself), the planner used to run the slot-choosing sub-select
-- again for every row of a nested loop, and each run picked another free
-- slot: a restore of 3 gave 3 to every slot of the SKU.
SELECT s.sku_id, s.available, h.slots
  FROM callback_center.set_stock('hp-big', 1000) AS s,
       callback_center.set_hot_sku('hp-big', 256) AS h;
ANALYZE callback_center.stock, callback_center.stock_slots;

SELECT s.sku_id, s.available, h.slots
  FROM callback_center.set_stock('hp-f', 1000) AS s,
       callback_center.set_hot_sku('hp-f', 8) AS h;
SELECT * FROM callback_center.deduct_stock('hp-o1', 'hp-f', 3);
SELECT available FROM callback_center.stock_levels WHERE sku_id = 'hp-f';   -- 997
-- one slot gave the 3 units
SELECT count(*) FILTER (WHERE available = 125) AS untouched,
       count(*) FILTER (WHERE available = 122) AS taken_from
  FROM callback_center.stock_slots WHERE sku_id = 'hp-f';
SELECT * FROM callback_center.restore_stock('hp-o1');
SELECT available FROM callback_center.stock_levels WHERE sku_id = 'hp-f';   -- 1000
-- one slot got them back: the one they came from, or another (122 + 128)
SELECT count(*) FILTER (WHERE available <> 125) IN (0, 2) AS one_slot_changed
  FROM callback_center.stock_slots WHERE sku_id = 'hp-f';

-- 100 deductions and restores, each of 1 to 3 units: the total comes back
-- exactly, and every deduction took exactly what it asked for.
CREATE TEMP TABLE hp_seen (biz text, asked bigint, took bigint, gave bigint);
DO $$
DECLARE
    before bigint;
    mid bigint;
    q bigint;
BEGIN
    FOR i IN 1 .. 100 LOOP
        q := 1 + i % 3;
        SELECT available INTO before FROM callback_center.stock_levels WHERE sku_id = 'hp-f';
        PERFORM callback_center.deduct_stock('hp-p' || i, 'hp-f', q);
        SELECT available INTO mid FROM callback_center.stock_levels WHERE sku_id = 'hp-f';
        PERFORM callback_center.restore_stock('hp-p' || i);
        INSERT INTO hp_seen
        SELECT 'hp-p' || i, q, before - mid, l.available - mid
          FROM callback_center.stock_levels l WHERE l.sku_id = 'hp-f';
    END LOOP;
END
$$;
SELECT count(*) AS pairs, count(*) FILTER (WHERE took <> asked) AS wrong_takes,
       count(*) FILTER (WHERE gave <> asked) AS wrong_gives
  FROM hp_seen;
SELECT available FROM callback_center.stock_levels WHERE sku_id = 'hp-f';   -- 1000
SELECT count(*) AS slots, sum(available) AS units, min(available) >= 0 AS none_negative
  FROM callback_center.stock_slots WHERE sku_id = 'hp-f';

-- The big SKU itself: a deduction larger than any slot (the exact path)
-- and its restore, then deductions until it runs out.
SELECT * FROM callback_center.deduct_stock('hp-b1', 'hp-big', 10);
SELECT * FROM callback_center.restore_stock('hp-b1');
SELECT * FROM callback_center.deduct_stock('hp-b2', 'hp-big', 999);
SELECT * FROM callback_center.deduct_stock('hp-b3', 'hp-big', 1);
SELECT * FROM callback_center.restore_stock('hp-b3', 'hp-big');
SELECT available FROM callback_center.stock_levels WHERE sku_id = 'hp-big';   -- 1

DROP TABLE hp_seen;
DELETE FROM callback_center.stock_deductions WHERE sku_id LIKE 'hp-%';
DELETE FROM callback_center.stock_slots WHERE sku_id LIKE 'hp-%';
DELETE FROM callback_center.stock WHERE sku_id LIKE 'hp-%';
