-- State machines and the rights of the roles around them: the scan
-- attach_state_machine() makes runs as the table's owner (issue 11 item 7),
-- emitted payloads carry only the columns an attachment names and the app
-- role does not read payloads (item 8), history and replays record the
-- session's role (item 11).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
DROP ROLE IF EXISTS regress_sec_tenant, regress_sec_admin, regress_sec_clerk;
RESET client_min_messages;

CREATE FUNCTION sec_try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text;
BEGIN
    EXECUTE q INTO r;
    RETURN coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
GRANT EXECUTE ON FUNCTION sec_try(text) TO PUBLIC;

SELECT callback_center.create_state_machine('sec_item');
SELECT callback_center.add_state('sec_item', 'open', true);
SELECT callback_center.add_state('sec_item', 'done');
SELECT callback_center.add_transition('sec_item', 'open', 'done', 'finish', '{sec.finished}');
SELECT callback_center.create_endpoint('sec-sink', 'http://127.0.0.1:9/sec', '{sec.finished}') > 0 AS endpoint;

CREATE ROLE regress_sec_tenant;
CREATE ROLE regress_sec_admin IN ROLE callback_center_admin;
GRANT USAGE ON SCHEMA callback_center TO regress_sec_admin;
CREATE ROLE regress_sec_clerk IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO regress_sec_clerk;

-- 1. A table owner who is not admin forces on its table a row-level
-- security policy whose function copies endpoint secrets to a table it
-- can read, and asks the admin to attach a machine.  The scan of the rows
-- runs as the owner: the policy runs, but without the admin's rights.
CREATE SCHEMA sec_t AUTHORIZATION regress_sec_tenant;
GRANT USAGE ON SCHEMA sec_t TO PUBLIC;
SET ROLE regress_sec_tenant;
CREATE TABLE sec_t.sec_loot (who text, secret text);
GRANT INSERT ON sec_t.sec_loot TO PUBLIC;
CREATE FUNCTION sec_t.sec_steal() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO sec_t.sec_loot
        SELECT current_user, s.secret FROM callback_center.endpoint_secrets s;
    EXCEPTION WHEN insufficient_privilege THEN
        INSERT INTO sec_t.sec_loot VALUES (current_user, NULL);
    END;
    RETURN true;
END $$;
CREATE TABLE sec_t.sec_items (id integer PRIMARY KEY, state text NOT NULL);
INSERT INTO sec_t.sec_items VALUES (1, 'open');
ALTER TABLE sec_t.sec_items ENABLE ROW LEVEL SECURITY;
ALTER TABLE sec_t.sec_items FORCE ROW LEVEL SECURITY;
CREATE POLICY steal ON sec_t.sec_items USING (sec_t.sec_steal());
GRANT SELECT, TRIGGER ON sec_t.sec_items TO regress_sec_admin;
RESET ROLE;
SET ROLE regress_sec_admin;
SELECT callback_center.attach_state_machine('sec_t.sec_items', 'state', 'sec_item');
RESET ROLE;
-- A row in a state the machine does not know: the scan still finds it,
-- and the policy runs for it, as the owner.
SELECT callback_center.detach_state_machine('sec_t.sec_items', 'state');
INSERT INTO sec_t.sec_items VALUES (2, 'limbo');
SET ROLE regress_sec_admin;
SELECT sec_try($$SELECT callback_center.attach_state_machine('sec_t.sec_items', 'state', 'sec_item')$$);
-- The scan is for whoever may attach: TRIGGER on the table.
SELECT sec_try($$SELECT callback_center._fsm_unknown_state('sec_t.sec_loot', 'who', '{}')$$);
-- A scan that runs the policy (every row unknown): as the tenant.
SELECT callback_center._fsm_unknown_state('sec_t.sec_items', 'state', '{}') AS first_unknown;
RESET ROLE;
-- Nothing leaked; whatever the policy did, it did as the tenant.
SELECT DISTINCT who, secret IS NOT NULL AS got_a_secret FROM sec_t.sec_loot;
DELETE FROM sec_t.sec_items WHERE id = 2;
SET ROLE regress_sec_admin;
SELECT callback_center.attach_state_machine('sec_t.sec_items', 'state', 'sec_item');
RESET ROLE;

-- 2. Column privileges.  A clerk may read only id and state of the staff
-- table and update only state; the move emits an event.  The payload
-- carries no column the attachment did not name, and the clerk (an app
-- member) cannot read payloads at all.
CREATE TABLE public.sec_staff (id integer PRIMARY KEY, name text, ssn text, salary integer,
                               state text NOT NULL);
SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item');
INSERT INTO public.sec_staff VALUES (1, 'Ann', '078-05-1120', 9000, 'open'),
                                    (2, 'Bob', '219-09-9999', 8000, 'open');
GRANT SELECT (id, state), UPDATE (state) ON public.sec_staff TO regress_sec_clerk;
SET ROLE regress_sec_clerk;
-- apply_event runs with the caller's rights: its NULL check (_require) is
-- granted to the app role, so a NULL is 22004, not 42501.
SELECT sec_try($$SELECT callback_center.apply_event('public.sec_staff', 'state', '1', NULL)$$)
    AS clerk_null_event;
