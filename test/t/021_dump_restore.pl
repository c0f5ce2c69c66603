# A DBA's ordinary pg_dump and restore, in both formats (-Fc + pg_restore,
# plain + psql), with default options, reproduces every table of the
# extension exactly: orders in every state a flow reaches, payments,
# coupons, history, callbacks, the outbox, delivery attempts, late
# payments, TCC and saga rows, emits an admin chose for a built-in
# transition, a user table with an attached machine, and the identity
# sequences.  The restore writes no history and queues no event, and the
# machines enforce afterwards.  COPY loads rows as they are only for the
# table's owner (or a superuser) copying into that very table; every other
# way in is checked.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $node = cc_node('dump_restore');

# The source database is served by no worker: nothing changes it between
# the checksums and the dump.
$node->safe_psql('postgres', 'CREATE DATABASE src');
$node->safe_psql('src', 'CREATE EXTENSION callback_center CASCADE');
# A WeChat Pay v3 provider with a platform key, so that provider_keys has a
# row to restore: a key made here, never committed.
my $keydir = PostgreSQL::Test::Utils::tempdir('keys');
system('openssl', 'genrsa', '-out', "$keydir/p.key", '2048') == 0
  && system('openssl', 'rsa', '-in', "$keydir/p.key", '-pubout', '-out', "$keydir/p.pub") == 0
  or die 'openssl could not make a key';
