# Keys and certificates made with the openssl command for the channel
# tests, in a directory of the test's: RSA key pairs, a self-signed root and
# certificates it (or an intermediate) issues, as test/t/075_channels.pl and
# test/t/079_unionpay.pl make them.
package CallbackCenterKeys;

use strict;
use warnings;
use IPC::Run;
use PostgreSQL::Test::Utils;
use Exporter 'import';

our @EXPORT = qw(keys_dir run_ok rsa_key root_ca issue_cert);

my $dir;

# Where the keys go (a temporary directory, made on first use).
sub keys_dir
{
	$dir //= PostgreSQL::Test::Utils::tempdir;
	return $dir;
}

# Runs a command and returns its standard output; dies with its errors.
sub run_ok
{
	my @cmd = @_;
	my ($stdout, $stderr);
	IPC::Run::run(\@cmd, '>', \$stdout, '2>', \$stderr)
	  or die "@cmd failed: $stderr";
	return $stdout;
}

# A new RSA key pair NAME.key / NAME.pub; returns the public key's PEM.
sub rsa_key
{
	my ($name, $bits) = @_;
	my $d = keys_dir();
	run_ok('openssl', 'genrsa', '-out', "$d/$name.key", $bits // 2048);
	run_ok('openssl', 'rsa', '-in', "$d/$name.key", '-pubout', '-out', "$d/$name.pub");
	return PostgreSQL::Test::Utils::slurp_file("$d/$name.pub");
}

# A self-signed CA certificate NAME.crt for a new key; returns its PEM.
sub root_ca
{
	my ($name, $cn) = @_;
	my $d = keys_dir();
	rsa_key($name);
	run_ok('openssl', 'req', '-x509', '-new', '-key', "$d/$name.key", '-out',
		"$d/$name.crt", '-subj', "/CN=$cn", '-days', '30');
	return PostgreSQL::Test::Utils::slurp_file("$d/$name.crt");
}

# A certificate NAME.crt for a new key, issued by CA $ca (openssl ca),
# subject $subj (UTF-8), a CA itself with ca => 1; returns its PEM.
my $serial = 16;
sub issue_cert
{
	my ($name, $subj, $ca, %o) = @_;
	my $d = keys_dir();
	rsa_key($name);
	my $cd = "$d/ca_$name";
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
	run_ok('openssl', 'req', '-new', '-utf8', '-key', "$d/$name.key", '-out',
		"$cd/r.csr", '-subj', $subj);
	run_ok('openssl', 'ca', '-batch', '-utf8', '-preserveDN', '-config', "$cd/ca.cnf",
		'-cert', "$d/$ca.crt", '-keyfile', "$d/$ca.key", '-in', "$cd/r.csr",
		'-out', "$d/$name.crt", '-notext');
	return PostgreSQL::Test::Utils::slurp_file("$d/$name.crt");
}

1;
