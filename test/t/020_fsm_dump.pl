# pg_dump keeps the machines users define, their history and the triggers
# on their tables, and not the built-in rows (CREATE EXTENSION brings those
# back) but the emits users chose for built-in transitions.  The restored
# trigger enforces the restored machine.  The delivery records keep their
# id sequences: inserts after the restore get new ids.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $node = cc_node('fsm_dump');

$node->safe_psql('postgres', q{
	SELECT callback_center.create_state_machine('door', 'A door');
	SELECT callback_center.add_state('door', 'shut', true);
	SELECT callback_center.add_state('door', 'ajar');
	SELECT callback_center.add_transition('door', 'shut', 'ajar', 'open', ARRAY['door.opened']);
	SELECT callback_center.add_transition('door', 'ajar', 'shut', 'close');
	-- a user transition on a built-in machine's states is kept too
	SELECT callback_center.add_state('order', 'on_hold');
	SELECT callback_center.add_transition('order', 'confirmed', 'on_hold', 'hold');
	CREATE TABLE doors (id integer PRIMARY KEY, state text NOT NULL);
	SELECT callback_center.attach_state_machine('doors', 'state', 'door');
	INSERT INTO doors VALUES (1, 'shut'), (2, 'shut');
	SELECT callback_center.set_transition_emits('door', 'shut', 'ajar', '{}');
	UPDATE doors SET state = 'ajar' WHERE id = 1;
	-- emits chosen for built-in transitions after installation
	SELECT callback_center.set_transition_emits('order', 'confirmed', 'closed',
	                                            '{order.closed,audit.closed}');
	SELECT callback_center.set_transition_emits('payment', 'CREATED', 'PAYING',
	                                            '{payment.submitted}');
	-- a delivery attempt and a replayed dead letter (the endpoint disabled,
	-- so that the worker leaves it alone)
	SELECT callback_center.create_endpoint('dump_ep', 'https://dump.example/hook', '{door.opened}');
	SELECT callback_center.set_endpoint_enabled('dump_ep', false);
	INSERT INTO callback_center.outbox (endpoint_id, event_type, aggregate_id, payload, status, attempts)
	SELECT id, 'door.opened', 'dump-1', '{}', 'dead', 3
	  FROM callback_center.endpoints WHERE name = 'dump_ep';
	INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status, latency_ms)
	SELECT id, endpoint_id, 3, 500, 1.5 FROM callback_center.outbox WHERE aggregate_id = 'dump-1';
	SELECT callback_center.replay_dead(id, 'before dump')
	  FROM callback_center.outbox WHERE aggregate_id = 'dump-1';
});

# The built-in transitions whose emits the install script or the user set.
my $emits = q{
	SELECT string_agg(format('%s %s->%s %s', machine, from_state, to_state, emits), '; '
	                  ORDER BY machine, from_state, to_state)
	  FROM callback_center.transitions
	 WHERE (machine, from_state, to_state) IN
	       (('order', 'confirmed', 'closed'), ('order', 'pending_confirmation', 'failed'),
	        ('payment', 'CREATED', 'PAYING'))};
my $emits_before = $node->safe_psql('postgres', $emits);
is($emits_before,
	'order confirmed->closed {order.closed,audit.closed}; '
	  . 'order pending_confirmation->failed {order.failed}; '
	  . 'payment CREATED->PAYING {payment.submitted}',
	'emits of built-in transitions before dump');
# Only the user's changes are kept: the install script makes its own again.
is($node->safe_psql('postgres', q{
	SELECT string_agg(format('%s %s->%s', machine, from_state, to_state), ', '
	                  ORDER BY machine, from_state)
	  FROM callback_center.builtin_emits}),
	'order confirmed->closed, payment CREATED->PAYING',
	'user-set emits of built-in transitions are recorded for pg_dump');

my $counts = q{
	SELECT (SELECT count(*) FROM callback_center.state_machines) || '/' ||
	       (SELECT count(*) FROM callback_center.machine_states) || '/' ||
	       (SELECT count(*) FROM callback_center.transitions) || '/' ||
	       (SELECT count(*) FROM callback_center.state_history) || '/' ||
	       (SELECT string_agg(format('%s:%s', table_name, state_column), ',')
	          FROM callback_center.state_machine_attachments
	         WHERE table_name::text NOT LIKE 'callback_center.%')};
my $before = $node->safe_psql('postgres', $counts);
is($before, '6/31/40/3/doors:state', 'definitions, history and attachment before dump');

my $dump = $node->basedir . '/fsm.sql';
$node->command_ok(
	[ 'pg_dump', '-f', $dump, '-d', $node->connstr('postgres') ],
	'pg_dump succeeds');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok(
	[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-q', '-f', $dump, '-d', $node->connstr('restored') ],
	'restore succeeds (no duplicate built-in rows)');

is($node->safe_psql('restored', $counts), $before,
	'the same definitions, history and attachment after restore');
is($node->safe_psql('restored', q{
	SELECT string_agg(event, ',' ORDER BY event) FROM callback_center.transitions
	 WHERE NOT builtin}), 'close,hold,open', 'user transitions restored as user rows');

# The restored trigger enforces and records.
is($node->safe_psql('restored',
		q{SELECT callback_center.apply_event('doors', 'state', '2', 'open')}),
	'ajar', 'apply_event works in the restored database');
my ($ret, $out, $err) = $node->psql('restored',
	q{UPDATE doors SET state = 'shut' WHERE id = 2; UPDATE doors SET state = 'nowhere' WHERE id = 2});
like($err, qr/unknown state "nowhere" in state machine "door"/, 'restored trigger refuses an unknown state');
is($node->safe_psql('restored', q{
	SELECT string_agg(format('%s %s->%s', entity_id, coalesce(from_state, 'null'), to_state), ', ' ORDER BY id)
	  FROM callback_center.state_history}),
	'1 null->shut, 2 null->shut, 1 shut->ajar, 2 shut->ajar, 2 ajar->shut',
	'history continues after restore');

is($node->safe_psql('restored', $emits), $emits_before,
	'emits set on built-in transitions survive the restore');

# New delivery records after restore: no duplicate key (the sequences came
# with the tables).
($ret, $out, $err) = $node->psql('restored', q{
	UPDATE callback_center.outbox SET status = 'dead' WHERE aggregate_id = 'dump-1';
	SELECT callback_center.replay_dead(id, 'after restore')
	  FROM callback_center.outbox WHERE aggregate_id = 'dump-1';});
is($ret, 0, 'replay after restore succeeds');
unlike($err, qr/duplicate key/, 'no duplicate key in replay_audit after restore');
($ret, $out, $err) = $node->psql('restored', q{
	INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status, latency_ms)
	SELECT id, endpoint_id, 1, 200, 2.5 FROM callback_center.outbox WHERE aggregate_id = 'dump-1';});
is($ret, 0, 'delivery attempt after restore succeeds');
unlike($err, qr/duplicate key/, 'no duplicate key in delivery_attempts after restore');
is($node->safe_psql('restored', q{
	SELECT (SELECT string_agg(reason, ',' ORDER BY id) FROM callback_center.replay_audit) || ' / ' ||
	       (SELECT string_agg(attempt::text, ',' ORDER BY id) FROM callback_center.delivery_attempts)}),
	'before dump,after restore / 3,1', 'audit and attempts continue after restore');

# A new history id after restore does not collide with restored ones.
is($node->safe_psql('restored', q{
	SELECT count(DISTINCT id) = count(*) FROM callback_center.state_history}),
	't', 'identity sequence restored');

done_testing();
