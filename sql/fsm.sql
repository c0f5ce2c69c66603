SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- fsm_try(sql) runs a statement and shows "ok" or the error's SQLSTATE,
-- message, detail and hint.
CREATE FUNCTION fsm_try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text; msg text; det text; hin text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
        det = PG_EXCEPTION_DETAIL, hin = PG_EXCEPTION_HINT;
    RETURN st || ': ' || msg || coalesce(E'\nDETAIL: ' || nullif(det, ''), '')
        || coalesce(E'\nHINT: ' || nullif(hin, ''), '');
END
$$;

-- Built-in machines.
SELECT machine, description, builtin FROM callback_center.state_machines
 WHERE builtin ORDER BY machine;
SELECT machine, string_agg(state || CASE WHEN is_initial THEN '(initial)' ELSE '' END
                                  || CASE WHEN is_final THEN '(final)' ELSE '' END,
                           ', ' ORDER BY state) AS states
  FROM callback_center.machine_states WHERE builtin GROUP BY machine ORDER BY machine;
SELECT machine, from_state, to_state, event, emits
  FROM callback_center.transitions WHERE builtin
 ORDER BY machine, from_state, to_state;
-- pg_dump keeps only what users add.
SELECT c.relname, x.cond
  FROM pg_extension e,
       unnest(e.extconfig, e.extcondition) AS x(oid, cond)
  JOIN pg_class c ON c.oid = x.oid
 WHERE e.extname = 'callback_center' AND c.relname IN
       ('state_machines', 'machine_states', 'transitions', 'builtin_emits', 'state_history',
        'state_history_id_seq')
 ORDER BY c.relname;

-- Emits set on a built-in transition after installation go to
-- builtin_emits as well (pg_dump keeps that table, not built-in rows); the
-- install script's own settings do not.  A row written there, as a restore
-- writes it, sets the transition's emits.
SELECT count(*) AS builtin_emits_after_install FROM callback_center.builtin_emits;
BEGIN;
SELECT callback_center.set_transition_emits('payment', 'CREATED', 'PAYING', '{fsm_test.submitted}');
SELECT callback_center.set_transition_emits('payment', 'CREATED', 'PAYING', '{fsm_test.paying}');
SELECT machine, from_state, to_state, emits FROM callback_center.builtin_emits;
SELECT emits FROM callback_center.transitions
 WHERE machine = 'payment' AND from_state = 'CREATED' AND to_state = 'PAYING';
DELETE FROM callback_center.builtin_emits;
INSERT INTO callback_center.builtin_emits (machine, from_state, to_state, emits)
VALUES ('order', 'confirmed', 'closed', '{fsm_test.restored}');
SELECT emits FROM callback_center.transitions
 WHERE machine = 'order' AND from_state = 'confirmed' AND to_state = 'closed';
ROLLBACK;

-- Two machines on one table, on different columns.
CREATE TABLE fsm_orders (id text PRIMARY KEY, status text, pay_status varchar(20));
SELECT callback_center.attach_state_machine('fsm_orders', 'status', 'order');
SELECT callback_center.attach_state_machine('fsm_orders', 'pay_status', 'order_pay');
-- Again, the same way: nothing to do.
SELECT callback_center.attach_state_machine('fsm_orders', 'status', 'order');
SELECT table_name, state_column, machine, id_column, trigger_name
  FROM callback_center.state_machine_attachments
 WHERE table_name = 'fsm_orders'::regclass ORDER BY state_column;
-- Each attachment is a pair: BEFORE checks, AFTER records.
SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger
 WHERE tgrelid = 'fsm_orders'::regclass ORDER BY tgname;

