# Membership counts per database (issue 11 item 4).  Two tenants' databases
# in one cluster, each with the extension.  A login that is a member of
# callback_center_app and was granted USAGE on the schema in database shop
# only uses the API there; in tenant_b it reads no order and restores no
# stock (42501), though CONNECT is open to PUBLIC as by default.  The same
# holds for callback_center_admin.  The grant is the DBA's, so pg_dump
# carries it and a restore keeps it; the group roles themselves have no
# USAGE anywhere a fresh install made.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;

my $node = cc_node('database_access');

for my $db (qw(shop tenant_b))
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, 'CREATE EXTENSION callback_center CASCADE');
	$node->safe_psql($db, qq{
	  SELECT callback_center.set_stock('$db-sku', 10);
	  SELECT callback_center.set_provider('$db-pay', 'standard_webhooks', NULL);
	  SELECT * FROM callback_center.place_order('$db-o1', 'u1', '[{"sku":"$db-sku","qty":2}]',
	                                            100, NULL, '$db-pay');});
}
$node->safe_psql('postgres', q{
  CREATE ROLE alice LOGIN IN ROLE callback_center_app;
  CREATE ROLE olga LOGIN IN ROLE callback_center_admin;});
$node->safe_psql('shop', q{GRANT USAGE ON SCHEMA callback_center TO alice, olga});

# The SQLSTATE of a statement run as a login in a database, or its result.
sub as_role
{
	my ($role, $db, $stmt) = @_;
	my ($rc, $out, $err) = $node->psql($db, $stmt,
		connstr => $node->connstr($db) . " user=$role", on_error_stop => 1,
		extra_params => [ '-v', 'VERBOSITY=sqlstate' ]);
	return $rc == 0 ? $out : ($err =~ /ERROR:\s+(\w{5})/ ? $1 : "error: $err");
}

# In the database that granted it, the member works.
is(as_role('alice', 'shop', q{SELECT order_id || ' ' || pay_status
        FROM callback_center.orders WHERE order_id = 'shop-o1'}), 'shop-o1 unpaid',
	'alice reads her own database\'s order');
is(as_role('alice', 'shop', q{SELECT available FROM callback_center.stock WHERE sku_id = 'shop-sku'}), '8',
	'and its stock');

# In the other tenant's database, nothing: reading, restoring stock,
# placing an order.
is(as_role('alice', 'tenant_b', q{SELECT pay_status FROM callback_center.orders WHERE order_id = 'tenant_b-o1'}),
	'42501', 'alice cannot read tenant_b\'s order');
is(as_role('alice', 'tenant_b', q{SELECT callback_center.restore_stock('tenant_b-o1')}),
	'42501', 'nor restore its stock');
is(as_role('alice', 'tenant_b', q{SELECT * FROM callback_center.place_order('x', 'u', '[{"sku":"tenant_b-sku","qty":1}]', 1, NULL, 'tenant_b-pay')}),
	'42501', 'nor place an order there');
is(as_role('olga', 'tenant_b', q{SELECT callback_center.create_endpoint('evil', 'https://evil.example/', '{*}')}),
	'42501', 'an admin of shop cannot make an endpoint in tenant_b');
is(as_role('olga', 'tenant_b', q{SELECT count(*) FROM callback_center.outbox}),
	'42501', 'nor read its outbox');
is($node->safe_psql('tenant_b', q{
	  SELECT (SELECT available FROM callback_center.stock WHERE sku_id = 'tenant_b-sku')
	         || ' ' || (SELECT count(*) FROM callback_center.endpoints)}), '8 0',
	'tenant_b is untouched');
is(as_role('olga', 'shop', q{SELECT callback_center.create_endpoint('erp', 'https://erp.example/', '{*}') > 0}),
	't', 'olga administers shop');

# A fresh install grants the group roles no USAGE: membership alone is
# nothing, in any database.
is($node->safe_psql('tenant_b', q{
	  SELECT has_schema_privilege('callback_center_app', 'callback_center', 'USAGE')
	      OR has_schema_privilege('callback_center_admin', 'callback_center', 'USAGE')}), 'f',
	'the group roles have no USAGE of their own');

# The DBA's grant survives pg_dump and pg_restore with default options.
my $dir = PostgreSQL::Test::Utils::tempdir('dump');
$node->command_ok([ 'pg_dump', '-Fc', '-f', "$dir/shop.dump", '-d', $node->connstr('shop') ],
	'pg_dump of shop');
$node->safe_psql('postgres', 'CREATE DATABASE shop2');
$node->command_ok([ 'pg_restore', '-d', $node->connstr('shop2'), "$dir/shop.dump" ],
	'pg_restore into shop2');
is(as_role('alice', 'shop2', q{SELECT pay_status FROM callback_center.orders WHERE order_id = 'shop-o1'}),
	'unpaid', 'the restored database keeps alice\'s grant');
is(as_role('alice', 'shop2', q{SELECT has_schema_privilege('olga', 'callback_center', 'USAGE')}),
	't', 'and olga\'s');

# Revoking the grant in shop ends alice's access there, and only there.
$node->safe_psql('shop', q{REVOKE USAGE ON SCHEMA callback_center FROM alice});
is(as_role('alice', 'shop', q{SELECT pay_status FROM callback_center.orders WHERE order_id = 'shop-o1'}),
	'42501', 'a revoked grant ends access in shop');
is(as_role('alice', 'shop2', q{SELECT pay_status FROM callback_center.orders WHERE order_id = 'shop-o1'}),
	'unpaid', 'while shop2 keeps its own');

done_testing();
