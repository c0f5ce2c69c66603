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

-- State machines and restore: a restore loads rows as they are (the
-- trigger's new symbol lets COPY FROM by the table's owner or a superuser
-- through untouched), history records the session's role beside the
-- application's actor (session_role), attach_state_machine() scans existing
-- rows as the table's owner and takes payload_columns (emitted events carry
-- only the columns an attachment names; the built-in tables name the whole
-- row), the app role no longer reads outbox payloads, and replay_audit
-- records session_user.

ALTER TABLE callback_center.state_history ADD COLUMN session_role text;

CREATE OR REPLACE FUNCTION callback_center.fsm_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cc_fsm_trigger_v2'
LANGUAGE C;

CREATE OR REPLACE VIEW callback_center.state_machine_attachments AS
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

CREATE FUNCTION callback_center._fsm_unknown_state(tbl regclass, state_column name,
                                                   states text[])
RETURNS text
AS 'MODULE_PATHNAME', 'cc_fsm_unknown_state'
LANGUAGE C;

DROP FUNCTION callback_center.attach_state_machine(regclass, name, text, name);
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
    IF tbl IS NULL OR state_column IS NULL OR machine IS NULL OR id_column IS NULL
       OR payload_columns IS NULL OR array_position(payload_columns, NULL) IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'tbl, state_column, machine, id_column and payload_columns (and its elements) cannot be null';
    END IF;
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

CREATE OR REPLACE FUNCTION callback_center.detach_state_machine(
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
    IF tbl IS NULL OR state_column IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'tbl and state_column cannot be null';
    END IF;
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

REVOKE ALL ON FUNCTION callback_center._fsm_unknown_state(regclass, name, text[]),
    callback_center.attach_state_machine(regclass, name, text, name, name[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center._fsm_unknown_state(regclass, name, text[]),
    callback_center.attach_state_machine(regclass, name, text, name, name[])
    TO callback_center_admin;

-- The built-in tables' events keep carrying the whole row.
SELECT callback_center.attach_state_machine('callback_center.coupons', 'status', 'coupon', 'coupon_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.orders', 'status', 'order', 'order_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.orders', 'pay_status', 'order_pay', 'order_id', '{*}');
SELECT callback_center.attach_state_machine('callback_center.payments', 'status', 'payment', 'payment_id', '{*}');

-- Machines users attached under 0.1.0 keep emitting the whole row, as they
-- did: what receivers of their events read must not change with the update.
-- New attachments name their payload columns (none by default).
DO $$
DECLARE
    att record;
BEGIN
    FOR att IN
        SELECT a.table_name, a.state_column, a.machine, a.id_column
          FROM callback_center.state_machine_attachments a
          JOIN pg_catalog.pg_class c ON c.oid = a.table_name
         WHERE c.relnamespace <> 'callback_center'::pg_catalog.regnamespace
    LOOP
        PERFORM callback_center.attach_state_machine(att.table_name, att.state_column,
                                                     att.machine, att.id_column, '{*}');
    END LOOP;
END
$$;

REVOKE SELECT ON callback_center.outbox FROM callback_center_app;
GRANT SELECT (id, endpoint_id, event_type, aggregate_id, status, attempts, next_attempt_at,
              created_at, delivered_at, last_http_status, last_error)
    ON callback_center.outbox TO callback_center_app;

ALTER TABLE callback_center.replay_audit ALTER COLUMN replayed_by SET DEFAULT session_user;
