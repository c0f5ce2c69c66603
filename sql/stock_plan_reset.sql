-- Ends the Makefile's STOCK_PLANS runs: the database plans as it did
-- before them, and the 256-slot SKU is gone.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I RESET enable_hashjoin', current_database());
    EXECUTE format('ALTER DATABASE %I RESET enable_mergejoin', current_database());
    EXECUTE format('ALTER DATABASE %I RESET enable_nestloop', current_database());
END
$$;
SELECT s AS setting FROM pg_db_role_setting AS r, unnest(r.setconfig) AS s
 WHERE r.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND r.setrole = 0 AND s LIKE 'enable%' ORDER BY 1;
DELETE FROM callback_center.stock_slots WHERE sku_id = 'plan-big';
DELETE FROM callback_center.stock WHERE sku_id = 'plan-big';
ANALYZE callback_center.stock, callback_center.stock_slots;
