# The HTTP layer (src/http.c) through callback_center.http_probe(), against
# the loopback receiver: statuses, Retry-After, redirects not followed,
# timeouts, resets, refused connections, URL checks, body cap, concurrency
# caps, keep-alive reuse across calls, cancel, privileges.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use CallbackCenterTest;
use CallbackCenterReceiver;

my $node = cc_node('http');
my $rcv = CallbackCenterReceiver->start;

# Runs http_probe over the given URLs (and extra named arguments) and
# returns its rows as hashes.
sub probe
{
	my ($urls, $args) = @_;
	my $list = join(',', map { "'$_'" } @$urls);
	$args = $args ? ", $args" : '';
	my $out = $node->safe_psql('postgres', qq{
		SELECT url, status, latency_ms > 0, coalesce(body, '<null>'),
		       truncated, coalesce(retry_after_s::text, '<null>'),
		       coalesce(error, '<null>'), latency_ms
		FROM callback_center.http_probe(ARRAY[$list]::text[] $args)});
	my @rows;
	for my $line (split /\n/, $out)
	{
		my @f = split /\|/, $line, -1;
		push @rows, {
			url => $f[0], status => $f[1], latency_positive => $f[2],
			body => $f[3], truncated => $f[4], retry_after => $f[5],
			error => $f[6], latency_ms => $f[7] };
	}
	return @rows;
}

# Runs SQL expected to fail and returns the SQLSTATE it failed with.
sub sqlstate_of
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\n$sql");
	return $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : "no error ($ret): $err";
}

# 200 with body and latency; the request as the receiver saw it.
my @rows;
my ($r) = probe([ $rcv->url('/ok/1') ],
	q{request_body => '{"order":"o-1"}', headers => ARRAY['X-Probe: yes']});
is($r->{status}, 200, '200 status');
is($r->{body}, '{"ok":true}', 'response body returned');
is($r->{latency_positive}, 't', 'latency measured');
is($r->{error}, '<null>', 'no error on success');
is($r->{retry_after}, '<null>', 'no Retry-After when absent');
my ($seen) = $rcv->log_lines('/ok/1');
is($seen->{method}, 'POST', 'sent as POST');
is($seen->{body}, '{"order":"o-1"}', 'request body delivered');
is($seen->{headers}{'content-type'}, 'application/json', 'JSON content type by default');
is($seen->{headers}{'x-probe'}, 'yes', 'caller header delivered');
ok(!exists $seen->{headers}{expect}, 'no Expect: 100-continue');
like($seen->{headers}{'user-agent'}, qr{^callback_center/}, 'user agent names the extension');

# Host names go through the resolver; an unknown one is a row, not an ERROR.
my $port = $rcv->port;
@rows = probe([ "http://localhost:$port/dns/1", 'http://no-such-host.invalid/x' ],
	'timeout_ms => 2000');
is($rows[0]{status}, 200, 'localhost resolved and answered');
is($rows[1]{status}, 0, 'unknown host: status 0');
like($rows[1]{error}, qr/resolve/i, 'unknown host: resolve error reported');

# Error statuses are results, not errors.
$rcv->control('/e500', '500');
($r) = probe([ $rcv->url('/e500') ]);
is($r->{status}, 500, '500 status');
is($r->{error}, '<null>', 'a 500 is a response, not a transfer error');

# Retry-After: delta-seconds, a past HTTP-date, a future HTTP-date.
$rcv->control('/e429', '429', retry_after => 7);
$rcv->control('/e503past', '503', retry_after => 'Wed, 21 Oct 2015 07:28:00 GMT');
$rcv->control('/e503future', '503', retry_after => 'Fri, 31 Dec 2100 23:59:59 GMT');
@rows = probe([ $rcv->url('/e429'), $rcv->url('/e503past'), $rcv->url('/e503future') ]);
is($rows[0]{status}, 429, '429 status');
is($rows[0]{retry_after}, 7, 'Retry-After seconds parsed');
is($rows[1]{retry_after}, 0, 'Retry-After date in the past is 0');
cmp_ok($rows[2]{retry_after}, '>', 86400 * 365, 'Retry-After future date is seconds from now');

# Redirects are not followed.
$rcv->control('/redir', 'redirect', location => '/redirected');
($r) = probe([ $rcv->url('/redir') ]);
is($r->{status}, 302, '302 returned as a status');
is(scalar($rcv->log_lines('/redir')), 1, 'receiver saw one request');
is(scalar($rcv->log_lines('/redirected')), 0, 'redirect target not requested');

