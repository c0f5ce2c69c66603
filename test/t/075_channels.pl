# Payment channels, inbound (issue 13): WeChat Pay v3 and v2 and Alipay
# notifications through payment_callback, with keys, certificates and
# notifications made here with openssl and test/unit/gcm_seal, signed and
# encrypted as each provider documents.  Valid messages are applied once;
# repeats get the first answer; every provider-caused defect gets the
# provider's failure answer and records nothing.
use strict;
use warnings;
use Encode qw(encode decode);
use Digest::MD5;
use Digest::SHA;
use MIME::Base64 qw(encode_base64 decode_base64);
use POSIX qw(strftime);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 'test/perl';
use CallbackCenterTest;
use CallbackCenterChannels;

system('make', '-s', 'test/unit/gcm_seal') == 0
  or die "could not build test/unit/gcm_seal";

my $dir = channel_dir(PostgreSQL::Test::Utils::tempdir);

sub slurp { my ($f) = @_; return PostgreSQL::Test::Utils::slurp_file($f); }

# A certificate valid only between start and end (openssl ca dates).
sub dated_cert
{
	my ($name, $start, $end) = @_;
	rsa_key($name);
	my $ca = "$dir/ca_$name";
	mkdir $ca;
	open my $fh, '>', "$ca/ca.cnf" or die;
	print $fh "[ca]\ndefault_ca = d\n[d]\ndir = $ca\ndatabase = $ca/index.txt\n"
	  . "new_certs_dir = $ca\nserial = $ca/serial\ndefault_md = sha256\n"
	  . "policy = p\nunique_subject = no\n[p]\ncommonName = supplied\n";
	close $fh;
	open $fh, '>', "$ca/index.txt" or die;
	close $fh;
	open $fh, '>', "$ca/serial" or die;
	print $fh "0A\n";
	close $fh;
	run_ok('openssl', 'req', '-new', '-key', "$dir/$name.key", '-out',
		"$ca/r.csr", '-subj', "/CN=$name");
	run_ok('openssl', 'ca', '-batch', '-config', "$ca/ca.cnf", '-selfsign',
		'-keyfile', "$dir/$name.key", '-in', "$ca/r.csr", '-out',
		"$dir/$name.crt", '-startdate', $start, '-enddate', $end, '-notext');
	return slurp("$dir/$name.crt");
}

my $apiv3 = 'k3y0f32bytesForAPIv3abcdefghijkl';    # 32 bytes
my $serial_a = '5157F09EFDC096DE15EBE81A47057A72';
my $cert_a = self_signed('plat_a', "0x$serial_a");
my $pub_b = rsa_key('plat_b');
my $pub_id_b = 'PUB_KEY_ID_0114232134912410000000000000000001';
my $cert_old = dated_cert('plat_old', '20200101000000Z', '20210101000000Z');
my $cert_future = dated_cert('plat_future', '20990101000000Z', '20991231000000Z');
rsa_key('wrong');
my $ali_pub = rsa_key('ali');
(my $ali_bare = $ali_pub) =~ s/-----[^-]+-----//g;
$ali_bare =~ s/\s+//g;
my $small = rsa_key('small', 1024);
run_ok('openssl', 'ecparam', '-name', 'prime256v1', '-genkey', '-noout',
	'-out', "$dir/ec.key");
run_ok('openssl', 'ec', '-in', "$dir/ec.key", '-pubout', '-out', "$dir/ec.pub");
my $ec_pub = slurp("$dir/ec.pub");
my $private_pem = slurp("$dir/wrong.key");

my $node = cc_node('channels');


# payment_callback's row as "status|body|is_first|outcome".
sub callback
{
	my ($provider, $headers, $body) = @_;
	return $node->safe_psql('postgres',
		"SELECT http_status || '|' || response_body || '|' || is_first || '|' || outcome"
		  . " FROM callback_center.payment_callback(" . q_lit($provider) . ", "
		  . q_lit($headers) . "::jsonb, " . q_lit($body) . ")");
}

# SQLSTATE and message (and detail) of a statement that must fail.
sub sql_error
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\n$sql", on_error_stop => 1);
	return $ret == 0 ? 'no error' : $err;
}

sub trace
{
	my ($order) = @_;
	return $node->safe_psql('postgres', qq{
		SELECT format('records=%s outbox=%s payment=%s/%s order=%s',
		  (SELECT count(*) FROM callback_center.callback_record
		    WHERE result->>'order_id' = '$order'),
		  (SELECT count(*) FROM callback_center.outbox WHERE aggregate_id = '$order'),
		  p.status, coalesce(p.provider_txn_id, '-'), o.pay_status)
		  FROM callback_center.orders o JOIN callback_center.payments p USING (order_id)
		 WHERE o.order_id = '$order'});
}

# Fixtures: the providers (orders name a registered one), stock and orders,
# the platform keys.
$node->safe_psql('postgres',
	"SELECT callback_center.set_provider('wx', 'wechatpay_v3', ARRAY["
	  . q_lit($apiv3) . "]);"
	  . "SELECT callback_center.set_provider('ali', 'alipay', ARRAY["
	  . q_lit($ali_bare) . "]);"
	  . "SELECT callback_center.set_provider('wx-nokeys', 'wechatpay_v3', ARRAY["
	  . q_lit($apiv3) . "]);"
	  . "SELECT callback_center.set_provider('someone', 'standard_webhooks', NULL);");
$node->safe_psql('postgres', q{
	SELECT callback_center.set_stock('ch-sku', 1000);
	SELECT callback_center.create_endpoint('ch-sink', 'http://127.0.0.1:9/sink', '{*}') > 0;
	SELECT count(*) FROM generate_series(1, 12) i,
	  callback_center.place_order('wx-' || i, 'u', '[{"sku": "ch-sku", "qty": 1}]', 100 * i,
	                              NULL, 'wx');
	SELECT count(*) FROM generate_series(1, 8) i,
	  callback_center.place_order('ali-' || i, 'u', '[{"sku": "ch-sku", "qty": 1}]', 1234 + i,
	                              NULL, 'ali');
	SELECT callback_center.place_order('wx-usd', 'u', '[{"sku": "ch-sku", "qty": 1}]', 500, NULL, 'wx');
	UPDATE callback_center.orders SET currency = 'USD' WHERE order_id = 'wx-usd';
	SELECT callback_center.place_order('other-1', 'u', '[{"sku": "ch-sku", "qty": 1}]', 100, NULL, 'someone');
});
is( $node->safe_psql('postgres',
		"SELECT callback_center.set_platform_keys('wx', jsonb_build_object("
		  . q_lit($serial_a) . ", " . q_lit($cert_a) . ", "
		  . q_lit($pub_id_b) . ", " . q_lit($pub_b) . "))"),
	'2',
	'platform certificate and platform public key loaded');
is( $node->safe_psql('postgres',
		"SELECT string_agg(key_id || ':' || kind, ',' ORDER BY key_id COLLATE \"C\") FROM callback_center.provider_keys"),
	"$serial_a:certificate,$pub_id_b:public_key",
	'kept by serial and public-key id');

# Loading refuses what cannot verify, saying why without quoting the key.
my %bad_keys = (
	'garbage' => [ "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
		'The PEM certificate is malformed.' ],
	'private' => [ $private_pem, 'is a private key' ],
	'ec' => [ $ec_pub, 'The key is not an RSA key.' ],
	'small' => [ $small, 'The RSA key is smaller than 2048 bits.' ],
	'expired' => [ $cert_old, 'The certificate has expired.' ],
	'future' => [ $cert_future, 'The certificate is not valid yet.' ],);
for my $case (sort keys %bad_keys)
{
	my ($pem, $why) = @{ $bad_keys{$case} };
	my $key_id = $case eq 'expired' || $case eq 'future' ? '0A' : 'K1';
	my $err = sql_error("SELECT callback_center.set_platform_keys('wx', jsonb_build_object('$key_id', "
		  . q_lit($pem) . "))");
	like($err, qr/22023/, "platform key $case: 22023");
	like($err, qr/\Q$why\E/, "platform key $case: says why");
	unlike($err, qr/MII/, "platform key $case: no key material in the error");
}
like(sql_error("SELECT callback_center.set_platform_keys('wx', jsonb_build_object('0123', "
	  . q_lit($cert_a) . "))"),
	qr/serial number is not the name/, 'certificate named by another serial refused');
