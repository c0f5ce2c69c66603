# Without shared_preload_libraries the SQL API works and the functions that
# need the worker fail with a clear error and a hint.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('nopreload');
$node->init;
$node->start;

$node->safe_psql('postgres', 'CREATE EXTENSION callback_center CASCADE');
is($node->safe_psql('postgres',
		q{SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension}),
	'callback_center,pgcrypto,plpgsql', 'CREATE EXTENSION works without preload');

my ($ret, $out, $err) = $node->psql('postgres',
	'\set VERBOSITY verbose' . "\n" . 'SELECT * FROM callback_center.worker_status()');
isnt($ret, 0, 'worker_status() fails without preload');
like($err, qr/ERROR:  55000: callback_center.worker_status\(\) requires callback_center to be loaded via shared_preload_libraries/,
	'error names the function and has SQLSTATE 55000');
like($err, qr/HINT:  Add callback_center to shared_preload_libraries/, 'error hints at the setting');

($ret, $out, $err) = $node->psql('postgres',
	'\set VERBOSITY verbose' . "\n" . 'SELECT * FROM callback_center.jobs_status()');
isnt($ret, 0, 'jobs_status() fails without preload');
like($err, qr/ERROR:  55000: callback_center.jobs_status\(\) requires callback_center to be loaded via shared_preload_libraries/,
	'jobs_status() error names the function and has SQLSTATE 55000');
like($err, qr/HINT:  Add callback_center to shared_preload_libraries/, 'jobs_status() error hints at the setting');

# The jobs themselves are plain SQL and work without the worker.
is($node->safe_psql('postgres', 'SELECT callback_center.close_expired_orders(10)'),
	'0', 'close_expired_orders() runs without preload');

is($node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity
		   WHERE backend_type IN ('callback_center worker', 'callback_center jobs')}),
	'0', 'no worker without preload');

done_testing();
