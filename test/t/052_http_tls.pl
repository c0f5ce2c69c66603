# TLS peers are verified: a receiver with a self-signed certificate is
# refused with a certificate error (status 0), and the request never
# reaches it.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $dir = PostgreSQL::Test::Utils::tempdir('tls');
system_or_bail('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
	'-keyout', "$dir/key.pem", '-out', "$dir/cert.pem", '-days', '1',
	'-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1');

my $node = cc_node('http_tls');
my $rcv = CallbackCenterReceiver->start(
	tls_cert => "$dir/cert.pem", tls_key => "$dir/key.pem");
like($rcv->url('/x'), qr{^https://}, 'receiver speaks https');

my $row = $node->safe_psql('postgres', qq{
	SELECT status || '|' || coalesce(error, '<null>')
	FROM callback_center.http_probe(ARRAY['${\ $rcv->url('/tls/1')}'], timeout_ms => 5000)});
my ($status, $error) = split /\|/, $row, 2;
is($status, '0', 'self-signed certificate: no response');
like($error, qr/certificate/i, 'self-signed certificate: certificate error reported');
is(scalar($rcv->log_lines('/tls/')), 0, 'the request never reached the receiver');

$rcv->stop;
$node->stop;
done_testing();