is($node->safe_psql('postgres', "SELECT count(*) FROM callback_center.provider_keys WHERE provider = 'wx'"),
	'2', 'a refused load keeps the keys there were');
like(sql_error("SELECT callback_center.set_provider('wx2', 'wechatpay_v3', ARRAY['short'])"),
	qr/22023.*invalid APIv3 key.*The key is 5 bytes/s, 'APIv3 key of the wrong length refused');
like(sql_error("SELECT callback_center.set_provider('ali2', 'alipay', ARRAY['not a key!'])"),
	qr/22023.*invalid provider key/s, 'malformed Alipay key refused');
like(sql_error("SELECT callback_center.set_provider('ali2', 'alipay', ARRAY[" . q_lit($small) . "])"),
	qr/smaller than 2048 bits/, 'small Alipay key refused');

# --- WeChat Pay v3 ---------------------------------------------------------

my $nid = 0;
# A notification for a transaction, signed and encrypted as WeChat Pay does.
# %o overrides: key (signing key name), serial, ts, nonce, state, total,
# currency, order, apiv3, gcm_nonce, aad, and tamper hooks.
sub wx_notify
{
	my (%o) = @_;
	my $order = $o{order} // 'wx-1';
	my $tx = sprintf(
		'{"mchid":"1900000109","appid":"wxd678efh567hg6787","out_trade_no":"%s",'
		  . '"transaction_id":"%s","trade_type":"JSAPI","trade_state":"%s",'
		  . '"trade_state_desc":"ok","bank_type":"CMC","attach":"",'
		  . '"success_time":"2018-06-08T10:34:56+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},'
		  . '"amount":{"total":%d,"payer_total":%d,"currency":"%s","payer_currency":"CNY"}}',
		$order, $o{txn} // "42000$order", $o{state} // 'SUCCESS',
		$o{total} // 100, $o{total} // 100, $o{currency} // 'CNY');
	my $gnonce = $o{gcm_nonce} // 'fdasflkja484';
	my $aad = $o{aad} // 'transaction';
	my $ct = gcm_seal($o{apiv3} // $apiv3, $gnonce, $aad, $tx);
	$ct = $o{tamper_ct}->($ct) if $o{tamper_ct};
	my $id = $o{id} // ('EV-2018022511223320873-' . $nid++);
	my $body = sprintf(
		'{"id":"%s","create_time":"2015-05-20T13:29:35+08:00","resource_type":"encrypt-resource",'
		  . '"event_type":"TRANSACTION.SUCCESS","summary":"支付成功",'
		  . '"resource":{"original_type":"transaction","algorithm":"AEAD_AES_256_GCM",'
		  . '"ciphertext":"%s","associated_data":"%s","nonce":"%s"}}',
		$id, $ct, $o{aad_sent} // $aad, $o{gcm_nonce_sent} // $gnonce);
	my $ts = $o{ts} // time();
	my $nonce = $o{nonce} // 'c5ac7061fccab6bf3e254dcf98995b8c';
	my $sig = sign_b64($o{key} // 'plat_a', "$ts\n$nonce\n$body\n");
	$sig = $o{tamper_sig}->($sig) if $o{tamper_sig};
	$body = $o{tamper_body}->($body) if $o{tamper_body};
	my %h = (
		'Wechatpay-Timestamp' => "$ts",
		'Wechatpay-Nonce' => $o{nonce_sent} // $nonce,
		'Wechatpay-Signature' => $sig,
		'Wechatpay-Serial' => $o{serial} // $serial_a,
		'Wechatpay-Signature-Type' => 'WECHATPAY2-SHA256-RSA2048');
	delete $h{$o{drop}} if $o{drop};
	my $headers = '{' . join(',', map { qq{"$_":"$h{$_}"} } sort keys %h) . '}';
	return ($headers, $body, $id);
}

sub flip_b64
{
	my ($b64, $pos) = @_;
	my $raw = decode_base64($b64);
	$pos = length($raw) + $pos if $pos < 0;
	substr($raw, $pos, 1) = chr(ord(substr($raw, $pos, 1)) ^ 0x01);
	return encode_base64($raw, '');
}

my ($h, $b, $id) = wx_notify(order => 'wx-1', total => 100);
is(callback('wx', $h, $b), '200||true|paid', 'wechatpay_v3: a valid notification pays');
is(trace('wx-1'), 'records=1 outbox=4 payment=PAID/42000wx-1 order=paid', 'wechatpay_v3: payment and order moved');
is(callback('wx', $h, $b), '200||false|paid', 'wechatpay_v3: a repeat gets the first answer');
is(trace('wx-1'), 'records=1 outbox=4 payment=PAID/42000wx-1 order=paid', 'wechatpay_v3: the repeat processed nothing');

($h, $b) = wx_notify(order => 'wx-2', total => 200, key => 'plat_b', serial => $pub_id_b);
is(callback('wx', $h, $b), '200||true|paid', 'wechatpay_v3: public-key id mode pays');

# Refusals, all about wx-3 (300 fen), each recording nothing.
my $fail = sub { my ($status, $outcome, $msg) = @_;
	return qq{$status|{"code": "FAIL", "message": "$msg"}|false|$outcome}; };
my @refusals = (
	[ 'flipped byte in body', [ tamper_body => sub { my $x = shift; $x =~ s/2015-05-20/2015-05-21/; $x } ],
	  $fail->(401, 'invalid_signature', 'invalid signature') ],
	[ 'flipped byte in signature', [ tamper_sig => sub { flip_b64(shift, 10) } ],
	  $fail->(401, 'invalid_signature', 'invalid signature') ],
	[ 'header nonce changed', [ nonce_sent => 'c5ac7061fccab6bf3e254dcf98995b8d' ],
	  $fail->(401, 'invalid_signature', 'invalid signature') ],
	[ 'flipped byte in GCM nonce', [ gcm_nonce_sent => 'fdasflkja485' ],
	  $fail->(400, 'decryption_failed', 'decryption failed') ],
	[ 'flipped byte in GCM tag', [ tamper_ct => sub { flip_b64(shift, -1) } ],
	  $fail->(400, 'decryption_failed', 'decryption failed') ],
	[ 'flipped byte in ciphertext', [ tamper_ct => sub { flip_b64(shift, 3) } ],
	  $fail->(400, 'decryption_failed', 'decryption failed') ],
	[ 'flipped byte in associated data', [ aad_sent => 'transactioN' ],
	  $fail->(400, 'decryption_failed', 'decryption failed') ],
	[ 'another APIv3 key', [ apiv3 => 'another32bytekeyforAPIv3abcdefgh' ],
	  $fail->(400, 'decryption_failed', 'decryption failed') ],
	[ 'unknown serial', [ serial => '0000AAAA' ],
	  $fail->(401, 'unknown_key', 'unknown key') ],
	[ 'wrong signing key', [ key => 'wrong' ],
	  $fail->(401, 'invalid_signature', 'invalid signature') ],
	[ 'expired timestamp', [ ts => time() - 3600 ],
	  $fail->(401, 'signature_expired', 'signature expired') ],
	[ 'timestamp in the future', [ ts => time() + 3600 ],
	  $fail->(401, 'signature_expired', 'signature expired') ],
	[ 'missing signature header', [ drop => 'Wechatpay-Signature' ],
	  $fail->(401, 'malformed_signature', 'malformed signature') ],
	[ 'amount different from the payment', [ total => 299 ],
	  $fail->(400, 'amount_mismatch', 'amount mismatch') ],
	[ 'currency different from the payment', [ currency => 'USD' ],
	  $fail->(400, 'currency_mismatch', 'currency mismatch') ],
	[ 'unknown order', [ order => 'wx-nosuch' ],
	  $fail->(404, 'unknown_order', 'unknown order') ],
	[ 'another provider\'s payment', [ order => 'other-1', total => 100 ],
	  $fail->(400, 'provider_mismatch', 'provider mismatch') ],);
for my $r (@refusals)
{
	my ($name, $opts, $want) = @$r;
	my ($rh, $rb, $rid) = wx_notify(order => 'wx-3', total => 300, @$opts);
	is(callback('wx', $rh, $rb), $want, "wechatpay_v3 refuses: $name");
	is($node->safe_psql('postgres',
			"SELECT count(*) FROM callback_center.callback_record WHERE biz_id = '$rid'"),
		'0', "wechatpay_v3 $name: nothing recorded");
}
is(trace('wx-3'), 'records=0 outbox=1 payment=CREATED/- order=unpaid', 'wechatpay_v3: refusals moved nothing');

# A platform certificate that expired after it was loaded.
$node->safe_psql('postgres',
	"INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)"
	  . " VALUES ('wx', '0A', 'certificate', " . q_lit($cert_old) . ", '2021-01-01')");
($h, $b) = wx_notify(order => 'wx-3', total => 300, key => 'plat_old', serial => '0A');
is(callback('wx', $h, $b), $fail->(401, 'key_expired', 'key expired'),
	'wechatpay_v3 refuses: an expired platform certificate');

($h, $b) = wx_notify(order => 'wx-3', total => 300);
is(callback('wx', $h, $b), '200||true|paid', 'wechatpay_v3: after the refusals the valid one pays');

($h, $b) = wx_notify(order => 'wx-4', total => 400, state => 'CLOSED');
is(callback('wx', $h, $b), '200||true|pay_failed', 'wechatpay_v3: CLOSED fails the payment');
($h, $b) = wx_notify(order => 'wx-5', total => 500, state => 'NOTPAY');
is(callback('wx', $h, $b), '200||true|ignored', 'wechatpay_v3: NOTPAY is not final');
is(trace('wx-5'), 'records=1 outbox=1 payment=CREATED/- order=unpaid', 'wechatpay_v3: NOTPAY moved nothing');

# Misuse raises.
($h, $b) = wx_notify(order => 'wx-6', total => 600);
like(sql_error("SELECT * FROM callback_center.payment_callback('wx-nokeys', " . q_lit($h) . ", " . q_lit($b) . ")"),
	qr/55000.*no platform keys/s, 'wechatpay_v3 with no platform keys loaded: 55000');
like(sql_error("SELECT * FROM callback_center.payment_callback('nosuch', '{}', 'x')"),
	qr/CB033/, 'unknown provider: CB033');
like(sql_error("SELECT * FROM callback_center.payment_callback('wx', '{}', NULL)"),
	qr/22004/, 'NULL body: 22004');
like(sql_error("SELECT callback_center.verify_signature('wx', '{}', 'x')"),
	qr/0A000.*payment_callback/s, 'verify_signature points channel schemes to payment_callback');

# --- Alipay ------------------------------------------------------------------

my $anid = 0;
# A UTF-8 string in encoding enc (GB18030 through iconv: Perl's Encode has
# no GB18030 without Encode::HanExtra).
sub to_enc
{
	my ($enc, $s) = @_;
	return encode($enc, decode('UTF-8', $s)) if lc $enc ne 'gb18030';
	my ($out, $err);
	IPC::Run::run([ 'iconv', '-f', 'UTF-8', '-t', 'GB18030' ], '<', \$s, '>', \$out, '2>', \$err)
	  or die "iconv: $err";
	return $out;
}

# A form value: %-encoded bytes; with raw, bytes beyond ASCII left as they
# are (a body passed as bytea).
sub form_val
{
	my ($s, $raw) = @_;
	return form_enc($s) unless $raw;
	$s =~ s/([^A-Za-z0-9\-_.* \x80-\xff])/sprintf('%%%02X', ord($1))/ge;
	$s =~ s/ /+/g;
	return $s;
}

# A notification as Alipay posts it: %o are parameter overrides (undef
# removes one), plus key, charset (perl encoding name), order (of the
# form's parameters: 'reverse' or 'sorted'), tamper, extra (raw pairs),
# raw (bytes beyond ASCII not %-encoded), literal (values beyond ASCII as
# UTF-8 characters, as a web tier that decoded the body hands them on).
sub ali_notify
{
	my (%o) = @_;
	my $enc = $o{enc} // 'UTF-8';
	my %p = (
		notify_time => strftime('%Y-%m-%d %H:%M:%S', gmtime(time() + 8 * 3600)),
		notify_type => 'trade_status_sync',
		notify_id => 'ac05099524730693a8b330c5ecf72da978' . $anid++,
		app_id => '2014072300007148',
		charset => lc $enc eq 'gbk' ? 'GBK' : lc $enc eq 'gb18030' ? 'GB18030' : 'utf-8',
		version => '1.0',
		sign_type => 'RSA2',
		trade_no => '2013112011001004330000121536',
		out_trade_no => 'ali-1',
		trade_status => 'TRADE_SUCCESS',
		total_amount => '12.35',
		subject => "测试 商品+1&x=y%",
		body => '',
		buyer_logon_id => '159****5620',);
	for my $k (keys %o)
	{
		next if $k =~ /^(key|enc|order|tamper|extra|raw|literal)$/;
		if (defined $o{$k}) { $p{$k} = $o{$k} } else { delete $p{$k} }
	}
	my $content = join('&',
		map { "$_=" . to_enc($enc, $p{$_}) }
		grep { $_ ne 'sign' && $_ ne 'sign_type' && $p{$_} ne '' } sort keys %p);
	$p{sign} = sign_b64($o{key} // 'ali', $content);
	my @keys = sort keys %p;
	@keys = reverse @keys if ($o{order} // 'reverse') eq 'reverse';
	my $form = join('&', map { "$_=" . form_val($o{literal} ? $p{$_} : to_enc($enc, $p{$_}), $o{raw} || $o{literal}) } @keys);
	$form .= $o{extra} if $o{extra};
	$form = $o{tamper}->($form) if $o{tamper};
	return ($form, $p{notify_id}, \%p);
}

my ($f, $nid1, $p) = ali_notify(out_trade_no => 'ali-1', total_amount => '12.35');
is(callback('ali', '{}', $f), '200|success|true|paid', 'alipay: a valid notification pays');
is(trace('ali-1'), 'records=1 outbox=4 payment=PAID/2013112011001004330000121536 order=paid',
	'alipay: payment and order moved');
is(callback('ali', '{}', $f), '200|success|false|paid', 'alipay: a repeat gets the first answer');
# Alipay resends with a new notify_time and a new signature.
my ($f2) = ali_notify(out_trade_no => 'ali-1', total_amount => '12.35', notify_id => $p->{notify_id},
	notify_time => strftime('%Y-%m-%d %H:%M:%S', gmtime(time() + 8 * 3600 - 60)), order => 'sorted');
is(callback('ali', '{}', $f2), '200|success|false|paid', 'alipay: a resend gets the first answer');
is(trace('ali-1'), 'records=1 outbox=4 payment=PAID/2013112011001004330000121536 order=paid',
	'alipay: repeats processed nothing');

($f) = ali_notify(out_trade_no => 'ali-2', total_amount => '12.36', trade_no => 'T2', sign_type => undef);
is(callback('ali', '{}', $f), '200|success|true|paid', 'alipay: no sign_type (RSA2 assumed)');
($f) = ali_notify(out_trade_no => 'ali-3', total_amount => '12.37', trade_no => 'T3', enc => 'GBK',
	subject => '中文商品');
is(callback('ali', '{}', $f), '200|success|true|paid', 'alipay: GBK charset');
is($node->safe_psql('postgres',
		"SELECT payload LIKE '%subject=中文商品%' FROM callback_center.callback_record WHERE biz_id = '"
		  . "ac05099524730693a8b330c5ecf72da978" . ($anid - 1) . "'"),
	't', 'alipay: GBK values recorded as text');
($f) = ali_notify(out_trade_no => 'ali-4', total_amount => '12.4', trade_no => 'T4', order => 'sorted',
	passback_params => 'a b&c=d', body => '');
$node->safe_psql('postgres', "UPDATE callback_center.payments SET amount_cents = 1240 WHERE order_id = 'ali-4'");
is(callback('ali', '{}', $f), '200|success|true|paid', 'alipay: one decimal, empty values, encoded & and space');

my @ali_refusals = (
	[ 'changed value', [ tamper => sub { my $x = shift; $x =~ s/version=1.0/version=1.1/; $x } ],
	  '401|fail|false|invalid_signature' ],
	[ 'wrong key', [ key => 'wrong' ], '401|fail|false|invalid_signature' ],
	[ 'flipped signature', [ tamper => sub { my $x = shift; $x =~ s/sign=(.)/'sign=' . ($1 eq 'A' ? 'B' : 'A')/e; $x } ],
	  '401|fail|false|invalid_signature' ],
	[ 'stale notify_time', [ notify_time => strftime('%Y-%m-%d %H:%M:%S', gmtime(time() + 8 * 3600 - 3600)) ],
	  '401|fail|false|signature_expired' ],
	[ 'sign missing', [ tamper => sub { my $x = shift; $x =~ s/&sign=[^&]*//; $x } ],
	  '401|fail|false|malformed_signature' ],
	[ 'legacy RSA sign_type', [ sign_type => 'RSA' ], '401|fail|false|malformed_signature' ],
	[ 'three decimals', [ total_amount => '12.380' ], '400|fail|false|malformed_body' ],
	[ 'a parameter twice', [ extra => '&out_trade_no=ali-6' ], '400|fail|false|malformed_body' ],
	[ 'bad percent-encoding', [ extra => '&x=%G1' ], '400|fail|false|malformed_body' ],
	[ 'amount mismatch', [ total_amount => '12.30' ], '400|fail|false|amount_mismatch' ],
	[ 'currency mismatch', [ trans_currency => 'USD' ], '400|fail|false|currency_mismatch' ],
	[ 'unknown order', [ out_trade_no => 'ali-nosuch' ], '404|fail|false|unknown_order' ],);
for my $r (@ali_refusals)
{
	my ($name, $opts, $want) = @$r;
	my ($rf, $rid) = ali_notify(out_trade_no => 'ali-5', total_amount => '12.39', trade_no => 'T5', @$opts);
	is(callback('ali', '{}', $rf), $want, "alipay refuses: $name");
	is($node->safe_psql('postgres',
			"SELECT count(*) FROM callback_center.callback_record WHERE biz_id = '$rid'"),
		'0', "alipay $name: nothing recorded");
}
is(trace('ali-5'), 'records=0 outbox=1 payment=CREATED/- order=unpaid', 'alipay: refusals moved nothing');
($f) = ali_notify(out_trade_no => 'ali-5', total_amount => '12.39', trade_no => 'T5');
is(callback('ali', '{}', $f), '200|success|true|paid', 'alipay: after the refusals the valid one pays');
($f) = ali_notify(out_trade_no => 'ali-5', total_amount => '12.39', trade_no => 'T5', trade_status => 'TRADE_FINISHED');
is(callback('ali', '{}', $f), '200|success|true|already_applied', 'alipay: TRADE_FINISHED after TRADE_SUCCESS');
($f) = ali_notify(out_trade_no => 'ali-6', total_amount => '12.40', trade_no => 'T6', trade_status => 'TRADE_CLOSED');
is(callback('ali', '{}', $f), '200|success|true|pay_failed', 'alipay: TRADE_CLOSED fails the payment');
($f) = ali_notify(out_trade_no => 'ali-7', total_amount => '12.41', trade_no => 'T7', trade_status => 'WAIT_BUYER_PAY');
is(callback('ali', '{}', $f), '200|success|true|ignored', 'alipay: WAIT_BUYER_PAY is not final');

# Raw bodies as bytea (payment_callback(text, jsonb, bytea)): GBK and
# GB18030 bytes that are no valid text, decoded per the form's charset
# before verifying; a text body whose characters a web tier decoded from
# GBK; bytes that are not text in the charset refused.
sub callback_raw
{
	my ($provider, $headers, $bytes) = @_;
	return $node->safe_psql('postgres',
		"SELECT http_status || '|' || response_body || '|' || is_first || '|' || outcome"
		  . " FROM callback_center.payment_callback(" . q_lit($provider) . ", "
		  . q_lit($headers) . "::jsonb, decode('" . unpack('H*', $bytes) . "', 'hex'))");
}
$node->safe_psql('postgres', q{
	SELECT count(*) FROM generate_series(9, 14) i,
	  callback_center.place_order('ali-' || i, 'u', '[{"sku": "ch-sku", "qty": 1}]', 1234 + i,
	                              NULL, 'ali');
});
my $gbk_id;
($f, $gbk_id) = ali_notify(out_trade_no => 'ali-9', total_amount => '12.43', trade_no => 'T9', enc => 'GBK',
	subject => '中文商品 a+b', raw => 1);
ok($f =~ /\xd6\xd0/ && !utf8::decode(my $copy = $f), 'alipay raw GBK: the body holds GBK bytes, not UTF-8');
is(callback_raw('ali', '{}', $f), '200|success|true|paid', 'alipay: raw GBK body as bytea pays');
is($node->safe_psql('postgres',
		"SELECT payload LIKE '%subject=中文商品 a+b%' FROM callback_center.callback_record WHERE biz_id = '$gbk_id'"),
	't', 'alipay raw GBK: values decoded from GBK');
is(callback_raw('ali', '{}', $f), '200|success|false|paid', 'alipay raw GBK: a repeat gets the first answer');
($f) = ali_notify(out_trade_no => 'ali-10', total_amount => '12.44', trade_no => 'T10', enc => 'GBK',
	subject => '中文商品');
is(callback_raw('ali', '{}', $f), '200|success|true|paid', 'alipay: %-encoded GBK body as bytea pays');
my $g18_id;
($f, $g18_id) = ali_notify(out_trade_no => 'ali-11', total_amount => '12.45', trade_no => 'T11', enc => 'GB18030',
	subject => '𠀀中文');
ok($f =~ /%952%826/, 'alipay GB18030: a four-byte character in the form');
is(callback('ali', '{}', $f), '200|success|true|paid', 'alipay: GB18030 charset (text body, %-encoded)');
is($node->safe_psql('postgres',
		"SELECT payload LIKE '%subject=𠀀中文%' FROM callback_center.callback_record WHERE biz_id = '$g18_id'"),
	't', 'alipay GB18030: values decoded from GB18030');
($f) = ali_notify(out_trade_no => 'ali-12', total_amount => '12.46', trade_no => 'T12', enc => 'GB18030',
	subject => '𠀀中文', raw => 1);
is(callback_raw('ali', '{}', $f), '200|success|true|paid', 'alipay: raw GB18030 body as bytea pays');
($f) = ali_notify(out_trade_no => 'ali-13', total_amount => '12.47', trade_no => 'T13', enc => 'GBK',
	subject => '中文商品', literal => 1);
is(callback('ali', '{}', $f), '200|success|true|paid',
	'alipay: a text body with the GBK values as characters pays (re-encoded in GBK)');
my $bad_id;
($f, $bad_id) = ali_notify(out_trade_no => 'ali-14', total_amount => '12.48', trade_no => 'T14', enc => 'GBK',
	raw => 1, extra => "&x=\xff\xff");
is(callback_raw('ali', '{}', $f), '400|fail|false|malformed_body', 'alipay: bytes that are not GBK refused');
($f) = ali_notify(out_trade_no => 'ali-14', total_amount => '12.48', trade_no => 'T14', enc => 'GBK',
	literal => 1, subject => '😀');
is(callback('ali', '{}', $f), '400|fail|false|malformed_body',
	'alipay: a text body with a character GBK cannot hold refused');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM callback_center.callback_record WHERE biz_id = '$bad_id'"),
	'0', 'alipay: undecodable bodies recorded nothing');
is(trace('ali-14'), 'records=0 outbox=1 payment=CREATED/- order=unpaid', 'alipay: undecodable bodies moved nothing');
# Other schemes take UTF-8 bytes: a Standard Webhooks body as bytea pays;
# bytes that are not UTF-8 are 400 in the scheme's format.
is($node->safe_psql('postgres', q{
	SELECT http_status || '|' || is_first || '|' || outcome
	  FROM (SELECT '{"type":"payment.succeeded","data":{"txn_id":"o1","order_id":"other-1","amount_cents":100}}' AS b,
	               extract(epoch FROM now())::bigint AS ts) m,
	       callback_center.payment_callback('someone',
	           jsonb_build_object('webhook-id', 'raw-1', 'webhook-timestamp', m.ts::text,
	               'webhook-signature', callback_center.sign_webhook(
	                   callback_center.provider_secret('someone'), 'raw-1', m.ts, m.b)),
	           convert_to(m.b, 'UTF8'))}),
	'200|true|paid', 'standard webhooks: a UTF-8 body as bytea pays');
is(callback_raw('someone', '{}', "{\"a\":\"\xff\"}"),
	'400|{"received":false,"reason":"malformed body"}|false|malformed_body',
	'standard webhooks: a body that is not UTF-8 refused');
is(callback_raw('wx', '{}', "{\"a\":\"\xff\"}"),
	'400|{"code": "FAIL", "message": "malformed body"}|false|malformed_body',
	'wechatpay_v3: a body that is not UTF-8 refused in its format');

# Alipay certificate mode: set_provider with NULL secrets, then the Alipay
# public-key certificate, its intermediate and the root (openssl, here)
# loaded with set_platform_keys, each named by its SN.
my $caserial = 0x20;
sub ali_ca_cert
{
	my ($name, $subj, $issuer, %o) = @_;
	rsa_key($name);
	my $cd = "$dir/aca_$name";
	mkdir $cd;
	open my $fh, '>', "$cd/ca.cnf" or die;
	print $fh "[ca]\ndefault_ca = d\n[d]\ndir = $cd\ndatabase = $cd/index.txt\n"
	  . "new_certs_dir = $cd\nserial = $cd/serial\ndefault_md = sha256\n"
	  . "policy = p\nunique_subject = no\nx509_extensions = ext\ndefault_days = 30\n"
	  . "[p]\ncommonName = supplied\norganizationName = optional\n"
	  . "organizationalUnitName = optional\ncountryName = optional\n"
	  . "[ext]\nbasicConstraints = " . ($o{ca} ? "critical,CA:true\n" : "CA:false\n");
	close $fh;
	open $fh, '>', "$cd/index.txt" or die;
	close $fh;
	open $fh, '>', "$cd/serial" or die;
	# Long serial numbers: the SN takes them in decimal.
	printf $fh "201911%02XE5F3E6DE44BECAD385A8B438\n", $caserial++;
	close $fh;
	run_ok('openssl', 'req', '-new', '-utf8', '-key', "$dir/$name.key", '-out', "$cd/r.csr",
		'-subj', $subj);
	run_ok('openssl', 'ca', '-batch', '-utf8', '-preserveDN', '-config', "$cd/ca.cnf",
		$issuer ? ('-cert', "$dir/$issuer.crt", '-keyfile', "$dir/$issuer.key")
		  : ('-selfsign', '-keyfile', "$dir/$name.key"),
		'-in', "$cd/r.csr", '-out', "$dir/$name.crt", '-notext',
		$o{start} ? ('-startdate', $o{start}, '-enddate', $o{end}) : ());
	return slurp("$dir/$name.crt");
}
# The SN as Alipay documents it, computed here from openssl's own RFC 2253
# writing of the issuer and the serial in decimal.
sub expected_sn
{
	my ($name) = @_;
	my $issuer = run_ok('openssl', 'x509', '-in', "$dir/$name.crt", '-noout', '-issuer',
		'-nameopt', 'RFC2253');
	my $serial = run_ok('openssl', 'x509', '-in', "$dir/$name.crt", '-noout', '-serial');
	chomp($issuer, $serial);
	$issuer =~ s/^issuer=//;
	$serial =~ s/^serial=//;
	require Math::BigInt;
	return Digest::MD5::md5_hex($issuer . Math::BigInt->from_hex($serial)->bstr);
}
sub sn_of
{
	my ($pem) = @_;
	return $node->safe_psql('postgres', "SELECT callback_center.alipay_cert_sn(" . q_lit($pem) . ")");
}
my $aroot = ali_ca_cert('aroot', '/C=CN/O=Test Ant/OU=Certification Authority/CN=Test Root R1', undef, ca => 1);
my $amid = ali_ca_cert('amid', '/C=CN/O=Test Ant, Inc./OU=Certification Authority/CN=Test Class 2 R1', 'aroot', ca => 1);
my $aleaf = ali_ca_cert('aleaf', '/C=CN/O=测试/OU=Alipay/CN=支付宝(中国)网络技术有限公司-2088', 'amid');
my $aold = ali_ca_cert('aold', '/C=CN/O=测试/OU=Alipay/CN=old-2088', 'amid',
	start => '20200101000000Z', end => '20210101000000Z');
my $xroot = ali_ca_cert('xroot', '/CN=Another Root', undef, ca => 1);
my $xleaf = ali_ca_cert('xleaf', '/CN=Another Leaf', 'xroot');
is(sn_of($aleaf), expected_sn('aleaf'),
	'alipay_cert_sn: MD5 of the issuer (RFC 2253, an escaped comma) and the serial in decimal');
is(sn_of($amid), expected_sn('amid'), 'alipay_cert_sn of the intermediate');
# Published vectors: go-pay/gopay's test expects these for the sandbox
# app certificate (alipay/cert/appCertPublicKey.crt) and for Alipay's root
# certificate file (whose SM2 and ECDSA certificates are left out).
my $published_app_cert = <<'PEM';
-----BEGIN CERTIFICATE-----
MIIDoTCCAomgAwIBAgIQIBkJA0rzhzIh1udaP7WMgDANBgkqhkiG9w0BAQsFADCBgjELMAkGA1UE
BhMCQ04xFjAUBgNVBAoMDUFudCBGaW5hbmNpYWwxIDAeBgNVBAsMF0NlcnRpZmljYXRpb24gQXV0
aG9yaXR5MTkwNwYDVQQDDDBBbnQgRmluYW5jaWFsIENlcnRpZmljYXRpb24gQXV0aG9yaXR5IENs
YXNzIDIgUjEwHhcNMTkwOTAzMDY0ODQ2WhcNMjEwOTAyMDY0ODQ2WjCBgTELMAkGA1UEBhMCQ04x
NTAzBgNVBAoMLOmykemxvCjkuIrmtbcp5L+h5oGv56eR5oqA5Y+R5bGV5pyJ6ZmQ5YWs5Y+4MQ8w
DQYDVQQLDAZBbGlwYXkxKjAoBgNVBAMMITIwODg0MjE2NTg1MzIwMjgtMjAxOTA5MDM2Njg3NDEw
MzCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAIgueEgGE8XKtz49u4Tr9piYKZyQqxyP
moklKkYbZdkHLuiSb7CunNcpp744VEbVOiACK18bhIJPZmt5GnB0ur8NC/wCEpuRhDyLz56U2aNu
snfN/p9RyjNnY28utLvUj9+ahiMgPLXXsf/4Eki7RkFs4Bsd/QQu0dEi21Enf3nYyHdBOQKcqzsF
TqEoghEviUekQgHYCapU37G4CMPCrRW+CGM43fIjHoj2MdrEm4Djw8iXIheCTyQuqFPCXKv5d7Ah
wbmHejZEvf8yspkTbTjI8YxUDd52Jtqp15MKPhdzWHhCWHgjOYNH2wh2qTCZQNJcLtixi21bH7Rm
g9SuVD8CAwEAAaMSMBAwDgYDVR0PAQH/BAQDAgP4MA0GCSqGSIb3DQEBCwUAA4IBAQBVHumICWjh
wQ2IsNUGSsR0tSFk9lzhUVogmNodkQ4m48tJ77cez+zE5C7yefkRylctx3WGYRHD9VPG6vbbrvk8
aqfCTVcljicMP9Bloe18S1w68wiuUykKAsGdpauWf9cVzmiw+C0/DjaeCV+sKwL542UfBERBKNzA
DnhOoZiykEt1EwHNDJrcj9HWUBtT53ihNPGUuPA51AUWpUjJBsGEAAs4s9q836t1HTFoRHhUT71h
+0PJhFRKDQ3A8Uqa4z/KK8ZDAl+SapiUAzln/feyza6rFvF5LVbWIDh165syZ9haxa6JH+rtjHw+
zYqArUAVy47wyV9/DRnYC6hcWFco
-----END CERTIFICATE-----
PEM
my $published_root_bundle = <<'PEM';
-----BEGIN CERTIFICATE-----
MIIBszCCAVegAwIBAgIIaeL+wBcKxnswDAYIKoEcz1UBg3UFADAuMQswCQYDVQQG
EwJDTjEOMAwGA1UECgwFTlJDQUMxDzANBgNVBAMMBlJPT1RDQTAeFw0xMjA3MTQw
MzExNTlaFw00MjA3MDcwMzExNTlaMC4xCzAJBgNVBAYTAkNOMQ4wDAYDVQQKDAVO
UkNBQzEPMA0GA1UEAwwGUk9PVENBMFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAE
MPCca6pmgcchsTf2UnBeL9rtp4nw+itk1Kzrmbnqo05lUwkwlWK+4OIrtFdAqnRT
V7Q9v1htkv42TsIutzd126NdMFswHwYDVR0jBBgwFoAUTDKxl9kzG8SmBcHG5Yti
W/CXdlgwDAYDVR0TBAUwAwEB/zALBgNVHQ8EBAMCAQYwHQYDVR0OBBYEFEwysZfZ
MxvEpgXBxuWLYlvwl3ZYMAwGCCqBHM9VAYN1BQADSAAwRQIgG1bSLeOXp3oB8H7b
53W+CKOPl2PknmWEq/lMhtn25HkCIQDaHDgWxWFtnCrBjH16/W3Ezn7/U/Vjo5xI
pDoiVhsLwg==
-----END CERTIFICATE-----

-----BEGIN CERTIFICATE-----
MIIF0zCCA7ugAwIBAgIIH8+hjWpIDREwDQYJKoZIhvcNAQELBQAwejELMAkGA1UE
BhMCQ04xFjAUBgNVBAoMDUFudCBGaW5hbmNpYWwxIDAeBgNVBAsMF0NlcnRpZmlj
YXRpb24gQXV0aG9yaXR5MTEwLwYDVQQDDChBbnQgRmluYW5jaWFsIENlcnRpZmlj
YXRpb24gQXV0aG9yaXR5IFIxMB4XDTE4MDMyMTEzNDg0MFoXDTM4MDIyODEzNDg0
MFowejELMAkGA1UEBhMCQ04xFjAUBgNVBAoMDUFudCBGaW5hbmNpYWwxIDAeBgNV
BAsMF0NlcnRpZmljYXRpb24gQXV0aG9yaXR5MTEwLwYDVQQDDChBbnQgRmluYW5j
aWFsIENlcnRpZmljYXRpb24gQXV0aG9yaXR5IFIxMIICIjANBgkqhkiG9w0BAQEF
AAOCAg8AMIICCgKCAgEAtytTRcBNuur5h8xuxnlKJetT65cHGemGi8oD+beHFPTk
rUTlFt9Xn7fAVGo6QSsPb9uGLpUFGEdGmbsQ2q9cV4P89qkH04VzIPwT7AywJdt2
xAvMs+MgHFJzOYfL1QkdOOVO7NwKxH8IvlQgFabWomWk2Ei9WfUyxFjVO1LVh0Bp
dRBeWLMkdudx0tl3+21t1apnReFNQ5nfX29xeSxIhesaMHDZFViO/DXDNW2BcTs6
vSWKyJ4YIIIzStumD8K1xMsoaZBMDxg4itjWFaKRgNuPiIn4kjDY3kC66Sl/6yTl
YUz8AybbEsICZzssdZh7jcNb1VRfk79lgAprm/Ktl+mgrU1gaMGP1OE25JCbqli1
Pbw/BpPynyP9+XulE+2mxFwTYhKAwpDIDKuYsFUXuo8t261pCovI1CXFzAQM2w7H
DtA2nOXSW6q0jGDJ5+WauH+K8ZSvA6x4sFo4u0KNCx0ROTBpLif6GTngqo3sj+98
SZiMNLFMQoQkjkdN5Q5g9N6CFZPVZ6QpO0JcIc7S1le/g9z5iBKnifrKxy0TQjtG
PsDwc8ubPnRm/F82RReCoyNyx63indpgFfhN7+KxUIQ9cOwwTvemmor0A+ZQamRe
9LMuiEfEaWUDK+6O0Gl8lO571uI5onYdN1VIgOmwFbe+D8TcuzVjIZ/zvHrAGUcC
AwEAAaNdMFswCwYDVR0PBAQDAgEGMAwGA1UdEwQFMAMBAf8wHQYDVR0OBBYEFF90
tATATwda6uWx2yKjh0GynOEBMB8GA1UdIwQYMBaAFF90tATATwda6uWx2yKjh0Gy
nOEBMA0GCSqGSIb3DQEBCwUAA4ICAQCVYaOtqOLIpsrEikE5lb+UARNSFJg6tpkf
tJ2U8QF/DejemEHx5IClQu6ajxjtu0Aie4/3UnIXop8nH/Q57l+Wyt9T7N2WPiNq
JSlYKYbJpPF8LXbuKYG3BTFTdOVFIeRe2NUyYh/xs6bXGr4WKTXb3qBmzR02FSy3
IODQw5Q6zpXj8prYqFHYsOvGCEc1CwJaSaYwRhTkFedJUxiyhyB5GQwoFfExCVHW
05ZFCAVYFldCJvUzfzrWubN6wX0DD2dwultgmldOn/W/n8at52mpPNvIdbZb2F41
T0YZeoWnCJrYXjq/32oc1cmifIHqySnyMnavi75DxPCdZsCOpSAT4j4lAQRGsfgI
kkLPGQieMfNNkMCKh7qjwdXAVtdqhf0RVtFILH3OyEodlk1HYXqX5iE5wlaKzDop
PKwf2Q3BErq1xChYGGVS+dEvyXc/2nIBlt7uLWKp4XFjqekKbaGaLJdjYP5b2s7N
1dM0MXQ/f8XoXKBkJNzEiM3hfsU6DOREgMc1DIsFKxfuMwX3EkVQM1If8ghb6x5Y
jXayv+NLbidOSzk4vl5QwngO/JYFMkoc6i9LNwEaEtR9PhnrdubxmrtM+RjfBm02
77q3dSWFESFQ4QxYWew4pHE0DpWbWy/iMIKQ6UZ5RLvB8GEcgt8ON7BBJeMc+Dyi
kT9qhqn+lw==
-----END CERTIFICATE-----

-----BEGIN CERTIFICATE-----
MIICiDCCAgygAwIBAgIIQX76UsB/30owDAYIKoZIzj0EAwMFADB6MQswCQYDVQQG
EwJDTjEWMBQGA1UECgwNQW50IEZpbmFuY2lhbDEgMB4GA1UECwwXQ2VydGlmaWNh
dGlvbiBBdXRob3JpdHkxMTAvBgNVBAMMKEFudCBGaW5hbmNpYWwgQ2VydGlmaWNh
dGlvbiBBdXRob3JpdHkgRTEwHhcNMTkwNDI4MTYyMDQ0WhcNNDkwNDIwMTYyMDQ0
WjB6MQswCQYDVQQGEwJDTjEWMBQGA1UECgwNQW50IEZpbmFuY2lhbDEgMB4GA1UE
CwwXQ2VydGlmaWNhdGlvbiBBdXRob3JpdHkxMTAvBgNVBAMMKEFudCBGaW5hbmNp
YWwgQ2VydGlmaWNhdGlvbiBBdXRob3JpdHkgRTEwdjAQBgcqhkjOPQIBBgUrgQQA
IgNiAASCCRa94QI0vR5Up9Yr9HEupz6hSoyjySYqo7v837KnmjveUIUNiuC9pWAU
WP3jwLX3HkzeiNdeg22a0IZPoSUCpasufiLAnfXh6NInLiWBrjLJXDSGaY7vaokt
rpZvAdmjXTBbMAsGA1UdDwQEAwIBBjAMBgNVHRMEBTADAQH/MB0GA1UdDgQWBBRZ
4ZTgDpksHL2qcpkFkxD2zVd16TAfBgNVHSMEGDAWgBRZ4ZTgDpksHL2qcpkFkxD2
zVd16TAMBggqhkjOPQQDAwUAA2gAMGUCMQD4IoqT2hTUn0jt7oXLdMJ8q4vLp6sg
wHfPiOr9gxreb+e6Oidwd2LDnC4OUqCWiF8CMAzwKs4SnDJYcMLf2vpkbuVE4dTH
Rglz+HGcTLWsFs4KxLsq7MuU+vJTBUeDJeDjdA==
-----END CERTIFICATE-----

-----BEGIN CERTIFICATE-----
MIIDxTCCAq2gAwIBAgIUEMdk6dVgOEIS2cCP0Q43P90Ps5YwDQYJKoZIhvcNAQEF
BQAwajELMAkGA1UEBhMCQ04xEzARBgNVBAoMCmlUcnVzQ2hpbmExHDAaBgNVBAsM
E0NoaW5hIFRydXN0IE5ldHdvcmsxKDAmBgNVBAMMH2lUcnVzQ2hpbmEgQ2xhc3Mg
MiBSb290IENBIC0gRzMwHhcNMTMwNDE4MDkzNjU2WhcNMzMwNDE4MDkzNjU2WjBq
MQswCQYDVQQGEwJDTjETMBEGA1UECgwKaVRydXNDaGluYTEcMBoGA1UECwwTQ2hp
bmEgVHJ1c3QgTmV0d29yazEoMCYGA1UEAwwfaVRydXNDaGluYSBDbGFzcyAyIFJv
b3QgQ0EgLSBHMzCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAOPPShpV
nJbMqqCw6Bz1kehnoPst9pkr0V9idOwU2oyS47/HjJXk9Rd5a9xfwkPO88trUpz5
4GmmwspDXjVFu9L0eFaRuH3KMha1Ak01citbF7cQLJlS7XI+tpkTGHEY5pt3EsQg
wykfZl/A1jrnSkspMS997r2Gim54cwz+mTMgDRhZsKK/lbOeBPpWtcFizjXYCqhw
WktvQfZBYi6o4sHCshnOswi4yV1p+LuFcQ2ciYdWvULh1eZhLxHbGXyznYHi0dGN
z+I9H8aXxqAQfHVhbdHNzi77hCxFjOy+hHrGsyzjrd2swVQ2iUWP8BfEQqGLqM1g
KgWKYfcTGdbPB1MCAwEAAaNjMGEwHQYDVR0OBBYEFG/oAMxTVe7y0+408CTAK8hA
uTyRMB8GA1UdIwQYMBaAFG/oAMxTVe7y0+408CTAK8hAuTyRMA8GA1UdEwEB/wQF
MAMBAf8wDgYDVR0PAQH/BAQDAgEGMA0GCSqGSIb3DQEBBQUAA4IBAQBLnUTfW7hp
emMbuUGCk7RBswzOT83bDM6824EkUnf+X0iKS95SUNGeeSWK2o/3ALJo5hi7GZr3
U8eLaWAcYizfO99UXMRBPw5PRR+gXGEronGUugLpxsjuynoLQu8GQAeysSXKbN1I
UugDo9u8igJORYA+5ms0s5sCUySqbQ2R5z/GoceyI9LdxIVa1RjVX8pYOj8JFwtn
DJN3ftSFvNMYwRuILKuqUYSHc2GPYiHVflDh5nDymCMOQFcFG3WsEuB+EYQPFgIU
1DHmdZcz7Llx8UOZXX2JupWCYzK1XhJb+r4hK5ncf/w8qGtYlmyJpxk3hr1TfUJX
Yf4Zr0fJsGuv
-----END CERTIFICATE-----
PEM
is(sn_of($published_app_cert), '4498aaa8ab0c8986c15c41b36186db7d',
	'alipay_cert_sn: the published app_cert_sn of a sandbox certificate');
is($node->safe_psql('postgres',
		"SELECT callback_center.alipay_root_cert_sn(" . q_lit($published_root_bundle) . ")"),
	'687b59193f3f462dd5336e5abf83c5d8_02941eef3187dddf3d3b83462e1dfcf6',
	'alipay_root_cert_sn: the published SN of alipayRootCert.crt');
like(sql_error("SELECT callback_center.alipay_cert_sn('not a certificate')"),
	qr/22023.*invalid Alipay certificate/s, 'alipay_cert_sn: not a certificate is 22023');

my ($sn_root, $sn_mid, $sn_leaf) = (sn_of($aroot), sn_of($amid), sn_of($aleaf));
$node->safe_psql('postgres', q{
	SELECT callback_center.set_provider('ali-cert', 'alipay', NULL);
	SELECT count(*) FROM generate_series(1, 6) i,
	  callback_center.place_order('alc-' || i, 'u', '[{"sku": "ch-sku", "qty": 1}]', 500 + i,
	                              NULL, 'ali-cert');
});
sub load_ali_certs
{
	my (%certs) = @_;
	return $node->psql('postgres',
		"SELECT callback_center.set_platform_keys('ali-cert', jsonb_build_object("
		  . join(', ', map { q_lit($_) . ', ' . q_lit($certs{$_}) } sort keys %certs) . "))");
}
my ($ret, $out, $err) = load_ali_certs('wrong-name' => $aleaf, $sn_mid => $amid, $sn_root => $aroot);
like($err, qr/invalid Alipay certificate "wrong-name".*SN is not the name/s,
	'alipay certificate mode: a certificate not named by its SN refused');
($ret, $out, $err) = load_ali_certs(sn_of($xleaf) => $xleaf, $sn_root => $aroot);
like($err, qr/invalid Alipay certificate.*does not chain/s,
	'alipay certificate mode: a certificate that does not chain to a loaded root refused');
($ret, $out, $err) = load_ali_certs(sn_of($aold) => $aold, $sn_mid => $amid, $sn_root => $aroot);
like($err, qr/The certificate has expired/, 'alipay certificate mode: an expired certificate refused');
($ret, $out, $err) = load_ali_certs($sn_leaf => $aleaf, $sn_mid => $amid, $sn_root => $aroot);
is($out, '3', 'alipay certificate mode: certificate, intermediate and root loaded');

($f) = ali_notify(out_trade_no => 'alc-1', total_amount => '5.01', trade_no => 'C1', key => 'aleaf');
is(callback('ali-cert', '{}', $f), '200|success|true|paid',
	'alipay certificate mode: signed by the certificate\'s key, it pays');
($f) = ali_notify(out_trade_no => 'alc-2', total_amount => '5.02', trade_no => 'C2', key => 'aleaf',
	alipay_cert_sn => $sn_leaf);
is(callback('ali-cert', '{}', $f), '200|success|true|paid',
	'alipay certificate mode: alipay_cert_sn names the certificate');
my @alc_refusals = (
	[ 'an unknown alipay_cert_sn', [ key => 'aleaf', alipay_cert_sn => 'f' x 32 ], '401|fail|false|unknown_key' ],
	[ 'alipay_cert_sn naming the root', [ key => 'aroot', alipay_cert_sn => $sn_root ], '401|fail|false|unknown_key' ],
	[ 'signed by the root\'s key', [ key => 'aroot' ], '401|fail|false|invalid_signature' ],
	[ 'signed by another key', [ key => 'xleaf', alipay_cert_sn => $sn_leaf ], '401|fail|false|invalid_signature' ],);
for my $r (@alc_refusals)
{
	my ($name, $opts, $want) = @$r;
	my ($rf, $rid) = ali_notify(out_trade_no => 'alc-3', total_amount => '5.03', trade_no => 'C3', @$opts);
	is(callback('ali-cert', '{}', $rf), $want, "alipay certificate mode refuses: $name");
	is($node->safe_psql('postgres',
			"SELECT count(*) FROM callback_center.callback_record WHERE biz_id = '$rid'"),
		'0', "alipay certificate mode $name: nothing recorded");
}
# The certificate expires after it was loaded (made so here by putting an
# expired one in its place): checked at every notification.
$node->safe_psql('postgres',
	"UPDATE callback_center.provider_keys SET pem = " . q_lit($aold)
	  . " WHERE provider = 'ali-cert' AND key_id = '$sn_leaf'");
($f) = ali_notify(out_trade_no => 'alc-3', total_amount => '5.03', trade_no => 'C3', key => 'aold');
is(callback('ali-cert', '{}', $f), '401|fail|false|key_expired',
	'alipay certificate mode: a certificate expired since it was loaded refused');
is(trace('alc-3'), 'records=0 outbox=1 payment=CREATED/- order=unpaid',
	'alipay certificate mode: refusals moved nothing');
$node->safe_psql('postgres', "DELETE FROM callback_center.provider_keys WHERE provider = 'ali-cert'");
like(sql_error("SELECT * FROM callback_center.payment_callback('ali-cert', '{}', " . q_lit($f) . ")"),
	qr/55000.*no Alipay public key or certificate/s,
	'alipay: a provider with neither public key nor certificate is 55000');

# The one form parser (Alipay and UnionPay): empty values, a name without
# "=", empty pairs, "+" and %-escapes to bytes; NULL for a body that is not
# one form.
is($node->safe_psql('postgres',
		q{SELECT f.names::text || ' ' || f.vals::text
		    FROM callback_center._form_parse('b=x+y%26z%3D&a=&a2&&c=%E4%b8%AD') f}),
	'{b,a,a2,c} {"\\\\x782079267a3d","\\\\x","\\\\x","\\\\xe4b8ad"}',
	'form parser: values as bytes');
is($node->safe_psql('postgres', q{
		SELECT string_agg(coalesce(f.names::text, 'NULL'), ' ' ORDER BY b.i)
		  FROM unnest(ARRAY['', 'a=1&a=2', 'a=%G1', 'a=%4', '%E4=1', 'a%00=1']) WITH ORDINALITY b(body, i),
		       callback_center._form_parse(b.body) f}),
	'NULL NULL NULL NULL NULL NULL',
	'form parser: empty, a name twice, bad escapes, non-ASCII or control names refused');

# --- WeChat Pay v2 ---------------------------------------------------------

my $v2key = '192006250b4c09247ec02edce69f6a2d';    # 32 bytes
$node->safe_psql('postgres', qq{
	SELECT callback_center.set_provider('wx2', 'wechatpay_v2', ARRAY['$v2key']);
	SELECT callback_center.set_provider('wx2md5', 'wechatpay_v2', ARRAY['md5:$v2key']);
	SELECT count(*) FROM generate_series(1, 6) i,
	  callback_center.place_order('v2-' || i, 'u', '[{"sku": "ch-sku", "qty": 1}]', i, NULL, 'wx2');
	SELECT callback_center.place_order('v2md5-1', 'u', '[{"sku": "ch-sku", "qty": 1}]', 1, NULL, 'wx2md5');
});
my $v2n = 0;
# A v2 payment result notification, signed as WeChat Pay does.
sub v2_notify
{
	my (%o) = @_;
	my %p = (
		appid => 'wx2421b1c4370ec43b', attach => '支付测试', bank_type => 'CFT',
		fee_type => 'CNY', is_subscribe => 'Y', mch_id => '10000100',
		nonce_str => '5d2b6c2a8db53831f7eda20af46e531c', openid => 'oUpF8uMEb4qRXf22hE3X68TekukE',
		out_trade_no => 'v2-1', result_code => 'SUCCESS', return_code => 'SUCCESS',
		time_end => '20140903131540', total_fee => '1', trade_type => 'JSAPI',
		transaction_id => '10044007402014090300050921' . $v2n++, device_info => '',
		sign_type => 'HMAC-SHA256');
	for my $k (keys %o)
	{
		next if $k =~ /^(key|md5|tamper|prefix)$/;
		if (defined $o{$k}) { $p{$k} = $o{$k} } else { delete $p{$k} }
	}
	my $content = join('&', map { "$_=$p{$_}" } grep { $p{$_} ne '' } sort keys %p)
	  . '&key=' . ($o{key} // $v2key);
	$p{sign} = $o{md5} ? uc(Digest::MD5::md5_hex($content))
	  : uc(Digest::SHA::hmac_sha256_hex($content, $o{key} // $v2key));
	my $xml = ($o{prefix} // '') . '<xml>'
	  . join('', map { $_ eq 'total_fee' ? "<$_>$p{$_}</$_>" : "<$_><![CDATA[$p{$_}]]></$_>" } reverse sort keys %p)
	  . '</xml>';
	$xml = $o{tamper}->($xml) if $o{tamper};
	return ($xml, $p{transaction_id});
}
my $v2fail = sub { my ($status, $outcome, $msg) = @_;
	return "$status|<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[$msg]]></return_msg></xml>|false|$outcome"; };
my $v2ok = '<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>';

my ($x, $xid) = v2_notify(out_trade_no => 'v2-1', total_fee => '1');
is(callback('wx2', '{}', $x), "200|$v2ok|true|paid", 'wechatpay_v2: a valid HMAC-SHA256 notification pays');
is(callback('wx2', '{}', $x), "200|$v2ok|false|paid", 'wechatpay_v2: a repeat gets the first answer');
is(trace('v2-1'), "records=1 outbox=4 payment=PAID/$xid order=paid", 'wechatpay_v2: paid once');
($x) = v2_notify(out_trade_no => 'v2-2', total_fee => '2', sign_type => undef);
is(callback('wx2', '{}', $x), "200|$v2ok|true|paid", 'wechatpay_v2: no sign_type means HMAC-SHA256');
my @v2_refusals = (
	[ 'changed value', [ tamper => sub { my $v = shift; $v =~ s/CFT/CMB/; $v } ],
	  $v2fail->(401, 'invalid_signature', 'invalid signature') ],
	[ 'wrong key', [ key => 'ffffff250b4c09247ec02edce69f6a2d' ],
	  $v2fail->(401, 'invalid_signature', 'invalid signature') ],
	[ 'MD5 sign for a key not allowing it', [ md5 => 1, sign_type => 'MD5' ],
	  $v2fail->(401, 'invalid_signature', 'invalid signature') ],
	[ 'a DTD', [ prefix => '<!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]>' ],
	  $v2fail->(400, 'malformed_body', 'malformed body') ],
	[ 'not XML', [ tamper => sub { 'total_fee=3' } ],
	  $v2fail->(400, 'malformed_body', 'malformed body') ],
	[ 'a parameter twice', [ tamper => sub { my $v = shift; $v =~ s{</xml>}{<total_fee>3</total_fee></xml>}; $v } ],
	  $v2fail->(400, 'malformed_body', 'malformed body') ],
	[ 'amount mismatch', [ total_fee => '4' ],
	  $v2fail->(400, 'amount_mismatch', 'amount mismatch') ],
	[ 'currency mismatch', [ fee_type => 'USD' ],
	  $v2fail->(400, 'currency_mismatch', 'currency mismatch') ],);
for my $r (@v2_refusals)
{
	my ($name, $opts, $want) = @$r;
	my ($rx, $rid) = v2_notify(out_trade_no => 'v2-3', total_fee => '3', @$opts);
	is(callback('wx2', '{}', $rx), $want, "wechatpay_v2 refuses: $name");
	is($node->safe_psql('postgres',
			"SELECT count(*) FROM callback_center.callback_record WHERE biz_id = '$rid'"),
		'0', "wechatpay_v2 $name: nothing recorded");
}
is(trace('v2-3'), 'records=0 outbox=1 payment=CREATED/- order=unpaid', 'wechatpay_v2: refusals moved nothing');
($x) = v2_notify(out_trade_no => 'v2-3', total_fee => '3');
is(callback('wx2', '{}', $x), "200|$v2ok|true|paid", 'wechatpay_v2: after the refusals the valid one pays');
($x) = v2_notify(out_trade_no => 'v2-4', total_fee => '4', result_code => 'FAIL');
is(callback('wx2', '{}', $x), "200|$v2ok|true|attempt_failed", 'wechatpay_v2: result_code FAIL is one failed attempt');
($x) = v2_notify(out_trade_no => 'v2md5-1', total_fee => '1', md5 => 1, sign_type => 'MD5');
is(callback('wx2md5', '{}', $x), "200|$v2ok|true|paid", 'wechatpay_v2: legacy MD5 for an md5: key');
like(sql_error("SELECT callback_center.set_provider('wx2x', 'wechatpay_v2', ARRAY['md5:short'])"),
	qr/22023.*invalid API key.*5 bytes/s, 'wechatpay_v2: API key of the wrong length refused');

# The same WeChat notification delivered twice at once pays once: the
# second waits for the first on the callback record and gets its answer.
($h, $b) = wx_notify(order => 'wx-7', total => 700);
my $call_sql = "SELECT http_status || '|' || response_body || '|' || is_first || '|' || outcome"
  . " FROM callback_center.payment_callback('wx', " . q_lit($h) . "::jsonb, " . q_lit($b) . ")";
my $s1 = $node->background_psql('postgres');
$s1->query_safe('BEGIN');
is($s1->query_safe($call_sql), '200||true|paid', 'concurrent: the first delivery pays (not committed)');
my $s2 = $node->background_psql('postgres');
$s2->query_until(qr/started/, "\\echo started\n$call_sql;\n");
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
		  . " AND query LIKE '%payment_callback%'"),
	'concurrent: the second delivery waits');
$s1->query_safe('COMMIT');
$s1->quit;
like($s2->query_safe("SELECT 'after'"), qr/^200\|\|false\|paid\nafter$/,
	'concurrent: the second gets the first answer');
$s2->quit;
is(trace('wx-7'), 'records=1 outbox=4 payment=PAID/42000wx-7 order=paid', 'concurrent: paid once');

$node->stop;
done_testing();
