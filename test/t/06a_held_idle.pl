# Events that are due but held back do not make the worker spin: with
# events held by degrade_non_core, an open breaker, an empty token bucket or
# an earlier event of the same aggregate waiting for its retry (ordered
# endpoint), the worker sleeps until the hold can end (or the poll
# interval), instead of going round every millisecond.  Measured by the
# worker's loop counter over a few seconds: a busy loop makes thousands.
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
my $node = cc_node('held_idle',
	conf => "callback_center.poll_interval = '1s'\ncallback_center.retry_jitter = 0\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

# The worker's rounds over 3 seconds.
sub loops_over_3s
{
	my $before = sql(q{SELECT loops FROM callback_center.worker_status()});
	usleep(3_000_000);
	return sql(q{SELECT loops FROM callback_center.worker_status()}) - $before;
}

# A busy loop makes about a thousand rounds a second; an idle worker with a
# 1 s poll interval about one.
my $max_loops = 50;

# 1. degrade_non_core holds the events of a non-core endpoint.
sql(qq{SELECT callback_center.create_endpoint('extra', '@{[$rcv->url('/extra')]}', '{extra.ev}', '$secret',
        '{"is_core": false}')});
$node->append_conf('postgresql.conf', "callback_center.degrade_non_core = on\n");
$node->reload;
$node->poll_query_until('postgres', q{SELECT current_setting('callback_center.degrade_non_core') = 'on'});
sql(q{SELECT callback_center.enqueue('extra.ev', 'x' || i, '{}') FROM generate_series(1, 20) i});
my $n = loops_over_3s();
ok($n < $max_loops, "degraded non-core endpoint with due events: $n rounds in 3 s");
is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE event_type = 'extra.ev' AND status = 'pending' AND attempts = 0}),
	'20', 'the held events wait without attempts');
$node->append_conf('postgresql.conf', "callback_center.degrade_non_core = off\n");
$node->reload;
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 20 FROM callback_center.outbox WHERE event_type = 'extra.ev' AND status = 'delivered'}),
	'they are delivered once degradation is off');

# 2. An open breaker (open for a minute) holds the events due for it.
sql(qq{SELECT callback_center.create_endpoint('brk', '@{[$rcv->url('/brk')]}', '{brk.ev}', '$secret',
        '{"breaker_min_requests": 3, "breaker_open_ms": 60000, "retry_schedule": "merchant_erp"}')});
$rcv->control('/brk', '500');
sql(q{SELECT callback_center.enqueue('brk.ev', 'k' || i, '{}') FROM generate_series(1, 3) i});
ok($node->poll_query_until('postgres',
		q{SELECT breaker = 'open' FROM callback_center.endpoint_state s
		    JOIN callback_center.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'brk'}),
	'the breaker opens');
sql(q{SELECT callback_center.enqueue('brk.ev', 'held' || i, '{}') FROM generate_series(1, 10) i});
$n = loops_over_3s();
ok($n < $max_loops, "open breaker with due events: $n rounds in 3 s");
is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'held%' AND attempts = 0}),
	'10', 'events held by the breaker burned no attempts');
sql(q{SELECT callback_center.drop_endpoint('brk')});

# 3. An empty token bucket (1 per second, 10 due).
sql(qq{SELECT callback_center.create_endpoint('slow', '@{[$rcv->url('/slow')]}', '{slow.ev}', '$secret',
        '{"rate_limit_per_s": 1}')});
sql(q{SELECT callback_center.enqueue('slow.ev', 's' || i, '{}') FROM generate_series(1, 10) i});
$n = loops_over_3s();
ok($n < $max_loops, "rate-limited endpoint waiting for tokens: $n rounds in 3 s");
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 10 FROM callback_center.outbox WHERE event_type = 'slow.ev' AND status = 'delivered'}),
	'the rate-limited events are all delivered');

# 4. Ordered endpoint: A1 failed and waits 5 minutes for its retry; A2..A5
# are due but must wait behind it.
sql(qq{SELECT callback_center.create_endpoint('ord', '@{[$rcv->url('/ord')]}', '{ord.ev}', '$secret',
        '{"ordered": true, "retry_schedule": "merchant_erp"}')});
$rcv->control('/ord', '500', times => 1);
sql(q{SELECT callback_center.enqueue('ord.ev', 'A', '{"seq": 1}')});
ok($node->poll_query_until('postgres',
		q{SELECT attempts = 1 AND status = 'pending' FROM callback_center.outbox
		   WHERE event_type = 'ord.ev' AND payload->>'seq' = '1'}),
	'A1 failed and waits for its retry');
sql(q{SELECT callback_center.enqueue('ord.ev', 'A', jsonb_build_object('seq', i)) FROM generate_series(2, 5) i});
$n = loops_over_3s();
ok($n < $max_loops, "ordered events blocked behind a retry: $n rounds in 3 s");
is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE event_type = 'ord.ev' AND attempts = 0}),
	'4', 'the blocked events were not attempted');

$node->stop;
$rcv->stop;
done_testing();
