#!/usr/bin/perl
# Prints the SQL setup of a payment channel bench case: a provider of
# SCHEME (wechatpay_v3, alipay or unionpay) with keys made here by openssl,
# N orders, and table public.bench_ch_<scheme>_in (n, headers, body) of N
# notifications, one per order, signed (and for WeChat encrypted) here in
# advance by bench/channel_sign, so that the runs time the verification and
# not the signing.  Used by bench/cases/channels_*.case:
#   perl bench/channel_vectors.pl unionpay 20000 | psql ...
use strict;
use warnings;
use File::Temp qw(tempdir);
use POSIX qw(strftime);

my ($scheme, $n) = @ARGV;
die "usage: channel_vectors.pl wechatpay_v3|alipay|unionpay N\n" unless $scheme && $n;
my $here = $0 =~ s{/[^/]*$}{}r;
my $dir = tempdir(CLEANUP => 1);
my $tool = "$dir/channel_sign";
system('cc', '-O2', '-o', $tool, "$here/channel_sign.c", '-lcrypto') == 0 or die "cannot build channel_sign";

sub run { system(@_) == 0 or die "@_ failed"; }
sub slurp { my ($f) = @_; open my $fh, '<:raw', $f or die; local $/; return <$fh>; }
sub key { my ($k) = @_; run("openssl genrsa -out $dir/$k.key 2048 2>/dev/null"); }
# Runs channel_sign on the messages, one answer per message.
sub batch
{
	my ($args, @msgs) = @_;
	open my $fh, '>', "$dir/in" or die;
	print $fh unpack('H*', $_), "\n" for @msgs;
	close $fh;
	my @out = `$tool $args < $dir/in`;
	die "channel_sign failed" if $? != 0 || @out != @msgs;
	chomp @out;
	return @out;
}
sub form_enc { my ($s) = @_; $s =~ s/([^A-Za-z0-9\-_.*])/sprintf('%%%02X', ord($1))/ge; return $s; }
sub copy_esc { my ($s) = @_; $s =~ s/\\/\\\\/g; $s =~ s/\t/\\t/g; $s =~ s/\n/\\n/g; return $s; }

