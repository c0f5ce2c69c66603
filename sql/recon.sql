-- Reconciliation against a provider statement (issue 5 item 5).
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;
SET timezone = 'UTC';

-- Fixtures: stock, an endpoint for the payment follow-ups, and orders.
SELECT callback_center.set_stock('rc-A', 100) IS NOT NULL AS stock;
SELECT callback_center.set_provider('recon-pay', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.create_endpoint('rc-sink', 'http://127.0.0.1:9/rc',
    '{payment.refund_required,merchant.erp_sync,settlement.split,user.notify}') > 0 AS endpoint;
CREATE FUNCTION rc_events(oid text) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(o.event_type, ',' ORDER BY o.id), '')
      FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
     WHERE e.name = 'rc-sink' AND o.aggregate_id = oid $$;
-- A payment the callback path paid: transaction id and paid_at set, then
-- the state machines moved.
CREATE FUNCTION rc_paid(oid text, txn text, at timestamptz) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM callback_center.start_payment(oid, 'recon-pay');
    UPDATE callback_center.payments SET provider_txn_id = txn, paid_at = at WHERE order_id = oid;
    PERFORM callback_center.apply_event('callback_center.payments', 'status', 'pay_' || oid, 'success');
    PERFORM callback_center.apply_event('callback_center.orders', 'pay_status', oid, 'pay_success');
END $$;

SELECT count(*) AS placed FROM (VALUES ('rc-ok', 1000), ('rc-amt', 2000), ('rc-stat', 3000),
    ('rc-miss', 4000), ('rc-apply', 1500), ('rc-closed', 1700), ('rc-late', 900),
    ('rc-next', 800), ('rc-edge', 700), ('rc-xamt', 600)) AS v(oid, cents),
    LATERAL callback_center.place_order(v.oid, 'rc-user', '[{"sku":"rc-A","qty":1}]', v.cents,
                                        NULL, 'recon-pay') p
 WHERE p.status = 'confirmed';
SELECT rc_paid('rc-ok', 't-ok', '2026-01-15 10:00'),
       rc_paid('rc-amt', 't-amt', '2026-01-15 10:05'),
       rc_paid('rc-stat', 't-stat', '2026-01-15 10:10'),
       rc_paid('rc-miss', 't-miss', '2026-01-15 11:00'),
       rc_paid('rc-late', 't-late', '2026-01-15 23:50'),       -- near midnight
       rc_paid('rc-next', 't-next', '2026-01-16 05:00'),       -- booked next day
       rc_paid('rc-edge', 't-edge', '2026-01-16 00:10'),       -- within grace
       rc_paid('rc-xamt', 't-xamt', '2026-01-16 03:00');       -- next day, beyond grace
-- rc-apply: the user went to the cashier, the callback never came.
SELECT callback_center.start_payment('rc-apply', 'recon-pay');
-- rc-closed: the order timed out and closed before the money was seen.
SELECT callback_center.apply_event('callback_center.payments', 'status', 'pay_rc-closed', 'close'),
       callback_center.apply_event('callback_center.orders', 'pay_status', 'rc-closed', 'timeout'),
       callback_center.apply_event('callback_center.orders', 'status', 'rc-closed', 'close');

-- The provider's statement for 2026-01-15.
COPY callback_center.provider_statement (channel, bill_date, provider_txn_id, order_id, amount_cents, status)
FROM STDIN WITH (FORMAT csv);
recon-pay,2026-01-15,t-ok,rc-ok,1000,success
recon-pay,2026-01-15,t-amt,rc-amt,2500,success
recon-pay,2026-01-15,t-stat,rc-stat,3000,refund
recon-pay,2026-01-15,t-ghost,rc-ghost,5000,success
recon-pay,2026-01-15,t-apply,rc-apply,1500,success
recon-pay,2026-01-15,t-closed,rc-closed,1700,success
recon-pay,2026-01-15,t-next,rc-next,800,success
recon-pay,2026-01-15,t-edge,rc-edge,700,success
recon-pay,2026-01-15,t-xamt,rc-xamt,650,success
other-pay,2026-01-15,t-ok,rc-ok,1,closed
\.

SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15');
SELECT provider_txn_id, order_id, kind, provider_amount, local_amount, provider_status,
       local_status, resolution, note
  FROM callback_center.recon_diffs WHERE channel = 'recon-pay'
 ORDER BY provider_txn_id, kind;

-- Applied like a callback: payment paid with the provider's transaction,
-- order paid, the follow-ups queued.  The closed order is not reopened: a
-- refund is asked for instead.
SELECT order_id, status, provider_txn_id, paid_at IS NOT NULL AS has_paid_at
  FROM callback_center.payments WHERE order_id IN ('rc-apply', 'rc-closed') ORDER BY 1;
SELECT order_id, status, pay_status FROM callback_center.orders
 WHERE order_id IN ('rc-apply', 'rc-closed') ORDER BY 1;
SELECT rc_events('rc-apply') AS apply_events, rc_events('rc-closed') AS closed_events;
SELECT payload->>'txn_id' AS txn, payload->>'source' AS source, payload->>'order_status' AS order_status
  FROM callback_center.outbox WHERE event_type = 'payment.refund_required' AND aggregate_id = 'rc-closed';

-- Rerunning is idempotent: same differences, nothing applied twice.
SELECT count(*) AS history_before FROM callback_center.state_history
 WHERE entity_id IN ('rc-apply', 'pay_rc-apply') \gset
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15');
SELECT count(*) AS diffs FROM callback_center.recon_diffs WHERE channel = 'recon-pay';
SELECT rc_events('rc-apply') AS apply_events, rc_events('rc-closed') AS closed_events;
SELECT count(*) = :history_before AS history_unchanged FROM callback_center.state_history
 WHERE entity_id IN ('rc-apply', 'pay_rc-apply');

-- A difference that goes away (the statement is corrected) is dropped on
-- the next run; applied ones stay.
DELETE FROM callback_center.provider_statement
 WHERE channel = 'recon-pay' AND provider_txn_id = 't-ghost';
UPDATE callback_center.provider_statement SET amount_cents = 2000
 WHERE channel = 'recon-pay' AND provider_txn_id = 't-amt';
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15');
SELECT provider_txn_id, kind, resolution FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' ORDER BY provider_txn_id, kind;

-- With no grace the near-midnight row is flagged at once.
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15', '0');
SELECT provider_txn_id, kind, resolution FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND provider_txn_id IN ('t-late', 't-edge') ORDER BY 1, 2;

-- Cross-midnight: a line is compared with our payment whichever day we
-- booked it on.  t-xamt (paid 03:00 on the 16th, beyond grace) differs in
-- amount: flagged at once, with or without grace; t-next (05:00 on the
-- 16th) and t-edge (00:10, within grace) agree: no difference.
SELECT provider_txn_id, kind, provider_amount, local_amount, resolution
  FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND provider_txn_id IN ('t-xamt', 't-next', 't-edge') ORDER BY 1, 2;
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15');
SELECT provider_txn_id, kind, provider_amount, local_amount, resolution
  FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND provider_txn_id IN ('t-late', 't-xamt', 't-next', 't-edge') ORDER BY 1, 2;
-- The 16th's statement carries t-late (we booked it at 23:50 on the 15th).
-- The 16th's run matches it, finds nothing of its own to flag (t-xamt,
-- t-next and t-edge are the 15th's lines, compared there), and settles the
-- 15th's wait for t-late.
INSERT INTO callback_center.provider_statement (channel, bill_date, provider_txn_id, order_id,
                                                amount_cents, status)
VALUES ('recon-pay', '2026-01-16', 't-late', 'rc-late', 900, 'success');
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-16');
SELECT bill_date, provider_txn_id, kind, resolution FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND provider_txn_id IN ('t-late', 't-xamt', 't-next', 't-edge')
 ORDER BY 1, 2, 3;
-- Rerunning the 15th agrees: t-late is the 16th's.  Its grace does not
-- matter any more (the line turned up); with no grace, t-xamt is flagged.
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15', '0');
SELECT bill_date, provider_txn_id, kind, resolution FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND provider_txn_id IN ('t-late', 't-xamt', 't-next', 't-edge')
 ORDER BY 1, 2, 3;
