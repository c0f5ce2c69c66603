# Payment channels, outbound (issue 14): status queries, closes and refunds
# in each provider's own API (WeChat Pay APIv3, Alipay, UnionPay) through the
# delivery worker, against test/mock_provider.py, which verifies every
# request's signature with the merchant's public key and answers signed with
# the provider's key.  The jobs worker asks before it closes an order whose
# payment was started: paid -> applied, unpaid -> closed here and at the
# provider, a failed or unverifiable answer -> retried (attempts on the
# endpoint's schedule, then queries with backoff), never applied; past
# callback_center.close_query_max_wait it closes unasked.
use strict;
use warnings;
use HTTP::Tiny;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use CallbackCenterTest;
use CallbackCenterChannels;

my $dir = keys_dir();

# Keys: the merchant's (one for all three providers), each provider's, and
# a stranger's (the mock's bad signatures).
my $merchant_pub = rsa_key('merchant');
my $wechat_pub = rsa_key('wechat_platform');
my $alipay_pub = rsa_key('alipay');
rsa_key('wrong');
my $org = '中国银联股份有限公司';
my $up_root = root_ca('up_root', 'Test CFCA Root');
my $up_middle = issue_cert('up_middle', '/CN=Test CFCA OCA1', 'up_root', ca => 1);
issue_cert('unionpay_sign', "/C=CN/O=China UnionPay/OU=00/CN=041\@Z2024\@$org\@00000001",
	'up_middle');
# Alipay's certificate mode: a root and the Alipay public-key certificate.
my $ali_root = root_ca('ali_root', 'Test Alipay Root');
my $ali_cert = issue_cert('alipay_cert', '/CN=Test Alipay public key', 'ali_root');
my $wechat_serial = 'PUB_KEY_ID_0114232';
open my $fh, '>', "$dir/wechat_serial" or die;
print $fh $wechat_serial;
close $fh;
my $merchant_key = PostgreSQL::Test::Utils::slurp_file("$dir/merchant.key");

# The mock provider, on a port of its choosing.
my $mock = IPC::Run::start(
	[ 'python3', 'test/mock_provider.py', '--keys', $dir, '--port-file', "$dir/port",
	  '--slow', '3' ],
	'>', "$dir/mock.out", '2>', "$dir/mock.err");
for (1 .. 100) { last if -e "$dir/port"; select(undef, undef, undef, 0.1); }
my $port = PostgreSQL::Test::Utils::slurp_file("$dir/port");
my $mock_url = "http://127.0.0.1:$port";
my $http = HTTP::Tiny->new;

sub mock_say
{
	my (%c) = @_;
	my $r = $http->post("$mock_url/_control", { content => encode_json(\%c) });
	die "mock control failed: $r->{status}" unless $r->{success};
}

sub mock_log
{
	my ($id) = @_;
	my $r = $http->get("$mock_url/_log");
	die "mock log failed" unless $r->{success};
	return grep { defined $_->{id} && $_->{id} eq $id } @{ decode_json($r->{content}) };
}

my $node = cc_node('adapters', conf => q{
callback_center.jobs_interval = '100ms'
callback_center.close_query_max_wait = '1h'
});

sub sq { return $node->safe_psql('postgres', $_[0]); }

