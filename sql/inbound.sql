SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Runs a statement; prints its single value, or SQLSTATE: message / detail.
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text;
    st text;
    msg text;
    det text;
BEGIN
    EXECUTE q INTO r;
    RETURN coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL;
    RETURN st || ': ' || msg || coalesce(' / ' || nullif(det, ''), '');
END
$$;

-- The stored row, without ids and times.
CREATE FUNCTION pg_temp.row_of(b text, t text)
RETURNS TABLE (status smallint, retry_count integer, result jsonb,
               hash_ok boolean, completed boolean)
LANGUAGE sql AS $$
    SELECT c.status, c.retry_count, c.result,
           c.payload_hash = sha256(convert_to(c.payload, 'UTF8')),
           c.completed_at IS NOT NULL
      FROM callback_center.callback_record c
     WHERE c.biz_id = b AND c.callback_type = t
$$;

-- First delivery: the caller processes it.
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-1', 'pay', '{"amount": 10}');
-- A repeat while it is processing: not processed again, "in progress".
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-1', 'pay', '{"amount": 10}');
-- A repeat with another body: flagged, not processed, recorded as conflict.
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-1', 'pay', '{"amount": 11}');
SELECT payload, payload_hash = sha256('{"amount": 11}'::bytea) AS hash_ok
  FROM callback_center.callback_conflicts WHERE biz_id = 'cbt-1';
-- The same biz_id with another type is another callback.
SELECT is_first, status FROM callback_center.record_callback('cbt-1', 'refund', '{"amount": 10}');
-- callback_id is the row's id.
SELECT r.callback_id = (callback_center.get_callback('cbt-1', 'pay')).id AS same_id
  FROM callback_center.record_callback('cbt-1', 'pay', '{"amount": 10}') AS r;

-- Completion.
SELECT callback_center.complete_callback('cbt-1', 'pay', true, '{"order": "paid"}');
SELECT * FROM pg_temp.row_of('cbt-1', 'pay');
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-1', 'pay', '{"amount": 10}');
-- Completing again with the same outcome returns it; the first result stays.
SELECT callback_center.complete_callback('cbt-1', 'pay', true, '{"order": "other"}');
SELECT result FROM pg_temp.row_of('cbt-1', 'pay');
-- The other outcome is refused.
SELECT pg_temp.try($q$SELECT callback_center.complete_callback('cbt-1', 'pay', false, NULL)$q$)
       AS complete_other_outcome;
-- A mismatching repeat of a completed callback returns the stored outcome.
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-1', 'pay', '{"amount": 12}');
SELECT count(*) AS conflicts FROM callback_center.callback_conflicts WHERE biz_id = 'cbt-1';

-- A failed callback repeated by its provider is processed again, up to
-- callback_center.callback_max_retries times.
SET callback_center.callback_max_retries = 2;
SELECT is_first FROM callback_center.record_callback('cbt-2', 'pay', 'body-2');
SELECT callback_center.complete_callback('cbt-2', 'pay', false, '{"error": "timeout"}');
SELECT * FROM pg_temp.row_of('cbt-2', 'pay');
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-2', 'pay', 'body-2');
SELECT * FROM pg_temp.row_of('cbt-2', 'pay');
-- While the retry runs, repeats answer "in progress".
SELECT is_first, status FROM callback_center.record_callback('cbt-2', 'pay', 'body-2');
SELECT callback_center.complete_callback('cbt-2', 'pay', false, '{"error": "again"}');
-- A different body never retries, even a failed callback.
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-2', 'pay', 'body-2-changed');
SELECT is_first, status FROM callback_center.record_callback('cbt-2', 'pay', 'body-2');
SELECT callback_center.complete_callback('cbt-2', 'pay', false, '{"error": "third"}');
SELECT * FROM pg_temp.row_of('cbt-2', 'pay');
-- Out of retries: the failure is the answer.
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-2', 'pay', 'body-2');
SELECT * FROM pg_temp.row_of('cbt-2', 'pay');
-- Raising the limit allows another retry; a retry may succeed.
SET callback_center.callback_max_retries = 3;
SELECT is_first, status FROM callback_center.record_callback('cbt-2', 'pay', 'body-2');
SELECT callback_center.complete_callback('cbt-2', 'pay', true, '{"ok": true}');
SELECT * FROM pg_temp.row_of('cbt-2', 'pay');
-- No retries at all.
SET callback_center.callback_max_retries = 0;
SELECT is_first FROM callback_center.record_callback('cbt-3', 'pay', 'body-3');
SELECT callback_center.complete_callback('cbt-3', 'pay', false, NULL);
SELECT is_first, status FROM callback_center.record_callback('cbt-3', 'pay', 'body-3');
RESET callback_center.callback_max_retries;
SHOW callback_center.callback_max_retries;