UPDATE public.sec_staff SET state = 'done' WHERE id = 1;
SELECT sec_try($$SELECT string_agg(payload::text, ',') FROM callback_center.outbox
                  WHERE aggregate_id = '1' AND event_type = 'sec.finished'$$) AS clerk_reads_payload;
SELECT event_type, aggregate_id, status FROM callback_center.outbox
 WHERE event_type = 'sec.finished' ORDER BY id;
RESET ROLE;
SELECT payload FROM callback_center.outbox WHERE event_type = 'sec.finished' ORDER BY id;
-- An attachment names the columns its events carry; attaching again with
-- other columns changes them, with the same columns changes nothing.
SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item',
                                            payload_columns => '{name,state}') AS changed;
SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item',
                                            payload_columns => '{name,state}') AS changed_again;
SELECT state_column, machine, id_column, payload_columns
  FROM callback_center.state_machine_attachments WHERE table_name = 'public.sec_staff'::regclass;
SELECT tgname, callback_center._fsm_trigger_args(tgargs) AS args FROM pg_trigger
 WHERE tgrelid = 'public.sec_staff'::regclass ORDER BY tgname;
SET ROLE regress_sec_clerk;
UPDATE public.sec_staff SET state = 'done' WHERE id = 2;
RESET ROLE;
SELECT payload FROM callback_center.outbox WHERE event_type = 'sec.finished' ORDER BY id;
-- The whole row only when asked for.
SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item',
                                            payload_columns => '{*}') AS changed;
INSERT INTO public.sec_staff VALUES (3, 'Cy', '123-45-6789', 7000, 'open');
UPDATE public.sec_staff SET state = 'done' WHERE id = 3;
SELECT payload->'row' AS whole_row FROM callback_center.outbox
 WHERE event_type = 'sec.finished' AND aggregate_id = '3';
-- A payload column dropped later fails the next emitting move.
SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item',
                                            payload_columns => '{salary}') AS changed;
ALTER TABLE public.sec_staff DROP COLUMN salary;
INSERT INTO public.sec_staff VALUES (4, 'Di', '000-00-0000', 'open');
SELECT sec_try($$UPDATE public.sec_staff SET state = 'done' WHERE id = 4$$);
SELECT callback_center.detach_state_machine('public.sec_staff', 'state');
-- Bad payload columns.
SELECT sec_try($$SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item', 'id', '{nope}')$$);
SELECT sec_try($$SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item', 'id', '{*,name}')$$);
SELECT sec_try($$SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item', 'id', '{name,name}')$$);
SELECT sec_try($$SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item', 'id', NULL)$$);
SELECT sec_try($$SELECT callback_center.attach_state_machine('public.sec_staff', 'state', 'sec_item', 'id', '{name,NULL}')$$);
-- The app role reads every column of the outbox but the payload.
SELECT a.attname, has_column_privilege('callback_center_app', 'callback_center.outbox', a.attname, 'SELECT') AS app
  FROM pg_attribute a
 WHERE a.attrelid = 'callback_center.outbox'::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum;

-- 3. Who did it.  The actor setting is the application's claim, which any
-- role may set; session_role beside it is the role the session
-- authenticated as.  A replay records session_user, not the extension
-- owner that its SECURITY DEFINER function runs as.
GRANT SELECT, INSERT, UPDATE ON sec_t.sec_items TO regress_sec_clerk;
SET SESSION AUTHORIZATION regress_sec_clerk;
SET callback_center.actor = 'merchant:42';
INSERT INTO sec_t.sec_items VALUES (5, 'open');
UPDATE sec_t.sec_items SET state = 'done' WHERE id = 5;
RESET callback_center.actor;
RESET SESSION AUTHORIZATION;
SELECT entity_id, from_state, to_state, actor, session_role FROM callback_center.state_history
 WHERE table_name = 'sec_t.sec_items' AND entity_id = '5' ORDER BY id;
UPDATE callback_center.outbox SET status = 'dead', attempts = 3 WHERE event_type = 'sec.finished';
SET SESSION AUTHORIZATION regress_sec_admin;
SELECT callback_center.replay_dead('sec-sink', reason => 'sec test') AS replayed;
RESET SESSION AUTHORIZATION;
SELECT DISTINCT replayed_by, reason FROM callback_center.replay_audit WHERE reason = 'sec test';

-- Clean up.
SELECT callback_center.drop_endpoint('sec-sink');
DROP TABLE public.sec_staff;
SET client_min_messages = warning;
DROP SCHEMA sec_t CASCADE;
RESET client_min_messages;
DELETE FROM callback_center.state_history WHERE machine = 'sec_item';
DELETE FROM callback_center.replay_audit WHERE reason = 'sec test';
DELETE FROM callback_center.transitions WHERE machine = 'sec_item';
DELETE FROM callback_center.machine_states WHERE machine = 'sec_item';
DELETE FROM callback_center.state_machines WHERE machine = 'sec_item';
REVOKE USAGE ON SCHEMA callback_center FROM regress_sec_admin, regress_sec_clerk;
DROP ROLE regress_sec_tenant, regress_sec_admin, regress_sec_clerk;
DROP FUNCTION sec_try(text);
