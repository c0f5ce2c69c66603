# 32 clients buy one hot SKU (32 slots) until it runs out, with orders that
# also take a normal SKU and with concurrent restores; then they drain what
# the restores gave back.  After every pgbench run the units sold (held by
# non-restored deductions) equal the initial units minus those available;
# at the end no slot is negative, every deduction the clients saw succeed
# is recorded and nothing else is, and once demand exceeds supply exactly
# the initial units are sold.  A deadlock or any unexpected error stops a
# pgbench client and fails the transaction count.
#
# The whole sale runs twice: on fresh tables, then after ANALYZE of the
# stock tables holding a 256-slot SKU (what autovacuum does by itself), the
# statistics under which the planner once repeated a slot choice for every
# slot, so that one statement took or gave units many times.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $initial = 3000;
my $slots = 32;
my $node = cc_node('stock_hot_pgbench', conf => "max_connections = 60\n");

$node->safe_psql('postgres', qq{
SELECT callback_center.set_stock('hot', $initial);
SELECT callback_center.set_hot_sku('hot', $slots);
SELECT callback_center.set_stock('plain', 1000000);
CREATE SEQUENCE bench_biz;
CREATE UNLOGGED TABLE bench_outcome (biz text, kind text, outcome text);

-- CB001 is the expected end of the sale: it becomes a result; any other
-- error (a deadlock, a constraint violation) still stops the client.
CREATE FUNCTION bench_deduct(biz text, skus text[], qtys bigint[]) RETURNS void
LANGUAGE plpgsql AS \$\$
BEGIN
    IF cardinality(skus) = 1 THEN
        PERFORM callback_center.deduct_stock(biz, skus[1], qtys[1]);
    ELSE
        PERFORM callback_center.deduct_stock(biz, skus, qtys);
    END IF;
    INSERT INTO bench_outcome VALUES (biz, 'deduct', 'ok');
EXCEPTION WHEN SQLSTATE 'CB001' THEN
    INSERT INTO bench_outcome VALUES (biz, 'deduct', 'short');
END
\$\$;

-- Restores a recent order: concurrent clients often pick the same one.
CREATE FUNCTION bench_restore() RETURNS void
LANGUAGE plpgsql AS \$\$
DECLARE
    biz text := 'b' || (SELECT last_value - (random() * 3)::int FROM bench_biz);
    n int;
BEGIN
    SELECT count(*) INTO n FROM callback_center.restore_stock(biz);
    INSERT INTO bench_outcome VALUES (biz, 'restore', CASE WHEN n > 0 THEN 'ok' ELSE 'none' END);
END
\$\$;
});

# sold = initial - available, read after each pgbench run.
sub check_sold
{
	my ($label) = @_;
	is($node->safe_psql('postgres', qq{
SELECT (SELECT coalesce(sum(quantity), 0) FROM callback_center.stock_deductions
         WHERE sku_id = 'hot' AND NOT restored)
     = $initial - (SELECT available FROM callback_center.stock_levels WHERE sku_id = 'hot')}),
		't', "$label: sold = initial - available");
}

