
-- Retention (doc/retention.md): purge() and purge_in_batches() delete, in
-- bounded batches, what is old and no longer needed in the tables of every
-- area (outbox, delivery attempts, providers' answers, state history,
-- callback records, reconciliation differences).

-- What retention deletes, per relation, in order: delivered outbox rows,
-- delivery attempts (when that table exists), providers' answers applied
-- before the cutoff (the outcome of an attempt, so on the attempts' age;
-- an answer not yet applied is never touched), state history, succeeded
-- callback records and settled (applied or resolved) reconciliation
-- differences older than the cutoff ($1).  Pending, delivering and dead
-- outbox rows (dead ones stay for replay), pending, processing and failed
-- callback records, and flagged or pending_grace differences are never
-- touched.  age says which of purge's ages applies: attempts, history, or
-- events (older_than).  key is the bigint primary key the batches walk.
CREATE FUNCTION callback_center._purge_targets()
RETURNS TABLE (rel text, cond text, age text, key text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT v.rel, v.cond, v.age, v.key
      FROM (VALUES
        (1, 'callback_center.outbox', 'status = ''delivered'' AND delivered_at < $1', 'events', 'id'),
        (2, 'callback_center.delivery_attempts', 'attempted_at < $1', 'attempts', 'id'),
        (3, 'callback_center.provider_answers', 'applied_at < $1', 'attempts', 'outbox_id'),
        (4, 'callback_center.state_history', 'at < $1', 'history', 'id'),
        (5, 'callback_center.callback_record', 'status = 2 AND completed_at < $1', 'events', 'id'),
        (6, 'callback_center.recon_diffs',
         'resolution IN (''applied'', ''resolved'') AND created_at < $1', 'events', 'id'))
           AS v(ord, rel, cond, age, key)
     WHERE to_regclass(v.rel) IS NOT NULL
     ORDER BY v.ord
$$;

-- Deletes one batch of at most batch_size rows of one retention target
-- (see _purge_targets) older than cutoff with a key (its id, or outbox_id)
-- above after_id, rows locked by others skipped.  Returns how many it
-- deleted and the highest key it passed (the next batch's after_id).  22023 for a relation that is not
-- a retention target.
CREATE FUNCTION callback_center._purge_batch(rel text, cutoff timestamptz, after_id bigint,
    batch_size integer, OUT purged bigint, OUT last_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    condition text;
    k text;
BEGIN
    SELECT t.cond, t.key INTO condition, k FROM callback_center._purge_targets() t
     WHERE t.rel = _purge_batch.rel;
    IF condition IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('"%s" is not a retention target', _purge_batch.rel);
    END IF;
    -- Walk the primary key upwards: old rows have low ids, and no batch
    -- rescans what an earlier one passed.  b is MATERIALIZED: evaluated
    -- once whatever the plan, so that the rows counted, the rows deleted
    -- and the batch's last id are the same LIMIT ... SKIP LOCKED pick (a
    -- sub-select run again per row of a join would pick more rows).
    EXECUTE format(
        'WITH b AS MATERIALIZED (SELECT %1$I AS id FROM %2$s WHERE %1$I > $2 AND %3$s'
        ' ORDER BY %1$I LIMIT $3 FOR UPDATE SKIP LOCKED),'
        ' d AS (DELETE FROM %2$s WHERE %1$I IN (SELECT id FROM b) RETURNING 1)'
        ' SELECT (SELECT count(*) FROM b), (SELECT max(id) FROM b)'
        ' FROM (SELECT count(*) FROM d) AS x',
        k, _purge_batch.rel, condition)
        INTO purged, last_id USING cutoff, after_id, batch_size;
END
$$;

-- Checks purge's arguments; raises 22004 or 22023.  The per-relation ages
-- may be NULL (the same as older_than).
CREATE FUNCTION callback_center._purge_check(older_than interval, batch_size integer,
    attempts_older_than interval, history_older_than interval)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    PERFORM callback_center._require(num_nulls(older_than, batch_size) = 0 OR NULL,
                                     'older_than and batch_size');
    IF older_than < interval '0' OR attempts_older_than < interval '0'
       OR history_older_than < interval '0' OR older_than > interval '100 years'
       OR attempts_older_than > interval '100 years' OR history_older_than > interval '100 years' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('retention ages must be between 0 and 100 years, got %s, %s and %s',
                             older_than, coalesce(attempts_older_than::text, 'NULL'),
                             coalesce(history_older_than::text, 'NULL'));
    END IF;
    IF batch_size < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('batch_size must be positive, got %s', batch_size);
    END IF;
END
$$;

-- The retention targets with the cutoff of each: now() less its age.
CREATE FUNCTION callback_center._purge_plan(older_than interval,
    attempts_older_than interval, history_older_than interval)
RETURNS TABLE (rel text, cutoff timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT t.rel,
           now() - CASE t.age
                     WHEN 'attempts' THEN coalesce(attempts_older_than, older_than)
                     WHEN 'history' THEN coalesce(history_older_than, older_than)
                     ELSE older_than END
      FROM callback_center._purge_targets() t
$$;

-- Deletes, in batches of at most batch_size rows, what is older than its
-- age and no longer needed (see _purge_targets), all in the caller's
-- transaction: delivered events, callback records and reconciliation
-- differences older than older_than, delivery attempts and applied
-- providers' answers older than attempts_older_than and state history
-- older than history_older_than (each NULL: older_than).  Rows locked by others are skipped, never
-- waited for.  Returns the rows deleted and the batches run per relation.
-- purge_in_batches does the same, committing after every batch.
CREATE FUNCTION callback_center.purge(older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 10000, attempts_older_than interval DEFAULT NULL,
    history_older_than interval DEFAULT NULL)
RETURNS TABLE (relation text, purged bigint, batches integer)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    t record;
    b record;
    last_id bigint;
BEGIN
    PERFORM callback_center._purge_check(older_than, batch_size, attempts_older_than,
                                         history_older_than);
    FOR t IN SELECT * FROM callback_center._purge_plan(older_than, attempts_older_than,
                                                       history_older_than) LOOP
        relation := t.rel;
        purged := 0;
        batches := 0;
        last_id := 0;
        LOOP
            b := callback_center._purge_batch(t.rel, t.cutoff, last_id, batch_size);
            purged := purged + b.purged;
            batches := batches + 1;
            last_id := b.last_id;
            EXIT WHEN b.purged < batch_size;
        END LOOP;
        RETURN NEXT;
    END LOOP;
END
$$;

-- purge() as a procedure that commits after every batch, so a large purge
-- holds no long transaction (no bloat held back, no locks kept) and what
-- it deleted stays deleted if it is interrupted.  Must be CALLed outside a
-- transaction block (2D000 inside one).  Not SECURITY DEFINER (a procedure
-- that commits cannot be): it runs the batches through _purge_batch, which
-- is.  purged returns the total number of rows deleted.  The pg_cron
-- retention job (schedule_maintenance) calls this.
CREATE PROCEDURE callback_center.purge_in_batches(older_than interval DEFAULT '7 days',
    batch_size integer DEFAULT 10000, attempts_older_than interval DEFAULT NULL,
    history_older_than interval DEFAULT NULL, INOUT purged bigint DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    plan record;
    targets text[];
    cutoffs timestamptz[];
    i integer;
    b record;
    last_id bigint;
BEGIN
    PERFORM callback_center._purge_check(older_than, batch_size, attempts_older_than,
                                         history_older_than);
    -- Cutoffs fixed once, at the start: later batches do not chase now().
    SELECT pg_catalog.array_agg(p.rel), pg_catalog.array_agg(p.cutoff) INTO targets, cutoffs
      FROM callback_center._purge_plan(older_than, attempts_older_than, history_older_than) p;
    purged := 0;
    FOR i IN 1 .. coalesce(pg_catalog.cardinality(targets), 0) LOOP
        last_id := 0;
        LOOP
            b := callback_center._purge_batch(targets[i], cutoffs[i], last_id, batch_size);
            purged := purged + b.purged;
            last_id := b.last_id;
            COMMIT;
            EXIT WHEN b.purged < batch_size;
        END LOOP;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION callback_center._purge_targets(),
    callback_center._purge_batch(text, timestamptz, bigint, integer),
    callback_center._purge_check(interval, integer, interval, interval),
    callback_center._purge_plan(interval, interval, interval),
    callback_center.purge(interval, integer, interval, interval) FROM PUBLIC;
REVOKE ALL ON PROCEDURE callback_center.purge_in_batches(interval, integer, interval, interval, bigint)
    FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE callback_center.purge_in_batches(interval, integer, interval, interval, bigint)
    TO callback_center_admin;
GRANT EXECUTE ON FUNCTION callback_center._purge_targets(),
    callback_center._purge_batch(text, timestamptz, bigint, integer),
    callback_center._purge_check(interval, integer, interval, interval),
    callback_center._purge_plan(interval, interval, interval),
    callback_center.purge(interval, integer, interval, interval)
    TO callback_center_admin;
