# Refund notifications, inbound (issue 14 section 3), signed as each
# provider signs them, through payment_callback: WeChat Pay v3
# (REFUND.SUCCESS / REFUND.CLOSED / REFUND.ABNORMAL, resource encrypted like
# a transaction's), Alipay (a trade notification carrying refund_fee,
# gmt_refund and out_biz_no), UnionPay (txnType 04, orderId the refund's)
# and WeChat Pay v2 (req_info encrypted under the MD5 of the API key).  Each moves the refund through _apply_refund_answer once
# (recorded under the message's key; a repeat gets the first answer), is
# answered in the provider's format, and never raises for what the
# provider sent: a refund we do not have, another provider's refund or
# another amount are outcomes, acknowledged; a bad signature or a
# malformed body is the provider's failure answer, recording nothing.
use strict;
use warnings;
use Encode qw(encode decode);
use Digest::MD5;
use Digest::SHA;
use POSIX qw(strftime);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use CallbackCenterTest;
use CallbackCenterChannels;

system('make', '-s', 'test/unit/gcm_seal') == 0
  or die "could not build test/unit/gcm_seal";
channel_dir(PostgreSQL::Test::Utils::tempdir);

my $apiv3 = 'k3y0f32bytesForAPIv3abcdefghijkl';
my $serial = '5157F09EFDC096DE15EBE81A47057A72';
my $cert = self_signed('plat', "0x$serial");
rsa_key('wrong');
my $ali_pub = rsa_key('ali');
(my $ali_bare = $ali_pub) =~ s/-----[^-]+-----//g;
$ali_bare =~ s/\s+//g;
my $org = '中国银联股份有限公司';
my $root = root_ca('root', 'Test CFCA Root');
my $middle = issue_cert('middle', '/CN=Test CFCA OCA1', 'root', ca => 1);
my $up_cert = issue_cert('sign', "/C=CN/O=China UnionPay/OU=00/CN=041\@Z2024\@$org\@00000001", 'middle');

my $node = cc_node('refund_notify');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# payment_callback's row as "status|body|is_first|outcome".
sub callback
{
	my ($provider, $headers, $body) = @_;
	return sql("SELECT http_status || '|' || response_body || '|' || is_first || '|' || outcome"
		  . " FROM callback_center.payment_callback(" . q_lit($provider) . ", "
		  . q_lit($headers) . "::jsonb, " . q_lit($body) . ")");
}

# A refund and its payment and order, as "refund status/provider id payment order".
sub refund
{
	my ($id) = @_;
	return sql(qq{SELECT r.status || '/' || coalesce(r.provider_refund_id, '-') || ' '
	                  || p.status || ' ' || o.status || '/' || o.pay_status
	                FROM callback_center.refunds r
	                JOIN callback_center.payments p ON p.order_id = r.order_id
	                JOIN callback_center.orders o ON o.order_id = r.order_id
	               WHERE r.refund_id = '$id'});
}

sub recorded
{
	return sql("SELECT count(*) FROM callback_center.callback_record WHERE biz_id = " . q_lit($_[0]));
}

# Providers (each with an API endpoint: refunds are sent there, mode api),
# paid orders.
sql("SELECT callback_center.set_provider('wx', 'wechatpay_v3', ARRAY[" . q_lit($apiv3) . "]);"
	  . "SELECT callback_center.set_provider('ali', 'alipay', ARRAY[" . q_lit($ali_bare) . "]);"
	  . "SELECT callback_center.set_provider('up', 'unionpay', NULL);"
	  . "SELECT callback_center.set_platform_keys('wx', jsonb_build_object(" . q_lit($serial)
	  . ", " . q_lit($cert) . "));"
	  . "SELECT callback_center.set_platform_keys('up', jsonb_build_object('root', " . q_lit($root)
	  . ", 'middle', " . q_lit($middle) . "));");
