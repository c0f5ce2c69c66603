# The workers cannot be made to run someone else's SQL (issue 11, the
# CVE-2018-1058 class).  A function or operator with exact argument types in
# a schema on the worker's search_path beats the polymorphic built-in the
# worker's statements mean (cardinality(anyarray), unnest(anyarray),
# jsonb_build_object(VARIADIC "any"), numeric * numeric, anynonarray ||
# text).  Two planters: the owner of database postgres (a non-superuser, who
# may create in schema public) and a role with only CREATE on the database,
# who makes the schema "postgres" that the bootstrap superuser's "$user"
# names.  Each planted object returns the right answer and writes a row to
# its planter's log table when it runs; then the worker's plans are made
# again (alter_endpoint, ANALYZE of the outbox, a worker restart), events
# are delivered, and no planted object may have run in a worker.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $node = cc_node('search_path', conf => q{
callback_center.pay_timeout = '1s'
callback_center.jobs_interval = '100ms'
});

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $worker_role = sql('SELECT rolname FROM pg_roles WHERE oid = 10');

# Delivery works before anything is planted, so every plan exists.
sql(qq{SELECT callback_center.create_endpoint('sp', '@{[$rcv->url('/sp')]}',
        '{sp.ev}', '$secret', '{"rate_limit_per_s": 1000}')});
sql(q{SELECT callback_center.enqueue('sp.ev', 'a' || i, jsonb_build_object('n', i))
      FROM generate_series(1, 10) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 10 FROM callback_center.outbox WHERE status = 'delivered'}),
	'delivery works before the planting');

# The planters.
sql(qq{CREATE ROLE dbowner LOGIN;
       ALTER DATABASE postgres OWNER TO dbowner;
       CREATE ROLE creator LOGIN;
       GRANT CREATE ON DATABASE postgres TO creator;});

# Plants the set of look-alikes in schema $schema as $role; each logs
# (planter tag, backend type, current user) into $schema.hijack_log.
sub plant
{
	my ($role, $schema, $create_schema) = @_;
	my $log = qq{
        BEGIN
            INSERT INTO $schema.hijack_log
            SELECT %L, a.backend_type, current_user
              FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid();
        EXCEPTION WHEN OTHERS THEN NULL;
        END;};
	my $body = sub {
		my ($name, $ret) = @_;
		my $l = $log;
		$l =~ s/%L/'$schema.$name'/;
		return "LANGUAGE plpgsql SET search_path = pg_catalog AS \$f\$ BEGIN $l RETURN $ret; END \$f\$";
	};
	my $setof = sub {
		my ($name, $ret) = @_;
		my $l = $log;
		$l =~ s/%L/'$schema.$name'/;
		return "LANGUAGE plpgsql SET search_path = pg_catalog AS \$f\$ BEGIN $l RETURN QUERY $ret; END \$f\$";
	};
	$node->safe_psql('postgres', join("\n",
		"SET ROLE $role;",
		($create_schema ? "CREATE SCHEMA $schema;" : ''),
		"CREATE TABLE $schema.hijack_log (planted text, backend_type text, run_as name);",
		"GRANT INSERT ON $schema.hijack_log TO PUBLIC;",
		"CREATE FUNCTION $schema.cardinality(a interval[]) RETURNS integer "
		  . $body->('cardinality(interval[])', 'pg_catalog.cardinality(a)') . ';',
		"CREATE FUNCTION $schema.cardinality(a text[]) RETURNS integer "
		  . $body->('cardinality(text[])', 'pg_catalog.cardinality(a)') . ';',
		"CREATE FUNCTION $schema.unnest(a interval[]) RETURNS SETOF interval "
		  . $setof->('unnest(interval[])', 'SELECT pg_catalog.unnest(a)') . ';',
		"CREATE FUNCTION $schema.unnest(a int4[]) RETURNS SETOF int4 "
		  . $setof->('unnest(int4[])', 'SELECT pg_catalog.unnest(a)') . ';',
		"CREATE FUNCTION $schema.unnest(a int8[]) RETURNS SETOF int8 "
		  . $setof->('unnest(int8[])', 'SELECT pg_catalog.unnest(a)') . ';',
		"CREATE FUNCTION $schema.unnest(a text[]) RETURNS SETOF text "
		  . $setof->('unnest(text[])', 'SELECT pg_catalog.unnest(a)') . ';',
		"CREATE FUNCTION $schema.jsonb_build_object(a text, b text, c text, d timestamptz,"
		  . " e text, f text, g text, h jsonb) RETURNS jsonb "
		  . $body->('jsonb_build_object', 'pg_catalog.jsonb_build_object(a, b, c, d, e, f, g, h)') . ';',
		"CREATE FUNCTION $schema.hj_mul(a numeric, b int4) RETURNS numeric "
		  . $body->('numeric*int4', 'a OPERATOR(pg_catalog.*) b::numeric') . ';',
		"CREATE OPERATOR $schema.* (LEFTARG = numeric, RIGHTARG = int4, FUNCTION = $schema.hj_mul);",
		"CREATE FUNCTION $schema.hj_cat(a text, b int4) RETURNS text "
		  . $body->('text||int4', 'a OPERATOR(pg_catalog.||) b::text') . ';',
		"CREATE OPERATOR $schema.|| (LEFTARG = text, RIGHTARG = int4, FUNCTION = $schema.hj_cat);"));
}