my $pub = PostgreSQL::Test::Utils::slurp_file("$keydir/p.pub");
# The same key as the merchant's, so that merchant_settings has a row too.
my $merchant_key = PostgreSQL::Test::Utils::slurp_file("$keydir/p.key");
$node->safe_psql('src', qq{
SELECT callback_center.set_provider('wx', 'wechatpay_v3', ARRAY['0123456789abcdef0123456789abcdef']);
SELECT callback_center.set_platform_keys('wx', jsonb_build_object('PUB_KEY_ID_0001', '$pub'));
SELECT callback_center.set_merchant('wx', '1900000109', '$merchant_key', 'MCHSERIAL0001');
});
$node->safe_psql('src', q{
SELECT callback_center.set_stock('sku-a', 100), callback_center.set_stock('sku-b', 1);
SELECT callback_center.set_hot_sku('sku-a', 2);
SELECT callback_center.issue_coupon('cp-1', 'u1'), callback_center.issue_coupon('cp-2', 'u2'),
       callback_center.issue_coupon('cp-3', 'u3'), callback_center.issue_coupon('cp-free', 'u4');
SELECT callback_center.create_endpoint('ep', 'https://dump.example/hook', '{*}');
SELECT callback_center.create_endpoint('qep', 'https://dump.example/query', '{payment.query}');
SELECT callback_center.set_provider('pay', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.set_provider_query_endpoint('pay', 'qep');
INSERT INTO callback_center.retry_schedules (name, delays) VALUES ('slow', '{10,100}');

CREATE FUNCTION pg_temp.body(kind text, txn text, oid text, cents bigint) RETURNS text
LANGUAGE sql AS $$
    SELECT jsonb_build_object('type', kind,
        'data', jsonb_build_object('txn_id', txn, 'order_id', oid, 'amount_cents', cents))::text $$;
CREATE FUNCTION pg_temp.pay(kind text, txn text, oid text, cents bigint, msg text) RETURNS text
LANGUAGE sql AS $$
    SELECT outcome FROM callback_center.payment_callback('pay',
        jsonb_build_object('webhook-id', msg,
            'webhook-timestamp', extract(epoch FROM now())::bigint::text,
            'webhook-signature', callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                msg, extract(epoch FROM now())::bigint, pg_temp.body(kind, txn, oid, cents))),
        pg_temp.body(kind, txn, oid, cents)) $$;

-- confirmed and unpaid, its coupon frozen, a close failure noted for it
SELECT callback_center.place_order('o-confirmed', 'u1', '[{"sku":"sku-a","qty":1}]', 100, 'cp-1', 'pay');
SELECT callback_center._note_close_failure('o-confirmed', 'refused');
-- paying, with a status query sent
SELECT callback_center.place_order('o-paying', 'u2', '[{"sku":"sku-a","qty":1}]', 200, NULL, 'pay');
SELECT callback_center.start_payment('o-paying', 'pay');
SELECT callback_center.query_stuck_payments(10, '0 seconds', '0 seconds');
-- paid, its coupon used; the same message id again with another body
SELECT callback_center.place_order('o-paid', 'u2', '[{"sku":"sku-a","qty":2}]', 300, 'cp-2', 'pay');
SELECT pg_temp.pay('payment.succeeded', 'txn-paid', 'o-paid', 300, 'msg-1');
SELECT pg_temp.pay('payment.succeeded', 'txn-paid', 'o-paid', 1, 'msg-1');
-- a refund of part of it asked for
SELECT callback_center.request_refund('o-paid', 100, 'dump test', 'rf-dump');
-- pay_failed, stock restored, coupon back
SELECT callback_center.place_order('o-failed', 'u3', '[{"sku":"sku-a","qty":1}]', 400, 'cp-3', 'pay');
SELECT pg_temp.pay('payment.failed', 'txn-failed', 'o-failed', 400, 'msg-2');
-- closed by timeout, then late money: the payment asks for a refund
SELECT callback_center.place_order('o-closed', 'u5', '[{"sku":"sku-a","qty":1}]', 500, NULL, 'pay');
UPDATE callback_center.orders SET pay_deadline = now() - interval '1 minute'
 WHERE order_id = 'o-closed';
SELECT callback_center.close_expired_orders(10);
SELECT pg_temp.pay('payment.succeeded', 'txn-late', 'o-closed', 500, 'msg-3');
-- short of stock: the order fails
SELECT callback_center.place_order('o-short', 'u6', '[{"sku":"sku-b","qty":5}]', 600);
-- reconciliation against a statement that disagrees
INSERT INTO callback_center.provider_statement
       (channel, bill_date, provider_txn_id, order_id, amount_cents, status)
VALUES ('pay', current_date, 'txn-paid', 'o-paid', 299, 'success');
SELECT * FROM callback_center.reconcile('pay', current_date);
-- TCC: confirmed, reserved, an empty compensation; a completed and a
-- compensated saga
SELECT callback_center.tcc_stock_try('g1', 'stock', 'sku-b', 1);
SELECT callback_center.tcc_stock_confirm('g1', 'stock');
SELECT callback_center.tcc_coupon_try('g2', 'coupon', 'cp-free');
SELECT callback_center.tcc_stock_cancel('g3', 'stock');
SELECT callback_center.saga_start('s-ok', '[{"action": "SELECT 1"}]');
SELECT callback_center.saga_run('s-ok');
SELECT callback_center.saga_start('s-bad',
    '[{"action": "SELECT 1", "compensation": "SELECT 2"}, {"action": "SELECT 1/0"}]');
SELECT callback_center.saga_run('s-bad');
-- emits an admin chose for a built-in transition
SELECT callback_center.set_transition_emits('order', 'confirmed', 'closed',
                                            '{order.closed,audit.closed}');
-- a user machine on a user table, rows past their first state
SELECT callback_center.create_state_machine('door', 'A door');
SELECT callback_center.add_state('door', 'shut', true);
SELECT callback_center.add_state('door', 'ajar');
SELECT callback_center.add_state('door', 'gone', false, true);
SELECT callback_center.add_transition('door', 'shut', 'ajar', 'open', ARRAY['door.opened']);
SELECT callback_center.add_transition('door', 'ajar', 'shut', 'close');
SELECT callback_center.add_transition('door', 'ajar', 'gone', 'remove');
CREATE TABLE public.doors (id integer PRIMARY KEY, state text NOT NULL, note text);
SELECT callback_center.attach_state_machine('public.doors', 'state', 'door');
INSERT INTO public.doors VALUES (1, 'shut', 'a'), (2, 'shut', 'b'), (3, 'shut', 'c');
UPDATE public.doors SET state = 'ajar' WHERE id IN (1, 2);
UPDATE public.doors SET state = 'gone' WHERE id = 2;
-- delivery attempts, and a dead letter replayed
INSERT INTO callback_center.delivery_attempts (outbox_id, endpoint_id, attempt, http_status, latency_ms)
SELECT id, endpoint_id, 1, 500, 1.5 FROM callback_center.outbox ORDER BY id LIMIT 3;
UPDATE callback_center.outbox SET status = 'dead', attempts = 3
 WHERE id = (SELECT min(id) FROM callback_center.outbox);
SELECT callback_center.replay_dead((SELECT min(id) FROM callback_center.outbox), 'before dump');
-- a provider's answer, kept as the delivery worker keeps it
SELECT callback_center._adapter_record(ARRAY[(SELECT max(id) FROM callback_center.outbox)], ARRAY[1],
    ARRAY[200], ARRAY['{"status": "paid"}'::jsonb], ARRAY[NULL::text]);
});

