# Nothing is lost: 10,000 events with the worker killed (kill -9) mid
# delivery, then the postmaster killed; after each restart every event is
# delivered or dead, and any duplicate carries the same webhook-id.  A
# streaming standby delivers nothing; once promoted it delivers what is
# pending.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('crash', allows_streaming => 1,
	conf => "callback_center.batch_size = 500\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }
# Makes the receiver hold every request (stall_s seconds), runs $then (SQL)
# if given, and waits until a request is held: the worker then sits in its
# HTTP loop with claimed rows 'delivering' until those requests time out,
# so a kill lands mid delivery.  Returns how many rows were 'delivering'.
sub hold_in_flight
{
	my ($stall_s, $then) = @_;
	my $before = scalar($rcv->log_lines('/c'));
	$rcv->control('/c', 'stall', stall_s => $stall_s);
	sql($then) if defined $then;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	while (time() < $deadline)
	{
		my @lines = $rcv->log_lines('/c');
		last if grep { ($_->{mode} // '') eq 'stall' } @lines[$before .. $#lines];
		usleep(20_000);
	}
	return sql(q{SELECT count(*) FROM callback_center.outbox WHERE status = 'delivering'});
}

# Whether a process runs (a zombie left unreaped does not).
sub alive
{
	my ($p) = @_;
	open(my $fh, '<', "/proc/$p/stat") or return 0;
	my $stat = <$fh>;
	close $fh;
	return $stat !~ /^\d+ \(.*\) Z/;
}

sub distinct_ids
{
	my ($prefix) = @_;
	my %ids = map { $_->{headers}{'webhook-id'} => 1 }
	  grep { $_->{body} =~ /"aggregate_id": "\Q$prefix\E/ } $rcv->log_lines('/c');
	return scalar(keys %ids);
}

sql(qq{SELECT callback_center.create_endpoint('c', '@{[$rcv->url('/c')]}', '{crash.ev}', '$secret')});

# 1. kill -9 of the worker while it delivers.
sql(q{SELECT callback_center.enqueue('crash.ev', 'w-' || i, '{}') FROM generate_series(1, 10000) i});
ok($rcv->wait_for_requests('/c', 500), 'delivery under way');
my $in_flight = hold_in_flight(30);
my $log_offset = -s $node->logfile;
my $pid = worker_pid($node);
like($pid, qr/^\d+$/, 'the worker runs: there is a pid to kill');
kill 'KILL', $pid;
ok($in_flight > 0, "rows were 'delivering' when the worker was killed ($in_flight)");
$rcv->control('/c', undef);
ok($node->wait_for_log(qr/released \d+ events left in flight by its predecessor/, $log_offset),
	'the restarted worker released what the killed one had in flight');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM callback_center.outbox
		   WHERE aggregate_id LIKE 'w-%' AND status NOT IN ('delivered', 'dead')}),
	'after the worker crash every event ends delivered or dead');
is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'w-%' AND status = 'delivered'}),
	'10000', 'all 10,000 delivered');
is(distinct_ids('w-'), 10000, 'the receiver got all 10,000 webhook-ids (duplicates share an id)');

# 2. kill -9 of the postmaster (and so of everything) mid delivery.
# Requests will be held for 120 s, and the endpoint waits as long for them:
# only noticing the postmaster's death in its HTTP loop lets the worker
# exit before they are answered.
sql(q{SELECT callback_center.alter_endpoint('c', '{"timeout_ms": 120000}')});
# Held from the first request on: the receiver's log is long by now, and
# reading it to see the burst under way took as long as the whole burst.
$in_flight = hold_in_flight(120,
	q{SELECT callback_center.enqueue('crash.ev', 'p-' || i, '{}') FROM generate_series(1, 10000) i});
$log_offset = -s $node->logfile;
$pid = worker_pid($node);
like($pid, qr/^\d+$/, 'the worker runs before the postmaster is killed');
# The postmaster's children, taken before it dies (they are reparented).
my $postmaster = $node->{_pid};
my @children = split /\s+/, `pgrep -P $postmaster`;
ok(grep({ $_ eq $pid } @children), 'the worker is among the children watched');
$node->kill9;
ok($in_flight > 0, "rows were 'delivering' when the postmaster was killed ($in_flight)");
# The old children notice the postmaster's death and exit on their own;
# until they have, a new postmaster refuses to start.
my @left;
for (1 .. 600)
{
	@left = grep { alive($_) } @children;
	last unless @left;
	usleep(100_000);
}
is(join(' ', @left), '',
	'every child, the worker in its HTTP loop too, exits well before its held requests are answered');
# A new postmaster refuses to start while the old pid exists (unreaped).
for (1 .. 600)
{
	last unless kill(0, $postmaster);
	usleep(100_000);
}
$rcv->control('/c', undef);
my $started = $node->start(fail_ok => 1);
ok($started, 'server restarts after kill -9 of the postmaster');
sql(q{SELECT callback_center.alter_endpoint('c', '{"timeout_ms": 5000}')});
ok($node->wait_for_log(qr/released \d+ events left in flight by its predecessor/, $log_offset),
	'the new worker released what the old one had in flight');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM callback_center.outbox
		   WHERE aggregate_id LIKE 'p-%' AND status NOT IN ('delivered', 'dead')}),
	'after the postmaster crash every event ends delivered or dead');
is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'p-%' AND status = 'delivered'}),
	'10000', 'all 10,000 of the second burst delivered');
is(distinct_ids('p-'), 10000, 'the receiver got all 10,000 webhook-ids of the second burst');

# 3. A standby delivers nothing; promoted, it delivers what is pending.
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('crash_standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;
# Pause the primary's delivery so events stay pending, then replicate them.
$node->append_conf('postgresql.conf', "callback_center.delivery_enabled = off\n");
$node->reload;
$node->poll_query_until('postgres', q{SELECT current_setting('callback_center.delivery_enabled') = 'off'});
sql(q{SELECT callback_center.enqueue('crash.ev', 's-' || i, '{}') FROM generate_series(1, 100) i});
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres',
		q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 's-%' AND status = 'pending'}),
	'100', 'the standby sees the 100 pending events');
is($standby->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'callback_center worker'}),
	'0', 'no worker on the standby');
is(distinct_ids('s-'), 0, 'nothing delivered while primary paused and standby in recovery');
$node->stop('immediate');
$standby->promote;
ok($standby->poll_query_until('postgres',
		q{SELECT count(*) = 100 FROM callback_center.outbox WHERE aggregate_id LIKE 's-%' AND status = 'delivered'}),
	'the promoted standby delivers what was pending');
is(distinct_ids('s-'), 100, 'the receiver got the 100 events from the promoted standby');

$standby->stop;
$rcv->stop;
done_testing();
