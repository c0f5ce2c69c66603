
-- TCC branches and sagas, guarded by a barrier table.  A branch calls
-- callback_center.barrier() first, inside its own transaction, and does its
-- work only when the answer is 'proceed'.  The barrier makes every branch
-- idempotent, turns a cancel that arrives before its try into an empty
-- compensation, and refuses a try that arrives after its cancel (no hanging
-- reservation).  Plain PL/pgSQL: the unique index and row locks do the
-- work, there is no hot loop worth C.  doc/tcc.md has the rules.

-- One row per (global transaction, branch, operation) that ever arrived.
-- written_by is the operation whose call inserted the row: a 'try' row
-- written by a cancel is the mark an empty compensation leaves so that a
-- late try is refused.  repeats and last_outcome record the later calls
-- that found the row (duplicates, refusals), so nothing is swallowed.
-- created_by is the role whose call wrote the row (see _caller()): a
-- branch belongs to the role that wrote its first row, and barrier()
-- refuses every other role (NULL: written before 0.2.0, anyone's).
CREATE TABLE callback_center.tcc_barrier (
    gid           text NOT NULL,
    branch_id     text NOT NULL,
    op            text NOT NULL CHECK (op IN ('try', 'confirm', 'cancel')),
    written_by    text NOT NULL CHECK (written_by IN ('try', 'confirm', 'cancel')),
    last_outcome  text NOT NULL CHECK (last_outcome IN
                      ('proceed', 'duplicate', 'empty_compensation', 'refused')),
    repeats       integer NOT NULL DEFAULT 0 CHECK (repeats >= 0),
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by    text,
    PRIMARY KEY (gid, branch_id, op)
);

COMMENT ON TABLE callback_center.tcc_barrier IS
    'TCC/saga barrier: one row per (gid, branch, op) that arrived, with the outcome of the last call';

-- What a TCC branch reserved, so that confirm and cancel know what and how
-- much.  One row per (gid, branch): a stock reservation (resource_id is the
-- SKU, quantity the units) or a frozen coupon (resource_id is the coupon).
CREATE TABLE callback_center.tcc_reservations (
    gid          text NOT NULL,
    branch_id    text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('stock', 'coupon')),
    resource_id  text NOT NULL,
    quantity     bigint NOT NULL CHECK (quantity > 0),
    status       text NOT NULL DEFAULT 'reserved'
                 CHECK (status IN ('reserved', 'confirmed', 'cancelled')),
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (gid, branch_id)
);

COMMENT ON TABLE callback_center.tcc_reservations IS
    'What each TCC try reserved (stock units or a coupon) and whether it was confirmed or cancelled';

-- Sagas: ordered steps, each an SQL call with a compensation.  created_by
-- is the role that declared it (see _caller()); only that role runs it or
-- moves its bookkeeping, so its SQL never runs with anyone else's rights
-- (NULL: declared before 0.2.0, run by nobody until a superuser who has
-- read its steps records a creator).
CREATE TABLE callback_center.sagas (
    saga_id     text PRIMARY KEY,
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'completed', 'compensating', 'compensated')),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by  text
);

COMMENT ON TABLE callback_center.sagas IS
    'Sagas declared with saga_start(); saga_run() moves them to completed or compensated';

CREATE TABLE callback_center.saga_steps (
    saga_id       text NOT NULL REFERENCES callback_center.sagas ON DELETE CASCADE,
    step_no       integer NOT NULL CHECK (step_no > 0),
    action        text NOT NULL,
    compensation  text,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'done', 'compensated', 'skipped')),
    error         text,
    updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (saga_id, step_no)
);

COMMENT ON TABLE callback_center.saga_steps IS
    'Steps of a saga: action and compensation are SQL run with the rights of the saga''s creator, $1 = saga id';

