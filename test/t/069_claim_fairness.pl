# Every endpoint gets its turn when there are more sending endpoints than
# events in a batch (batch_size 2, three endpoints: each one's share is 0
# and the remainder goes one event each to two of them): the remainder used
# to go to the lowest endpoint ids every round, so an event for the last
# endpoint was never claimed.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('fairness', conf => "callback_center.batch_size = 2\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

for my $name ('fa', 'fb', 'fc')
{
	sql(qq{SELECT callback_center.create_endpoint('$name', '@{[$rcv->url("/$name")]}', '{$name.ev}', '$secret')});
}
# The first endpoint has a steady backlog; the last has one event.
sql(q{SELECT callback_center.enqueue('fa.ev', 'a' || i, '{}') FROM generate_series(1, 300) i});
sql(q{SELECT callback_center.enqueue('fc.ev', 'c1', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'c1'}),
	'the event of the last endpoint is delivered');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 300 FROM callback_center.outbox WHERE aggregate_id LIKE 'a%' AND status = 'delivered'}),
	'the backlog of the first is delivered too');

$node->stop;
$rcv->stop;
done_testing();