-- order: a new row starts in an initial state, then moves along.
INSERT INTO fsm_orders VALUES ('o1', 'pending_confirmation', 'unpaid');
BEGIN;
SET LOCAL callback_center.actor = 'merchant:42';
UPDATE fsm_orders SET status = 'confirmed' WHERE id = 'o1';
COMMIT;
UPDATE fsm_orders SET status = 'refunded' WHERE id = 'o1';
-- A final state has no way out.
SELECT fsm_try($$UPDATE fsm_orders SET status = 'confirmed' WHERE id = 'o1'$$);
-- Skipping a step is illegal.
INSERT INTO fsm_orders VALUES ('o2', 'pending_confirmation', 'unpaid');
SELECT fsm_try($$UPDATE fsm_orders SET status = 'closed' WHERE id = 'o2'$$);
UPDATE fsm_orders SET status = 'failed' WHERE id = 'o2';
INSERT INTO fsm_orders VALUES ('o3', 'pending_confirmation', 'unpaid');
UPDATE fsm_orders SET status = 'confirmed' WHERE id = 'o3';
UPDATE fsm_orders SET status = 'closed' WHERE id = 'o3';
SELECT fsm_try($$UPDATE fsm_orders SET status = 'refunded' WHERE id = 'o3'$$);
-- Not starting in an initial state, an unknown state, a NULL state.
SELECT fsm_try($$INSERT INTO fsm_orders VALUES ('o4', 'confirmed', 'unpaid')$$);
SELECT fsm_try($$INSERT INTO fsm_orders VALUES ('o4', 'shipped', 'unpaid')$$);
SELECT fsm_try($$INSERT INTO fsm_orders VALUES ('o4', NULL, 'unpaid')$$);
SELECT fsm_try($$UPDATE fsm_orders SET status = 'shipped' WHERE id = 'o3'$$);
SELECT fsm_try($$UPDATE fsm_orders SET status = NULL WHERE id = 'o3'$$);
-- Updating other columns, or keeping the state, records nothing.
UPDATE fsm_orders SET status = status, id = id WHERE id = 'o3';

-- order_pay, every legal move and some illegal ones.
INSERT INTO fsm_orders VALUES ('p1', 'pending_confirmation', 'unpaid'),
                              ('p2', 'pending_confirmation', 'unpaid'),
                              ('p3', 'pending_confirmation', 'unpaid'),
                              ('p4', 'pending_confirmation', 'unpaid'),
                              ('p5', 'pending_confirmation', 'unpaid'),
                              ('p6', 'pending_confirmation', 'unpaid');
UPDATE fsm_orders SET pay_status = 'paying' WHERE id IN ('p1', 'p2', 'p3');
UPDATE fsm_orders SET pay_status = 'paid' WHERE id IN ('p1', 'p4');
UPDATE fsm_orders SET pay_status = 'pay_failed' WHERE id IN ('p2', 'p5');
UPDATE fsm_orders SET pay_status = 'closed' WHERE id IN ('p3', 'p6');
UPDATE fsm_orders SET pay_status = 'refunded' WHERE id = 'p4';
SELECT fsm_try($$UPDATE fsm_orders SET pay_status = 'unpaid' WHERE id = 'p1'$$);
SELECT fsm_try($$UPDATE fsm_orders SET pay_status = 'closed' WHERE id = 'p1'$$);
SELECT fsm_try($$UPDATE fsm_orders SET pay_status = 'paid' WHERE id = 'p6'$$);
-- A multi-row update with one illegal row changes nothing.
SELECT fsm_try($$UPDATE fsm_orders SET pay_status = 'refunded' WHERE id IN ('p1', 'p2')$$);
SELECT id, status, pay_status FROM fsm_orders ORDER BY id;

-- payment, on a varchar column with an integer id.
CREATE TABLE fsm_payments (pay_id integer PRIMARY KEY, state varchar);
SELECT callback_center.attach_state_machine('fsm_payments', 'state', 'payment', 'pay_id');
INSERT INTO fsm_payments SELECT g, 'CREATED' FROM generate_series(1, 7) g;
UPDATE fsm_payments SET state = 'PAYING' WHERE pay_id IN (1, 2, 3);
UPDATE fsm_payments SET state = 'PAID' WHERE pay_id IN (1, 4);
UPDATE fsm_payments SET state = 'FAILED' WHERE pay_id IN (2, 5);
UPDATE fsm_payments SET state = 'CLOSED' WHERE pay_id IN (3, 6);
UPDATE fsm_payments SET state = 'REFUNDED' WHERE pay_id = 1;
-- No money moved on a failed payment: nothing to refund.
SELECT fsm_try($$UPDATE fsm_payments SET state = 'REFUNDED' WHERE pay_id = 2$$);
SELECT fsm_try($$UPDATE fsm_payments SET state = 'PAYING' WHERE pay_id = 4$$);
SELECT fsm_try($$UPDATE fsm_payments SET state = 'paid' WHERE pay_id = 7$$);
SELECT fsm_try($$UPDATE fsm_payments SET pay_id = NULL, state = 'PAID' WHERE pay_id = 7$$);
SELECT pay_id, state FROM fsm_payments ORDER BY pay_id;