SELECT pg_catalog.pg_extension_config_dump('callback_center.tcc_barrier', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.tcc_reservations', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.sagas', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.saga_steps', '');

GRANT SELECT ON callback_center.tcc_barrier, callback_center.tcc_reservations,
    callback_center.sagas, callback_center.saga_steps
    TO callback_center_admin, callback_center_app;

-- The role a call acts for, seen from inside a SECURITY DEFINER function
-- (where current_user is the extension's owner): the role of the session's
-- SET ROLE, else the session user.  Only a member of a role can SET ROLE
-- to it, so nobody can claim another role's name this way.
CREATE FUNCTION callback_center._caller()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT CASE WHEN pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) 'none'
                THEN session_user::text
                ELSE pg_catalog.current_setting('role') END;
$fn$;

-- The barrier.  Returns 'proceed' (do the branch's work), 'duplicate' (this
-- op already ran for the branch: do nothing), 'empty_compensation' (a
-- cancel whose try never ran: it is recorded, do nothing) or 'refused' (a
-- try after its cancel: do nothing, so nothing is left reserved).  A cancel
-- first inserts the branch's 'try' row: if that succeeds the try never
-- happened.  Racing calls meet on the primary key: ON CONFLICT waits for
-- the other transaction and, once it commits, sees its row; after an abort
-- the insert goes ahead.  The row is in the caller's transaction, so it
-- commits or rolls back with the branch's own work.  A branch belongs to
-- the role that wrote its first row (created_by): any other role is
-- refused with 42501, whatever the op, so app member B can neither confirm
-- nor cancel A's branch.  Calls for one branch are serialised on an
-- advisory lock, so that the owner check sees a concurrent first call.
CREATE FUNCTION callback_center.barrier(
    gid text,
    branch_id text,
    op text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    n        integer;
    outcome  text;
    me       text := callback_center._caller();
    owner    text;
BEGIN
    PERFORM callback_center._require_key(barrier.gid, 'gid');
    PERFORM callback_center._require_key(barrier.branch_id, 'branch_id');
    PERFORM callback_center._require(barrier.op, 'op');
    IF barrier.op NOT IN ('try', 'confirm', 'cancel') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('invalid barrier op "%s"', barrier.op),
            HINT = 'Use try, confirm or cancel.';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        'callback_center.tcc:' || barrier.gid || ':' || barrier.branch_id, 0));
    SELECT b.created_by INTO owner FROM callback_center.tcc_barrier AS b
     WHERE b.gid = barrier.gid AND b.branch_id = barrier.branch_id AND b.created_by IS NOT NULL
     LIMIT 1;
    IF owner IS DISTINCT FROM me AND owner IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('gid "%s" branch "%s" belongs to another role',
                                        barrier.gid, barrier.branch_id),
            DETAIL = pg_catalog.format('It was begun by role "%s"; this call acts for "%s".',
                                       owner, me),
            HINT = 'Each role confirms and cancels only its own branches.';
    END IF;
    IF barrier.op = 'cancel' THEN
        INSERT INTO callback_center.tcc_barrier AS b
               (gid, branch_id, op, written_by, last_outcome, created_by)
        VALUES (barrier.gid, barrier.branch_id, 'try', 'cancel', 'empty_compensation', me)
        ON CONFLICT ON CONSTRAINT tcc_barrier_pkey DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 1 THEN
            -- The try never ran; no cancel row can exist (a cancel always
            -- writes the try row first, in the same transaction).
            INSERT INTO callback_center.tcc_barrier
                   (gid, branch_id, op, written_by, last_outcome, created_by)
            VALUES (barrier.gid, barrier.branch_id, 'cancel', 'cancel', 'empty_compensation', me);
            RETURN 'empty_compensation';
        END IF;
    END IF;
    INSERT INTO callback_center.tcc_barrier AS b
           (gid, branch_id, op, written_by, last_outcome, created_by)
    VALUES (barrier.gid, barrier.branch_id, barrier.op, barrier.op, 'proceed', me)
    ON CONFLICT ON CONSTRAINT tcc_barrier_pkey DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 1 THEN
        RETURN 'proceed';
    END IF;
    -- The row was there (committed: ON CONFLICT waited for its writer).
    UPDATE callback_center.tcc_barrier AS b
       SET repeats = b.repeats + 1,
           last_outcome = CASE WHEN barrier.op = 'try' AND b.written_by = 'cancel'
                               THEN 'refused' ELSE 'duplicate' END,
           updated_at = pg_catalog.now()
     WHERE b.gid = barrier.gid AND b.branch_id = barrier.branch_id AND b.op = barrier.op
    RETURNING b.last_outcome INTO outcome;
    RETURN outcome;
