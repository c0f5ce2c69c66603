# The claim's effect does not depend on its plan (issue 10 item 1): with
# hash joins, merge joins, nested loops or materialization turned off for
# the worker in turn, a backlog over several endpoints (one ordered, one
# rate-limited) is delivered exactly once each, and every counted attempt
# has its row in delivery_attempts.  A plan that ran the LIMIT ... SKIP
# LOCKED sub-select again per outer row would claim more than the quota
# (the worker refuses such a result) or send an event twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('claim_plans', conf => q{
callback_center.batch_size = 40
callback_center.retry_jitter = 0
});

sub sql { return $node->safe_psql('postgres', $_[0]); }

for my $ep (['p1', '{}'], ['p2', '{"ordered": true}'], ['p3', '{"rate_limit_per_s": 500}'])
{
	sql(qq{SELECT callback_center.create_endpoint('$ep->[0]', '@{[$rcv->url("/$ep->[0]")]}',
	        '{pl.ev}', '$secret', '$ep->[1]')});
}
sql(q{INSERT INTO callback_center.retry_schedules (name, delays) VALUES ('quick', '{100ms}')});
sql(q{SELECT callback_center.alter_endpoint('p1', '{"retry_schedule": "quick"}')});

my $round = 0;
for my $settings ('enable_hashjoin = off', 'enable_mergejoin = off', 'enable_nestloop = off',
	'enable_hashjoin = off, enable_mergejoin = off', 'enable_material = off',
	'enable_indexscan = off, enable_bitmapscan = off')
{
	$round++;
	my @set = split /, /, $settings;
	sql(q{ALTER SYSTEM SET callback_center.delivery_enabled = off});
	sql('SELECT pg_reload_conf()');
	sql('ALTER DATABASE postgres RESET ALL');
	sql("ALTER DATABASE postgres SET $_") for @set;
	# A new worker, which reads the database's settings as it connects.
	my $old = worker_pid($node);
	sql(q{SELECT pg_terminate_backend(pid) FROM pg_stat_activity
	       WHERE backend_type = 'callback_center worker'});
	$node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM pg_stat_activity
		    WHERE backend_type = 'callback_center worker' AND pid <> $old})
	  or die 'the worker did not restart';

	# 60 events each (20 aggregates of 3 for the ordered one), one failing
	# once for p1.
	sql(qq{SELECT callback_center.enqueue('pl.ev', 'r$round-' || (i % 20), jsonb_build_object('i', i))
	         FROM generate_series(1, 60) i});
	$rcv->control('/p1', '500', times => 1);
	sql(q{ALTER SYSTEM RESET callback_center.delivery_enabled});
	sql('SELECT pg_reload_conf()');
	ok($node->poll_query_until('postgres',
			qq{SELECT count(*) = 180 FROM callback_center.outbox
			    WHERE aggregate_id LIKE 'r$round-%' AND status = 'delivered'}),
		"$settings: 180 events delivered");

	my %sent;
	for my $l ($rcv->log_lines)
	{
		next unless $l->{body} =~ /"aggregate_id": "r$round-/;
		next if $l->{mode} eq '500';
		$sent{ $l->{path} . ' ' . $l->{headers}{'webhook-id'} }++;
	}
	is(scalar(keys %sent), 180, "$settings: the receiver got each event");
	is(scalar(grep { $_ > 1 } values %sent), 0, "$settings: none of them twice");
	is(sql(qq{SELECT sum(o.attempts) || ' ' || (SELECT count(*) FROM callback_center.delivery_attempts a
	                                              JOIN callback_center.outbox x ON x.id = a.outbox_id
	                                             WHERE x.aggregate_id LIKE 'r$round-%')
	            FROM callback_center.outbox o WHERE o.aggregate_id LIKE 'r$round-%'}),
		'181 181', "$settings: attempts counted = attempts logged (one retry)");
}
ok(!$node->log_contains(qr/claim returned more events/), 'no claim returned more than its quota');

sql('ALTER DATABASE postgres RESET ALL');
$node->stop;
done_testing();