# Large body: truncated to the cap.
$rcv->control('/big', '200', body_size => 200000);
($r) = probe([ $rcv->url('/big') ]);
is(length($r->{body}), 65536, 'body truncated to the default cap of 64 kB');
is($r->{truncated}, 't', 'truncation reported');
($r) = probe([ $rcv->url('/big') ], 'max_body_bytes => 100');
is(length($r->{body}), 100, 'body truncated to max_body_bytes');
($r) = probe([ $rcv->url('/ok/2') ], 'max_body_bytes => 100');
is($r->{truncated}, 'f', 'a short body is not truncated');

# 200 URLs at max_concurrent 8: all complete, never more than 8 at once.
$rcv->reset;
$rcv->control('/conc', '200', delay_ms => 20);
my $conc_urls = join(',', map { "'" . $rcv->url("/conc/$_") . "'" } 1 .. 200);
is($node->safe_psql('postgres', qq{
	SELECT count(*) || '/' || count(*) FILTER (WHERE status = 200 AND error IS NULL)
	FROM callback_center.http_probe(ARRAY[$conc_urls], max_concurrent => 8)}),
	'200/200', '200 concurrent URLs all answered 200');
is(scalar($rcv->log_lines('/conc/')), 200, 'receiver logged 200 requests');
my $stats = $rcv->stats;
cmp_ok($stats->{max_in_flight}, '<=', 8, 'at most max_concurrent in flight');
cmp_ok($stats->{max_in_flight}, '>=', 2, 'requests did run concurrently');

# max_per_host: two receivers, each capped at 2 in flight, both served.
my $rcv2 = CallbackCenterReceiver->start;
$rcv->reset;
$rcv->control('/ph', '200', delay_ms => 20);
$rcv2->control('/ph', '200', delay_ms => 20);
my $ph_urls = join(',', map { ("'" . $rcv->url("/ph/$_") . "'", "'" . $rcv2->url("/ph/$_") . "'") } 1 .. 40);
is($node->safe_psql('postgres', qq{
	SELECT count(*) FILTER (WHERE status = 200)
	FROM callback_center.http_probe(ARRAY[$ph_urls], max_concurrent => 8, max_per_host => 2)}),
	'80', 'max_per_host: all 80 requests answered');
for my $r ($rcv, $rcv2)
{
	is(scalar($r->log_lines('/ph/')), 40, 'max_per_host: each receiver got its 40');
	cmp_ok($r->stats->{max_in_flight}, '<=', 2, 'max_per_host: at most 2 in flight per receiver');
}
$rcv2->stop;

# Keep-alive: two calls in one session reuse the connections of the first.
my $ka = sub {
	my $p = shift;
	join(',', map { "'" . $rcv->url("/ka$p/$_") . "'" } 1 .. 50);
};
$node->safe_psql('postgres', qq{
	SELECT count(*) FROM callback_center.http_probe(ARRAY[${\ $ka->('a')}], max_concurrent => 4);
	SELECT count(*) FROM callback_center.http_probe(ARRAY[${\ $ka->('b')}], max_concurrent => 4);});
my @ka = ($rcv->log_lines('/kaa/'), $rcv->log_lines('/kab/'));
is(scalar(@ka), 100, 'receiver logged 100 requests over two calls');
my %conns = map { $_->{client_port} => 1 } @ka;
cmp_ok(scalar(keys %conns), '<=', 8, 'at most 8 TCP connections for 100 requests (keep-alive)');
my %first = map { $_->{client_port} => 1 } $rcv->log_lines('/kaa/');
ok((grep { $first{ $_->{client_port} } } $rcv->log_lines('/kab/')),
	'second call reused connections of the first');

# Transfer failures are rows with an error: timeout, reset, refused.
$rcv->control('/stall', 'stall', stall_s => 30);
$rcv->control('/reset', 'reset');
my $closed_port = PostgreSQL::Test::Cluster::get_free_port();
@rows = probe([ $rcv->url('/stall'), $rcv->url('/reset'),
	"http://127.0.0.1:$closed_port/x", $rcv->url('/ok/3') ], 'timeout_ms => 500');