sql(q{
	SELECT callback_center.set_stock('rn-sku', 100);
	SELECT callback_center.create_endpoint('rn-api', 'http://127.0.0.1:9/api', '{nothing.here}') > 0;
	SELECT callback_center.set_provider_query_endpoint(p, 'rn-api', allow_plain_http => true)
	  FROM unnest(ARRAY['wx', 'ali', 'up']) p;
	CREATE TABLE rn_orders AS SELECT * FROM (VALUES ('wx-1', 'wx'), ('wx-2', 'wx'), ('ali-1', 'ali'),
	                                                ('up-1', 'up')) v(o, p);
	SELECT count(*) FROM rn_orders v,
	  callback_center.place_order(v.o, 'u', '[{"sku": "rn-sku", "qty": 1}]', 1000, NULL, v.p);
	SELECT count(*) FROM rn_orders v,
	  callback_center._apply_payment_result(v.p, 'txn-' || v.o, v.o, 1000, NULL, 'success', 'callback');
	SELECT count(*) FROM (VALUES ('wx-1', 300, 'wx-1-a'), ('wx-1', 200, 'wx-1-b'), ('wx-1', 100, 'wx-1-c'),
	                             ('wx-2', 1000, 'wx-2-a'), ('ali-1', 400, 'ali-1-a'), ('ali-1', 600, 'ali-1-b'),
	                             ('up-1', 250, 'up1refund0001'), ('up-1', 250, 'up1refund0002')) v(o, c, r),
	  callback_center.request_refund(v.o, v.c, NULL, v.r);
});
is(sql("SELECT count(*) FROM callback_center.refunds WHERE status = 'PENDING' AND mode = 'api'"), '8',
	'eight refunds sent');

# --- WeChat Pay v3 ---------------------------------------------------------

