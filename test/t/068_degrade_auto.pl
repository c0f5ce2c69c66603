# Non-core endpoints are held back automatically: while a core endpoint's
# circuit breaker is open (callback_center.degrade_on_core_breaker), and
# while the backlog of due core events is at or above
# callback_center.degrade_core_backlog.  Held events burn no attempts and
# flow once the pressure is gone; endpoint_state.degraded says so.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('degrade', conf => "callback_center.degrade_on_core_breaker = on\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub degraded
{
	my ($name) = @_;
	return sql(qq{SELECT coalesce(s.degraded, false) FROM callback_center.endpoints e
	              LEFT JOIN callback_center.endpoint_state s ON s.endpoint_id = e.id WHERE e.name = '$name'});
}

# 1. A core endpoint's breaker opens: the non-core endpoint is held.
sql(qq{SELECT callback_center.create_endpoint('core', '@{[$rcv->url('/core')]}', '{core.ev}', '$secret',
        '{"breaker_min_requests": 3, "breaker_open_ms": 3000, "retry_schedule": "merchant_erp"}')});
sql(qq{SELECT callback_center.create_endpoint('extra', '@{[$rcv->url('/extra')]}', '{extra.ev}', '$secret',
        '{"is_core": false}')});
sql(q{SELECT callback_center.enqueue('extra.ev', 'warm', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'warm'}),
	'the non-core endpoint is delivered to while core endpoints are healthy');

$rcv->control('/core', '500');
sql(q{SELECT callback_center.enqueue('core.ev', 'c' || i, '{}') FROM generate_series(1, 5) i});
ok($node->poll_query_until('postgres',
		q{SELECT breaker = 'open' FROM callback_center.endpoint_state s
		    JOIN callback_center.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'core'}),
	'the core breaker opens');
ok($node->wait_for_log(qr/holds back non-core endpoints: a core endpoint's circuit breaker is open/),
	'the worker logs that it holds non-core endpoints back');
sql(q{SELECT callback_center.enqueue('extra.ev', 'held-1', '{}')});
# A core event to probe with: after open_ms the probe goes and fails, and
# the breaker opens again.  The held event must still be untouched then.
my $probes = scalar($rcv->log_lines('/core'));
sql(q{SELECT callback_center.enqueue('core.ev', 'p1', '{}')});
ok($rcv->wait_for_requests('/core', $probes + 1), 'a probe to the core endpoint is sent');
ok($node->poll_query_until('postgres',
		q{SELECT attempts = 1 AND status = 'pending' FROM callback_center.outbox WHERE aggregate_id = 'p1'}),
	'the probe failed');
# endpoint_state is published by rounds that deliver something (the probe).
is(degraded('extra'), 't', 'endpoint_state shows the non-core endpoint degraded');
is(sql(q{SELECT status || ' ' || attempts FROM callback_center.outbox WHERE aggregate_id = 'held-1'}),
	'pending 0', 'the non-core event waits without an attempt');
is(scalar($rcv->log_lines('/extra')), 1, 'nothing more was sent to the non-core endpoint');

# The core receiver recovers; the next probe succeeds and closes the breaker.
$rcv->control('/core', undef);
sql(q{SELECT callback_center.enqueue('core.ev', 'p2', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'p2'}),
	'the next probe succeeds');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'held-1'}),
	'once the core breaker closes the held event is delivered');
is(sql(q{SELECT attempts FROM callback_center.outbox WHERE aggregate_id = 'held-1'}), '1',
	'with one attempt');
ok($node->wait_for_log(qr/delivers to non-core endpoints again/), 'the worker logs the end of it');

# 2. A core backlog at the threshold holds non-core events until it drains
# below it.  The core endpoint is rate-limited (1 per second) so the
# backlog lasts; 20 core events against a threshold of 5.
$node->append_conf('postgresql.conf', "callback_center.degrade_core_backlog = 5\n");
$node->reload;
$node->poll_query_until('postgres', q{SELECT current_setting('callback_center.degrade_core_backlog') = '5'});
sql(q{SELECT callback_center.alter_endpoint('core', '{"rate_limit_per_s": 1}')});
# The core events that failed earlier wait 5 minutes (merchant_erp): they
# are not due, so they are no backlog.
my $offset = -s $node->logfile;
sql(q{SELECT callback_center.enqueue('core.ev', 'b' || i, '{}') FROM generate_series(1, 20) i});
ok($node->wait_for_log(qr/holds back non-core endpoints: the backlog of due core events reached/, $offset),
	'the backlog starts the degradation');
ok($node->poll_query_until('postgres', q{SELECT coalesce(s.degraded, false) FROM callback_center.endpoints e
	    JOIN callback_center.endpoint_state s ON s.endpoint_id = e.id WHERE e.name = 'extra'}),
	'endpoint_state shows it');
sql(q{SELECT callback_center.enqueue('extra.ev', 'held-2', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'held-2'}),
	'the held event is delivered once the backlog drains');
# Due core events were at least 5 until at least 16 of the 20 were claimed,
# and at most one is in flight at once (1 per second): so at least 15 were
# delivered before the held event.
cmp_ok(sql(q{SELECT count(*) FROM callback_center.outbox c, callback_center.outbox h
              WHERE c.aggregate_id LIKE 'b%' AND h.aggregate_id = 'held-2'
                AND c.delivered_at < h.delivered_at}), '>=', 15,
	'at least 15 of the 20 core events went before it');
is(sql(q{SELECT attempts FROM callback_center.outbox WHERE aggregate_id = 'held-2'}), '1',
	'with one attempt');

$node->stop;
$rcv->stop;
done_testing();
