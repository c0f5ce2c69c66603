# The jobs worker: closes expired orders exactly once (stock back, coupons
# unfrozen, events, history), queries payments stuck in PAYING at the
# provider's query endpoint and applies the answer as a callback would,
# re-queries after a failed query, and survives errors (a bad order, the
# extension dropped and created again) without restarting.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $node = cc_node('jobs', conf => q{
callback_center.pay_timeout = '1s'
callback_center.jobs_interval = '100ms'
callback_center.jobs_batch = 7
callback_center.pay_query_after = '1s'
callback_center.pay_query_interval = '1s'
});
my $rcv = CallbackCenterReceiver->start;

# One statement (or several, in one session) in database postgres.
sub sq { return $node->safe_psql('postgres', $_[0]); }

ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity
		  WHERE backend_type = 'callback_center jobs' AND datname = 'postgres'}),
	'jobs worker runs next to the delivery worker');
my $jobs_pid = sq(q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'callback_center jobs'});
is(sq('SELECT pid FROM callback_center.jobs_status()'), $jobs_pid,
	'jobs_status() reports its pid');
my $delivery_pid = worker_pid($node);
ok($delivery_pid, 'the delivery worker runs too');

sq(sprintf(q{SELECT callback_center.create_endpoint('tj-sink', '%s', '{order.closed,merchant.erp_sync}')},
		$rcv->url('/sink')));

# 1. Timeout close: 30 orders with coupons, unpaid past their 1 s deadline,
# closed in batches of 7.
sq(q{SELECT callback_center.set_stock('tj-A', 100)});
sq(q{SELECT callback_center.issue_coupon('tj-cp' || i, 'u') FROM generate_series(1, 30) i});
sq(q{SELECT callback_center.place_order('tj-' || i, 'u', '[{"sku":"tj-A","qty":2}]', 100, 'tj-cp' || i)
      FROM generate_series(1, 30) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 30 FROM callback_center.orders
		   WHERE order_id LIKE 'tj-%' AND status = 'closed' AND pay_status = 'closed'}),
	'the worker closed every expired order');
is(sq(q{SELECT available FROM callback_center.stock WHERE sku_id = 'tj-A'}), '100', 'stock restored');
is(sq(q{SELECT count(*) FROM callback_center.coupons WHERE coupon_id LIKE 'tj-cp%' AND status = 'available'}),
	'30', 'coupons unfrozen');
is(sq(q{SELECT count(*) FROM callback_center.payments WHERE order_id LIKE 'tj-%' AND status = 'CLOSED'}),
	'30', 'payments closed');
is(sq(q{SELECT string_agg(DISTINCT machine || ':' || event || ':' || actor, ' ' ORDER BY machine || ':' || event || ':' || actor)
         || ' ' || count(*)
         FROM callback_center.state_history
        WHERE (entity_id LIKE 'tj-%' OR entity_id LIKE 'pay_tj-%') AND event IN ('close', 'timeout')}),
	'order:close:callback_center jobs order_pay:timeout:callback_center jobs payment:close:callback_center jobs 90',
	'one history row per move, made by the jobs worker');
ok($rcv->wait_for_requests('/sink', 30), 'order.closed delivered for each order');

# Exactly once: more rounds change nothing.
my $rounds = sq('SELECT rounds FROM callback_center.jobs_status()');
ok($node->poll_query_until('postgres',
		"SELECT rounds >= $rounds + 5 FROM callback_center.jobs_status()"),
	'the worker keeps going round');
is(sq(q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'tj-%' AND event_type = 'order.closed'}),
	'30', 'one order.closed per order');
is(sq(q{SELECT available FROM callback_center.stock WHERE sku_id = 'tj-A'}), '100', 'stock restored once');
is(sq('SELECT orders_closed, errors FROM callback_center.jobs_status()'), '30|0',
	'jobs_status counts 30 closes and no error');