my $nid = 0;
# A refund notification as WeChat Pay sends it: %o overrides status,
# refund (amount), out_refund_no, refund_id, key (signing key).
sub wx_refund
{
	my (%o) = @_;
	my $status = $o{status} // 'SUCCESS';
	my $res = sprintf(
		'{"mchid":"1900000100","out_trade_no":"%s","transaction_id":"1008450740201411110005820873",'
		  . '%s"refund_id":"%s","refund_status":"%s","success_time":"2018-06-08T10:34:56+08:00",'
		  . '"user_received_account":"招商银行信用卡0403",'
		  . '"amount":{"total":1000,"refund":%s,"payer_total":1000,"payer_refund":%s}}',
		$o{order} // 'wx-1',
		exists $o{out_refund_no} && !defined $o{out_refund_no} ? '' : sprintf('"out_refund_no":"%s",', $o{out_refund_no} // 'wx-1-a'),
		$o{refund_id} // '50000000382019052709732678859', $status,
		$o{refund} // 300, $o{refund} // 300);
	my $ct = gcm_seal($apiv3, 'fdasflkja484', 'refund', $res);
	my $id = 'EV-2018022511223320873-r' . $nid++;
	my $body = sprintf(
		'{"id":"%s","create_time":"2018-06-08T10:34:56+08:00","resource_type":"encrypt-resource",'
		  . '"event_type":"REFUND.%s","summary":"退款成功",'
		  . '"resource":{"original_type":"refund","algorithm":"AEAD_AES_256_GCM",'
		  . '"ciphertext":"%s","associated_data":"refund","nonce":"fdasflkja484"}}',
		$id, $status, $ct);
	my $ts = time();
	my $nonce = 'c5ac7061fccab6bf3e254dcf98995b8c';
	my $sig = sign_b64($o{key} // 'plat', "$ts\n$nonce\n$body\n");
	my $headers = qq({"Wechatpay-Nonce":"$nonce","Wechatpay-Serial":"$serial",)
	  . qq("Wechatpay-Signature":"$sig","Wechatpay-Signature-Type":"WECHATPAY2-SHA256-RSA2048",)
	  . qq("Wechatpay-Timestamp":"$ts"});
	return ($headers, $body, $id);
}

my ($h, $b, $id) = wx_refund(out_refund_no => 'wx-1-a', refund => 300);
is(callback('wx', $h, $b), '200||true|succeeded', 'wechatpay_v3: REFUND.SUCCESS succeeds the refund');
is(refund('wx-1-a'), 'SUCCESS/50000000382019052709732678859 PARTIALLY_REFUNDED confirmed/partially_refunded',
	'wechatpay_v3: refund SUCCESS with WeChat Pay\'s refund id, payment partially refunded');
is(callback('wx', $h, $b), '200||false|succeeded', 'wechatpay_v3: a repeat gets the first answer');
is(recorded($id), '1', 'wechatpay_v3: recorded once, under the notification id');
# The synchronous answer arriving after the notification changes nothing.
is(sql(q{SELECT callback_center._apply_refund_answer('wx-1-a', '{"status": "success", "amount_cents": 300}')}),
	'already_applied', 'wechatpay_v3: the later synchronous answer changes nothing');
is(sql("SELECT count(*) FROM callback_center.state_history WHERE entity_id = 'wx-1-a' AND to_state = 'SUCCESS'"),
	'1', 'wechatpay_v3: one move to SUCCESS');

($h, $b) = wx_refund(out_refund_no => 'wx-1-b', refund => 200, status => 'CLOSED', refund_id => 'wx-r-b');
is(callback('wx', $h, $b), '200||true|failed', 'wechatpay_v3: REFUND.CLOSED fails the refund');
is(refund('wx-1-b'), 'FAILED/wx-r-b PARTIALLY_REFUNDED confirmed/partially_refunded', 'wechatpay_v3: refund FAILED');
($h, $b) = wx_refund(out_refund_no => 'wx-1-c', refund => 100, status => 'ABNORMAL', refund_id => 'wx-r-c');
is(callback('wx', $h, $b), '200||true|processing', 'wechatpay_v3: REFUND.ABNORMAL keeps the refund open');
is(refund('wx-1-c'), 'PROCESSING/wx-r-c PARTIALLY_REFUNDED confirmed/partially_refunded',
	'wechatpay_v3: refund PROCESSING, waiting for the merchant platform');
# The full refund of wx-2: payment and order refunded, the stock back.
my $stock = sql("SELECT available FROM callback_center.stock WHERE sku_id = 'rn-sku'");
($h, $b) = wx_refund(order => 'wx-2', out_refund_no => 'wx-2-a', refund => 1000, refund_id => 'wx-r-2');
is(callback('wx', $h, $b), '200||true|succeeded', 'wechatpay_v3: a full refund');
is(refund('wx-2-a'), 'SUCCESS/wx-r-2 REFUNDED refunded/refunded', 'wechatpay_v3: payment and order refunded');
is(sql("SELECT available FROM callback_center.stock WHERE sku_id = 'rn-sku'"), $stock + 1,
	'wechatpay_v3: the unfulfilled order\'s stock is back');

# What the provider got wrong: outcomes, acknowledged and recorded.
($h, $b, $id) = wx_refund(out_refund_no => 'wx-nobody', refund => 100);
is(callback('wx', $h, $b), '200||true|unknown_refund', 'wechatpay_v3: a refund we do not have is acknowledged');
is(recorded($id), '1', 'wechatpay_v3: and recorded');
($h, $b) = wx_refund(out_refund_no => 'ali-1-a', refund => 400);
is(callback('wx', $h, $b), '200||true|provider_mismatch', 'wechatpay_v3: another provider\'s refund moves nothing');
is(refund('ali-1-a'), 'PENDING/- PAID confirmed/paid', 'wechatpay_v3: the Alipay refund stays as it was');
($h, $b) = wx_refund(out_refund_no => 'wx-1-c', refund => 99, refund_id => 'wx-r-c');
is(callback('wx', $h, $b), '200||true|amount_mismatch', 'wechatpay_v3: another amount moves nothing');
is(refund('wx-1-c'), 'PROCESSING/wx-r-c PARTIALLY_REFUNDED confirmed/partially_refunded',
	'wechatpay_v3: the refund stays as it was');
# Signature and body defects: WeChat Pay's failure answer, nothing recorded.
($h, $b, $id) = wx_refund(out_refund_no => 'wx-1-c', refund => 100, key => 'wrong');
is(callback('wx', $h, $b), '401|{"code": "FAIL", "message": "invalid signature"}|false|invalid_signature',
	'wechatpay_v3: a bad signature is refused');
is(recorded($id), '0', 'wechatpay_v3: and not recorded');
($h, $b, $id) = wx_refund(out_refund_no => undef, refund => 100);
is(callback('wx', $h, $b), '400|{"code": "FAIL", "message": "malformed body"}|false|malformed_body',
	'wechatpay_v3: a refund resource without out_refund_no is refused');
is(recorded($id), '0', 'wechatpay_v3: and not recorded');

# --- Alipay ------------------------------------------------------------------

my $anid = 0;
# A trade notification after a refund, as Alipay posts it.
sub ali_refund
{
	my (%o) = @_;
	my %p = (
		notify_time => strftime('%Y-%m-%d %H:%M:%S', gmtime(time() + 8 * 3600)),
		notify_type => 'trade_status_sync',
		notify_id => 'ac05099524730693a8b330c5ecf72da978r' . $anid++,
		app_id => '2014072300007148', charset => 'utf-8', version => '1.0', sign_type => 'RSA2',
		trade_no => '2013112011001004330000121536', out_trade_no => 'ali-1',
		out_biz_no => 'ali-1-a', trade_status => 'TRADE_SUCCESS', total_amount => '10.00',
		refund_fee => '4.00', gmt_refund => '2024-06-03 12:12:12.345',
		gmt_payment => '2024-06-03 12:00:00', subject => '测试');
	for my $k (keys %o)
	{
		if (defined $o{$k}) { $p{$k} = $o{$k} } else { delete $p{$k} }
	}
	my $content = join('&', map { "$_=$p{$_}" }
		  grep { $_ ne 'sign' && $_ ne 'sign_type' && $p{$_} ne '' } sort keys %p);
	$p{sign} = sign_b64('ali', $content);
	return (join('&', map { "$_=" . form_enc($p{$_}) } reverse sort keys %p), $p{notify_id});
}

my ($f, $nid1) = ali_refund(out_biz_no => 'ali-1-a', refund_fee => '4.00');
is(callback('ali', '{}', $f), '200|success|true|succeeded', 'alipay: a partial refund succeeds');
is(refund('ali-1-a'), 'SUCCESS/- PARTIALLY_REFUNDED confirmed/partially_refunded',
	'alipay: refund SUCCESS, payment partially refunded');
is(callback('ali', '{}', $f), '200|success|false|succeeded', 'alipay: a repeat gets the first answer');
is(recorded($nid1), '1', 'alipay: recorded once, under notify_id');
($f) = ali_refund(out_biz_no => 'ali-1-b', refund_fee => '10.00', trade_status => 'TRADE_CLOSED',
	gmt_close => '2024-06-03 12:12:13');
is(callback('ali', '{}', $f), '200|success|true|succeeded', 'alipay: the rest, the trade closed');
is(refund('ali-1-b'), 'SUCCESS/- REFUNDED refunded/refunded', 'alipay: payment and order refunded');
($f) = ali_refund(out_biz_no => undef);
is(callback('ali', '{}', $f), '400|fail|false|malformed_body', 'alipay: a refund without out_biz_no is refused');

# --- UnionPay ----------------------------------------------------------------

my $qn = 0;
# A refund back notification (txnType 04) as UnionPay posts it.
sub up_refund
{
	my (%o) = @_;
	my %p = (
		accessType => '0', bizType => '000201', currencyCode => '156', encoding => 'UTF-8',
		merId => '777290058110048', orderId => 'up1refund0001',
		origQryId => '771206120916070000', queryId => sprintf('77120612091607r%05d', $qn++),
		respCode => '00', respMsg => '成功[0000000]', signMethod => '01', signPubKeyCert => $up_cert,
		txnAmt => '250', txnSubType => '00', txnTime => '20240603121212', txnType => '04',
		version => '5.1.0');
	for my $k (keys %o)
	{
		if (defined $o{$k}) { $p{$k} = $o{$k} } else { delete $p{$k} }
	}
	my $content = join('&', map { "$_=$p{$_}" } grep { $_ ne 'signature' && $p{$_} ne '' } sort keys %p);
	$p{signature} = sign_b64('sign', Digest::SHA::sha256_hex(encode('UTF-8', decode('UTF-8', $content))));
	return (join('&', map { "$_=" . form_enc($p{$_}) } reverse sort keys %p), "$p{queryId}:04", $p{queryId});
}

my ($uf, $ukey, $uq) = up_refund(orderId => 'up1refund0001', txnAmt => '250');
is(callback('up', '{}', $uf), '200|ok|true|succeeded', 'unionpay: a refund notification succeeds the refund');
is(refund('up1refund0001'), "SUCCESS/$uq PARTIALLY_REFUNDED confirmed/partially_refunded",
	'unionpay: refund SUCCESS with its queryId');
is(recorded($ukey), '1', 'unionpay: recorded under queryId:04');
is(callback('up', '{}', $uf), '200|ok|false|succeeded', 'unionpay: a repeat gets the first answer');
($uf) = up_refund(orderId => 'up1refund0002', txnAmt => '250', respCode => '03', respMsg => 'failed');
is(callback('up', '{}', $uf), '200|ok|true|failed', 'unionpay: another respCode fails the refund');
is(refund('up1refund0002'), 'FAILED/' . "77120612091607r00001" . ' PARTIALLY_REFUNDED confirmed/partially_refunded',
	'unionpay: refund FAILED');
($uf) = up_refund(orderId => 'up1refund0001', txnAmt => '250', signPubKeyCert => $root);
like(callback('up', '{}', $uf), qr/^401\|fail\|false\|/, 'unionpay: a certificate that is not UnionPay\'s is refused');

# Every refund notification above was answered, none raised; the refunds
# moved only through _apply_refund_answer (the machine's history).
is(sql(q{SELECT string_agg(to_state || ':' || n, ',' ORDER BY to_state) FROM
           (SELECT to_state, count(*) AS n FROM callback_center.state_history
             WHERE machine = 'refund' AND from_state IS NOT NULL GROUP BY to_state) x}),
	'FAILED:2,PROCESSING:1,SUCCESS:5', 'refund moves: 5 succeeded, 2 failed, 1 processing');
# (WeChat Pay v2 below: 1 more succeeded, 1 processing, 1 failed.)

# --- WeChat Pay v2 ----------------------------------------------------------

# A refund notification as WeChat Pay v2 posts it: no sign; req_info the
# base64 of AES-256-ECB (PKCS#7) of the refund's XML under the lower-case
# hex MD5 of the API key.
my $v2key = '192006250b4c09247ec02edce69f6a2d';
sql("SELECT callback_center.set_provider('wx2', 'wechatpay_v2', ARRAY[" . q_lit($v2key) . "]);"
	  . q{SELECT callback_center.place_order('v2-1', 'u', '[{"sku": "rn-sku", "qty": 1}]', 1000, NULL, 'wx2');});
sql(q{SELECT callback_center._apply_payment_result('wx2', 'txn-v2-1', 'v2-1', 1000, NULL, 'success', 'callback');
      SELECT refund_id FROM callback_center.request_refund('v2-1', 400, NULL, 'v2-1-a');
      SELECT refund_id FROM callback_center.request_refund('v2-1', 600, NULL, 'v2-1-b');});
my $v2n = 0;
sub v2_refund
{
	my (%o) = @_;
	my $inner = '<root>'
	  . "<out_refund_no><![CDATA[$o{out_refund_no}]]></out_refund_no>"
	  . '<out_trade_no><![CDATA[v2-1]]></out_trade_no>'
	  . '<refund_account><![CDATA[REFUND_SOURCE_RECHARGE_FUNDS]]></refund_account>'
	  . "<refund_fee><![CDATA[$o{refund_fee}]]></refund_fee>"
	  . "<refund_id><![CDATA[$o{refund_id}]]></refund_id>"
	  . '<refund_recv_accout><![CDATA[支付用户零钱]]></refund_recv_accout>'
	  . '<refund_request_source><![CDATA[API]]></refund_request_source>'
	  . "<refund_status><![CDATA[$o{status}]]></refund_status>"
	  . '<settlement_refund_fee><![CDATA[' . $o{refund_fee} . ']]></settlement_refund_fee>'
	  . '<settlement_total_fee><![CDATA[1000]]></settlement_total_fee>'
	  . '<success_time><![CDATA[2018-11-19 16:24:13]]></success_time>'
	  . '<total_fee><![CDATA[1000]]></total_fee>'
	  . '<transaction_id><![CDATA[txn-v2-1]]></transaction_id></root>';
	my $aes_key = unpack('H*', Digest::MD5::md5_hex($o{key} // $v2key));
	my ($req_info, $err);
	IPC::Run::run([ 'openssl', 'enc', '-aes-256-ecb', '-K', $aes_key, '-nosalt', '-base64', '-A' ],
		'<', \$inner, '>', \$req_info, '2>', \$err)
	  or die "openssl enc: $err";
	chomp $req_info;
	return '<xml><return_code>SUCCESS</return_code><appid><![CDATA[wx2421b1c4370ec43b]]></appid>'
	  . '<mch_id><![CDATA[10000100]]></mch_id><nonce_str><![CDATA[TeqClE3i0mvn3DrK' . $v2n++ . ']]></nonce_str>'
	  . "<req_info><![CDATA[$req_info]]></req_info></xml>";
}
my $v2ok = '<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>';

my $x = v2_refund(out_refund_no => 'v2-1-a', refund_id => '50000408942018111907145868882', refund_fee => 400,
	status => 'SUCCESS');
is(callback('wx2', '{}', $x), "200|$v2ok|true|succeeded", 'wechatpay_v2: a refund notification succeeds the refund');
is(refund('v2-1-a'), 'SUCCESS/50000408942018111907145868882 PARTIALLY_REFUNDED confirmed/partially_refunded',
	'wechatpay_v2: refund SUCCESS with WeChat Pay\'s refund id');
is(callback('wx2', '{}', $x), "200|$v2ok|false|succeeded", 'wechatpay_v2: a repeat gets the first answer');
is(recorded('refund:50000408942018111907145868882:SUCCESS'), '1', 'wechatpay_v2: recorded under refund_id and status');
$x = v2_refund(out_refund_no => 'v2-1-b', refund_id => 'v2r-b', refund_fee => 600, status => 'CHANGE');
is(callback('wx2', '{}', $x), "200|$v2ok|true|processing", 'wechatpay_v2: CHANGE keeps the refund open');
$x = v2_refund(out_refund_no => 'v2-1-b', refund_id => 'v2r-b', refund_fee => 600, status => 'REFUNDCLOSE');
is(callback('wx2', '{}', $x), "200|$v2ok|true|failed", 'wechatpay_v2: REFUNDCLOSE fails it');
is(refund('v2-1-b'), 'FAILED/v2r-b PARTIALLY_REFUNDED confirmed/partially_refunded', 'wechatpay_v2: refund FAILED');
my $v2fail = '<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[invalid signature]]></return_msg></xml>';
$x = v2_refund(out_refund_no => 'v2-1-b', refund_id => 'v2r-c', refund_fee => 600, status => 'SUCCESS',
	key => 'ffffff250b4c09247ec02edce69f6a2d');
is(callback('wx2', '{}', $x), "401|$v2fail|false|invalid_signature",
	'wechatpay_v2: a req_info under another key is refused');
is(recorded('refund:v2r-c:SUCCESS'), '0', 'wechatpay_v2: and not recorded');
($x = v2_refund(out_refund_no => 'v2-1-b', refund_id => 'v2r-d', refund_fee => 600, status => 'SUCCESS'))
  =~ s/(<req_info><!\[CDATA\[)(....)/$1 . ($2 eq 'AAAA' ? 'BBBB' : 'AAAA')/e;
is(callback('wx2', '{}', $x), "401|$v2fail|false|invalid_signature", 'wechatpay_v2: a changed req_info is refused');
is(refund('v2-1-b'), 'FAILED/v2r-b PARTIALLY_REFUNDED confirmed/partially_refunded', 'wechatpay_v2: nothing moved');

# --- Late payments, through the jobs worker ---------------------------------

# Money for an order the jobs worker closed: the worker's refund_jobs asks
# for its refund (refund.request to the provider's API endpoint) by itself.
sql(q{SELECT callback_center.place_order('wx-late', 'u', '[{"sku": "rn-sku", "qty": 1}]', 700, NULL, 'wx');
      UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute' WHERE order_id = 'wx-late'});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'closed' FROM callback_center.orders WHERE order_id = 'wx-late'}),
	'the jobs worker closes the expired order');
is(sql(q{SELECT callback_center._apply_payment_result('wx', 'txn-late', 'wx-late', 700, NULL, 'success', 'callback')}),
	'refund_required', 'late money for it');
ok($node->poll_query_until('postgres', q{
		SELECT count(*) = 1 FROM callback_center.refunds r
		  JOIN callback_center.outbox o ON o.aggregate_id = r.order_id AND o.event_type = 'refund.request'
		 WHERE r.order_id = 'wx-late' AND r.late_payment_id IS NOT NULL AND r.amount_cents = 700
		   AND r.provider_txn_id = 'txn-late' AND r.mode = 'api'}),
	'the jobs worker refunds the late payment through the refund path');
is(sql(q{SELECT count(*) FROM callback_center.refunds WHERE order_id = 'wx-late'}), '1',
	'once');

done_testing();