END
$fn$;

COMMENT ON FUNCTION callback_center.barrier(text, text, text) IS
    'TCC/saga barrier: proceed, duplicate, empty_compensation or refused for (gid, branch, op)';

-- The first phase (try) of a TCC branch on a resource of the given kind:
-- checks the arguments, goes through the barrier, then, only on
-- 'proceed', takes the resource (stock: quantity units of the SKU move
-- from available to reserved; coupon: frozen with biz_id = gid) and
-- records the reservation.  Returns the barrier outcome.  Runs as the
-- SECURITY DEFINER wrapper that calls it.
CREATE FUNCTION callback_center._tcc_first_phase(
    gid text, branch_id text, kind text, resource_id text, quantity bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome  text;
    cur      bigint;
    nslots   integer;
BEGIN
    PERFORM callback_center._require_key(_tcc_first_phase.gid, 'gid');
    PERFORM callback_center._require_key(_tcc_first_phase.branch_id, 'branch_id');
    PERFORM callback_center._require_key(_tcc_first_phase.resource_id,
        CASE _tcc_first_phase.kind WHEN 'stock' THEN 'sku_id' ELSE 'coupon_id' END);
    PERFORM callback_center._require(_tcc_first_phase.quantity, 'qty');
    IF _tcc_first_phase.quantity <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('qty must be positive: %s', _tcc_first_phase.quantity);
    END IF;
    outcome := callback_center.barrier(_tcc_first_phase.gid, _tcc_first_phase.branch_id, 'try');
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    IF _tcc_first_phase.kind = 'coupon' THEN
        PERFORM callback_center.freeze_coupon(_tcc_first_phase.resource_id, _tcc_first_phase.gid);
    ELSE
        UPDATE callback_center.stock AS s
           SET available = s.available - _tcc_first_phase.quantity,
               reserved = s.reserved + _tcc_first_phase.quantity,
               version = s.version + 1,
               updated_at = pg_catalog.now()
         WHERE s.sku_id = _tcc_first_phase.resource_id AND s.available >= _tcc_first_phase.quantity;
        IF NOT FOUND THEN
            SELECT s.available, s.slots INTO cur, nslots FROM callback_center.stock AS s
             WHERE s.sku_id = _tcc_first_phase.resource_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'CB004',
                    MESSAGE = pg_catalog.format('unknown SKU "%s"', _tcc_first_phase.resource_id),
                    HINT = 'Create it with callback_center.set_stock().';
            END IF;
            -- A hot SKU's units are in its slots, not on the row: a
            -- reservation there would have to be given back to a slot by
            -- the cancel, which the reservation model (one row) does not do.
            IF nslots > 0 THEN
                RAISE EXCEPTION USING ERRCODE = '0A000',
                    MESSAGE = pg_catalog.format('cannot reserve hot SKU "%s" through TCC', _tcc_first_phase.resource_id),
                    DETAIL = pg_catalog.format('Its units are spread over %s slots.', nslots),
                    HINT = 'Deduct it with deduct_stock() (restore_stock() compensates), or make it normal with set_hot_sku(sku, 1).';
            END IF;
            RAISE EXCEPTION USING ERRCODE = 'CB001',
                MESSAGE = pg_catalog.format('insufficient stock for SKU "%s"', _tcc_first_phase.resource_id),
                DETAIL = pg_catalog.format('Reserving %s units needs more than the %s available.',
                                           _tcc_first_phase.quantity, cur);
        END IF;
    END IF;
    INSERT INTO callback_center.tcc_reservations (gid, branch_id, kind, resource_id, quantity)
    VALUES (_tcc_first_phase.gid, _tcc_first_phase.branch_id, _tcc_first_phase.kind,
            _tcc_first_phase.resource_id, _tcc_first_phase.quantity);
    RETURN outcome;
END
$fn$;

-- Marks the reservation of (gid, branch) of the given kind confirmed or
-- cancelled and returns it; 55000 when there is none still reserved.
CREATE FUNCTION callback_center._tcc_settle(
    gid text, branch_id text, kind text, status text)
RETURNS callback_center.tcc_reservations
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    r callback_center.tcc_reservations;
BEGIN
    UPDATE callback_center.tcc_reservations AS t
       SET status = _tcc_settle.status, updated_at = pg_catalog.now()
     WHERE t.gid = _tcc_settle.gid AND t.branch_id = _tcc_settle.branch_id
       AND t.kind = _tcc_settle.kind AND t.status = 'reserved'
    RETURNING t.* INTO r;
    IF FOUND THEN
        RETURN r;
    END IF;
    SELECT * INTO r FROM callback_center.tcc_reservations AS t
     WHERE t.gid = _tcc_settle.gid AND t.branch_id = _tcc_settle.branch_id;
    RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = pg_catalog.format('no %s reservation of gid "%s" branch "%s" to %s',
                                    _tcc_settle.kind, _tcc_settle.gid, _tcc_settle.branch_id,
                                    CASE _tcc_settle.status WHEN 'confirmed' THEN 'confirm' ELSE 'cancel' END),
        DETAIL = CASE WHEN r.gid IS NULL THEN 'The branch reserved nothing.'
                      ELSE pg_catalog.format('The branch holds a %s reservation that is %s.',
                                             r.kind, r.status) END;
END
$fn$;

-- The second phase of a TCC branch (op 'confirm' or 'cancel') on a
-- reservation of the given kind: through the barrier, then, only on
-- 'proceed', settles the reservation and applies it (stock: reserved goes,
-- back to available on cancel; coupon: used on confirm, unfrozen on
-- cancel).  Returns the barrier outcome.  Runs as the SECURITY DEFINER
-- wrapper that calls it.
CREATE FUNCTION callback_center._tcc_second_phase(
    gid text, branch_id text, kind text, op text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    outcome text;
    r       callback_center.tcc_reservations;
BEGIN
    -- barrier() checks gid and branch_id (_require_key).
    outcome := callback_center.barrier(_tcc_second_phase.gid, _tcc_second_phase.branch_id, _tcc_second_phase.op);
    IF outcome <> 'proceed' THEN
        RETURN outcome;
    END IF;
    r := callback_center._tcc_settle(_tcc_second_phase.gid, _tcc_second_phase.branch_id, _tcc_second_phase.kind,
                                     CASE _tcc_second_phase.op WHEN 'confirm' THEN 'confirmed' ELSE 'cancelled' END);
    IF _tcc_second_phase.kind = 'stock' THEN
        UPDATE callback_center.stock AS s
           SET available = s.available + CASE _tcc_second_phase.op WHEN 'cancel' THEN r.quantity ELSE 0 END,
               reserved = s.reserved - r.quantity,
               version = s.version + 1,
               updated_at = pg_catalog.now()
         WHERE s.sku_id = r.resource_id;
    ELSIF _tcc_second_phase.op = 'confirm' THEN
        PERFORM callback_center.use_coupon(r.resource_id, _tcc_second_phase.gid);
    ELSE
        PERFORM callback_center.unfreeze_coupon(r.resource_id, _tcc_second_phase.gid);
    END IF;
    RETURN outcome;
END
$fn$;

-- TCC try on stock: moves qty units of sku from available to reserved for
-- (gid, branch), once.  Returns the barrier outcome; only 'proceed' changes
-- anything.
CREATE FUNCTION callback_center.tcc_stock_try(
    gid text,
    branch_id text,
    sku_id text,
    qty bigint)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_first_phase($1, $2, 'stock', $3, $4);
$fn$;

COMMENT ON FUNCTION callback_center.tcc_stock_try(text, text, text, bigint) IS
    'TCC try: reserves qty units of a SKU for (gid, branch); returns the barrier outcome';

-- TCC confirm on stock: consumes the reservation (reserved -= qty), once.
CREATE FUNCTION callback_center.tcc_stock_confirm(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'stock', 'confirm');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_stock_confirm(text, text) IS
    'TCC confirm: consumes the stock reserved by (gid, branch); returns the barrier outcome';

-- TCC cancel on stock: gives the reservation back to available, once; an
-- empty compensation when the try never ran.
CREATE FUNCTION callback_center.tcc_stock_cancel(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'stock', 'cancel');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_stock_cancel(text, text) IS
    'TCC cancel: returns the stock reserved by (gid, branch) to available; returns the barrier outcome';

-- TCC try on a coupon: freezes it with biz_id = gid, once.
CREATE FUNCTION callback_center.tcc_coupon_try(gid text, branch_id text, coupon_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_first_phase($1, $2, 'coupon', $3, 1);
$fn$;

COMMENT ON FUNCTION callback_center.tcc_coupon_try(text, text, text) IS
    'TCC try: freezes a coupon for gid; returns the barrier outcome';

-- TCC confirm on a coupon: marks it used by gid, once.
CREATE FUNCTION callback_center.tcc_coupon_confirm(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'coupon', 'confirm');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_coupon_confirm(text, text) IS
    'TCC confirm: uses the coupon frozen by (gid, branch); returns the barrier outcome';

-- TCC cancel on a coupon: unfreezes it, once; an empty compensation when
-- the try never ran.
CREATE FUNCTION callback_center.tcc_coupon_cancel(gid text, branch_id text)
RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
    SELECT callback_center._tcc_second_phase($1, $2, 'coupon', 'cancel');
$fn$;

COMMENT ON FUNCTION callback_center.tcc_coupon_cancel(text, text) IS
    'TCC cancel: unfreezes the coupon frozen by (gid, branch); returns the barrier outcome';

-- Declares a saga: steps is a JSON array of {"action": sql, "compensation":
-- sql or null}, numbered from 1 in array order.  Returns the step count.
-- The saga belongs to the calling role (_caller()): only it runs it.
CREATE FUNCTION callback_center.saga_start(saga_id text, steps jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    bad     text;
BEGIN
    PERFORM callback_center._require_key(saga_start.saga_id, 'saga_id');
    PERFORM callback_center._require(saga_start.steps, 'steps');
    IF pg_catalog.jsonb_typeof(saga_start.steps) <> 'array' OR pg_catalog.jsonb_array_length(saga_start.steps) = 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'steps must be a non-empty JSON array',
            HINT = 'Pass [{"action": "SELECT ...", "compensation": "SELECT ..."}, ...].';
    END IF;
    SELECT e::text INTO bad
      FROM pg_catalog.jsonb_array_elements(saga_start.steps) AS e
     WHERE pg_catalog.jsonb_typeof(e) <> 'object'
        OR pg_catalog.jsonb_typeof(e -> 'action') IS DISTINCT FROM 'string'
        OR pg_catalog.btrim(e ->> 'action') = ''
        OR pg_catalog.jsonb_typeof(e -> 'compensation') NOT IN ('string', 'null')
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = pg_catalog.format('invalid saga step: %s', bad),
            DETAIL = 'Each step needs a non-empty "action" string; "compensation" is a string or null.';
    END IF;
    INSERT INTO callback_center.sagas (saga_id, created_by) VALUES (saga_start.saga_id, callback_center._caller());
    INSERT INTO callback_center.saga_steps (saga_id, step_no, action, compensation)
    SELECT saga_start.saga_id, e.n::integer, e.v ->> 'action', e.v ->> 'compensation'
      FROM pg_catalog.jsonb_array_elements(saga_start.steps) WITH ORDINALITY AS e(v, n);
    RETURN pg_catalog.jsonb_array_length(saga_start.steps);
END
$fn$;

COMMENT ON FUNCTION callback_center.saga_start(text, jsonb) IS
    'Declares a saga of ordered steps (action, compensation); returns the step count';

-- Bookkeeping for saga_run (which runs with the caller's rights): locks the
-- saga row until the end of the transaction and returns its status; 42704
-- when there is no such saga, 42501 when it is not the calling role's
-- (_caller()) or has no recorded creator.
CREATE FUNCTION callback_center._saga_lock(saga_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
DECLARE
    st text;
    creator text;
BEGIN
    SELECT s.status, s.created_by INTO st, creator FROM callback_center.sagas AS s
     WHERE s.saga_id = _saga_lock.saga_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = pg_catalog.format('unknown saga "%s"', _saga_lock.saga_id),
            HINT = 'Declare it with callback_center.saga_start().';
    END IF;
    IF creator IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" has no recorded creator', _saga_lock.saga_id),
            DETAIL = 'It was declared before callback_center 0.2.0, which records who declares a saga.',
            HINT = 'A superuser who has read its steps sets callback_center.sagas.created_by to the role they may run as.';
    END IF;
    IF creator IS DISTINCT FROM callback_center._caller() THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" belongs to role "%s"', _saga_lock.saga_id, creator),
            DETAIL = 'A saga''s steps run only as the role that declared it.',
            HINT = pg_catalog.format('Run it as that role: SET ROLE %I, then saga_run().', creator);
    END IF;
    RETURN st;
END
$fn$;

-- Bookkeeping for saga_run: sets a step's status and error (step_no given)
-- or the saga's status and last error (step_no null).  Only forward moves:
-- pending -> done/skipped, done -> compensated; running -> completed or
-- compensating, compensating -> compensated.
CREATE FUNCTION callback_center._saga_mark(
    saga_id text, step_no integer, new_status text, error text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $fn$
BEGIN
    PERFORM callback_center._saga_lock(_saga_mark.saga_id);
    IF _saga_mark.step_no IS NULL THEN
        UPDATE callback_center.sagas AS s
           SET status = _saga_mark.new_status, last_error = COALESCE(_saga_mark.error, s.last_error),
               updated_at = pg_catalog.now()
         WHERE s.saga_id = _saga_mark.saga_id
           AND (s.status, _saga_mark.new_status) IN (('running', 'completed'), ('running', 'compensating'),
                                        ('compensating', 'compensated'),
                                        ('compensating', 'compensating'));
    ELSE
        UPDATE callback_center.saga_steps AS t
           SET status = _saga_mark.new_status, error = COALESCE(_saga_mark.error, t.error),
               updated_at = pg_catalog.now()
         WHERE t.saga_id = _saga_mark.saga_id AND t.step_no = _saga_mark.step_no
           AND (t.status, _saga_mark.new_status) IN (('pending', 'done'), ('pending', 'skipped'),
                                        ('done', 'compensated'), ('done', 'done'),
                                        ('skipped', 'skipped'));
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = pg_catalog.format('cannot move saga "%s" step %s to %s',
                                        _saga_mark.saga_id, COALESCE(_saga_mark.step_no::text, '-'), _saga_mark.new_status);
    END IF;
END
$fn$;

-- Runs a saga: its pending steps in order, each through the barrier (gid =
-- saga id, branch = step number, op try) in a subtransaction.  When a step
-- raises, its work is rolled back, the error recorded, and the saga
-- compensates: from the last step down, every step goes through the
-- barrier with op cancel; done steps run their compensation, the failed
-- step and those never run are empty compensations (marked skipped, and a
-- late try of them would be refused).  SECURITY INVOKER: actions and
-- compensations run with the caller's rights and search_path, with the
-- saga id as $1, and the caller must be the saga's creator (42501
-- otherwise, superusers and administrators included: they SET ROLE to the
-- creator), so a saga's SQL only ever runs with the rights of the role that
-- wrote it.  Returns the final status; re-running a finished saga
-- changes nothing.  A compensation that raises is rolled back and recorded
-- and the saga stays 'compensating' for a later run to finish.
CREATE FUNCTION callback_center.saga_run(saga_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $fn$
DECLARE
    st       text;
    step     record;
    outcome  text;
    err      text;
BEGIN
    PERFORM callback_center._require(saga_run.saga_id, 'saga_id');
    st := callback_center._saga_lock(saga_run.saga_id);
    -- _saga_lock checked the session's role; this is the role the steps
    -- would run as (not the same inside another SECURITY DEFINER function).
    IF NOT EXISTS (SELECT FROM callback_center.sagas AS s
                    WHERE s.saga_id OPERATOR(pg_catalog.=) saga_run.saga_id
                      AND s.created_by OPERATOR(pg_catalog.=) current_user::text) THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = pg_catalog.format('saga "%s" does not belong to role "%s"', saga_run.saga_id, current_user),
            DETAIL = 'A saga''s steps run only as the role that declared it.';
    END IF;
    IF st IN ('completed', 'compensated') THEN
        RETURN st;
    END IF;
    IF st = 'running' THEN
        FOR step IN SELECT t.step_no, t.action FROM callback_center.saga_steps AS t
                     WHERE t.saga_id = saga_run.saga_id AND t.status = 'pending'
                     ORDER BY t.step_no
        LOOP
            BEGIN
                outcome := callback_center.barrier(saga_run.saga_id, step.step_no::text, 'try');
                IF outcome = 'proceed' THEN
                    EXECUTE step.action USING saga_run.saga_id;
                ELSIF outcome = 'refused' THEN
                    RAISE EXCEPTION USING ERRCODE = '55000',
                        MESSAGE = pg_catalog.format('step %s refused by the barrier', step.step_no),
                        DETAIL = 'Its compensation already ran.';
                END IF;
                PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no, 'done', NULL);
            EXCEPTION WHEN OTHERS THEN
                err := pg_catalog.format('step %s: %s: %s', step.step_no, SQLSTATE, SQLERRM);
                PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no, 'skipped', err);
                EXIT;
            END;
        END LOOP;
        IF err IS NULL THEN
            PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'completed', NULL);
            RETURN 'completed';
        END IF;
        PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensating', err);
    END IF;
    -- Compensating: from the last step down, each through the barrier.
    FOR step IN SELECT t.step_no, t.status, t.compensation FROM callback_center.saga_steps AS t
                 WHERE t.saga_id = saga_run.saga_id AND t.status <> 'compensated'
                 ORDER BY t.step_no DESC
    LOOP
        BEGIN
            outcome := callback_center.barrier(saga_run.saga_id, step.step_no::text, 'cancel');
            IF outcome = 'proceed' AND step.compensation IS NOT NULL THEN
                EXECUTE step.compensation USING saga_run.saga_id;
            END IF;
            PERFORM callback_center._saga_mark(saga_run.saga_id, step.step_no,
                CASE WHEN step.status = 'done' THEN 'compensated' ELSE 'skipped' END, NULL);
        EXCEPTION WHEN OTHERS THEN
            err := pg_catalog.format('compensation of step %s: %s: %s',
                                     step.step_no, SQLSTATE, SQLERRM);
            PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensating', err);
            RETURN 'compensating';
        END;
    END LOOP;
    PERFORM callback_center._saga_mark(saga_run.saga_id, NULL, 'compensated', NULL);
    RETURN 'compensated';
END
$fn$;

COMMENT ON FUNCTION callback_center.saga_run(text) IS
    'Runs a saga''s pending steps through the barrier; on failure compensates done steps in reverse';

REVOKE ALL ON FUNCTION callback_center._caller() FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.barrier(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._tcc_settle(text, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._tcc_first_phase(text, text, text, text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._tcc_second_phase(text, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_stock_try(text, text, text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_stock_confirm(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_stock_cancel(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_coupon_try(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_coupon_confirm(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.tcc_coupon_cancel(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.saga_start(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._saga_lock(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center._saga_mark(text, integer, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION callback_center.saga_run(text) FROM PUBLIC;

-- _saga_lock and _saga_mark are granted because saga_run, which calls
-- them, is SECURITY INVOKER (its steps run with the caller's rights).
-- Called directly they move only the bookkeeping, forward (a step or a
-- saga can be marked done without running it; nothing is reserved or
-- released that way, the branches go through the barrier).  _tcc_settle
-- and the two phases are called only by SECURITY DEFINER functions and
-- granted to no one.
GRANT EXECUTE ON FUNCTION
    callback_center.barrier(text, text, text),
    callback_center.tcc_stock_try(text, text, text, bigint),
    callback_center.tcc_stock_confirm(text, text),
    callback_center.tcc_stock_cancel(text, text),
    callback_center.tcc_coupon_try(text, text, text),
    callback_center.tcc_coupon_confirm(text, text),
    callback_center.tcc_coupon_cancel(text, text),
    callback_center.saga_start(text, jsonb),
    callback_center._saga_lock(text),
    callback_center._saga_mark(text, integer, text, text),
    callback_center.saga_run(text)
    TO callback_center_app, callback_center_admin;
