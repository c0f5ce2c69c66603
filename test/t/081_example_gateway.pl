# examples/payment_gateway.py, the example web tier: started against a
# cluster, it passes a provider's POST (raw body and headers) to
# payment_callback and copies the answer back.  A signed notification pays
# the order; a forged one gets the provider's refusal and records nothing; a
# body full of quotes and backslashes reaches SQL only as a value.
use strict;
use warnings;
use HTTP::Tiny;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use CallbackCenterTest;

my $node = cc_node('gateway');
my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
$node->safe_psql('postgres', qq{
	CREATE ROLE shop LOGIN IN ROLE callback_center_app;
	GRANT USAGE ON SCHEMA callback_center TO shop;
	SELECT callback_center.set_provider('acme', 'standard_webhooks', ARRAY['$secret']);
	SELECT callback_center.set_stock('gw-sku', 10);
	SELECT callback_center.place_order('gw-1', 'u', '[{"sku": "gw-sku", "qty": 1}]', 990, NULL, 'acme');
});

my ($out, $err) = ('', '');
my $psql = $node->config_data('--bindir') . '/psql';
my ($host, $pgport) = ($node->host, $node->port);
# The example connects as the application role, through libpq's variables.
my $server = IPC::Run::start(
	[ 'python3', 'examples/payment_gateway.py', '--port', '0', '--psql', $psql ],
	init => sub {
		@ENV{qw(PGHOST PGPORT PGDATABASE PGUSER)} = ($host, $pgport, 'postgres', 'shop');
	},
	'>', \$out, '2>', \$err);
my $timer = IPC::Run::timer($PostgreSQL::Test::Utils::timeout_default);
$timer->start;
$server->pump until $out =~ /listening on [0-9.]+:(\d+)/ || $timer->is_expired;
my ($port) = $out =~ /listening on [0-9.]+:(\d+)/;
ok($port, 'the example listens') or BAIL_OUT("example did not start: $err");

my $http = HTTP::Tiny->new(timeout => 30);
sub post
{
	my ($path, $headers, $body) = @_;
	my $r = $http->request('POST', "http://127.0.0.1:$port$path",
		{ headers => $headers, content => $body });
	return "$r->{status}|$r->{content}";
}

sub signed_headers
{
	my ($msg_id, $body, $key) = @_;
	my $ts = time();
	my $sig = $node->safe_psql('postgres',
		"SELECT callback_center.sign_webhook('" . ($key // $secret) . "', '$msg_id', $ts, \$b\$$body\$b\$)");
	return { 'webhook-id' => $msg_id, 'webhook-timestamp' => "$ts",
		'webhook-signature' => $sig, 'content-type' => 'application/json' };
}

my $body = '{"type": "payment.succeeded", "data": {"txn_id": "gw-t1", "order_id": "gw-1", "amount_cents": 990, "currency": "CNY"}}';
is(post('/pay/acme', signed_headers('gw-m1', $body), $body), '200|{"received":true}',
	'a signed notification is acknowledged');
is($node->safe_psql('postgres', "SELECT pay_status FROM callback_center.orders WHERE order_id = 'gw-1'"),
	'paid', 'the order is paid');
is(post('/pay/acme', signed_headers('gw-m1', $body), $body), '200|{"received":true}',
	'a repeat gets the same answer');

my $forged = signed_headers('gw-m2', $body, 'whsec_b3RoZXIgc2VjcmV0IGtleQ==');
is(post('/pay/acme', $forged, $body), '401|{"received":false,"reason":"invalid signature"}',
	'a forged notification gets the refusal');
is($node->safe_psql('postgres', "SELECT count(*) FROM callback_center.callback_record WHERE biz_id = 'gw-m2'"),
	'0', 'and is not recorded');

# Quotes, backslashes, a psql variable and a psql command in the body: a
# value to SQL, so only the signature check sees it.
my $nasty = '{"type": "x", "data": "\'; DROP TABLE callback_center.orders; -- :\'body\' \\\\g \\\\! echo pwned"}';
is(post('/pay/acme', signed_headers('gw-m3', $nasty), $nasty), '200|{"received":true}',
	'a body with quotes and psql syntax is just a body');
is($node->safe_psql('postgres', "SELECT payload FROM callback_center.callback_record WHERE biz_id = 'gw-m3'"),
	$nasty, 'recorded byte for byte');
# Each request is a new session: an unreadable signed body as a session's
# first payment_callback read the unassigned message record (fixed).
my $bad = '{"type": "payment.succeeded", "data": "\\!"';
is(post('/pay/acme', signed_headers('gw-m4', $bad), $bad),
	'400|{"reason": "unreadable payment message", "received": false}',
	'an unreadable signed body, first in its session: refused once with 400');
# The body travels as bytes (the bytea overload): bytes that are not UTF-8
# reach the database, which answers for the scheme.
my $latin1 = "{\"type\": \"x\", \"data\": \"caf\xe9\"}";
is(post('/pay/acme', signed_headers('gw-m5', 'x'), $latin1),
	'400|{"received":false,"reason":"malformed body"}',
	'a body that is not UTF-8 gets the database\'s answer');
like(post('/pay/nosuch', {}, 'x'), qr/^500\|/, 'an unknown provider is the operator\'s problem: 500');
like(post('/elsewhere', {}, 'x'), qr/^404\|/, 'other paths: 404');

$server->pump_nb;
diag($err) if $err =~ /failed/;
$server->kill_kill;
$node->stop;
done_testing();