-- A 16th line differing from a payment we booked on the 15th is flagged
-- on the 16th, even with no grace.
UPDATE callback_center.provider_statement SET amount_cents = 950
 WHERE channel = 'recon-pay' AND bill_date = '2026-01-16' AND provider_txn_id = 't-late';
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-16', '0');
SELECT bill_date, provider_txn_id, kind, provider_amount, local_amount, resolution
  FROM callback_center.recon_diffs WHERE channel = 'recon-pay' AND bill_date = '2026-01-16';

-- Another channel's statement is reconciled on its own: transaction ids
-- are the provider's, so its t-ok line is not our recon-pay payment t-ok.
SELECT * FROM callback_center.reconcile('other-pay', '2026-01-15');
SELECT provider_txn_id, order_id, kind, provider_status, local_status, resolution
  FROM callback_center.recon_diffs WHERE channel = 'other-pay';

-- A person settles a flagged difference; later runs leave it resolved.
SELECT callback_center.resolve_recon_diff(id, 'refunded by hand, ticket 42') AS resolved
  FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND bill_date = '2026-01-15' AND provider_txn_id = 't-stat';
SELECT callback_center.resolve_recon_diff(id, 'again') AS resolved_again
  FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND bill_date = '2026-01-15' AND provider_txn_id = 't-stat';
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15');
SELECT provider_txn_id, kind, resolution, note, resolved_by IS NOT NULL AS by_whom,
       resolved_at IS NOT NULL AS when_
  FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND bill_date = '2026-01-15' AND provider_txn_id = 't-stat';
\set SHOW_CONTEXT never
\set ON_ERROR_STOP 0
\set VERBOSITY sqlstate
SELECT callback_center.resolve_recon_diff(id, 'x') FROM callback_center.recon_diffs
 WHERE channel = 'recon-pay' AND resolution = 'applied' LIMIT 1;
\set VERBOSITY default
SELECT callback_center.resolve_recon_diff(-1, 'x');
\echo :LAST_ERROR_SQLSTATE
SELECT callback_center.resolve_recon_diff(1, NULL);
\echo :LAST_ERROR_SQLSTATE
\set ON_ERROR_STOP 1
\set SHOW_CONTEXT errors

-- The admin role may reconcile; the application may not.
CREATE ROLE rc_admin NOLOGIN IN ROLE callback_center_admin;
GRANT USAGE ON SCHEMA callback_center TO rc_admin;
CREATE ROLE rc_app NOLOGIN IN ROLE callback_center_app;
GRANT USAGE ON SCHEMA callback_center TO rc_app;
SET ROLE rc_admin;
SELECT sum(count) AS admin_total FROM callback_center.reconcile('recon-pay', '2026-01-15');
RESET ROLE;
SET ROLE rc_app;
\set SHOW_CONTEXT never
\set ON_ERROR_STOP 0
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- Bad input.
SELECT * FROM callback_center.reconcile(NULL, '2026-01-15');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.reconcile('recon-pay', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15', '-1 minute');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.reconcile('recon-pay', '2026-01-15', '1 day');
\echo :LAST_ERROR_SQLSTATE

-- Scheduling checks its arguments first, then needs pg_cron, which the
-- regress cluster does not have.
SELECT * FROM callback_center.schedule_maintenance(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.schedule_maintenance('{recon-pay}', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.schedule_maintenance('{recon-pay,NULL}');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.schedule_maintenance('{recon-pay}', older_than => NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.schedule_maintenance('{recon-pay}', history_older_than => '-1 day');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.schedule_maintenance('{recon-pay}', batch_size => 0);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM callback_center.schedule_maintenance('{recon-pay}');
\echo :LAST_ERROR_SQLSTATE
SELECT callback_center.unschedule_maintenance();
\echo :LAST_ERROR_SQLSTATE

-- Clean up.
REVOKE USAGE ON SCHEMA callback_center FROM rc_admin;
DROP ROLE rc_admin;
REVOKE USAGE ON SCHEMA callback_center FROM rc_app;
DROP ROLE rc_app;
DELETE FROM callback_center.recon_diffs WHERE channel IN ('recon-pay', 'other-pay');
DELETE FROM callback_center.provider_statement WHERE channel IN ('recon-pay', 'other-pay');
SELECT callback_center.drop_endpoint('rc-sink') > 0 AS dropped;
