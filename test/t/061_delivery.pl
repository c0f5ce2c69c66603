# The delivery worker end to end against the loopback receiver: every event
# arrives once, signed, with the right headers and body; failures retry on
# the schedule and die; replay delivers; the breaker opens and recovers; a
# 410 disables the endpoint; the rate limit and per-aggregate order hold.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
# A TimeZone with a half-hour offset: the body's timestamp is printed in it.
my $node = cc_node('delivery',
	conf => "callback_center.retry_jitter = 0\ntimezone = 'Asia/Kolkata'\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Happy path: 50 events to one endpoint, each delivered once and signed.
sql(qq{SELECT callback_center.create_endpoint('erp', '@{[$rcv->url('/erp')]}',
        '{order.paid}', '$secret')});
sql(q{SELECT callback_center.enqueue('order.paid', 'o' || i, jsonb_build_object('n', i))
      FROM generate_series(1, 50) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 50 FROM callback_center.outbox WHERE status = 'delivered'}),
	'50 events delivered');
my @got = $rcv->log_lines('/erp');
is(scalar(@got), 50, 'the receiver saw 50 requests');
is(scalar(grep { $_->{signature_ok} } @got), 50, 'every request carries a valid Standard Webhooks signature');
my %ids = map { $_->{headers}{'webhook-id'} => 1 } @got;
is(scalar(keys %ids), 50, 'webhook-ids are distinct');
my ($first) = grep { $_->{headers}{'webhook-id'} eq 'msg_1' } @got;
like($first->{headers}{'user-agent'}, qr{^callback_center/\d}, 'User-Agent names the extension');
is($first->{headers}{'content-type'}, 'application/json', 'JSON content type');
like($first->{body}, qr/"type": "order.paid"/, 'body carries the event type');
like($first->{body}, qr/"data": \{"n": 1\}/, 'body carries the payload');
is(sql(q{SELECT count(*) FROM callback_center.delivery_attempts WHERE http_status = 200}), '50',
	'one attempt logged per event');

# The body is the text of jsonb_build_object('type', event_type, 'timestamp',
# created_at, 'aggregate_id', aggregate_id, 'data', payload), byte for byte,
# whatever the payload and the names hold.
sql(qq{SELECT callback_center.create_endpoint('shape', '@{[$rcv->url('/shape')]}',
        '{shape.ev, "shape \\"q\\" é"}', '$secret')});
sql(q{SELECT callback_center.enqueue(t, a, p::jsonb) FROM (VALUES
        ('shape.ev', E'q"uote\\\\ tab\t', '{"s": "line\nbreak \u00e9 €", "n": 1.50, "big": 123456789012345678901234567890, "neg": -0.0, "arr": [1, "two", null, true, {"k": []}], "empty": {}, "": "e"}'),
        ('shape.ev', 'ünïcödé', '[]'),
        ('shape.ev', 'ctl', '"\u0001 \u001f"'),
        ('shape.ev', 'null', 'null'),
        ('shape "q" é', 'num', '12.3e4')) v(t, a, p)});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 5 FROM callback_center.outbox o JOIN callback_center.endpoints e
		   ON e.id = o.endpoint_id WHERE e.name = 'shape' AND o.status = 'delivered'}),
	'five events of every shape delivered');
my $rows = $node->safe_psql('postgres',
	q{SELECT 'msg_' || o.id, jsonb_build_object('type', o.event_type, 'timestamp', o.created_at,
	         'aggregate_id', o.aggregate_id, 'data', o.payload)::text
	    FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
	   WHERE e.name = 'shape'}, extra_params => ['-F', "\t", '-A', '-t']);
