# Text from receivers stays valid: a response body with a multibyte
# character straddling callback_center.response_cap, invalid UTF-8 bytes and
# a NUL is stored in delivery_attempts (and returned by http_probe) as valid
# UTF-8, cut on a character boundary, invalid sequences and NUL replaced by
# U+FFFD; string functions work on it, and a dump of the database restores.
# The same bytes into a LATIN1 database become "?" (SQL_ASCII keeps all but
# NUL, as PostgreSQL does).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
my $rcv = CallbackCenterReceiver->start(secrets => [$secret]);
my $port = $rcv->port;
my $node = cc_node('text_outside',
	initdb_extra => [ '--encoding=UTF8', '--locale=C' ],
	conf => "callback_center.response_cap = 16\ncallback_center.retry_jitter = 0\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

is(sql('SHOW server_encoding'), 'UTF8', 'the database is UTF8');

# 15 ASCII bytes then a euro sign (E2 82 AC): the cap of 16 falls inside it.
$rcv->control('/straddle', 'bytes', body_hex => unpack('H*', 'abcdefghijklmno') . 'e282ac');
# Invalid bytes (a lone continuation byte, FF, a truncated sequence) and a
# NUL in the middle, all within the cap; HTTP 500 so that it is retried.
$rcv->control('/invalid', 'bytes', status => 500,
	body_hex => '61' . '80' . '62' . 'ff' . '63' . '00' . '64' . 'e282' . '65');

sql(qq{SELECT callback_center.create_endpoint('straddle', 'http://127.0.0.1:$port/straddle', '{ev.s}', '$secret')});
sql(qq{SELECT callback_center.create_endpoint('invalid', 'http://127.0.0.1:$port/invalid', '{ev.i}', '$secret')});
sql(q{SELECT callback_center.enqueue('ev.s', 's-1', '{}')});
sql(q{SELECT callback_center.enqueue('ev.i', 'i-1', '{}')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 2 FROM callback_center.outbox
		   WHERE aggregate_id IN ('s-1', 'i-1') AND status IN ('delivered', 'dead')}),
	'both events reach their end');

# What was stored, and that the server itself finds it valid.
my $resp = sub {
	my ($agg, $expr) = @_;
	return sql(qq{SELECT $expr FROM callback_center.delivery_attempts a
		JOIN callback_center.outbox o ON o.id = a.outbox_id
		WHERE o.aggregate_id = '$agg' ORDER BY a.id LIMIT 1});
};
is($resp->('s-1', 'response_body'), 'abcdefghijklmno',
	'a character cut by response_cap is dropped, not stored half');
is($resp->('s-1', 'octet_length(response_body)'), '15', 'so the stored body is 15 bytes');
is($resp->('i-1', q{encode(convert_to(response_body, 'UTF8'), 'hex')}),
	'61efbfbd62efbfbd63efbfbd64efbfbd',
	'invalid sequences and the NUL become U+FFFD, the rest is kept up to the cap');
is($resp->('i-1', 'octet_length(response_body)'), '16',
	'the replacements count against response_cap: the last byte did not fit');
is($resp->('i-1', 'length(response_body)'), '8', 'length() counts characters');
is($resp->('i-1', q{convert_from(convert_to(response_body, 'UTF8'), 'UTF8') = response_body}), 't',
	'convert_from(convert_to(...)) round trip (convert_from validates)');
is(sql(q{SELECT count(*) FROM callback_center.delivery_attempts
          WHERE response_body IS NOT NULL
            AND convert_from(convert_to(response_body, 'UTF8'), 'UTF8') IS NOT NULL
            AND upper(response_body) IS NOT NULL}),
	sql(q{SELECT count(*) FROM callback_center.delivery_attempts WHERE response_body IS NOT NULL}),
	'every stored response is valid text');

# http_probe returns the same.
is(sql(qq{SELECT body || '|' || truncated FROM callback_center.http_probe(
		ARRAY['http://127.0.0.1:$port/straddle'], max_body_bytes => 16)}),
	'abcdefghijklmno|true', 'http_probe: cut on a character boundary, truncated');
is(sql(qq{SELECT encode(convert_to(body, 'UTF8'), 'hex') FROM callback_center.http_probe(
		ARRAY['http://127.0.0.1:$port/invalid'])}),
	'61efbfbd62efbfbd63efbfbd64efbfbd65', 'http_probe: the same replacements');

# A dump of the database restores (COPY refuses invalid text).
my $dump = $node->basedir . '/text.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('postgres'), '-f', $dump ],
	'pg_dump of the database');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
my ($rc, $out, $err) = $node->psql('restored', undef,
	extra_params => [ '-v', 'ON_ERROR_STOP=1', '-f', $dump ]);
is($rc, 0, 'the dump restores') or diag($err);
is($node->safe_psql('restored', q{SELECT count(*) FROM callback_center.delivery_attempts}),
	sql(q{SELECT count(*) FROM callback_center.delivery_attempts}),
	'with every attempt');

# Another database encoding: invalid bytes become "?" (http_probe runs in
# the calling backend, so the database's encoding decides).
$node->safe_psql('postgres',
	q{CREATE DATABASE latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0});
$node->safe_psql('latin1', 'CREATE EXTENSION callback_center CASCADE');
is($node->safe_psql('latin1', qq{SELECT encode(convert_to(body, 'LATIN1'), 'hex') FROM callback_center.http_probe(
		ARRAY['http://127.0.0.1:$port/invalid'])}),
	'618062ff633f64e28265',
	'LATIN1: every byte is a character; only the NUL is replaced, by "?"');

$node->stop;
$rcv->stop;
done_testing();