-- History: one row per state entered, the actor from the setting or the role.
SELECT entity_id, machine, table_name, from_state, to_state, event,
       actor = current_user AS actor_is_role,
       CASE WHEN actor = current_user THEN NULL ELSE actor END AS actor
  FROM callback_center.state_history
 WHERE table_name IN ('public.fsm_orders', 'public.fsm_payments')
 ORDER BY table_name, machine, entity_id, id;

-- apply_event: what application code calls.
INSERT INTO fsm_orders VALUES ('e1', 'pending_confirmation', 'unpaid');
SELECT callback_center.apply_event('fsm_orders', 'pay_status', 'e1', 'pay');
SELECT callback_center.apply_event('fsm_orders', 'pay_status', 'e1', 'pay_success');
SELECT callback_center.apply_event('fsm_payments', 'state', '7', 'submit');
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_orders', 'pay_status', 'e1', 'pay')$$);
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_orders', 'pay_status', 'p4', 'pay')$$);
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_orders', 'pay_status', 'e1', 'ship')$$);
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_orders', 'pay_status', 'nope', 'pay')$$);
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_payments', 'state', 'x', 'submit')$$);
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_orders', 'id', 'e1', 'pay')$$);
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_orders', 'pay_status', NULL, 'pay')$$);
SELECT from_state, to_state, event FROM callback_center.state_history
 WHERE table_name = 'public.fsm_orders' AND entity_id = 'e1' ORDER BY id;

-- A machine of your own, on your own table.
SELECT callback_center.create_state_machine('fsm_test_ticket', 'Support ticket');
SELECT callback_center.add_state('fsm_test_ticket', 'open', is_initial => true);
SELECT callback_center.add_state('fsm_test_ticket', 'working');
SELECT callback_center.add_state('fsm_test_ticket', 'done', is_final => true);
SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'working', 'take');
SELECT callback_center.add_transition('fsm_test_ticket', 'working', 'open', 'drop');
SELECT callback_center.add_transition('fsm_test_ticket', 'working', 'done', 'finish',
                                      ARRAY['fsm_test.ticket_done']);
-- Definition errors.
SELECT fsm_try($$SELECT callback_center.create_state_machine('fsm_test_ticket')$$);
SELECT fsm_try($$SELECT callback_center.create_state_machine(NULL)$$);
SELECT fsm_try($$SELECT callback_center.create_state_machine('')$$);
SELECT fsm_try($$SELECT callback_center.create_state_machine(repeat('x', 64))$$);
SELECT fsm_try($$SELECT callback_center.add_state('fsm_test_nope', 'a')$$);
SELECT fsm_try($$SELECT callback_center.add_state('fsm_test_ticket', 'open')$$);
SELECT fsm_try($$SELECT callback_center.add_state('fsm_test_ticket', NULL)$$);
SELECT fsm_try($$SELECT callback_center.add_state('fsm_test_ticket', '')$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'gone', 'x')$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'open', 'x')$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'done', 'open', 'reopen')$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'working', 'grab')$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'done', 'take')$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'done', '')$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'done', 'x', NULL)$$);
SELECT fsm_try($$SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'done', 'x', ARRAY[NULL])$$);
SELECT fsm_try($$SELECT callback_center.set_transition_emits('fsm_test_ticket', 'open', 'done', '{}')$$);
SELECT fsm_try($$SELECT callback_center.set_transition_emits('fsm_test_ticket', 'open', 'working', ARRAY[''])$$);
SELECT fsm_try($$SELECT callback_center.set_transition_emits('fsm_test_nope', 'open', 'working', '{}')$$);