utf8::decode($rows);
my %want = map { split /\t/, $_, 2 } split /\n/, $rows;
my @shapes = $rcv->log_lines('/shape');
is(scalar(@shapes), 5, 'the receiver saw the five');
like((values %want)[0], qr/\+05:30"/, 'the expected bodies carry the TimeZone offset');
for my $g (@shapes)
{
	my $id = $g->{headers}{'webhook-id'};
	is($g->{body}, $want{$id}, "body of $id is the jsonb_build_object text");
}
is(scalar(grep { $_->{signature_ok} } @shapes), 5, 'and each is signed over those bytes');

# Retries on the schedule (1 s, 3 s, 5 s, no jitter here), then dead.
sql(q{SELECT callback_center.create_endpoint('flaky', '} . $rcv->url('/flaky') . qq{', '{pay.flaky}', '$secret')});
$rcv->control('/flaky', '500');
sql(q{SELECT callback_center.enqueue('pay.flaky', 'p1', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'dead' FROM callback_center.outbox WHERE event_type = 'pay.flaky'}),
	'failing event becomes dead');
my @tries = $rcv->log_lines('/flaky');
is(scalar(@tries), 4, 'four attempts: the first and three retries');
my @gaps = map { $tries[$_]{received_at} - $tries[$_ - 1]{received_at} } 1 .. 3;
my @want = (1, 3, 5);
for my $i (0 .. 2)
{
	ok($gaps[$i] >= $want[$i] - 0.05 && $gaps[$i] < $want[$i] + 1.5,
		"retry $i after about $want[$i] s (took " . sprintf('%.2f', $gaps[$i]) . ' s)');
}
is(scalar(keys %{ { map { $_->{headers}{'webhook-id'} => 1 } @tries } }), 1,
	'retries keep the same webhook-id');
is(sql(q{SELECT last_http_status || ' ' || attempts FROM callback_center.dead_letters WHERE event_type = 'pay.flaky'}),
	'500 4', 'dead letter keeps its last status and attempts');

# Replay after recovery delivers it, and is audited.
$rcv->control('/flaky', undef);
is(sql(q{SELECT callback_center.replay_dead('flaky', reason => 'receiver fixed')}), '1', 'replay picks one dead letter');
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE event_type = 'pay.flaky'}),
	'replayed event delivered');
is(sql(q{SELECT reason || ' ' || attempts_before FROM callback_center.replay_audit}), 'receiver fixed 4',
	'replay audited');

# Replay one dead letter by id, then those that died in a time range
# [since, until); the others stay dead and unaudited.
sql(q{SELECT callback_center.create_endpoint('dl', '} . $rcv->url('/dl') . qq{', '{dl.ev}', '$secret', '{"max_attempts": 1}')});
$rcv->control('/dl', '500');
sql(q{SELECT callback_center.enqueue('dl.ev', 'd' || i, '{}') FROM generate_series(1, 4) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 4 FROM callback_center.dead_letters WHERE event_type = 'dl.ev'}),
	'four dead letters');
$rcv->control('/dl', undef);
# Give them distinct days of death, for the range.
sql(q{UPDATE callback_center.outbox
         SET next_attempt_at = '2020-01-01'::timestamptz + (substr(aggregate_id, 2)::int - 1) * interval '1 day'
       WHERE event_type = 'dl.ev'});
sub dl_states
{
	return sql(q{SELECT string_agg(aggregate_id || ':' || status, ',' ORDER BY aggregate_id)
	               FROM callback_center.outbox WHERE event_type = 'dl.ev'});
}
my $d1 = sql(q{SELECT id FROM callback_center.outbox WHERE event_type = 'dl.ev' AND aggregate_id = 'd1'});
is(sql(qq{SELECT callback_center.replay_dead(${d1}::bigint, 'one by id')}), '1', 'replay by id replays one');
ok($node->poll_query_until('postgres',
		qq{SELECT status = 'delivered' FROM callback_center.outbox WHERE id = $d1}),
	'the event replayed by id is delivered');
is(dl_states(), 'd1:delivered,d2:dead,d3:dead,d4:dead', 'replay by id leaves the other dead letters dead');
is(sql(qq{SELECT count(*) || ' ' || min(reason) || ' ' || min(attempts_before) FROM callback_center.replay_audit
          WHERE outbox_id = $d1}), '1 one by id 1', 'replay by id audited');
my ($rc, $out, $err) = $node->psql('postgres', qq{SELECT callback_center.replay_dead(${d1}::bigint)});
like($err, qr/is not a dead letter/, 'replaying an event that is not dead fails');
# d2 died on 2020-01-02, d3 on 2020-01-03 (until is exclusive), d4 later.
is(sql(q{SELECT callback_center.replay_dead(NULL::text, '2020-01-02', '2020-01-04', 'by range')}), '2',
	'replay by time range replays the two that died in it');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 2 FROM callback_center.outbox
		   WHERE event_type = 'dl.ev' AND aggregate_id IN ('d2', 'd3') AND status = 'delivered'}),
	'the events replayed by range are delivered');
is(dl_states(), 'd1:delivered,d2:delivered,d3:delivered,d4:dead', 'the dead letter outside the range stays dead');
is(sql(q{SELECT string_agg(o.aggregate_id || ':' || a.reason, ',' ORDER BY o.aggregate_id)
           FROM callback_center.replay_audit a JOIN callback_center.outbox o ON o.id = a.outbox_id
          WHERE o.event_type = 'dl.ev'}),
	'd1:one by id,d2:by range,d3:by range', 'each replay audited, nothing else');
is(sql(q{SELECT callback_center.replay_dead(NULL::text, '2020-01-04', '2020-01-04', 'empty')}), '0',
	'an empty range replays nothing');

