
-- Scheduling (doc/schedule.md): the maintenance jobs, retention and
-- reconciliation, run by pg_cron when it is installed in this database.

-- Schedules the maintenance jobs with pg_cron (when it is installed in this
-- database): callback_center_retention CALLing purge_in_batches() with the
-- given ages and batch size on retention_cron, and
-- callback_center_recon_<channel> running reconcile() for yesterday on
-- recon_cron for each channel.  Jobs of the same names are replaced and
-- recon jobs of channels no longer listed are removed, so calling it again
-- is safe.  Returns the job ids.
CREATE FUNCTION callback_center.schedule_maintenance(
    reconcile_channels text[] DEFAULT '{}',
    retention_cron text DEFAULT '*/10 * * * *',
    recon_cron text DEFAULT '30 1 * * *',
    older_than interval DEFAULT '7 days',
    attempts_older_than interval DEFAULT NULL,
    history_older_than interval DEFAULT NULL,
    batch_size integer DEFAULT 10000)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ch text;
    jobid bigint;
BEGIN
    PERFORM callback_center._require(reconcile_channels, 'reconcile_channels');
    PERFORM callback_center._require(retention_cron, 'retention_cron');
    PERFORM callback_center._require(recon_cron, 'recon_cron');
    PERFORM callback_center._require(array_position(reconcile_channels, NULL) IS NULL OR NULL,
                                     'a channel');
    PERFORM callback_center._purge_check(older_than, batch_size, attempts_older_than,
                                         history_older_than);
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = 'pg_cron is not installed in this database',
            HINT = 'Install pg_cron: set shared_preload_libraries = ''pg_cron'' and '
                   'cron.database_name to this database, restart, then run CREATE EXTENSION pg_cron.';
    END IF;

    EXECUTE 'SELECT cron.unschedule(jobid) FROM cron.job'
            ' WHERE jobname LIKE ''callback\_center\_recon\_%'' AND jobname <> ALL ($1)'
        USING ARRAY(SELECT 'callback_center_recon_' || c FROM unnest(reconcile_channels) c);

    -- A CALL alone in the job: pg_cron runs it outside a transaction block,
    -- so the procedure may commit after each batch.
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO jobid
        USING 'callback_center_retention', retention_cron,
              format('CALL callback_center.purge_in_batches(older_than => %L, batch_size => %s,'
                     ' attempts_older_than => %L, history_older_than => %L)',
                     older_than, batch_size, attempts_older_than, history_older_than);
    RETURN NEXT jobid;
    FOREACH ch IN ARRAY reconcile_channels LOOP
        EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO jobid
            USING 'callback_center_recon_' || ch, recon_cron,
                  format('SELECT * FROM callback_center.reconcile(%L, current_date - 1)', ch);
        RETURN NEXT jobid;
    END LOOP;
END
$$;

-- Removes every job schedule_maintenance made.  Returns how many.
CREATE FUNCTION callback_center.unschedule_maintenance()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    n integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = 'pg_cron is not installed in this database',
            HINT = 'Install pg_cron: set shared_preload_libraries = ''pg_cron'' and '
                   'cron.database_name to this database, restart, then run CREATE EXTENSION pg_cron.';
    END IF;
    EXECUTE 'SELECT count(cron.unschedule(jobid)) FROM cron.job'
            ' WHERE jobname LIKE ''callback\_center\_%'''
        INTO n;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION
    callback_center.schedule_maintenance(text[], text, text, interval, interval, interval, integer),
    callback_center.unschedule_maintenance() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    callback_center.schedule_maintenance(text[], text, text, interval, interval, interval, integer),
    callback_center.unschedule_maintenance()
    TO callback_center_admin;