sub quote { my ($s) = @_; $s =~ s/'/''/g; return "'$s'"; }

# The three providers, each with its API endpoint (the query endpoint) and
# the merchant's settings.
sq(q{SELECT callback_center.set_stock('ad-A', 1000)});
sq(q{SELECT callback_center.set_provider('wx', 'wechatpay_v3', ARRAY['0123456789abcdef0123456789abcdef'])});
sq(sprintf(q{SELECT callback_center.set_platform_keys('wx', jsonb_build_object(%s, %s))},
	quote($wechat_serial), quote($wechat_pub)));
sq(sprintf(q{SELECT callback_center.set_provider('ali', 'alipay', ARRAY[%s])}, quote($alipay_pub)));
sq(q{SELECT callback_center.set_provider('up', 'unionpay', NULL)});
sq(sprintf(q{SELECT callback_center.set_platform_keys('up', jsonb_build_object('root', %s, 'middle', %s))},
	quote($up_root), quote($up_middle)));
my %api = (wx => [ 'wechatpay_v3', $mock_url, '1900000109', 'MCHSERIAL0001', '{}' ],
	ali => [ 'alipay', "$mock_url/alipay", '2021000000000001', undef, '{}' ],
	up => [ 'unionpay', $mock_url, '777290058110048', '69629715588',
		'{"back_url":"https://merchant.example/unionpay/back"}' ]);
for my $p (sort keys %api)
{
	my ($format, $url, $mch, $serial, $opts) = @{ $api{$p} };
	sq(sprintf(q{SELECT callback_center.create_endpoint('%s-api', '%s', '{payment.query}', NULL,
	        '{"max_attempts": 2, "timeout_ms": 1000}')}, $p, $url));
	sq(sprintf(q{SELECT callback_center.alter_endpoint('%s-api', '{"format": "%s"}')}, $p, $format));
	# The statement carries the key: not in the server log.
	sq(sprintf(q{SET log_statement = 'none';
	    SELECT callback_center.set_merchant('%s', '%s', %s, %s, '%s')},
		$p, $mch, quote($merchant_key), defined $serial ? quote($serial) : 'NULL', $opts));
	sq(sprintf(q{SELECT callback_center.set_provider_query_endpoint('%s', '%s-api')}, $p, $p));
}
is(sq(q{SELECT string_agg(provider || ':' || format || ':' || merchant_id, ' ' ORDER BY provider)
        FROM callback_center.merchants}),
	'ali:alipay:2021000000000001 up:unionpay:777290058110048 wx:wechatpay_v3:1900000109',
	'merchant settings loaded, shown without their keys');

# An order of amount cents with its payment started at provider p, its
# deadline then passed (made due now, not waited for).
sub due_order
{
	my ($p, $id, $amount, $say, %o) = @_;
	mock_say(id => $id, amount => $amount, say => $say);
	sq(sprintf(q{SET callback_center.pay_timeout = '1h';
	    SELECT callback_center.place_order('%s', 'u', '[{"sku":"ad-A","qty":1}]', %d, NULL, '%s');
	    %s
	    UPDATE callback_center.orders SET pay_deadline = now() - interval '%s' WHERE order_id = '%s'},
		$id, $amount, $p,
		$o{no_payment} ? '' : "SELECT callback_center.start_payment('$id', '$p');",
		$o{overdue} // '1 second', $id));
}

sub order_state
{
	my ($id) = @_;
	return sq(qq{SELECT o.status || ' ' || o.pay_status || ' ' || p.status || ' '
	                    || coalesce(p.provider_txn_id, '-')
	               FROM callback_center.orders o JOIN callback_center.payments p USING (order_id)
	              WHERE order_id = '$id'});
}

sub queries
{
	my ($id) = @_;
	return sq(qq{SELECT string_agg(status || ':' || coalesce(outcome, '-'), ',' ORDER BY id)
	               FROM callback_center.payment_queries WHERE order_id = '$id'});
}

for my $p (qw(wx ali up))
{
	my $format = $api{$p}[0];

	# Paid: the provider says the order was paid; the answer pays it.
	due_order($p, "$p-paid", 500, 'paid');
	ok($node->poll_query_until('postgres',
			"SELECT status = 'PAID' FROM callback_center.payments WHERE order_id = '$p-paid'"),
		"$format: asked at the deadline, the provider said paid");
	like(order_state("$p-paid"), qr/^confirmed paid PAID \S+-$p-paid$/,
		"$format: order paid with the provider's transaction");
	is(queries("$p-paid"), 'answered:paid', "$format: one query, answered paid");
	my @seen = mock_log("$p-paid");
	is(scalar(grep { $_->{op} eq 'query' } @seen), 1, "$format: one query reached the provider");
	ok((grep { $_->{verified} } @seen) == @seen, "$format: its merchant signature verified");
	is(scalar(grep { $_->{op} eq 'close' } @seen), 0, "$format: a paid order is not closed");

	# Unpaid: closed here, and at the provider (UnionPay has no close).
	due_order($p, "$p-unpaid", 300, 'unpaid');
	ok($node->poll_query_until('postgres',
			"SELECT status = 'closed' FROM callback_center.orders WHERE order_id = '$p-unpaid'"),
		"$format: unpaid at the provider, closed");
	is(order_state("$p-unpaid"), 'closed closed CLOSED -', "$format: payment closed too");
	is(queries("$p-unpaid"), 'answered:closed', "$format: the query's outcome");
	if ($p eq 'up')
	{
		is(sq(q{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id = 'up-unpaid'
		         AND event_type = 'payment.close'}), '0', "$format: no close to send");
	}
	else
	{
		ok($node->poll_query_until('postgres',
				"SELECT outcome = 'closed' FROM callback_center.provider_answers
				  WHERE aggregate_id = '$p-unpaid' AND event_type = 'payment.close'"),
			"$format: the provider closed it");
		my @close = grep { $_->{op} eq 'close' } mock_log("$p-unpaid");
		ok(@close == 1 && $close[0]{verified}, "$format: one signed close request");
	}

	# Unknown to the provider: closed here, nothing to close there.
	due_order($p, "$p-gone", 300, 'notfound');
	ok($node->poll_query_until('postgres',
			"SELECT status = 'closed' FROM callback_center.orders WHERE order_id = '$p-gone'"),
		"$format: not found at the provider, closed");
	is(queries("$p-gone"), 'answered:closed', "$format: the answer was understood");
	is(sq(qq{SELECT count(*) FROM callback_center.outbox WHERE aggregate_id = '$p-gone'
	         AND event_type = 'payment.close'}), '0', "$format: no close sent for it");

	# A bad signature: every attempt fails, the query dies after the
	# endpoint's two attempts, nothing is applied; asked again, an honest
	# unpaid closes it.
	due_order($p, "$p-bad", 400, 'badsig');
	ok($node->poll_query_until('postgres',
			"SELECT count(*) >= 1 FROM callback_center.payment_queries
			  WHERE order_id = '$p-bad' AND status = 'failed'"),
		"$format: a badly signed answer fails the query");
	is(order_state("$p-bad"), 'confirmed paying PAYING -', "$format: and is not applied");
	is(sq(qq{SELECT string_agg(a.attempt || ':' || coalesce(a.http_status, 0) || ':'
	                           || (a.error LIKE '%does not verify%'), ',' ORDER BY a.id)
	           FROM callback_center.delivery_attempts a
	           JOIN callback_center.payment_queries q ON q.outbox_id = a.outbox_id
	          WHERE q.order_id = '$p-bad' AND q.id = (SELECT min(id) FROM callback_center.payment_queries
	                                                   WHERE order_id = '$p-bad')}),
		'1:200:true,2:200:true', "$format: retried on the schedule, dead after it");
	if ($p eq 'wx')
	{
		my @tries = grep { $_->{op} eq 'query' } mock_log('wx-bad');
		ok(@tries >= 2 && $tries[0]{nonce} ne $tries[1]{nonce},
			'wechatpay_v3: each attempt is signed afresh (a new nonce)');
	}
	mock_say(id => "$p-bad", say => 'unpaid');
	ok($node->poll_query_until('postgres',
			"SELECT status = 'closed' FROM callback_center.orders WHERE order_id = '$p-bad'"),
		"$format: asked again after a backoff, unpaid closes it");

	# A refund request, built and signed in the provider's format, its
	# answer verified and kept for the refunds to apply.
	sq(sprintf(q{SELECT callback_center.enqueue_to('%s-api', 'refund.request', '%s-paid',
	        jsonb_build_object('refund_id', '%s-r1', 'order_id', '%s-paid', 'provider', '%s',
	                           'provider_txn_id', (SELECT provider_txn_id FROM callback_center.payments
	                                                WHERE order_id = '%s-paid'),
	                           'amount_cents', 200, 'total_cents', 500, 'currency', 'CNY',
	                           'reason', 'broken'))}, $p, $p, $p, $p, $p, $p));
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM callback_center.provider_answers
			  WHERE aggregate_id = '$p-paid' AND event_type = 'refund.request'"),
		"$format: the refund request was answered");
	is(sq(qq{SELECT answer->>'refund_id' || ' ' || (answer->>'status') || ' '
	                || coalesce(answer->>'amount_cents', '-')
	           FROM callback_center.provider_answers
	          WHERE aggregate_id = '$p-paid' AND event_type = 'refund.request'}),
		# (Alipay's answer names no amount: its refund_fee is the trade's total.)
		$p eq 'up' ? "$p-r1 processing 200" : $p eq 'ali' ? "$p-r1 success -" : "$p-r1 success 200",
		"$format: the normalized refund answer");
	my @refund = grep { $_->{op} eq 'refund' } mock_log("$p-r1");
	ok(@refund == 1 && $refund[0]{verified}, "$format: one signed refund request");
	if ($p eq 'wx')
	{
		is($refund[0]{path}, '/v3/refund/domestic/refunds', 'wechatpay_v3: the refunds API');
		is(join(' ', map { $refund[0]{params}{$_} // '-' } qw(out_trade_no out_refund_no reason))
			  . ' ' . join(' ', map { $refund[0]{params}{amount}{$_} } qw(refund total currency)),
			'wx-paid wx-r1 broken 200 500 CNY', 'wechatpay_v3: what it asks for');
		is($refund[0]{mchid} . ' ' . $refund[0]{serial_no}, '1900000109 MCHSERIAL0001',
			'wechatpay_v3: Authorization names the merchant and its certificate');
	}
	elsif ($p eq 'ali')
	{
		is(join(' ', map { $refund[0]{params}{$_} } qw(app_id method sign_type charset version)),
			'2021000000000001 alipay.trade.refund RSA2 utf-8 1.0', 'alipay: the gateway parameters');
		is(decode_json($refund[0]{params}{biz_content})->{refund_amount}, '2.00',
			'alipay: the amount in yuan');
	}
	else
	{
		is(join(' ', map { $refund[0]{params}{$_} } qw(txnType signMethod certId merId origQryId txnAmt)),
			'04 01 69629715588 777290058110048 up-up-paid 200', 'unionpay: the refund fields');
	}
}

# WeChat Pay: a provider error twice (the first query dies after its two
# attempts), then paid; a slow provider (the attempt times out), then paid.
due_order('wx', 'wx-flaky', 700, [ 'error', 'error', 'paid' ]);
ok($node->poll_query_until('postgres',
		q{SELECT status = 'PAID' FROM callback_center.payments WHERE order_id = 'wx-flaky'}),
	'wechatpay_v3: errors, then paid');
is(queries('wx-flaky'), 'failed:error,answered:paid', 'the failed query was asked again');
due_order('wx', 'wx-slow', 800, [ 'slow', 'paid' ]);
ok($node->poll_query_until('postgres',
		q{SELECT status = 'PAID' FROM callback_center.payments WHERE order_id = 'wx-slow'}),
	'wechatpay_v3: a timed-out attempt, then paid');
like(sq(q{SELECT string_agg(coalesce(a.error, 'ok'), ',' ORDER BY a.id)
            FROM callback_center.delivery_attempts a
            JOIN callback_center.payment_queries q ON q.outbox_id = a.outbox_id
           WHERE q.order_id = 'wx-slow'}), qr/^[^,]*timed out[^,]*,ok$/,
	'the first attempt timed out, the second was applied');

# The longest wait: an order past its deadline by more than
# close_query_max_wait is closed without asking; one whose payment never
# started closes as before.
due_order('wx', 'wx-late', 900, 'paid', overdue => '2 hours');
due_order('wx', 'wx-nopay', 900, 'paid', no_payment => 1);
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 2 FROM callback_center.orders
		   WHERE order_id IN ('wx-late', 'wx-nopay') AND status = 'closed'}),
	'past the longest wait, or never paying: closed at once');
is(sq(q{SELECT count(*) FROM callback_center.payment_queries WHERE order_id IN ('wx-late', 'wx-nopay')}),
	'0', 'without asking');

# A provider that keeps failing: asked again and again (with backoff) until
# the longest wait passes, then the order closes unasked.
due_order('wx', 'wx-stuck', 950, 'error');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) >= 2 FROM callback_center.payment_queries
		   WHERE order_id = 'wx-stuck' AND status = 'failed'}),
	'a failing provider is asked again');