# 2. Active query: a payment PAYING for over 1 s is queried at the
# provider's query endpoint; the 200 answer is applied as a callback.
sq(q{SELECT callback_center.set_provider('tj-pay', 'standard_webhooks',
        ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'])});
sq(sprintf(q{SELECT callback_center.create_endpoint('tj-query', '%s', '{payment.query}', NULL,
        '{"max_attempts":1}')}, $rcv->url('/query')));
sq(q{SELECT callback_center.set_provider_query_endpoint('tj-pay', 'tj-query', allow_plain_http => true)});
$rcv->control('/query', '200', status_body =>
	'{"type":"payment.succeeded","data":{"txn_id":"tq-t1","order_id":"tq-1","amount_cents":500}}');
sq(q{SET callback_center.pay_timeout = '1h';
    SELECT callback_center.place_order('tq-1', 'u', '[{"sku":"tj-A","qty":1}]', 500, NULL, 'tj-pay');
    SELECT callback_center.start_payment('tq-1', 'tj-pay')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'PAID' FROM callback_center.payments WHERE order_id = 'tq-1'}),
	'the query answer paid the payment');
is(sq(q{SELECT o.pay_status || ' ' || p.provider_txn_id FROM callback_center.orders o
        JOIN callback_center.payments p USING (order_id) WHERE order_id = 'tq-1'}),
	'paid tq-t1', 'order paid with the provider transaction');
is(sq(q{SELECT string_agg(status || ':' || outcome, ',') FROM callback_center.payment_queries
        WHERE order_id = 'tq-1'}), 'answered:paid', 'one query, answered, applied once');
my @asked = $rcv->log_lines('/query');
is(scalar(@asked), 1, 'one request reached the query endpoint');
like($asked[0]{body}, qr/"type":\s*"payment.query"/, 'it is a payment.query');
like($asked[0]{body}, qr/"order_id":\s*"tq-1"/, 'about tq-1');
is(sq(q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id = 'tq-1' AND event_type = 'payment.query'}),
	'1', 'the query went to the query endpoint only');
ok($rcv->wait_for_requests('/sink', 31), 'merchant.erp_sync followed the payment');

# A failed query (500, dead after one attempt) is asked again after the
# interval; the second answer is applied.
$rcv->control('/query', '500');
sq(q{SET callback_center.pay_timeout = '1h';
    SELECT callback_center.place_order('tq-2', 'u', '[{"sku":"tj-A","qty":1}]', 600, NULL, 'tj-pay');
    SELECT callback_center.start_payment('tq-2', 'tj-pay')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) >= 1 FROM callback_center.payment_queries
		   WHERE order_id = 'tq-2' AND status = 'failed'}),
	'a query the provider answered 500 failed');
like(sq(q{SELECT error FROM callback_center.payment_queries WHERE order_id = 'tq-2' ORDER BY id LIMIT 1}),
	qr/not delivered: HTTP 500/, 'with the reason');
$rcv->control('/query', '200', status_body =>
	'{"type":"payment.succeeded","data":{"txn_id":"tq-t2","order_id":"tq-2","amount_cents":600}}');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'PAID' FROM callback_center.payments WHERE order_id = 'tq-2'}),
	'asked again, the answer paid it');
is(sq(q{SELECT count(*) FILTER (WHERE status = 'answered') || ' ' || bool_and(status <> 'sent')
        FROM callback_center.payment_queries WHERE order_id = 'tq-2'}),
	'1 true', 'exactly one answered query');

# A bad answer body is recorded, not applied, and the worker carries on.
$rcv->control('/query', '200', status_body => 'this is not json');
sq(q{SET callback_center.pay_timeout = '1h';
    SELECT callback_center.place_order('tq-3', 'u', '[{"sku":"tj-A","qty":1}]', 700, NULL, 'tj-pay');
    SELECT callback_center.start_payment('tq-3', 'tj-pay')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) >= 1 FROM callback_center.payment_queries
		   WHERE order_id = 'tq-3' AND outcome = 'bad_answer'}),
	'a bad answer is recorded as bad_answer');