is($rows[0]{status}, 0, 'stall past the timeout: status 0');
like($rows[0]{error}, qr/timed out/i, 'stall past the timeout: timeout error');
cmp_ok($rows[0]{latency_ms}, '<', 30000, 'timed-out request returned before the stall ended');
is($rows[1]{status}, 0, 'reset: status 0');
like($rows[1]{error}, qr/reset|recv failure|empty reply/i, 'reset: error reported');
is($rows[2]{status}, 0, 'refused: status 0');
like($rows[2]{error}, qr/connect/i, 'refused: error reported');
is($rows[3]{status}, 200, 'a good URL in the same call still succeeds');

# URL and argument checks.
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['ftp://127.0.0.1/x'])}),
	'22023', 'ftp:// URL refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['file:///etc/passwd'])}),
	'22023', 'file:// URL refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['http://'])}),
	'22023', 'URL without a host refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['not a url'])}),
	'22023', 'relative URL refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['http://x/'], headers => ARRAY[E'X-A: 1\r\nX-B: 2'])}),
	'22023', 'header with CR/LF refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['http://x/'], timeout_ms => 0)}),
	'22023', 'timeout_ms 0 refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['http://x/'], max_concurrent => 0)}),
	'22023', 'max_concurrent 0 refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY['http://x/'], max_per_host => 0)}),
	'22023', 'max_per_host 0 refused with 22023');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(ARRAY[NULL])}),
	'22004', 'NULL URL refused with 22004');
is(sqlstate_of(q{SELECT * FROM callback_center.http_probe(NULL)}),
	'22004', 'NULL urls refused with 22004');
is($node->safe_psql('postgres', q{SELECT count(*) FROM callback_center.http_probe('{}')}),
	'0', 'no URLs, no rows');

# Privileges: admin only.
$node->safe_psql('postgres', q{
	CREATE ROLE probe_plain LOGIN;
	CREATE ROLE probe_admin LOGIN IN ROLE callback_center_admin;
	CREATE ROLE probe_app LOGIN IN ROLE callback_center_app;
	GRANT USAGE ON SCHEMA callback_center TO probe_admin, probe_app;});
is(sqlstate_of(q{SET ROLE probe_plain; SELECT * FROM callback_center.http_probe('{}')}),
	'42501', 'a plain role cannot run http_probe');
is(sqlstate_of(q{SET ROLE probe_app; SELECT * FROM callback_center.http_probe('{}')}),
	'42501', 'the application role cannot run http_probe');
is($node->safe_psql('postgres', qq{SET ROLE probe_admin;
	SELECT status FROM callback_center.http_probe(ARRAY['${\ $rcv->url('/ok/admin')}'])}),
	'200', 'the admin role can run http_probe');

# Cancel: a probe stuck on a 30 s stall stops promptly, and the session's
# HTTP state is clean afterwards.
$rcv->control('/s30', 'stall', stall_s => 30);
my $bg = $node->background_psql('postgres', on_error_stop => 0);
my $bgpid = $bg->query_safe('SELECT pg_backend_pid()');
$bg->query_until(qr/started/, "\\echo started\nSELECT status FROM callback_center.http_probe(ARRAY['"
	  . $rcv->url('/s30/1') . "','" . $rcv->url('/s30/2') . "'], timeout_ms => 60000);\n");
ok($rcv->wait_for_requests('/s30/', 2), 'stalled requests reached the receiver');
ok($node->poll_query_until('postgres',
		"SELECT wait_event_type = 'Extension' FROM pg_stat_activity WHERE pid = $bgpid"),
	'a waiting probe shows wait_event_type Extension');
my $t0 = time();
$node->safe_psql('postgres', "SELECT pg_cancel_backend($bgpid)");
ok($node->poll_query_until('postgres',
		"SELECT state = 'idle' FROM pg_stat_activity WHERE pid = $bgpid"),
	'cancelled probe finished');
cmp_ok(time() - $t0, '<', 30, 'cancel took effect before the stall would have ended');
my ($after) = $bg->query('SELECT status FROM callback_center.http_probe(ARRAY['
	  . "'" . $rcv->url('/ok/after') . "'])");
like($bg->{stderr}, qr/canceling statement due to user request/, 'cancel raised 57014');
is($after, '200', 'the session probes again after a cancel');
$bg->quit;

$rcv->stop;
$node->stop;
done_testing();