is(order_state('wx-stuck'), 'confirmed paying PAYING -', 'the order waits for an answer');
sq(q{ALTER SYSTEM SET callback_center.close_query_max_wait = '1s'; SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'closed' FROM callback_center.orders WHERE order_id = 'wx-stuck'}),
	'once close_query_max_wait has passed, it is closed anyway');
sq(q{ALTER SYSTEM RESET callback_center.close_query_max_wait; SELECT pg_reload_conf()});

# Alipay in certificate mode: the answer names its certificate by SN; the
# certificate must chain to the loaded root.
sq(q{SELECT callback_center.set_provider('alic', 'alipay', NULL)});
sq(sprintf(q{SELECT callback_center.set_platform_keys('alic', jsonb_build_object(
        callback_center.alipay_cert_sn(%s), %s, callback_center.alipay_cert_sn(%s), %s))},
	quote($ali_root), quote($ali_root), quote($ali_cert), quote($ali_cert)));
sq(sprintf(q{SELECT callback_center.create_endpoint('alic-api', '%s/alipay-cert', '{payment.query}',
        NULL, '{"max_attempts": 2, "timeout_ms": 1000}');
    SELECT callback_center.alter_endpoint('alic-api', '{"format": "alipay"}');
    SET log_statement = 'none';
    SELECT callback_center.set_merchant('alic', '2021000000000002', %s, NULL,
        jsonb_build_object('app_cert_sn', callback_center.alipay_cert_sn(%s),
                           'alipay_root_cert_sn', callback_center.alipay_root_cert_sn(%s)));
    RESET log_statement;
    SELECT callback_center.set_provider_query_endpoint('alic', 'alic-api')},
	$mock_url, quote($merchant_key), quote($ali_cert), quote($ali_root)));
