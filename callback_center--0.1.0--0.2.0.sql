-- callback_center 0.1.0 -> 0.2.0, run by ALTER EXTENSION callback_center UPDATE.
--
-- The difference between the frozen callback_center--0.1.0.sql and what
-- src/sql/ installs today, written by hand as each change lands.  TAP test
-- 095_upgrade.pl checks that 0.1.0 plus this script gives a catalog equal to
-- a fresh install of 0.2.0, and that the data of 0.1.0 keeps working.
--
-- Rules for whoever adds to it:
--   * every function whose definition changed in src/sql/ is re-created here
--     (CREATE OR REPLACE, or DROP and CREATE when its signature changed),
--     with the same grants;
--   * new columns are added with ALTER TABLE ... ADD COLUMN, so in src/sql/
--     they go last in their CREATE TABLE (a fresh install and an upgraded one
--     keep the same column order);
--   * a C function whose behaviour needs the 0.2.0 schema gets a new C
--     symbol (name_v2); the old symbol stays in the library and refuses with
--     a hint to run this script, as pg_stat_statements does across versions.
\echo Use "ALTER EXTENSION callback_center UPDATE TO '0.2.0'" to load this file. \quit

-- Stock: the hot-SKU slot statements (src/stock.c) choose their slot in a
-- MATERIALIZED CTE and check the rows they change; restore_stock follows a
-- built-in order's state (CB005); neither needs a catalog change, the C
-- symbols stay.  In SQL, the purge batch's LIMIT ... FOR UPDATE SKIP
-- LOCKED pick is MATERIALIZED too, so that one pick is counted and deleted
-- whatever the plan.
CREATE OR REPLACE FUNCTION callback_center._purge_batch(rel text, cutoff timestamptz, after_id bigint,
    batch_size integer, OUT purged bigint, OUT last_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    condition text;
BEGIN
    SELECT t.cond INTO condition FROM callback_center._purge_targets() t
     WHERE t.rel = _purge_batch.rel;
    IF condition IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('"%s" is not a retention target', _purge_batch.rel);
    END IF;
    -- Walk the primary key upwards: old rows have low ids, and no batch
    -- rescans what an earlier one passed.  b is MATERIALIZED: evaluated
    -- once whatever the plan, so that the rows counted, the rows deleted
    -- and the batch's last id are the same LIMIT ... SKIP LOCKED pick (a
    -- sub-select run again per row of a join would pick more rows).
    EXECUTE format(
        'WITH b AS MATERIALIZED (SELECT id FROM %s WHERE id > $2 AND %s ORDER BY id LIMIT $3'
        ' FOR UPDATE SKIP LOCKED),'
        ' d AS (DELETE FROM %s WHERE id IN (SELECT id FROM b) RETURNING id)'
        ' SELECT (SELECT count(*) FROM b), (SELECT max(id) FROM b)'
        ' FROM (SELECT count(*) FROM d) AS x',
        _purge_batch.rel, condition, _purge_batch.rel)
        INTO purged, last_id USING cutoff, after_id, batch_size;
END
$$;
