
-- HTTP probe (src/http_probe.c over src/http.c): POSTs a body to URLs from
-- SQL with the worker's HTTP layer, to test a receiver by hand.  Admin only:
-- it makes the server open connections to any http(s) address.
CREATE FUNCTION callback_center.http_probe(
    urls text[],
    request_body text DEFAULT '{}',
    headers text[] DEFAULT '{}',
    timeout_ms integer DEFAULT 5000,
    max_concurrent integer DEFAULT 16,
    max_body_bytes integer DEFAULT 65536,
    max_per_host integer DEFAULT NULL)
RETURNS TABLE(
    url text,
    status integer,
    latency_ms double precision,
    body text,
    truncated boolean,
    retry_after_s integer,
    error text)
AS 'MODULE_PATHNAME', 'cc_http_probe'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION callback_center.http_probe(text[], text, text[], integer, integer, integer, integer) IS
    'POSTs request_body to every URL concurrently, as the worker would, and returns one row per URL';

REVOKE ALL ON FUNCTION callback_center.http_probe(text[], text, text[], integer, integer, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.http_probe(text[], text, text[], integer, integer, integer, integer)
    TO callback_center_admin;