mock_say(alipay_cert_sn => sq(sprintf(q{SELECT callback_center.alipay_cert_sn(%s)}, quote($ali_cert))));
due_order('alic', 'alic-paid', 600, 'paid');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'PAID' FROM callback_center.payments WHERE order_id = 'alic-paid'}),
	'alipay certificate mode: the answer verified with the certificate it names');
my ($alic) = grep { $_->{op} eq 'query' } mock_log('alic-paid');
is(join(' ', map { $alic->{params}{$_} } qw(app_cert_sn alipay_root_cert_sn)),
	sq(sprintf(q{SELECT callback_center.alipay_cert_sn(%s) || ' ' || callback_center.alipay_root_cert_sn(%s)},
		quote($ali_cert), quote($ali_root))),
	'alipay certificate mode: the requests carry app_cert_sn and alipay_root_cert_sn');
ok($alic->{verified}, 'and are signed over them');
mock_say(alipay_cert_sn => 'NOSUCHSN');
due_order('alic', 'alic-unknown', 600, 'paid');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) >= 1 FROM callback_center.payment_queries
		   WHERE order_id = 'alic-unknown' AND status = 'failed'}),
	'alipay certificate mode: an answer naming an unknown certificate fails');
is(order_state('alic-unknown'), 'confirmed paying PAYING -', 'and is not applied');

