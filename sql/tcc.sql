SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- TCC branches and sagas through the barrier.  pg_temp.try() runs a
-- statement and prints its SQLSTATE and message, or ok.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

CREATE VIEW pg_temp.tcc_stock AS
SELECT sku_id, available, reserved, available + reserved AS total, version
  FROM callback_center.stock WHERE sku_id LIKE 'tcc-%';

SELECT count(*) FROM (SELECT callback_center.set_stock('tcc-sku-a', 10)
                      UNION ALL SELECT callback_center.set_stock('tcc-sku-b', 10)) s;

-- 1. The barrier on its own.
SELECT callback_center.barrier('tcc-g1', 'b1', 'try') AS first_try,
       callback_center.barrier('tcc-g1', 'b1', 'try') AS second_try;
SELECT callback_center.barrier('tcc-g1', 'b1', 'confirm') AS first_confirm,
       callback_center.barrier('tcc-g1', 'b1', 'confirm') AS second_confirm;
-- A cancel before its try is an empty compensation; the late try is refused.
SELECT callback_center.barrier('tcc-g2', 'b1', 'cancel') AS cancel_first,
       callback_center.barrier('tcc-g2', 'b1', 'try') AS late_try,
       callback_center.barrier('tcc-g2', 'b1', 'cancel') AS cancel_again,
       callback_center.barrier('tcc-g2', 'b1', 'try') AS late_try_again;
-- A cancel after its try proceeds, then is a duplicate.
SELECT callback_center.barrier('tcc-g1', 'b1', 'cancel') AS cancel_after_try,
       callback_center.barrier('tcc-g1', 'b1', 'cancel') AS cancel_again;
SELECT gid, branch_id, op, written_by, last_outcome, repeats
  FROM callback_center.tcc_barrier WHERE gid IN ('tcc-g1', 'tcc-g2')
 ORDER BY gid, branch_id, op;
SELECT s, pg_temp.try(s) FROM (VALUES
  ($$SELECT callback_center.barrier(NULL, 'b1', 'try')$$),
  ($$SELECT callback_center.barrier('tcc-g1', NULL, 'try')$$),
  ($$SELECT callback_center.barrier('tcc-g1', 'b1', NULL)$$),
  ($$SELECT callback_center.barrier('tcc-g1', 'b1', 'commit')$$)
) AS t(s);

-- 2. Stock: try, confirm.  available + reserved only falls by what is
-- confirmed; version goes up on every change.
SELECT callback_center.tcc_stock_try('tcc-g3', 'stock', 'tcc-sku-a', 3) AS try;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
SELECT callback_center.tcc_stock_try('tcc-g3', 'stock', 'tcc-sku-a', 3) AS try_again;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
SELECT callback_center.tcc_stock_confirm('tcc-g3', 'stock') AS confirm;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
SELECT callback_center.tcc_stock_confirm('tcc-g3', 'stock') AS confirm_again;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
-- A cancel after the confirm is refused with 55000, and leaves no cancel
-- row behind (the error rolled the barrier row back).
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_cancel('tcc-g3', 'stock')$$) AS cancel_after_confirm;
SELECT op, written_by, last_outcome FROM callback_center.tcc_barrier
 WHERE gid = 'tcc-g3' ORDER BY op;
SELECT gid, branch_id, kind, resource_id, quantity, status
  FROM callback_center.tcc_reservations WHERE gid = 'tcc-g3';

-- 3. Stock: try, cancel (twice).
SELECT callback_center.tcc_stock_try('tcc-g4', 'stock', 'tcc-sku-a', 4) AS try;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
SELECT callback_center.tcc_stock_cancel('tcc-g4', 'stock') AS cancel,
       callback_center.tcc_stock_cancel('tcc-g4', 'stock') AS cancel_again;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
-- Confirm after cancel: 55000, nothing changes.
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_confirm('tcc-g4', 'stock')$$) AS confirm_after_cancel;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;

