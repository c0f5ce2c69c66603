# The outbox wakes the worker when, and only when, a transaction that queued
# rows commits; many clients enqueueing at once lose nothing and see
# endpoint changes made while they run.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use CallbackCenterTest;

my $node = cc_node('outbox_wake');

$node->safe_psql('postgres', q{
SELECT callback_center.create_endpoint('wake_a', 'https://a.example/h', '{w.paid}');
SELECT callback_center.create_endpoint('wake_b', 'https://b.example/h', '{*}');
});

sub wakeups
{
	return $node->safe_psql('postgres',
		'SELECT wakeups FROM callback_center.worker_status()');
}

my $before = wakeups();
$node->safe_psql('postgres', q{
BEGIN;
SELECT callback_center.enqueue('w.paid', 'w-1', '{}');
SELECT callback_center.enqueue('w.paid', 'w-2', '{}');
COMMIT;
});
is(wakeups() - $before, 1, 'a committed transaction that queued rows wakes the worker once');

$before = wakeups();
$node->safe_psql('postgres', q{
BEGIN;
SELECT callback_center.enqueue('w.paid', 'w-3', '{}');
ROLLBACK;
});
is(wakeups() - $before, 0, 'an aborted transaction does not wake the worker');

$node->safe_psql('postgres', q{
SELECT callback_center.set_endpoint_enabled('wake_b', false);
});
$before = wakeups();
is($node->safe_psql('postgres',
		q{SELECT callback_center.enqueue('w.nobody', 'w-4', '{}')}),
	'0', 'no subscriber: nothing queued');
is(wakeups() - $before, 0, 'nothing queued: no wake-up');

$before = wakeups();
$node->safe_psql('postgres', q{
BEGIN;
SELECT callback_center.enqueue('w.paid', 'w-5', '{}');
ROLLBACK;
BEGIN;
SELECT callback_center.enqueue_to('wake_a', 'w.direct', 'w-5', '{}');
COMMIT;
});
is(wakeups() - $before, 1, 'the flag of an aborted transaction does not leak into the next');

# Wake-up is visible to the worker: its loop counter moves.
my $loops = $node->safe_psql('postgres',
	'SELECT loops FROM callback_center.worker_status()');
$node->safe_psql('postgres',
	q{SELECT callback_center.enqueue('w.paid', 'w-6', '{}')});
ok( $node->poll_query_until('postgres',
		"SELECT loops > $loops FROM callback_center.worker_status()"),
	'the worker ran a loop after the commit');

# Many clients at once, 4 x 200 transactions of one enqueue each.
$node->safe_psql('postgres',
	q{SELECT callback_center.set_endpoint_enabled('wake_b', true)});
my $queued_before = $node->safe_psql('postgres',
	q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'pgb-%'});
$node->pgbench(
	'--no-vacuum --client=4 --transactions=200',
	0,
	[qr{processed: 800/800}],
	[qr{^$}],
	'concurrent enqueue',
	{
		'040_enqueue' => q{
\set n random(1, 1000000)
SELECT callback_center.enqueue('w.paid', 'pgb-' || :n, jsonb_build_object('n', :n));
}
	});
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'pgb-%'}) -
	  $queued_before,
	1600, 'every transaction queued one row per endpoint');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM (SELECT aggregate_id, payload, count(*) FROM callback_center.outbox
		   WHERE aggregate_id LIKE 'pgb-%' GROUP BY 1, 2 HAVING count(*) % 2 <> 0) x}),
	'0', 'each event went to both endpoints');

# With delivery paused the worker does not ask for commit wake-ups: 300
# committing transactions cost it no loops beyond its poll (100 ms here);
# before, each commit woke it.  A manual wake() still does.
my $reloads = $node->safe_psql('postgres', 'SELECT reloads FROM callback_center.worker_status()');
$node->safe_psql('postgres', q{ALTER SYSTEM SET callback_center.delivery_enabled = off});
$node->safe_psql('postgres', q{SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres',
		"SELECT reloads > $reloads FROM callback_center.worker_status()"),
	'the worker reloaded with delivery paused');
# Pausing stops claims; what was claimed before still goes out, a loop per
# result.  Count from when that has been recorded.
ok($node->poll_query_until('postgres',
		q{SELECT NOT EXISTS (SELECT 1 FROM callback_center.outbox WHERE status = 'delivering')}),
	'the events claimed before the pause are recorded');
# Paused and idle, the worker sleeps until its poll: its next claim time
# lies in the past and there is no claim to time.
$loops = $node->safe_psql('postgres', 'SELECT loops FROM callback_center.worker_status()');
my $i0 = Time::HiRes::time();
usleep(1_000_000);
my $idle_loops = $node->safe_psql('postgres', 'SELECT loops FROM callback_center.worker_status()') - $loops;
my $idle_s = Time::HiRes::time() - $i0;
ok($idle_loops <= 20 * $idle_s + 10,
	sprintf('paused and idle: %d worker loops in %.1f s (polls only)', $idle_loops, $idle_s));
$loops = $node->safe_psql('postgres', 'SELECT loops FROM callback_center.worker_status()');
my $t0 = time();
$node->pgbench(
	'--no-vacuum --client=1 --transactions=300',
	0,
	[qr{processed: 300/300}],
	[qr{^$}],
	'enqueue with delivery paused',
	{
		'040_paused' => q{
SELECT callback_center.enqueue('w.paid', 'paused', '{}');
}
	});
my $elapsed = time() - $t0 + 1;
my $paused_loops = $node->safe_psql('postgres', 'SELECT loops FROM callback_center.worker_status()') - $loops;
ok($paused_loops <= 20 * $elapsed + 10,
	"300 commits with delivery paused: $paused_loops worker loops in about $elapsed s (polls only)");
$loops = $node->safe_psql('postgres', 'SELECT loops FROM callback_center.worker_status()');
$node->safe_psql('postgres', 'SELECT callback_center.wake()');
ok($node->poll_query_until('postgres',
		"SELECT loops > $loops FROM callback_center.worker_status()"),
	'wake() still wakes a paused worker');

$node->stop;
done_testing();
