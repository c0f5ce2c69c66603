# The continuous pipeline (issue 12 item 1).
# 1. No head-of-line blocking: an endpoint whose receiver holds every
#    request for 20 s costs only its own slots; another endpoint's events,
#    enqueued after the held requests went out, are all delivered while
#    those requests are still in flight (an ordering fact: no timing
#    threshold).  Before, a round returned only when its slowest request
#    did, and the fast events waited behind the held ones.
# 2. A kill -9 of the postmaster mid burst re-sends at most the requests
#    whose outcome was not yet recorded, which the pipeline keeps within
#    max_concurrent: webhook-ids received more than once <= max_concurrent.
#    Before, results were recorded once per batch (up to batch_size).
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
my $max_concurrent = 16;
my $node = cc_node('pipeline', conf => qq{
callback_center.batch_size = 1000
callback_center.max_concurrent = $max_concurrent
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

sql(qq{SELECT callback_center.create_endpoint('slow', '@{[$rcv->url('/slow')]}', '{p.slow}', '$secret',
	'{"timeout_ms": 60000}')});
sql(qq{SELECT callback_center.create_endpoint('fast', '@{[$rcv->url('/fast')]}', '{p.fast}', '$secret')});

# 1. Isolation.
$rcv->control('/slow', 'stall', stall_s => 20);
sql(q{SELECT callback_center.enqueue('p.slow', 's-' || i, '{}') FROM generate_series(1, 20) i});
ok($rcv->wait_for_requests('/slow', 8), 'the slow endpoint has its 8 requests held');
sql(q{SELECT callback_center.enqueue('p.fast', 'f-' || i, '{}') FROM generate_series(1, 200) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 200 FROM callback_center.outbox WHERE aggregate_id LIKE 'f-%' AND status = 'delivered'}),
	'the fast endpoint gets all its events');
# Read at once: the held requests answer 20 s after they arrived.
my $slow_done = sql(q{SELECT count(*) FROM callback_center.delivery_attempts d
	JOIN callback_center.outbox o ON o.id = d.outbox_id WHERE o.aggregate_id LIKE 's-%'});
my $slow_delivering = sql(q{SELECT count(*) FROM callback_center.outbox
	WHERE aggregate_id LIKE 's-%' AND status = 'delivering'});
my @held = grep { ($_->{mode} // '') eq 'stall' } $rcv->log_lines('/slow');
my $first_held = (sort { $a <=> $b } map { $_->{received_at} } @held)[0];
my $last_fast = (sort { $b <=> $a } map { $_->{received_at} } $rcv->log_lines('/fast'))[0];
is($slow_done, '0', 'every fast event was delivered before any held request finished');
cmp_ok($slow_delivering, '>=', 8, "the held requests are still in flight ($slow_delivering delivering)");
cmp_ok($last_fast, '<', $first_held + 20, 'the last fast request reached the receiver before the first held one was answered');
is(scalar(@held), 8, 'the slow endpoint used its 8 slots, no more');
$rcv->control('/slow', undef);
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 20 FROM callback_center.outbox WHERE aggregate_id LIKE 's-%' AND status = 'delivered'}),
	'the slow events are delivered once their receiver answers');

# 2. Duplicates after kill -9 of the postmaster.
$rcv->control('/fast', '200', delay_ms => 5);
my $before = scalar($rcv->log_lines('/fast'));
sql(q{SELECT callback_center.enqueue('p.fast', 'k-' || i, '{}') FROM generate_series(1, 5000) i});
ok($rcv->wait_for_requests('/fast', $before + 1000), 'burst under way');
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
is(join(' ', @left), '', 'every child exits');
for (1 .. 600)
{
	last unless kill(0, $postmaster);
	usleep(100_000);
}
ok($node->start(fail_ok => 1), 'server restarts after kill -9 of the postmaster');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 5000 FROM callback_center.outbox WHERE aggregate_id LIKE 'k-%' AND status = 'delivered'}),
	'all 5000 delivered after the restart');
my %n;
for ($rcv->log_lines('/fast'))
{
	$n{ $_->{headers}{'webhook-id'} }++ if $_->{body} =~ /"aggregate_id": "k-/;
}
is(scalar(keys %n), 5000, 'the receiver got all 5000 webhook-ids');
my $dups = grep { $_ > 1 } values %n;
cmp_ok($dups, '<=', $max_concurrent,
	"webhook-ids received more than once ($dups) <= max_concurrent ($max_concurrent)");
is(sql(q{SELECT count(*) FROM callback_center.outbox o WHERE aggregate_id LIKE 'k-%'
	AND attempts <> (SELECT count(*) FROM callback_center.delivery_attempts d WHERE d.outbox_id = o.id)}),
	'0', 'attempts = attempt rows after the crash');

$node->stop;
$rcv->stop;
done_testing();
