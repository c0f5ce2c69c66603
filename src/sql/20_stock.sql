
-- Stock: one row per SKU, deducted with optimistic locking, and a record of
-- what each order (biz id) took so that a deduction happens once and its
-- restore (the compensation) gives back exactly that, once.  The hot path
-- (deduct_stock, restore_stock) is C in src/stock.c; doc/stock.md explains
-- the locking.  A hot SKU (set_hot_sku) keeps its units in stock_slots.

CREATE TABLE callback_center.stock (
    sku_id      text PRIMARY KEY,
    available   bigint NOT NULL CHECK (available >= 0),
    reserved    bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    version     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz,
    slots       integer NOT NULL DEFAULT 0
);

COMMENT ON TABLE callback_center.stock IS
    'Units per SKU; version goes up by one on every change (optimistic locking); a hot SKU (slots > 0) keeps its units in stock_slots';

-- Hot SKUs (set_hot_sku): the units of a flash-sale SKU are spread over
-- slots 0 .. slots - 1 here, so that buyers lock different rows; the stock
-- row keeps the SKU's identity, version and reserved units, and holds 0
-- available.  Only set_hot_sku inserts or deletes slot rows, always with
-- the stock row locked first; src/stock.c explains the locking.  No foreign
-- key to stock: its RI trigger would fire on every deduction of a normal
-- SKU, and the API never deletes a SKU.  fillfactor 10: a slot row is
-- updated by every buyer, and with many buyers pinning a full page
-- PostgreSQL can rarely prune it, so updates stop being HOT (new index
-- entries, a growing table); at 10 the slots spread over several pages and
-- stay HOT (doc/stock.md, "Cost", has the measurement).
CREATE TABLE callback_center.stock_slots (
    sku_id      text NOT NULL,
    slot        integer NOT NULL CHECK (slot >= 0),
    available   bigint NOT NULL CHECK (available >= 0),
    PRIMARY KEY (sku_id, slot)
) WITH (fillfactor = 10);

COMMENT ON TABLE callback_center.stock_slots IS
    'Units of hot SKUs, spread over slots that are deducted independently';

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
SELECT pg_catalog.pg_extension_config_dump('callback_center.stock_slots', '');

-- The true units of every SKU: a hot SKU's units are in its slots.
CREATE VIEW callback_center.stock_levels AS
SELECT s.sku_id,
       s.available + COALESCE((SELECT sum(t.available)
                                 FROM callback_center.stock_slots AS t
                                WHERE t.sku_id = s.sku_id), 0)::bigint AS available,
       s.reserved,
       s.version,
       s.slots,
       s.updated_at
  FROM callback_center.stock AS s;

COMMENT ON VIEW callback_center.stock_levels IS
    'Available units per SKU, summed over the slots of a hot SKU';

GRANT SELECT ON callback_center.stock TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.stock_deductions TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.stock_slots, callback_center.stock_levels
    TO callback_center_admin, callback_center_app;