my $prov = "bench-ch-$scheme";
my (@headers, @bodies);
print "SELECT callback_center.set_stock('$prov-sku', 1000000000);\n";
if ($scheme eq 'wechatpay_v3')
{
	key('plat');
	run("openssl rsa -in $dir/plat.key -pubout -out $dir/plat.pub 2>/dev/null");
	my $apiv3 = 'benchAPIv3key32bytesabcdefghijkl';
	my $kid = 'PUB_KEY_ID_0114232134912410000000000000000777';
	print "SELECT callback_center.set_provider('$prov', 'wechatpay_v3', ARRAY['$apiv3'], interval '1 day');\n";
	print "SELECT callback_center.set_platform_keys('$prov', jsonb_build_object('$kid', \$pem\$"
	  . slurp("$dir/plat.pub") . "\$pem\$));\n";
	my @tx = map { qq~{"out_trade_no":"$prov-$_","transaction_id":"bwx$_","trade_state":"SUCCESS",~
		  . qq~"amount":{"total":100,"payer_total":100,"currency":"CNY","payer_currency":"CNY"}}~ } 1 .. $n;
	my @ct = batch("seal $apiv3 benchnonce12 transaction", @tx);
	my $ts = time();
	@bodies = map { qq~{"id":"EV-bench-$_","event_type":"TRANSACTION.SUCCESS","resource_type":"encrypt-resource",~
		  . qq~"resource":{"original_type":"transaction","algorithm":"AEAD_AES_256_GCM","ciphertext":"$ct[$_ - 1]",~
		  . qq~"associated_data":"transaction","nonce":"benchnonce12"}}~ } 1 .. $n;
	my @sig = batch("sign $dir/plat.key", map { "$ts\nn$_\n$bodies[$_ - 1]\n" } 1 .. $n);
	@headers = map { qq~{"Wechatpay-Timestamp":"$ts","Wechatpay-Nonce":"n$_","Wechatpay-Serial":"$kid",~
		  . qq~"Wechatpay-Signature":"$sig[$_ - 1]"}~ } 1 .. $n;
}
elsif ($scheme eq 'alipay')
{
	key('ali');
	run("openssl rsa -in $dir/ali.key -pubout -out $dir/ali.pub 2>/dev/null");
	print "SELECT callback_center.set_provider('$prov', 'alipay', ARRAY[\$pem\$"
	  . slurp("$dir/ali.pub") . "\$pem\$], interval '1 day');\n";
	my $now = strftime('%Y-%m-%d %H:%M:%S', gmtime(time() + 8 * 3600));
	my @p = map { { notify_time => $now, notify_type => 'trade_status_sync', notify_id => "bench-ali-$_",
		  app_id => '2014072300007148', charset => 'utf-8', version => '1.0', sign_type => 'RSA2',
		  trade_no => "bali$_", out_trade_no => "$prov-$_", trade_status => 'TRADE_SUCCESS',
		  total_amount => '1.00', subject => 'bench' } } 1 .. $n;
	my @sig = batch("sign $dir/ali.key",
		map { my $h = $_; join('&', map { "$_=$h->{$_}" } grep { $_ ne 'sign_type' } sort keys %$h) } @p);
	for my $i (0 .. $n - 1)
	{
		$p[$i]{sign} = $sig[$i];
		push @bodies, join('&', map { "$_=" . form_enc($p[$i]{$_}) } sort keys %{ $p[$i] });
		push @headers, '{}';
	}
}
elsif ($scheme eq 'unionpay')
{
	key('root');
	key('middle');
	key('sign');
	run("openssl req -x509 -new -key $dir/root.key -subj '/CN=Bench Root' -days 2 -out $dir/root.crt");
	open my $fh, '>', "$dir/ca.ext" or die;
	print $fh "basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n";
	close $fh;
	run("openssl req -new -key $dir/middle.key -subj '/CN=Bench OCA' -out $dir/middle.csr");
	run("openssl x509 -req -in $dir/middle.csr -CA $dir/root.crt -CAkey $dir/root.key -set_serial 2"
		  . " -days 2 -extfile $dir/ca.ext -out $dir/middle.crt 2>/dev/null");
	run('openssl', 'req', '-new', '-utf8', '-key', "$dir/sign.key", '-subj',
		'/C=CN/O=China UnionPay/CN=041@Z2024@中国银联股份有限公司@00000001', '-out', "$dir/sign.csr");
	run("openssl x509 -req -in $dir/sign.csr -CA $dir/middle.crt -CAkey $dir/middle.key -set_serial 3"
		  . " -days 2 -out $dir/sign.crt 2>/dev/null");
	print "SELECT callback_center.set_provider('$prov', 'unionpay', NULL);\n";
	print "SELECT callback_center.set_platform_keys('$prov', jsonb_build_object('root', \$pem\$"
	  . slurp("$dir/root.crt") . "\$pem\$, 'middle', \$pem\$" . slurp("$dir/middle.crt") . "\$pem\$));\n";
	my $cert = slurp("$dir/sign.crt");
	my @p = map { { accessType => '0', bizType => '000201', currencyCode => '156', encoding => 'UTF-8',
		  merId => '777290058110048', orderId => "$prov-$_", queryId => "bup$_", respCode => '00',
		  respMsg => 'success', signMethod => '01', signPubKeyCert => $cert, txnAmt => '100',
		  txnSubType => '01', txnTime => '20240603121212', txnType => '01', version => '5.1.0' } } 1 .. $n;
	my @digests = map { my $h = $_; my $c = join('&', map { "$_=$h->{$_}" } sort keys %$h);
		require Digest::SHA; Digest::SHA::sha256_hex($c) } @p;
	my @sig = batch("sign $dir/sign.key", @digests);
	for my $i (0 .. $n - 1)
	{
		$p[$i]{signature} = $sig[$i];
		push @bodies, join('&', map { "$_=" . form_enc($p[$i]{$_}) } sort keys %{ $p[$i] });
		push @headers, '{}';
	}
}
else
{
	die "unknown scheme $scheme\n";
}

# The orders, in transactions of 2,000 (one would run out of lock slots).
print "SELECT format('SELECT count(*) FROM (SELECT callback_center.place_order(''$prov-'' || g,"
  . " ''bench-user'', ''[{\"sku\": \"$prov-sku\", \"qty\": 1}]'', 100, NULL, ''$prov'')"
  . " FROM generate_series(%s, %s) AS g) AS s', k + 1, least(k + 2000, $n))"
  . " FROM generate_series(0, $n - 1, 2000) AS k \\gexec\n";
my $t = "public.bench_ch_${scheme}_in";
print "CREATE TABLE $t (n integer PRIMARY KEY, headers jsonb, body text);\n";
print "COPY $t FROM STDIN;\n";
print join("\t", $_ + 1, copy_esc($headers[$_]), copy_esc($bodies[$_])), "\n" for 0 .. $n - 1;
print "\\.\n";
print "CREATE SEQUENCE public.bench_ch_${scheme}_seq;\n";
