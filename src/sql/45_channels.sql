
-- Payment channels, inbound: WeChat Pay v3 and v2, Alipay and UnionPay
-- notifications verified, decoded and answered in each provider's own format
-- (doc/inbound.md, "Payment channels").  payment_callback (60_orders.sql)
-- hands a channel provider's request to _channel_parse, which returns one
-- row: either the decoded message and the provider's acknowledgement, or
-- the provider's failure answer.  Everything a provider can get wrong is a
-- failure answer, never an error; errors are for misuse (NULL arguments,
-- an unknown provider, no key loaded).
--
-- Where the material lives (nothing of it readable by the application):
--   providers.secrets   wechatpay_v3: the merchant's 32-byte APIv3 key(s);
--                       wechatpay_v2: the merchant's API key(s), "md5:"
--                       before a key allowing the legacy MD5 sign;
--                       alipay: the Alipay public key(s) (PEM or base64),
--                       none in certificate mode;
--                       unionpay: the organisation name(s) the signing
--                       certificate must carry (中国银联股份有限公司)
--   provider_keys       wechatpay_v3: platform certificates and platform
--                       public keys, by serial / public-key id;
--                       unionpay: the root and intermediate certificates;
--                       alipay (certificate mode): the Alipay public-key
--                       certificate, intermediate and roots, by SN

-- Platform keys of wechatpay_v3 providers, selected by the
-- Wechatpay-Serial header: a certificate's serial (certificate mode) or a
-- public-key id PUB_KEY_ID_... (public-key mode).  Several at once during
-- a rotation.
CREATE TABLE callback_center.provider_keys (
    provider   text NOT NULL REFERENCES callback_center.providers (name)
               ON DELETE CASCADE ON UPDATE CASCADE,
    key_id     text NOT NULL CHECK (key_id <> '' AND length(key_id) <= 128),
    kind       text NOT NULL CHECK (kind IN ('certificate', 'public_key')),
    pem        text NOT NULL,
    not_after  timestamptz CHECK ((kind = 'certificate') = (not_after IS NOT NULL)),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, key_id)
);

COMMENT ON TABLE callback_center.provider_keys IS
    'WeChat Pay v3 platform certificates and public keys by serial or public-key id';

SELECT pg_catalog.pg_extension_config_dump('callback_center.provider_keys', '');
REVOKE ALL ON callback_center.provider_keys FROM PUBLIC;

