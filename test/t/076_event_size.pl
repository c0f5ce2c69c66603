# One event cannot stop delivery (issue 11 item 3).  Every writer of the
# outbox refuses an event larger than callback_center.max_event_size with
# SQLSTATE 54000; a larger row that got in anyway (a superuser's INSERT) is
# made dead by the worker, naming its size, and the events next to it are
# delivered; and a row whose request cannot be built at all (a payload
# whose JSON text passes 1 GB, with the limit raised to its maximum) is
# made dead with the error while the others go, instead of failing every
# claim for ever.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('event_size');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# The SQLSTATE and message of a statement, or 'ok'.
sub sqlstate_of
{
	my ($stmt) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', qq{
	  CREATE TEMP TABLE r (s text);
	  DO \$\$
	  BEGIN
	    $stmt;
	    INSERT INTO r VALUES ('ok');
	  EXCEPTION WHEN OTHERS THEN
	    INSERT INTO r VALUES (SQLSTATE || ' ' || SQLERRM);
	  END \$\$;
	  SELECT s FROM r;});
	return $out;
}

sql(qq{SELECT callback_center.create_endpoint('big', '@{[$rcv->url('/big')]}',
        '{big.ev}', '$secret')});

is(sql('SHOW callback_center.max_event_size'), '1MB', 'the limit is 1 MB by default');

# 1. The writers refuse: enqueue, enqueue_to, as the application would.
like(sqlstate_of(q{PERFORM callback_center.enqueue('big.ev', 'a1',
        jsonb_build_object('s', repeat('x', 1100000)))}),
	qr/^54000 event of 11000\d\d bytes exceeds callback_center.max_event_size \(1048576 bytes\)$/,
	'enqueue refuses an event over 1 MB with 54000');
like(sqlstate_of(q{PERFORM callback_center.enqueue_to('big', 'big.ev', 'a1',
        jsonb_build_object('s', repeat('x', 1100000)))}),
	qr/^54000 event of \d+ bytes exceeds/, 'enqueue_to refuses it too');
like(sqlstate_of(q{PERFORM callback_center.enqueue('big.ev', repeat('a', 1100000), '{}')}),
	qr/^54000 /, 'the aggregate id counts');
is(sqlstate_of(q{PERFORM callback_center.enqueue('big.ev', 'a1',
        jsonb_build_object('s', repeat('x', 1000000)))}), 'ok',
	'an event under the limit is queued');
like(sqlstate_of(q{SET callback_center.max_event_size = '2kB';
        PERFORM callback_center.enqueue('big.ev', 'a1', jsonb_build_object('s', repeat('x', 3000)))}),
	qr/^54000 event of \d+ bytes exceeds callback_center.max_event_size \(2048 bytes\)$/,
	'the limit follows the setting');
my ($rc, $out, $err) = $node->psql('postgres', q{
  CREATE ROLE app LOGIN IN ROLE callback_center_app;
  SET ROLE app;
  SET callback_center.max_event_size = '100MB'});
like($err, qr/permission denied to set parameter "callback_center.max_event_size"/,
	'only a superuser may change the limit');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM callback_center.outbox WHERE status = 'delivered'}),
	'the event under the limit is delivered');

# 2. A row over the limit put in by hand is made dead, naming its size;
# the events around it are delivered.
sql(q{ALTER SYSTEM SET callback_center.delivery_enabled = off});
sql(q{SELECT pg_reload_conf()});
sql(q{SELECT callback_center.enqueue('big.ev', 'b' || i, '{}') FROM generate_series(1, 5) i});
sql(q{INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
      SELECT id, 'big.ev', 'toobig', jsonb_build_object('s', repeat('x', 2000000))
        FROM callback_center.endpoints WHERE name = 'big'});
sql(q{SELECT callback_center.enqueue('big.ev', 'c' || i, '{}') FROM generate_series(1, 5) i});
sql(q{ALTER SYSTEM RESET callback_center.delivery_enabled});
sql(q{SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 11 FROM callback_center.outbox WHERE status = 'delivered'}),
	'the events around the oversized row are delivered');
like(sql(q{SELECT status || ': ' || last_error FROM callback_center.outbox WHERE aggregate_id = 'toobig'}),
	qr/^dead: event of 20000\d\d bytes exceeds callback_center.max_event_size \(1048576 bytes\)$/,
	'the oversized row is dead, with its size in last_error');
is(sql(q{SELECT count(*) FROM callback_center.delivery_attempts a JOIN callback_center.outbox o ON o.id = a.outbox_id
          WHERE o.aggregate_id = 'toobig' AND a.http_status IS NULL AND a.error LIKE 'event of %'}), '1',
	'its attempt is logged with the error');
is(scalar(grep { length($_->{body}) > 1500000 } $rcv->log_lines('/big')), 0,
	'the oversized row was never sent');

# 3. With the limit at its maximum, a payload of 180 M chr(1) (2 MB
# stored, over 1 GB as JSON text) passes the size check but its body
# cannot be built: the claim of its batch fails; the batch is claimed
# again with each body built alone, and only that row dies.
sql(q{ALTER SYSTEM SET callback_center.max_event_size = '1073741823B'});
sql(q{ALTER SYSTEM SET callback_center.delivery_enabled = off});
sql(q{SELECT pg_reload_conf()});
sql(q{SELECT callback_center.enqueue('big.ev', 'd' || i, '{}') FROM generate_series(1, 5) i});
sql(q{INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
      SELECT id, 'big.ev', 'bomb', jsonb_build_object('s', repeat(chr(1), 180000000))
        FROM callback_center.endpoints WHERE name = 'big'});
sql(q{SELECT callback_center.enqueue('big.ev', 'e' || i, '{}') FROM generate_series(1, 5) i});
sql(q{ALTER SYSTEM RESET callback_center.delivery_enabled});
sql(q{SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 21 FROM callback_center.outbox WHERE status = 'delivered'}),
	'the events around the unbuildable row are delivered');
like(sql(q{SELECT status || ': ' || last_error FROM callback_center.outbox WHERE aggregate_id = 'bomb'}),
	qr/^dead: could not build the request: out of memory$/,
	'the unbuildable row is dead, with the error');
ok($node->log_contains(qr/event \d+ cannot be sent: out of memory/), 'the worker logged why');

# Delivery goes on afterwards.
sql(q{ALTER SYSTEM RESET callback_center.max_event_size});
sql(q{SELECT pg_reload_conf()});
sql(q{SELECT callback_center.enqueue('big.ev', 'f' || i, '{}') FROM generate_series(1, 5) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 26 FROM callback_center.outbox WHERE status = 'delivered'}),
	'later events are delivered');

$node->stop;
done_testing();
