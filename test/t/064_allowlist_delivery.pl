# callback_center.allowed_destinations at delivery time: the worker checks
# the address it actually connects to (after DNS), so an endpoint outside
# the list is never contacted; each refusal is a failed attempt with a
# clear error, retried on the schedule and then dead; a listed host name
# or network is delivered to; a reload that widens the list lets the
# waiting events through.  Also the create-time check with the list in
# force (CB041).
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
my $node = cc_node('allowlist', conf => "callback_center.retry_jitter = 0\n");

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

# Endpoints made while the list is empty: every URL is accepted.
sql(qq{SELECT callback_center.create_endpoint('ip', 'http://127.0.0.1:$port/ip', '{ev.ip}', '$secret')});
sql(qq{SELECT callback_center.create_endpoint('named', 'http://localhost:$port/named', '{ev.named}', '$secret')});
sql(qq{SELECT callback_center.create_endpoint('ok', 'http://127.0.0.1:$port/ok', '{ev.ok}', '$secret')});

# A delivery before the list exists opens a keep-alive connection to the
# receiver; the list change below must not let it be reused.
sql(q{SELECT callback_center.enqueue('ev.ok', 'warm', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'warm'}),
	'delivered while the list is empty');

# Only 127.0.0.2 and the name "localhost" may be reached.
set_allowlist('127.0.0.2/32, localhost');

# Create time: an IP literal outside the list is refused; a listed name is
# accepted; an unlisted name is accepted because networks are listed (its
# addresses are checked at each connection).
my ($rc, $out, $err) = $node->psql('postgres',
	qq{SELECT callback_center.create_endpoint('bad', 'http://127.0.0.1:$port/bad', '{ev.bad}')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  CB041: destination "127.0.0.1" is not allowed/, 'create_endpoint refuses an address outside the list (CB041)');
like($err, qr/DETAIL:  The address is in none of the networks/, 'with a detail saying why');
($rc, $out, $err) = $node->psql('postgres',
	q{SELECT callback_center.alter_endpoint('ok', '{"url": "http://[::1]:1/ok"}')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/CB041: destination "\[::1\]" is not allowed/, 'alter_endpoint refuses it too');
is(sql(qq{SELECT url FROM callback_center.endpoints WHERE name = 'ok'}), "http://127.0.0.1:$port/ok",
	'the refused alter changed nothing');
is(sql(qq{SELECT callback_center.create_endpoint('byname', 'http://localhost:$port/byname', '{ev.byname}') > 0}),
	't', 'a listed host name is accepted');
is(sql(qq{SELECT callback_center.create_endpoint('other', 'http://unlisted.invalid:$port/x', '{ev.other}') > 0}),
	't', 'an unlisted name is accepted at create time when networks are listed');

# Delivery time: 127.0.0.1 is not in 127.0.0.2/32.  The receiver never
# sees the event; each attempt is recorded with the reason and retried on
# the default schedule (1 s, 3 s, 5 s), then the event is dead.
my $seen_before = scalar($rcv->log_lines('/ip')) + scalar($rcv->log_lines('/ok'));
sql(q{SELECT callback_center.enqueue('ev.ip', 'blocked-1', '{}')});
sql(q{SELECT callback_center.enqueue('ev.ok', 'blocked-2', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 2 FROM callback_center.outbox
		   WHERE aggregate_id LIKE 'blocked-%' AND status = 'dead'}),
	'blocked events die after the schedule');
is(sql(q{SELECT string_agg(DISTINCT a.error, ';') FROM callback_center.delivery_attempts a
          JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id LIKE 'blocked-%'}),
	'destination not allowed: 127.0.0.1 is not in callback_center.allowed_destinations',
	'every attempt says the destination is not allowed, naming the address');
is(sql(q{SELECT string_agg(attempts::text || ':' || coalesce(last_http_status::text, 'none'), ',')
          FROM callback_center.outbox WHERE aggregate_id LIKE 'blocked-%'}),
	'4:none,4:none', 'four attempts each (the schedule), no HTTP status');
is(scalar($rcv->log_lines('/ip')) + scalar($rcv->log_lines('/ok')), $seen_before,
	'the receiver saw none of them (the kept-alive connection was not reused)');
ok(sql(q{SELECT pid FROM callback_center.worker_status()}) > 0, 'the worker is still running');

# A listed name is delivered to, wherever it resolves.
sql(q{SELECT callback_center.enqueue('ev.named', 'named-1', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE aggregate_id = 'named-1'}),
	'a listed host name is delivered to');
is(scalar($rcv->log_lines('/named')), 1, 'the receiver got it');

# The name is trusted only through the list: with networks alone, the
# resolved address decides, so "localhost" (127.0.0.1) is refused.
set_allowlist('127.0.0.2/32');
sql(q{SELECT callback_center.enqueue('ev.named', 'named-2', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) > 0 FROM callback_center.delivery_attempts a
		    JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = 'named-2'}),
	'an attempt to the unlisted name was made');
like(sql(q{SELECT a.error FROM callback_center.delivery_attempts a
            JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = 'named-2' LIMIT 1}),
	qr/^destination not allowed: (127\.0\.0\.1|::1) is not in/,
	'an unlisted name is judged by the address it resolves to');

# Widening the list lets waiting events through.
sql(q{SELECT callback_center.enqueue('ev.ip', 'later-1', '{}')});
set_allowlist('127.0.0.0/8, ::1');
ok($node->poll_query_until('postgres',
		q{SELECT bool_and(status = 'delivered') FROM callback_center.outbox
		   WHERE aggregate_id IN ('later-1', 'named-2')}),
	'after the reload the waiting events are delivered');
is(scalar($rcv->log_lines('/ip')), 1, 'the receiver got the event to the network now listed');

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