# Refund queries, WeChat Pay and Alipay.
for my $p (qw(wx ali))
{
	sq(sprintf(q{SELECT callback_center.enqueue_to('%s-api', 'refund.query', '%s-paid',
	        jsonb_build_object('refund_id', '%s-r1', 'order_id', '%s-paid', 'provider', '%s'))},
		$p, $p, $p, $p, $p));
	ok($node->poll_query_until('postgres',
			"SELECT answer->>'status' = 'success' FROM callback_center.provider_answers
			  WHERE aggregate_id = '$p-paid' AND event_type = 'refund.query'"),
		"$api{$p}[0]: the refund query's answer");
}
my @rq = grep { $_->{op} eq 'refund_query' } mock_log('wx-r1');
is($rq[0]{method} . ' ' . $rq[0]{path}, 'GET /v3/refund/domestic/refunds/wx-r1',
	'wechatpay_v3: the refund query');

# Forged answers count against the endpoint's circuit breaker, as failing
# HTTP answers do: four badly signed answers open it (three failures in its
# window suffice; open or, past open_ms, half open), and a badly signed
# probe does not close it again.
sq(q{SELECT callback_center.create_endpoint('brk-api', '} . $mock_url . q{', '{payment.query}', NULL,
        '{"max_attempts": 5, "timeout_ms": 1000, "breaker_min_requests": 3, "breaker_window_s": 60,
          "breaker_open_ms": 1000}');
    SELECT callback_center.alter_endpoint('brk-api', '{"format": "wechatpay_v3"}')});
for my $i (1 .. 4)
{
	mock_say(id => "brk-$i", amount => 100, say => 'badsig');
	sq(qq{SELECT callback_center.enqueue_to('brk-api', 'payment.query', 'brk-$i',
	        '{"order_id": "brk-$i", "provider": "wx"}')});
}
my $brk_attempts = q{SELECT count(*) FROM callback_center.delivery_attempts a
                       JOIN callback_center.endpoints e ON e.id = a.endpoint_id
                      WHERE e.name = 'brk-api'};
ok($node->poll_query_until('postgres', "SELECT ($brk_attempts) >= 4"),
	'four badly signed answers recorded');
my $brk_state = q{SELECT coalesce((SELECT s.breaker FROM callback_center.endpoint_state s
                                     JOIN callback_center.endpoints e ON e.id = s.endpoint_id
                                    WHERE e.name = 'brk-api'), 'none')};
like(sq($brk_state), qr/^(open|half_open)$/, 'they opened the breaker');
ok($node->poll_query_until('postgres', "SELECT ($brk_attempts) >= 5"),
	'after open_ms, a probe');
like(sq($brk_state), qr/^(open|half_open)$/, 'a badly signed probe does not close it');

# The merchant's private key is readable by nobody but the owner.
sq(q{CREATE ROLE ad_app LOGIN IN ROLE callback_center_app;
    CREATE ROLE ad_admin LOGIN IN ROLE callback_center_admin});
for my $role (qw(ad_app ad_admin))
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"SET ROLE $role; SELECT private_key FROM callback_center.merchant_settings");
	like($err, qr/permission denied/, "$role cannot read merchant private keys");
}
my ($rc, $out, $err) = $node->psql('postgres',
	q{SET ROLE ad_admin; SELECT callback_center._merchant_sign('wx', '\x00')});
like($err, qr/permission denied/, 'nor sign with them');
unlike(PostgreSQL::Test::Utils::slurp_file($node->logfile), qr/PRIVATE KEY/,
	'no key in the server log');

is(sq('SELECT errors FROM callback_center.jobs_status()'), '0', 'the jobs worker raised no error');

$mock->kill_kill;
$node->stop;
done_testing();