CREATE TABLE fsm_tickets (ticket_no bigint PRIMARY KEY, phase text NOT NULL, title text);
-- Attach errors.
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_tickets', 'phase', 'fsm_test_nope', 'ticket_no')$$);
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_tickets', 'nope', 'fsm_test_ticket', 'ticket_no')$$);
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_tickets', 'phase', 'fsm_test_ticket')$$);
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_tickets', 'ticket_no', 'fsm_test_ticket', 'ticket_no')$$);
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_tickets', NULL, 'fsm_test_ticket')$$);
SELECT fsm_try($$SELECT callback_center.attach_state_machine('pg_class_oid_index', 'phase', 'fsm_test_ticket')$$);
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_orders', 'status', 'order_pay')$$);
SELECT fsm_try($$SELECT callback_center.detach_state_machine('fsm_tickets', 'phase')$$);
-- Rows already in place must be in states the machine knows.
INSERT INTO fsm_tickets VALUES (1, 'limbo', 'old');
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_tickets', 'phase', 'fsm_test_ticket', 'ticket_no')$$);
UPDATE fsm_tickets SET phase = 'open';
SELECT callback_center.attach_state_machine('fsm_tickets', 'phase', 'fsm_test_ticket', 'ticket_no');

-- Emits: the trigger calls callback_center.enqueue(event_type, entity_id,
-- payload) by name.  Until the outbox lands on this branch a stand-in
-- records the calls; the real one, when present, is left alone.  The call
-- count comes from pg_stat_xact_user_functions, the same for either.
CREATE TABLE fsm_test_events (event_type text, aggregate_id text, payload jsonb);
DO $$
BEGIN
    IF to_regprocedure('callback_center.enqueue(text,text,jsonb)') IS NULL THEN
        CREATE FUNCTION callback_center.enqueue(event_type text, aggregate_id text, payload jsonb)
        RETURNS integer LANGUAGE plpgsql AS $f$
        BEGIN
            INSERT INTO public.fsm_test_events VALUES (event_type, aggregate_id, payload);
            RETURN 0;
        END
        $f$;
        COMMENT ON FUNCTION callback_center.enqueue(text, text, jsonb) IS 'fsm test stand-in';
    END IF;
END
$$;
BEGIN;
SET LOCAL track_functions = 'all';
SET LOCAL callback_center.actor = 'agent:7';
INSERT INTO fsm_tickets VALUES (2, 'open', 'printer');
SELECT callback_center.apply_event('fsm_tickets', 'phase', '2', 'take');
SELECT callback_center.apply_event('fsm_tickets', 'phase', '2', 'drop');
SELECT callback_center.apply_event('fsm_tickets', 'phase', '2', 'take');
SELECT callback_center.apply_event('fsm_tickets', 'phase', '2', 'finish');
SELECT calls AS enqueue_calls FROM pg_stat_xact_user_functions
 WHERE funcid = 'callback_center.enqueue(text,text,jsonb)'::regprocedure;
-- Two event types: two calls; emitting from an emitted-from move too.
SELECT callback_center.set_transition_emits('fsm_test_ticket', 'open', 'working',
                                            ARRAY['fsm_test.taken', 'fsm_test.busy']);
INSERT INTO fsm_tickets VALUES (3, 'open', 'mouse');
UPDATE fsm_tickets SET phase = 'working' WHERE ticket_no = 3;
SELECT calls AS enqueue_calls FROM pg_stat_xact_user_functions
 WHERE funcid = 'callback_center.enqueue(text,text,jsonb)'::regprocedure;
-- With the stand-in, check what it received (silent when the real one runs).
DO $$
DECLARE
    got text;
BEGIN
    IF obj_description('callback_center.enqueue(text,text,jsonb)'::regprocedure, 'pg_proc')
       IS DISTINCT FROM 'fsm test stand-in' THEN
        RETURN;
    END IF;
    SELECT string_agg(format('%s %s %s', event_type, aggregate_id, payload), E'\n'
                      ORDER BY aggregate_id, event_type) INTO got FROM fsm_test_events;
    IF got IS DISTINCT FROM
       'fsm_test.ticket_done 2 {"to": "done", "from": "working", "event": "finish", "machine": "fsm_test_ticket", "entity_id": "2"}' || E'\n' ||
       'fsm_test.busy 3 {"to": "working", "from": "open", "event": "take", "machine": "fsm_test_ticket", "entity_id": "3"}' || E'\n' ||
       'fsm_test.taken 3 {"to": "working", "from": "open", "event": "take", "machine": "fsm_test_ticket", "entity_id": "3"}'
    THEN
        RAISE EXCEPTION 'enqueue received %', got;
    END IF;
