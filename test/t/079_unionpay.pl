# Payment channels, inbound: UnionPay (acp SDK 5.1.0, signMethod 01) back-end
# notifications through payment_callback.  A root, an intermediate and
# signing certificates are made here with openssl; notifications are signed
# as the SDK signs them: every parameter but signature with a non-empty
# value, sorted by name, joined as k=v&..., its SHA-256 digest in lower-case
# hex signed SHA256withRSA, the signing certificate in signPubKeyCert.
# Valid messages are applied once; repeats get the first answer; every
# provider-caused defect gets UnionPay's failure answer and records nothing.
use strict;
use warnings;
use Encode qw(encode decode);
use Digest::SHA;
use MIME::Base64 qw(encode_base64 decode_base64);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use POSIX qw(strftime);
use Test::More;
use lib 'test/perl';
use CallbackCenterTest;
use CallbackCenterChannels;

my $dir = channel_dir(PostgreSQL::Test::Utils::tempdir);

sub slurp { my ($f) = @_; return PostgreSQL::Test::Utils::slurp_file($f); }

my $org = '中国银联股份有限公司';
my $root = root_ca('root', 'Test CFCA Root');
my $middle = issue_cert('middle', '/CN=Test CFCA OCA1', 'root', ca => 1);
my %certs = (
	sign => issue_cert('sign', "/C=CN/O=China UnionPay/OU=00/CN=041\@Z2024\@$org\@00000001", 'middle'),
	expired => issue_cert('expired', "/C=CN/O=China UnionPay/CN=041\@Z2020\@$org\@00000002", 'middle',
		start => '20200101000000Z', end => '20210101000000Z'),
	other_org => issue_cert('other_org', "/C=CN/O=Someone/CN=041\@Z2024\@某某支付有限公司\@00000003", 'middle'),
	no_at => issue_cert('no_at', "/C=CN/CN=$org", 'middle'));
my $root2 = root_ca('root2', 'Another Root');
my $middle2 = issue_cert('middle2', '/CN=Another OCA', 'root2', ca => 1);
$certs{unchained} = issue_cert('unchained', "/C=CN/O=China UnionPay/CN=041\@Z2024\@$org\@00000004", 'middle2');
$certs{self} = root_ca('self', "041\@Z2024\@$org\@00000005");
$certs{root} = $root;

my $node = cc_node('unionpay');


sub callback
{
	my ($provider, $body) = @_;
	return $node->safe_psql('postgres',
		"SELECT http_status || '|' || response_body || '|' || is_first || '|' || outcome"
		  . " FROM callback_center.payment_callback(" . q_lit($provider) . ", '{}', "
		  . q_lit($body) . ")");
}

sub sql_error
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		on_error_stop => 1);
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

sub recorded
{
	my ($key) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM callback_center.callback_record WHERE biz_id = " . q_lit($key));
}

# --- Loading ---------------------------------------------------------------

$node->safe_psql('postgres', q{
	SELECT callback_center.set_provider('up', 'unionpay', NULL);
	SELECT callback_center.set_provider('up-nocerts', 'unionpay', NULL);
	SELECT callback_center.set_provider('someone', 'standard_webhooks', NULL);
	SELECT callback_center.set_stock('up-sku', 1000);
	SELECT callback_center.create_endpoint('up-sink', 'http://127.0.0.1:9/sink', '{*}') > 0;
	SELECT count(*) FROM generate_series(1, 12) i,
	  callback_center.place_order('up-' || i, 'u', '[{"sku": "up-sku", "qty": 1}]', 100 * i,
	                              NULL, 'up');
	SELECT callback_center.place_order('other-1', 'u', '[{"sku": "up-sku", "qty": 1}]', 100, NULL, 'someone');
});
is($node->safe_psql('postgres', "SELECT callback_center.provider_secret('up')"), $org,
	'set_provider unionpay NULL: the organisation defaults to UnionPay');
