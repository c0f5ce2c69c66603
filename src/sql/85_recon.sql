
-- Reconciliation against providers' daily statements (doc/recon.md).

-- A provider's statement for one bill date, loaded with COPY.  status is
-- the provider's word: 'success', 'refund', 'closed' (others are kept and
-- compared as they are).  currency is the ISO 4217 code of amount_cents
-- when the statement says it (NULL: the order's); a success in another
-- currency is never applied (_payment_check).  A refund line
-- names the refund: refund_id is our refund id (the out_refund_no /
-- out_request_no the provider got), provider_txn_id the provider's id of
-- the refund line, amount_cents the refund's amount; it is compared with
-- callback_center.refunds, not with payments.
CREATE TABLE callback_center.provider_statement (
    channel         text NOT NULL,
    bill_date       date NOT NULL,
    provider_txn_id text NOT NULL,
    order_id        text,
    amount_cents    bigint NOT NULL,
    status          text NOT NULL,
    loaded_at       timestamptz NOT NULL DEFAULT now(),
    currency        text,
    refund_id       text,
    PRIMARY KEY (channel, bill_date, provider_txn_id)
);
COMMENT ON TABLE callback_center.provider_statement IS
    'Provider statements, one row per transaction per bill date; load with COPY';
-- A day's refund lines, which reconcile compares apart from its payment
-- lines, and a refund's line on the neighbouring days: found without
-- reading the day's whole statement.
CREATE INDEX provider_statement_refunds
    ON callback_center.provider_statement (channel, bill_date, refund_id)
    WHERE refund_id IS NOT NULL;

-- What reconcile found.  One row per (statement line or local payment,
-- kind); refund_required is money the provider took for an order that could
-- not take it (callback_center.late_payments), for people to refund;
-- resolution says what was done: applied (settled by reconcile),
-- flagged (for people), pending_grace (may be a cross-midnight timing
-- difference; the next run decides), resolved (a person settled a flagged
-- one with resolve_recon_diff; later runs leave it so).  Retention purges
-- only applied and resolved rows: a flagged difference stays until someone
-- has dealt with it, however old.
CREATE TABLE callback_center.recon_diffs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel         text NOT NULL,
    bill_date       date NOT NULL,
    provider_txn_id text NOT NULL,
    order_id        text,
    kind            text NOT NULL CHECK (kind IN ('missing_local', 'missing_provider',
                                                  'amount_mismatch', 'status_mismatch',
                                                  'refund_required')),
    provider_amount bigint,
    local_amount    bigint,
    provider_status text,
    local_status    text,
    resolution      text NOT NULL CHECK (resolution IN ('applied', 'flagged', 'pending_grace',
                                                        'resolved')),
    note            text,
    resolved_by     text,
    resolved_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    checked_at      timestamptz NOT NULL DEFAULT now(),
    -- A difference about a refund: our refund id (local_status is the
    -- refund's status).
    refund_id       text,
    UNIQUE (channel, bill_date, provider_txn_id, kind)
);
COMMENT ON TABLE callback_center.recon_diffs IS
    'Differences between provider statements and local payments, by (channel, bill_date)';

SELECT pg_catalog.pg_extension_config_dump('callback_center.provider_statement', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.recon_diffs', '');
SELECT pg_catalog.pg_extension_config_dump('callback_center.recon_diffs_id_seq', '');

GRANT SELECT ON callback_center.provider_statement, callback_center.recon_diffs
    TO callback_center_admin;
GRANT INSERT, DELETE ON callback_center.provider_statement TO callback_center_admin;

-- Does the provider's statement status agree with our payment status?
CREATE FUNCTION callback_center._recon_status_agrees(provider_status text, local_status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    -- A payment refunded since it was paid still agrees with its success
    -- line: the refunds are lines of their own (refund_id).
    SELECT CASE provider_status
        WHEN 'success' THEN local_status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')
        WHEN 'refund' THEN local_status IN ('REFUNDED', 'PARTIALLY_REFUNDED')
        WHEN 'closed' THEN local_status IN ('CLOSED', 'FAILED')
        ELSE false END
$$;

-- Reconciles one channel's statement for one bill date against local
-- payments in one set-based pass, records every difference in recon_diffs
-- (upsert: a rerun adds nothing twice, and drops differences that are gone
-- unless applied), settles provider-paid / locally-unpaid payments like a
-- callback would, and returns the count of recorded differences per kind
-- for (channel, bill_date).  The bill date's day is midnight to midnight in
-- the session's TimeZone.
CREATE FUNCTION callback_center.reconcile(channel text, bill_date date,
    grace interval DEFAULT '30 minutes')
RETURNS TABLE (kind text, count bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    day_start timestamptz;
    day_end timestamptz;
    run_at timestamptz := clock_timestamp();
    r record;
    applied_ids bigint[];
    refund_ids bigint[];
    -- The pairs of statement line (s_) and local payment (l_) that may differ.
    s_txns text[];
    s_orders text[];
    s_amounts bigint[];
    s_statuses text[];
    l_txns text[];
    l_orders text[];
    l_amounts bigint[];
    l_statuses text[];
    l_paid_ats timestamptz[];
    settled boolean;
    o callback_center.orders;
    pay callback_center.payments;
    outcome text;
BEGIN
    PERFORM callback_center._require_key(reconcile.channel, 'channel', 63);
    PERFORM callback_center._require(reconcile.bill_date, 'bill_date');
    PERFORM callback_center._require(reconcile.grace, 'grace');
    IF reconcile.grace < interval '0' OR reconcile.grace >= interval '12 hours' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('grace must be between 0 and 12 hours, got %s', reconcile.grace);
    END IF;
    day_start := reconcile.bill_date::timestamptz;
    day_end := (reconcile.bill_date + 1)::timestamptz;

    -- Serialise runs for one (channel, bill_date).
    PERFORM pg_advisory_xact_lock(hashtextextended(
        'callback_center.recon:' || reconcile.channel || ':' || reconcile.bill_date::text, 0));

    -- One pass: statement lines of the day FULL JOIN local payments of the
    -- provider paid in the day widened by grace at both edges, matched on
    -- the provider's transaction id.  Lines left unmatched look further:
    -- the same transaction id paid on any other day (x: the provider booked
    -- it across midnight from us, or later; compared like a match), or the
    -- unpaid payment of the line's order (u).  Local payments left
    -- unmatched are differences only when paid in the day and not on a
    -- neighbouring day's statement (that day's run compares them); grace is
    -- how long before or after midnight one may still turn up on the
    -- neighbour's statement, so those wait as pending_grace.  Lines already
    -- settled by an earlier run are left alone.
    --
    -- In two statements.  The join keeps every pair that may differ: the
    -- unmatched, and the matched ones that are not the same amount with
    -- the commonest agreeing statuses (success and PAID); the lookups and
    -- the full comparison then run on those few only.  In one statement
    -- the planner charged the two per-line lookups to each of the million
    -- matched lines (a cost 300 times the join's), which bought a JIT
    -- compilation with inlining and optimisation taking longer than the
    -- join itself, and the comparison called _recon_status_agrees a
    -- million times.

    -- Whether an earlier run settled lines of this day (only runs, which
    -- hold the lock, settle them): when none did, the plan leaves out the
    -- anti-join of every line against recon_diffs.
    settled := EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                        WHERE d.channel = reconcile.channel
                          AND d.bill_date = reconcile.bill_date
                          AND d.resolution = 'applied');
    SELECT array_agg(s.provider_txn_id), array_agg(s.order_id), array_agg(s.amount_cents),
           array_agg(s.status), array_agg(l.provider_txn_id), array_agg(l.order_id),
           array_agg(l.amount_cents), array_agg(l.status), array_agg(l.paid_at)
      INTO s_txns, s_orders, s_amounts, s_statuses, l_txns, l_orders, l_amounts, l_statuses,
           l_paid_ats
      FROM (SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status
              FROM callback_center.provider_statement st
             WHERE st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
               AND st.refund_id IS NULL
               AND (NOT settled
                    OR NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                                    WHERE d.channel = reconcile.channel
                                      AND d.bill_date = reconcile.bill_date
                                      AND d.provider_txn_id = st.provider_txn_id
                                      AND d.resolution = 'applied'))) s
      FULL JOIN
           (SELECT p.order_id, p.provider_txn_id, p.amount_cents, p.status, p.paid_at
              FROM callback_center.payments p
             WHERE p.provider = reconcile.channel
               AND p.paid_at >= day_start - reconcile.grace
               AND p.paid_at < day_end + reconcile.grace
               AND p.provider_txn_id IS NOT NULL) l
        ON l.provider_txn_id = s.provider_txn_id
     WHERE s.provider_txn_id IS NULL OR l.provider_txn_id IS NULL
        OR s.amount_cents <> l.amount_cents OR s.status <> 'success' OR l.status <> 'PAID';

    WITH j AS (
        SELECT *
          FROM unnest(s_txns, s_orders, s_amounts, s_statuses, l_txns, l_orders, l_amounts,
                      l_statuses, l_paid_ats)
               AS j(s_txn, s_order, s_amount, s_status, l_txn, l_order, l_amount, l_status,
                    l_paid_at)
    ), c AS (
        SELECT coalesce(j.s_txn, j.l_txn) AS txn,
               coalesce(j.s_order, j.l_order, x.order_id, u.order_id) AS order_id,
               j.s_amount, j.s_status,
               coalesce(j.l_amount, x.amount_cents, u.amount_cents) AS local_amount,
               coalesce(j.l_status, x.status, u.status) AS local_status,
               CASE
                 WHEN j.s_txn IS NOT NULL AND j.l_txn IS NOT NULL THEN
                   CASE WHEN j.s_amount <> j.l_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, j.l_status)
                             THEN 'status_mismatch' END
                 WHEN j.l_txn IS NOT NULL THEN
                   -- Local only; rows in the grace margins, and rows on a
                   -- neighbouring day's statement, are that day's to judge.
                   CASE WHEN j.l_paid_at >= day_start AND j.l_paid_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = reconcile.channel
                                    AND n.bill_date IN (reconcile.bill_date - 1,
                                                        reconcile.bill_date + 1)
                                    AND n.provider_txn_id = j.l_txn)
                        THEN 'missing_provider' END
                 WHEN x.payment_id IS NOT NULL THEN
                   CASE WHEN x.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, x.status)
                             THEN 'status_mismatch' END
                 WHEN u.payment_id IS NOT NULL THEN
                   CASE WHEN u.amount_cents <> j.s_amount THEN 'amount_mismatch'
                        WHEN NOT callback_center._recon_status_agrees(j.s_status, u.status)
                             THEN 'status_mismatch' END
                 ELSE 'missing_local'
               END AS kind,
               CASE
                 WHEN j.l_txn IS NOT NULL AND j.s_txn IS NULL THEN
                   CASE WHEN j.l_paid_at < day_start + reconcile.grace
                          OR j.l_paid_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN u.payment_id IS NOT NULL AND j.s_status = 'success'
                      AND u.amount_cents = j.s_amount
                      AND u.status IN ('CREATED', 'PAYING', 'CLOSED', 'FAILED') THEN 'applied'
                 ELSE 'flagged'
               END AS resolution,
               u.payment_id AS apply_payment_id
          -- Index probes for the unmatched lines only (LIMIT 1 keeps
          -- them per-row lookups, not hash joins over every payment).
          FROM j
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND p.provider_txn_id = j.s_txn
                   AND p.provider = reconcile.channel
                 LIMIT 1) x ON true
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.payments p
                 WHERE j.l_txn IS NULL AND x.payment_id IS NULL
                   AND p.order_id = j.s_order AND p.provider_txn_id IS NULL
                   AND p.provider = reconcile.channel
                 LIMIT 1) u ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at)
        SELECT reconcile.channel, reconcile.bill_date, c.txn, c.order_id,
               -- Known late money is a refund for people, whatever else
               -- differs; once refunded, the provider's refund agrees.
               CASE WHEN lp.status = 'refund_required' AND c.resolution <> 'applied'
                    THEN 'refund_required' ELSE c.kind END,
               c.s_amount, c.local_amount, c.s_status, c.local_status,
               CASE WHEN lp.status = 'refund_required' AND c.resolution = 'pending_grace'
                    THEN 'flagged' ELSE c.resolution END,
               run_at
          FROM c
          LEFT JOIN LATERAL (
                SELECT l.status FROM callback_center.late_payments l
                 WHERE l.provider = reconcile.channel AND l.provider_txn_id = c.txn) lp ON true
         WHERE c.kind IS NOT NULL
           AND NOT (lp.status IS NOT DISTINCT FROM 'refunded' AND c.s_status = 'refund')
        ON CONFLICT ON CONSTRAINT recon_diffs_channel_bill_date_provider_txn_id_kind_key DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.provider_txn_id, d.order_id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO applied_ids
      FROM ins;

    -- Refunds: statement refund lines of the day FULL JOIN local refunds of
    -- the provider that succeeded in the day widened by grace, matched on
    -- our refund id.  A line left unmatched looks for its refund on any
    -- day (x): missing there is missing_local; open (PENDING, PROCESSING)
    -- is status_mismatch, settled here (applied: the provider's statement
    -- says it refunded, _apply_refund_answer below); failed is
    -- status_mismatch for people.  A local refund left unmatched is
    -- missing_provider when it succeeded in the day and no statement of
    -- the day (a line settled by an earlier run is left out of s) or a
    -- neighbouring day has it (pending_grace in the margins).  provider_txn_id is
    -- the line's, else our refund id (unique; a provider's refund id need
    -- not be: Alipay's answers name the trade).
    WITH s AS (
        SELECT st.provider_txn_id, st.order_id, st.amount_cents, st.status, st.refund_id
          FROM callback_center.provider_statement st
         WHERE st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
           AND st.refund_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM callback_center.recon_diffs d
                            WHERE d.channel = reconcile.channel
                              AND d.bill_date = reconcile.bill_date
                              AND d.provider_txn_id = st.provider_txn_id
                              AND d.resolution = 'applied')
    ), l AS (
        SELECT rf.refund_id, rf.order_id, rf.amount_cents, rf.status, rf.finished_at,
               rf.provider_txn_id, rf.refund_id AS txn
          FROM callback_center.refunds rf
         WHERE rf.provider = reconcile.channel AND rf.status = 'SUCCESS'
           AND rf.finished_at >= day_start - reconcile.grace
           AND rf.finished_at < day_end + reconcile.grace
    ), c AS (
        SELECT coalesce(s.provider_txn_id, l.txn) AS txn,
               coalesce(s.refund_id, l.refund_id) AS refund_id,
               coalesce(s.order_id, l.order_id, x.order_id) AS order_id,
               s.amount_cents AS s_amount, s.status AS s_status,
               coalesce(l.amount_cents, x.amount_cents) AS local_amount,
               coalesce(l.status, x.status) AS local_status,
               CASE
                 WHEN s.refund_id IS NOT NULL AND l.refund_id IS NOT NULL THEN
                   CASE WHEN s.amount_cents <> l.amount_cents THEN 'amount_mismatch' END
                 WHEN l.refund_id IS NOT NULL THEN
                   -- A statement that lists refunds by the refunded
                   -- transaction (status refund, no refund_id) has it too.
                   CASE WHEN l.finished_at >= day_start AND l.finished_at < day_end
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = reconcile.channel
                                    AND n.bill_date BETWEEN reconcile.bill_date - 1
                                                        AND reconcile.bill_date + 1
                                    AND n.refund_id = l.refund_id)
                             AND NOT EXISTS (
                                 SELECT 1 FROM callback_center.provider_statement n
                                  WHERE n.channel = reconcile.channel
                                    AND n.bill_date BETWEEN reconcile.bill_date - 1
                                                        AND reconcile.bill_date + 1
                                    AND n.refund_id IS NULL AND n.status = 'refund'
                                    AND n.provider_txn_id = l.provider_txn_id)
                        THEN 'missing_provider' END
                 WHEN x.refund_id IS NULL THEN 'missing_local'
                 WHEN x.amount_cents <> s.amount_cents THEN 'amount_mismatch'
                 WHEN x.status <> 'SUCCESS' THEN 'status_mismatch'
               END AS kind,
               CASE
                 WHEN l.refund_id IS NOT NULL AND s.refund_id IS NULL THEN
                   CASE WHEN l.finished_at < day_start + reconcile.grace
                          OR l.finished_at >= day_end - reconcile.grace
                        THEN 'pending_grace' ELSE 'flagged' END
                 WHEN x.status IN ('PENDING', 'PROCESSING') AND x.amount_cents = s.amount_cents
                      THEN 'applied'
                 ELSE 'flagged'
               END AS resolution
          FROM s FULL JOIN l ON l.refund_id = s.refund_id
          LEFT JOIN LATERAL (
                SELECT * FROM callback_center.refunds rf
                 WHERE l.refund_id IS NULL AND rf.refund_id = s.refund_id
                   AND rf.provider = reconcile.channel) x ON true
    ), ins AS (
        INSERT INTO callback_center.recon_diffs AS d
               (channel, bill_date, provider_txn_id, order_id, kind, provider_amount,
                local_amount, provider_status, local_status, resolution, checked_at, refund_id)
        SELECT reconcile.channel, reconcile.bill_date, c.txn, c.order_id, c.kind, c.s_amount,
               c.local_amount, c.s_status, c.local_status, c.resolution, run_at, c.refund_id
          FROM c
         WHERE c.kind IS NOT NULL
        ON CONFLICT ON CONSTRAINT recon_diffs_channel_bill_date_provider_txn_id_kind_key DO UPDATE
           SET order_id = excluded.order_id, provider_amount = excluded.provider_amount,
               local_amount = excluded.local_amount, provider_status = excluded.provider_status,
               local_status = excluded.local_status, resolution = excluded.resolution,
               checked_at = excluded.checked_at, refund_id = excluded.refund_id
         WHERE d.resolution NOT IN ('applied', 'resolved')
        RETURNING d.id, d.resolution
    )
    SELECT array_agg(ins.id) FILTER (WHERE ins.resolution = 'applied')
      INTO refund_ids
      FROM ins;

    -- Differences an earlier run recorded that this run no longer finds.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = reconcile.channel AND d.bill_date = reconcile.bill_date
       AND d.resolution NOT IN ('applied', 'resolved') AND d.checked_at <> run_at;

    -- Local payments a neighbouring day's run left waiting for a
    -- statement line that turned up on this day's statement: compared
    -- above, so no longer differences of that day.
    DELETE FROM callback_center.recon_diffs d
     WHERE d.channel = reconcile.channel
       AND d.bill_date IN (reconcile.bill_date - 1, reconcile.bill_date + 1)
       AND d.kind = 'missing_provider' AND d.resolution = 'pending_grace'
       AND EXISTS (SELECT 1 FROM callback_center.provider_statement st
                    WHERE st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
                      AND (st.provider_txn_id = d.provider_txn_id
                           OR st.refund_id = d.refund_id));

    -- Settle open refunds the provider's statement says it refunded,
    -- through the one owner of refund status changes.
    FOR r IN
        SELECT d.id, d.refund_id, d.provider_txn_id, d.provider_amount
          FROM callback_center.recon_diffs d
         WHERE d.id = ANY (coalesce(refund_ids, '{}'))
         ORDER BY d.id
    LOOP
        outcome := callback_center._apply_refund_answer(r.refund_id,
            jsonb_build_object('status', 'success', 'provider_refund_id', r.provider_txn_id,
                               'amount_cents', r.provider_amount));
        UPDATE callback_center.recon_diffs d
           SET resolution = CASE outcome WHEN 'succeeded' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome WHEN 'succeeded' THEN 'refund marked succeeded'
                               ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    -- Settle what the provider was paid for and we were not told, through
    -- the same path as a callback (state machines, follow-up events; on an
    -- order that can no longer take the money, a late payment to refund).
    FOR r IN
        SELECT d.id, d.provider_txn_id, d.order_id, d.provider_amount, st.currency
          FROM callback_center.recon_diffs d
          LEFT JOIN callback_center.provider_statement st
                 ON st.channel = reconcile.channel AND st.bill_date = reconcile.bill_date
                AND st.provider_txn_id = d.provider_txn_id
         WHERE d.id = ANY (coalesce(applied_ids, '{}'))
         ORDER BY d.id
    LOOP
        SELECT * INTO o FROM callback_center.orders x WHERE x.order_id = r.order_id FOR UPDATE;
        SELECT * INTO pay FROM callback_center.payments x WHERE x.order_id = r.order_id FOR UPDATE;
        IF pay.provider_txn_id IS NOT NULL THEN
            -- A callback got there first, after the pass read the row.
            UPDATE callback_center.recon_diffs d
               SET resolution = 'flagged',
                   note = format('payment took transaction %s meanwhile', pay.provider_txn_id)
             WHERE d.id = r.id;
            CONTINUE;
        END IF;
        outcome := callback_center._apply_payment_result(reconcile.channel, r.provider_txn_id,
                                                         r.order_id, r.provider_amount, r.currency,
                                                         'success', 'reconciliation');
        UPDATE callback_center.recon_diffs d
           SET kind = CASE outcome WHEN 'refund_required' THEN 'refund_required' ELSE d.kind END,
               resolution = CASE outcome WHEN 'paid' THEN d.resolution ELSE 'flagged' END,
               note = CASE outcome
                        WHEN 'paid' THEN 'payment marked paid'
                        WHEN 'refund_required'
                          THEN format('order is %s/%s: payment.refund_required emitted',
                                      o.status, o.pay_status)
                        ELSE format('not applied: %s', outcome) END
         WHERE d.id = r.id;
    END LOOP;

    RETURN QUERY
        SELECT k.kind, count(d.id)
          FROM unnest(ARRAY['missing_local', 'missing_provider', 'amount_mismatch',
                            'status_mismatch', 'refund_required']) WITH ORDINALITY AS k(kind, ord)
          LEFT JOIN callback_center.recon_diffs d
                 ON d.channel = reconcile.channel AND d.bill_date = reconcile.bill_date
                AND d.kind = k.kind
         GROUP BY k.kind, k.ord
         ORDER BY k.ord;