END
$$;
COMMIT;
SELECT entity_id, from_state, to_state, event, actor FROM callback_center.state_history
 WHERE table_name = 'public.fsm_tickets' ORDER BY id;

-- A statement failing after the trigger ran leaves no history behind.
ALTER TABLE fsm_tickets ADD CONSTRAINT fsm_tickets_title CHECK (phase = 'open' OR title <> '');
INSERT INTO fsm_tickets VALUES (4, 'open', '');
SELECT fsm_try($$UPDATE fsm_tickets SET phase = 'working' WHERE ticket_no = 4$$);
SELECT phase FROM fsm_tickets WHERE ticket_no = 4;
SELECT count(*) AS history_rows FROM callback_center.state_history
 WHERE table_name = 'public.fsm_tickets' AND entity_id = '4';

-- Definitions changed in this session are seen at once (cache invalidation).
SELECT fsm_try($$UPDATE fsm_tickets SET phase = 'done' WHERE ticket_no = 4$$);
SELECT callback_center.add_transition('fsm_test_ticket', 'open', 'done', 'close_direct');
UPDATE fsm_tickets SET phase = 'done' WHERE ticket_no = 4;
BEGIN;
DELETE FROM callback_center.transitions WHERE machine = 'fsm_test_ticket' AND event = 'close_direct';
INSERT INTO fsm_tickets VALUES (5, 'open', 'desk');
SELECT fsm_try($$UPDATE fsm_tickets SET phase = 'done' WHERE ticket_no = 5$$);
ROLLBACK;
INSERT INTO fsm_tickets VALUES (5, 'open', 'desk');
UPDATE fsm_tickets SET phase = 'done' WHERE ticket_no = 5;

-- Only rows actually written are recorded.  ON CONFLICT DO NOTHING fires
-- the BEFORE INSERT triggers, then skips a conflicting row.
INSERT INTO fsm_orders VALUES ('c1', 'pending_confirmation', 'unpaid')
    ON CONFLICT DO NOTHING;
INSERT INTO fsm_orders VALUES ('c1', 'pending_confirmation', 'unpaid')
    ON CONFLICT DO NOTHING;
INSERT INTO fsm_orders VALUES ('o1', 'pending_confirmation', 'unpaid'),
                              ('c2', 'pending_confirmation', 'unpaid')
    ON CONFLICT (id) DO NOTHING;
SELECT entity_id, machine, from_state, to_state FROM callback_center.state_history
 WHERE table_name = 'public.fsm_orders' AND entity_id IN ('o1', 'c1', 'c2')
 ORDER BY entity_id, machine, id;
-- Nor is anything emitted for a skipped row; ON CONFLICT DO UPDATE records
-- the update only.  (Calls are counted from here: the counters may hold
-- calls of earlier transactions not yet reported.)
BEGIN;
SET LOCAL track_functions = 'all';
SELECT coalesce(sum(calls), 0) AS enqueue_before FROM pg_stat_xact_user_functions
 WHERE funcid = 'callback_center.enqueue(text,text,jsonb)'::regprocedure \gset
INSERT INTO fsm_tickets VALUES (6, 'open', 'lamp');
INSERT INTO fsm_tickets VALUES (6, 'open', 'lamp again') ON CONFLICT DO NOTHING;
INSERT INTO fsm_tickets VALUES (6, 'open', 'lamp again')
    ON CONFLICT (ticket_no) DO UPDATE SET phase = 'working' WHERE false;
SELECT coalesce(sum(calls), 0) - :enqueue_before AS enqueue_calls FROM pg_stat_xact_user_functions
 WHERE funcid = 'callback_center.enqueue(text,text,jsonb)'::regprocedure;
