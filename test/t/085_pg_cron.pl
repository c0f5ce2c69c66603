# schedule_maintenance() with pg_cron: the jobs are created once whatever
# the number of calls, the retention job really runs and purges an old
# delivered outbox row, and unschedule_maintenance() removes them all.
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
	  . "callback_center_retention $every SELECT callback_center.purge()",
	'jobs named callback_center_*, reconciling yesterday');

# Calling again replaces the jobs; a channel no longer listed loses its job.
my $before = $node->safe_psql('postgres',
	q{SELECT jobid FROM cron.job WHERE jobname = 'callback_center_retention'});
$node->safe_psql('postgres',
	qq{SELECT callback_center.schedule_maintenance('{tap-pay}', '$every')});
is( $node->safe_psql('postgres',
		q{SELECT string_agg(jobname, ',' ORDER BY jobname) FROM cron.job}),
	'callback_center_recon_tap-pay,callback_center_retention',
	'rescheduling is idempotent and drops the unlisted channel');
is( $node->safe_psql('postgres',
		q{SELECT jobid FROM cron.job WHERE jobname = 'callback_center_retention'}),
	$before, 'the retention job keeps its id');

# An old delivered row (set up in one transaction: the worker never sees it
# pending), a recent delivered one and an old pending one.
$node->safe_psql('postgres', q{
SELECT callback_center.create_endpoint('tap_cron', 'http://127.0.0.1:9/cron', '{cron.event}');
BEGIN;
SELECT callback_center.enqueue('cron.event', 'cron-old', '{}');
SELECT callback_center.enqueue('cron.event', 'cron-new', '{}');
UPDATE callback_center.outbox SET status = 'delivered', attempts = 1,
       delivered_at = now() - CASE aggregate_id WHEN 'cron-old' THEN interval '30 days'
                                                ELSE interval '1 hour' END
 WHERE aggregate_id IN ('cron-old', 'cron-new');
COMMIT;
});

ok( $node->poll_query_until(
		'postgres',
		q{SELECT NOT EXISTS (SELECT 1 FROM callback_center.outbox WHERE aggregate_id = 'cron-old')
		     AND EXISTS (SELECT 1 FROM cron.job_run_details r JOIN cron.job j USING (jobid)
		                  WHERE j.jobname = 'callback_center_retention'
		                    AND r.status = 'succeeded')}),
	'the retention job ran and purged the old delivered row');
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