# One sale of $initial units of 'hot' over $slots slots, and its checks.
# $tag names its pgbench script files; $version: the stock row's version,
# which counts set_hot_sku and set_stock calls only.
sub sale
{
	my ($label, $tag, $version) = @_;

	# Phase 1: 32 clients, demand of about 2 units x 8,000 orders against
	# 3,000 units, so the sale runs out half way.
	$node->pgbench(
		"-n -c 32 -j 2 -t 250",
		0,
		[qr/number of transactions actually processed: 8000\/8000/],
		[qr/^$/],
		"$label: 32 clients deduct one hot SKU, with a normal one and restores, without errors",
		{
			"011_${tag}_one\@8" => q{
\set q random(1, 3)
SELECT bench_deduct('b' || nextval('bench_biz'), ARRAY['hot'], ARRAY[:q]::bigint[]);
},
			"011_${tag}_mixed\@3" => q{
\set q random(1, 3)
SELECT bench_deduct('b' || nextval('bench_biz'), ARRAY['plain', 'hot'], ARRAY[1, :q]::bigint[]);
},
			"011_${tag}_restore\@1" => q{
SELECT bench_restore();
},
		});
	check_sold("$label, phase 1");

	# Phase 2: deductions, far more than what restores gave back, and
	# restores still running.
	$node->pgbench(
		"-n -c 32 -j 2 -t 100",
		0,
		[qr/number of transactions actually processed: 3200\/3200/],
		[qr/^$/],
		"$label: 32 clients drain the hot SKU without errors",
		{
			"011_${tag}_drain\@10" => q{
\set q random(1, 3)
SELECT bench_deduct('b' || nextval('bench_biz'), ARRAY['hot'], ARRAY[:q]::bigint[]);
},
			"011_${tag}_restore2\@1" => q{
SELECT bench_restore();
},
		});
	check_sold("$label, phase 2");

	# Phase 3: only deductions, until nothing is left.
	$node->pgbench(
		"-n -c 32 -j 2 -t 50",
		0,
		[qr/number of transactions actually processed: 1600\/1600/],
		[qr/^$/],
		"$label: 32 clients take the last units without errors",
		{
			"011_${tag}_last" => q{
\set q random(1, 3)
SELECT bench_deduct('b' || nextval('bench_biz'), ARRAY['hot'], ARRAY[:q]::bigint[]);
},
		});
	check_sold("$label, phase 3");

	is($node->safe_psql('postgres', q{
SELECT (SELECT sum(available) FROM callback_center.stock_slots WHERE sku_id = 'hot')
     + (SELECT coalesce(sum(quantity), 0) FROM callback_center.stock_deductions
         WHERE sku_id = 'hot' AND NOT restored)}),
		$initial, "$label: slots + units held by non-restored deductions = initial units");

	is($node->safe_psql('postgres', q{
SELECT count(*) || ' ' || sum(available) || ' ' || min(available)
  FROM callback_center.stock_slots WHERE sku_id = 'hot'}),
		"$slots 0 0", "$label: every slot is there, none negative, all empty at the end");

	is($node->safe_psql('postgres', q{
SELECT coalesce(sum(quantity), 0) FROM callback_center.stock_deductions
 WHERE sku_id = 'hot' AND NOT restored}),
		$initial, "$label: exactly the initial units are sold");

	is($node->safe_psql('postgres', q{
SELECT available || ' ' || slots || ' ' || version FROM callback_center.stock WHERE sku_id = 'hot'}),
		"0 $slots $version", "$label: the stock row holds nothing, its version counts admin calls only");

	# Every order the clients saw succeed is recorded with all its SKUs, and
	# no order that failed left a record.
	is($node->safe_psql('postgres', q{
SELECT count(*) FROM (
    SELECT biz FROM bench_outcome WHERE kind = 'deduct' AND outcome = 'ok'
    EXCEPT SELECT biz_id FROM callback_center.stock_deductions WHERE sku_id = 'hot') AS missing}),
		'0', "$label: every successful deduction is recorded");
	is($node->safe_psql('postgres', q{
SELECT count(*) FROM callback_center.stock_deductions d
 WHERE d.sku_id IN ('hot', 'plain')
   AND NOT EXISTS (SELECT FROM bench_outcome o
                    WHERE o.biz = d.biz_id AND o.kind = 'deduct' AND o.outcome = 'ok')}),
		'0', "$label: no deduction is recorded for a call that failed");
	is($node->safe_psql('postgres', q{
SELECT count(*) FROM callback_center.stock_deductions p
 WHERE p.sku_id = 'plain'
   AND NOT EXISTS (SELECT FROM callback_center.stock_deductions h
                    WHERE h.biz_id = p.biz_id AND h.sku_id = 'hot')}),
		'0', "$label: a mixed order never took the normal SKU without the hot one");
	is($node->safe_psql('postgres', q{
SELECT s.available + coalesce(sum(d.quantity) FILTER (WHERE NOT d.restored), 0)
  FROM callback_center.stock s
  LEFT JOIN callback_center.stock_deductions d USING (sku_id)
 WHERE s.sku_id = 'plain' GROUP BY s.available}),
		'1000000', "$label: the normal SKU balances too");

	my $outcomes = $node->safe_psql('postgres', q{
SELECT string_agg(kind || '/' || outcome, ',' ORDER BY kind, outcome)
  FROM (SELECT DISTINCT kind, outcome FROM bench_outcome WHERE outcome <> 'none') AS o});
	is($outcomes, 'deduct/ok,deduct/short,restore/ok',
		"$label: deductions succeeded and ran short, restores happened");
}

sale('fresh tables', 'fresh', 1);

# Again, after ANALYZE with a 256-slot SKU present, and the sale's SKU made
# hot after it (as a flash sale is, after autovacuum last analyzed): the
# books of the first sale are cleared, the SKU gets its units back.
$node->safe_psql('postgres', qq{
SELECT callback_center.set_stock('big', 1000);
SELECT callback_center.set_hot_sku('big', 256);
TRUNCATE bench_outcome;
DELETE FROM callback_center.stock_deductions;
SELECT callback_center.set_hot_sku('hot', 1);
SELECT callback_center.set_stock('hot', $initial);
SELECT callback_center.set_stock('plain', 1000000);
ANALYZE callback_center.stock, callback_center.stock_slots;
SELECT callback_center.set_hot_sku('hot', $slots);
});
sale('after ANALYZE with a 256-slot SKU', 'analyzed', 4);

$node->stop;
done_testing();
