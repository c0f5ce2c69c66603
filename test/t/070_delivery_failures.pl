# Transport failures through the worker (not only through http_probe): a
# refused connection, a name that does not resolve, a receiver that stalls
# past the endpoint's timeout, a reset connection and an oversized answer are
# each a recorded, retried attempt with a clear error, never an ERROR that
# kills the worker.  Also: no transaction is open while a request is in
# flight, webhook-timestamp is per attempt while webhook-id stays, a reload
# changes response_cap live, and no secret reaches the server log.
use strict;
use warnings;
use IO::Socket::INET;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
# debug2: if any code path logged a secret, this level would show it.  The
# statements themselves are not logged: a secret passed as a literal would be
# in them (README: let create_endpoint generate it).
my $node = cc_node('failures', conf => "callback_center.retry_jitter = 0\nlog_min_messages = debug2\nlog_statement = none\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $pid = worker_pid($node);
ok($pid =~ /^\d+$/, "worker runs (pid $pid)");

# A loopback port nobody listens on: bind, read the port, close.
my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp', Listen => 1)
  or die "socket: $!";
my $closed_port = $sock->sockport;
close $sock;

# Two attempts each (1 s apart on the default schedule), then dead.
my %targets = (
	refused => "http://127.0.0.1:$closed_port/x",
	nodns => 'http://cc-no-such-host.invalid/x',
	stall => $rcv->url('/stall'),
	reset => $rcv->url('/reset'),
	big => $rcv->url('/big'));
for my $name (sort keys %targets)
{
	sql(qq{SELECT callback_center.create_endpoint('f_$name', '$targets{$name}', '{f.$name}',
	        '$secret', '{"max_attempts": 2, "timeout_ms": 1500}')});
}
$rcv->control('/stall', 'stall', stall_s => 6);
$rcv->control('/reset', 'reset');
$rcv->control('/big', '500', body_size => 100000);

# While the stalled request is in flight the worker holds no transaction.
sql(q{SELECT callback_center.enqueue('f.stall', 'st', '{}')});
ok($rcv->wait_for_requests('/stall', 1), 'the stalled request reached the receiver');
is(sql(q{SELECT coalesce(xact_start::text, 'none') || ' ' || coalesce(backend_xid::text, 'none')
           FROM pg_stat_activity WHERE backend_type = 'callback_center worker'}),
	'none none', 'no transaction open while a request is in flight');

sql(qq{SELECT callback_center.enqueue('f.$_', '$_', '{}')}) for grep { $_ ne 'stall' } sort keys %targets;
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 5 FROM callback_center.outbox WHERE event_type LIKE 'f.%' AND status = 'dead'}),
	'every failing event was retried and dead-lettered');

my %err = map { split /\|/, $_, 2 } split /\n/, sql(q{
	SELECT e.name || '|' || string_agg(coalesce(a.http_status::text, '-') || ' ' || coalesce(a.error, ''), ' / ' ORDER BY a.attempt)
	  FROM callback_center.delivery_attempts a JOIN callback_center.endpoints e ON e.id = a.endpoint_id
	 WHERE e.name LIKE 'f\_%' GROUP BY e.name});
like($err{f_refused}, qr/^- .*(refused|connect).* \/ - /i, "refused connection recorded twice: $err{f_refused}");
like($err{f_nodns}, qr/^- .*resolve.* \/ - /i, "unresolvable name recorded twice: $err{f_nodns}");
like($err{f_stall}, qr/^- .*tim.*out.* \/ - /i, "stall past the timeout recorded twice: $err{f_stall}");
like($err{f_reset}, qr/^- \S.* \/ - \S/, "reset connection recorded twice: $err{f_reset}");
like($err{f_big}, qr/^500 .* \/ 500 /, 'oversized 500 answer recorded twice');
ok(sql(q{SELECT max(latency_ms) FROM callback_center.delivery_attempts a JOIN callback_center.endpoints e
          ON e.id = a.endpoint_id WHERE e.name = 'f_stall'}) < 5000,
	'a stalled request is cut at the endpoint timeout, not at the receiver');
is(sql(q{SELECT string_agg((last_error IS NOT NULL AND attempts = 2)::text, ',') FROM callback_center.dead_letters
          WHERE event_type LIKE 'f.%'}), 'true,true,true,true,true', 'dead letters keep their last error');

# The response body is kept up to response_cap (4kB), and a reload changes
# the cap for the next attempt.
is(sql(q{SELECT max(octet_length(response_body)) FROM callback_center.delivery_attempts a
          JOIN callback_center.endpoints e ON e.id = a.endpoint_id WHERE e.name = 'f_big'}),
	'4096', 'response body capped at 4kB');
sql(q{ALTER SYSTEM SET callback_center.response_cap = '1kB'});
sql(q{SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres', q{SELECT current_setting('callback_center.response_cap') = '1kB'}),
	'reloaded');
# The worker applies the reload when it next wakes; give it one event first.
sql(q{SELECT callback_center.replay_dead(id, 'cap') FROM callback_center.dead_letters WHERE event_type = 'f.big'});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 4 FROM callback_center.delivery_attempts a JOIN callback_center.endpoints e
		    ON e.id = a.endpoint_id WHERE e.name = 'f_big'}),
	'the replayed event was tried twice more');
is(sql(q{SELECT string_agg(octet_length(response_body)::text, ',' ORDER BY a.id) FROM callback_center.delivery_attempts a
          JOIN callback_center.endpoints e ON e.id = a.endpoint_id WHERE e.name = 'f_big'}),
	'4096,4096,1024,1024', 'the new cap applies after the reload');

# Two attempts of one event: same webhook-id, new webhook-timestamp, both signed.
my @big = $rcv->log_lines('/big');
is($big[0]{headers}{'webhook-id'}, $big[1]{headers}{'webhook-id'}, 'retries keep the webhook-id');
ok($big[1]{headers}{'webhook-timestamp'} > $big[0]{headers}{'webhook-timestamp'},
	'each attempt carries its own webhook-timestamp');
is(scalar(grep { $_->{signature_ok} } @big), scalar(@big), 'every attempt is signed for its own timestamp');

is(worker_pid($node), $pid, 'the same worker survived every failure');
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$secret\E|MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw/, 'no secret in the server log (debug2)');
unlike($log, qr/ERROR:.*callback_center worker|terminated by signal/, 'no worker error or crash logged');

$node->stop;
$rcv->stop;
done_testing();
