# schedule_maintenance() with pg_cron: the jobs are created once whatever
# the number of calls, the retention job (a CALL of purge_in_batches, which
# commits per batch) really runs under pg_cron and purges an old delivered
# outbox row and an old delivery attempt while keeping history younger than
# its own age, and unschedule_maintenance() removes them all.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

# Jobs run in background workers: no TCP connection needed (TAP nodes
# listen on a Unix socket only).
my $node = cc_node('pg_cron', conf => q{
shared_preload_libraries = 'callback_center,pg_cron'
cron.database_name = 'postgres'
cron.use_background_workers = on
max_worker_processes = 16
});
$node->safe_psql('postgres', 'CREATE EXTENSION pg_cron');

# pg_cron 1.5 takes '5 seconds'; before that a minute is the finest step.
my $version = $node->safe_psql('postgres',
	q{SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'});
my ($maj, $min) = $version =~ /^(\d+)\.(\d+)/;
my $every = ($maj > 1 || ($maj == 1 && $min >= 5)) ? '5 seconds' : '* * * * *';
note "pg_cron $version, retention every '$every'";

my $ids = $node->safe_psql('postgres',
	qq{SELECT count(*) FROM callback_center.schedule_maintenance('{tap-pay,tap-two}', '$every')});
is($ids, '3', 'one retention job and one reconciliation job per channel');
is( $node->safe_psql(
		'postgres',
		q{SELECT string_agg(jobname || ' ' || schedule || ' ' || command, E'\n' ORDER BY jobname)
		    FROM cron.job}),
	"callback_center_recon_tap-pay 30 1 * * * SELECT * FROM callback_center.reconcile('tap-pay', current_date - 1)\n"
	  . "callback_center_recon_tap-two 30 1 * * * SELECT * FROM callback_center.reconcile('tap-two', current_date - 1)\n"
	  . "callback_center_retention $every CALL callback_center.purge_in_batches(older_than => '7 days', batch_size => 10000, attempts_older_than => NULL, history_older_than => NULL)",
	'jobs named callback_center_*, reconciling yesterday, retention by CALL');

# Calling again replaces the jobs; a channel no longer listed loses its job.
# This time with per-relation ages (history kept 60 days) and batches of 1.
my $before = $node->safe_psql('postgres',
	q{SELECT jobid FROM cron.job WHERE jobname = 'callback_center_retention'});
$node->safe_psql('postgres',
	qq{SELECT callback_center.schedule_maintenance('{tap-pay}', '$every',
	       history_older_than => '60 days', attempts_older_than => '14 days', batch_size => 1)});
is( $node->safe_psql('postgres',
		q{SELECT string_agg(jobname, ',' ORDER BY jobname) FROM cron.job}),
	'callback_center_recon_tap-pay,callback_center_retention',
	'rescheduling is idempotent and drops the unlisted channel');
is( $node->safe_psql('postgres',
		q{SELECT jobid FROM cron.job WHERE jobname = 'callback_center_retention'}),
	$before, 'the retention job keeps its id');
like( $node->safe_psql('postgres',
		q{SELECT command FROM cron.job WHERE jobname = 'callback_center_retention'}),
	qr/batch_size => 1, attempts_older_than => '14 days', history_older_than => '60 days'/,
	'the job carries the ages and batch size');

# Arguments are checked before anything is scheduled.
my ($nret, $nout, $nerr) = $node->psql('postgres',
	q{\set VERBOSITY verbose
SELECT callback_center.schedule_maintenance(NULL)});
like($nerr, qr/ERROR:  22004: reconcile_channels must not be null/,
	'22004 for a null argument');
is( $node->safe_psql('postgres', q{SELECT count(*) FROM cron.job}),
	'2', 'and the jobs are unchanged');

# An old delivered row (set up in one transaction: the worker never sees it
# pending) and a recent one, two attempts 30 days old (beyond the 14-day
# age), and history 30 days old (within its 60-day age).
$node->safe_psql('postgres', q{
SELECT callback_center.create_endpoint('tap_cron', 'http://127.0.0.1:9/cron', '{cron.event}');
BEGIN;
SELECT callback_center.enqueue('cron.event', 'cron-old', '{}');
SELECT callback_center.enqueue('cron.event', 'cron-new', '{}');
UPDATE callback_center.outbox SET status = 'delivered', attempts = 1,
       delivered_at = now() - CASE aggregate_id WHEN 'cron-old' THEN interval '30 days'
                                                ELSE interval '1 hour' END
 WHERE aggregate_id IN ('cron-old', 'cron-new');
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status,
                                               latency_ms, attempted_at)
SELECT id, endpoint_id, g, 200, 1, now() - interval '30 days'
  FROM callback_center.outbox, generate_series(1, 2) g WHERE aggregate_id = 'cron-new';
COMMIT;
INSERT INTO callback_center.state_history (machine, table_name, entity_id, to_state, actor, at)
VALUES ('order', 'callback_center.orders', 'cron-A', 'created', 'tap', now() - interval '30 days');
});

ok( $node->poll_query_until(
		'postgres',
		q{SELECT NOT EXISTS (SELECT 1 FROM callback_center.outbox WHERE aggregate_id = 'cron-old')
		     AND EXISTS (SELECT 1 FROM cron.job_run_details r JOIN cron.job j USING (jobid)
		                  WHERE j.jobname = 'callback_center_retention'
		                    AND r.status = 'succeeded')}),
	'the retention job ran and purged the old delivered row');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM callback_center.delivery_attempts a
		    JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = 'cron-new'}),
	'0', 'and the attempts older than their age, in batches of one');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM callback_center.state_history WHERE entity_id = 'cron-A'}),
	'1', 'history younger than its age stays');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM cron.job_run_details r JOIN cron.job j USING (jobid)
		   WHERE j.jobname = 'callback_center_retention' AND r.status <> 'succeeded'}),
	'0', 'no failed run (the procedure may COMMIT under pg_cron)');
is( $node->safe_psql('postgres',
		q{SELECT string_agg(aggregate_id, ',') FROM callback_center.outbox
		   WHERE aggregate_id LIKE 'cron-%'}),
	'cron-new', 'the recent delivered row stays');

is($node->safe_psql('postgres', 'SELECT callback_center.unschedule_maintenance()'),
	'2', 'unschedule_maintenance removes both jobs');
is($node->safe_psql('postgres', 'SELECT count(*) FROM cron.job'),
	'0', 'no job left');

# Without pg_cron in the database: 55000 with a hint.
$node->safe_psql('postgres', 'CREATE DATABASE nocron');
$node->safe_psql('nocron', 'CREATE EXTENSION callback_center CASCADE');
my ($ret, $out, $err) = $node->psql('nocron',
	q{\set VERBOSITY verbose
SELECT callback_center.schedule_maintenance()});
like($err, qr/ERROR:  55000: pg_cron is not installed in this database/,
	'55000 where pg_cron is not installed');
like($err, qr/HINT:  .*CREATE EXTENSION pg_cron/, 'the hint says how to install it');

$node->stop;
done_testing();
