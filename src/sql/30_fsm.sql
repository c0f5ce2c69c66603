
-- ------------------------------------------------------------------------
-- State machines as data.
--
-- A machine is a set of states and the legal moves between them.  Attaching
-- a machine to a text column of any table puts a C trigger on it
-- (callback_center.fsm_trigger, fired BEFORE and AFTER) that refuses every
-- other move before the row is written, then records each move actually
-- written in state_history and emits the outbox events the transition
-- names.  Rows the install script writes are marked builtin; pg_dump keeps
-- only the others (the script recreates the built-in ones), and keeps the
-- emits chosen later for built-in transitions in builtin_emits.  A restore
-- loads rows as they are: COPY FROM by the table's owner (or a superuser)
-- into the table passes the trigger untouched (doc/fsm.md, "Dump and
-- restore").
-- ------------------------------------------------------------------------

CREATE TABLE callback_center.state_machines (
    machine     text PRIMARY KEY
                CHECK (machine <> '' AND octet_length(machine) < 64),
    description text NOT NULL DEFAULT '',
    builtin     boolean NOT NULL DEFAULT false
);

CREATE TABLE callback_center.machine_states (
    machine     text NOT NULL
                REFERENCES callback_center.state_machines ON DELETE CASCADE,
    state       text NOT NULL CHECK (state <> ''),
    is_initial  boolean NOT NULL DEFAULT false,
    is_final    boolean NOT NULL DEFAULT false,
    builtin     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (machine, state)
);

CREATE TABLE callback_center.transitions (
    machine     text NOT NULL,
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    event       text NOT NULL CHECK (event <> ''),
    emits       text[] NOT NULL DEFAULT '{}'
                CHECK (array_position(emits, NULL) IS NULL),
    builtin     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (machine, from_state, to_state),
    UNIQUE (machine, from_state, event),
    -- A move to the same state is no move: the trigger ignores it.
    CHECK (from_state <> to_state),
    FOREIGN KEY (machine, from_state)
        REFERENCES callback_center.machine_states ON DELETE CASCADE,
    FOREIGN KEY (machine, to_state)
        REFERENCES callback_center.machine_states ON DELETE CASCADE
);

-- set_transition_emits() on a built-in transition after installation.
-- pg_dump skips built-in transitions (CREATE EXTENSION makes them again,
-- with the install script's emits), so such a change is kept here too,
-- where pg_dump keeps it; restoring a row applies it again (trigger
-- cc_fsm_builtin_emits).  Changes the install script makes are not kept
-- here: the script makes them again itself.
CREATE TABLE callback_center.builtin_emits (
    machine     text NOT NULL,
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    emits       text[] NOT NULL CHECK (array_position(emits, NULL) IS NULL),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (machine, from_state, to_state),
    FOREIGN KEY (machine, from_state, to_state)
        REFERENCES callback_center.transitions ON DELETE CASCADE
);

CREATE TABLE callback_center.state_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    machine     text NOT NULL,
    table_name  text NOT NULL,          -- schema-qualified, quoted as needed
    entity_id   text NOT NULL,
    from_state  text,                   -- NULL: the row was inserted
    to_state    text NOT NULL,
    event       text,                   -- NULL on insert
    actor       text NOT NULL,          -- the application's claim (callback_center.actor)
    at          timestamptz NOT NULL DEFAULT now(),
    session_role text                   -- session_user; NULL in rows written before 0.2.0
);

CREATE INDEX state_history_entity_idx
    ON callback_center.state_history (machine, entity_id, id);

COMMENT ON TABLE callback_center.state_machines IS
    'State machines; rows with builtin = true come with the extension';
COMMENT ON TABLE callback_center.transitions IS
    'Legal moves of each machine; emits lists the outbox event types queued on the move';
COMMENT ON TABLE callback_center.builtin_emits IS
    'Emits set on built-in transitions after installation; pg_dump keeps them and a restore applies them again';
COMMENT ON TABLE callback_center.state_history IS
    'One row per state a row entered under an attached machine';

SELECT pg_catalog.pg_extension_config_dump('callback_center.state_machines', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('callback_center.machine_states', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('callback_center.transitions', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('callback_center.builtin_emits', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.state_history', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.state_history_id_seq', '');

-- Machine definitions are harmless to read; history is for admins.
GRANT SELECT ON callback_center.state_machines, callback_center.machine_states,
    callback_center.transitions, callback_center.builtin_emits
    TO callback_center_admin, callback_center_app;
GRANT SELECT ON callback_center.state_history TO callback_center_admin;

-- The trigger keeps the definitions in a per-backend cache; this statement
-- trigger tells every backend (at commit) to drop it.
CREATE FUNCTION callback_center.fsm_invalidate()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cc_fsm_invalidate'
LANGUAGE C;

REVOKE ALL ON FUNCTION callback_center.fsm_invalidate() FROM PUBLIC;

CREATE TRIGGER cc_fsm_invalidate
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callback_center.state_machines
    FOR EACH STATEMENT EXECUTE FUNCTION callback_center.fsm_invalidate();
CREATE TRIGGER cc_fsm_invalidate
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callback_center.machine_states
    FOR EACH STATEMENT EXECUTE FUNCTION callback_center.fsm_invalidate();
CREATE TRIGGER cc_fsm_invalidate
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callback_center.transitions
    FOR EACH STATEMENT EXECUTE FUNCTION callback_center.fsm_invalidate();

-- A row of builtin_emits sets the transition's emits: when
-- set_transition_emits() writes it, and when a restore does.  Only the
-- extension owner writes the table.
CREATE FUNCTION callback_center._fsm_builtin_emits()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    UPDATE callback_center.transitions t
       SET emits = NEW.emits
     WHERE t.machine = NEW.machine AND t.from_state = NEW.from_state
       AND t.to_state = NEW.to_state;
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION callback_center._fsm_builtin_emits() FROM PUBLIC;

CREATE TRIGGER cc_fsm_builtin_emits
    AFTER INSERT OR UPDATE ON callback_center.builtin_emits
    FOR EACH ROW EXECUTE FUNCTION callback_center._fsm_builtin_emits();

-- True while the callback_center install (or update) script runs.
CREATE FUNCTION callback_center._fsm_installing()
RETURNS boolean
AS 'MODULE_PATHNAME', 'cc_fsm_installing'
LANGUAGE C STABLE;

REVOKE ALL ON FUNCTION callback_center._fsm_installing() FROM PUBLIC;

-- fsm_trigger(machine, state_column, id_column, payload columns...):
-- INSERT OR UPDATE OF state_column FOR EACH ROW, twice: BEFORE (checks the
-- move) and AFTER (records the rows written).  Made by
-- attach_state_machine().  Symbol _v2: it writes state_history.session_role.
CREATE FUNCTION callback_center.fsm_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cc_fsm_trigger_v2'
LANGUAGE C;

COMMENT ON FUNCTION callback_center.fsm_trigger() IS
    'Enforces an attached state machine; use attach_state_machine() to install it';

-- Creating a trigger needs EXECUTE on its function; firing it does not.
REVOKE ALL ON FUNCTION callback_center.fsm_trigger() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.fsm_trigger() TO callback_center_admin;

-- ------------------------------------------------------------------------
-- Defining machines (callback_center_admin)
-- ------------------------------------------------------------------------

-- Creates an empty machine.  Raises 22004 on NULL, 22023 on a bad name,
-- 42710 if it exists.
CREATE FUNCTION callback_center.create_state_machine(
    machine text,
    description text DEFAULT '')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'state machine name');
    IF machine = '' OR octet_length(machine) > 63 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('invalid state machine name "%s"', machine),
            DETAIL = 'A machine name has 1 to 63 bytes.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.state_machines m
                WHERE m.machine = create_state_machine.machine) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state machine "%s" already exists', machine);
    END IF;
    INSERT INTO callback_center.state_machines (machine, description)
    VALUES (machine, coalesce(description, ''));
END
$$;

-- Raises CB011 when the machine does not exist.  Internal.
CREATE FUNCTION callback_center._fsm_require_machine(machine text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    IF NOT EXISTS (SELECT 1 FROM callback_center.state_machines m
                    WHERE m.machine = _fsm_require_machine.machine) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB011',
            MESSAGE = format('state machine "%s" does not exist', machine),
            HINT = 'Create it with callback_center.create_state_machine().';
    END IF;
END
$$;

-- Raises CB011 when the state is not one of the machine's.  Internal.
CREATE FUNCTION callback_center._fsm_require_state(machine text, state text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(state, 'state');
    IF NOT EXISTS (SELECT 1 FROM callback_center.machine_states s
                    WHERE s.machine = _fsm_require_state.machine
                      AND s.state = _fsm_require_state.state) THEN
        RAISE EXCEPTION USING ERRCODE = 'CB011',
            MESSAGE = format('unknown state "%s" in state machine "%s"', state, machine),
            HINT = 'Add it with callback_center.add_state().';
    END IF;
END
$$;

-- Adds a state.  Raises 22004, CB011 (no such machine), 42710 (exists).
CREATE FUNCTION callback_center.add_state(
    machine text,
    state text,
    is_initial boolean DEFAULT false,
    is_final boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(state, 'state');
    PERFORM callback_center._require(is_initial, 'is_initial');
    PERFORM callback_center._require(is_final, 'is_final');
    PERFORM callback_center._fsm_require_machine(machine);
    IF state = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'state name cannot be empty';
    END IF;
    PERFORM callback_center._require_key(state, 'state');
    IF EXISTS (SELECT 1 FROM callback_center.machine_states s
                WHERE s.machine = add_state.machine AND s.state = add_state.state) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state "%s" already exists in state machine "%s"', state, machine);
    END IF;
    INSERT INTO callback_center.machine_states (machine, state, is_initial, is_final)
    VALUES (machine, state, is_initial, is_final);
END
$$;

-- Adds a legal move.  Raises 22004, CB011 (no such machine or state),
-- 22023 (empty event, from = to, leaves a final state), 42710 (the move or
-- the event from that state exists).
CREATE FUNCTION callback_center.add_transition(
    machine text,
    from_state text,
    to_state text,
    event text,
    emits text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(from_state, 'from_state');
    PERFORM callback_center._require(to_state, 'to_state');
    PERFORM callback_center._require(event, 'event');
    PERFORM callback_center._require(emits, 'emits');
    PERFORM callback_center._require(array_position(emits, NULL) IS NULL OR NULL, 'an element of emits');
    PERFORM callback_center._fsm_require_machine(machine);
    PERFORM callback_center._fsm_require_state(machine, from_state);
    PERFORM callback_center._fsm_require_state(machine, to_state);
    IF event = '' OR '' = ANY (emits) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'event names cannot be empty';
    END IF;
    PERFORM callback_center._require_key(event, 'event');
    PERFORM callback_center._require_key(e, 'an event of emits') FROM unnest(emits) AS e;
    IF from_state = to_state THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('transition "%s" -> "%s" does not change the state', from_state, to_state),
            DETAIL = 'The trigger ignores updates that keep the state, so such a transition could never fire.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.machine_states s
                WHERE s.machine = add_transition.machine
                  AND s.state = add_transition.from_state AND s.is_final) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('state "%s" of state machine "%s" is final', from_state, machine),
            DETAIL = 'No transition may leave a final state.';
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.transitions t
                WHERE t.machine = add_transition.machine
                  AND t.from_state = add_transition.from_state
                  AND (t.to_state = add_transition.to_state OR t.event = add_transition.event)) THEN
        RAISE EXCEPTION USING ERRCODE = '42710',
            MESSAGE = format('state machine "%s" already has a transition "%s" -> "%s" or event "%s" from "%s"',
                             machine, from_state, to_state, event, from_state),
            HINT = 'Each pair of states has at most one transition and each event at most one target per state.';
    END IF;
    INSERT INTO callback_center.transitions (machine, from_state, to_state, event, emits)
    VALUES (machine, from_state, to_state, event, emits);
END
$$;

-- Replaces the event types a move emits.  On a built-in transition, outside
-- the install script, the choice goes to builtin_emits (whose trigger sets
-- it) so that pg_dump keeps it.  Raises 22004, 22023 (empty name), CB011
-- (no such machine), 42704 (no such transition).
CREATE FUNCTION callback_center.set_transition_emits(
    machine text,
    from_state text,
    to_state text,
    emits text[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    is_builtin boolean;
BEGIN
    PERFORM callback_center._require(machine, 'machine');
    PERFORM callback_center._require(from_state, 'from_state');
    PERFORM callback_center._require(to_state, 'to_state');
    PERFORM callback_center._require(emits, 'emits');
    PERFORM callback_center._require(array_position(emits, NULL) IS NULL OR NULL, 'an element of emits');
    PERFORM callback_center._fsm_require_machine(machine);
    IF '' = ANY (emits) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'event names cannot be empty';
    END IF;
    SELECT t.builtin INTO is_builtin FROM callback_center.transitions t
     WHERE t.machine = set_transition_emits.machine
       AND t.from_state = set_transition_emits.from_state
       AND t.to_state = set_transition_emits.to_state
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('state machine "%s" has no transition "%s" -> "%s"',
                             machine, from_state, to_state);
    END IF;
    IF is_builtin AND NOT callback_center._fsm_installing() THEN
        INSERT INTO callback_center.builtin_emits AS b (machine, from_state, to_state, emits)
        VALUES (set_transition_emits.machine, set_transition_emits.from_state,
                set_transition_emits.to_state, set_transition_emits.emits)
        ON CONFLICT ON CONSTRAINT builtin_emits_pkey
        DO UPDATE SET emits = EXCLUDED.emits, changed_at = now();
    ELSE
        UPDATE callback_center.transitions t
           SET emits = set_transition_emits.emits
         WHERE t.machine = set_transition_emits.machine
           AND t.from_state = set_transition_emits.from_state
           AND t.to_state = set_transition_emits.to_state;
    END IF;
END
$$;

-- ------------------------------------------------------------------------
-- Attaching machines to tables
-- ------------------------------------------------------------------------

-- Splits pg_trigger.tgargs (NUL-terminated strings).  Internal.
CREATE FUNCTION callback_center._fsm_trigger_args(args bytea)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    result text[] := '{}';
    p integer;
BEGIN
    LOOP
        p := position('\x00'::bytea IN args);
        EXIT WHEN p = 0;
        result := result || convert_from(substring(args FROM 1 FOR p - 1),
                                         getdatabaseencoding());
        args := substring(args FROM p + 1);
    END LOOP;
    RETURN result;
END
$$;

-- A trigger name on tbl starting with base (cut to fit) that no trigger
-- there has yet.  Internal.
CREATE FUNCTION callback_center._fsm_trigger_name(tbl regclass, base text)
RETURNS name
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    candidate text;
    suffix text := '';
    n integer := 1;
BEGIN
    LOOP
        candidate := base;
        WHILE octet_length(candidate || suffix) > 63 LOOP
            candidate := left(candidate, -1);
        END LOOP;
        candidate := candidate || suffix;
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_trigger t
                               WHERE t.tgrelid = tbl AND t.tgname = candidate);
        n := n + 1;
        suffix := '_' || n;
    END LOOP;
    RETURN candidate;
END
$$;

-- Every attached machine, read from the triggers themselves (so it cannot
-- drift from them): one row per BEFORE trigger; its AFTER twin, which
-- records history, has the same arguments.  payload_columns: what emitted
-- events carry as row ('{*}': the whole row; '{}': no row).
CREATE VIEW callback_center.state_machine_attachments AS
SELECT t.tgrelid::regclass AS table_name,
       a[2]::name AS state_column,
       a[1] AS machine,
       a[3]::name AS id_column,
       t.tgname AS trigger_name,
       a[4:]::name[] AS payload_columns
  FROM pg_catalog.pg_trigger t
  CROSS JOIN LATERAL callback_center._fsm_trigger_args(t.tgargs) AS a
 WHERE t.tgfoid = 'callback_center.fsm_trigger()'::pg_catalog.regprocedure
   AND t.tgnargs >= 3
   AND (t.tgtype & 2) <> 0;            -- TRIGGER_TYPE_BEFORE

-- The first state of tbl.state_column not in states, scanned as the table's
-- owner (a security-restricted operation): the scan may run the owner's
-- code (a row-level security policy), which must never run with the rights
-- of the admin who attaches.  42501 without TRIGGER on tbl.  Internal.
CREATE FUNCTION callback_center._fsm_unknown_state(tbl regclass, state_column name,
                                                   states text[])
RETURNS text
AS 'MODULE_PATHNAME', 'cc_fsm_unknown_state'
LANGUAGE C;

GRANT SELECT ON callback_center.state_machine_attachments
    TO callback_center_admin, callback_center_app;

-- Puts the triggers enforcing machine on tbl.state_column: cc_fsm_<column>
-- BEFORE INSERT OR UPDATE OF it (checks each move under the row lock) and
-- cc_fsm_<column>_log AFTER INSERT OR UPDATE OF it (records history and
-- emits, only for rows actually written); a suffix _2, _3... is added
-- should a name be taken.  payload_columns are the columns emitted events
-- carry as row ('{}', the default: no row, only the id, the states and the
-- event; '{*}': the whole row).  Runs with the caller's rights (creating
-- the trigger needs TRIGGER on tbl); the scan of the rows already there
-- runs as the table's owner (_fsm_unknown_state).  Returns true when it
-- attached (or changed the payload columns of the same attachment), false
-- when the same machine was already attached the same way.  Raises 22004,
-- 22023 (payload columns repeated, or '*' with others), 42809 (not a
-- table), 42703 (no such column), 42804 (state column not text or
-- varchar), CB011 (no such machine, or a row holds a state the machine does
-- not know), 42710 (another machine or id column is attached to that
-- column), 42501 (no TRIGGER privilege).
CREATE FUNCTION callback_center.attach_state_machine(
    tbl regclass,
    state_column name,
    machine text,
    id_column name DEFAULT 'id',
    payload_columns name[] DEFAULT '{}')
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    kind "char";
    state_type oid;
    existing record;
    bad text;
    col name;
    trigger_args text;
    trigger_name name;
    log_trigger_name name;
BEGIN
    PERFORM callback_center._require(
        num_nulls(tbl, state_column, machine, id_column, payload_columns) = 0
        AND array_position(payload_columns, NULL) IS NULL OR NULL,
        'tbl, state_column, machine, id_column and payload_columns (and its elements)');
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = tbl;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION USING ERRCODE = '42809',
            MESSAGE = format('"%s" is not a table', tbl);
    END IF;
    SELECT a.atttypid INTO state_type FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = state_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42703',
            MESSAGE = format('column "%s" of table %s does not exist', state_column, tbl);
    END IF;
    IF state_type NOT IN ('text'::regtype, 'varchar'::regtype) THEN
        RAISE EXCEPTION USING ERRCODE = '42804',
            MESSAGE = format('state column "%s" of table %s has type %s', state_column, tbl,
                             format_type(state_type, NULL)),
            DETAIL = 'A state column must be of type text or varchar.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = tbl AND a.attname = id_column
                      AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION USING ERRCODE = '42703',
            MESSAGE = format('column "%s" of table %s does not exist', id_column, tbl),
            HINT = 'Pass the column that identifies a row as id_column.';
    END IF;
    IF '*' = ANY (payload_columns) AND cardinality(payload_columns) > 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'payload column "*" (the whole row) cannot be listed with other columns';
    END IF;
    IF (SELECT count(DISTINCT c) FROM unnest(payload_columns) c) < cardinality(payload_columns) THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'payload columns cannot repeat';
    END IF;
    FOREACH col IN ARRAY payload_columns LOOP
        CONTINUE WHEN col = '*';
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = tbl AND a.attname = col
                          AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION USING ERRCODE = '42703',
                MESSAGE = format('column "%s" of table %s does not exist', col, tbl),
                HINT = 'payload_columns names the columns emitted events carry.';
        END IF;
    END LOOP;
    PERFORM callback_center._fsm_require_machine(machine);

    SELECT * INTO existing FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = attach_state_machine.state_column;
    IF FOUND THEN
        IF existing.machine <> machine OR existing.id_column <> id_column THEN
            RAISE EXCEPTION USING ERRCODE = '42710',
                MESSAGE = format('column "%s" of table %s already has state machine "%s" attached',
                                 state_column, tbl, existing.machine),
                HINT = 'Detach it first with callback_center.detach_state_machine().';
        END IF;
        IF existing.payload_columns = payload_columns THEN
            RETURN false;
        END IF;
        -- Only the payload changes: the pair is made again.
        PERFORM callback_center.detach_state_machine(tbl, state_column);
    ELSE
        -- Rows already there must be in states the machine knows.
        bad := callback_center._fsm_unknown_state(tbl, state_column,
                   ARRAY(SELECT s.state FROM callback_center.machine_states s
                          WHERE s.machine = attach_state_machine.machine));
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'CB011',
                MESSAGE = format('unknown state "%s" in state machine "%s"', bad, machine),
                DETAIL = format('Table %s already has rows in that state.', tbl);
        END IF;
    END IF;

    SELECT string_agg(quote_literal(a), ', ' ORDER BY n) INTO trigger_args
      FROM unnest(ARRAY[machine, state_column::text, id_column::text]
                  || payload_columns::text[]) WITH ORDINALITY AS u(a, n);
    trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column);
    EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%s)',
                   trigger_name, state_column, tbl, trigger_args);
    log_trigger_name := callback_center._fsm_trigger_name(tbl, 'cc_fsm_' || state_column || '_log');
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OF %I ON %s FOR EACH ROW '
                   'EXECUTE FUNCTION callback_center.fsm_trigger(%s)',
                   log_trigger_name, state_column, tbl, trigger_args);
    RETURN true;
