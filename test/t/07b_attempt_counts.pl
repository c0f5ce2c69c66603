# Attempts count what was sent (issue 10 item 4).  A burst is delivered
# while the worker, then the postmaster, is killed (kill -9) with requests
# held in flight, and a receiver resets connections it has reused.  For
# every event afterwards:
#   - attempts = its rows in delivery_attempts (exactly: both are written by
#     the statement that records an outcome; a row claimed and never sent
#     counts nothing);
#   - requests the receiver logged for its webhook-id >= its attempt rows,
#     and the excess is at most one per crash (the request in flight when
#     the worker died, whose outcome nobody recorded), so never more than
#     the requests that were in flight at the crashes; no silent re-send of
#     libcurl's adds to it.
# Before, the claim counted the attempt: the rows claimed but not yet sent
# when the worker died kept an attempt no request had made, and libcurl
# re-sent requests whose reused connection was reset, unrecorded.
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
# A claim much larger than what is in flight: most claimed rows are not yet
# sent when a kill lands.
my $node = cc_node('attempts', conf => qq{
callback_center.batch_size = 500
callback_center.max_concurrent = 8
callback_center.max_per_endpoint = 8
});

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub alive
{
	my ($p) = @_;
	open(my $fh, '<', "/proc/$p/stat") or return 0;
	my $stat = <$fh>;
	close $fh;
	return $stat !~ /^\d+ \(.*\) Z/;
}

