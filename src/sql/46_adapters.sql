
-- Payment channels, outbound: the adapter layer (doc/adapters.md).  An
-- endpoint whose format (its option "format", set by create_endpoint or
-- alter_endpoint) is a provider's (wechatpay_v3, alipay, unionpay) receives
-- payment.query, payment.close, refund.request and refund.query events as
-- that provider's own API calls: the delivery worker's claim builds each
-- request here (_adapter_request: method, URL, headers, body,
-- signed with the merchant's private key, fresh for every attempt), the
-- worker sends it, checks the response here (_adapter_check: the
-- provider's signature, then the answer normalized), and records the
-- normalized answer with the attempt (_adapter_record, provider_answers).
-- A response whose signature does not verify is a failed attempt, retried
-- on the endpoint's schedule.  The jobs worker applies the answers
-- (apply_provider_answers, 90_jobs.sql).
--
-- Where the material lives (nothing of it readable by the application, the
-- private key readable by nobody but the extension's owner):
--   merchant_settings   the merchant's id (WeChat Pay mchid, Alipay app_id,
--                       UnionPay merId), RSA private key, certificate serial
--                       (WeChat Pay serial_no, UnionPay certId), options
--   provider_keys and providers.secrets (45_channels.sql) verify answers:
--                       WeChat Pay platform keys, the Alipay public key,
--                       UnionPay's root certificates

-- The merchant's side of a provider, for outbound calls.  Loaded by
-- set_merchant (admin); private_key is read only by _merchant_sign
-- (src/merchant.c), never returned by any function.
CREATE TABLE callback_center.merchant_settings (
    provider    text PRIMARY KEY REFERENCES callback_center.providers (name)
                ON DELETE CASCADE ON UPDATE CASCADE,
    merchant_id text NOT NULL CHECK (merchant_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    private_key text NOT NULL,
    key_bits    integer NOT NULL CHECK (key_bits >= 2048),
    key_serial  text CHECK (key_serial ~ '^[A-Za-z0-9]{1,128}$'),
    options     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE callback_center.merchant_settings IS
    'Merchant ids, private keys and certificate serials for outbound provider calls; readable by the owner only';
SELECT pg_catalog.pg_extension_config_dump('callback_center.merchant_settings', '');
REVOKE ALL ON callback_center.merchant_settings FROM PUBLIC;

-- The merchant settings without the private key (admin).
CREATE VIEW callback_center.merchants AS
    SELECT m.provider, p.scheme AS format, m.merchant_id, m.key_serial, m.key_bits,
           m.options, m.updated_at
      FROM callback_center.merchant_settings m
      JOIN callback_center.providers p ON p.name = m.provider;
REVOKE ALL ON callback_center.merchants FROM PUBLIC;
GRANT SELECT ON callback_center.merchants TO callback_center_admin;

-- Every answer a provider gave to an outbound call (or the worker's giving
-- up on it), normalized, one row per event: kept in the transaction that
-- records the attempt, applied once by the jobs worker (applied_at,
-- outcome).  answer: see doc/adapters.md ("Normalized answers").
CREATE TABLE callback_center.provider_answers (
    outbox_id    bigint PRIMARY KEY,
    endpoint_id  integer NOT NULL,
    provider     text,
    event_type   text NOT NULL,
    aggregate_id text NOT NULL,
    attempt      integer NOT NULL,
    http_status  integer,
    answer       jsonb NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    applied_at   timestamptz,
    outcome      text
);
COMMENT ON TABLE callback_center.provider_answers IS
    'Normalized answers of payment providers to outbound calls, and how they were applied';
CREATE INDEX provider_answers_pending ON callback_center.provider_answers (outbox_id)
    WHERE applied_at IS NULL;
SELECT pg_catalog.pg_extension_config_dump('callback_center.provider_answers', '');
REVOKE ALL ON callback_center.provider_answers FROM PUBLIC;
GRANT SELECT ON callback_center.provider_answers TO callback_center_admin;

-- The C helpers (src/merchant.c).
CREATE FUNCTION callback_center._merchant_key_bits(private_key text)
RETURNS integer
AS 'MODULE_PATHNAME', 'cc_merchant_key_bits'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._merchant_sign(provider text, data bytea)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_merchant_sign'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._adapter_nonce()
RETURNS text
AS 'MODULE_PATHNAME', 'cc_adapter_nonce'
LANGUAGE C VOLATILE;

-- Loads the merchant's side of a payment provider (admin): merchant_id
-- (WeChat Pay mchid, Alipay app_id, UnionPay merId), the merchant's RSA
-- private key (PEM, unencrypted, 2048 bits or more), key_serial (the
-- serial of the merchant API certificate for WeChat Pay, the certId of the
-- signing certificate for UnionPay; none for Alipay) and options
-- (notify_url: WeChat Pay's refund notification URL; back_url: UnionPay's
-- backUrl; Alipay's certificate mode: app_cert_sn and
-- alipay_root_cert_sn, sent with every request).  Replaces what was
-- loaded.  Refused, with nothing written: 22004 NULL, CB033 unknown
-- provider, 22023 a provider whose scheme has no outbound API, a bad
-- merchant id, key (detail says why, never quoting it), serial or option.
CREATE FUNCTION callback_center.set_merchant(provider text, merchant_id text,
    private_key text, key_serial text DEFAULT NULL, options jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    bits integer;
    opt record;
BEGIN
    PERFORM callback_center._require(set_merchant.provider, 'provider');
    PERFORM callback_center._require(set_merchant.merchant_id, 'merchant_id');
    PERFORM callback_center._require(set_merchant.private_key, 'private_key');
    PERFORM callback_center._require(set_merchant.options, 'options');
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = set_merchant.provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_merchant.provider);
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'alipay', 'unionpay') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('provider "%s" has scheme %s, which has no outbound API',
                             set_merchant.provider, v_scheme),
            HINT = 'Merchant settings are for wechatpay_v3, alipay and unionpay providers.';
    END IF;
    IF set_merchant.merchant_id !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'invalid merchant id',
            DETAIL = 'A merchant id is 1 to 64 letters, digits, "_", "." or "-".';
    END IF;
    bits := callback_center._merchant_key_bits(set_merchant.private_key);
    IF v_scheme IN ('wechatpay_v3', 'unionpay') AND set_merchant.key_serial IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('a %s merchant needs key_serial', v_scheme),
            DETAIL = CASE WHEN v_scheme = 'wechatpay_v3'
                          THEN 'WeChat Pay names the merchant API certificate by its serial number (serial_no).'
                          ELSE 'UnionPay names the signing certificate by its certId.' END;
    END IF;
    IF v_scheme = 'alipay' AND set_merchant.key_serial IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'an alipay merchant takes no key_serial',
            DETAIL = 'Alipay public-key mode names the application by app_id only.';
    END IF;
    IF set_merchant.key_serial !~ '^[A-Za-z0-9]{1,128}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'invalid key serial',
            DETAIL = 'A certificate serial or certId is 1 to 128 letters or digits.';
    END IF;
    IF jsonb_typeof(set_merchant.options) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'options must be a JSON object';
    END IF;
    FOR opt IN SELECT o.key, o.value FROM jsonb_each(set_merchant.options) o LOOP
        IF NOT ((v_scheme = 'wechatpay_v3' AND opt.key = 'notify_url')
                OR (v_scheme = 'unionpay' AND opt.key = 'back_url')
                OR (v_scheme = 'alipay' AND opt.key IN ('app_cert_sn', 'alipay_root_cert_sn'))) THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = format('unknown option "%s" for %s merchants', opt.key, v_scheme),
                HINT = 'wechatpay_v3 takes notify_url, unionpay back_url, alipay (certificate mode) app_cert_sn and alipay_root_cert_sn.';
        END IF;
        IF opt.key IN ('app_cert_sn', 'alipay_root_cert_sn') THEN
            -- SNs: hex MD5s, several joined by "_" for the root.
            IF jsonb_typeof(opt.value) <> 'string'
               OR (opt.value #>> '{}') !~ '^[0-9a-f]{32}(_[0-9a-f]{32})*$' THEN
                RAISE EXCEPTION USING ERRCODE = '22023',
                    MESSAGE = format('invalid option "%s"', opt.key),
                    DETAIL = 'The value is an Alipay certificate SN (callback_center.alipay_cert_sn() of the certificate, alipay_root_cert_sn() of the root file).';
            END IF;
        ELSIF jsonb_typeof(opt.value) <> 'string' OR length(opt.value #>> '{}') > 2048
           OR (opt.value #>> '{}') !~ '^https?://[^[:space:][:cntrl:]]+$' THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = format('invalid option "%s"', opt.key),
                DETAIL = 'The value is an http:// or https:// URL of at most 2048 characters.';
        END IF;
    END LOOP;
    INSERT INTO callback_center.merchant_settings AS m
           (provider, merchant_id, private_key, key_bits, key_serial, options)
    VALUES (set_merchant.provider, set_merchant.merchant_id, set_merchant.private_key, bits,
            set_merchant.key_serial, set_merchant.options)
    ON CONFLICT ON CONSTRAINT merchant_settings_pkey DO UPDATE
       SET merchant_id = excluded.merchant_id, private_key = excluded.private_key,
           key_bits = excluded.key_bits, key_serial = excluded.key_serial,
           options = excluded.options, updated_at = now();
END
$$;

-- s percent-encoded as RFC 3986 asks of a URL component or form value
-- (UTF-8; unreserved characters kept).
CREATE FUNCTION callback_center._url_encode(s text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    b bytea := convert_to(s, 'UTF8');
    out text := '';
    c integer;
    i integer;
BEGIN
    FOR i IN 0 .. length(b) - 1 LOOP
        c := get_byte(b, i);
        IF (c BETWEEN 48 AND 57) OR (c BETWEEN 65 AND 90) OR (c BETWEEN 97 AND 122)
           OR c IN (45, 46, 95, 126) THEN
            out := out || chr(c);
        ELSE
            out := out || '%' || upper(lpad(to_hex(c), 2, '0'));
        END IF;
    END LOOP;
    RETURN out;
END
$$;

-- cents as the decimal yuan string Alipay and the like expect ("88.88").
CREATE FUNCTION callback_center._yuan(cents bigint)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, callback_center
AS $$
    SELECT to_char(cents / 100.0, 'FM999999999999990.00')
$$;

-- The request of one event to a provider-format endpoint, as the delivery
-- worker sends it (the text of _adapter_http).  Signed now with the
-- merchant's key, so every attempt (every claim) carries a fresh timestamp
-- and nonce.  Raises, and the worker makes the event dead with the
-- message: CB070 the provider has no merchant settings, CB071 the
-- provider's scheme is not the endpoint's format, CB072 an event type the
-- format does not send.
CREATE FUNCTION callback_center._adapter_request(endpoint_id integer, event_type text,
    aggregate_id text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ep record;
    m callback_center.merchant_settings;
    v_provider text := _adapter_request.payload->>'provider';
    v_scheme text;
BEGIN
    SELECT e.url, e.format INTO ep FROM callback_center.endpoints e WHERE e.id = _adapter_request.endpoint_id;
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p WHERE p.name = v_provider;
    SELECT * INTO m FROM callback_center.merchant_settings x WHERE x.provider = v_provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB070',
            MESSAGE = format('provider "%s" has no merchant settings', v_provider),
            HINT = 'An administrator loads them with callback_center.set_merchant().';
    END IF;
    IF v_scheme IS DISTINCT FROM ep.format THEN
        RAISE EXCEPTION USING ERRCODE = 'CB071',
            MESSAGE = format('provider "%s" has scheme %s, the endpoint format %s',
                             v_provider, v_scheme, ep.format);
    END IF;
    IF ep.format = 'wechatpay_v3' THEN
        RETURN callback_center._wechatpay_v3_request(ep.url, m, _adapter_request.event_type, _adapter_request.payload);
    ELSIF ep.format = 'alipay' THEN
        RETURN callback_center._alipay_request(ep.url, m, _adapter_request.event_type, _adapter_request.payload);
    ELSIF ep.format = 'unionpay' THEN
        RETURN callback_center._unionpay_request(ep.url, m, _adapter_request.event_type, _adapter_request.payload);
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'CB071',
        MESSAGE = format('endpoint format %s has no adapter', ep.format);
END
$$;

-- The "unsupported event" error of a format.
CREATE FUNCTION callback_center._adapter_unsupported(format text, event_type text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'CB072',
        MESSAGE = format('event type "%s" cannot be sent to a %s endpoint', _adapter_unsupported.event_type, _adapter_unsupported.format),
        HINT = 'Provider endpoints take payment.query, payment.close, refund.request and refund.query.';
END
$$;

-- A request as the delivery worker sends it (src/adapter.c reads it):
-- "METHOD URL", one "Name: value" line per header, an empty line, then the
-- body, byte for byte as it was signed.
CREATE FUNCTION callback_center._adapter_http(method text, url text, headers text[], body text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT _adapter_http.method || ' ' || _adapter_http.url || E'\n'
        || coalesce((SELECT string_agg(h.line || E'\n', '' ORDER BY h.n)
                       FROM unnest(_adapter_http.headers) WITH ORDINALITY AS h(line, n)), '')
        || E'\n' || _adapter_http.body
$$;

-- A signed form POST (Alipay, UnionPay).  The fields whose value is not
-- empty, sorted by name (bytewise), as "k=v&...", are signed with the
-- merchant key of provider (with digest, their hex SHA-256: UnionPay signs
-- the digest); the signature is added as the field sign_field, and the
-- body is the same fields and the signature, sorted, values percent-encoded.
CREATE FUNCTION callback_center._adapter_form_post(url text, provider text, fields jsonb,
    sign_field text, digest boolean, content_type text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    f jsonb := _adapter_form_post.fields;
    signed bytea;
    body text;
BEGIN
    SELECT convert_to(string_agg(x.key || '=' || (x.value #>> '{}'), '&' ORDER BY x.key COLLATE "C"), 'UTF8')
      INTO signed FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    IF _adapter_form_post.digest THEN
        signed := convert_to(encode(sha256(signed), 'hex'), 'UTF8');
    END IF;
    f := f || jsonb_build_object(_adapter_form_post.sign_field,
                                 callback_center._merchant_sign(_adapter_form_post.provider, signed));
    SELECT string_agg(x.key || '=' || callback_center._url_encode(x.value #>> '{}'), '&'
                      ORDER BY x.key COLLATE "C")
      INTO body FROM jsonb_each(f) x WHERE (x.value #>> '{}') <> '';
    RETURN callback_center._adapter_http('POST', _adapter_form_post.url,
        ARRAY['Content-Type: ' || _adapter_form_post.content_type], body);
END
$$;

-- WeChat Pay APIv3: JSON over HTTPS, Authorization WECHATPAY2-SHA256-RSA2048
-- over "METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n" by the merchant key.
CREATE FUNCTION callback_center._wechatpay_v3_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    base text := rtrim(_wechatpay_v3_request.url, '/');
    method text;
    path text;
    body text := '';
    full_url text;
    signed_path text;
    ts text := extract(epoch FROM clock_timestamp())::bigint::text;
    nonce text := callback_center._adapter_nonce();
    sig text;
    req jsonb;
BEGIN
    IF _wechatpay_v3_request.event_type = 'payment.query' THEN
        method := 'GET';
        path := '/v3/pay/transactions/out-trade-no/'
                || callback_center._url_encode(_wechatpay_v3_request.payload->>'order_id')
                || '?mchid=' || callback_center._url_encode(m.merchant_id);
    ELSIF _wechatpay_v3_request.event_type = 'payment.close' THEN
        method := 'POST';
        path := '/v3/pay/transactions/out-trade-no/'
                || callback_center._url_encode(_wechatpay_v3_request.payload->>'order_id') || '/close';
        body := jsonb_build_object('mchid', m.merchant_id)::text;
    ELSIF _wechatpay_v3_request.event_type = 'refund.request' THEN
        method := 'POST';
        path := '/v3/refund/domestic/refunds';
        req := jsonb_build_object(
            'out_trade_no', _wechatpay_v3_request.payload->>'order_id',
            'out_refund_no', _wechatpay_v3_request.payload->>'refund_id',
            'amount', jsonb_build_object('refund', (_wechatpay_v3_request.payload->>'amount_cents')::bigint,
                                         'total', (_wechatpay_v3_request.payload->>'total_cents')::bigint,
                                         'currency', coalesce(_wechatpay_v3_request.payload->>'currency', 'CNY')));
        IF _wechatpay_v3_request.payload->>'provider_txn_id' IS NOT NULL THEN
            req := req || jsonb_build_object('transaction_id', _wechatpay_v3_request.payload->>'provider_txn_id');
        END IF;
        IF _wechatpay_v3_request.payload->>'reason' IS NOT NULL THEN
            req := req || jsonb_build_object('reason', left(_wechatpay_v3_request.payload->>'reason', 80));
        END IF;
        IF m.options->>'notify_url' IS NOT NULL THEN
            req := req || jsonb_build_object('notify_url', m.options->>'notify_url');
        END IF;
        body := req::text;
    ELSIF _wechatpay_v3_request.event_type = 'refund.query' THEN
        method := 'GET';
        path := '/v3/refund/domestic/refunds/' || callback_center._url_encode(_wechatpay_v3_request.payload->>'refund_id');
    ELSE
        PERFORM callback_center._adapter_unsupported('wechatpay_v3', _wechatpay_v3_request.event_type);
    END IF;
    full_url := base || path;
    -- The signed path is the request URL's absolute path with its query.
    signed_path := coalesce(substring(full_url FROM '^[A-Za-z]+://[^/?#]+(/[^#]*)$'), path);
    sig := callback_center._merchant_sign(m.provider,
        convert_to(method || E'\n' || signed_path || E'\n' || ts || E'\n' || nonce || E'\n'
                   || body || E'\n', 'UTF8'));
    RETURN callback_center._adapter_http(method, full_url,
        ARRAY[format('Authorization: WECHATPAY2-SHA256-RSA2048 mchid="%s",nonce_str="%s",signature="%s",timestamp="%s",serial_no="%s"',
                     m.merchant_id, nonce, sig, ts, m.key_serial),
              'Accept: application/json',
              'Content-Type: application/json'],
        body);
END
$$;

-- Alipay OpenAPI: a form POST to the gateway of app_id, method, format,
-- charset, sign_type RSA2, timestamp (Beijing time), version and
-- biz_content, signed over "k=v&..." of every non-empty parameter but
-- sign, sorted by name.
CREATE FUNCTION callback_center._alipay_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    api text;
    biz jsonb;
    params jsonb;
BEGIN
    IF _alipay_request.event_type = 'payment.query' THEN
        api := 'alipay.trade.query';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id');
    ELSIF _alipay_request.event_type = 'payment.close' THEN
        api := 'alipay.trade.close';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id');
    ELSIF _alipay_request.event_type = 'refund.request' THEN
        api := 'alipay.trade.refund';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id',
                                  'out_request_no', _alipay_request.payload->>'refund_id',
                                  'refund_amount',
                                  callback_center._yuan((_alipay_request.payload->>'amount_cents')::bigint));
        IF _alipay_request.payload->>'reason' IS NOT NULL THEN
            biz := biz || jsonb_build_object('refund_reason', left(_alipay_request.payload->>'reason', 256));
        END IF;
    ELSIF _alipay_request.event_type = 'refund.query' THEN
        api := 'alipay.trade.fastpay.refund.query';
        biz := jsonb_build_object('out_trade_no', _alipay_request.payload->>'order_id',
                                  'out_request_no', _alipay_request.payload->>'refund_id');
    ELSE
        PERFORM callback_center._adapter_unsupported('alipay', _alipay_request.event_type);
    END IF;
    params := jsonb_build_object(
        'app_id', m.merchant_id, 'method', api, 'format', 'JSON', 'charset', 'utf-8',
        'sign_type', 'RSA2', 'version', '1.0', 'biz_content', biz::text,
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'Asia/Shanghai',
                             'YYYY-MM-DD HH24:MI:SS'));
    -- Certificate mode: the application's and Alipay's root certificate SNs.
    params := params || jsonb_strip_nulls(jsonb_build_object(
        'app_cert_sn', m.options->>'app_cert_sn',
        'alipay_root_cert_sn', m.options->>'alipay_root_cert_sn'));
    RETURN callback_center._adapter_form_post(_alipay_request.url, m.provider, params, 'sign', false,
        'application/x-www-form-urlencoded;charset=utf-8');
END
$$;

-- UnionPay names a transaction by orderId and txnTime together: a refund's
-- txnTime is the time the refund was made, in Beijing time, the same in
-- every attempt of its request and in its queries (a query with another
-- txnTime finds nothing).
CREATE FUNCTION callback_center._unionpay_refund_time(refund_id text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    -- plpgsql: refunds (62_refunds.sql) is created after this piece.
    RETURN to_char(coalesce((SELECT r.created_at FROM callback_center.refunds r
                              WHERE r.refund_id = _unionpay_refund_time.refund_id),
                            clock_timestamp()) AT TIME ZONE 'Asia/Shanghai',
                   'YYYYMMDDHH24MISS');
END
$$;
REVOKE ALL ON FUNCTION callback_center._unionpay_refund_time(text) FROM PUBLIC;

-- UnionPay acp 5.1.0 back-channel requests: a form POST of sorted k=v
-- fields, signMethod 01, certId of the merchant's signing certificate and
-- signature = base64(SHA256withRSA(hex(SHA-256("k=v&..." sorted)))).  A
-- query goes to /gateway/api/queryTrans.do, a refund to
-- /gateway/api/backTransReq.do under the endpoint's URL.  UnionPay has no
-- close of an unpaid order (an order ends at its payTimeout), so no
-- payment.close is ever sent to a unionpay endpoint (90_jobs.sql).
CREATE FUNCTION callback_center._unionpay_request(url text,
    m callback_center.merchant_settings, event_type text, payload jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    base text := rtrim(_unionpay_request.url, '/');
    path text;
    f jsonb;
    started timestamptz;
BEGIN
    f := jsonb_build_object('version', '5.1.0', 'encoding', 'UTF-8', 'signMethod', '01',
                            'certId', m.key_serial, 'merId', m.merchant_id, 'accessType', '0');
    IF _unionpay_request.event_type = 'payment.query' THEN
        -- The order is named by orderId and the txnTime it was sent with:
        -- the time its payment started (start_payment), in Beijing time.
        SELECT p.updated_at INTO started FROM callback_center.payments p
         WHERE p.order_id = _unionpay_request.payload->>'order_id';
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'order_id',
                                     'txnTime', to_char(coalesce(started, clock_timestamp())
                                                        AT TIME ZONE 'Asia/Shanghai',
                                                        'YYYYMMDDHH24MISS'));
    ELSIF _unionpay_request.event_type = 'refund.request' THEN
        path := '/gateway/api/backTransReq.do';
        f := f || jsonb_build_object('txnType', '04', 'txnSubType', '00', 'bizType', '000201',
                                     'channelType', '07', 'currencyCode', '156',
                                     'orderId', _unionpay_request.payload->>'refund_id',
                                     'txnTime', callback_center._unionpay_refund_time(
                                                    _unionpay_request.payload->>'refund_id'),
                                     'origQryId', _unionpay_request.payload->>'provider_txn_id',
                                     'txnAmt', (_unionpay_request.payload->>'amount_cents')::bigint::text);
        IF m.options->>'back_url' IS NOT NULL THEN
            f := f || jsonb_build_object('backUrl', m.options->>'back_url');
        END IF;
    ELSIF _unionpay_request.event_type = 'refund.query' THEN
        path := '/gateway/api/queryTrans.do';
        f := f || jsonb_build_object('txnType', '00', 'txnSubType', '00', 'bizType', '000000',
                                     'orderId', _unionpay_request.payload->>'refund_id',
                                     'txnTime', callback_center._unionpay_refund_time(
                                                    _unionpay_request.payload->>'refund_id'));
    ELSE
        PERFORM callback_center._adapter_unsupported('unionpay', _unionpay_request.event_type);
    END IF;
    RETURN callback_center._adapter_form_post(base || path, m.provider, f, 'signature', true,
        'application/x-www-form-urlencoded;charset=UTF-8');
END
$$;

-- A normalized answer to a payment.query (doc/adapters.md, "Normalized
-- answers"): status paid, unpaid, closed or failed, with what the
-- provider said.
CREATE FUNCTION callback_center._adapter_payment_answer(status text, provider_status text,
    txn_id text, amount_cents bigint, currency text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT jsonb_build_object('status', _adapter_payment_answer.status,
                              'provider_status', _adapter_payment_answer.provider_status,
                              'txn_id', _adapter_payment_answer.txn_id,
                              'amount_cents', _adapter_payment_answer.amount_cents,
                              'currency', _adapter_payment_answer.currency)
$$;

-- A normalized answer to a refund.* event, the refunds' contract
-- (_apply_refund_answer, 62_refunds.sql): the event's refund_id, status
-- success, processing, failed or unknown.
CREATE FUNCTION callback_center._adapter_refund_answer(payload jsonb, status text,
    provider_refund_id text, amount_cents bigint, error text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT jsonb_build_object('refund_id', _adapter_refund_answer.payload->>'refund_id',
                              'status', _adapter_refund_answer.status,
                              'provider_refund_id', _adapter_refund_answer.provider_refund_id,
                              'amount_cents', _adapter_refund_answer.amount_cents,
                              'error', _adapter_refund_answer.error)
$$;

-- The normalized answer for an event type: payment.* {status, ...} with
-- status error, refund.* the refunds' contract with status unknown.
CREATE FUNCTION callback_center._adapter_error_answer(event_type text, payload jsonb,
    error text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT CASE WHEN _adapter_error_answer.event_type LIKE 'refund.%'
                THEN callback_center._adapter_refund_answer(_adapter_error_answer.payload, 'unknown',
                                                            NULL, NULL, _adapter_error_answer.error)
                ELSE jsonb_build_object('status', 'error', 'error', _adapter_error_answer.error) END
$$;

-- A WeChat Pay APIv3 answer, normalized (its signature already checked).
-- payment.query: trade_state SUCCESS -> paid; NOTPAY, USERPAYING -> unpaid;
-- CLOSED, REVOKED -> closed; PAYERROR -> failed; REFUND -> paid (it was
-- paid); 404 ORDER_NOT_EXIST -> not_found.  payment.close: 204 -> closed.
-- refund.*: status SUCCESS -> success; PROCESSING, ABNORMAL -> processing;
-- CLOSED -> failed.  Any other
-- answer (a 4xx with code and message) -> error.
CREATE FUNCTION callback_center._wechatpay_v3_answer(event_type text, payload jsonb,
    status integer, body text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    j jsonb;
    st text;
BEGIN
    IF _wechatpay_v3_answer.body <> '' THEN
        j := _wechatpay_v3_answer.body::jsonb;
    END IF;
    IF _wechatpay_v3_answer.status NOT BETWEEN 200 AND 299 THEN
        IF _wechatpay_v3_answer.event_type = 'payment.query' AND j->>'code' = 'ORDER_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', j->>'code');
        END IF;
        RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
            format('HTTP %s %s: %s', _wechatpay_v3_answer.status, j->>'code', j->>'message'));
    END IF;
    IF _wechatpay_v3_answer.event_type = 'payment.query' THEN
        IF j->>'out_trade_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about order "%s"', j->>'out_trade_no'));
        END IF;
        st := CASE j->>'trade_state'
                WHEN 'SUCCESS' THEN 'paid' WHEN 'REFUND' THEN 'paid'
                WHEN 'NOTPAY' THEN 'unpaid' WHEN 'USERPAYING' THEN 'unpaid'
                WHEN 'CLOSED' THEN 'closed' WHEN 'REVOKED' THEN 'closed'
                WHEN 'PAYERROR' THEN 'failed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('unknown trade_state "%s"', j->>'trade_state'));
        END IF;
        RETURN callback_center._adapter_payment_answer(st, j->>'trade_state', j->>'transaction_id',
                                                       (j->'amount'->>'total')::bigint,
                                                       j->'amount'->>'currency');
    ELSIF _wechatpay_v3_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSE
        IF j->>'out_refund_no' IS DISTINCT FROM _wechatpay_v3_answer.payload->>'refund_id' THEN
            RETURN callback_center._adapter_error_answer(_wechatpay_v3_answer.event_type, _wechatpay_v3_answer.payload,
                format('the answer is about refund "%s"', j->>'out_refund_no'));
        END IF;
        RETURN callback_center._adapter_refund_answer(_wechatpay_v3_answer.payload,
            CASE j->>'status' WHEN 'SUCCESS' THEN 'success'
                              WHEN 'PROCESSING' THEN 'processing'
                              -- not final: the merchant platform settles it
                              -- (a failed refund's amount could be refunded
                              -- again)
                              WHEN 'ABNORMAL' THEN 'processing'
                              WHEN 'CLOSED' THEN 'failed' ELSE 'unknown' END,
            j->>'refund_id', (j->'amount'->>'refund')::bigint,
            CASE WHEN j->>'status' IN ('SUCCESS', 'PROCESSING') THEN NULL ELSE j->>'status' END);
    END IF;
END
$$;

-- The value of node in an Alipay response, as the exact bytes Alipay
-- signed: the JSON object after "node": up to its matching brace (strings
-- and their escapes skipped), whatever members follow it (sign,
-- alipay_cert_sn); NULL when the body has no such object.
CREATE FUNCTION callback_center._alipay_node_text(body text, node text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    start integer := strpos(_alipay_node_text.body, '"' || _alipay_node_text.node || '":');
    i integer;
    n integer := length(_alipay_node_text.body);
    c text;
    depth integer := 0;
    in_string boolean := false;
BEGIN
    IF start = 0 THEN
        RETURN NULL;
    END IF;
    i := start + length(_alipay_node_text.node) + 3;
    WHILE i <= n AND substr(_alipay_node_text.body, i, 1) IN (' ', E'\t', E'\n', E'\r') LOOP
        i := i + 1;
    END LOOP;
    IF substr(_alipay_node_text.body, i, 1) <> '{' THEN
        RETURN NULL;
    END IF;
    start := i;
    WHILE i <= n LOOP
        c := substr(_alipay_node_text.body, i, 1);
        IF in_string THEN
            IF c = '\' THEN
                i := i + 1;
            ELSIF c = '"' THEN
                in_string := false;
            END IF;
        ELSIF c = '"' THEN
            in_string := true;
        ELSIF c = '{' THEN
            depth := depth + 1;
        ELSIF c = '}' THEN
            depth := depth - 1;
            IF depth = 0 THEN
                RETURN substr(_alipay_node_text.body, start, i - start + 1);
            END IF;
        END IF;
        i := i + 1;
    END LOOP;
    RETURN NULL;
END
$$;

-- An Alipay answer, normalized (its signature already checked).  code
-- 10000 is success; 40004 with sub_code ACQ.TRADE_NOT_EXIST to a query is
-- not_found; any other code an error.  trade_status TRADE_SUCCESS and
-- TRADE_FINISHED -> paid, WAIT_BUYER_PAY -> unpaid, TRADE_CLOSED -> closed.
-- A refund: fund_change Y (or a refund query's refund_status
-- REFUND_SUCCESS) -> success, else processing.
CREATE FUNCTION callback_center._alipay_answer(event_type text, payload jsonb,
    node jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    st text;
BEGIN
    IF _alipay_answer.node->>'code' IS DISTINCT FROM '10000' THEN
        IF _alipay_answer.event_type = 'payment.query' AND _alipay_answer.node->>'sub_code' = 'ACQ.TRADE_NOT_EXIST' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', _alipay_answer.node->>'sub_code');
        END IF;
        RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
            format('%s %s: %s', _alipay_answer.node->>'code', _alipay_answer.node->>'sub_code',
                   coalesce(_alipay_answer.node->>'sub_msg', _alipay_answer.node->>'msg')));
    END IF;
    IF _alipay_answer.event_type = 'payment.query' THEN
        IF _alipay_answer.node->>'out_trade_no' IS DISTINCT FROM _alipay_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('the answer is about order "%s"', _alipay_answer.node->>'out_trade_no'));
        END IF;
        st := CASE _alipay_answer.node->>'trade_status'
                WHEN 'TRADE_SUCCESS' THEN 'paid' WHEN 'TRADE_FINISHED' THEN 'paid'
                WHEN 'WAIT_BUYER_PAY' THEN 'unpaid' WHEN 'TRADE_CLOSED' THEN 'closed' END;
        IF st IS NULL THEN
            RETURN callback_center._adapter_error_answer(_alipay_answer.event_type, _alipay_answer.payload,
                format('unknown trade_status "%s"', _alipay_answer.node->>'trade_status'));
        END IF;
        RETURN callback_center._adapter_payment_answer(st, _alipay_answer.node->>'trade_status',
            _alipay_answer.node->>'trade_no',
            round((_alipay_answer.node->>'total_amount')::numeric * 100)::bigint, 'CNY');
    ELSIF _alipay_answer.event_type = 'payment.close' THEN
        RETURN jsonb_build_object('status', 'closed');
    ELSIF _alipay_answer.event_type = 'refund.request' THEN
        -- Alipay gives a refund no id (trade_no is the payment's), and
        -- refund_fee is the trade's total refunded, not this refund's.
        RETURN callback_center._adapter_refund_answer(_alipay_answer.payload,
            CASE WHEN _alipay_answer.node->>'fund_change' = 'Y' THEN 'success' ELSE 'processing' END,
            NULL, NULL, NULL);
    ELSE
        RETURN callback_center._adapter_refund_answer(_alipay_answer.payload,
            CASE WHEN _alipay_answer.node->>'refund_status' = 'REFUND_SUCCESS' THEN 'success'
                 ELSE 'processing' END,
            NULL, round((_alipay_answer.node->>'refund_amount')::numeric * 100)::bigint, NULL);
    END IF;
END
$$;

-- A UnionPay answer, normalized (its signature already checked).  A query:
-- respCode 00 and origRespCode 00 -> paid, origRespCode 03/04/05 ->
-- unpaid (still processing), another origRespCode -> failed; respCode 34
-- (no such transaction) -> not_found.  A refund request: respCode 00 ->
-- processing (the result comes in the notification).  A refund query:
-- origRespCode 00 -> success, 03/04/05 -> processing, else failed.
CREATE FUNCTION callback_center._unionpay_answer(event_type text, payload jsonb,
    f jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    orig text := f->>'origRespCode';
BEGIN
    IF _unionpay_answer.event_type = 'payment.query' THEN
        IF f->>'respCode' = '34' THEN
            RETURN jsonb_build_object('status', 'not_found', 'provider_status', '34');
        END IF;
        IF f->>'respCode' IS DISTINCT FROM '00' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('respCode %s: %s', f->>'respCode', f->>'respMsg'));
        END IF;
        IF f->>'orderId' IS DISTINCT FROM _unionpay_answer.payload->>'order_id' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('the answer is about order "%s"', f->>'orderId'));
        END IF;
        RETURN callback_center._adapter_payment_answer(
            CASE WHEN orig = '00' THEN 'paid'
                 WHEN orig IN ('03', '04', '05') THEN 'unpaid' ELSE 'failed' END,
            orig, f->>'queryId', (f->>'txnAmt')::bigint, 'CNY');
    ELSIF _unionpay_answer.event_type = 'refund.request' THEN
        RETURN callback_center._adapter_refund_answer(_unionpay_answer.payload,
            CASE WHEN f->>'respCode' = '00' THEN 'processing' ELSE 'failed' END,
            f->>'queryId', (f->>'txnAmt')::bigint,
            CASE WHEN f->>'respCode' = '00' THEN NULL
                 ELSE format('respCode %s: %s', f->>'respCode', f->>'respMsg') END);
    ELSE
        IF f->>'respCode' IS DISTINCT FROM '00' THEN
            RETURN callback_center._adapter_error_answer(_unionpay_answer.event_type, _unionpay_answer.payload,
                format('respCode %s: %s', f->>'respCode', f->>'respMsg'));
        END IF;
        RETURN callback_center._adapter_refund_answer(_unionpay_answer.payload,
            CASE WHEN orig = '00' THEN 'success'
                 WHEN orig IN ('03', '04', '05') THEN 'processing' ELSE 'failed' END,
            f->>'queryId', (f->>'txnAmt')::bigint,
            CASE WHEN orig IN ('00', '03', '04', '05') THEN NULL
                 ELSE format('origRespCode %s: %s', orig, f->>'origRespMsg') END);
    END IF;
END
$$;

-- A UnionPay back-channel answer (a form, acp 5.1.0, signMethod 01),
-- verified as notifications are (_unionpay_verify).  Unlike a
-- notification an answer need not carry a queryId (respCode 34, no such
-- transaction, names none).  failure is NULL when it verifies, with
-- fields every field decoded; else why not.
CREATE FUNCTION callback_center._unionpay_answer_fields(provider text, secrets text[],
    body text, OUT failure text, OUT fields jsonb)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_unionpay_answer_fields.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body';
        RETURN;
    END IF;
    failure := callback_center._unionpay_verify(_unionpay_answer_fields.provider,
                                                _unionpay_answer_fields.secrets, names, vals);
    IF failure IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT jsonb_object_agg(x.nm, convert_from(x.v, 'UTF8')) INTO fields
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('signature', 'signPubKeyCert');
END
$$;

-- Checks one response of a provider-format endpoint, as the delivery
-- worker judges it (src/delivery.c): ok when the provider's signature
-- verifies (wechatpay_v3: the Wechatpay-* headers, within the provider's
-- timestamp tolerance, and the platform key; alipay: the *_response
-- node's exact bytes and the Alipay public key, or in certificate mode the
-- certificate alipay_cert_sn names, chained to a loaded root; unionpay: as its
-- notifications, signPubKeyCert chained to the loaded root), with answer
-- the normalized answer; else ok false and error why (the attempt failed:
-- retried on the schedule, never applied).  headers are the captured
-- "Name: value" lines.  Never raises.
CREATE FUNCTION callback_center._adapter_check(outbox_id bigint, http_status integer,
    headers text, body text, OUT ok boolean, OUT answer jsonb, OUT error text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ob record;
    pr callback_center.providers;
    h jsonb := '{}';
    line text;
    ts text;
    nonce text;
    sig text;
    serial text;
    key_pem text;
    why text;
    node text;
    parsed jsonb;
    s text;
    up record;
    f jsonb;
    cas text[];
BEGIN
    ok := false;
    SELECT o.event_type, o.payload, e.format INTO ob
      FROM callback_center.outbox o JOIN callback_center.endpoints e ON e.id = o.endpoint_id
     WHERE o.id = _adapter_check.outbox_id;
    IF NOT FOUND THEN
        error := 'the event or its endpoint is gone';
        RETURN;
    END IF;
    SELECT * INTO pr FROM callback_center.providers p WHERE p.name = ob.payload->>'provider';
    IF NOT FOUND THEN
        error := format('provider "%s" is gone', ob.payload->>'provider');
        RETURN;
    END IF;
    BEGIN
        IF ob.format = 'wechatpay_v3' THEN
            FOREACH line IN ARRAY string_to_array(coalesce(_adapter_check.headers, ''), E'\n') LOOP
                CONTINUE WHEN strpos(line, ':') = 0;
                h := h || jsonb_build_object(lower(split_part(line, ':', 1)),
                                             btrim(substr(line, strpos(line, ':') + 1)));
            END LOOP;
            ts := h->>'wechatpay-timestamp';
            nonce := h->>'wechatpay-nonce';
            sig := h->>'wechatpay-signature';
            serial := h->>'wechatpay-serial';
            IF ts IS NULL OR nonce IS NULL OR sig IS NULL OR serial IS NULL THEN
                error := 'the response carries no Wechatpay-Signature, -Timestamp, -Nonce and -Serial';
                RETURN;
            END IF;
            IF ts !~ '^[0-9]{1,12}$' OR abs(extract(epoch FROM now()) - ts::bigint)
               > extract(epoch FROM callback_center._channel_tolerance(pr.tolerance)) THEN
                error := 'the response''s Wechatpay-Timestamp is outside the tolerance';
                RETURN;
            END IF;
            SELECT pk.pem INTO key_pem FROM callback_center.provider_keys pk
             WHERE pk.provider = pr.name AND pk.key_id = serial;
            IF NOT FOUND THEN
                error := format('the response is signed by unknown platform key "%s"', left(serial, 128));
                RETURN;
            END IF;
            why := callback_center._rsa_sha256_check(key_pem,
                convert_to(ts || E'\n' || nonce || E'\n' || coalesce(_adapter_check.body, '') || E'\n', 'UTF8'),
                decode(sig, 'base64'));
            IF why IS NOT NULL THEN
                error := 'the response signature does not verify: ' || why;
                RETURN;
            END IF;
            answer := callback_center._wechatpay_v3_answer(ob.event_type, ob.payload,
                                                           _adapter_check.http_status, coalesce(_adapter_check.body, ''));
        ELSIF ob.format = 'alipay' THEN
            node := CASE ob.event_type
                WHEN 'payment.query' THEN 'alipay_trade_query_response'
                WHEN 'payment.close' THEN 'alipay_trade_close_response'
                WHEN 'refund.request' THEN 'alipay_trade_refund_response'
                WHEN 'refund.query' THEN 'alipay_trade_fastpay_refund_query_response' END;
            parsed := _adapter_check.body::jsonb;
            s := callback_center._alipay_node_text(_adapter_check.body, node);
            IF s IS NULL OR parsed->>'sign' IS NULL THEN
                error := format('the response has no signed %s', node);
                RETURN;
            END IF;
            why := 'signature does not match';
            -- Public-key mode: the Alipay public keys of secrets.
            FOREACH key_pem IN ARRAY coalesce(pr.secrets, '{}') LOOP
                why := callback_center._rsa_sha256_check(key_pem, convert_to(s, 'UTF8'),
                                                         decode(parsed->>'sign', 'base64'));
                EXIT WHEN why IS NULL;
            END LOOP;
            -- Certificate mode, as for notifications: the Alipay public-key
            -- certificate the answer's alipay_cert_sn names (else each),
            -- chained to a loaded root now; roots sign nothing.
            IF why IS NOT NULL THEN
                SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
                  FROM callback_center.provider_keys pk WHERE pk.provider = pr.name;
                FOR key_pem IN SELECT pk.pem FROM callback_center.provider_keys pk
                                WHERE pk.provider = pr.name
                                  AND (parsed->>'alipay_cert_sn' IS NULL
                                       OR pk.key_id = parsed->>'alipay_cert_sn')
                                ORDER BY pk.key_id LOOP
                    CONTINUE WHEN (callback_center._x509_chain_check(key_pem, ARRAY[key_pem], NULL)).verdict = 'ok';
                    CONTINUE WHEN (callback_center._x509_chain_check(key_pem, cas, NULL)).verdict <> 'ok';
                    why := callback_center._rsa_sha256_check(key_pem, convert_to(s, 'UTF8'),
                                                             decode(parsed->>'sign', 'base64'));
                    EXIT WHEN why IS NULL;
                END LOOP;
            END IF;
            IF why IS NOT NULL THEN
                error := 'the response signature does not verify: ' || why;
                RETURN;
            END IF;
            answer := callback_center._alipay_answer(ob.event_type, ob.payload, s::jsonb);
        ELSIF ob.format = 'unionpay' THEN
            up := callback_center._unionpay_answer_fields(pr.name, pr.secrets, coalesce(_adapter_check.body, ''));
            IF up.failure IS NOT NULL THEN
                error := 'the response does not verify: ' || up.failure;
                RETURN;
            END IF;
            answer := callback_center._unionpay_answer(ob.event_type, ob.payload, up.fields);
        ELSE
            error := format('endpoint format %s has no adapter', ob.format);
            RETURN;
        END IF;
        ok := true;
    EXCEPTION WHEN OTHERS THEN
        ok := false;
        answer := NULL;
        error := format('the response cannot be read: %s', SQLERRM);
    END;
END
$$;

-- Keeps, with the attempts the delivery worker records (same
-- transaction), the normalized answers of provider-format events that are
-- done: delivered (answers[i], checked by _adapter_check) or dead
-- (errors[i]: an error answer in the event's shape).  A replayed event's
-- new answer replaces the old one, to be applied again.
CREATE FUNCTION callback_center._adapter_record(ids bigint[], attempts integer[],
    statuses integer[], answers jsonb[], errors text[])
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, callback_center
AS $$
    INSERT INTO callback_center.provider_answers AS a
           (outbox_id, endpoint_id, provider, event_type, aggregate_id, attempt, http_status,
            answer)
    SELECT o.id, o.endpoint_id, o.payload->>'provider', o.event_type, o.aggregate_id, r.attempt,
           r.http_status,
           coalesce(r.answer, callback_center._adapter_error_answer(o.event_type, o.payload,
                                                                    coalesce(r.error, 'no answer')))
      FROM ROWS FROM (unnest(ids), unnest(attempts), unnest(statuses), unnest(answers),
                      unnest(errors)) AS r(id, attempt, http_status, answer, error)
      JOIN callback_center.outbox o ON o.id = r.id
    ON CONFLICT (outbox_id) DO UPDATE
       SET attempt = excluded.attempt, http_status = excluded.http_status,
           answer = excluded.answer, recorded_at = now(), applied_at = NULL, outcome = NULL
$$;

REVOKE ALL ON FUNCTION
    callback_center._merchant_key_bits(text),
    callback_center._merchant_sign(text, bytea),
    callback_center._adapter_nonce(),
    callback_center.set_merchant(text, text, text, text, jsonb),
    callback_center._url_encode(text),
    callback_center._yuan(bigint),
    callback_center._adapter_request(integer, text, text, jsonb),
    callback_center._adapter_unsupported(text, text),
    callback_center._adapter_http(text, text, text[], text),
    callback_center._adapter_form_post(text, text, jsonb, text, boolean, text),
    callback_center._wechatpay_v3_request(text, callback_center.merchant_settings, text, jsonb),
    callback_center._alipay_request(text, callback_center.merchant_settings, text, jsonb),
    callback_center._unionpay_request(text, callback_center.merchant_settings, text, jsonb),
    callback_center._adapter_payment_answer(text, text, text, bigint, text),
    callback_center._adapter_refund_answer(jsonb, text, text, bigint, text),
    callback_center._adapter_error_answer(text, jsonb, text),
    callback_center._wechatpay_v3_answer(text, jsonb, integer, text),
    callback_center._alipay_node_text(text, text),
    callback_center._alipay_answer(text, jsonb, jsonb),
    callback_center._unionpay_answer(text, jsonb, jsonb),
    callback_center._unionpay_answer_fields(text, text[], text),
    callback_center._adapter_check(bigint, integer, text, text),
    callback_center._adapter_record(bigint[], integer[], integer[], jsonb[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    callback_center.set_merchant(text, text, text, text, jsonb)
    TO callback_center_admin;
-- The delivery worker (src/queue.c) builds requests, checks and keeps
-- answers through these; they run as their owner (the worker role reads
-- no merchant key, no provider key and writes no answer of its own).
GRANT EXECUTE ON FUNCTION
    callback_center._adapter_request(integer, text, text, jsonb),
    callback_center._adapter_check(bigint, integer, text, text),
    callback_center._adapter_record(bigint[], integer[], integer[], jsonb[], text[])
    TO callback_center_worker;