-- 4. Stock: cancel before try (empty), the late try is refused and
-- reserves nothing.
SELECT callback_center.tcc_stock_cancel('tcc-g5', 'stock') AS early_cancel,
       callback_center.tcc_stock_try('tcc-g5', 'stock', 'tcc-sku-a', 5) AS late_try;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
SELECT count(*) AS g5_reservations FROM callback_center.tcc_reservations WHERE gid = 'tcc-g5';

-- 5. Stock errors.  A failed try leaves no barrier row: a retry may proceed.
SELECT s, pg_temp.try(s) FROM (VALUES
  ($$SELECT callback_center.tcc_stock_try(NULL, 'stock', 'tcc-sku-a', 1)$$),
  ($$SELECT callback_center.tcc_stock_try('tcc-g6', 'stock', NULL, 1)$$),
  ($$SELECT callback_center.tcc_stock_try('tcc-g6', 'stock', 'tcc-sku-a', NULL)$$),
  ($$SELECT callback_center.tcc_stock_try('tcc-g6', 'stock', 'tcc-sku-a', 0)$$),
  ($$SELECT callback_center.tcc_stock_try('tcc-g6', 'stock', 'tcc-sku-a', -2)$$),
  ($$SELECT callback_center.tcc_stock_try('tcc-g6', 'stock', 'tcc-nope', 1)$$),
  ($$SELECT callback_center.tcc_stock_try('tcc-g6', 'stock', 'tcc-sku-a', 8)$$),
  ($$SELECT callback_center.tcc_stock_confirm(NULL, 'stock')$$),
  ($$SELECT callback_center.tcc_stock_cancel('tcc-g6', NULL)$$),
  ($$SELECT callback_center.tcc_stock_confirm('tcc-g6', 'stock')$$)
) AS t(s);
SELECT count(*) AS g6_barrier_rows FROM callback_center.tcc_barrier WHERE gid = 'tcc-g6';
-- A hot SKU (units in slots) cannot be reserved: 0A000, nothing written.
SELECT available FROM callback_center.set_stock('hot-tcc', 8);
SELECT slots FROM callback_center.set_hot_sku('hot-tcc', 4);
SELECT pg_temp.try($$SELECT callback_center.tcc_stock_try('tcc-g6h', 'stock', 'hot-tcc', 1)$$) AS hot_try;
SELECT count(*) AS g6h_rows FROM callback_center.tcc_barrier WHERE gid = 'tcc-g6h';
SELECT available FROM callback_center.stock_levels WHERE sku_id = 'hot-tcc';
SELECT callback_center.tcc_stock_try('tcc-g6', 'stock', 'tcc-sku-a', 7) AS retry_fits;
SELECT * FROM pg_temp.tcc_stock ORDER BY sku_id;
SELECT callback_center.tcc_stock_cancel('tcc-g6', 'stock') AS cancel;
-- Conserved: 20 units in all, minus the 3 confirmed in tcc-g3.
SELECT sum(total) AS total_units, sum(reserved) AS reserved FROM pg_temp.tcc_stock;

-- 6. Coupons: try freezes for the gid, confirm uses, cancel unfreezes.
SELECT callback_center.issue_coupon('tcc-cp-1') IS NOT NULL AS issued_1,
       callback_center.issue_coupon('tcc-cp-2') IS NOT NULL AS issued_2;
SELECT callback_center.tcc_coupon_try('tcc-g7', 'coupon', 'tcc-cp-1') AS try,
       callback_center.tcc_coupon_try('tcc-g7', 'coupon', 'tcc-cp-1') AS try_again;
SELECT coupon_id, status, biz_id FROM callback_center.coupons WHERE coupon_id LIKE 'tcc-%' ORDER BY 1;
SELECT pg_temp.try($$SELECT callback_center.tcc_coupon_try('tcc-g8', 'coupon', 'tcc-cp-1')$$) AS held_elsewhere;
SELECT callback_center.tcc_coupon_confirm('tcc-g7', 'coupon') AS confirm,
       callback_center.tcc_coupon_confirm('tcc-g7', 'coupon') AS confirm_again;