# 429 with Retry-After is honoured (longer than the 1 s schedule step).
sql(q{SELECT callback_center.create_endpoint('busy', '} . $rcv->url('/busy') . qq{', '{busy.ev}', '$secret')});
$rcv->control('/busy', '429', retry_after => 3, times => 1);
sql(q{SELECT callback_center.enqueue('busy.ev', 'b1', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'delivered' FROM callback_center.outbox WHERE event_type = 'busy.ev'}),
	'429 then delivered');
my @busy = $rcv->log_lines('/busy');
ok($busy[1]{received_at} - $busy[0]{received_at} >= 2.9, 'Retry-After: 3 was honoured');

# 410 Gone disables the endpoint; its other events wait.
sql(q{SELECT callback_center.create_endpoint('gone', '} . $rcv->url('/gone') . qq{', '{gone.ev}', '$secret')});
$rcv->control('/gone', '410');
sql(q{SELECT callback_center.enqueue('gone.ev', 'g1', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT NOT enabled FROM callback_center.endpoints WHERE name = 'gone'}),
	'410 disables the endpoint');
is(sql(q{SELECT status FROM callback_center.outbox WHERE event_type = 'gone.ev'}), 'dead', 'the 410 event is dead');

# The breaker: failures open it; events queued while it is open wait
# without burning attempts; a probe goes after open_ms, and once the
# receiver recovers a successful probe closes it and the rest flow.
sql(q{SELECT callback_center.create_endpoint('brk', '} . $rcv->url('/brk')
	. qq{', '{brk.ev,brk.late}', '$secret', '{"breaker_min_requests": 5, "breaker_open_ms": 2000, "retry_schedule": "merchant_erp"}')});
$rcv->control('/brk', '500');
sql(q{SELECT callback_center.enqueue('brk.ev', 'k' || i, '{}') FROM generate_series(1, 10) i});
ok($node->poll_query_until('postgres',
		q{SELECT breaker = 'open' FROM callback_center.endpoint_state s
		    JOIN callback_center.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'brk'}),
	'breaker opens under failures');
sql(q{SELECT callback_center.enqueue('brk.late', 'late' || i, '{}') FROM generate_series(1, 3) i});
# The first probe (after 2 s) still fails and reopens the breaker.
ok($rcv->wait_for_requests('/brk', 11), 'a probe is sent after open_ms');
is(scalar($rcv->log_lines('/brk')), 11, 'only one probe while the receiver still fails');
$rcv->control('/brk', undef);
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 2 FROM callback_center.outbox WHERE event_type = 'brk.late' AND status = 'delivered'}),
	'events held by the open breaker are delivered after recovery');
is(sql(q{SELECT breaker FROM callback_center.endpoint_state s
		JOIN callback_center.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'brk'}),
	'closed', 'breaker closed after a successful probe');
is(sql(q{SELECT string_agg(status || ':' || attempts, ',' ORDER BY status) FROM callback_center.outbox
		WHERE event_type = 'brk.late'}),
	'delivered:1,delivered:1,pending:1',
	'held events burned no attempts; the failed probe waits for its scheduled retry');

# A receiver failing 60% of the time: the breaker opens part way through
# the first batch (32 requests) and stays open; the later successes of
# that batch, sent before it opened, do not close it, so the 18 events
# left wait for the probe (in a minute) without attempts.
sql(q{SELECT callback_center.create_endpoint('b60', '} . $rcv->url('/b60')
	. qq{', '{b60.ev}', '$secret', '{"breaker_min_requests": 10, "breaker_open_ms": 60000, "retry_schedule": "merchant_erp"}')});
$rcv->control('/b60', '500', cycle => [ '500', '200', '500', '200', '500' ]);
sql(q{SELECT callback_center.enqueue('b60.ev', 'b' || i, '{}') FROM generate_series(1, 50) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) >= 32 FROM callback_center.delivery_attempts a
		    JOIN callback_center.endpoints e ON e.id = a.endpoint_id WHERE e.name = 'b60'}),
	'the first batch to the 60% failing endpoint is recorded');
usleep(2_000_000);
is(sql(q{SELECT breaker FROM callback_center.endpoint_state s
		JOIN callback_center.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'b60'}),
	'open', 'the breaker opened in the batch is still open after it');
is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE event_type = 'b60.ev' AND attempts = 0}),
	'18', 'nothing more was sent while it is open');
$rcv->control('/b60', undef);

