# An event queued for an endpoint that no longer exists.  drop_endpoint
# removes an endpoint's rows under a SHARE lock on the outbox, but a
# REPEATABLE READ transaction whose snapshot predates the drop still sees
# the endpoint and can queue a row for it after the drop commits
# (doc/outbox.md).  No endpoint will ever claim that row: the worker marks
# it dead, naming the endpoint, and delivers nothing; the others flow.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('dropped');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(qq{SELECT callback_center.create_endpoint('gone', '@{[$rcv->url('/gone')]}', '{drop.ev}', '$secret')});
sql(qq{SELECT callback_center.create_endpoint('stays', '@{[$rcv->url('/stays')]}', '{drop.ev}', '$secret')});
my $gone_id = sql(q{SELECT id FROM callback_center.endpoints WHERE name = 'gone'});

# The REPEATABLE READ transaction takes its snapshot (and its subscriber
# list) while 'gone' exists.
my $rr = $node->background_psql('postgres');
$rr->query_safe(q{BEGIN ISOLATION LEVEL REPEATABLE READ});
is($rr->query_safe(q{SELECT count(*) FROM callback_center.endpoints}), '2', 'the snapshot sees both endpoints');

is(sql(q{SELECT callback_center.drop_endpoint('gone')}), '0', 'the endpoint is dropped (nothing queued yet)');

is($rr->query_safe(q{SELECT callback_center.enqueue('drop.ev', 'rr-1', '{}')}), '2',
	'the old snapshot still queues a row for the dropped endpoint');
$rr->query_safe(q{COMMIT});
$rr->quit;

is(sql(qq{SELECT count(*) FROM callback_center.outbox WHERE endpoint_id = $gone_id}), '1',
	'a row for an endpoint that no longer exists was committed');

ok($node->poll_query_until('postgres',
		qq{SELECT status = 'dead' FROM callback_center.outbox WHERE endpoint_id = $gone_id}),
	'the worker marks it dead');
is(sql(qq{SELECT attempts || ' ' || last_error FROM callback_center.outbox WHERE endpoint_id = $gone_id}),
	"0 endpoint $gone_id no longer exists", 'no attempt spent; the error names the endpoint');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox o
		    JOIN callback_center.endpoints e ON e.id = o.endpoint_id WHERE e.name = 'stays'}),
	'the same event for the remaining endpoint is delivered');
is(scalar($rcv->log_lines('/gone')), 0, 'nothing was sent to the dropped endpoint');
is(sql(qq{SELECT count(*) FROM callback_center.outbox
           WHERE status IN ('pending', 'delivering')}), '0', 'nothing is left waiting');
ok($node->log_contains('marked 1 events of dropped endpoints dead'), 'the worker logs it');

$node->stop;
$rcv->stop;
done_testing();
