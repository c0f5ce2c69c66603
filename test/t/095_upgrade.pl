# The upgrade a DBA takes: a database filled by release 0.1.0 (its own
# library, built from git by test/run_all.sh), then the current library
# installed and the server restarted with the schema still at 0.1.0, then
# ALTER EXTENSION callback_center UPDATE.
#
#   - With the new library and the old schema, the workers wait and say why
#     (with the hint to update), write nothing, and every C entry point the
#     0.1.0 script declares still exists in the library.
#   - The update keeps every row of every table.
#   - The upgraded catalog equals a fresh install of the current version,
#     fact by fact (test/upgrade_fingerprint.sql).
#   - The data keeps working: pending events are delivered, signed with the
#     endpoint's secret; a dead letter replays; the attached machine still
#     enforces; the provider's secret still verifies a payment; a repeated
#     callback gets its first answer; the jobs worker closes an expired order.
use strict;
use warnings;
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterReceiver;

my $old_install = $ENV{CC_RELEASE_INSTALL};
plan skip_all => 'CC_RELEASE_INSTALL is not set: run through make test, which builds release 0.1.0'
  unless $old_install;
ok(-x "$old_install/bin/postgres", "release 0.1.0 is installed in $old_install");
my $new_install = dirname(`pg_config --bindir`);
chomp $new_install;

my $fingerprint_sql = slurp_file(dirname(__FILE__) . '/../upgrade_fingerprint.sql');
my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $pay_secret = 'whsec_plJ3nmyCDGBKvcG6yUGI8q4cUkMWvJAq';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);

my $node = PostgreSQL::Test::Cluster->new('upgrade', install_path => $old_install);
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
callback_center.poll_interval = '100ms'
callback_center.allowed_destinations = '127.0.0.1'
max_prepared_transactions = 10
# 0.1.0 keeps what it queues: nothing is delivered before the upgrade.
callback_center.delivery_enabled = off
});
$node->start;