like(sql_error("SELECT callback_center.set_provider('up2', 'unionpay', ARRAY['a\@b'])"),
	qr/22023.*invalid UnionPay organisation name/s, 'an organisation name with @ refused');

like(sql_error("SELECT callback_center.set_platform_keys('up', jsonb_build_object('middle', "
	  . q_lit($middle) . "))"),
	qr/22023.*invalid UnionPay certificate "middle".*does not chain/s,
	'an intermediate without its root refused');
like(sql_error("SELECT callback_center.set_platform_keys('up', jsonb_build_object('root', "
	  . q_lit($root) . ", 'key', " . q_lit(slurp("$dir/root.pub")) . "))"),
	qr/22023.*invalid UnionPay certificate "key".*not public keys/s, 'a public key refused');
like(sql_error("SELECT callback_center.set_platform_keys('up', jsonb_build_object('root', "
	  . q_lit($root) . ", 'x', " . q_lit($certs{expired}) . "))"),
	qr/22023.*The certificate has expired/s, 'an expired certificate refused');
is( $node->safe_psql('postgres',
		"SELECT callback_center.set_platform_keys('up', jsonb_build_object('root', "
		  . q_lit($root) . ", 'middle', " . q_lit($middle) . "))"),
	'2', 'root and intermediate loaded');

# --- Notifications ---------------------------------------------------------


