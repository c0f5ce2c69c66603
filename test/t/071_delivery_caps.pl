# The concurrency caps hold through the worker, not only through
# http_probe: no more than max_per_endpoint requests in flight to one
# endpoint, no more than max_concurrent in all, and a reload changes both
# live.  The receiver answers after 150 ms so that requests overlap, and
# counts its high-water mark of requests in flight.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('caps', conf => "callback_center.max_per_endpoint = 4\ncallback_center.max_concurrent = 6\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub drain
{
	my ($types, $n, $what) = @_;
	sql(qq{SELECT callback_center.enqueue(t, 'a' || i, '{}')
	         FROM unnest('$types'::text[]) t, generate_series(1, $n) i});
	ok($node->poll_query_until('postgres',
			qq{SELECT count(*) = 0 FROM callback_center.outbox WHERE status <> 'delivered'}),
		"$what: all delivered");
}

for my $p ('/one', '/two')
{
	my $name = substr($p, 1);
	sql(qq{SELECT callback_center.create_endpoint('$name', '@{[$rcv->url($p)]}', '{ev.$name}', '$secret')});
	$rcv->control($p, '200', delay_ms => 150);
}

# One endpoint: at most 4 in flight, and more than one (requests overlap).
drain('{ev.one}', 40, 'one endpoint');
my $max = $rcv->stats->{max_in_flight};
ok($max >= 2 && $max <= 4, "one endpoint: $max in flight at most (cap 4)");

# Two endpoints: each may have 4, together at most 6.
$rcv->reset;
$rcv->control($_, '200', delay_ms => 150) for ('/one', '/two');
drain('{ev.one,ev.two}', 40, 'two endpoints');
$max = $rcv->stats->{max_in_flight};
ok($max >= 5 && $max <= 6, "two endpoints: $max in flight at most (global cap 6)");

# A reload lowers the per-endpoint cap for the next rounds.
my $reloads = sql(q{SELECT reloads FROM callback_center.worker_status()});
sql(q{ALTER SYSTEM SET callback_center.max_per_endpoint = 2});
sql(q{SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres',
		qq{SELECT reloads > $reloads FROM callback_center.worker_status()}),
	'the worker reloaded its configuration');
$rcv->reset;
$rcv->control('/one', '200', delay_ms => 150);
drain('{ev.one}', 30, 'after the reload');
$max = $rcv->stats->{max_in_flight};
ok($max >= 1 && $max <= 2, "after the reload: $max in flight at most (cap 2)");

$node->stop;
$rcv->stop;
done_testing();