END
$$;

-- Removes the two triggers attach_state_machine() made.  History stays.
-- Raises 22004, 42704 (nothing attached there).
CREATE FUNCTION callback_center.detach_state_machine(
    tbl regclass,
    state_column name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    att record;
    trigger_name name;
BEGIN
    PERFORM callback_center._require(num_nulls(tbl, state_column) = 0 OR NULL,
                                     'tbl and state_column');
    SELECT * INTO att
      FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = detach_state_machine.state_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('no state machine is attached to column "%s" of table %s',
                             state_column, tbl);
    END IF;
    -- The BEFORE trigger and its AFTER twin: same function, same arguments.
    FOR trigger_name IN
        SELECT t.tgname FROM pg_trigger t
         WHERE t.tgrelid = tbl
           AND t.tgfoid = 'callback_center.fsm_trigger()'::regprocedure
           AND t.tgnargs >= 3
           AND (callback_center._fsm_trigger_args(t.tgargs))[1:3]
               = ARRAY[att.machine, state_column::text, att.id_column::text]
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION callback_center.create_state_machine(text, text),
    callback_center._fsm_require_machine(text),
    callback_center._fsm_require_state(text, text),
    callback_center._fsm_trigger_name(regclass, text),
    callback_center._fsm_unknown_state(regclass, name, text[]),
    callback_center.add_state(text, text, boolean, boolean),
    callback_center.add_transition(text, text, text, text, text[]),
    callback_center.set_transition_emits(text, text, text, text[]),
    callback_center.attach_state_machine(regclass, name, text, name, name[]),
    callback_center.detach_state_machine(regclass, name)
    FROM PUBLIC;
-- attach_state_machine() runs with the caller's rights: its three helpers
-- are granted too.  _fsm_require_state is called only by SECURITY DEFINER
-- functions (as the owner) and granted to no one.
GRANT EXECUTE ON FUNCTION callback_center.create_state_machine(text, text),
    callback_center._fsm_require_machine(text),
    callback_center._fsm_trigger_name(regclass, text),
    callback_center._fsm_unknown_state(regclass, name, text[]),
    callback_center.add_state(text, text, boolean, boolean),
    callback_center.add_transition(text, text, text, text, text[]),
    callback_center.set_transition_emits(text, text, text, text[]),
    callback_center.attach_state_machine(regclass, name, text, name, name[]),
    callback_center.detach_state_machine(regclass, name)
    TO callback_center_admin;

-- ------------------------------------------------------------------------
-- Moving entities (callback_center_app)
-- ------------------------------------------------------------------------

-- Applies event to the row of tbl whose id column equals entity_id: locks
-- the row, finds the transition from its current state and updates the
-- state column (the trigger records history and emits).  Returns the new
-- state.  Runs with the caller's rights on tbl.  Raises 22004 (NULL
-- argument or NULL state), 42704 (no machine attached there), P0002 (no
-- such row), CB011 (the machine has no such event), CB010 (the event is
-- not legal from the current state).
CREATE FUNCTION callback_center.apply_event(
    tbl regclass,
    state_column name,
    entity_id text,
    event text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    att record;
    id_type text;
    found_row boolean;
    current_state text;
    target text;
    legal text;
BEGIN
    PERFORM callback_center._require(num_nulls(tbl, state_column, entity_id, event) = 0 OR NULL,
                                     'tbl, state_column, entity_id and event');
    SELECT * INTO att FROM callback_center.state_machine_attachments s
     WHERE s.table_name = tbl AND s.state_column = apply_event.state_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704',
            MESSAGE = format('no state machine is attached to column "%s" of table %s',
                             state_column, tbl),
            HINT = 'Attach one with callback_center.attach_state_machine().';
    END IF;
    SELECT format_type(a.atttypid, a.atttypmod) INTO id_type FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = att.id_column AND NOT a.attisdropped;

    EXECUTE format('SELECT true, %I::text FROM %s WHERE %I = CAST($1 AS %s) FOR UPDATE',
                   state_column, tbl, att.id_column, id_type)
       INTO found_row, current_state USING entity_id;
    IF found_row IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002',
            MESSAGE = format('no row of table %s has %s = %s', tbl, att.id_column,
                             quote_literal(entity_id));
    END IF;
    IF current_state IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = format('row %s of table %s has no state', quote_literal(entity_id), tbl),
            DETAIL = format('Column "%s" is null.', state_column);
    END IF;

    SELECT t.to_state INTO target FROM callback_center.transitions t
     WHERE t.machine = att.machine AND t.from_state = current_state
       AND t.event = apply_event.event;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM callback_center.transitions t
                        WHERE t.machine = att.machine AND t.event = apply_event.event) THEN
            RAISE EXCEPTION USING ERRCODE = 'CB011',
                MESSAGE = format('unknown event "%s" in state machine "%s"', event, att.machine);
        END IF;
        SELECT string_agg(quote_ident(t.event), ', ' ORDER BY t.event) INTO legal
          FROM callback_center.transitions t
         WHERE t.machine = att.machine AND t.from_state = current_state;
        RAISE EXCEPTION USING ERRCODE = 'CB010',
            MESSAGE = format('illegal event "%s" in state "%s" of state machine "%s"',
                             event, current_state, att.machine),
            DETAIL = format('Row %s of table %s is in state "%s".',
                            quote_literal(entity_id), tbl, current_state),
            HINT = CASE WHEN legal IS NULL
                        THEN format('No event leaves state "%s".', current_state)
                        ELSE format('Legal events from "%s": %s.', current_state, legal) END;
    END IF;

    EXECUTE format('UPDATE %s SET %I = $1 WHERE %I = CAST($2 AS %s)',
                   tbl, state_column, att.id_column, id_type)
      USING target, entity_id;
    RETURN target;