# Rate limit: 5 per second over a burst of 15.
sql(q{SELECT callback_center.create_endpoint('slow', '} . $rcv->url('/slow')
	. qq{', '{slow.ev}', '$secret', '{"rate_limit_per_s": 5}')});
sql(q{SELECT callback_center.enqueue('slow.ev', 's' || i, '{}') FROM generate_series(1, 15) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 15 FROM callback_center.outbox WHERE event_type = 'slow.ev' AND status = 'delivered'}),
	'rate-limited burst delivered');
my @slow = $rcv->log_lines('/slow');
my $span = $slow[-1]{received_at} - $slow[0]{received_at};
ok($span >= 1.8, sprintf('15 events at 5/s (burst 5) take at least 2 s (took %.2f s)', $span));
# In any 1-second window at most burst + rate = 10 arrive (unlimited, all
# 15 would arrive at once).
my @at = sort { $a <=> $b } map { $_->{received_at} } @slow;
my $most = 0;
for my $i (0 .. $#at)
{
	my $n = grep { $_ >= $at[$i] && $_ < $at[$i] + 1.0 } @at;
	$most = $n if $n > $most;
}
ok($most <= 10, "at most rate + burst (10) deliveries in any 1 s window (saw $most)");
is(sql(q{SELECT count(*) FROM callback_center.delivery_attempts a JOIN callback_center.endpoints e
        ON e.id = a.endpoint_id WHERE e.name = 'slow'}), '15', 'waiting for tokens burns no attempts');

# Per-aggregate order: events of one order arrive in commit order.
sql(q{SELECT callback_center.create_endpoint('ord', '} . $rcv->url('/ord')
	. qq{', '{ord.ev}', '$secret', '{"ordered": true}')});
$rcv->control('/ord', '500', times => 2);
for my $i (1 .. 5)
{
	sql(qq{SELECT callback_center.enqueue('ord.ev', 'A', '{"seq": $i}'),
	            callback_center.enqueue('ord.ev', 'B', '{"seq": $i}')});
}
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 10 FROM callback_center.outbox WHERE event_type = 'ord.ev' AND status = 'delivered'}),
	'ordered events delivered');
for my $agg ('A', 'B')
{
	my @seq = map { $_->{body} =~ /"seq": (\d+)/ ? $1 : () }
	  grep { $_->{body} =~ /"aggregate_id": "$agg"/ && ($_->{mode} // '200') eq '200' }
	  $rcv->log_lines('/ord');
	is(join(',', @seq), '1,2,3,4,5', "aggregate $agg delivered in commit order");
}

# Other aggregates keep flowing while one is blocked: A1 fails and waits 3 s
# for its retry; A2 waits behind it while B1..B5 are delivered.
sql(q{INSERT INTO callback_center.retry_schedules (name, delays) VALUES ('three_s', '{3s}')});
sql(q{SELECT callback_center.create_endpoint('ord2', '} . $rcv->url('/ord2')
	. qq{', '{ord2.ev}', '$secret', '{"ordered": true, "retry_schedule": "three_s"}')});
$rcv->control('/ord2', '500', times => 1);
sql(q{SELECT callback_center.enqueue('ord2.ev', 'A', '{"seq": 1}')});
ok($node->poll_query_until('postgres',
		q{SELECT attempts = 1 AND status = 'pending' FROM callback_center.outbox
		   WHERE event_type = 'ord2.ev' AND aggregate_id = 'A'}),
	'A1 failed and waits for its retry');
sql(q{SELECT callback_center.enqueue('ord2.ev', 'A', '{"seq": 2}')});
sql(q{SELECT callback_center.enqueue('ord2.ev', 'B', jsonb_build_object('seq', i)) FROM generate_series(1, 5) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 5 FROM callback_center.outbox
		   WHERE event_type = 'ord2.ev' AND aggregate_id = 'B' AND status = 'delivered'}),
	'B1..B5 delivered');
is(sql(q{SELECT string_agg(payload->>'seq' || ':' || status || ':' || attempts, ',' ORDER BY id)
           FROM callback_center.outbox WHERE event_type = 'ord2.ev' AND aggregate_id = 'A'}),
	'1:pending:1,2:pending:0', 'meanwhile A2 waits behind A1, unattempted');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 7 FROM callback_center.outbox WHERE event_type = 'ord2.ev' AND status = 'delivered'}),
	'A1 and A2 delivered after the retry');
my @arrivals = map { ($_->{body} =~ /"aggregate_id": "(\w)"/)[0] . (($_->{body} =~ /"seq": (\d+)/)[0]) }
  grep { ($_->{mode} // '200') eq '200' } $rcv->log_lines('/ord2');
is(join(',', @arrivals), 'B1,B2,B3,B4,B5,A1,A2', 'B flowed while A was blocked; A in order');

# Health and stats views read it all.
is(sql(q{SELECT delivered FROM callback_center.delivery_stats WHERE endpoint = 'erp'}), '50', 'stats count deliveries');
like(sql(q{SELECT array_to_string(alerts, ';') FROM callback_center.health WHERE endpoint = 'gone'}),
	qr/disabled/, 'health flags the disabled endpoint');

$node->stop;
$rcv->stop;
done_testing();