-- The cryptography of src/crypto.c (see src/channels.c).
CREATE FUNCTION callback_center._key_info(key text,
    OUT kind text, OUT bits integer, OUT serial text,
    OUT not_before timestamptz, OUT not_after timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_key_info'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._rsa_sha256_check(key text, data bytea, signature bytea)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_rsa_sha256_check'
LANGUAGE C VOLATILE;

CREATE FUNCTION callback_center._aes256gcm_decrypt(
    key bytea, nonce bytea, associated_data bytea, ciphertext bytea)
RETURNS bytea
AS 'MODULE_PATHNAME', 'cc_aes256gcm_decrypt_sql'
LANGUAGE C IMMUTABLE;

CREATE FUNCTION callback_center._form_decode(s text)
RETURNS bytea
AS 'MODULE_PATHNAME', 'cc_form_decode'
LANGUAGE C IMMUTABLE;

CREATE FUNCTION callback_center._form_escape(b bytea)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_form_escape'
LANGUAGE C IMMUTABLE;

CREATE FUNCTION callback_center._hmac_sha256(key bytea, data bytea)
RETURNS bytea
AS 'MODULE_PATHNAME', 'cc_hmac_sha256_sql'
LANGUAGE C IMMUTABLE;

CREATE FUNCTION callback_center._x509_chain_check(certificate text, cas text[], names text[],
    OUT verdict text, OUT detail text)
RETURNS record
AS 'MODULE_PATHNAME', 'cc_x509_chain_check_sql'
LANGUAGE C VOLATILE;

-- Alipay's certificate SNs, as AlipaySignature.getCertSN and getRootCertSN
-- compute them: the hex MD5 of the issuer's name (RFC 2253, as Java writes
-- it) and the serial number in decimal; for the root certificate file,
-- those of its RSA-signed certificates joined by "_".  The app sends
-- app_cert_sn and alipay_root_cert_sn with its requests; certificate mode
-- names the loaded certificates by them.  22023 for what is not a PEM
-- certificate.
CREATE FUNCTION callback_center.alipay_cert_sn(certificate text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_alipay_cert_sn_sql'
LANGUAGE C IMMUTABLE;

CREATE FUNCTION callback_center.alipay_root_cert_sn(certificates text)
RETURNS text
AS 'MODULE_PATHNAME', 'cc_alipay_root_cert_sn_sql'
LANGUAGE C IMMUTABLE;

COMMENT ON FUNCTION callback_center.alipay_cert_sn(text) IS
    'Alipay''s SN of a certificate (app_cert_sn, alipay_cert_sn)';
COMMENT ON FUNCTION callback_center.alipay_root_cert_sn(text) IS
    'Alipay''s SN of its root certificate file (alipay_root_cert_sn)';

-- Checks one entry of set_provider's secrets for a channel scheme: 22023
-- with a detail that never quotes it.
CREATE FUNCTION callback_center._channel_check_secret(scheme text, secret text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF _channel_check_secret.scheme = 'wechatpay_v3' THEN
        IF octet_length(convert_to(_channel_check_secret.secret, 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid APIv3 key',
                DETAIL = format('The key is %s bytes; WeChat Pay APIv3 keys are 32.',
                                octet_length(convert_to(_channel_check_secret.secret, 'UTF8'))),
                HINT = 'Give the APIv3 key set in the merchant platform; platform certificates go to callback_center.set_platform_keys().';
        END IF;
    ELSIF _channel_check_secret.scheme = 'wechatpay_v2' THEN
        IF octet_length(convert_to(regexp_replace(_channel_check_secret.secret, '^md5:', ''), 'UTF8')) <> 32 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid API key',
                DETAIL = format('The key is %s bytes; WeChat Pay API keys are 32.',
                                octet_length(convert_to(regexp_replace(_channel_check_secret.secret, '^md5:', ''), 'UTF8'))),
                HINT = 'Give the API key set in the merchant platform, with md5: before it to accept the legacy MD5 sign.';
        END IF;
    ELSIF _channel_check_secret.scheme = 'alipay' THEN
        -- raises 22023 for a malformed key, not RSA, under 2048 bits
        PERFORM callback_center._key_info(_channel_check_secret.secret);
    ELSIF _channel_check_secret.scheme = 'unionpay' THEN
        -- The organisation the signing certificate names (the third
        -- "@" field of its common name, as UnionPay's SDK reads it).
        IF length(_channel_check_secret.secret) > 128 OR _channel_check_secret.secret ~ '[@[:cntrl:]]' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid UnionPay organisation name',
                DETAIL = 'The name is at most 128 characters, without "@" or control characters.',
                HINT = 'Give the organisation of UnionPay''s signing certificates, 中国银联股份有限公司 (the default when secrets are NULL); the certificates go to callback_center.set_platform_keys().';
        END IF;
    END IF;
END
$$;

-- set_platform_keys: replaces the platform keys of a wechatpay_v3,
-- unionpay or alipay provider with keys, a JSON object of name to PEM.
-- wechatpay_v3: serial (or public-key id) to platform certificate or
-- public key; pass the old and the new key together while WeChat Pay
-- rotates.  unionpay: any name to the UnionPay root certificate(s)
-- (self-signed: the trust anchors) and intermediate certificate(s), which
-- must chain to a root.  alipay (certificate mode): each certificate's SN
-- (alipay_cert_sn) to the Alipay public-key certificate, its intermediate
-- and the RSA root certificates, which all must chain to a root.
-- Each key is checked (RSA, 2048 bits or more, a certificate valid now
-- whose serial is its name for wechatpay_v3); returns how many are loaded.
CREATE FUNCTION callback_center.set_platform_keys(provider text, keys jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v_scheme text;
    k record;
    info record;
    chk record;
    cas text[];
    why text;
    n integer := 0;
BEGIN
    PERFORM callback_center._require(num_nulls(set_platform_keys.provider, set_platform_keys.keys) = 0 OR NULL, 'provider and keys');
    SELECT p.scheme INTO v_scheme FROM callback_center.providers p
     WHERE p.name = set_platform_keys.provider FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', set_platform_keys.provider),
            HINT = 'Create it first with callback_center.set_provider(name, ''wechatpay_v3'', ARRAY[apiv3_key]) or set_provider(name, ''unionpay'', NULL).';
    END IF;
    IF v_scheme NOT IN ('wechatpay_v3', 'unionpay', 'alipay') THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not wechatpay_v3, unionpay or alipay', set_platform_keys.provider, v_scheme);
    END IF;
    IF jsonb_typeof(set_platform_keys.keys) <> 'object' OR set_platform_keys.keys = '{}' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'keys must be a non-empty JSON object of serial to PEM';
    END IF;

    DELETE FROM callback_center.provider_keys pk WHERE pk.provider = set_platform_keys.provider;
    FOR k IN SELECT e.key, e.value FROM jsonb_each(set_platform_keys.keys) e ORDER BY e.key LOOP
        IF jsonb_typeof(k.value) <> 'string' OR k.key = '' OR length(k.key) > 128 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'invalid platform key',
                DETAIL = 'Every key needs a non-empty serial of at most 128 characters and a PEM string.';
        END IF;
        BEGIN
            info := callback_center._key_info(k.value #>> '{}');
        EXCEPTION WHEN invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = why,
                HINT = 'Give the platform certificate or platform public key as PEM.';
        END;
        IF v_scheme = 'wechatpay_v3' AND info.kind = 'certificate' AND upper(k.key) <> info.serial THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid platform key "%s"', k.key),
                DETAIL = 'The certificate''s serial number is not the name it is given.',
                HINT = 'Name each certificate by its serial number in hex, as the Wechatpay-Serial header carries it.';
        END IF;
        IF v_scheme = 'unionpay' AND info.kind <> 'certificate' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid UnionPay certificate "%s"', k.key),
                DETAIL = 'UnionPay''s root and intermediate are X.509 certificates, not public keys.';
        END IF;
        IF v_scheme = 'alipay' AND (info.kind <> 'certificate'
                                    OR k.key <> callback_center.alipay_cert_sn(k.value #>> '{}')) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('invalid Alipay certificate "%s"', k.key),
                DETAIL = CASE WHEN info.kind <> 'certificate'
                              THEN 'Certificate mode takes X.509 certificates; give a public key to callback_center.set_provider().'
                              ELSE 'The certificate''s SN is not the name it is given.' END,
                HINT = 'Name each certificate by its SN, callback_center.alipay_cert_sn(pem).';
        END IF;
        INSERT INTO callback_center.provider_keys (provider, key_id, kind, pem, not_after)
        VALUES (set_platform_keys.provider, k.key, info.kind, k.value #>> '{}', info.not_after);
        n := n + 1;
    END LOOP;

    IF v_scheme IN ('unionpay', 'alipay') THEN
        -- Every certificate must chain to a self-signed root among them
        -- (a root chains to itself), or no notification ever verifies.
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas
          FROM callback_center.provider_keys pk WHERE pk.provider = set_platform_keys.provider;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = set_platform_keys.provider ORDER BY pk.key_id LOOP
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    MESSAGE = format('invalid %s certificate "%s"',
                                     CASE v_scheme WHEN 'alipay' THEN 'Alipay' ELSE 'UnionPay' END, k.key_id),
                    DETAIL = chk.detail,
                    HINT = CASE v_scheme
                        WHEN 'alipay' THEN 'Load the Alipay public-key certificate with the intermediate it holds (alipayCertPublicKey_RSA2.crt) and the RSA root certificates of alipayRootCert.crt together.'
                        ELSE 'Load the UnionPay root certificate and the intermediate certificate together (acp_prod_root.cer and acp_prod_middle.cer of the SDK).' END;
            END IF;
        END LOOP;
    END IF;
    RETURN n;
END
$$;

COMMENT ON FUNCTION callback_center.set_platform_keys(text, jsonb) IS
    'Replaces a wechatpay_v3 provider''s platform certificates and public keys, by serial, a unionpay provider''s root and intermediate certificates, or an alipay provider''s certificates, by SN (admin)';

-- A header's value, ASCII case-insensitive; NULL when absent or not a
-- string, and '' marks it present twice (the caller refuses both).
CREATE FUNCTION callback_center._channel_header(headers jsonb, name text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    v text[];
BEGIN
    IF jsonb_typeof(_channel_header.headers) <> 'object' THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(CASE WHEN jsonb_typeof(h.value) = 'string' THEN h.value #>> '{}' END)
      INTO v
      FROM jsonb_each(_channel_header.headers) h WHERE lower(h.key) = lower(_channel_header.name);
    IF cardinality(v) > 1 THEN
        RETURN '';
    END IF;
    RETURN v[1];
END
$$;

-- The answer a channel's provider expects: success, or failure with a
-- short reason (never key material or the request).
CREATE FUNCTION callback_center._channel_answer(
    scheme text, ok boolean, status integer, reason text,
    OUT http_status integer, OUT response_body text)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    IF _channel_answer.scheme = 'wechatpay_v3' THEN
        -- WeChat Pay: 200 or 204 with no body acknowledges; any 4xx/5xx
        -- with {"code":"FAIL","message":...} makes it resend.
        IF _channel_answer.ok THEN
            http_status := 200;
            response_body := '';
        ELSE
            http_status := _channel_answer.status;
            response_body := jsonb_build_object('code', 'FAIL', 'message', _channel_answer.reason)::text;
        END IF;
    ELSIF _channel_answer.scheme = 'wechatpay_v2' THEN
        -- WeChat Pay v2: return_code SUCCESS acknowledges; FAIL (or no
        -- answer) makes it resend.
        http_status := CASE WHEN _channel_answer.ok THEN 200 ELSE _channel_answer.status END;
        response_body := format('<xml><return_code><![CDATA[%s]]></return_code>'
                                '<return_msg><![CDATA[%s]]></return_msg></xml>',
                                CASE WHEN _channel_answer.ok THEN 'SUCCESS' ELSE 'FAIL' END,
                                CASE WHEN _channel_answer.ok THEN 'OK' ELSE _channel_answer.reason END);
    ELSIF _channel_answer.scheme = 'alipay' THEN
        -- Alipay: the exact body "success" acknowledges; anything else
        -- makes it resend.
        http_status := CASE WHEN _channel_answer.ok THEN 200 ELSE _channel_answer.status END;
        response_body := CASE WHEN _channel_answer.ok THEN 'success' ELSE 'fail' END;
    ELSIF _channel_answer.scheme = 'unionpay' THEN
        -- UnionPay: HTTP 200 acknowledges (the acp SDK's demo answers
        -- "ok"); any other status makes it resend.
        http_status := CASE WHEN _channel_answer.ok THEN 200 ELSE _channel_answer.status END;
        response_body := CASE WHEN _channel_answer.ok THEN 'ok' ELSE 'fail' END;
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', _channel_answer.scheme);
    END IF;
END
$$;

-- The timestamp tolerance of a provider: its own, else the GUC
-- callback_center.signature_tolerance.
CREATE FUNCTION callback_center._channel_tolerance(tolerance interval)
RETURNS interval
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, callback_center
AS $$
BEGIN
    RETURN coalesce(_channel_tolerance.tolerance,
                    current_setting('callback_center.signature_tolerance', true)::interval,
                    interval '300 seconds');
END
$$;

-- WeChat Pay v3 (APIv3 payment notifications).  The signed string is
-- Wechatpay-Timestamp, Wechatpay-Nonce and the body, each followed by \n,
-- signed SHA256withRSA by the platform key Wechatpay-Serial names; the
-- resource is AEAD_AES_256_GCM under the APIv3 key.  failure is NULL when
-- the message is good; else the outcome, with fail_status the HTTP status
-- to answer.
CREATE FUNCTION callback_center._wechatpay_v3_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    ts text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Timestamp');
    nonce text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Nonce');
    sig_b64 text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Signature');
    serial text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Serial');
    sig_type text := callback_center._channel_header(_wechatpay_v3_parse.headers, 'Wechatpay-Signature-Type');
    sig bytea;
    key_pem text;
    why text;
    ev jsonb;
    res jsonb;
    plain bytea;
    tx jsonb;
    s text;
    total text;
BEGIN
    payload := _wechatpay_v3_parse.body;
    IF nullif(ts, '') IS NULL OR nullif(nonce, '') IS NULL
       OR nullif(sig_b64, '') IS NULL OR nullif(serial, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF sig_type IS NOT NULL AND sig_type <> 'WECHATPAY2-SHA256-RSA2048' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF ts !~ '^[0-9]{1,12}$' THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF abs(extract(epoch FROM now()) - ts::bigint)
       > extract(epoch FROM callback_center._channel_tolerance(_wechatpay_v3_parse.tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(sig_b64, 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    IF NOT EXISTS (SELECT 1 FROM callback_center.provider_keys pk WHERE pk.provider = _wechatpay_v3_parse.provider) THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no platform keys', _wechatpay_v3_parse.provider),
            HINT = 'An administrator loads them with callback_center.set_platform_keys().';
    END IF;
    SELECT pk.pem INTO key_pem FROM callback_center.provider_keys pk
     WHERE pk.provider = _wechatpay_v3_parse.provider AND pk.key_id = serial;
    IF NOT FOUND THEN
        failure := 'unknown_key'; fail_status := 401;
        RETURN;
    END IF;
    why := callback_center._rsa_sha256_check(key_pem,
        convert_to(ts || E'\n' || nonce || E'\n' || _wechatpay_v3_parse.body || E'\n', 'UTF8'), sig);
    IF why IS NOT NULL THEN
        failure := CASE WHEN why LIKE '%expired%' OR why LIKE '%not valid yet%'
                        THEN 'key_expired' ELSE 'invalid_signature' END;
        fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    BEGIN
        ev := _wechatpay_v3_parse.body::jsonb;
    EXCEPTION WHEN OTHERS THEN
        ev := NULL;
    END;
    res := ev->'resource';
    msg_id := ev->>'id';
    event_type := ev->>'event_type';
    IF jsonb_typeof(ev) IS DISTINCT FROM 'object' OR nullif(msg_id, '') IS NULL
       OR jsonb_typeof(res) IS DISTINCT FROM 'object'
       OR res->>'algorithm' IS DISTINCT FROM 'AEAD_AES_256_GCM'
       OR res->>'ciphertext' IS NULL OR res->>'nonce' IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    FOREACH s IN ARRAY _wechatpay_v3_parse.secrets LOOP
        BEGIN
            plain := callback_center._aes256gcm_decrypt(convert_to(s, 'UTF8'),
                convert_to(res->>'nonce', 'UTF8'),
                convert_to(coalesce(res->>'associated_data', ''), 'UTF8'),
                decode(res->>'ciphertext', 'base64'));
        EXCEPTION WHEN invalid_parameter_value THEN
            plain := NULL;
        END;
        EXIT WHEN plain IS NOT NULL;
    END LOOP;
    IF plain IS NULL THEN
        failure := 'decryption_failed'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        tx := convert_from(plain, 'UTF8')::jsonb;
    EXCEPTION WHEN OTHERS THEN
        tx := NULL;
    END;
    IF jsonb_typeof(tx) IS DISTINCT FROM 'object' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    -- Refunds (original_type refund, REFUND.SUCCESS / ABNORMAL / CLOSED):
    -- order_id is our refund id (out_refund_no), txn_id WeChat Pay's
    -- refund_id, amount_cents amount.refund; ABNORMAL (the money could
    -- not reach the buyer; the merchant settles it in the merchant
    -- platform) keeps the refund open.
    IF res->>'original_type' = 'refund' AND coalesce(event_type, '') LIKE 'REFUND.%' THEN
        order_id := tx->>'out_refund_no';
        txn_id := tx->>'refund_id';
        verdict := CASE tx->>'refund_status'
            WHEN 'SUCCESS' THEN 'refund_success'
            WHEN 'CLOSED' THEN 'refund_failed'
            WHEN 'ABNORMAL' THEN 'refund_processing' END;
        total := tx->'amount'->>'refund';
        IF verdict IS NULL OR nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
           OR total IS NULL OR total !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
        RETURN;
    END IF;
    -- Only transactions move payments; other resources are acknowledged
    -- and recorded (verdict NULL).
    IF coalesce(res->>'original_type', 'transaction') = 'transaction'
       AND coalesce(event_type, '') LIKE 'TRANSACTION.%' THEN
        order_id := tx->>'out_trade_no';
        txn_id := tx->>'transaction_id';
        verdict := CASE tx->>'trade_state'
            WHEN 'SUCCESS' THEN 'success'
            WHEN 'CLOSED' THEN 'failure'
            WHEN 'REVOKED' THEN 'failure'
            WHEN 'PAYERROR' THEN 'failure' END;
        total := tx->'amount'->>'total';
        currency := tx->'amount'->>'currency';
        IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                    OR total IS NULL OR total !~ '^[0-9]{1,15}$'
                                    OR nullif(currency, '') IS NULL) THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
END
$$;

-- bytes as text when they are printable ASCII, else NULL.
CREATE FUNCTION callback_center._channel_ascii(p bytea)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
    SELECT CASE WHEN pg_catalog.encode(p, 'hex') ~ '^([2-6][0-9a-f]|7[0-9a-e])*$'
                THEN pg_catalog.convert_from(p, 'UTF8') END
$$;

-- The one parser of application/x-www-form-urlencoded bodies (Alipay,
-- UnionPay): names and values in body order, %-decoded ("+" a space) to
-- the bytes of the form's own charset, which the caller decodes; a pair
-- without "=" is a name with an empty value, empty pairs are skipped.
-- names is NULL for a body that cannot be one form: empty, a "%" not
-- followed by two hex digits, a name that is not printable ASCII, or a
-- parameter twice (which one did the provider sign?).
CREATE FUNCTION callback_center._form_parse(body text, OUT names text[], OUT vals bytea[])
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    pair text;
    eq integer;
    n bytea;
    v bytea;
    nm text;
BEGIN
    IF _form_parse.body = '' THEN
        RETURN;
    END IF;
    names := '{}';
    vals := '{}';
    FOREACH pair IN ARRAY string_to_array(_form_parse.body, '&') LOOP
        CONTINUE WHEN pair = '';
        eq := strpos(pair, '=');
        IF eq = 0 THEN
            n := callback_center._form_decode(pair);
            v := '';
        ELSE
            n := callback_center._form_decode(left(pair, eq - 1));
            v := callback_center._form_decode(substr(pair, eq + 1));
        END IF;
        IF n IS NULL OR v IS NULL OR encode(n, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e])+$' THEN
            names := NULL; vals := NULL;
            RETURN;
        END IF;
        nm := convert_from(n, 'UTF8');
        IF nm = ANY (names) THEN
            names := NULL; vals := NULL;
            RETURN;
        END IF;
        names := names || nm;
        vals := vals || v;
    END LOOP;
END
$$;

-- Alipay asynchronous notifications (RSA2).  The body is the form as
-- posted (a bytea body reaches here through payment_callback's bytea
-- overload, its bytes beyond ASCII %-escaped); names and values are
-- %-decoded to the bytes of the form's charset (UTF-8, GBK or GB18030) and
-- decoded from it, so the signed string is built from those bytes as
-- Alipay built it: every parameter but sign and sign_type, empty values
-- left out, sorted by name in byte order, joined as k=v&...  It is
-- verified with the provider's Alipay public keys (public-key mode) or
-- Alipay public-key certificates that chain to the loaded Alipay roots
-- (certificate mode, set_platform_keys).
CREATE FUNCTION callback_center._alipay_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    texts text[];
    cert_sn text;
    cas text[];
    k record;
    chk record;
    candidates integer := 0;
    chain_failure text;
    charset text := 'UTF8';
    cs text;
    content bytea;
    sig bytea;
    ok boolean := false;
    s text;
    f jsonb := '{}';
    notify_time timestamptz;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_alipay_parse.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'charset')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs IN ('GBK', 'GB2312') THEN 'GBK'
                    WHEN cs = 'GB18030' THEN 'GB18030' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- Characters of a text body beyond ASCII were decoded by the web tier:
    -- on the wire they were the bytes of the form's charset.
    IF charset <> 'UTF8' AND _alipay_parse.body ~ '[^\x01-\x7f]' THEN
        BEGIN
            SELECT f.names, f.vals INTO names, vals
              FROM callback_center._form_parse(
                       callback_center._form_escape(convert_to(_alipay_parse.body, charset))) f;
        EXCEPTION WHEN untranslatable_character THEN
            names := NULL;
        END;
        IF names IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
    END IF;
    -- Every value decoded from the charset before anything is verified:
    -- Alipay signs the decoded values (encoded in that charset again, which
    -- gives back the %-decoded bytes), and bytes that are not text in it
    -- were not signed by Alipay.
    BEGIN
        texts := ARRAY(SELECT convert_from(x.v, charset)
                         FROM unnest(vals) WITH ORDINALITY AS x(v, i) ORDER BY x.i);
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF array_position(names, 'sign') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    IF coalesce(callback_center._channel_ascii(vals[array_position(names, 'sign_type')]), 'RSA2') <> 'RSA2' THEN
        -- RSA (SHA1withRSA) is Alipay's legacy; only RSA2 is accepted.
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'sign')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END;

    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm NOT IN ('sign', 'sign_type') AND x.v <> '';
    -- Public-key mode: the Alipay public keys of secrets.
    FOREACH s IN ARRAY _alipay_parse.secrets LOOP
        ok := ok OR callback_center._rsa_sha256_check(s, coalesce(content, ''), sig) IS NULL;
    END LOOP;
    -- Certificate mode: the Alipay public-key certificates loaded with
    -- set_platform_keys (named by their SN), each checked against the
    -- loaded roots now, since a certificate expires after it was loaded;
    -- alipay_cert_sn, when the notification carries it, names the one.
    -- The roots themselves sign no notification.
    IF NOT ok THEN
        cert_sn := callback_center._channel_ascii(vals[array_position(names, 'alipay_cert_sn')]);
        SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
         WHERE pk.provider = _alipay_parse.provider;
        IF cas IS NULL AND cardinality(_alipay_parse.secrets) = 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
                MESSAGE = format('provider "%s" has no Alipay public key or certificate', _alipay_parse.provider),
                HINT = 'An administrator gives the Alipay public key to callback_center.set_provider(), or loads the Alipay certificates with callback_center.set_platform_keys().';
        END IF;
        FOR k IN SELECT pk.key_id, pk.pem FROM callback_center.provider_keys pk
                  WHERE pk.provider = _alipay_parse.provider
                    AND (cert_sn IS NULL OR pk.key_id = cert_sn)
                  ORDER BY pk.key_id LOOP
            CONTINUE WHEN (callback_center._x509_chain_check(k.pem, ARRAY[k.pem], NULL)).verdict = 'ok';
            candidates := candidates + 1;
            chk := callback_center._x509_chain_check(k.pem, cas, NULL);
            IF chk.verdict <> 'ok' THEN
                chain_failure := chk.verdict;
            ELSIF callback_center._rsa_sha256_check(k.pem, coalesce(content, ''), sig) IS NULL THEN
                ok := true;
                EXIT;
            END IF;
        END LOOP;
        IF NOT ok THEN
            failure := CASE WHEN cert_sn IS NOT NULL AND cas IS NOT NULL AND candidates = 0
                            THEN 'unknown_key'
                            WHEN chain_failure = 'expired' THEN 'key_expired'
                            WHEN chain_failure IS NOT NULL THEN 'untrusted_key'
                            ELSE 'invalid_signature' END;
            fail_status := 401;
            RETURN;
        END IF;
    END IF;

    -- Signed by Alipay: from here on a problem is the body's.
    SELECT jsonb_object_agg(x.nm, x.t)
      INTO f FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm IN ('notify_id', 'notify_time', 'notify_type', 'out_trade_no',
                    'trade_no', 'trade_status', 'total_amount', 'trans_currency',
                    'out_biz_no', 'refund_fee', 'gmt_refund');
    SELECT string_agg(x.nm || '=' || x.t, '&' ORDER BY x.nm COLLATE "C")
      INTO payload FROM unnest(names, texts) AS x(nm, t)
     WHERE x.nm NOT IN ('sign', 'sign_type', 'notify_time');
    msg_id := f->>'notify_id';
    event_type := f->>'notify_type';
    IF nullif(msg_id, '') IS NULL
       OR coalesce(f->>'notify_time', '') !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        notify_time := (f->>'notify_time')::timestamp AT TIME ZONE 'Asia/Shanghai';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF abs(extract(epoch FROM now() - notify_time))
       > extract(epoch FROM callback_center._channel_tolerance(_alipay_parse.tolerance)) THEN
        failure := 'signature_expired'; fail_status := 401;
        RETURN;
    END IF;

    -- A refund arrives as a trade notification carrying refund_fee and
    -- gmt_refund (TRADE_SUCCESS after a partial refund, TRADE_CLOSED after
    -- a full one), out_biz_no naming the refund (our out_request_no), and
    -- only once it succeeded.  order_id is our refund id; txn_id NULL
    -- (Alipay gives a refund no id of its own).  refund_fee is the
    -- trade's total refunded so far, not this refund's amount: not
    -- compared (amount_cents NULL); reconciliation compares amounts.
    IF f ? 'gmt_refund' OR f ? 'refund_fee' THEN
        order_id := f->>'out_biz_no';
        verdict := 'refund_success';
        IF nullif(order_id, '') IS NULL OR nullif(f->>'trade_no', '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
        END IF;
        RETURN;
    END IF;
    order_id := f->>'out_trade_no';
    txn_id := f->>'trade_no';
    verdict := CASE f->>'trade_status'
        WHEN 'TRADE_SUCCESS' THEN 'success'
        WHEN 'TRADE_FINISHED' THEN 'success'
        WHEN 'TRADE_CLOSED' THEN 'failure' END;
    currency := coalesce(nullif(f->>'trans_currency', ''), 'CNY');
    total := f->>'total_amount';
    IF verdict IS NOT NULL AND (nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
                                OR total IS NULL
                                OR total !~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$') THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    IF total ~ '^(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$' THEN
        amount_cents := (total::numeric * 100)::bigint;
    END IF;
END
$$;

-- WeChat Pay v2 payment result notifications (XML).  sign is over every
-- parameter but sign with an empty value left out, sorted by name, joined
-- as k=v&... and followed by &key=<API key>: HMAC-SHA256 under the API key
-- (sign_type HMAC-SHA256, the default here), or MD5 for a key given as
-- "md5:<key>" (the legacy default of WeChat Pay, allowed only so).  Upper
-- case hex.  v2 signs no timestamp: there is no replay window to check,
-- and a replay is a repeat of a recorded message (keyed by transaction_id).
CREATE FUNCTION callback_center._wechatpay_v2_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    doc xml;
    f jsonb;
    n integer;
    content text;
    given text;
    sign_type text;
    s text;
    key text;
    calc text;
    ok boolean := false;
    crypto_schema name;
    ct bytea;
    plain bytea;
    r jsonb;
BEGIN
    payload := _wechatpay_v2_parse.body;
    IF position('<!' IN regexp_replace(_wechatpay_v2_parse.body, '<!\[CDATA\[', '', 'g')) > 0 THEN
        -- No DTD, no comments: WeChat sends neither.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    BEGIN
        doc := xmlparse(DOCUMENT _wechatpay_v2_parse.body);
        SELECT jsonb_object_agg(x.name, coalesce(x.value, '')), count(*)
          INTO f, n
          FROM XMLTABLE('/xml/*' PASSING doc
                        COLUMNS name text PATH 'local-name()', value text PATH 'string(.)') x;
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF f IS NULL OR n <> (SELECT count(*) FROM jsonb_object_keys(f)) THEN
        -- A parameter twice.
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    -- A refund notification carries no sign: req_info is AES-256-ECB
    -- (PKCS#7 padding) under the lower-case hex MD5 of the API key, and
    -- only the key opens it (WeChat Pay authenticates refund notifications
    -- so, and no other way).  Read: order_id our refund id (out_refund_no),
    -- txn_id WeChat Pay's refund_id, amount_cents refund_fee; refund_status
    -- SUCCESS refunded, REFUNDCLOSE failed, CHANGE (abnormal: settled in
    -- the merchant platform) still open.  Keyed by refund_id and status.
    IF f ? 'req_info' AND NOT f ? 'sign' THEN
        BEGIN
            ct := decode(f->>'req_info', 'base64');
        EXCEPTION WHEN OTHERS THEN
            ct := NULL;
        END;
        IF ct IS NULL OR ct = '' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        -- pgcrypto is relocatable: find where it lives.
        SELECT x.nspname INTO crypto_schema
          FROM pg_extension e JOIN pg_namespace x ON x.oid = e.extnamespace
         WHERE e.extname = 'pgcrypto';
        FOREACH s IN ARRAY _wechatpay_v2_parse.secrets LOOP
            BEGIN
                EXECUTE format('SELECT %I.decrypt($1, $2, %L)', crypto_schema, 'aes-ecb/pad:pkcs')
                   INTO plain USING ct, convert_to(md5(regexp_replace(s, '^md5:', '')), 'UTF8');
                IF position('<!' IN regexp_replace(convert_from(plain, 'UTF8'), '<!\[CDATA\[', '', 'g')) > 0 THEN
                    plain := NULL;
                END IF;
                SELECT jsonb_object_agg(x.name, coalesce(x.value, '')) INTO r
                  FROM XMLTABLE('/root/*' PASSING xmlparse(DOCUMENT convert_from(plain, 'UTF8'))
                                COLUMNS name text PATH 'local-name()', value text PATH 'string(.)') x;
            EXCEPTION WHEN OTHERS THEN
                r := NULL;
            END;
            EXIT WHEN r IS NOT NULL;
        END LOOP;
        IF r IS NULL THEN
            -- Nothing but the key makes a req_info that opens.
            failure := 'invalid_signature'; fail_status := 401;
            RETURN;
        END IF;
        order_id := r->>'out_refund_no';
        txn_id := r->>'refund_id';
        verdict := CASE r->>'refund_status' WHEN 'SUCCESS' THEN 'refund_success'
                                            WHEN 'REFUNDCLOSE' THEN 'refund_failed'
                                            WHEN 'CHANGE' THEN 'refund_processing' END;
        event_type := 'refund ' || coalesce(r->>'refund_status', '');
        msg_id := 'refund:' || (r->>'refund_id') || ':' || (r->>'refund_status');
        IF f->>'return_code' IS DISTINCT FROM 'SUCCESS' OR verdict IS NULL
           OR nullif(order_id, '') IS NULL OR nullif(txn_id, '') IS NULL
           OR coalesce(r->>'refund_fee', '') !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := (r->>'refund_fee')::bigint;
        RETURN;
    END IF;
    given := f->>'sign';
    IF nullif(given, '') IS NULL THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    sign_type := coalesce(nullif(f->>'sign_type', ''), 'HMAC-SHA256');
    IF sign_type NOT IN ('HMAC-SHA256', 'MD5') THEN
        failure := 'malformed_signature'; fail_status := 401;
        RETURN;
    END IF;
    SELECT string_agg(e.key || '=' || e.value, '&' ORDER BY e.key COLLATE "C")
      INTO content
      FROM jsonb_each_text(f) e WHERE e.key <> 'sign' AND e.value <> '';
    FOREACH s IN ARRAY _wechatpay_v2_parse.secrets LOOP
        key := regexp_replace(s, '^md5:', '');
        IF sign_type = 'HMAC-SHA256' THEN
            calc := upper(encode(callback_center._hmac_sha256(convert_to(key, 'UTF8'),
                convert_to(content || '&key=' || key, 'UTF8')), 'hex'));
        ELSIF s LIKE 'md5:%' THEN
            calc := upper(md5(convert_to(content || '&key=' || key, 'UTF8')));
        ELSE
            CONTINUE;
        END IF;
        -- Compared as digests: the time taken says nothing about the sign.
        ok := ok OR sha256(convert_to(calc, 'UTF8')) = sha256(convert_to(upper(given), 'UTF8'));
    END LOOP;
    IF NOT ok THEN
        failure := 'invalid_signature'; fail_status := 401;
        RETURN;
    END IF;

    -- Signed by WeChat Pay: from here on a problem is the body's.
    IF f->>'return_code' IS DISTINCT FROM 'SUCCESS' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := f->>'transaction_id';
    txn_id := f->>'transaction_id';
    order_id := f->>'out_trade_no';
    event_type := coalesce(f->>'trade_type', 'payment');
    -- result_code FAIL is one failed attempt: the order stays payable.
    verdict := CASE f->>'result_code' WHEN 'SUCCESS' THEN 'success'
                                      WHEN 'FAIL' THEN 'attempt_failed' END;
    currency := coalesce(nullif(f->>'fee_type', ''), 'CNY');
    IF nullif(msg_id, '') IS NULL OR nullif(order_id, '') IS NULL OR verdict IS NULL
       OR coalesce(f->>'total_fee', '') !~ '^[0-9]{1,15}$' THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    amount_cents := (f->>'total_fee')::bigint;
END
$$;

-- The one check of a UnionPay signature (acp 5.1.0, signMethod 01), of
-- notifications (_unionpay_parse) and of back-channel answers
-- (_unionpay_answer_fields): signPubKeyCert must chain to the root and
-- intermediate certificates loaded with set_platform_keys, be valid now and
-- name one of the provider's organisation names (secrets); the signature
-- is over the hex SHA-256 of every field but signature, empty values left
-- out, sorted by name in byte order, joined as k=v&...  failure is NULL
-- when it verifies, else why not.  5.0.0 signs SHA-1 digests with a
-- certificate chosen by certId, and signMethods 11 and 12 are symmetric
-- keys: refused.
CREATE FUNCTION callback_center._unionpay_verify(provider text, secrets text[],
    names text[], vals bytea[], OUT failure text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    cert bytea;
    cert_pem text;
    sig bytea;
    cas text[];
    chk record;
    content bytea;
BEGIN
    cert := vals[array_position(names, 'signPubKeyCert')];
    IF callback_center._channel_ascii(vals[array_position(names, 'signMethod')]) IS DISTINCT FROM '01'
       OR callback_center._channel_ascii(vals[array_position(names, 'version')]) IS DISTINCT FROM '5.1.0'
       OR array_position(names, 'signature') IS NULL
       OR cert IS NULL OR encode(cert, 'hex') !~ '^([2-6][0-9a-f]|7[0-9a-e]|0d|0a)+$' THEN
        failure := 'malformed_signature';
        RETURN;
    END IF;
    BEGIN
        sig := decode(callback_center._channel_ascii(vals[array_position(names, 'signature')]), 'base64');
    EXCEPTION WHEN OTHERS THEN
        sig := NULL;
    END;
    IF sig IS NULL OR sig = '' THEN
        failure := 'malformed_signature';
        RETURN;
    END IF;

    -- In a fixed order: the certificate cache (crypto.c) is keyed by them.
    SELECT array_agg(pk.pem ORDER BY pk.key_id) INTO cas FROM callback_center.provider_keys pk
     WHERE pk.provider = _unionpay_verify.provider;
    IF cas IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('provider "%s" has no UnionPay certificates', _unionpay_verify.provider),
            HINT = 'An administrator loads the root and intermediate certificates with callback_center.set_platform_keys().';
    END IF;
    cert_pem := convert_from(cert, 'UTF8');
    chk := callback_center._x509_chain_check(cert_pem, cas, _unionpay_verify.secrets);
    IF chk.verdict <> 'ok' THEN
        failure := CASE chk.verdict WHEN 'malformed' THEN 'malformed_signature'
                                    WHEN 'expired' THEN 'key_expired'
                                    WHEN 'wrong_name' THEN 'wrong_organisation'
                                    ELSE 'untrusted_key' END;
        RETURN;
    END IF;
    SELECT string_agg(convert_to(x.nm, 'UTF8') || '\x3d'::bytea || x.v, '\x26'::bytea
                      ORDER BY x.nm COLLATE "C")
      INTO content
      FROM unnest(names, vals) AS x(nm, v)
     WHERE x.nm <> 'signature' AND x.v <> '';
    IF callback_center._rsa_sha256_check(cert_pem,
           convert_to(encode(sha256(content), 'hex'), 'UTF8'), sig) IS NOT NULL THEN
        failure := 'invalid_signature';
    END IF;
END
$$;

-- UnionPay (China UnionPay online payments, acp SDK 5.1.0) back-end
-- notifications.  The body is the form as posted; names and values are
-- %-decoded to the bytes of the form's encoding (UTF-8 or GBK) and
-- verified by _unionpay_verify (the SDK neither sends nor reads empty
-- values, so the signed string leaves them out).  UnionPay signs no
-- notification time: a replay is a repeat of the recorded message, keyed
-- by queryId and txnType.
CREATE FUNCTION callback_center._unionpay_parse(
    provider text, secrets text[], tolerance interval,
    headers jsonb, body text,
    OUT failure text, OUT fail_status integer, OUT msg_id text,
    OUT event_type text, OUT verdict text, OUT order_id text, OUT txn_id text,
    OUT amount_cents bigint, OUT currency text, OUT payload text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    names text[];
    vals bytea[];
    charset text;
    cs text;
    f jsonb;
    total text;
BEGIN
    SELECT f.names, f.vals INTO names, vals FROM callback_center._form_parse(_unionpay_parse.body) f;
    IF names IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;

    cs := upper(callback_center._channel_ascii(vals[array_position(names, 'encoding')]));
    charset := CASE WHEN cs IS NULL OR cs IN ('UTF-8', 'UTF8') THEN 'UTF8'
                    WHEN cs = 'GBK' THEN 'GBK' END;
    IF charset IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    failure := callback_center._unionpay_verify(_unionpay_parse.provider,
                                                _unionpay_parse.secrets, names, vals);
    IF failure IS NOT NULL THEN
        fail_status := 401;
        RETURN;
    END IF;

    -- Signed by UnionPay: from here on a problem is the body's.
    BEGIN
        SELECT jsonb_object_agg(x.nm, convert_from(x.v, charset))
          INTO f FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm IN ('orderId', 'queryId', 'txnType', 'txnSubType', 'respCode',
                        'txnAmt', 'currencyCode', 'origQryId');
        -- What a resend repeats: the signed parameters but the certificate
        -- (UnionPay may sign a resend under its next certificate).
        SELECT string_agg(x.nm || '=' || convert_from(x.v, charset), '&' ORDER BY x.nm COLLATE "C")
          INTO payload FROM unnest(names, vals) AS x(nm, v)
         WHERE x.nm NOT IN ('signature', 'signPubKeyCert') AND x.v <> '';
    EXCEPTION WHEN OTHERS THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END;
    IF nullif(f->>'queryId', '') IS NULL OR nullif(f->>'txnType', '') IS NULL THEN
        failure := 'malformed_body'; fail_status := 400;
        RETURN;
    END IF;
    msg_id := (f->>'queryId') || ':' || (f->>'txnType');
    event_type := 'txnType ' || (f->>'txnType') || coalesce('/' || (f->>'txnSubType'), '');
    IF f->>'txnType' = '01' THEN
        -- Consumption: respCode 00 (success) and A6 (success with a
        -- defect) pay; any other is one failed attempt.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'success' ELSE 'attempt_failed' END;
        -- ISO 4217 numeric codes.
        currency := CASE f->>'currencyCode'
            WHEN '156' THEN 'CNY' WHEN '344' THEN 'HKD' WHEN '446' THEN 'MOP'
            WHEN '901' THEN 'TWD' WHEN '840' THEN 'USD' WHEN '978' THEN 'EUR'
            WHEN '826' THEN 'GBP' WHEN '392' THEN 'JPY' WHEN '410' THEN 'KRW'
            WHEN '702' THEN 'SGD' WHEN '036' THEN 'AUD' WHEN '124' THEN 'CAD'
            ELSE f->>'currencyCode' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$'
           OR nullif(currency, '') IS NULL THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    IF f->>'txnType' = '04' THEN
        -- Refund (back notification): orderId is the refund's own order
        -- id, our refund id; queryId UnionPay's id of the refund; txnAmt
        -- its amount.  respCode 00 and A6 refunded; any other failed.
        order_id := f->>'orderId';
        txn_id := f->>'queryId';
        verdict := CASE WHEN f->>'respCode' IN ('00', 'A6') THEN 'refund_success' ELSE 'refund_failed' END;
        total := f->>'txnAmt';
        IF nullif(order_id, '') IS NULL OR coalesce(total, '') !~ '^[0-9]{1,15}$' THEN
            failure := 'malformed_body'; fail_status := 400;
            RETURN;
        END IF;
        amount_cents := total::bigint;
    END IF;
    -- Other transaction types (cancellations 31, ...) are recorded and
    -- acknowledged (verdict NULL).
END
$$;

-- _channel_parse: verifies and decodes a channel provider's notification.
-- One row: ok with the message and the provider's acknowledgement
-- (http_status, response_body), or not ok with failure (the outcome:
-- malformed_signature, signature_expired, unknown_key, key_expired,
-- untrusted_key, wrong_organisation, invalid_signature, malformed_body,
-- decryption_failed) and the provider's failure answer.  Whether the
-- message may touch the payment it names is payment_callback's question
-- (_payment_check, 60_orders.sql), asked under the payment's row lock.
-- payload is what record_callback should hash (the body; for Alipay the
-- signed parameters without notify_time, which changes on every resend;
-- for UnionPay the signed parameters without the certificate).  Raises only for misuse:
-- CB033 unknown provider, 55000 no key loaded, 22023 not a channel.
CREATE FUNCTION callback_center._channel_parse(
    scheme text, provider text, headers jsonb, body text)
RETURNS TABLE (ok boolean, failure text, msg_id text, event_type text, verdict text,
               order_id text, txn_id text, amount_cents bigint, currency text,
               payload text, http_status integer, response_body text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, callback_center
AS $$
DECLARE
    prov callback_center.providers;
    m record;
    a record;
BEGIN
    PERFORM callback_center._require(num_nulls(_channel_parse.scheme, _channel_parse.provider, _channel_parse.headers, _channel_parse.body) = 0 OR NULL,
                                     'scheme, provider, headers and body');
    SELECT * INTO prov FROM callback_center.providers x WHERE x.name = _channel_parse.provider;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CB033',
            MESSAGE = format('unknown provider "%s"', _channel_parse.provider),
            HINT = 'An administrator registers providers with callback_center.set_provider().';
    END IF;
    IF prov.scheme <> _channel_parse.scheme THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('provider "%s" has scheme %s, not %s', _channel_parse.provider, prov.scheme, _channel_parse.scheme);
    END IF;

    IF _channel_parse.scheme = 'wechatpay_v3' THEN
        m := callback_center._wechatpay_v3_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                                 _channel_parse.headers, _channel_parse.body);
    ELSIF _channel_parse.scheme = 'wechatpay_v2' THEN
        m := callback_center._wechatpay_v2_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                                 _channel_parse.headers, _channel_parse.body);
    ELSIF _channel_parse.scheme = 'alipay' THEN
        m := callback_center._alipay_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                           _channel_parse.headers, _channel_parse.body);
    ELSIF _channel_parse.scheme = 'unionpay' THEN
        m := callback_center._unionpay_parse(_channel_parse.provider, prov.secrets, prov.tolerance,
                                             _channel_parse.headers, _channel_parse.body);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('scheme %s is not a payment channel', _channel_parse.scheme);
    END IF;

    a := callback_center._channel_answer(_channel_parse.scheme, m.failure IS NULL, m.fail_status,
                                         replace(coalesce(m.failure, 'ok'), '_', ' '));
    RETURN QUERY SELECT m.failure IS NULL, m.failure, m.msg_id, m.event_type, m.verdict,
                        m.order_id, m.txn_id, m.amount_cents, m.currency, m.payload,
                        a.http_status, a.response_body;
END
$$;

REVOKE ALL ON FUNCTION
    callback_center._key_info(text),
    callback_center._rsa_sha256_check(text, bytea, bytea),
    callback_center._aes256gcm_decrypt(bytea, bytea, bytea, bytea),
    callback_center._form_decode(text),
    callback_center._form_escape(bytea),
    callback_center._form_parse(text),
    callback_center._channel_check_secret(text, text),
    callback_center.set_platform_keys(text, jsonb),
    callback_center._channel_header(jsonb, text),
    callback_center._channel_answer(text, boolean, integer, text),
    callback_center._channel_tolerance(interval),
    callback_center._wechatpay_v3_parse(text, text[], interval, jsonb, text),
    callback_center._channel_ascii(bytea),
    callback_center._alipay_parse(text, text[], interval, jsonb, text),
    callback_center._wechatpay_v2_parse(text, text[], interval, jsonb, text),
    callback_center._hmac_sha256(bytea, bytea),
    callback_center._x509_chain_check(text, text[], text[]),
    callback_center._unionpay_verify(text, text[], text[], bytea[]),
    callback_center._unionpay_parse(text, text[], interval, jsonb, text),
    callback_center._channel_parse(text, text, jsonb, text)
FROM PUBLIC;

GRANT EXECUTE ON FUNCTION callback_center.set_platform_keys(text, jsonb)
    TO callback_center_admin;
REVOKE ALL ON FUNCTION callback_center.alipay_cert_sn(text),
    callback_center.alipay_root_cert_sn(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION callback_center.alipay_cert_sn(text),
    callback_center.alipay_root_cert_sn(text) TO callback_center_app, callback_center_admin;
