-- The stock tests that follow in the Makefile's REGRESS (STOCK_PLANS) run
-- again with merge joins off for this database: no stock statement's
-- effect may depend on the plan, so they give the same output.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I RESET enable_hashjoin', current_database());
    EXECUTE format('ALTER DATABASE %I RESET enable_mergejoin', current_database());
    EXECUTE format('ALTER DATABASE %I RESET enable_nestloop', current_database());
    EXECUTE format('ALTER DATABASE %I SET enable_mergejoin = off', current_database());
END
$$;
SELECT s AS setting FROM pg_db_role_setting AS r, unnest(r.setconfig) AS s
 WHERE r.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND r.setrole = 0 AND s LIKE 'enable%' ORDER BY 1;