# Holds every request to /a (stall_s seconds), runs $then, waits until one
# is held; returns how many requests to /a are held.
sub hold_in_flight
{
	my ($stall_s, $then) = @_;
	my $before = scalar($rcv->log_lines('/a'));
	$rcv->control('/a', 'stall', stall_s => $stall_s);
	sql($then) if defined $then;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	while (time() < $deadline)
	{
		my @lines = $rcv->log_lines('/a');
		return scalar(grep { ($_->{mode} // '') eq 'stall' } @lines[$before .. $#lines])
		  if grep { ($_->{mode} // '') eq 'stall' } @lines[$before .. $#lines];
		usleep(20_000);
	}
	return 0;
}

sub all_done
{
	my ($prefix) = @_;
	return $node->poll_query_until('postgres',
		qq{SELECT count(*) = 0 FROM callback_center.outbox
		    WHERE aggregate_id LIKE '$prefix%' AND status NOT IN ('delivered', 'dead')});
}

# Requests the receiver logged per webhook-id, for paths under $path.
sub received
{
	my ($path) = @_;
	my %n;
	$n{ $_->{headers}{'webhook-id'} }++ for $rcv->log_lines($path);
	return \%n;
}

# id, attempts and attempt rows of every event of the prefix.
sub counts
{
	my ($prefix) = @_;
	my @rows = map { [ split /\|/ ] } split /\n/, sql(qq{
		SELECT o.id, o.attempts,
		       (SELECT count(*) FROM callback_center.delivery_attempts d WHERE d.outbox_id = o.id)
		  FROM callback_center.outbox o WHERE o.aggregate_id LIKE '$prefix%' ORDER BY o.id});
	return @rows;
}

# Checks the invariants for the events of $prefix sent to $path; at most
# $crashes requests of each event went unrecorded, $in_flight in all.
sub check
{
	my ($prefix, $path, $crashes, $in_flight, $what) = @_;
	my $got = received($path);
	my ($bad_count, $missing, $excess_events, $too_many, $excess) = (0, 0, 0, 0, 0);
	my @rows = counts($prefix);
	for my $r (@rows)
	{
		my ($id, $attempts, $logged) = @$r;
		my $seen = $got->{"msg_$id"} // 0;
		$bad_count++ if $attempts != $logged;
		$missing++ if $seen < $logged;
		if ($seen > $logged)
		{
			$excess_events++;
			$excess += $seen - $logged;
			$too_many++ if $seen - $logged > $crashes;
		}
	}
	ok(scalar(@rows) > 0, "$what: events to check (" . scalar(@rows) . ")");
	is($bad_count, 0, "$what: attempts = attempt rows for every event");
	is($missing, 0, "$what: every attempt row is a request the receiver logged");
	is($too_many, 0, "$what: no event received more than $crashes request(s) beyond its attempt rows");
	cmp_ok($excess, '<=', $in_flight,
		"$what: requests beyond the attempt rows ($excess, $excess_events events) <= those in flight at the crashes ($in_flight)");
}

sql(qq{SELECT callback_center.create_endpoint('a', '@{[$rcv->url('/a')]}', '{att.ev}', '$secret',
	'{"timeout_ms": 120000}')});

# 1. kill -9 of the worker mid burst.
sql(q{SELECT callback_center.enqueue('att.ev', 'w-' || i, '{}') FROM generate_series(1, 3000) i});
ok($rcv->wait_for_requests('/a', 300), 'delivery under way');
my $held1 = hold_in_flight(60);
ok($held1 > 0, "requests held in flight ($held1)");
my $log_offset = -s $node->logfile;
my $pid = worker_pid($node);
like($pid, qr/^\d+$/, 'the worker runs');
my $delivering = sql(q{SELECT count(*) FROM callback_center.outbox WHERE status = 'delivering'});
kill 'KILL', $pid;
note("rows delivering at the kill: $delivering");
$rcv->control('/a', undef);
ok($node->wait_for_log(qr/callback_center worker started/, $log_offset), 'the worker restarted');
ok(all_done('w-'), 'after the worker crash every event ends delivered or dead');
# What was in flight: at most max_concurrent requests.
check('w-', '/a', 1, 8, 'worker killed');

# 2. kill -9 of the postmaster mid burst.
my $before = scalar($rcv->log_lines('/a'));
sql(q{SELECT callback_center.enqueue('att.ev', 'p-' || i, '{}') FROM generate_series(1, 3000) i});
ok($rcv->wait_for_requests('/a', $before + 300), 'second burst under way');
hold_in_flight(120);
my $postmaster = $node->{_pid};
my @children = split /\s+/, `pgrep -P $postmaster`;
$node->kill9;
my @left;
for (1 .. 600)
{
	@left = grep { alive($_) } @children;
	last unless @left;
	usleep(100_000);
}
is(join(' ', @left), '', 'every child exits after the postmaster is killed');
for (1 .. 600)
{
	last unless kill(0, $postmaster);
	usleep(100_000);
}
$rcv->control('/a', undef);
ok($node->start(fail_ok => 1), 'server restarts after kill -9 of the postmaster');
ok(all_done('p-'), 'after the postmaster crash every event ends delivered or dead');
check('p-', '/a', 1, 8, 'postmaster killed');
check('w-', '/a', 1, 8, 'worker killed, after the second crash too');

# 3. Reused connections reset after reading the request: libcurl would send
# it again on a fresh connection without a word.  One connection at a
# time, every other request reset.
$node->append_conf('postgresql.conf', "callback_center.max_concurrent = 1\ncallback_center.max_per_endpoint = 1\n");
$node->reload;
$node->poll_query_until('postgres', q{SELECT current_setting('callback_center.max_concurrent') = '1'});
sql(q{INSERT INTO callback_center.retry_schedules (name, delays) VALUES ('quick', '{50ms}')});
sql(qq{SELECT callback_center.create_endpoint('r', '@{[$rcv->url('/r')]}', '{att.r}', '$secret',
	'{"retry_schedule": "quick", "max_attempts": 50, "breaker_min_requests": 100000}')});
$rcv->control('/r', '200', cycle => [ '200', 'reset' ]);
sql(q{SELECT callback_center.enqueue('att.r', 'r-' || i, '{}') FROM generate_series(1, 40) i});
ok(all_done('r-'), 'every event of the resetting receiver ends delivered or dead');
check('r-', '/r', 0, 0, 'connections reset');
my $not_resent = sql(q{SELECT count(*) FROM callback_center.delivery_attempts d
	JOIN callback_center.outbox o ON o.id = d.outbox_id
	WHERE o.aggregate_id LIKE 'r-%' AND d.error LIKE 'connection closed after the request was sent%'});
cmp_ok($not_resent, '>', 0, "reset reused connections recorded as attempts, not re-sent ($not_resent)");

$node->stop;
$rcv->stop;
done_testing();
