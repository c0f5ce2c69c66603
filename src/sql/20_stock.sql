
-- Stock: one row per SKU, deducted with optimistic locking, and a record of
-- what each order (biz id) took so that a deduction happens once and its
-- restore (the compensation) gives back exactly that, once.  The hot path
-- (deduct_stock, restore_stock) is C in src/stock.c; doc/stock.md explains
-- the locking.

CREATE TABLE callback_center.stock (
    sku_id      text PRIMARY KEY,
    available   bigint NOT NULL CHECK (available >= 0),
    reserved    bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    version     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz
);

COMMENT ON TABLE callback_center.stock IS
    'Units per SKU; version goes up by one on every change (optimistic locking)';

-- One row per (order, SKU): what that order took.  A second deduction for
-- the same pair finds the row and changes nothing; a restore flips
-- restored once and gives the quantity back.  There is no foreign key to
-- stock: SKUs are never deleted by the API, and the check would cost every
-- deduction a lookup the UPDATE of the stock row already makes.
CREATE TABLE callback_center.stock_deductions (
    biz_id       text NOT NULL,
    sku_id       text NOT NULL,
    quantity     bigint NOT NULL CHECK (quantity > 0),
    restored     boolean NOT NULL DEFAULT false,
    deducted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    restored_at  timestamptz,
    PRIMARY KEY (biz_id, sku_id),
    CHECK (restored = (restored_at IS NOT NULL))
);

COMMENT ON TABLE callback_center.stock_deductions IS
    'What each biz id (order) deducted per SKU, and whether it was restored';

SELECT pg_catalog.pg_extension_config_dump('callback_center.stock', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.stock_deductions', '');

GRANT SELECT ON callback_center.stock TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.stock_deductions TO callback_center_admin, callback_center_app;

-- Admin: sets the units of a SKU, creating it (version 0) or replacing its
-- units (version + 1).
CREATE FUNCTION callback_center.set_stock(
    sku_id text,
    available bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
#variable_conflict use_column
DECLARE
    result callback_center.stock;
    p_sku  ALIAS FOR $1;
    p_avail ALIAS FOR $2;
BEGIN
    IF p_sku IS NULL OR p_avail IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'sku_id and available must not be null';
    END IF;
    IF p_avail < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('available must not be negative: %s', p_avail),
            DETAIL = pg_catalog.format('SKU "%s" was given %s units.', p_sku, p_avail);
    END IF;
    INSERT INTO callback_center.stock AS s (sku_id, available, updated_at)
    VALUES (p_sku, p_avail, pg_catalog.now())
    ON CONFLICT ON CONSTRAINT stock_pkey DO UPDATE
        SET available = EXCLUDED.available,
            version = s.version + 1,
            updated_at = EXCLUDED.updated_at
    RETURNING s.* INTO result;
    RETURN result;
END
$fn$;

COMMENT ON FUNCTION callback_center.set_stock(text, bigint) IS
    'Admin: creates a SKU or sets its available units; bumps version';

-- Admin: adds delta (may be negative) to the units of an existing SKU.
-- Never takes available below zero.
CREATE FUNCTION callback_center.adjust_stock(
    sku_id text,
    delta bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
#variable_conflict use_column
DECLARE
    result callback_center.stock;
    p_sku   ALIAS FOR $1;
    p_delta ALIAS FOR $2;
    cur     bigint;
BEGIN
    IF p_sku IS NULL OR p_delta IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'sku_id and delta must not be null';
    END IF;
    UPDATE callback_center.stock AS s
       SET available = s.available + p_delta,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = p_sku
       AND s.available + p_delta >= 0
    RETURNING s.* INTO result;
    IF FOUND THEN
        RETURN result;
    END IF;
    SELECT s.available INTO cur FROM callback_center.stock AS s WHERE s.sku_id = p_sku;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = pg_catalog.format('unknown SKU "%s"', p_sku),
            HINT = 'Create it with callback_center.set_stock().';
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'CB001',
        MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', p_sku),
        DETAIL = pg_catalog.format('Adjusting by %s would leave %s units; %s are available.',
                                   p_delta, cur + p_delta, cur);
END
$fn$;

COMMENT ON FUNCTION callback_center.adjust_stock(text, bigint) IS
    'Admin: adds delta to the available units of a SKU, never below zero';

-- The C functions below (deduct_stock, restore_stock) are neither SECURITY
-- DEFINER nor declared with SET search_path: the C code switches to the
-- function's owner and pins the search path (pg_catalog, callback_center,
-- no temp schema) around its own statements, which qualify every name, and
-- saves the GUC save/restore that SET costs on every call.  src/stock.c
-- (stock_enter) gives the reasoning.  EXECUTE is granted as for the others.

-- Deducts quantity units of one SKU for biz_id, once.  With
-- expected_version the deduction is a compare-and-set on the version.
CREATE FUNCTION callback_center.deduct_stock(
    biz_id text,
    sku_id text,
    quantity bigint,
    expected_version bigint DEFAULT NULL,
    OUT sku text,
    OUT qty bigint,
    OUT available bigint,
    OUT version bigint,
    OUT status text)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_deduct_stock'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION callback_center.deduct_stock(text, text, bigint, bigint) IS
    'Deducts units of one SKU for a biz id, once; optional version compare-and-set';

-- Deducts several SKUs for biz_id, all or nothing.  items is a JSON array
-- of {"sku": text, "qty": number, "version": number (optional)}.
CREATE FUNCTION callback_center.deduct_stock(
    biz_id text,
    items jsonb)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint,
    status text)
AS 'MODULE_PATHNAME', 'cc_deduct_stock_items'
LANGUAGE C VOLATILE
ROWS 4;

COMMENT ON FUNCTION callback_center.deduct_stock(text, jsonb) IS
    'Deducts several SKUs for a biz id, all or nothing, once';

-- The same with parallel arrays (no JSON parsing); expected_versions may
-- be NULL as a whole or hold NULL for SKUs without a version check.
CREATE FUNCTION callback_center.deduct_stock(
    biz_id text,
    sku_ids text[],
    quantities bigint[],
    expected_versions bigint[] DEFAULT NULL)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint,
    status text)
