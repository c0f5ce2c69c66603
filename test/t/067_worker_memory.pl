# The worker does not leak per delivery: its memory contexts' grand total
# (pg_log_backend_memory_contexts, read from the server log) after 2,000
# deliveries and after 20,000 differ by less than a small bound.  Small
# batches make many rounds, so a leak per round shows as well as one per
# event.  A memory assertion, not a timing one.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

# 18,000 deliveries (at least 180 rounds) between the readings: a leak of
# 8 bytes per event or of 800 bytes per round would pass this bound.
my $bound = 144 * 1024;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('memory', conf => "callback_center.batch_size = 100\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Logs the worker's memory contexts and returns [total bytes, used bytes].
sub worker_memory
{
	my ($pid) = @_;
	my $offset = -s $node->logfile;
	is(sql(qq{SELECT pg_log_backend_memory_contexts($pid)}), 't', 'memory contexts requested');
	$node->wait_for_log(qr/\[$pid\] LOG:  Grand total: \d+ bytes/, $offset);
	my $log = slurp_file($node->logfile, $offset);
	$log =~ /\[$pid\] LOG:  Grand total: (\d+) bytes in \d+ blocks; \d+ free \(\d+ chunks\); (\d+) used/
	  or die "no grand total for $pid in the log";
	return [ $1, $2 ];
}

# Delivers $n more events and waits until all are delivered.
my $total = 0;
sub deliver
{
	my ($n) = @_;
	sql(qq{SELECT callback_center.enqueue('mem.ev', 'm' || i, jsonb_build_object('i', i, 'pad', repeat('x', 200)))
           FROM generate_series($total + 1, $total + $n) i});
	$total += $n;
	$node->poll_query_until('postgres',
		qq{SELECT count(*) = $total FROM callback_center.outbox WHERE status = 'delivered'})
	  or die "deliveries did not finish";
}

sql(qq{SELECT callback_center.create_endpoint('mem', '@{[$rcv->url('/mem')]}', '{mem.ev}', '$secret')});
my $pid = worker_pid($node);

deliver(2000);
my $at_2k = worker_memory($pid);
deliver(18000);
my $at_20k = worker_memory($pid);

is(worker_pid($node), $pid, 'the same worker delivered all 20,000');
is(sql(q{SELECT count(*) FROM callback_center.delivery_attempts WHERE http_status = 200}), '20000',
	'20,000 deliveries, one attempt each');
note("grand total after 2,000: $at_2k->[0] bytes ($at_2k->[1] used); after 20,000: $at_20k->[0] bytes ($at_20k->[1] used)");
cmp_ok($at_20k->[0] - $at_2k->[0], '<', $bound,
	"allocated memory grew by less than $bound bytes over 18,000 deliveries");
cmp_ok($at_20k->[1] - $at_2k->[1], '<', $bound,
	"used memory grew by less than $bound bytes over 18,000 deliveries");

$node->stop;
$rcv->stop;
done_testing();
