# 16 clients deliver the same callbacks over and over (a small key space):
# each key gets one row, and a caller is told is_first = true exactly once
# per key plus once per retry of a failed callback.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $node = cc_node('callback_pgbench',
	conf => "callback_center.callback_max_retries = 3\n");

# A side table counts the is_first answers; the wrapper records them in the
# same transaction as the delivery, so an aborted delivery counts nothing.
$node->safe_psql('postgres', q{
CREATE TABLE cb_firsts (biz_id text NOT NULL);
CREATE FUNCTION cb_deliver(b text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM callback_center.record_callback(b, 'pay', 'body of ' || b);
    IF r.payload_mismatch THEN
        RAISE EXCEPTION 'unexpected payload mismatch for %', b;
    END IF;
    IF r.is_first THEN
        INSERT INTO cb_firsts VALUES (b);
        RETURN 1;
    END IF;
    RETURN 0;
END
$$;
});

# The first caller completes in a later transaction (others meanwhile see
# "processing"); one completion in four fails, so the key is retried.
$node->pgbench(
	'--no-vacuum --client=16 --jobs=2 --transactions=300',
	0,
	[qr{processed: 4800/4800}],
	[],
	'16 clients deliver and complete callbacks',
	{
		'030_callback_deliver' => q{
\set k random(1, 40)
\set ok random(0, 3)
SELECT cb_deliver('tap-' || :k) AS first \gset
\if :first = 1
SELECT callback_center.complete_callback('tap-' || :k, 'pay', :ok <> 0, '{}');
\endif
}
	});

is( $node->safe_psql(
		'postgres', q{
SELECT count(*) = count(DISTINCT (biz_id, callback_type)) AND count(*) BETWEEN 1 AND 40
  FROM callback_center.callback_record WHERE biz_id LIKE 'tap-%'}),
	't',
	'one row per key');

my $firsts = $node->safe_psql('postgres', 'SELECT count(*) FROM cb_firsts');
my $expected = $node->safe_psql(
	'postgres', q{
SELECT count(*) + sum(retry_count) FROM callback_center.callback_record
 WHERE biz_id LIKE 'tap-%'});
is($firsts, $expected, 'is_first answers = rows + retries');
cmp_ok($firsts, '>', 0, 'some deliveries were first');
cmp_ok(
	$node->safe_psql(
		'postgres', q{
SELECT sum(retry_count) FROM callback_center.callback_record WHERE biz_id LIKE 'tap-%'}),
	'>', 0, 'failed callbacks were retried');

is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM (SELECT biz_id, count(*) AS n FROM cb_firsts GROUP BY biz_id) f
  JOIN callback_center.callback_record r USING (biz_id)
 WHERE f.n <> 1 + r.retry_count}),
	'0',
	'per key: one first answer plus one per retry');

is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE status NOT IN (2, 3)) || '/'
       || count(*) FILTER (WHERE retry_count > 3)
  FROM callback_center.callback_record WHERE biz_id LIKE 'tap-%'}),
	'0/0',
	'every first was completed, retries within callback_max_retries');

is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM callback_center.callback_record
 WHERE biz_id LIKE 'tap-%' AND status = 3 AND retry_count < 3}),
	'0',
	'a failed callback with retries left was retried (4800 deliveries on 40 keys)');

is($node->safe_psql('postgres',
		'SELECT count(*) FROM callback_center.callback_conflicts'),
	'0', 'no conflicts recorded');

$node->stop;
done_testing();