sub sql { my ($q, $db) = @_; return $node->safe_psql($db // 'postgres', $q); }

# --- 0.1.0, with its own library -------------------------------------------
sql('CREATE EXTENSION callback_center CASCADE');
is(sql(q{SELECT extversion FROM pg_extension WHERE extname = 'callback_center'}), '0.1.0',
	'0.1.0 installed by the release library');

# A Standard Webhooks payment message for an order, signed now.
sub pay_call
{
	my ($msg, $kind, $order, $cents) = @_;
	return qq{
	WITH b AS (SELECT jsonb_build_object('type', '$kind', 'data',
	              jsonb_build_object('txn_id', 'txn-$msg', 'order_id', '$order',
	                                 'amount_cents', $cents))::text AS body,
	                  extract(epoch FROM now())::bigint AS ts)
	SELECT r.http_status || ' ' || r.is_first || ' ' || r.outcome
	  FROM b, callback_center.payment_callback('up-pay',
	      jsonb_build_object('webhook-id', '$msg', 'webhook-timestamp', b.ts::text,
	          'webhook-signature', callback_center.sign_webhook('$pay_secret', '$msg', b.ts, b.body)),
	      b.body) r};
}

sql(qq{
	SELECT callback_center.set_stock('up-A', 100), callback_center.set_stock('up-B', 50);
	SELECT callback_center.issue_coupon('up-cp1', 'u1');
	SELECT callback_center.set_provider('up-pay', 'standard_webhooks', ARRAY['$pay_secret']);
	SELECT callback_center.create_endpoint('up-erp', '@{[$rcv->url('/erp')]}', '{*}', '$secret');
	SELECT * FROM callback_center.place_order('up-1', 'u1', '[{"sku":"up-A","qty":2}]', 4200, 'up-cp1', 'up-pay');
	SELECT * FROM callback_center.place_order('up-2', 'u2', '[{"sku":"up-A","qty":1},{"sku":"up-B","qty":1}]', 900, NULL, 'up-pay');
	SELECT * FROM callback_center.place_order('up-3', 'u3', '[{"sku":"up-B","qty":3}]', 1500, NULL, 'up-pay');
	SELECT * FROM callback_center.place_order('up-4', 'u4', '[{"sku":"up-B","qty":1}]', 500, NULL, 'up-pay');
	SELECT * FROM callback_center.place_order('up-5', 'u5', '[{"sku":"up-A","qty":9}]', 100, NULL, 'up-pay');
	SELECT callback_center.deduct_stock('up-direct', 'up-A', 4);
	SELECT * FROM callback_center.record_callback('cb-1', 'erp.ack', '{"n":1}');
	SELECT callback_center.complete_callback('cb-1', 'erp.ack', true, '{"ok":true}');
	SELECT callback_center.create_state_machine('door', 'A door');
	SELECT callback_center.add_state('door', 'shut', true);
	SELECT callback_center.add_state('door', 'ajar');
	SELECT callback_center.add_state('door', 'broken');
	SELECT callback_center.add_transition('door', 'shut', 'ajar', 'open', ARRAY['door.opened']);
	SELECT callback_center.add_transition('door', 'ajar', 'shut', 'close');
	CREATE TABLE doors (id integer PRIMARY KEY, state text NOT NULL);
	SELECT callback_center.attach_state_machine('doors', 'state', 'door');
	INSERT INTO doors VALUES (1, 'shut'), (2, 'shut');
	UPDATE doors SET state = 'ajar' WHERE id = 1;
	SELECT callback_center.enqueue('erp.sync', 'e-' || i, jsonb_build_object('n', i))
	  FROM generate_series(1, 20) i;
});
like(sql(pay_call('m-1', 'payment.succeeded', 'up-1', 4200)), qr/^200 true /, 'up-1 paid under 0.1.0');
like(sql(pay_call('m-2', 'payment.failed', 'up-2', 900)), qr/^200 true /, 'up-2 failed under 0.1.0');
# up-4 is closed by the timeout job; up-3 stays unpaid for after the upgrade.
sql(q{UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute' WHERE order_id = 'up-4'});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'closed' FROM callback_center.orders WHERE order_id = 'up-4'}),
	'the 0.1.0 jobs worker closed the expired order');
# A dead letter, as the worker leaves one.
sql(q{UPDATE callback_center.outbox SET status = 'dead', attempts = 4, last_http_status = 500
       WHERE id = (SELECT min(id) FROM callback_center.outbox WHERE event_type = 'erp.sync')});

my $states = q{SELECT string_agg(order_id || ':' || status || '/' || pay_status, ' ' ORDER BY order_id)
                 FROM callback_center.orders};
my $states_before = sql($states);
like($states_before, qr{up-1:\w+/paid up-2:\w+/pay_failed up-3:\w+/unpaid up-4:closed/closed}, "orders in several states: $states_before");
my $outbox_q = q{SELECT string_agg(status || ':' || count, ' ' ORDER BY status) FROM
                   (SELECT status, count(*) FROM callback_center.outbox GROUP BY status) s};
my $outbox_before = sql($outbox_q);
like($outbox_before, qr/dead:1 .*pending:\d+/, "outbox holds pending and dead rows: $outbox_before");

# Every table's rows, over the columns 0.1.0 has, as one checksum each.
# The built-in machine definitions are the extension's, not the data: the
# update adds to them (and is compared with a fresh install's below).
my @tables = split /\n/, sql(q{
	SELECT format('%I.%I', table_schema, table_name) || '|' ||
	       string_agg(format('%I', column_name), ',' ORDER BY ordinal_position)
	  FROM information_schema.columns
	 WHERE table_schema = 'callback_center'
	   AND (table_schema, table_name) IN (SELECT table_schema, table_name FROM information_schema.tables
	                                        WHERE table_type = 'BASE TABLE')
	 GROUP BY table_schema, table_name
	UNION ALL SELECT 'public.doors|id,state'
	 ORDER BY 1});
ok(@tables >= 20, scalar(@tables) . ' tables to compare');
my $checksums = join(" UNION ALL\n", map {
	my ($t, $cols) = split /\|/;
	my $where = $t =~ /^callback_center\.(state_machines|machine_states|transitions)$/
	  ? ' WHERE NOT builtin' : '';
	"SELECT '$t' || ' ' || count(*) || ' ' || md5(coalesce(string_agg(r, E'\\n' ORDER BY r), ''))"
	  . " FROM (SELECT ROW($cols)::text AS r FROM $t$where) x"
} @tables) . ' ORDER BY 1';
my $data_before = sql($checksums);

# Access per database: database "members" at 0.1.0 has two app members;
# carol's DBA granted her USAGE on the schema before the update, bob's did
# not.  (A database of its own: the grant is the DBA's, not the extension's,
# so it stays out of the fingerprint.)
sql('CREATE DATABASE members');
sql('CREATE EXTENSION callback_center CASCADE', 'members');
sql(q{CREATE ROLE bob LOGIN IN ROLE callback_center_app;
      CREATE ROLE carol LOGIN IN ROLE callback_center_app});
sql(q{SELECT callback_center.set_stock('m-sku', 5);
      GRANT USAGE ON SCHEMA callback_center TO carol}, 'members');

# --- the new library, the schema still at 0.1.0 ------------------------------
$node->stop;
$node->{_install_path} = $new_install;
$node->append_conf('postgresql.conf', "callback_center.delivery_enabled = on\n");
my $log_offset = -s $node->logfile;
$node->start;
for my $type ('callback_center worker', 'callback_center jobs')
{
	ok($node->poll_query_until('postgres',
			qq{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = '$type'}),
		"$type runs with the new library");
}
$node->wait_for_log(
	qr/WARNING:  callback_center 0\.1\.0 is installed in database "postgres" but the library is \d+\.\d+\.\d+.*\n(.*\n)*?.*HINT:  Run ALTER EXTENSION callback_center UPDATE/,
	$log_offset);
my $warned = () = slurp_file($node->logfile, $log_offset) =~ /is installed in database "postgres" but the library/g;
is($warned, 2, 'both workers say once why they wait, with the hint to update');
is(sql($checksums), $data_before, 'the waiting workers wrote nothing');
is(scalar($rcv->log_lines('/erp')), 0, 'and delivered nothing');

# Every C entry point the 0.1.0 script declares is in the new library (a
# missing one would make calls fail with "could not find function").
my $symbols = sql(q{
	SELECT string_agg(DISTINCT p.prosrc, ' ' ORDER BY p.prosrc)
	  FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
	  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'callback_center'
	 WHERE p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')});
my @symbols = split / /, $symbols;
ok(@symbols >= 10, scalar(@symbols) . ' C entry points in 0.1.0');
my $probe = join("\n", map {
	"CREATE FUNCTION pg_temp.probe_$_() RETURNS void LANGUAGE c AS '\$libdir/callback_center', '$_';"
} @symbols);
my ($ret, $out, $err) = $node->psql('postgres', "BEGIN;\n$probe\nROLLBACK;");
is($err, '', 'every 0.1.0 C entry point exists in the new library');
# The C functions called under the old schema work or refuse with the hint.
for my $call (
	q{SELECT callback_center.enqueue('erp.sync', 'probe', '{}')},
	q{SELECT callback_center.deduct_stock('probe', 'up-A', 1)},
	q{SELECT is_first FROM callback_center.record_callback('cb-1', 'erp.ack', '{"n":1}')})
{
	($ret, $out, $err) = $node->psql('postgres', "BEGIN; $call; ROLLBACK;");
	ok(($ret == 0 && $out ne '') || $err =~ /HINT:  Run ALTER EXTENSION callback_center UPDATE/,
		"old schema, new library: works or refuses with the hint: $call" . ($err ? " ($err)" : ''));
}

# --- ALTER EXTENSION UPDATE -------------------------------------------------
# The checksums are taken in the update's own transaction, before any worker
# sees the new version.
my $data_after = sql("BEGIN; ALTER EXTENSION callback_center UPDATE; $checksums; COMMIT;");
is(sql(q{SELECT extversion FROM pg_extension WHERE extname = 'callback_center'}),
	$node->safe_psql('postgres', q{SELECT default_version FROM pg_available_extensions WHERE name = 'callback_center'}),
	'updated to the default version');
is($data_after, $data_before, 'every row of every table kept by the update');

# The update in "members" warns, naming bob and not carol, with the GRANT
# to run; afterwards carol keeps working and bob is refused.
my ($rc, $out, $err) = $node->psql('members', 'ALTER EXTENSION callback_center UPDATE');
is($rc, 0, 'the update of a database with members succeeds');
like($err, qr/WARNING:  these members of callback_center_app or callback_center_admin lose access to callback_center in database members: bob\n.*\n?HINT:  Grant each that uses this database: GRANT USAGE ON SCHEMA callback_center TO bob;/,
	'it names the member without a grant of his own, with the GRANT to run');
sub stock_as
{
	my ($role) = @_;
	my ($rc, $out, $err) = $node->psql('members',
		q{SELECT available FROM callback_center.stock WHERE sku_id = 'm-sku'},
		connstr => $node->connstr('members') . " user=$role",
		extra_params => [ '-v', 'VERBOSITY=sqlstate' ]);
	return $rc == 0 ? $out : ($err =~ /ERROR:\s+(\w{5})/ ? $1 : $err);
}
is(stock_as('carol'), '5', 'the member granted in this database keeps working');
is(stock_as('bob'), '42501', 'the member without a grant here is refused');

sql('CREATE DATABASE fresh');
sql('CREATE EXTENSION callback_center CASCADE', 'fresh');
# The built-in machines, as the update left them and as a fresh install makes them.
my $builtin = q{SELECT string_agg(r, E'\n' ORDER BY r) FROM (
	SELECT format('machine %s', machine) AS r FROM callback_center.state_machines WHERE builtin
	UNION ALL SELECT format('state %s %s %s %s', machine, state, is_initial, is_final)
	  FROM callback_center.machine_states WHERE builtin
	UNION ALL SELECT format('transition %s %s %s %s %s', machine, from_state, to_state, event, emits)
	  FROM callback_center.transitions WHERE builtin) x};
is(sql($builtin), sql($builtin, 'fresh'), 'the built-in machines equal a fresh install\'s');
my $fp_upgraded = sql($fingerprint_sql);
my $fp_fresh = sql($fingerprint_sql, 'fresh');
my @lines = split /\n/, $fp_fresh;
ok(@lines > 200, scalar(@lines) . ' lines of catalog fingerprint');
if ($fp_upgraded eq $fp_fresh)
{
	pass('the upgraded catalog equals a fresh install');
}
else
{
	my $dir = PostgreSQL::Test::Utils::tempdir('fingerprint');
	PostgreSQL::Test::Utils::append_to_file("$dir/upgraded", $fp_upgraded . "\n");
	PostgreSQL::Test::Utils::append_to_file("$dir/fresh", $fp_fresh . "\n");
	my $diff = `diff -u $dir/fresh $dir/upgraded | head -n 200`;
	fail('the upgraded catalog equals a fresh install');
	diag("fresh (-) vs upgraded (+):\n$diff");
}

# --- the data keeps working ------------------------------------------------
my ($pending) = $outbox_before =~ /pending:(\d+)/;
ok($pending >= 20, "$pending events pending at the update");
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM callback_center.outbox WHERE status IN ('pending', 'delivering')}),
	'every pending event delivered after the update');
my @got = $rcv->log_lines('/erp');
is(scalar(@got), $pending, 'the receiver got each pending event once');
is(scalar(grep { $_->{signature_ok} } @got), $pending, 'signed with the endpoint secret 0.1.0 stored');

sql(q{SELECT callback_center.replay_dead(id, 'after upgrade') FROM callback_center.outbox WHERE status = 'dead'});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM callback_center.outbox WHERE status <> 'delivered'}),
	'the 0.1.0 dead letter replays and is delivered');