END
$$;

REVOKE ALL ON FUNCTION callback_center.apply_event(regclass, name, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.apply_event(regclass, name, text, text)
    TO callback_center_app, callback_center_admin;
-- The view state_machine_attachments calls it with the reader's rights
-- (apply_event and detach_state_machine read the view).
REVOKE ALL ON FUNCTION callback_center._fsm_trigger_args(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center._fsm_trigger_args(bytea)
    TO callback_center_app, callback_center_admin;

-- ------------------------------------------------------------------------
-- Built-in machines.  emits stay empty here; 60_orders.sql wires them.
-- ------------------------------------------------------------------------

INSERT INTO callback_center.state_machines (machine, description, builtin) VALUES
    ('order', 'Merchant-side order status', true),
    ('order_pay', 'Pay status of an order', true),
    ('payment', 'Payment with a provider', true);

INSERT INTO callback_center.machine_states (machine, state, is_initial, is_final, builtin) VALUES
    ('order', 'pending_confirmation', true, false, true),
    ('order', 'confirmed', false, false, true),
    ('order', 'failed', false, true, true),
    ('order', 'closed', false, true, true),
    ('order', 'refunded', false, true, true),
    ('order_pay', 'unpaid', true, false, true),
    ('order_pay', 'paying', false, false, true),
    ('order_pay', 'paid', false, false, true),
    ('order_pay', 'pay_failed', false, true, true),
    ('order_pay', 'closed', false, true, true),
    ('order_pay', 'refunded', false, true, true),
    ('payment', 'CREATED', true, false, true),
    ('payment', 'PAYING', false, false, true),
    ('payment', 'PAID', false, false, true),
    ('payment', 'FAILED', false, false, true),
    ('payment', 'CLOSED', false, false, true),
    ('payment', 'REFUND_REQUIRED', false, false, true),
    ('payment', 'REFUNDED', false, true, true);

-- payment: FAILED -> REFUNDED is deliberately absent: no money moved.  Money
-- that arrives after the payment failed or was closed (late_success) must go
-- back: REFUND_REQUIRED, then REFUNDED once refunded.
INSERT INTO callback_center.transitions (machine, from_state, to_state, event, builtin) VALUES
    ('order', 'pending_confirmation', 'confirmed', 'confirm', true),
    ('order', 'pending_confirmation', 'failed', 'fail', true),
    ('order', 'confirmed', 'closed', 'close', true),
    ('order', 'confirmed', 'refunded', 'refund', true),
    ('order_pay', 'unpaid', 'paying', 'pay', true),
    ('order_pay', 'unpaid', 'paid', 'pay_success', true),
    ('order_pay', 'paying', 'paid', 'pay_success', true),
    ('order_pay', 'unpaid', 'pay_failed', 'pay_fail', true),
    ('order_pay', 'paying', 'pay_failed', 'pay_fail', true),
    ('order_pay', 'unpaid', 'closed', 'timeout', true),
    ('order_pay', 'paying', 'closed', 'timeout', true),
    ('order_pay', 'paid', 'refunded', 'refund', true),
    ('payment', 'CREATED', 'PAYING', 'submit', true),
    ('payment', 'CREATED', 'PAID', 'success', true),
    ('payment', 'PAYING', 'PAID', 'success', true),
    ('payment', 'CREATED', 'FAILED', 'fail', true),
    ('payment', 'PAYING', 'FAILED', 'fail', true),
    ('payment', 'CREATED', 'CLOSED', 'close', true),
    ('payment', 'PAYING', 'CLOSED', 'close', true),
    ('payment', 'PAID', 'REFUNDED', 'refund', true),
    ('payment', 'CLOSED', 'REFUND_REQUIRED', 'late_success', true),
    ('payment', 'FAILED', 'REFUND_REQUIRED', 'late_success', true),
    ('payment', 'REFUND_REQUIRED', 'REFUNDED', 'refund', true);
