# callback_center.allowed_destinations at delivery time: every address the
# server is about to connect to (after DNS) is judged, in http_probe and in
# the worker alike.  By default (empty list) loopback, link-local (the cloud
# metadata address), unspecified, private and this host's own addresses are
# refused, and a listed host name does not open them: only a listed network
# inside their range does.  Each refusal is a failed attempt with a clear
# error, retried on the schedule and then dead; a reload that widens the
# list lets the waiting events through; a kept-alive connection opened under
# the old list is not reused.  Also the create-time check (CB041).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $port = $rcv->port;
# The default list (cc_node lists loopback for the other tests).
my $node = cc_node('allowlist', conf => "callback_center.retry_jitter = 0\n"
	  . "callback_center.allowed_destinations = ''\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Sets the list and waits until the worker has reloaded it.
sub set_allowlist
{
	my ($list) = @_;
	my $before = sql(q{SELECT reloads FROM callback_center.worker_status()});
	sql(qq{ALTER SYSTEM SET callback_center.allowed_destinations = '$list'});
	sql(q{SELECT pg_reload_conf()});
	$node->poll_query_until('postgres',
		qq{SELECT reloads > $before FROM callback_center.worker_status()})
	  or die "the worker did not reload";
	$node->poll_query_until('postgres',
		qq{SELECT current_setting('callback_center.allowed_destinations') = '$list'})
	  or die "the setting did not change";
}

# The error http_probe gives for one URL ('' when none).
sub probe_error
{
	my ($url) = @_;
	return sql(qq{SELECT coalesce(error, '') FROM callback_center.http_probe(
		ARRAY['$url'], timeout_ms => 1000)});
}

# Errors of the attempts of the event with aggregate id $agg.
sub attempt_errors
{
	my ($agg) = @_;
	return sql(qq{SELECT string_agg(DISTINCT a.error, ';') FROM callback_center.delivery_attempts a
		JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = '$agg'});
}

# One of this host's own addresses that is neither loopback nor link-local.
my $own;
for my $line (split /\n/, `ip -o addr show 2>/dev/null`)
{
	next unless $line =~ /\binet6?\s+([0-9a-fA-F.:]+)\/\d+/;
	my $a = $1;
	next if $a =~ /^(127\.|::1$|fe80:|169\.254\.)/i;
	$own = $a;
	last if $a =~ /\./;    # IPv4 first
}
($own) = grep { !/^127\./ } split ' ', `hostname -I 2>/dev/null` unless defined $own;
my $own_host = defined $own && $own =~ /:/ ? "[$own]" : $own;
note('this host\'s own address: ' . ($own // 'none found'));

# --- The default: nothing of the host's own network. ---

my ($rc, $out, $err) = $node->psql('postgres',
	qq{SELECT callback_center.create_endpoint('ip', 'http://127.0.0.1:$port/ip', '{ev.ip}', '$secret')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  CB041: destination "127.0.0.1" is not allowed/,
	'default: create_endpoint refuses 127.0.0.1 (CB041)');
like($err, qr/DETAIL:  The address is in the loopback range/, 'with a detail naming the range');

my %refused = (
	"http://127.0.0.1:$port/p/1" => qr/^destination not allowed: 127\.0\.0\.1 \(loopback\) is not in callback_center\.allowed_destinations$/,
	"http://[::1]:$port/p/2" => qr/^destination not allowed: ::1 \(loopback\)/,
	"http://[::ffff:127.0.0.1]:$port/p/3" => qr/^destination not allowed: ::ffff:127\.0\.0\.1 \(loopback\)/,
	"http://2130706433:$port/p/4" => qr/^destination not allowed: 127\.0\.0\.1 \(loopback\)/,
	'http://169.254.169.254/latest/meta-data/' => qr/^destination not allowed: 169\.254\.169\.254 \(link-local\)/,
	"http://0.0.0.0:$port/p/5" => qr/^destination not allowed: 0\.0\.0\.0 \(unspecified\)/,
	'http://10.255.255.1/p/6' => qr/^destination not allowed: 10\.255\.255\.1 \(private\)/,
	"http://localhost:$port/p/7" => qr/^destination not allowed: (127\.0\.0\.1|::1) \(loopback\)/,
);
for my $url (sort keys %refused)
{
	like(probe_error($url), $refused{$url}, "default: http_probe refuses $url at connect");
}
SKIP:
{
	skip 'no non-loopback address on this host', 1 unless defined $own;
	like(probe_error("http://$own_host:$port/p/8"),
		qr/^destination not allowed: \Q$own\E \(this host\)/,
		"default: this host's own address $own is refused");
}
is(scalar($rcv->log_lines('/p/')), 0, 'the receiver saw none of them');

# The worker: a name resolving to loopback is refused at every attempt,
# retried on the default schedule (1 s, 3 s, 5 s), then dead.
is(sql(qq{SELECT callback_center.create_endpoint('named', 'http://localhost:$port/named', '{ev.named}', '$secret') > 0}),
	't', 'default: a host name is accepted at create time (its addresses are judged at connect)');
sql(q{SELECT callback_center.enqueue('ev.named', 'named-1', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'dead' FROM callback_center.outbox WHERE aggregate_id = 'named-1'}),
	'the event to a name resolving to loopback dies after the schedule');
like(attempt_errors('named-1'), qr/^destination not allowed: (127\.0\.0\.1|::1) \(loopback\) is not in callback_center\.allowed_destinations$/,
	'every attempt says the destination is not allowed, naming the address and its range');
is(sql(q{SELECT attempts::text || ':' || coalesce(last_http_status::text, 'none')
          FROM callback_center.outbox WHERE aggregate_id = 'named-1'}),
	'4:none', 'four attempts (the schedule), no HTTP status');
is(scalar($rcv->log_lines('/named')), 0, 'the receiver never saw it');

# --- A listed host name does not open a reserved address. ---

set_allowlist('localhost');
like(probe_error("http://localhost:$port/p/9"), qr/^destination not allowed: (127\.0\.0\.1|::1) \(loopback\)/,
	'"localhost" listed, 127.0.0.1 not: http_probe to localhost is refused at connect');
($rc, $out, $err) = $node->psql('postgres',
	qq{SELECT callback_center.alter_endpoint('named', '{"url": "http://127.0.0.1:$port/named"}')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/CB041: destination "127.0.0.1" is not allowed/, 'and alter_endpoint refuses the address itself');
sql(q{SELECT callback_center.enqueue('ev.named', 'named-2', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) > 0 FROM callback_center.delivery_attempts a
		    JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = 'named-2'}),
	'an attempt to the listed name was made');
like(attempt_errors('named-2'), qr/^destination not allowed: (127\.0\.0\.1|::1) \(loopback\)/,
	'the worker refuses it at connect too');
is(scalar($rcv->log_lines('/named')), 0, 'the receiver never saw it');

# Listing the address opens it: the waiting event gets through.
set_allowlist('localhost, 127.0.0.1');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'named-2'}),
	'with 127.0.0.1 listed the waiting event is delivered');
is(scalar($rcv->log_lines('/named')), 1, 'the receiver got it');

# --- Private ranges and this host's addresses only when listed. ---

like(probe_error('http://10.255.255.1/p/10'), qr/^destination not allowed: 10\.255\.255\.1 \(private\)/,
	'a private address is refused while 10.0.0.0/8 is not listed');
set_allowlist('0.0.0.0/0, 127.0.0.1');
like(probe_error('http://10.255.255.1/p/10'), qr/^destination not allowed: 10\.255\.255\.1 \(private\)/,
	'0.0.0.0/0 does not open it');
set_allowlist('10.0.0.0/8, 127.0.0.1');
unlike(probe_error('http://10.255.255.1/p/10'), qr/destination not allowed/,
	'with 10.0.0.0/8 listed the connection is tried');
SKIP:
{
	skip 'no non-loopback address on this host', 2 unless defined $own;
	set_allowlist('0.0.0.0/0, ::/0, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7');
	like(probe_error("http://$own_host:$port/p/11"),
		qr/^destination not allowed: \Q$own\E \(this host\)/,
		'no network opens this host\'s own address');
	set_allowlist($own);
	unlike(probe_error("http://$own_host:$port/p/11"), qr/destination not allowed/,
		'the address itself listed opens it');
}

# --- A list change closes kept-alive connections. ---

set_allowlist('127.0.0.1');
is(sql(qq{SELECT callback_center.create_endpoint('ok', 'http://127.0.0.1:$port/ok', '{ev.ok}', '$secret') > 0}),
	't', 'a listed address is accepted at create time');
sql(q{SELECT callback_center.enqueue('ev.ok', 'warm', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'warm'}),
	'delivered to the listed address (a kept-alive connection is now open)');

set_allowlist('127.0.0.2/32, localhost');
my $seen_before = scalar($rcv->log_lines('/ok'));
sql(q{SELECT callback_center.enqueue('ev.ok', 'blocked-1', '{}')});
sql(q{SELECT callback_center.enqueue('ev.named', 'blocked-2', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 2 FROM callback_center.outbox
		   WHERE aggregate_id LIKE 'blocked-%' AND status = 'dead'}),
	'blocked events die after the schedule');
is(attempt_errors('blocked-1'),
	'destination not allowed: 127.0.0.1 (loopback) is not in callback_center.allowed_destinations',
	'every attempt says why');
is(scalar($rcv->log_lines('/ok')), $seen_before,
	'the receiver saw none of them (the kept-alive connection was not reused)');
ok(sql(q{SELECT pid FROM callback_center.worker_status()}) > 0, 'the worker is still running');

# Widening the list lets waiting events through.
sql(q{SELECT callback_center.enqueue('ev.ok', 'later-1', '{}')});
set_allowlist('127.0.0.0/8, ::1');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'later-1'}),
	'after the reload the waiting event is delivered');

# A malformed list in postgresql.conf is refused on reload; the old one stays.
# (ALTER SYSTEM would refuse it; postgresql.auto.conf would override it.)
sql(q{ALTER SYSTEM RESET callback_center.allowed_destinations});
$node->append_conf('postgresql.conf', "callback_center.allowed_destinations = '10.0.0.0/33'\n");
my $log_offset = -s $node->logfile;
$node->reload;
ok($node->wait_for_log(qr/invalid value for parameter "callback_center.allowed_destinations": "10.0.0.0\/33"/, $log_offset),
	'a malformed list is logged as invalid at reload');
ok($node->wait_for_log(qr/Entry "10.0.0.0\/33" has a prefix length outside 0 to 32/, $log_offset),
	'with the entry named');
is(sql(q{SHOW callback_center.allowed_destinations}), '127.0.0.0/8, ::1', 'the previous list stays in force');

$node->stop;
$rcv->stop;
done_testing();