($ret, $out, $err) = $node->psql('postgres', q{UPDATE doors SET state = 'broken' WHERE id = 1});
like($err, qr/CB010|illegal transition|no transition/i, 'the attached machine still refuses an illegal move');
($ret, $out, $err) = $node->psql('postgres', q{UPDATE doors SET state = 'ajar' WHERE id = 2});
is($ret, 0, 'and allows a legal one');
is(sql(q{SELECT count(*) FROM callback_center.state_history WHERE entity_id = '2' AND to_state = 'ajar'}),
	'1', 'which is recorded in the history');
is(sql(q{SELECT payload->'row'->>'state' FROM callback_center.outbox
          WHERE event_type = 'door.opened' AND aggregate_id = '2' ORDER BY id DESC LIMIT 1}),
	'ajar', 'a machine attached under 0.1.0 still emits the whole row');

like(sql(pay_call('m-3', 'payment.succeeded', 'up-3', 1500)), qr/^200 true /,
	'the provider secret of 0.1.0 verifies a payment after the update');
is(sql(q{SELECT pay_status FROM callback_center.orders WHERE order_id = 'up-3'}), 'paid', 'up-3 paid');
like(sql(pay_call('m-1', 'payment.succeeded', 'up-1', 4200)), qr/^200 false /,
	'a repeat of a 0.1.0 payment message gets its first answer');
is(sql(q{SELECT is_first || ' ' || status FROM callback_center.record_callback('cb-1', 'erp.ack', '{"n":1}')}),
	'false 2', 'a 0.1.0 callback repeat returns its recorded outcome');

sql(q{UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute' WHERE order_id = 'up-5'});
ok($node->poll_query_until('postgres',
		q{SELECT status = 'closed' FROM callback_center.orders WHERE order_id = 'up-5'}),
	'the jobs worker closes an expired order after the update');

$node->stop;
done_testing();