AS 'MODULE_PATHNAME', 'cc_deduct_stock_arrays'
LANGUAGE C VOLATILE
ROWS 4;

COMMENT ON FUNCTION callback_center.deduct_stock(text, text[], bigint[], bigint[]) IS
    'Deducts several SKUs for a biz id, all or nothing, once (array form)';

-- Gives back what biz_id deducted and has not yet been restored; returns
-- one row per SKU restored by this call.
CREATE FUNCTION callback_center.restore_stock(
    biz_id text)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint)
AS 'MODULE_PATHNAME', 'cc_restore_stock'
LANGUAGE C VOLATILE
ROWS 4;

COMMENT ON FUNCTION callback_center.restore_stock(text) IS
    'Restores, once, every SKU a biz id deducted; returns what this call restored';

CREATE FUNCTION callback_center.restore_stock(
    biz_id text,
    sku_id text)
RETURNS TABLE (
    sku text,
    qty bigint,
    available bigint,
    version bigint)
AS 'MODULE_PATHNAME', 'cc_restore_stock_sku'
LANGUAGE C VOLATILE
ROWS 1;

COMMENT ON FUNCTION callback_center.restore_stock(text, text) IS
    'Restores, once, one SKU a biz id deducted; returns what this call restored';

REVOKE ALL ON FUNCTION callback_center.set_stock(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.adjust_stock(text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, text, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, text[], bigint[], bigint[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.restore_stock(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.restore_stock(text, text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center.set_stock(text, bigint) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.adjust_stock(text, bigint) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.deduct_stock(text, text, bigint, bigint)
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.deduct_stock(text, jsonb)
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.deduct_stock(text, text[], bigint[], bigint[])
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.restore_stock(text)
    TO callback_center_app, callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.restore_stock(text, text)
    TO callback_center_app, callback_center_admin;
