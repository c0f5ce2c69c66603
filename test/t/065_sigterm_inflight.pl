# SIGTERM (pg_terminate_backend) while deliveries are in flight: the worker
# exits without waiting for its transfers (endpoint timeout 60 s, this
# test's poll 30 s), gives the in-flight events back (pending, attempt not
# counted, no failure recorded), and once it is restarted and the receiver
# answers, each event is delivered and answered 200 exactly once under its
# webhook-id.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('sigterm');
my $n = 10;

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(qq{SELECT callback_center.create_endpoint('term', '@{[$rcv->url('/term')]}', '{term.ev}',
        '$secret', '{"timeout_ms": 60000}')});
# The first $n requests stall for 120 s, longer than the endpoint timeout.
$rcv->control('/term', 'stall', stall_s => 120, times => $n);
sql(qq{SELECT callback_center.enqueue('term.ev', 't' || i, '{}') FROM generate_series(1, $n) i});
ok($rcv->wait_for_requests('/term', $n), "all $n requests reached the stalled receiver");
is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE status = 'delivering' AND attempts = 0}),
	$n, 'they are in flight: delivering, no attempt counted until an outcome is recorded');

# Keep the restarted worker from delivering until the state is checked.
sql(q{ALTER SYSTEM SET callback_center.delivery_enabled = off});
sql(q{SELECT pg_reload_conf()});

my $pid = worker_pid($node);
ok($pid > 0, 'the worker runs');
is(sql(qq{SELECT pg_terminate_backend($pid)}), 't', 'SIGTERM sent');
{
	# Far less than the 60 s the transfers could take.
	local $PostgreSQL::Test::Utils::timeout_default = 30;
	ok($node->poll_query_until('postgres',
			qq{SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $pid}),
		'the worker exits without waiting for its transfers');
}
ok($node->log_contains('callback_center worker shutting down'), 'it shut down cleanly');

# The postmaster restarts it (exit code 1); it must not deliver yet.
ok($node->poll_query_until('postgres',
		qq{SELECT pid IS NOT NULL AND pid <> $pid FROM callback_center.worker_status()}),
	'the worker is restarted');
is(sql(q{SELECT string_agg(DISTINCT status || ' ' || attempts || ' ' || coalesce(last_error, '-'), ';')
          FROM callback_center.outbox WHERE event_type = 'term.ev'}),
	'pending 0 -', 'the in-flight events were released: pending, attempt given back, no error');
is(sql(q{SELECT count(*) FROM callback_center.delivery_attempts}), '0',
	'no attempt was recorded as a failure');

# Deliver them.
sql(q{ALTER SYSTEM RESET callback_center.delivery_enabled});
sql(q{SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres',
		qq{SELECT count(*) = $n FROM callback_center.outbox WHERE event_type = 'term.ev' AND status = 'delivered'}),
	'all delivered after the restart');
is(sql(q{SELECT string_agg(DISTINCT attempts::text, ',') FROM callback_center.outbox WHERE event_type = 'term.ev'}),
	'1', 'each took one counted attempt');
is(sql(q{SELECT count(*) || ' ' || count(DISTINCT outbox_id) || ' ' || bool_and(http_status = 200)
          FROM callback_center.delivery_attempts}),
	"$n $n true", 'one attempt logged per event, each a 200');

my %answered;
my %seen;
for my $r ($rcv->log_lines('/term'))
{
	my $id = $r->{headers}{'webhook-id'};
	$seen{$id}++;
	$answered{$id}++ if $r->{mode} eq '200';
}
is(scalar(keys %seen), $n, "the receiver saw $n webhook-ids");
is(scalar(grep { $answered{$_} == 1 } keys %seen), $n,
	'each webhook-id was answered 200 exactly once');
is(scalar(grep { $seen{$_} == 2 } keys %seen), $n,
	'each was sent twice in all: the interrupted request and the delivery, under one id');

$node->stop;
$rcv->stop;
done_testing();