# What ran in a worker: rows written by a process of either worker.
sub hijacked
{
	my $from = join(' UNION ALL ', map { qq{SELECT * FROM "$_".hijack_log} } @_);
	return sql(qq{SELECT coalesce(string_agg(DISTINCT planted || ' as ' || run_as, ', '), '')
	  FROM ($from) l WHERE backend_type LIKE 'callback_center%'});
}

# First the database owner plants in public.  The planting works: a
# session of the bootstrap superuser with the default search_path runs
# them (as the worker used to).
plant('dbowner', 'public', 0);
sql(q{SELECT cardinality('{1s}'::interval[])});
is(sql(q{SELECT string_agg(planted || ' in ' || backend_type, ',') FROM public.hijack_log}),
	'public.cardinality(interval[]) in client backend',
	'a superuser session with the default search_path runs the planted cardinality');
sql(q{DELETE FROM public.hijack_log});

# 1. alter_endpoint: the endpoints statement is planned again.
sql(q{SELECT callback_center.alter_endpoint('sp', '{"timeout_ms": 4000}')});
sql(q{SELECT callback_center.enqueue('sp.ev', 'b' || i, jsonb_build_object('n', i))
      FROM generate_series(1, 10) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 20 FROM callback_center.outbox WHERE status = 'delivered'}),
	'events delivered after alter_endpoint');
is(hijacked('public'), '', 'nothing planted in public ran in a worker');

# Then the role with CREATE on the database makes schema "$user" of the
# worker's role and plants there too (it comes before public).
plant('creator', $worker_role, 1);

# 2. ANALYZE of the outbox (autovacuum does it on its own): the claim and
# the recording statements are planned again.
sql(q{ANALYZE callback_center.outbox});
sql(q{ANALYZE callback_center.delivery_attempts});
sql(q{ANALYZE callback_center.endpoint_state});
sql(q{SELECT callback_center.enqueue('sp.ev', 'c' || i, jsonb_build_object('n', i))
      FROM generate_series(1, 10) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 30 FROM callback_center.outbox WHERE status = 'delivered'}),
	'events delivered after ANALYZE');

# 3. A fresh worker plans everything from scratch: deliveries, a retry, a
# dead letter of a dropped endpoint (the orphan sweep), and the jobs
# worker closing an expired order.
my $old_pid = worker_pid($node);
sql(q{SELECT pg_terminate_backend(pid) FROM pg_stat_activity
       WHERE backend_type IN ('callback_center worker', 'callback_center jobs')});
ok($node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM pg_stat_activity
		    WHERE backend_type = 'callback_center worker' AND pid <> $old_pid}),
	'the worker restarted');
$rcv->control('/sp', '500', times => 1);
sql(q{SELECT callback_center.enqueue('sp.ev', 'd' || i, jsonb_build_object('n', i))
      FROM generate_series(1, 10) i});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 40 FROM callback_center.outbox WHERE status = 'delivered'}),
	'events delivered by the restarted worker, one after a retry');
# An event for an endpoint that is gone: the sweep marks it dead, naming it.
sql(q{INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload)
      VALUES (9999, 'sp.ev', 'orphan', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT last_error = 'endpoint 9999 no longer exists' FROM callback_center.outbox
		   WHERE aggregate_id = 'orphan' AND status = 'dead'}),
	'an event of a dropped endpoint is made dead');
sql(q{SELECT callback_center.set_stock('sp-A', 10)});
sql(q{SELECT callback_center.place_order('sp-1', 'u', '[{"sku":"sp-A","qty":2}]', 100)});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'closed' FROM callback_center.orders WHERE order_id = 'sp-1'}),
	'the jobs worker closed the expired order');

is(sql(q{SELECT count(*) FROM callback_center.outbox WHERE status <> 'delivered' AND aggregate_id <> 'orphan'
          AND event_type = 'sp.ev'}), '0', 'every event was delivered');
my %seen = map { $_->{headers}{'webhook-id'} => 1 } grep { $_->{mode} ne '500' } $rcv->log_lines('/sp');
is(scalar(keys %seen), 40, 'the receiver got all 40 events');
is(hijacked('public', $worker_role), '', 'no planted function or operator ran in a worker');

# The workers' search_path is pinned.
is(sql(q{SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'callback_center%'}), '2',
	'both workers run');

$node->stop;
done_testing();
