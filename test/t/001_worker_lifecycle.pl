# The worker's lifecycle: starts with the server, shows its own backend_type,
# applies SIGHUP, exits on SIGTERM, comes back after kill -9.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $node = cc_node('lifecycle');

# The server may open as many files as the machine allows: test/lib.sh
# raises the soft limit that runuser resets to 1024 (the delivery and
# bench runs keep hundreds of sockets open); the postmaster's limit is
# what every backend and worker inherits.
my ($soft, $hard) = slurp_file('/proc/' . $node->{_pid} . '/limits')
  =~ /^Max open files\s+(\d+)\s+(\d+)/m;
is($soft, $hard, "open-file soft limit raised to the hard limit ($soft of $hard)");

ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity
		  WHERE backend_type = 'callback_center worker' AND datname = 'postgres'}),
	'worker runs, connected to callback_center.database');

my $pid = worker_pid($node);
is($node->safe_psql('postgres', 'SELECT pid FROM callback_center.worker_status()'),
	$pid, 'worker_status() reports the pid pg_stat_activity shows');

# It waits on its latch: wake() sets the latch and the loop counter moves.
my $loops = $node->safe_psql('postgres', 'SELECT loops FROM callback_center.worker_status()');
is($node->safe_psql('postgres', 'SELECT callback_center.wake()'), 't', 'wake() finds a running worker');
ok($node->poll_query_until('postgres',
		"SELECT loops > $loops FROM callback_center.worker_status()"),
	'worker loop ran after wake()');
ok($node->poll_query_until('postgres',
		q{SELECT wait_event_type || '/' || wait_event FROM pg_stat_activity
		  WHERE backend_type = 'callback_center worker'}, 'Extension/Extension'),
	'idle worker waits on its latch');

# SIGHUP: a changed PGC_SIGHUP setting reaches the worker.
my $offset = -s $node->logfile;
$node->safe_psql('postgres', q{ALTER SYSTEM SET callback_center.poll_interval = '250ms'});
$node->reload;
$node->wait_for_log(qr/callback_center worker reloaded configuration.*\n.*poll_interval is 250 ms/,
	$offset);
ok($node->safe_psql('postgres', 'SELECT reloads >= 1 FROM callback_center.worker_status()'),
	'worker counted the reload');
is(worker_pid($node), $pid, 'reload did not restart the worker');

# SIGTERM (pg_terminate_backend): clean exit, then restarted by the postmaster.
$offset = -s $node->logfile;
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
$node->wait_for_log(qr/callback_center worker shutting down/, $offset);
ok($node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM pg_stat_activity
		   WHERE backend_type = 'callback_center worker' AND pid <> $pid}),
	'worker restarted after SIGTERM');
$pid = worker_pid($node);

# kill -9: the postmaster reinitialises and starts a new worker.
kill 'KILL', $pid;
ok($node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM pg_stat_activity
		   WHERE backend_type = 'callback_center worker' AND pid <> $pid}),
	'worker restarted after kill -9');
isnt(worker_pid($node), $pid, 'a new worker process runs');

# Clean shutdown: the worker logs its exit, the server stops in time.
$offset = -s $node->logfile;
$node->stop('fast');
my $log = slurp_file($node->logfile, $offset);
like($log, qr/callback_center worker shutting down/, 'worker exits on server shutdown');
unlike($log, qr/callback_center.*(PANIC|terminated by signal)/, 'no crash at shutdown');

done_testing();