SELECT coupon_id, status, biz_id FROM callback_center.coupons WHERE coupon_id LIKE 'tcc-%' ORDER BY 1;
SELECT callback_center.tcc_coupon_try('tcc-g9', 'coupon', 'tcc-cp-2') AS try;
SELECT callback_center.tcc_coupon_cancel('tcc-g9', 'coupon') AS cancel,
       callback_center.tcc_coupon_cancel('tcc-g9', 'coupon') AS cancel_again,
       callback_center.tcc_coupon_cancel('tcc-g10', 'coupon') AS early_cancel,
       callback_center.tcc_coupon_try('tcc-g10', 'coupon', 'tcc-cp-2') AS late_try;
SELECT coupon_id, status, biz_id FROM callback_center.coupons WHERE coupon_id LIKE 'tcc-%' ORDER BY 1;
SELECT s, pg_temp.try(s) FROM (VALUES
  ($$SELECT callback_center.tcc_coupon_try('tcc-g11', 'coupon', 'tcc-cp-none')$$),
  ($$SELECT callback_center.tcc_coupon_try('tcc-g11', 'coupon', 'tcc-cp-1')$$),
  ($$SELECT callback_center.tcc_coupon_try('tcc-g11', NULL, 'tcc-cp-1')$$),
  ($$SELECT callback_center.tcc_coupon_confirm('tcc-g11', NULL)$$),
  ($$SELECT callback_center.tcc_coupon_cancel(NULL, 'coupon')$$),
  ($$SELECT callback_center.tcc_coupon_confirm('tcc-g11', 'coupon')$$),
  ($$SELECT callback_center.tcc_stock_confirm('tcc-g9', 'coupon')$$)
) AS t(s);

-- 7. Sagas.  Each action and compensation writes an audit row; step 3
-- writes one and then fails, so its row is rolled back with it.
CREATE TEMP TABLE tcc_audit (n serial, saga_id text, what text);
CREATE FUNCTION pg_temp.audit(saga text, what text) RETURNS void
LANGUAGE sql AS $$ INSERT INTO tcc_audit (saga_id, what) VALUES (saga, what) $$;
SELECT callback_center.saga_start('tcc-saga-1', $$[
  {"action": "SELECT pg_temp.audit($1, 'action 1'), callback_center.tcc_stock_try($1, 'stock', 'tcc-sku-b', 2)",
   "compensation": "SELECT pg_temp.audit($1, 'compensation 1'), callback_center.tcc_stock_cancel($1, 'stock')"},
  {"action": "SELECT pg_temp.audit($1, 'action 2'), callback_center.tcc_coupon_try($1, 'coupon', 'tcc-cp-2')",
   "compensation": "SELECT pg_temp.audit($1, 'compensation 2'), callback_center.tcc_coupon_cancel($1, 'coupon')"},
  {"action": "SELECT pg_temp.audit($1, 'action 3'), 1 / 0",
   "compensation": "SELECT pg_temp.audit($1, 'compensation 3')"}
]$$) AS steps;
SELECT saga_id, status FROM callback_center.sagas WHERE saga_id = 'tcc-saga-1';
SELECT callback_center.saga_run('tcc-saga-1') AS final_status;
SELECT what FROM tcc_audit WHERE saga_id = 'tcc-saga-1' ORDER BY n;
SELECT status, last_error FROM callback_center.sagas WHERE saga_id = 'tcc-saga-1';
SELECT step_no, status, error FROM callback_center.saga_steps
 WHERE saga_id = 'tcc-saga-1' ORDER BY step_no;
SELECT branch_id, op, written_by, last_outcome, repeats FROM callback_center.tcc_barrier
 WHERE gid = 'tcc-saga-1' ORDER BY branch_id, op;
SELECT * FROM pg_temp.tcc_stock WHERE sku_id = 'tcc-sku-b';
SELECT coupon_id, status, biz_id FROM callback_center.coupons WHERE coupon_id = 'tcc-cp-2';
-- Running it again changes nothing.
SELECT callback_center.saga_run('tcc-saga-1') AS rerun;
SELECT count(*) AS audit_rows FROM tcc_audit WHERE saga_id = 'tcc-saga-1';
SELECT step_no, status FROM callback_center.saga_steps
 WHERE saga_id = 'tcc-saga-1' ORDER BY step_no;