INSERT INTO fsm_tickets VALUES (6, 'open', 'lamp again')
    ON CONFLICT (ticket_no) DO UPDATE SET phase = 'working';
SELECT coalesce(sum(calls), 0) - :enqueue_before AS enqueue_calls FROM pg_stat_xact_user_functions
 WHERE funcid = 'callback_center.enqueue(text,text,jsonb)'::regprocedure;
COMMIT;
SELECT from_state, to_state, event FROM callback_center.state_history
 WHERE table_name = 'public.fsm_tickets' AND entity_id = '6' ORDER BY id;
-- A BEFORE trigger of the user's that returns NULL (it sorts after
-- cc_fsm_phase, so ours has already passed the row): no history, no emit.
CREATE FUNCTION fsm_test_skip() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.title = 'skip' THEN
        RETURN NULL;
    END IF;
    IF NEW.title = 'meddle' THEN
        NEW.phase := 'done';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER zz_skip BEFORE INSERT OR UPDATE ON fsm_tickets
    FOR EACH ROW EXECUTE FUNCTION fsm_test_skip();
BEGIN;
SET LOCAL track_functions = 'all';
SELECT coalesce(sum(calls), 0) AS enqueue_before FROM pg_stat_xact_user_functions
 WHERE funcid = 'callback_center.enqueue(text,text,jsonb)'::regprocedure \gset
INSERT INTO fsm_tickets VALUES (7, 'open', 'skip');
UPDATE fsm_tickets SET phase = 'done', title = 'skip' WHERE ticket_no = 6;
SELECT coalesce(sum(calls), 0) - :enqueue_before AS enqueue_calls FROM pg_stat_xact_user_functions
 WHERE funcid = 'callback_center.enqueue(text,text,jsonb)'::regprocedure;
COMMIT;
SELECT ticket_no, phase, title FROM fsm_tickets WHERE ticket_no IN (6, 7) ORDER BY ticket_no;
SELECT count(*) AS history_rows FROM callback_center.state_history
 WHERE table_name = 'public.fsm_tickets' AND entity_id IN ('6', '7')
   AND (from_state IS NULL AND entity_id = '7' OR to_state = 'done');
-- The AFTER half checks the row as written: a later BEFORE trigger cannot
-- slip an illegal state past the machine, and a legal change it makes is
-- what history records.
SELECT fsm_try($$INSERT INTO fsm_tickets VALUES (7, 'open', 'meddle')$$);
INSERT INTO fsm_tickets VALUES (7, 'open', 'desk');
UPDATE fsm_tickets SET phase = 'working', title = 'meddle' WHERE ticket_no = 7;
SELECT from_state, to_state, event FROM callback_center.state_history
 WHERE table_name = 'public.fsm_tickets' AND entity_id = '7' ORDER BY id;
DROP TRIGGER zz_skip ON fsm_tickets;
DROP FUNCTION fsm_test_skip();

-- The application role: rights on its own table and callback_center_app,
-- nothing on the extension's tables; history is still written.
CREATE ROLE regress_fsm_app IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO regress_fsm_app;
CREATE TABLE fsm_app_orders (id text PRIMARY KEY, pay_status text);
GRANT SELECT, INSERT, UPDATE ON fsm_app_orders TO regress_fsm_app;
SELECT callback_center.attach_state_machine('fsm_app_orders', 'pay_status', 'order_pay');
SET ROLE regress_fsm_app;
SELECT fsm_try($$SELECT count(*) FROM callback_center.state_history$$);
INSERT INTO fsm_app_orders VALUES ('a1', 'unpaid');
SELECT callback_center.apply_event('fsm_app_orders', 'pay_status', 'a1', 'pay');
UPDATE fsm_app_orders SET pay_status = 'paid' WHERE id = 'a1';
SELECT fsm_try($$UPDATE fsm_app_orders SET pay_status = 'unpaid' WHERE id = 'a1'$$);
SELECT fsm_try($$SELECT callback_center.attach_state_machine('fsm_app_orders', 'id', 'order')$$);
SELECT fsm_try($$SELECT callback_center.add_state('order', 'x')$$);
RESET ROLE;
SELECT entity_id, from_state, to_state, event, actor FROM callback_center.state_history
 WHERE table_name = 'public.fsm_app_orders' ORDER BY id;

