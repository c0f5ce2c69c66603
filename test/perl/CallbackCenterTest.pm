# Helpers shared by the TAP tests: a node with callback_center preloaded.
package CallbackCenterTest;

use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use Exporter 'import';

our @EXPORT = qw(cc_node worker_pid);

# Creates and starts a node with the library preloaded and the extension
# created in database "postgres".  %opts: allows_streaming, conf (extra
# postgresql.conf lines), initdb_extra (initdb arguments), no_start.
sub cc_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(allows_streaming => $opts{allows_streaming} // 0,
		extra => $opts{initdb_extra} // []);
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
callback_center.poll_interval = '100ms'
max_prepared_transactions = 10
# Loopback is refused unless listed: the test receivers listen there.
callback_center.allowed_destinations = '127.0.0.1, ::1'
# Cluster.pm turns this off; the crash tests need the postmaster to recover.
restart_after_crash = on
} . ($opts{conf} // ''));
	return $node if $opts{no_start};
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION callback_center CASCADE');
	return $node;
}

# The worker's pid as pg_stat_activity shows it, or '' when none runs.
sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'callback_center worker'});
}

1;