-- Internal: sets the units of a hot SKU whose stock row the caller holds
-- locked, spread evenly over its slots (the first total % n slots get one
-- more).  The slots are locked in slot order first, the order every
-- blocking lock on them follows (src/stock.c), before any is changed.
CREATE FUNCTION callback_center._stock_spread(sku_id text, total bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    n integer;
BEGIN
    PERFORM 1 FROM callback_center.stock_slots AS t
      WHERE t.sku_id = _stock_spread.sku_id ORDER BY t.slot FOR UPDATE;
    SELECT count(*) INTO n FROM callback_center.stock_slots AS t WHERE t.sku_id = _stock_spread.sku_id;
    UPDATE callback_center.stock_slots AS t
       SET available = _stock_spread.total / n + CASE WHEN t.slot < _stock_spread.total % n THEN 1 ELSE 0 END
     WHERE t.sku_id = _stock_spread.sku_id;
END
$fn$;

REVOKE ALL ON FUNCTION callback_center._stock_spread(text, bigint) FROM PUBLIC;

-- Internal: the units of a hot SKU's slots, locked in slot order.
CREATE FUNCTION callback_center._stock_lock_slots(sku_id text)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT COALESCE(sum(l.available), 0)::bigint
      FROM (SELECT t.available FROM callback_center.stock_slots AS t
             WHERE t.sku_id = _stock_lock_slots.sku_id ORDER BY t.slot FOR UPDATE) AS l
$fn$;

REVOKE ALL ON FUNCTION callback_center._stock_lock_slots(text) FROM PUBLIC;

-- Admin: sets the units of a SKU, creating it (version 0) or replacing its
-- units (version + 1).
CREATE FUNCTION callback_center.set_stock(
    sku_id text,
    available bigint)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    result callback_center.stock;
    n      integer;
BEGIN
    PERFORM callback_center._require_key(set_stock.sku_id, 'sku_id');
    PERFORM callback_center._require(set_stock.available, 'available');
    IF set_stock.available < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('available must not be negative: %s', set_stock.available),
            DETAIL = pg_catalog.format('SKU "%s" was given %s units.', set_stock.sku_id, set_stock.available);
    END IF;
    LOOP
        SELECT s.slots INTO n FROM callback_center.stock AS s
         WHERE s.sku_id = set_stock.sku_id FOR UPDATE;
        IF n > 0 THEN
            -- A hot SKU: the units go to its slots, evenly.
            PERFORM callback_center._stock_spread(set_stock.sku_id, set_stock.available);
            UPDATE callback_center.stock AS s
               SET version = s.version + 1, updated_at = pg_catalog.now()
             WHERE s.sku_id = set_stock.sku_id
            RETURNING s.* INTO result;
            result.available := set_stock.available;
            RETURN result;
        END IF;
        -- The WHERE skips a row made hot since the SELECT found none.
        INSERT INTO callback_center.stock AS s (sku_id, available, updated_at)
        VALUES (set_stock.sku_id, set_stock.available, pg_catalog.now())
        ON CONFLICT ON CONSTRAINT stock_pkey DO UPDATE
            SET available = EXCLUDED.available,
                version = s.version + 1,
                updated_at = EXCLUDED.updated_at
            WHERE s.slots = 0
        RETURNING s.* INTO result;
        IF FOUND THEN
            RETURN result;
        END IF;
    END LOOP;
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
DECLARE
    result callback_center.stock;
    cur     bigint;
    n       integer;
BEGIN
    PERFORM callback_center._require(adjust_stock.sku_id, 'sku_id');
    PERFORM callback_center._require(adjust_stock.delta, 'delta');
    SELECT s.available, s.slots INTO cur, n FROM callback_center.stock AS s
     WHERE s.sku_id = adjust_stock.sku_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = pg_catalog.format('unknown SKU "%s"', adjust_stock.sku_id),
            HINT = 'Create it with callback_center.set_stock().';
    END IF;
    IF n > 0 THEN
        -- A hot SKU: the new total is spread over its slots again, so no
        -- slot goes below zero while the total covers the change.
        cur := cur + callback_center._stock_lock_slots(adjust_stock.sku_id);
    END IF;
    IF cur + adjust_stock.delta < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'CB001',
            MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', adjust_stock.sku_id),
            DETAIL = pg_catalog.format('Adjusting by %s would leave %s units; %s are available.',
                                       adjust_stock.delta, cur + adjust_stock.delta, cur);
    END IF;
    IF n > 0 THEN
        PERFORM callback_center._stock_spread(adjust_stock.sku_id, cur + adjust_stock.delta);
        UPDATE callback_center.stock AS s
           SET available = 0, version = s.version + 1, updated_at = pg_catalog.now()
         WHERE s.sku_id = adjust_stock.sku_id
        RETURNING s.* INTO result;
        result.available := cur + adjust_stock.delta;
        RETURN result;
    END IF;
    UPDATE callback_center.stock AS s
       SET available = s.available + adjust_stock.delta,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = adjust_stock.sku_id
    RETURNING s.* INTO result;
    RETURN result;
END
$fn$;

COMMENT ON FUNCTION callback_center.adjust_stock(text, bigint) IS
    'Admin: adds delta to the available units of a SKU, never below zero';

-- Admin: makes a SKU hot, its units spread evenly over slots rows of
-- callback_center.stock_slots (2 to 256), or normal again (slots = 1), its
-- slots gathered back into the stock row.  Run again on a hot SKU, it
-- spreads the current total afresh.  Locks the stock row, then the slots
-- in slot order, so it waits for deductions in flight and counts them.
CREATE FUNCTION callback_center.set_hot_sku(
    sku_id text,
    slots integer)
RETURNS callback_center.stock
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    result  callback_center.stock;
    cur     callback_center.stock;
    total   bigint;
BEGIN
    PERFORM callback_center._require(set_hot_sku.sku_id, 'sku_id');
    PERFORM callback_center._require(set_hot_sku.slots, 'slots');
    IF set_hot_sku.slots < 1 OR set_hot_sku.slots > 256 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('slots must be between 1 and 256: %s', set_hot_sku.slots),
            HINT = 'Use 2 to 256 slots to make a SKU hot, 1 to make it normal again.';
    END IF;
    SELECT s.* INTO cur FROM callback_center.stock AS s WHERE s.sku_id = set_hot_sku.sku_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB004',
            MESSAGE = pg_catalog.format('unknown SKU "%s"', set_hot_sku.sku_id),
            HINT = 'Create it with callback_center.set_stock().';
    END IF;
    IF set_hot_sku.slots > 1 AND cur.reserved > 0 THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = pg_catalog.format('SKU "%s" has reserved units', set_hot_sku.sku_id),
            DETAIL = pg_catalog.format('TCC tries hold %s units of it.', cur.reserved),
            HINT = 'Confirm or cancel its reservations first: a hot SKU cannot be reserved.';
    END IF;
    total := cur.available + callback_center._stock_lock_slots(set_hot_sku.sku_id);
    DELETE FROM callback_center.stock_slots AS t WHERE t.sku_id = set_hot_sku.sku_id;
    IF set_hot_sku.slots > 1 THEN
        INSERT INTO callback_center.stock_slots (sku_id, slot, available)
        SELECT set_hot_sku.sku_id, i, 0 FROM pg_catalog.generate_series(0, set_hot_sku.slots - 1) AS i;
        PERFORM callback_center._stock_spread(set_hot_sku.sku_id, total);
    END IF;
    UPDATE callback_center.stock AS s
       SET available = CASE WHEN set_hot_sku.slots > 1 THEN 0 ELSE total END,
           slots = CASE WHEN set_hot_sku.slots > 1 THEN set_hot_sku.slots ELSE 0 END,
           version = s.version + 1,
           updated_at = pg_catalog.now()
     WHERE s.sku_id = set_hot_sku.sku_id
    RETURNING s.* INTO result;
    result.available := total;
    RETURN result;
END
$fn$;

COMMENT ON FUNCTION callback_center.set_hot_sku(text, integer) IS
    'Admin: spreads a SKU over 2 to 256 slot rows (hot) or gathers it back (1); bumps version';

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
REVOKE ALL ON FUNCTION callback_center.set_hot_sku(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, text, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.deduct_stock(text, text[], bigint[], bigint[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.restore_stock(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.restore_stock(text, text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center.set_stock(text, bigint) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.adjust_stock(text, bigint) TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center.set_hot_sku(text, integer) TO callback_center_admin;
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