is(sq(q{SELECT status FROM callback_center.payments WHERE order_id = 'tq-3'}), 'PAYING',
	'and changes nothing');
$rcv->control('/query', undef);

# 3. Errors: orders whose close fails (a user trigger refuses them) are
# logged, recorded with a backoff and retried; the others are still closed,
# even behind more failing orders than a batch holds (8 failing ones due
# first, batches of 7); the worker does not restart.
sq(q{CREATE FUNCTION public.tj_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'order % is frozen', OLD.order_id; END $$;
    CREATE TRIGGER tj_refuse BEFORE UPDATE ON callback_center.orders
        FOR EACH ROW WHEN (OLD.order_id LIKE 'tj-poison-%' AND NEW.status = 'closed')
        EXECUTE FUNCTION public.tj_refuse();
    SELECT callback_center.place_order('tj-poison-' || i, 'u', '[{"sku":"tj-A","qty":1}]', 100)
      FROM generate_series(1, 8) i});
sq(q{SELECT callback_center.place_order('tj-next-' || i, 'u', '[{"sku":"tj-A","qty":1}]', 100)
      FROM generate_series(1, 3) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 3 FROM callback_center.orders
		   WHERE order_id LIKE 'tj-next-%' AND status = 'closed'}),
	'orders behind more failing orders than a batch holds are closed');
ok($node->poll_query_until('postgres',
		q{SELECT errors > 0 AND last_error LIKE 'order tj-poison-% is frozen' FROM callback_center.jobs_status()}),
	'the failure is counted and shown');
is(sq(q{SELECT count(*) FROM callback_center.orders WHERE order_id LIKE 'tj-poison-%' AND status = 'confirmed'}),
	'8', 'the failing orders stay open');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 8 FROM callback_center.close_failures
		   WHERE order_id LIKE 'tj-poison-%' AND failures >= 1 AND retry_at > failed_at
		     AND last_error LIKE '%is frozen'}),
	'each failing order is recorded with its error and retry time');
sq(q{DROP TRIGGER tj_refuse ON callback_center.orders});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 8 FROM callback_center.orders
		   WHERE order_id LIKE 'tj-poison-%' AND status = 'closed'}),
	'closed once the trigger is gone');
is(sq(q{SELECT count(*) FROM callback_center.close_failures}), '0',
	'their failure records went with the close');

# The extension dropped under the worker, then created again.
sq(q{DROP EXTENSION callback_center CASCADE});
sq(q{CREATE EXTENSION callback_center CASCADE});
sq(q{SELECT callback_center.set_stock('tj-B', 5);
    SELECT callback_center.place_order('tj-again', 'u', '[{"sku":"tj-B","qty":2}]', 100)});
ok($node->poll_query_until('postgres',
		q{SELECT o.status = 'closed' AND s.available = 5 FROM callback_center.orders o,
		         callback_center.stock s WHERE o.order_id = 'tj-again' AND s.sku_id = 'tj-B'}),
	'after DROP and CREATE EXTENSION the worker closes orders again');
is(sq(q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'callback_center jobs'}), $jobs_pid,
	'the jobs worker never restarted');
is(worker_pid($node), $delivery_pid, 'nor did the delivery worker');

# SIGTERM: clean exit, restarted by the postmaster.
my $offset = -s $node->logfile;
sq("SELECT pg_terminate_backend($jobs_pid)");
$node->wait_for_log(qr/callback_center jobs worker shutting down/, $offset);
ok($node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM pg_stat_activity
		   WHERE backend_type = 'callback_center jobs' AND pid <> $jobs_pid}),
	'jobs worker restarted after SIGTERM');

$rcv->stop;
$node->stop('fast');
done_testing();