is($node->safe_psql('src', q{
	SELECT string_agg(format('%s %s/%s', o.order_id, o.status, o.pay_status)
	                  || coalesce(' ' || p.status, ''), ', ' ORDER BY o.order_id)
	  FROM callback_center.orders o LEFT JOIN callback_center.payments p USING (order_id)}),
	'o-closed closed/closed REFUND_REQUIRED, o-confirmed confirmed/unpaid CREATED, '
	  . 'o-failed closed/pay_failed FAILED, o-paid confirmed/paid PAID, '
	  . 'o-paying confirmed/paying PAYING, o-short failed/unpaid',
	'orders and payments in every state the flows reach');

# Every table of the schema is dumped, except endpoint_state (runtime state
# the worker writes and never reads back); so is every sequence.
is($node->safe_psql('src', q{
	SELECT string_agg(c.relname, ',' ORDER BY c.relname)
	  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	 WHERE n.nspname = 'callback_center' AND c.relkind IN ('r', 'p', 'S')
	   AND c.oid <> ALL (SELECT unnest(extconfig) FROM pg_extension
	                      WHERE extname = 'callback_center')}),
	'endpoint_state', 'only endpoint_state is left out of the dump');

# Every table's rows, as text, in order; every sequence's position.
my $sums = q{
CREATE FUNCTION pg_temp.sums() RETURNS TABLE (tbl text, n bigint, sum text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.oid::regclass AS t
               FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
              WHERE c.relkind = 'r'
                AND ((ns.nspname = 'callback_center' AND c.relname <> 'endpoint_state')
                     OR c.oid = 'public.doors'::regclass)
    LOOP
        tbl := r.t::text;
        EXECUTE format('SELECT count(*), md5(coalesce(string_agg(x::text, E''\n'''
                       ' ORDER BY x::text COLLATE "C"), '''')) FROM %s x', r.t)
           INTO n, sum;
        RETURN NEXT;
    END LOOP;
END $$;
SELECT string_agg(format('%s %s %s', tbl, n, sum), E'\n' ORDER BY tbl COLLATE "C")
  FROM pg_temp.sums()
UNION ALL
SELECT string_agg(format('%s.%s %s', schemaname, sequencename, last_value), E'\n'
                  ORDER BY sequencename COLLATE "C")
  FROM pg_sequences WHERE schemaname = 'callback_center';
};
my $src_sums = $node->safe_psql('src', $sums);
my @empty = grep { / 0 [0-9a-f]{32}$/ } split /\n/, $src_sums;
is(join(',', @empty), '', 'every dumped table has rows to restore');
unlike($src_sums, qr/seq $/m, 'every sequence has been used');

my $counts = q{
	SELECT (SELECT count(*) FROM callback_center.state_history) || '/' ||
	       (SELECT count(*) FROM callback_center.outbox)};
my $src_counts = $node->safe_psql('src', $counts);

# Runs SQL; returns 'ok' or the SQLSTATE of the error.
sub sqlstate
{
	my ($db, $sql, @params) = @_;
	my ($ret, $out, $err) =
	  $node->psql($db, "\\set VERBOSITY verbose\n$sql", extra_params => \@params);
	return 'ok' if $ret == 0;
	return $1 if $err =~ /ERROR:  ([0-9A-Z]{5}):/;
	return "failed: $err";
}

# The machines enforce in a restored database, and record again.
sub check_restored
{
	my ($n, $db, $how) = @_;
	is($n->safe_psql($db, $sums), $src_sums, "$how: every table and sequence as in the source");
	is($n->safe_psql($db, $counts), $src_counts, "$how: the restore wrote no history and no event");
	is(sqlstate($db, q{UPDATE callback_center.orders SET pay_status = 'unpaid' WHERE order_id = 'o-paid'}),
		'CB010', "$how: an illegal order move fails");
	is(sqlstate($db, q{UPDATE callback_center.payments SET status = 'CREATED' WHERE order_id = 'o-paid'}),
		'CB010', "$how: an illegal payment move fails");
	is(sqlstate($db, q{UPDATE callback_center.coupons SET status = 'frozen' WHERE coupon_id = 'cp-2'}),
		'CB010', "$how: an illegal coupon move fails");
	is(sqlstate($db, q{UPDATE public.doors SET state = 'shut' WHERE id = 2}),
		'CB010', "$how: an illegal move of the user table fails");
	is(sqlstate($db, q{INSERT INTO public.doors VALUES (9, 'ajar')}),
		'CB010', "$how: an insert past the first state fails");
	$n->safe_psql($db, q{UPDATE public.doors SET state = 'shut' WHERE id = 1});
	is($n->safe_psql($db, q{
		SELECT format('%s %s->%s %s', h.entity_id, h.from_state, h.to_state,
		              h.id > (SELECT max(id) FROM callback_center.state_history
		                       WHERE id < h.id))
		  FROM callback_center.state_history h ORDER BY id DESC LIMIT 1}),
		'1 ajar->shut t', "$how: a legal move records history with a new id");
}

my $dir = $node->basedir;
$node->command_ok([ 'pg_dump', '-Fc', '-f', "$dir/src.dump", '-d', $node->connstr('src') ],
	'pg_dump -Fc');
$node->command_ok([ 'pg_dump', '-f', "$dir/src.sql", '-d', $node->connstr('src') ],
	'pg_dump (plain)');

$node->safe_psql('postgres', 'CREATE DATABASE r_custom');
$node->command_ok([ 'pg_restore', '-d', $node->connstr('r_custom'), "$dir/src.dump" ],
	'pg_restore with default options succeeds');
check_restored($node, 'r_custom', 'pg_restore');

$node->safe_psql('postgres', 'CREATE DATABASE r_plain');
$node->command_ok(
	[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-f', "$dir/src.sql", '-d', $node->connstr('r_plain') ],
	'psql of the plain dump succeeds');
check_restored($node, 'r_plain', 'psql');

# A server without the library preloaded: the library loads on the first
# trigger call, in the middle of the COPY, and still recognises it.
my $plain = PostgreSQL::Test::Cluster->new('no_preload');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE DATABASE r_nopreload');
$plain->command_ok([ 'pg_restore', '-d', $plain->connstr('r_nopreload'), "$dir/src.dump" ],
	'pg_restore into a server without preload succeeds');
is($plain->safe_psql('r_nopreload', $sums), $src_sums, 'without preload: every table as in the source');
$plain->stop;

# Who may load rows as they are.  A table owned by an ordinary role, with
# the machine attached; a clerk who may insert into it; a feeder table whose
# trigger inserts into it.
$node->safe_psql('r_plain', q{
	CREATE ROLE locker_owner LOGIN;
	CREATE ROLE clerk LOGIN;
	CREATE TABLE public.lockers (id integer PRIMARY KEY, state text NOT NULL);
	ALTER TABLE public.lockers OWNER TO locker_owner;
	SELECT callback_center.attach_state_machine('public.lockers', 'state', 'door');
	GRANT SELECT, INSERT ON public.lockers TO clerk;
	CREATE TABLE public.feeder (id integer, state text);
	CREATE FUNCTION public.feed() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
	    INSERT INTO public.lockers VALUES (NEW.id, NEW.state);
	    RETURN NEW;
	END $$;
	CREATE TRIGGER feed AFTER INSERT ON public.feeder FOR EACH ROW EXECUTE FUNCTION public.feed();
});
my $hist = q{SELECT count(*) FROM callback_center.state_history WHERE table_name = 'public.lockers'};

is(sqlstate('r_plain', "COPY public.lockers FROM stdin;\n1\tajar\n\\.\n", '-U', 'locker_owner'),
	'ok', "the owner's COPY loads a row past its first state");
is(sqlstate('r_plain', "COPY public.lockers FROM stdin;\n2\tgone\n\\.\n"),
	'ok', "a superuser's COPY loads one too");
is($node->safe_psql('r_plain', $hist), '0', 'and records no history');
is(sqlstate('r_plain', "COPY public.lockers FROM stdin;\n3\tajar\n\\.\n", '-U', 'clerk'),
	'CB010', "a COPY by a role that is not the owner is checked");
is(sqlstate('r_plain', "COPY public.lockers FROM stdin;\n3\tshut\n\\.\n", '-U', 'clerk'),
	'ok', "and a legal row of it is recorded");
is($node->safe_psql('r_plain', $hist), '1', 'one history row for the clerk');
is(sqlstate('r_plain', q{INSERT INTO public.lockers VALUES (4, 'ajar')}, '-U', 'locker_owner'),
	'CB010', "the owner's INSERT is checked");
is(sqlstate('r_plain', q{INSERT INTO public.lockers SELECT 4, 'ajar'}),
	'CB010', "a superuser's INSERT ... SELECT is checked");
is(sqlstate('r_plain', q{UPDATE public.lockers SET state = 'shut' WHERE id = 2}),
	'CB010', "a superuser's UPDATE is checked");
is(sqlstate('r_plain', "COPY public.feeder FROM stdin;\n5\tajar\n\\.\n"),
	'CB010', 'a row another table\'s COPY inserts through a trigger is checked');
is($node->safe_psql('r_plain', q{SELECT string_agg(id || ':' || state, ',' ORDER BY id) FROM public.lockers}),
	'1:ajar,2:gone,3:shut', 'only the owner\'s, the superuser\'s and the legal rows went in');

# A partitioned table: the machine's triggers fire on the partition, the
# COPY names the parent.
$node->safe_psql('r_plain', q{
	CREATE TABLE public.shelves (id integer, state text NOT NULL) PARTITION BY RANGE (id);
	CREATE TABLE public.shelves_low PARTITION OF public.shelves FOR VALUES FROM (0) TO (100);
	ALTER TABLE public.shelves OWNER TO locker_owner;
	ALTER TABLE public.shelves_low OWNER TO locker_owner;
	SELECT callback_center.attach_state_machine('public.shelves', 'state', 'door');
	GRANT SELECT, INSERT ON public.shelves TO clerk;
});
is(sqlstate('r_plain', "COPY public.shelves FROM stdin;\n1\tajar\n\\.\n", '-U', 'locker_owner'),
	'ok', "the owner's COPY into the partitioned parent loads a row past its first state");
is(sqlstate('r_plain', "COPY public.shelves FROM stdin;\n2\tajar\n\\.\n", '-U', 'clerk'),
	'CB010', "the clerk's is checked");
is(sqlstate('r_plain', q{INSERT INTO public.shelves VALUES (3, 'ajar')}, '-U', 'locker_owner'),
	'CB010', "the owner's INSERT into it is checked");

done_testing();