SELECT count(*) AS barrier_rows, sum(repeats) AS repeats FROM callback_center.tcc_barrier
 WHERE gid = 'tcc-saga-1';
-- A late try of the failed step is refused.
SELECT callback_center.barrier('tcc-saga-1', '3', 'try') AS late_try_step_3;

-- A saga whose steps all succeed completes; a rerun runs nothing again.
SELECT callback_center.saga_start('tcc-saga-2', $$[
  {"action": "SELECT pg_temp.audit($1, 'action 1')"},
  {"action": "SELECT pg_temp.audit($1, 'action 2')", "compensation": null}
]$$) AS steps;
SELECT callback_center.saga_run('tcc-saga-2') AS final_status,
       callback_center.saga_run('tcc-saga-2') AS rerun;
SELECT what FROM tcc_audit WHERE saga_id = 'tcc-saga-2' ORDER BY n;
SELECT step_no, status FROM callback_center.saga_steps
 WHERE saga_id = 'tcc-saga-2' ORDER BY step_no;

-- Actions run with the caller's rights: as an application role, a step
-- that writes a table the role may not write fails with 42501 and the
-- saga compensates.
SET client_min_messages = warning;
DROP ROLE IF EXISTS tcc_test_app;
RESET client_min_messages;
CREATE ROLE tcc_test_app NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO tcc_test_app;
SET ROLE tcc_test_app;
SELECT callback_center.saga_start('tcc-saga-3', $$[
  {"action": "SELECT callback_center.tcc_stock_try($1, 'stock', 'tcc-sku-b', 1)",
   "compensation": "SELECT callback_center.tcc_stock_cancel($1, 'stock')"},
  {"action": "UPDATE callback_center.stock SET available = 1000 WHERE sku_id = 'tcc-sku-b'"}
]$$) AS steps;
SELECT callback_center.saga_run('tcc-saga-3') AS final_status;
SELECT step_no, status, error FROM callback_center.saga_steps
 WHERE saga_id = 'tcc-saga-3' ORDER BY step_no;
SELECT available, reserved FROM callback_center.stock WHERE sku_id = 'tcc-sku-b';
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM tcc_test_app;
DROP ROLE tcc_test_app;

-- Saga errors.
SELECT s, pg_temp.try(s) FROM (VALUES
  ($$SELECT callback_center.saga_start(NULL, '[]')$$),
  ($$SELECT callback_center.saga_start('tcc-saga-x', NULL)$$),
  ($$SELECT callback_center.saga_start('tcc-saga-x', '[]')$$),
  ($$SELECT callback_center.saga_start('tcc-saga-x', '{"action": "SELECT 1"}')$$),
  ($$SELECT callback_center.saga_start('tcc-saga-x', '[{"compensation": "SELECT 1"}]')$$),
  ($$SELECT callback_center.saga_start('tcc-saga-x', '[{"action": " "}]')$$),
  ($$SELECT callback_center.saga_start('tcc-saga-x', '[{"action": "SELECT 1", "compensation": 2}]')$$),
  ($$SELECT callback_center.saga_start('tcc-saga-2', '[{"action": "SELECT 1"}]')$$),
  ($$SELECT callback_center.saga_run(NULL)$$),
  ($$SELECT callback_center.saga_run('tcc-saga-none')$$)
) AS t(s);

-- Clean up.
DELETE FROM callback_center.sagas WHERE saga_id LIKE 'tcc-%';
DELETE FROM callback_center.tcc_barrier WHERE gid LIKE 'tcc-%';
DELETE FROM callback_center.tcc_reservations WHERE gid LIKE 'tcc-%';
DELETE FROM callback_center.coupons WHERE coupon_id LIKE 'tcc-%';
DELETE FROM callback_center.stock WHERE sku_id LIKE 'tcc-%';
