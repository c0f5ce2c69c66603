# Keys, certificates and signatures of the payment channels' tests, made
# with openssl (and test/unit/gcm_seal for AES-256-GCM) in a directory
# given once with channel_dir(), or a temporary one keys_dir() makes on
# first use (and returns):
#   rsa_key(name[, bits])          a key pair: name.key, name.pub (returned)
#   self_signed(name, serial)      a self-signed certificate (returned)
#   root_ca(name, cn)              a self-signed CA certificate (returned)
#   issue_cert(name, subj, ca, %o) a certificate for a new key issued by ca:
#                                  ca => 1 for a CA, start/end dates
#   sign_b64(name, data)           SHA256withRSA by name.key, base64
#   gcm_seal(key, nonce, aad, p)   AES-256-GCM ciphertext||tag, base64
#   form_enc(bytes)                %-encoding of a form value
#   q_lit(s)                       s as an SQL literal
package CallbackCenterChannels;

use strict;
use warnings;
use Exporter 'import';
use IPC::Run;
use MIME::Base64 qw(encode_base64);
use PostgreSQL::Test::Utils;

our @EXPORT = qw(channel_dir keys_dir run_ok slurp_raw rsa_key self_signed root_ca
  issue_cert sign_b64 gcm_seal form_enc q_lit);

my $dir;
my $nsig = 0;
my $serial = 16;

sub channel_dir { ($dir) = @_; return $dir; }

sub keys_dir
{
	$dir //= PostgreSQL::Test::Utils::tempdir;
	return $dir;
}

sub run_ok
{
	my @cmd = @_;
	my ($stdout, $stderr);
	IPC::Run::run(\@cmd, '>', \$stdout, '2>', \$stderr)
	  or die "@cmd failed: $stderr";
	return $stdout;
}

sub slurp_raw
{
	my ($f) = @_;
	open my $fh, '<:raw', $f or die "$f: $!";
	local $/;
	my $d = <$fh>;
	close $fh;
	return $d;
}

sub rsa_key
{
	my ($name, $bits) = @_;
	run_ok('openssl', 'genrsa', '-out', "$dir/$name.key", $bits // 2048);
	run_ok('openssl', 'rsa', '-in', "$dir/$name.key", '-pubout', '-out', "$dir/$name.pub");
	return PostgreSQL::Test::Utils::slurp_file("$dir/$name.pub");
}

sub self_signed
{
	my ($name, $serial_no) = @_;
	rsa_key($name);
	run_ok('openssl', 'req', '-x509', '-new', '-key', "$dir/$name.key",
		'-out', "$dir/$name.crt", '-subj', "/CN=$name", '-days', '30',
		'-set_serial', $serial_no);
	return PostgreSQL::Test::Utils::slurp_file("$dir/$name.crt");
}

# A self-signed CA certificate (Debian's openssl.cnf: v3_ca, CA:true).
sub root_ca
{
	my ($name, $cn) = @_;
	rsa_key($name);
	run_ok('openssl', 'req', '-x509', '-new', '-key', "$dir/$name.key", '-out',
		"$dir/$name.crt", '-subj', "/CN=$cn", '-days', '30');
	return PostgreSQL::Test::Utils::slurp_file("$dir/$name.crt");
}

# A certificate for a new key, issued by CA $ca with openssl ca: subject
# $subj (UTF-8), a CA or not, valid for 30 days or from start to end.
sub issue_cert
{
	my ($name, $subj, $ca, %o) = @_;
	rsa_key($name);
	my $cd = "$dir/ca_$name";
	mkdir $cd;
	my $bc = $o{ca} ? 'critical,CA:true' : 'CA:false';
	open my $fh, '>', "$cd/ca.cnf" or die;
	print $fh "[ca]\ndefault_ca = d\n[d]\ndir = $cd\ndatabase = $cd/index.txt\n"
	  . "new_certs_dir = $cd\nserial = $cd/serial\ndefault_md = sha256\n"
	  . "policy = p\nunique_subject = no\nx509_extensions = ext\ndefault_days = 30\n"
	  . "[p]\ncommonName = supplied\norganizationName = optional\n"
	  . "organizationalUnitName = optional\ncountryName = optional\n"
	  . "[ext]\nbasicConstraints = $bc\n"
	  . ($o{ca} ? "keyUsage = critical,keyCertSign,cRLSign\n" : "keyUsage = digitalSignature\n");
	close $fh;
	open $fh, '>', "$cd/index.txt" or die;
	close $fh;
	open $fh, '>', "$cd/serial" or die;
	printf $fh "%02X\n", $serial++;
	close $fh;
	run_ok('openssl', 'req', '-new', '-utf8', '-key', "$dir/$name.key", '-out',
		"$cd/r.csr", '-subj', $subj);
	run_ok('openssl', 'ca', '-batch', '-utf8', '-preserveDN', '-config', "$cd/ca.cnf",
		'-cert', "$dir/$ca.crt", '-keyfile', "$dir/$ca.key", '-in', "$cd/r.csr",
		'-out', "$dir/$name.crt", '-notext',
		$o{start} ? ('-startdate', $o{start}, '-enddate', $o{end}) : ());
	return PostgreSQL::Test::Utils::slurp_file("$dir/$name.crt");
}

sub sign_b64
{
	my ($name, $data) = @_;
	my $f = "$dir/data" . $nsig++;
	open my $fh, '>:raw', $f or die;
	print $fh $data;
	close $fh;
	run_ok('openssl', 'dgst', '-sha256', '-sign', "$dir/$name.key", '-out', "$f.sig", $f);
	return encode_base64(slurp_raw("$f.sig"), '');
}

# Needs test/unit/gcm_seal (make test/unit/gcm_seal).
sub gcm_seal
{
	my ($key, $nonce, $aad, $plain) = @_;
	my ($out, $err);
	IPC::Run::run([ './test/unit/gcm_seal', $key, $nonce, $aad ],
		'<', \$plain, '>', \$out, '2>', \$err)
	  or die "gcm_seal: $err";
	chomp $out;
	return $out;
}

sub form_enc
{
	my ($s) = @_;
	$s =~ s/([^A-Za-z0-9\-_.* ])/sprintf('%%%02X', ord($1))/ge;
	$s =~ s/ /+/g;
	return $s;
}

sub q_lit
{
	my ($s) = @_;
	$s =~ s/'/''/g;
	return "'$s'";
}

1;