-- The trigger acts as the extension owner (a superuser) to write history,
-- but the JSON of the payload columns for the emitted events is built as
-- the role that made the change: row_to_json runs casts to json of the
-- columns' types, which a table owner can write.  Here a non-superuser's cast records who
-- ran it; it must be that role, never the superuser.
CREATE ROLE regress_fsm_owner;
CREATE SCHEMA fsm_own AUTHORIZATION regress_fsm_owner;
SET ROLE regress_fsm_owner;
CREATE TYPE fsm_own.mood AS ENUM ('calm', 'cross');
CREATE TABLE fsm_own.cast_calls (who text, superuser boolean);
CREATE FUNCTION fsm_own.mood_json(m fsm_own.mood) RETURNS json
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fsm_own.cast_calls
    SELECT current_user, r.rolsuper FROM pg_roles r WHERE r.rolname = current_user;
    RETURN to_json(m::text || '!');
END
$$;
CREATE CAST (fsm_own.mood AS json) WITH FUNCTION fsm_own.mood_json(fsm_own.mood);
CREATE TABLE fsm_own.tickets (id text PRIMARY KEY, phase text, mood fsm_own.mood);
RESET ROLE;
SELECT callback_center.attach_state_machine('fsm_own.tickets', 'phase', 'fsm_test_ticket',
                                            payload_columns => '{id,mood}');
SET ROLE regress_fsm_owner;
INSERT INTO fsm_own.tickets VALUES ('c1', 'open', 'cross');
UPDATE fsm_own.tickets SET phase = 'working' WHERE id = 'c1';
-- One move emitting two events: the row is converted once.
SELECT count(*) AS cast_calls,
       bool_and(who = 'regress_fsm_owner') AS all_as_invoker,
       bool_or(superuser) AS any_as_superuser
  FROM fsm_own.cast_calls;
RESET ROLE;
SELECT entity_id, from_state, to_state, event, actor FROM callback_center.state_history
 WHERE table_name = 'fsm_own.tickets' ORDER BY id;
SET client_min_messages = warning;
DROP SCHEMA fsm_own CASCADE;
RESET client_min_messages;
DROP ROLE regress_fsm_owner;

-- The trigger used any other way.
CREATE TABLE fsm_misuse (id text, s text, n integer);
CREATE TRIGGER t_stmt AFTER INSERT ON fsm_misuse FOR EACH STATEMENT
    EXECUTE FUNCTION callback_center.fsm_trigger('order', 's', 'id');
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
DROP TRIGGER t_stmt ON fsm_misuse;
INSERT INTO fsm_misuse VALUES ('0', 'pending_confirmation');
CREATE TRIGGER t_delete BEFORE DELETE ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('order', 's', 'id');
SELECT fsm_try($$DELETE FROM fsm_misuse$$);
DROP TRIGGER t_delete ON fsm_misuse;
DELETE FROM fsm_misuse;
-- Half a pair: checked but never recorded, or recorded unchecked.
CREATE TRIGGER t_before BEFORE INSERT OR UPDATE OF s ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('order', 's', 'id');
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
CREATE TRIGGER t_after AFTER INSERT OR UPDATE OF s ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('order', 's', 'id');
ALTER TABLE fsm_misuse DISABLE TRIGGER t_before;
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
ALTER TABLE fsm_misuse ENABLE TRIGGER t_before;
-- A pair made by hand works.
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
DROP TRIGGER t_before ON fsm_misuse;
DROP TRIGGER t_after ON fsm_misuse;
DELETE FROM fsm_misuse;
CREATE TRIGGER t_args BEFORE INSERT ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('order');
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
DROP TRIGGER t_args ON fsm_misuse;
CREATE TRIGGER t_type BEFORE INSERT ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('order', 'n', 'id');
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation', 1)$$);
DROP TRIGGER t_type ON fsm_misuse;
CREATE TRIGGER t_col BEFORE INSERT ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('order', 's', 'nope');
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
DROP TRIGGER t_col ON fsm_misuse;
CREATE TRIGGER t_machine BEFORE INSERT ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('fsm_test_nope', 's', 'id');
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
DROP TRIGGER t_machine ON fsm_misuse;
-- A name longer than any machine's is no machine's (not a prefix match).
CREATE TRIGGER t_long BEFORE INSERT ON fsm_misuse FOR EACH ROW
    EXECUTE FUNCTION callback_center.fsm_trigger('order_pay_order_pay_order_pay_order_pay_order_pay_order_pay_order_pay', 's', 'id');