-- A row left pending (status 0, written by other means) is claimed by the
-- next matching delivery, without counting a retry.
INSERT INTO callback_center.callback_record (biz_id, callback_type, status, payload, payload_hash)
VALUES ('cbt-4', 'pay', 0, 'body-4', sha256('body-4'::bytea));
SELECT is_first, status FROM callback_center.record_callback('cbt-4', 'pay', 'body-4');
SELECT * FROM pg_temp.row_of('cbt-4', 'pay');

-- A callback left processing by a handler that died after committing the
-- record: reclaim_stale_callbacks marks it failed, so the provider's next
-- delivery processes it again (a counted retry, bounded by
-- callback_max_retries).  Recent processing rows and completed rows are
-- left alone.
SELECT is_first FROM callback_center.record_callback('cbt-10', 'pay', 'body-10');
SELECT is_first FROM callback_center.record_callback('cbt-11', 'pay', 'body-11');
SELECT is_first FROM callback_center.record_callback('cbt-12', 'pay', 'body-12');
SELECT callback_center.complete_callback('cbt-12', 'pay', true, '{"ok": true}');
UPDATE callback_center.callback_record SET updated_at = now() - interval '1 hour'
 WHERE biz_id IN ('cbt-10', 'cbt-12');
SELECT is_first, status FROM callback_center.record_callback('cbt-10', 'pay', 'body-10') AS stuck;
SELECT callback_center.reclaim_stale_callbacks(interval '10 minutes') AS reclaimed;
SELECT * FROM pg_temp.row_of('cbt-10', 'pay');
SELECT status FROM pg_temp.row_of('cbt-11', 'pay') AS recent;
SELECT status, result FROM pg_temp.row_of('cbt-12', 'pay') AS completed;
SELECT callback_center.reclaim_stale_callbacks(interval '10 minutes') AS reclaimed_again;
SET callback_center.callback_max_retries = 1;
SELECT is_first, status, result, payload_mismatch
  FROM callback_center.record_callback('cbt-10', 'pay', 'body-10') AS redelivered;
SELECT * FROM pg_temp.row_of('cbt-10', 'pay');
-- The retry dies too: reclaimed again, and now out of retries.
UPDATE callback_center.callback_record SET updated_at = now() - interval '1 hour'
 WHERE biz_id = 'cbt-10';
SELECT callback_center.reclaim_stale_callbacks(interval '10 minutes') AS reclaimed;
SELECT is_first, status, result->>'error' AS error
  FROM callback_center.record_callback('cbt-10', 'pay', 'body-10') AS out_of_retries;
SELECT * FROM pg_temp.row_of('cbt-10', 'pay');
RESET callback_center.callback_max_retries;
-- A handler that was only slow finds its callback failed and cannot
-- complete it as succeeded.
SELECT pg_temp.try($q$SELECT callback_center.complete_callback('cbt-10', 'pay', true, NULL)$q$)
       AS late_handler;
-- Zero reclaims every processing row; bad arguments.
SELECT callback_center.reclaim_stale_callbacks(interval '0') AS reclaim_all;
SELECT status FROM pg_temp.row_of('cbt-11', 'pay');
SELECT pg_temp.try($q$SELECT callback_center.reclaim_stale_callbacks(NULL)$q$) AS reclaim_null;
SELECT pg_temp.try($q$SELECT callback_center.reclaim_stale_callbacks(interval '-1 second')$q$)
       AS reclaim_negative;

