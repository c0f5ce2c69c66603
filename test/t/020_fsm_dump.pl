# pg_dump keeps the machines users define, their history and the triggers
# on their tables, and not the built-in rows (CREATE EXTENSION brings those
# back).  The restored trigger enforces the restored machine.
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
});

my $counts = q{
	SELECT (SELECT count(*) FROM callback_center.state_machines) || '/' ||
	       (SELECT count(*) FROM callback_center.machine_states) || '/' ||
	       (SELECT count(*) FROM callback_center.transitions) || '/' ||
	       (SELECT count(*) FROM callback_center.state_history) || '/' ||
	       (SELECT string_agg(format('%s:%s', table_name, state_column), ',')
	          FROM callback_center.state_machine_attachments
	         WHERE table_name::text NOT LIKE 'callback_center.%')};
my $before = $node->safe_psql('postgres', $counts);
is($before, '5/24/29/3/doors:state', 'definitions, history and attachment before dump');

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

# A new history id after restore does not collide with restored ones.
is($node->safe_psql('restored', q{
	SELECT count(DISTINCT id) = count(*) FROM callback_center.state_history}),
	't', 'identity sequence restored');

done_testing();
