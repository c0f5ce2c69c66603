# Many clients deduct, re-deduct and restore stock at once, until the
# stock runs out.  Afterwards the books must balance exactly: for every
# SKU, available + units held by non-restored deductions = initial units,
# and version = deductions + restores (each change counted once).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $initial = 600;
my $skus = 5;
my $node = cc_node('stock_pgbench');

$node->safe_psql('postgres', qq{
SELECT callback_center.set_stock('pgb-' || i, $initial) FROM generate_series(1, $skus) AS i;
CREATE SEQUENCE bench_biz;
CREATE UNLOGGED TABLE bench_outcome (kind text, outcome text);

-- pgbench stops a client on any error, so the expected one (CB001) is
-- turned into a result; any other error (a deadlock, CB002, a constraint
-- violation) still fails the run.
CREATE FUNCTION bench_deduct(biz text, skus text[], qtys bigint[]) RETURNS void
LANGUAGE plpgsql AS \$\$
BEGIN
    IF cardinality(skus) = 1 THEN
        PERFORM callback_center.deduct_stock(biz, skus[1], qtys[1]);
    ELSE
        PERFORM callback_center.deduct_stock(biz, skus, qtys);
    END IF;
    INSERT INTO bench_outcome VALUES ('deduct', 'ok');
EXCEPTION WHEN SQLSTATE 'CB001' THEN
    INSERT INTO bench_outcome VALUES ('deduct', 'short');
END
\$\$;

-- Restores, or deducts again, the latest biz id: many clients pick the
-- same one at once.
CREATE FUNCTION bench_latest() RETURNS text
LANGUAGE sql AS \$\$
    SELECT 'b' || last_value FROM bench_biz
\$\$;
CREATE FUNCTION bench_restore() RETURNS void
LANGUAGE plpgsql AS \$\$
DECLARE
    n int;
BEGIN
    SELECT count(*) INTO n FROM callback_center.restore_stock(bench_latest());
    INSERT INTO bench_outcome VALUES ('restore', CASE WHEN n > 0 THEN 'ok' ELSE 'none' END);
END
\$\$;
CREATE FUNCTION bench_again() RETURNS void
LANGUAGE plpgsql AS \$\$
DECLARE
    biz text := bench_latest();
    r record;
BEGIN
    FOR r IN SELECT sku_id, quantity FROM callback_center.stock_deductions
              WHERE biz_id = biz LOOP
        IF (SELECT status FROM callback_center.deduct_stock(biz, r.sku_id, r.quantity))
           = 'deducted' THEN
            RAISE EXCEPTION 'repeat deduction of % % deducted', biz, r.sku_id;
        END IF;
    END LOOP;
    INSERT INTO bench_outcome VALUES ('again', 'ok');
END
\$\$;
});

$node->pgbench(
	"-n -c 16 -j 2 -t 250",
	0,
	[qr/number of transactions actually processed: 4000\/4000/],
	[qr/^$/],
	'16 clients deduct, re-deduct and restore without errors',
	{
		'010_one@6' => qq{
\\set sku random(1, $skus)
\\set q random(1, 3)
SELECT bench_deduct('b' || nextval('bench_biz'), ARRAY['pgb-' || :sku], ARRAY[:q]::bigint[]);
},
		'010_two@3' => qq{
\\set a random(1, $skus)
\\set b random(1, $skus)
\\set q random(1, 3)
SELECT bench_deduct('b' || nextval('bench_biz'), ARRAY['pgb-' || :a, 'pgb-' || :b], ARRAY[:q, 1]::bigint[]);
},
		'010_restore@2' => q{
SELECT bench_restore();
},
		'010_again@1' => q{
SELECT bench_again();
},
	});

my $balance = $node->safe_psql('postgres', qq{
SELECT s.sku_id || ' ' || (s.available + coalesce(sum(d.quantity) FILTER (WHERE NOT d.restored), 0))
  FROM callback_center.stock s
  LEFT JOIN callback_center.stock_deductions d USING (sku_id)
 WHERE s.sku_id LIKE 'pgb-%'
 GROUP BY s.sku_id, s.available ORDER BY s.sku_id});
is($balance, join("\n", map { "pgb-$_ $initial" } 1 .. $skus),
	'available + held units = initial units for every SKU');

is($node->safe_psql('postgres', q{
SELECT count(*) FROM callback_center.stock s
 WHERE sku_id LIKE 'pgb-%'
   AND version <> (SELECT count(*) + count(*) FILTER (WHERE restored)
                     FROM callback_center.stock_deductions d WHERE d.sku_id = s.sku_id)}),
	'0', 'every SKU version counts each deduction and each restore once');

is($node->safe_psql('postgres',
	q{SELECT count(*) FROM callback_center.stock WHERE available < 0 OR reserved <> 0}),
	'0', 'no negative stock');

is($node->safe_psql('postgres', q{
SELECT count(*) FROM (SELECT biz_id, sku_id FROM callback_center.stock_deductions
                       GROUP BY 1, 2 HAVING count(*) > 1) AS dup}),
	'0', 'one deduction row per (biz id, SKU)');

# The run must have exercised what it claims to: successes, shortages
# (the stock ran out), restores and repeats.
my $outcomes = $node->safe_psql('postgres', q{
SELECT string_agg(kind || '/' || outcome, ',' ORDER BY kind, outcome)
  FROM (SELECT DISTINCT kind, outcome FROM bench_outcome
         WHERE outcome <> 'none') AS o});
is($outcomes, 'again/ok,deduct/ok,deduct/short,restore/ok',
	'deductions succeeded and ran short, restores and repeats happened');
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM callback_center.stock WHERE sku_id LIKE 'pgb-%' AND available < 3}),
	$skus, 'every SKU ran (nearly) out');

$node->stop;
done_testing();
