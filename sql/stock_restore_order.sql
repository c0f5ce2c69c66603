SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- restore_stock on a biz id that is a built-in order (a row of
-- callback_center.orders) follows the order: only an order that failed, or
-- that closed without being paid, gives its stock back; any other is
-- refused with CB005 and nothing changes.  The state machine's own
-- compensations (payment failure, timeout close) restore after moving the
-- order, so they pass.  A biz id that is no order is the application's:
-- restored once, unconditionally.
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
CREATE VIEW pg_temp.ro AS
    SELECT l.sku_id, l.available,
           (SELECT string_agg(d.biz_id || CASE WHEN d.restored THEN ' restored' ELSE '' END,
                              ', ' ORDER BY d.biz_id)
              FROM callback_center.stock_deductions AS d WHERE d.sku_id = l.sku_id) AS deductions
      FROM callback_center.stock_levels AS l WHERE l.sku_id LIKE 'ro-%' ORDER BY l.sku_id;
CREATE VIEW pg_temp.ro_orders AS
    SELECT order_id, status, pay_status FROM callback_center.orders
     WHERE order_id LIKE 'ro-%' ORDER BY order_id;

SELECT sku_id, available FROM callback_center.set_stock('ro-a', 20);
SELECT sku_id, available FROM callback_center.set_stock('ro-h', 20);
SELECT sku_id, slots FROM callback_center.set_hot_sku('ro-h', 4);
-- the provider the orders pay through (a verdict applies to its payments only)
SELECT callback_center.set_provider('ro-pay', 'standard_webhooks', NULL);

--
-- confirmed, waiting for money: refused (the order can still be paid)
--
SELECT order_id, status, pay_status FROM callback_center.place_order('ro-o1', 'u1',
    '[{"sku": "ro-a", "qty": 2}, {"sku": "ro-h", "qty": 1}]', 100, NULL, 'ro-pay');
SELECT pg_temp.try($$SELECT callback_center.restore_stock('ro-o1')$$);
SELECT pg_temp.try($$SELECT callback_center.restore_stock('ro-o1', 'ro-a')$$);
SELECT pg_temp.try($$SELECT callback_center.restore_stock('ro-o1', 'ro-h')$$);
SELECT * FROM pg_temp.ro;   -- nothing given back

--
-- paid: refused (the order keeps its stock)
--
SELECT callback_center._apply_payment_result('ro-pay', 'ro-t1', 'ro-o1', 100, NULL, 'success', 'callback');
SELECT * FROM pg_temp.ro_orders;
SELECT pg_temp.try($$SELECT callback_center.restore_stock('ro-o1')$$);
SELECT pg_temp.try($$SELECT callback_center.restore_stock('ro-o1', 'ro-h')$$);
SELECT * FROM pg_temp.ro;

--
-- payment failure: the state machine closes the order and restores
--
SELECT order_id, status, pay_status FROM callback_center.place_order('ro-o2', 'u1',
    '[{"sku": "ro-a", "qty": 3}, {"sku": "ro-h", "qty": 2}]', 100, NULL, 'ro-pay');
SELECT * FROM pg_temp.ro;
SELECT callback_center._apply_payment_result('ro-pay', 'ro-t2', 'ro-o2', 100, NULL, 'failure', 'callback');
SELECT * FROM pg_temp.ro_orders;
SELECT * FROM pg_temp.ro;
-- and a compensation that comes again finds nothing left
SELECT * FROM callback_center.restore_stock('ro-o2');

--
-- timeout close: the same
--
SELECT order_id, status, pay_status FROM callback_center.place_order('ro-o3', 'u1',
    '[{"sku": "ro-a", "qty": 1}]', 100);
UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute'
 WHERE order_id = 'ro-o3';
SELECT callback_center._close_order('ro-o3') AS closed;
SELECT * FROM pg_temp.ro_orders;
SELECT * FROM callback_center.restore_stock('ro-o3');
SELECT * FROM pg_temp.ro;

--
-- failed at placement: it holds nothing, a restore finds nothing
--
SELECT order_id, status, failure_reason FROM callback_center.place_order('ro-o4', 'u1',
    '[{"sku": "ro-a", "qty": 1000}]', 100);
SELECT * FROM callback_center.restore_stock('ro-o4');

--
-- a paid order closed by hand (the order machine allows confirmed ->
-- closed whatever the pay status) still keeps its stock
--
SELECT callback_center.apply_event('callback_center.orders', 'status', 'ro-o1', 'close');
SELECT * FROM pg_temp.ro_orders;
SELECT pg_temp.try($$SELECT callback_center.restore_stock('ro-o1')$$);

--
-- biz ids that are no order: the application's own, restored once
--
SELECT sku, qty, status FROM callback_center.deduct_stock('ro-user-1', 'ro-a', 4);
SELECT sku, qty FROM callback_center.restore_stock('ro-user-1');
SELECT sku, qty FROM callback_center.restore_stock('ro-user-1');
SELECT * FROM pg_temp.ro;

DELETE FROM callback_center.payments WHERE order_id LIKE 'ro-%';
DELETE FROM callback_center.orders WHERE order_id LIKE 'ro-%';
DELETE FROM callback_center.stock_deductions WHERE sku_id LIKE 'ro-%';
DELETE FROM callback_center.stock_slots WHERE sku_id LIKE 'ro-%';
DELETE FROM callback_center.stock WHERE sku_id LIKE 'ro-%';