-- A rolled-back first call leaves nothing: the next call is first again.
BEGIN;
SELECT is_first FROM callback_center.record_callback('cbt-5', 'pay', 'body-5');
ROLLBACK;
SELECT is_first FROM callback_center.record_callback('cbt-5', 'pay', 'body-5');

-- Empty bodies are bodies.
SELECT is_first FROM callback_center.record_callback('cbt-6', 'pay', '');
SELECT is_first, payload_mismatch FROM callback_center.record_callback('cbt-6', 'pay', '');

-- Called in the select list too.
SELECT (callback_center.record_callback('cbt-9', 'pay', 'body-9')).is_first;
SELECT (callback_center.record_callback('cbt-9', 'pay', 'body-9')).is_first;

-- Errors.
SELECT pg_temp.try($q$SELECT is_first FROM callback_center.record_callback(NULL, 'pay', 'b')$q$) AS null_biz_id;
SELECT pg_temp.try($q$SELECT is_first FROM callback_center.record_callback('cbt-7', NULL, 'b')$q$) AS null_type;
SELECT pg_temp.try($q$SELECT is_first FROM callback_center.record_callback('cbt-7', 'pay', NULL)$q$) AS null_payload;
SELECT pg_temp.try($q$SELECT is_first FROM callback_center.record_callback('', 'pay', 'b')$q$) AS empty_biz_id;
SELECT pg_temp.try($q$SELECT callback_center.complete_callback('cbt-none', 'pay', true, NULL)$q$) AS complete_unknown;
SELECT pg_temp.try($q$SELECT callback_center.complete_callback('cbt-1', 'pay', NULL, NULL)$q$) AS complete_null;
SELECT pg_temp.try($q$SELECT (callback_center.get_callback('cbt-none', 'pay')).status$q$) AS get_unknown;
SELECT pg_temp.try($q$SELECT (callback_center.get_callback(NULL, 'pay')).status$q$) AS get_null;
SELECT pg_temp.try($q$SELECT (callback_center.get_callback('cbt-1', NULL)).status$q$) AS get_null_type;
SELECT count(*) AS cbt_7_rows FROM callback_center.callback_record WHERE biz_id = 'cbt-7';

-- The application role uses the functions but not the tables.
-- Members of the group roles may use this database.
GRANT USAGE ON SCHEMA callback_center TO callback_center_app, callback_center_admin;
SET ROLE callback_center_app;
SELECT is_first, status FROM callback_center.record_callback('cbt-8', 'pay', 'body-8');
SELECT callback_center.complete_callback('cbt-8', 'pay', true, '{}');
SELECT (callback_center.get_callback('cbt-8', 'pay')).status;
SELECT pg_temp.try($q$SELECT count(*) FROM callback_center.callback_record$q$) AS app_reads_table;
SELECT pg_temp.try($q$SELECT count(*) FROM callback_center.callback_conflicts$q$) AS app_reads_conflicts;
SELECT pg_temp.try($q$SELECT callback_center.reclaim_stale_callbacks(interval '1 hour')$q$) AS app_reclaims;
RESET ROLE;

-- Settings are superuser-only.
SET ROLE callback_center_app;
SELECT pg_temp.try($q$SET callback_center.callback_max_retries = 100$q$) AS app_sets_retries;
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM callback_center_app, callback_center_admin;

-- pg_dump keeps the rows (and the identity sequences' positions).
SELECT c::regclass AS dumped
  FROM pg_extension, unnest(extconfig) AS c
 WHERE extname = 'callback_center'
   AND c::regclass::text IN ('callback_center.callback_record', 'callback_center.callback_record_id_seq',
                             'callback_center.callback_conflicts', 'callback_center.callback_conflicts_id_seq',
                             'callback_center.providers')
 ORDER BY c::regclass::text;

DELETE FROM callback_center.callback_conflicts WHERE biz_id LIKE 'cbt-%';
DELETE FROM callback_center.callback_record WHERE biz_id LIKE 'cbt-%';

-- Leave the database as found (sql/install.sql expects no extension).
SET client_min_messages = warning;
DROP EXTENSION callback_center;
DROP EXTENSION IF EXISTS pgcrypto;
RESET client_min_messages;
