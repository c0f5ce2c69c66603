-- The stock tests that follow in the Makefile's REGRESS (STOCK_PLANS) run
-- again with the planner's own choices, after ANALYZE of the stock tables
-- holding a 256-slot SKU (what autovacuum does by itself): the statistics
-- that once made the planner repeat a slot choice for every slot.
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
SELECT s.sku_id, s.available, h.slots
  FROM callback_center.set_stock('plan-big', 1000) AS s,
       callback_center.set_hot_sku('plan-big', 256) AS h;
ANALYZE callback_center.stock, callback_center.stock_slots;