END
$$;

-- A person settles a flagged difference (refunded by hand, booked in the
-- ERP, written off): resolution becomes resolved, with who, when and why.
-- Later runs of reconcile leave it resolved, and retention may then purge
-- it.  Returns false when it was already resolved (a repeat changes
-- nothing).  22004 for NULLs, P0002 for an unknown id, 22023 for a
-- difference that is not flagged (applied ones are settled already;
-- pending_grace ones are still the next run's to judge).
CREATE FUNCTION callback_center.resolve_recon_diff(diff_id bigint, note text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    d callback_center.recon_diffs;
BEGIN
    PERFORM callback_center._require(diff_id, 'diff_id');
    PERFORM callback_center._require(resolve_recon_diff.note, 'note');
    SELECT * INTO d FROM callback_center.recon_diffs x WHERE x.id = diff_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002',
            MESSAGE = format('no reconciliation difference %s', diff_id);
    END IF;
    IF d.resolution = 'resolved' THEN
        RETURN false;
    END IF;
    IF d.resolution <> 'flagged' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('reconciliation difference %s is %s, not flagged', diff_id, d.resolution),
            DETAIL = 'Only flagged differences are waiting for a person.';
    END IF;
    UPDATE callback_center.recon_diffs x
       SET resolution = 'resolved',
           note = CASE WHEN x.note IS NULL THEN resolve_recon_diff.note
                       ELSE x.note || '; ' || resolve_recon_diff.note END,
           resolved_by = session_user, resolved_at = now()
     WHERE x.id = diff_id;
    RETURN true;
END
$$;

REVOKE ALL ON FUNCTION callback_center._recon_status_agrees(text, text),
    callback_center.reconcile(text, date, interval),
    callback_center.resolve_recon_diff(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.reconcile(text, date, interval),
    callback_center.resolve_recon_diff(bigint, text)
    TO callback_center_admin;
