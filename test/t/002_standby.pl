# A streaming standby loads the library but runs no worker; once promoted,
# it starts one.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $primary = cc_node('primary', allows_streaming => 1);
$primary->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'callback_center worker'});
$primary->backup('b');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->start;
$primary->safe_psql('postgres', 'CREATE TABLE after_backup AS SELECT 1 AS x');
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'standby is in recovery');
is($standby->safe_psql('postgres', 'SHOW shared_preload_libraries'), 'callback_center',
	'standby preloads the library');
is($standby->safe_psql('postgres', 'SELECT pid IS NULL FROM callback_center.worker_status()'),
	't', 'standby publishes no worker');
is($standby->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'callback_center worker'}),
	'0', 'no worker process on the standby');

$standby->promote;
ok($standby->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'callback_center worker'}),
	'promoted standby starts its worker');
is($standby->safe_psql('postgres', 'SELECT pid IS NOT NULL FROM callback_center.worker_status()'),
	't', 'promoted standby publishes its worker');

done_testing();
