SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- callback_center.allowed_destinations: the setting's own checks, and the
-- create-time check of endpoint URLs (src/allowlist_guc.c).  The delivery
-- time check is in test/t/064_allowlist_delivery.pl.
\set SHOW_CONTEXT never

-- Errors are shown as SQLSTATE: message, one line each.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- The default is empty (test/regress.conf lists 127.0.0.1 and ::1 for the
-- receivers): every public destination, no reserved one.
SHOW callback_center.allowed_destinations;
SELECT name, context, vartype, boot_val FROM pg_settings
 WHERE name = 'callback_center.allowed_destinations';
SELECT callback_center._check_destination('http://203.0.113.7/hooks', '') AS empty_list_allows;
SELECT url, pg_temp.try(format('SELECT callback_center._check_destination(%L, %L)', url, ''))
  FROM (VALUES
    ('http://127.0.0.1:8080/x'), ('http://127.9.9.9/x'), ('http://[::1]/x'),
    ('http://[::ffff:127.0.0.1]/x'), ('http://2130706433/x'), ('http://0x7f.1/x'),
    ('http://169.254.169.254/latest/meta-data/'), ('http://0.0.0.0/x'),
    ('http://[::]/x'), ('http://224.0.0.1/x'), ('http://255.255.255.255/x'),
    ('http://[fe80::1]/x'), ('http://[ff02::1]/x'),
    ('http://10.1.2.3/x'), ('http://172.16.0.1/x'), ('http://192.168.1.1/x'),
    ('http://100.64.0.1/x'), ('http://[fd12::5]/x'), ('http://[::ffff:10.0.0.1]/x'),
    ('http://172.32.0.1/x'), ('https://hooks.example.com/x')
  ) v(url);
-- Listing opens a reserved range only from inside it; names never do.
SELECT url, allowed, pg_temp.try(format('SELECT callback_center._check_destination(%L, %L)', url, allowed))
  FROM (VALUES
    ('http://127.0.0.1:8080/x',        '127.0.0.1'),
    ('http://127.0.0.1:8080/x',        '0.0.0.0/0, ::/0'),
    ('http://10.1.2.3/x',              '10.0.0.0/8'),
    ('http://10.1.2.3/x',              '0.0.0.0/0'),
    ('http://[fd12::5]/x',             'fc00::/7'),
    ('http://203.0.113.7/x',           '0.0.0.0/0, ::/0'),
    ('http://127.0.0.1/x',             'localhost'),
    ('http://localhost/x',             'localhost')
  ) v(url, allowed);
-- The check hook refuses malformed lists, naming the entry.
ALTER SYSTEM SET callback_center.allowed_destinations = '10.0.0.0/8, 10.0.0.0/33';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET callback_center.allowed_destinations = '192.168.1.1/16';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET callback_center.allowed_destinations = 'https://hooks.example.com';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET callback_center.allowed_destinations = 'hooks.example.com:443';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET callback_center.allowed_destinations = '10.0.0.256';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET callback_center.allowed_destinations = '*';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- It is reloaded, not set per session.
SET callback_center.allowed_destinations = '10.0.0.0/8';
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- The create-time verdict, under explicit lists.
SELECT url, allowed, pg_temp.try(format('SELECT callback_center._check_destination(%L, %L)', url, allowed))
  FROM (VALUES
    ('http://127.0.0.1:8080/x',        '127.0.0.0/8'),
    ('http://127.0.0.1:8080/x',        '127.0.0.2/32'),
    ('http://127.0.0.1:8080/x',        'hooks.example.com'),
    ('http://203.0.113.7:8080/x',      '10.0.0.0/8'),
    ('http://203.0.113.7:8080/x',      '203.0.113.0/24'),
    ('https://[::1]:8443/x',           '::1'),
    ('https://[::1]:8443/x',           'fd00::/8'),
    ('https://[fd12::5]/x',            'fd00::/8'),
    ('https://hooks.example.com/x',    'hooks.example.com'),
    ('https://HOOKS.example.com/x',    'hooks.example.com'),
    ('https://a.hooks.example.com/x',  '*.example.com'),
    ('https://example.com/x',          '*.example.com'),
    ('https://erp.example.net/x',      'hooks.example.com'),
    ('https://erp.example.net/x',      'hooks.example.com, 10.0.0.0/8'),
    ('https://erp.example.net/x',      '')
  ) v(url, allowed);

-- The message in full.
SELECT callback_center._check_destination('http://127.0.0.1:8080/x', '127.0.0.2/32');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT callback_center._check_destination('https://erp.example.net/x', 'hooks.example.com');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT callback_center._check_destination('http://127.0.0.1/x', '10.0.0.0/33');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT callback_center._check_destination(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- URLs are judged by the parse the delivery makes (libcurl's), not by a
-- second parser: what libcurl refuses cannot become an endpoint, and the
-- host checked is the host connected to.
SELECT url, pg_temp.try(format('SELECT callback_center._check_url(%L)', url))
  FROM (VALUES
    ('http://a%20b/x'), ('http://[1:2]/x'), ('http://x.example\evil/x'),
    ('http://x.example%3A99/x'), ('http://exa%00mple.com/x'),
    ('https:///x'), ('http://x.example\@127.0.0.1/x'),
    ('http://2130706433/x'), ('http://127.0.0.1:0/x'), ('HTTPS://X.Example/x'),
    ('http://127.0.0.1:8080/x'), ('http://[::1]:9/x')
  ) v(url);
SELECT callback_center._check_url('http://[1:2]/x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- create_endpoint and alter_endpoint go through it (the list here is
-- 127.0.0.1 and ::1; the URL rules still apply).
SELECT callback_center.create_endpoint('al_one', 'http://127.0.0.1:9/one', '{al.ev}') > 0 AS created;
SELECT callback_center.alter_endpoint('al_one', '{"url": "https://[::1]:9/one"}');
SELECT pg_temp.try($$SELECT callback_center.alter_endpoint('al_one', '{"url": "ftp://127.0.0.1/one"}')$$);
SELECT url FROM callback_center.endpoint_config WHERE name = 'al_one';
SELECT callback_center.drop_endpoint('al_one');

-- Not for the application or PUBLIC.
SELECT has_function_privilege('callback_center_app', 'callback_center._check_destination(text, text)', 'EXECUTE') AS app_may,
       has_function_privilege('callback_center_admin', 'callback_center._check_destination(text, text)', 'EXECUTE') AS admin_may;
