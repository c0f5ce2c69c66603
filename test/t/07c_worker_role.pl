# The workers' statements run as callback_center_worker, not as the
# superuser they connect as (issue 11 item 1, "a dedicated non-superuser
# role").  pg_stat_statements records the role each statement ran as: every
# statement of the delivery worker (claim, record, settle) and of the jobs
# worker (due orders, close, active query) is callback_center_worker's, and
# none is the superuser's.  The role cannot log in and holds nothing beyond
# the queue: no order, no payment, no provider secret, no function of the
# business API.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('worker_role', conf => q{
shared_preload_libraries = 'pg_stat_statements, callback_center'
pg_stat_statements.track = all
callback_center.pay_timeout = '1s'
callback_center.jobs_interval = '100ms'
});

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql('CREATE EXTENSION pg_stat_statements');
sql(qq{SELECT callback_center.create_endpoint('wr', '@{[$rcv->url('/wr')]}', '{*}', '$secret')});
sql(q{SELECT callback_center.set_stock('wr-sku', 10);
      SELECT callback_center.set_provider('wr-pay', 'standard_webhooks', NULL);
      SELECT * FROM callback_center.place_order('wr-1', 'u', '[{"sku":"wr-sku","qty":1}]', 100, NULL, 'wr-pay')});
sql(q{SELECT callback_center.enqueue('wr.ev', 'a' || i, jsonb_build_object('n', i))
      FROM generate_series(1, 20) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM callback_center.outbox WHERE status <> 'delivered'}),
	'the worker delivers every event');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'closed' FROM callback_center.orders WHERE order_id = 'wr-1'}),
	'the jobs worker closes the expired order');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM callback_center.outbox WHERE status <> 'delivered'}),
	'and its order.closed event is delivered');

# The statements each worker runs, by the role they ran as (top level: the
# statements inside the SECURITY DEFINER jobs functions run as their owner).
sub roles_of
{
	my ($where) = @_;
	return sql(qq{SELECT coalesce(string_agg(DISTINCT userid::regrole::text, ','), 'none')
	                FROM pg_stat_statements WHERE toplevel AND ($where)});
}
is(roles_of(q{query ILIKE 'UPDATE callback_center.outbox%' OR query ILIKE 'WITH%callback_center.outbox%'}),
	'callback_center_worker', 'the delivery worker claims and settles as callback_center_worker');
is(roles_of(q{query ILIKE '%INSERT INTO callback_center.delivery_attempts%'}),
	'callback_center_worker', 'and records its attempts as it');
is(roles_of(q{query ILIKE '%callback_center._orders_due%' OR query ILIKE '%callback_center.close_expired_orders%'
              OR query ILIKE '%callback_center.query_stuck_payments%'
              OR query ILIKE '%callback_center.refund_jobs%'}),
	'callback_center_worker', 'the jobs worker runs its jobs as callback_center_worker');
is(sql(q{SELECT count(*) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
          WHERE r.rolsuper AND s.toplevel AND (s.query ILIKE '%callback_center.outbox o%'
                                OR s.query ILIKE '%callback_center.endpoint_state%'
                                OR s.query ILIKE '%callback_center._orders_due%')}), '0',
	'no worker statement ran as a superuser');

# What the role may not do.
is(sql(q{SELECT rolcanlogin OR rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls
           FROM pg_roles WHERE rolname = 'callback_center_worker'}), 'f',
	'the role cannot log in and has no attribute');
is(sql(q{SELECT has_table_privilege('callback_center_worker', 'callback_center.orders', 'SELECT')
             OR has_table_privilege('callback_center_worker', 'callback_center.payments', 'SELECT')
             OR has_table_privilege('callback_center_worker', 'callback_center.providers', 'SELECT')
             OR has_table_privilege('callback_center_worker', 'callback_center.outbox', 'DELETE')
             OR has_table_privilege('callback_center_worker', 'callback_center.endpoints', 'INSERT')
             OR has_function_privilege('callback_center_worker', 'callback_center.provider_secret(text)', 'EXECUTE')
             OR has_function_privilege('callback_center_worker', 'callback_center.create_endpoint(text, text, text[], text, jsonb)', 'EXECUTE')
             OR has_function_privilege('callback_center_worker', 'callback_center.place_order(text, text, jsonb, bigint, text, text)', 'EXECUTE')}),
	'f', 'it holds no order, payment, provider secret or business function');

done_testing();