SELECT fsm_try($$INSERT INTO fsm_misuse VALUES ('1', 'pending_confirmation')$$);
DROP TRIGGER t_long ON fsm_misuse;
SELECT fsm_try($$SELECT callback_center.fsm_trigger()$$);

-- Rows that predate the machine with a NULL state may only start out.
CREATE TABLE fsm_late (id text PRIMARY KEY, s text);
INSERT INTO fsm_late VALUES ('l1', NULL), ('l2', NULL);
SELECT callback_center.attach_state_machine('fsm_late', 's', 'order');
SELECT fsm_try($$UPDATE fsm_late SET s = 'confirmed' WHERE id = 'l1'$$);
UPDATE fsm_late SET s = 'pending_confirmation' WHERE id = 'l1';
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_late', 's', 'l2', 'confirm')$$);
SELECT entity_id, from_state, to_state FROM callback_center.state_history
 WHERE table_name = 'public.fsm_late' ORDER BY id;

-- Trigger names already taken get a suffix; detach finds the pair by its
-- arguments.
CREATE TABLE fsm_names (id text PRIMARY KEY, s text, s_log text);
SELECT callback_center.attach_state_machine('fsm_names', 's', 'order');
SELECT callback_center.attach_state_machine('fsm_names', 's_log', 'order_pay');
SELECT tgname, tgtype & 2 <> 0 AS before FROM pg_trigger
 WHERE tgrelid = 'fsm_names'::regclass ORDER BY tgname;
INSERT INTO fsm_names VALUES ('n1', 'pending_confirmation', 'unpaid');
SELECT callback_center.detach_state_machine('fsm_names', 's');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'fsm_names'::regclass ORDER BY tgname;
UPDATE fsm_names SET s = 'closed', s_log = 'paying';
SELECT machine, from_state, to_state FROM callback_center.state_history
 WHERE table_name = 'public.fsm_names' ORDER BY id;

-- Detach: moves are free again; history stays.
SELECT callback_center.detach_state_machine('fsm_orders', 'pay_status');
UPDATE fsm_orders SET pay_status = 'unpaid' WHERE id = 'p1';
SELECT fsm_try($$UPDATE fsm_orders SET status = 'pending_confirmation' WHERE id = 'o1'$$);
SELECT fsm_try($$SELECT callback_center.detach_state_machine('fsm_orders', 'pay_status')$$);
SELECT fsm_try($$SELECT callback_center.apply_event('fsm_orders', 'pay_status', 'p1', 'pay')$$);
SELECT table_name, state_column, machine FROM callback_center.state_machine_attachments
 WHERE table_name::text LIKE 'fsm%' ORDER BY table_name::text, state_column;

-- Clean up.
DO $$
BEGIN
    IF obj_description('callback_center.enqueue(text,text,jsonb)'::regprocedure, 'pg_proc')
       = 'fsm test stand-in' THEN
        DROP FUNCTION callback_center.enqueue(text, text, jsonb);
    END IF;
END
$$;
DROP TABLE fsm_names, fsm_late, fsm_orders, fsm_payments, fsm_tickets, fsm_app_orders, fsm_misuse, fsm_test_events;
DELETE FROM callback_center.state_history WHERE table_name LIKE 'public.fsm%';
DELETE FROM callback_center.state_machines WHERE machine = 'fsm_test_ticket';
REVOKE USAGE ON SCHEMA callback_center FROM regress_fsm_app;
DROP ROLE regress_fsm_app;
DROP FUNCTION fsm_try(text);
-- Leave the database as this file found a fresh one: the install test
-- expects CREATE EXTENSION to install pgcrypto.
DROP EXTENSION callback_center;
DROP EXTENSION pgcrypto;
