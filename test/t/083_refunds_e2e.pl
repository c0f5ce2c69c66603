# Refunds end to end through the workers (issue 14 section 3), against
# test/mock_provider.py in each provider's format (WeChat Pay APIv3, Alipay,
# UnionPay): request_refund queues refund.request to the provider's API
# endpoint, the delivery worker sends it signed by the merchant and keeps
# the provider's verified answer, the jobs worker hands it to
# _apply_refund_answer.  A full refund and two partial ones that add up to
# the payment; a duplicate request sends nothing again; a refund larger
# than what is left is refused and sends nothing; an answer saying
# processing leaves the refund open until a refund.query's answer settles
# it.
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
my $merchant_pub = rsa_key('merchant');
my $wechat_pub = rsa_key('wechat_platform');
my $alipay_pub = rsa_key('alipay');
rsa_key('wrong');
my $org = '中国银联股份有限公司';
my $up_root = root_ca('up_root', 'Test CFCA Root');
my $up_middle = issue_cert('up_middle', '/CN=Test CFCA OCA1', 'up_root', ca => 1);
issue_cert('unionpay_sign', "/C=CN/O=China UnionPay/OU=00/CN=041\@Z2024\@$org\@00000001",
	'up_middle');
my $wechat_serial = 'PUB_KEY_ID_0114232';
open my $fh, '>', "$dir/wechat_serial" or die;
print $fh $wechat_serial;
close $fh;
my $merchant_key = PostgreSQL::Test::Utils::slurp_file("$dir/merchant.key");

my $mock = IPC::Run::start(
	[ 'python3', 'test/mock_provider.py', '--keys', $dir, '--port-file', "$dir/port" ],
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

# What the mock saw for a refund id: its operations, each signature checked.
sub mock_ops
{
	my ($id) = @_;
	my $r = $http->get("$mock_url/_log");
	die "mock log failed" unless $r->{success};
	return join(',', map { $_->{op} . ($_->{verified} ? '' : '(unverified)') }
		  grep { defined $_->{id} && $_->{id} eq $id } @{ decode_json($r->{content}) });
}

my $node = cc_node('refunds_e2e', conf => q{
callback_center.jobs_interval = '100ms'
});

sub sq { return $node->safe_psql('postgres', $_[0]); }

sub quote { my ($s) = @_; $s =~ s/'/''/g; return "'$s'"; }

sq(q{SELECT callback_center.set_stock('re-A', 1000)});
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
	        '{"max_attempts": 2, "timeout_ms": 2000}')}, $p, $url));
	sq(sprintf(q{SELECT callback_center.alter_endpoint('%s-api', '{"format": "%s"}')}, $p, $format));
	sq(sprintf(q{SET log_statement = 'none';
	    SELECT callback_center.set_merchant('%s', '%s', %s, %s, '%s')},
		$p, $mch, quote($merchant_key), defined $serial ? quote($serial) : 'NULL', $opts));
	sq(sprintf(q{SELECT callback_center.set_provider_query_endpoint('%s', '%s-api')}, $p, $p));
}

# A paid order of 1000 cents at provider p.
sub paid_order
{
	my ($p, $id) = @_;
	sq(qq{SELECT callback_center.place_order('$id', 'u', '[{"sku":"re-A","qty":1}]', 1000, NULL, '$p')});
	is(sq(qq{SELECT callback_center._apply_payment_result('$p', 'txn-$id', '$id', 1000, NULL, 'success', 'callback')}),
		'paid', "$id paid");
}

sub refund_state
{
	my ($id) = @_;
	return sq(qq{SELECT r.status || ' ' || p.status || ' ' || o.status || '/' || o.pay_status
	               FROM callback_center.refunds r
	               JOIN callback_center.payments p ON p.order_id = r.order_id
	               JOIN callback_center.orders o ON o.order_id = r.order_id
	              WHERE r.refund_id = '$id'});
}

sub request
{
	my ($order, $cents, $id) = @_;
	return sq(qq{SELECT status || ' ' || mode || ' ' || is_new
	               FROM callback_center.request_refund('$order', $cents, 'e2e', '$id')});
}