my $qn = 0;
# A consumption notification as UnionPay posts it.  %o are parameter
# overrides (undef removes one), plus cert (signPubKeyCert), key (signing
# key, the certificate's by default), enc (UTF-8 or GBK), order ('reverse'
# or 'sorted'), tamper (of the form), extra (raw pairs appended).
sub up_notify
{
	my (%o) = @_;
	my $enc = $o{enc} // 'UTF-8';
	my $cert = $o{cert} // 'sign';
	my %p = (
		accessType => '0', bizType => '000201', currencyCode => '156',
		encoding => $enc, merId => '777290058110048', orderId => 'up-1',
		queryId => sprintf('77120612091607%06d', $qn++), respCode => '00',
		respMsg => '成功[0000000]', settleAmt => '100', settleCurrencyCode => '156',
		settleDate => '0603', signMethod => '01', signPubKeyCert => $certs{$cert},
		traceNo => '123456', traceTime => '0603121212', txnAmt => '100',
		txnSubType => '01', txnTime => '20240603121212', txnType => '01',
		version => '5.1.0', reqReserved => '');
	for my $k (keys %o)
	{
		next if $k =~ /^(cert|key|enc|order|tamper|extra)$/;
		if (defined $o{$k}) { $p{$k} = $o{$k} } else { delete $p{$k} }
	}
	my $content = join('&',
		map { "$_=" . encode($enc, decode('UTF-8', $p{$_})) }
		grep { $_ ne 'signature' && $p{$_} ne '' } sort keys %p);
	$p{signature} = sign_b64($o{key} // $cert, Digest::SHA::sha256_hex($content));
	my @keys = sort keys %p;
	@keys = reverse @keys if ($o{order} // 'reverse') eq 'reverse';
	my $form = join('&', map { "$_=" . form_enc(encode($enc, decode('UTF-8', $p{$_}))) } @keys);
	$form .= $o{extra} if $o{extra};
	$form = $o{tamper}->($form) if $o{tamper};
	return ($form, "$p{queryId}:$p{txnType}", \%p);
}

my ($f, $key, $p) = up_notify(orderId => 'up-1', txnAmt => '100');
is(callback('up', $f), '200|ok|true|paid', 'unionpay: a valid notification pays');
is(trace('up-1'), "records=1 outbox=4 payment=PAID/$p->{queryId} order=paid",
	'unionpay: payment and order moved');
is(recorded($key), '1', 'unionpay: recorded under queryId:txnType');
is(callback('up', $f), '200|ok|false|paid', 'unionpay: a repeat gets the first answer');
# A resend: the same notification, parameters in another order.
my ($f2) = up_notify(orderId => 'up-1', txnAmt => '100', queryId => $p->{queryId}, order => 'sorted');
is(callback('up', $f2), '200|ok|false|paid', 'unionpay: a resend gets the first answer');
is(trace('up-1'), "records=1 outbox=4 payment=PAID/$p->{queryId} order=paid",
	'unionpay: repeats processed nothing');

($f) = up_notify(orderId => 'up-2', txnAmt => '200', respCode => 'A6');
is(callback('up', $f), '200|ok|true|paid', 'unionpay: respCode A6 pays');
($f) = up_notify(orderId => 'up-3', txnAmt => '300', enc => 'GBK', respMsg => '交易成功');
is(callback('up', $f), '200|ok|true|paid', 'unionpay: GBK encoding');
($f) = up_notify(orderId => 'up-4', txnAmt => '400', respCode => '01', respMsg => 'failed');
is(callback('up', $f), '200|ok|true|attempt_failed', 'unionpay: another respCode is one failed attempt');
is(trace('up-4'), 'records=1 outbox=1 payment=CREATED/- order=unpaid', 'unionpay: a failed attempt moved nothing');
($f, $key) = up_notify(orderId => 'up-4', txnAmt => '400', txnType => '04', txnSubType => '00');
# (A refund notification for a refund we have is test/t/07d_refund_notifications.pl.)
is(callback('up', $f), '200|ok|true|unknown_refund',
	'unionpay: a refund notification naming no refund here is recorded and acknowledged');
is(recorded($key), '1', 'unionpay: the refund is keyed by its own queryId:04');

# What _unionpay_answer_fields (the check of a back-channel answer) says of
# a form: its failure, or the orderId of the fields it decoded.
sub answer_failure
{
	my ($form) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(a.failure, 'ok ' || (a.fields->>'orderId'))
		   FROM callback_center.providers p,
		        callback_center._unionpay_answer_fields(p.name, p.secrets, " . q_lit($form) . ") a
		  WHERE p.name = 'up'");
}

# Refusals, all about up-5 (500 fen), each recording nothing.
my @refusals = (
	[ 'a certificate that does not chain', [ cert => 'unchained' ], '401|fail|false|untrusted_key' ],
	[ 'a self-signed certificate', [ cert => 'self' ], '401|fail|false|untrusted_key' ],
	[ 'the root itself', [ cert => 'root' ], '401|fail|false|wrong_organisation' ],
	[ 'an expired certificate', [ cert => 'expired' ], '401|fail|false|key_expired' ],
	[ 'another organisation', [ cert => 'other_org' ], '401|fail|false|wrong_organisation' ],
	[ 'a common name without the SDK fields', [ cert => 'no_at' ], '401|fail|false|wrong_organisation' ],
	[ 'signed by another key', [ key => 'unchained' ], '401|fail|false|invalid_signature' ],
	[ 'a flipped byte in a value', [ tamper => sub { my $x = shift; $x =~ s/traceNo=123456/traceNo=123457/; $x } ],
	  '401|fail|false|invalid_signature' ],
	[ 'an empty value filled in', [ tamper => sub { my $x = shift; $x =~ s/reqReserved=/reqReserved=x/; $x } ],
	  '401|fail|false|invalid_signature' ],
	[ 'a flipped byte in the signature',
	  [ tamper => sub { my $x = shift; $x =~ s/signature=(.)/'signature=' . ($1 eq 'A' ? 'B' : 'A')/e; $x } ],
	  '401|fail|false|invalid_signature' ],
	[ 'no signature', [ tamper => sub { my $x = shift; $x =~ s/&?signature=[^&]*//; $x } ],
	  '401|fail|false|malformed_signature' ],
	[ 'a signature that is not base64', [ tamper => sub { my $x = shift; $x =~ s/signature=[^&]*/signature=%21%21%21/; $x } ],
	  '401|fail|false|malformed_signature' ],
	[ 'no certificate', [ signPubKeyCert => undef ], '401|fail|false|malformed_signature' ],
	[ 'version 5.0.0', [ version => '5.0.0' ], '401|fail|false|malformed_signature' ],
	[ 'signMethod 11', [ signMethod => '11' ], '401|fail|false|malformed_signature' ],
	[ 'a parameter twice', [ extra => '&txnAmt=1' ], '400|fail|false|malformed_body' ],
	[ 'bad percent-encoding', [ extra => '&x=%G1' ], '400|fail|false|malformed_body' ],
	[ 'an amount that is not fen', [ txnAmt => '5.00' ], '400|fail|false|malformed_body' ],
	[ 'amount different from the payment', [ txnAmt => '499' ], '400|fail|false|amount_mismatch' ],
	[ 'currency different from the order', [ currencyCode => '840' ], '400|fail|false|currency_mismatch' ],
	[ 'unknown order', [ orderId => 'up-nosuch' ], '404|fail|false|unknown_order' ],
	[ 'another provider\'s payment', [ orderId => 'other-1', txnAmt => '100' ],
	  '400|fail|false|provider_mismatch' ],);
for my $r (@refusals)
{
	my ($name, $opts, $want) = @$r;
	my ($rf, $rk) = up_notify(orderId => 'up-5', txnAmt => '500', @$opts);
	is(callback('up', $rf), $want, "unionpay refuses: $name");
	is(recorded($rk), '0', "unionpay $name: nothing recorded");
	# A back-channel answer is verified by the same check (one owner):
	# the same form gets the same verdict.
	next unless $want =~ /^401\|fail\|false\|(.*)$/;
	is(answer_failure($rf), $1, "unionpay answer refused the same way: $name");
}
is(trace('up-5'), 'records=0 outbox=1 payment=CREATED/- order=unpaid', 'unionpay: refusals moved nothing');
($f) = up_notify(orderId => 'up-5', txnAmt => '500');
is(answer_failure($f), 'ok up-5', 'unionpay: a valid form verifies as an answer too');
is(callback('up', $f), '200|ok|true|paid', 'unionpay: after the refusals the valid one pays');

# Another organisation name configured: the same certificate is refused.
$node->safe_psql('postgres', "SELECT callback_center.set_provider('up', 'unionpay', ARRAY['00040000:SIGN'])");
($f) = up_notify(orderId => 'up-6', txnAmt => '600');
is(callback('up', $f), '401|fail|false|wrong_organisation', 'unionpay: the configured organisation is the one checked');
$node->safe_psql('postgres', "SELECT callback_center.set_provider('up', 'unionpay', ARRAY['00040000:SIGN', '$org'])");
is(callback('up', $f), '200|ok|true|paid', 'unionpay: several organisation names accepted');

# Misuse raises.
($f) = up_notify(orderId => 'up-7', txnAmt => '700');
like(sql_error("SELECT * FROM callback_center.payment_callback('up-nocerts', '{}', " . q_lit($f) . ")"),
	qr/55000.*no UnionPay certificates/s, 'unionpay with no certificates loaded: 55000');
like(sql_error("SELECT callback_center.verify_signature('up', '{}', 'x')"),
	qr/0A000.*payment_callback/s, 'verify_signature points unionpay to payment_callback');

# --- The certificate cache (crypto.c) ----------------------------------------
# One backend (the cache is per backend) sees verdicts that follow the
# certificates' time, the loaded configuration and the names, also beyond
# the number of entries kept.
$node->safe_psql('postgres', q{
	SELECT count(*) FROM generate_series(1, 4) i,
	  callback_center.place_order('up-c' || i, 'u', '[{"sku": "up-sku", "qty": 1}]', 100,
	                              NULL, 'up');
});
my $s = $node->background_psql('postgres');
sub s_callback
{
	my ($body) = @_;
	return $s->query_safe("SELECT http_status || '|' || response_body || '|' || is_first || '|' || outcome"
		  . " FROM callback_center.payment_callback('up', '{}', " . q_lit($body) . ")");
}
# A signing certificate that expires 10 s from now.
my $until = time() + 10;
$certs{short} = issue_cert('short', "/C=CN/O=China UnionPay/CN=041\@Z2024\@$org\@00000006", 'middle',
	start => strftime('%Y%m%d%H%M%SZ', gmtime(time() - 3600)),
	end => strftime('%Y%m%d%H%M%SZ', gmtime($until)));
($f) = up_notify(orderId => 'up-c1', txnAmt => '100', cert => 'short');
is(s_callback($f), '200|ok|true|paid', 'cache: a certificate valid now is accepted (and kept)');
sleep 1 while time() <= $until + 1;
($f) = up_notify(orderId => 'up-c2', txnAmt => '100', cert => 'short');
is(s_callback($f), '401|fail|false|key_expired', 'cache: the kept verdict ends when the certificate does');

# Another configuration loaded meanwhile: the kept verdict is not used.
($f) = up_notify(orderId => 'up-c2', txnAmt => '100');
my $sign_ok = "SELECT (callback_center._x509_chain_check(" . q_lit($certs{sign}) . ", "
  . "ARRAY(SELECT pem FROM callback_center.provider_keys WHERE provider = 'up' ORDER BY key_id), %s)).verdict";
is($s->query_safe(sprintf($sign_ok, "ARRAY['$org']")), 'ok', 'cache: the signing certificate checks out');
is($s->query_safe(sprintf($sign_ok, "ARRAY['someone else']")), 'wrong_name',
	'cache: the same certificate under other names is checked again');
$node->safe_psql('postgres', "SELECT callback_center.set_platform_keys('up', jsonb_build_object("
	  . "'root', " . q_lit($root2) . ", 'middle', " . q_lit($middle2) . "))");
is(s_callback($f), '401|fail|false|untrusted_key', 'cache: a certificate of the old roots refused after a reload');
$node->safe_psql('postgres', "SELECT callback_center.set_platform_keys('up', jsonb_build_object("
	  . "'root', " . q_lit($root) . ", 'middle', " . q_lit($middle) . "))");
is(s_callback($f), '200|ok|true|paid', 'cache: accepted again under its roots');

# More certificates than the cache keeps (64): 70 of one key, all checked,
# then the first again and a notification.
run_ok('openssl', 'req', '-new', '-key', "$dir/sign.key", '-out', "$dir/many.csr", '-subj', '/CN=many');
my @many;
for my $i (1 .. 70)
{
	run_ok('openssl', 'x509', '-req', '-in', "$dir/many.csr", '-CA', "$dir/middle.crt", '-CAkey',
		"$dir/middle.key", '-set_serial', 1000 + $i, '-days', '2', '-out', "$dir/many$i.crt");
	push @many, slurp("$dir/many$i.crt");
}
my $many_sql = "SELECT count(*) FILTER (WHERE (callback_center._x509_chain_check(c, "
  . "ARRAY(SELECT pem FROM callback_center.provider_keys WHERE provider = 'up' ORDER BY key_id), NULL)).verdict = 'ok')"
  . " FROM unnest(ARRAY[" . join(', ', map { q_lit($_) } @many) . "]) c";
is($s->query_safe($many_sql), '70', 'cache: 70 certificates checked in one backend');
is($s->query_safe("SELECT (callback_center._x509_chain_check(" . q_lit($many[0]) . ", "
	  . "ARRAY(SELECT pem FROM callback_center.provider_keys WHERE provider = 'up' ORDER BY key_id), NULL)).verdict"),
	'ok', 'cache: the first again, after it was replaced');
($f) = up_notify(orderId => 'up-c3', txnAmt => '100');
is(s_callback($f), '200|ok|true|paid', 'cache: a notification after the replacements');
$s->quit;

$node->stop;
done_testing();