# Waits until the refund is final, or PROCESSING when the answer said so;
# an open refund is then asked about at once (next_query_at now) rather
# than after the minute of the schedule.
sub settled
{
	my ($id, $want) = @_;
	return $node->poll_query_until('postgres',
		"SELECT status = '$want' FROM callback_center.refunds WHERE refund_id = '$id'");
}

# Asks UnionPay about a refund now, in a later second than its request: the
# query must name the refund by the request's txnTime, not its own time.
sub query_later
{
	my ($id) = @_;
	select(undef, undef, undef, 1.1);
	sq(qq{UPDATE callback_center.refunds SET next_query_at = now() WHERE refund_id = '$id'});
}

for my $p (qw(wx ali up))
{
	my $format = $api{$p}[0];
	# Refund ids as UnionPay takes them: 8 to 40 letters and digits.
	my ($full, $part1, $part2, $over) = map { "${p}re$_" . '0001' } qw(full parta partb over);

	# A full refund.
	paid_order($p, "$p-e1");
	my $stock = sq(q{SELECT available FROM callback_center.stock WHERE sku_id = 're-A'});
	mock_say(id => $full, say => 'success', amount => 1000);
	is(request("$p-e1", 1000, $full), 'PENDING api true', "$format: a full refund asked for");
	if ($p eq 'up')
	{
		# UnionPay answers a refund request with "accepted": the result
		# comes with the notification or the refund query.
		ok(settled($full, 'PROCESSING'), "$format: accepted, processing");
		query_later($full);
	}
	ok(settled($full, 'SUCCESS'), "$format: the provider's answer settles it");
	is(refund_state($full), 'SUCCESS REFUNDED refunded/refunded', "$format: payment and order refunded");
	is(sq(q{SELECT available FROM callback_center.stock WHERE sku_id = 're-A'}), $stock + 1,
		"$format: the order's stock is back");
	like(mock_ops($full), qr/^refund(,refund_query|,query)*$/, "$format: signed requests only");

	# The same request again: the same refund, nothing sent again.
	is(request("$p-e1", 1000, $full), 'SUCCESS api false', "$format: a duplicate request is the same refund");

	# Two partial refunds adding up to the payment.
	paid_order($p, "$p-e2");
	mock_say(id => $part1, say => 'success', amount => 300);
	mock_say(id => $part2, say => 'success', amount => 700);
	is(request("$p-e2", 300, $part1), 'PENDING api true', "$format: a partial refund asked for");
	if ($p eq 'up')
	{
		ok(settled($part1, 'PROCESSING'), "$format: accepted");
		query_later($part1);
	}
	ok(settled($part1, 'SUCCESS'), "$format: the partial refund succeeds");
	is(refund_state($part1), 'SUCCESS PARTIALLY_REFUNDED confirmed/partially_refunded',
		"$format: the payment partially refunded");

	# More than is left: refused, nothing sent.
	my ($ret, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSELECT * FROM callback_center.request_refund('$p-e2', 701, 'e2e', '$over')");
	like($err, qr/CB061.*Paid 1000 cents; 300 refunded or being refunded; 700 left/s,
		"$format: a refund over what is left is refused (CB061)");
	is(sq(qq{SELECT count(*) FROM callback_center.refunds WHERE refund_id = '$over'}), '0',
		"$format: nothing written");

	is(request("$p-e2", 700, $part2), 'PENDING api true', "$format: the rest asked for");
	if ($p eq 'up')
	{
		ok(settled($part2, 'PROCESSING'), "$format: accepted");
		query_later($part2);
	}
	ok(settled($part2, 'SUCCESS'), "$format: the rest succeeds");
	is(refund_state($part2), 'SUCCESS REFUNDED refunded/refunded',
		"$format: the payment refunded in full by the two");
	is(mock_ops($over), '', "$format: the refused refund never reached the provider");
}

is(sq('SELECT errors FROM callback_center.jobs_status()'), '0', 'the jobs worker raised no error');

$mock->kill_kill;
$node->stop;
done_testing();
