SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;

-- Runs a statement; prints its single value, or SQLSTATE: message / detail.
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r text;
    st text;
    msg text;
    det text;
BEGIN
    EXECUTE q INTO r;
    RETURN coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL;
    RETURN st || ': ' || msg || coalesce(' / ' || nullif(det, ''), '');
END
$$;

-- Standard Webhooks headers for body, signed with secret at ts.
CREATE FUNCTION pg_temp.sw(secret text, ts bigint, body text,
                           id text DEFAULT 'msg_test') RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('webhook-id', id,
                              'webhook-timestamp', ts::text,
                              'webhook-signature',
                              callback_center.sign_webhook(secret, id, ts, body))
$$;

CREATE FUNCTION pg_temp.now_s() RETURNS bigint LANGUAGE sql AS $$
    SELECT extract(epoch FROM now())::bigint
$$;

-- Known answer: the Standard Webhooks reference vector.
SELECT callback_center.sign_webhook('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
           'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330, '{"test": 2432232314}')
       = 'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=' AS c_signer_matches_vector;

-- The C signer agrees with pgcrypto's hmac, with and without base64 padding
-- in the secret and for an empty body.
SELECT callback_center.sign_webhook(s, 'msg_1', 1700000000, b)
       = 'v1,' || encode(hmac(convert_to('msg_1.1700000000.' || b, 'UTF8'),
                              decode(substr(s, 7), 'base64'), 'sha256'), 'base64')
       AS c_equals_pgcrypto
  FROM (VALUES ('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', '{"a":1}'),
               ('whsec_YWJjZA==', 'héllo wörld'),
               ('whsec_YWJjZGU=', '')) AS v(s, b);

-- Stripe: header value computed in C equals the one computed with pgcrypto
-- and the one computed independently (Python hmac) for this input.
SELECT callback_center.sign_stripe('whsec_test_stripe', 1700000000, '{"id":"evt_1"}')
       = 't=1700000000,v1=' || encode(hmac('1700000000.{"id":"evt_1"}'::bytea,
                                           'whsec_test_stripe'::bytea, 'sha256'), 'hex')
       AS c_equals_pgcrypto,
       callback_center.sign_stripe('whsec_test_stripe', 1700000000, '{"id":"evt_1"}')
       = 't=1700000000,v1=cf6ab59db2a13f14509ca6aa99ba5ef44464e3a9324845094c4c6205f0c1773e'
       AS matches_python;

-- Providers.  The reference vector is from 2021, so this one has a
-- tolerance wide enough to accept it.
SELECT callback_center.set_provider('sig_vector', 'standard_webhooks',
           ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'], interval '100 years');
SELECT callback_center.verify_signature('sig_vector',
           '{"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
             "webhook-timestamp": "1614265330",
             "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}',
           '{"test": 2432232314}') AS vector_verifies;
-- Header names in any case.
SELECT callback_center.verify_signature('sig_vector',
           '{"Webhook-Id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
             "WEBHOOK-TIMESTAMP": "1614265330",
             "Webhook-Signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}',
           '{"test": 2432232314}') AS mixed_case_verifies;
-- One byte of the body changed.
SELECT pg_temp.try($q$SELECT callback_center.verify_signature('sig_vector',
           '{"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
             "webhook-timestamp": "1614265330",
             "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}',
           '{"test": 2432232315}')$q$) AS tampered_body;

-- Rotation: two secrets configured, either signs; several entries in the
-- header, other versions ignored, any v1 may match.
SELECT callback_center.set_provider('sig_rot', 'standard_webhooks',
           ARRAY['whsec_' || encode('rotation-secret-number-1'::bytea, 'base64'),
                 'whsec_' || encode('rotation-secret-number-2'::bytea, 'base64')]);
SELECT callback_center.verify_signature('sig_rot',
           pg_temp.sw('whsec_' || encode('rotation-secret-number-1'::bytea, 'base64'),
                      pg_temp.now_s(), 'body'), 'body') AS old_secret;
SELECT callback_center.verify_signature('sig_rot',
           pg_temp.sw('whsec_' || encode('rotation-secret-number-2'::bytea, 'base64'),
                      pg_temp.now_s(), 'body'), 'body') AS new_secret;
SELECT pg_temp.try(format($q$SELECT callback_center.verify_signature('sig_rot', %L, 'body')$q$,
           pg_temp.sw('whsec_' || encode('rotation-secret-number-3'::bytea, 'base64'),
                      pg_temp.now_s(), 'body'))) AS unknown_secret;
SELECT callback_center.verify_signature('sig_rot',
           jsonb_set(h, '{webhook-signature}', to_jsonb(
               'v2,abcd v1,' || encode(sha256('x'), 'base64') || '  v1a,zz '
               || (h->>'webhook-signature'))), 'body') AS several_entries
  FROM pg_temp.sw('whsec_' || encode('rotation-secret-number-2'::bytea, 'base64'),
                  pg_temp.now_s(), 'body') AS h;

-- Time tolerance, both directions; the provider's own tolerance and the GUC.
SELECT pg_temp.try(format($q$SELECT callback_center.verify_signature('sig_rot', %L, 'body')$q$,
           pg_temp.sw('whsec_' || encode('rotation-secret-number-1'::bytea, 'base64'),
                      pg_temp.now_s() - 1000, 'body'))) AS too_old;
SELECT pg_temp.try(format($q$SELECT callback_center.verify_signature('sig_rot', %L, 'body')$q$,
           pg_temp.sw('whsec_' || encode('rotation-secret-number-1'::bytea, 'base64'),
                      pg_temp.now_s() + 1000, 'body'))) AS too_new;
-- Expiry wins over a wrong signature: the timestamp is checked first.
SELECT pg_temp.try(format($q$SELECT callback_center.verify_signature('sig_rot', %L, 'body')$q$,
           pg_temp.sw('whsec_' || encode('rotation-secret-number-3'::bytea, 'base64'),
                      pg_temp.now_s() - 1000, 'body'))) AS old_and_wrong;
SET callback_center.signature_tolerance = '30min';
SHOW callback_center.signature_tolerance;
SELECT callback_center.verify_signature('sig_rot',
           pg_temp.sw('whsec_' || encode('rotation-secret-number-1'::bytea, 'base64'),
                      pg_temp.now_s() - 1000, 'body'), 'body') AS old_within_guc;
RESET callback_center.signature_tolerance;
SELECT callback_center.set_provider('sig_rot', 'standard_webhooks',
           ARRAY['whsec_' || encode('rotation-secret-number-1'::bytea, 'base64')],
           interval '1 hour');
SELECT callback_center.verify_signature('sig_rot',
           pg_temp.sw('whsec_' || encode('rotation-secret-number-1'::bytea, 'base64'),
                      pg_temp.now_s() + 1000, 'body'), 'body') AS new_within_provider;

-- Malformed headers: CB032.  The detail says what, never the values.
SELECT v.label, pg_temp.try(format(
           $q$SELECT callback_center.verify_signature('sig_vector', %L, '{"test": 2432232314}')$q$,
           v.headers)) AS outcome
  FROM (VALUES
    ('no signature', '{"webhook-id": "m", "webhook-timestamp": "1614265330"}'::jsonb),
    ('no id', '{"webhook-timestamp": "1614265330", "webhook-signature": "v1,AAAA"}'),
    ('no timestamp', '{"webhook-id": "m", "webhook-signature": "v1,AAAA"}'),
    ('timestamp not a number', '{"webhook-id": "m", "webhook-timestamp": "16142x", "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}'),
    ('negative timestamp', '{"webhook-id": "m", "webhook-timestamp": "-5", "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}'),
    ('bad base64', '{"webhook-id": "m", "webhook-timestamp": "1614265330", "webhook-signature": "v1,g0hM9SsE*OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}'),
    ('base64 of wrong length', '{"webhook-id": "m", "webhook-timestamp": "1614265330", "webhook-signature": "v1,AAAA"}'),
    ('no v1 entry', '{"webhook-id": "m", "webhook-timestamp": "1614265330", "webhook-signature": "v2,AAAA"}'),
    ('entry without version', '{"webhook-id": "m", "webhook-timestamp": "1614265330", "webhook-signature": "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}'),
    ('empty signature', '{"webhook-id": "m", "webhook-timestamp": "1614265330", "webhook-signature": ""}'),
    ('header not a string', '{"webhook-id": "m", "webhook-timestamp": 1614265330, "webhook-signature": "v1,AAAA"}'),
    ('header twice', '{"webhook-id": "m", "Webhook-Id": "n", "webhook-timestamp": "1614265330", "webhook-signature": "v1,AAAA"}'),
    ('headers not an object', '["webhook-id"]'),
    ('headers a scalar', '"webhook-id"')
  ) AS v(label, headers);

-- Stripe.
SELECT callback_center.set_provider('sig_stripe', 'stripe',
           ARRAY['whsec_stripe_old', 'whsec_stripe_new']);
SELECT callback_center.verify_signature('sig_stripe',
           jsonb_build_object('Stripe-Signature',
               callback_center.sign_stripe('whsec_stripe_new', pg_temp.now_s(), '{"id":"evt_2"}')),
           '{"id":"evt_2"}') AS stripe_verifies;
-- v0 ignored, several v1, the matching one last, upper-case hex accepted.
SELECT callback_center.verify_signature('sig_stripe',
           jsonb_build_object('stripe-signature',
               't=' || t || ',v0=' || encode(sha256('x'), 'hex')
               || ',v1=' || encode(sha256('y'), 'hex')
               || ',v1=' || upper(encode(hmac((t || '.{"id":"evt_3"}')::bytea,
                                              'whsec_stripe_old'::bytea, 'sha256'), 'hex'))),
           '{"id":"evt_3"}') AS stripe_rotation
  FROM pg_temp.now_s() AS t;
SELECT pg_temp.try(format($q$SELECT callback_center.verify_signature('sig_stripe', %L, '{"id":"evt_2"}')$q$,
           jsonb_build_object('Stripe-Signature',
               callback_center.sign_stripe('whsec_other', pg_temp.now_s(), '{"id":"evt_2"}'))))
       AS stripe_wrong_secret;
SELECT pg_temp.try(format($q$SELECT callback_center.verify_signature('sig_stripe', %L, '{"id":"evt_2"}')$q$,
           jsonb_build_object('Stripe-Signature',
               callback_center.sign_stripe('whsec_stripe_new', pg_temp.now_s() - 400, '{"id":"evt_2"}'))))
       AS stripe_expired;
SELECT v.label, pg_temp.try(format(
           $q$SELECT callback_center.verify_signature('sig_stripe', %L, 'b')$q$,
           jsonb_build_object('Stripe-Signature', v.header))) AS outcome
  FROM (VALUES
    ('no t', 'v1=' || encode(sha256('y'), 'hex')),
    ('no v1', 't=1700000000,v0=' || encode(sha256('y'), 'hex')),
    ('t twice', 't=1700000000,t=1700000001,v1=' || encode(sha256('y'), 'hex')),
    ('t not a number', 't=17x,v1=' || encode(sha256('y'), 'hex')),
    ('bad hex', 't=1700000000,v1=' || replace(encode(sha256('y'), 'hex'), 'a', 'g')),
    ('short hex', 't=1700000000,v1=abcd'),
    ('item without =', 't=1700000000,v1'),
    ('empty', '')
  ) AS v(label, header);
SELECT pg_temp.try($q$SELECT callback_center.verify_signature('sig_stripe', '{}', 'b')$q$)
       AS stripe_no_header;

-- Unknown provider, nulls.
SELECT pg_temp.try($q$SELECT callback_center.verify_signature('sig_nobody', '{}', 'b')$q$)
       AS unknown_provider;
SELECT pg_temp.try($q$SELECT callback_center.verify_signature(NULL, '{}', 'b')$q$) AS null_provider;
SELECT pg_temp.try($q$SELECT callback_center.verify_signature('sig_rot', '{}', NULL)$q$) AS null_body;

-- Signing inputs.
SELECT pg_temp.try($q$SELECT callback_center.sign_webhook('not_a_secret', 'm', 1, 'b')$q$) AS no_prefix;
SELECT pg_temp.try($q$SELECT callback_center.sign_webhook('whsec_ab!d', 'm', 1, 'b')$q$) AS bad_base64;
SELECT pg_temp.try($q$SELECT callback_center.sign_stripe('', 1, 'b')$q$) AS empty_stripe_secret;

-- New secrets: whsec_ and 32 base64 characters (24 bytes), random, usable.
SELECT s ~ '^whsec_[A-Za-z0-9+/]{32}$' AS well_formed,
       s <> callback_center.new_webhook_secret() AS random,
       callback_center.sign_webhook(s, 'm', 1, 'b') ~ '^v1,[A-Za-z0-9+/]{43}=$' AS usable
  FROM callback_center.new_webhook_secret() AS s;

-- set_provider and drop_provider inputs.
SELECT pg_temp.try($q$SELECT callback_center.set_provider('sig_x', 'hmac', ARRAY['k'])$q$) AS bad_scheme;
SELECT pg_temp.try($q$SELECT callback_center.set_provider('sig_x', 'stripe', '{}')$q$) AS no_secrets;
SELECT pg_temp.try($q$SELECT callback_center.set_provider('sig_x', 'stripe', ARRAY['k', NULL])$q$) AS null_secret;
SELECT pg_temp.try($q$SELECT callback_center.set_provider('sig_x', 'stripe', ARRAY[''])$q$) AS empty_secret;
SELECT pg_temp.try($q$SELECT callback_center.set_provider('sig_x', 'standard_webhooks', ARRAY['whsec_***'])$q$) AS bad_whsec;
SELECT pg_temp.try($q$SELECT callback_center.set_provider('sig_x', 'stripe', ARRAY['k'], interval '-1 second')$q$) AS bad_tolerance;
SELECT pg_temp.try($q$SELECT callback_center.set_provider('', 'stripe', ARRAY['k'])$q$) AS empty_name;
SELECT pg_temp.try($q$SELECT callback_center.set_provider(NULL, 'stripe', ARRAY['k'])$q$) AS null_name;
SELECT pg_temp.try($q$SELECT callback_center.drop_provider('sig_x')$q$) AS drop_unknown;
SELECT pg_temp.try($q$SELECT callback_center.drop_provider(NULL)$q$) AS drop_null;
-- The signers are not STRICT: a NULL raises rather than yielding a NULL
-- header.
SELECT pg_temp.try($q$SELECT callback_center.sign_webhook(NULL, 'm', 1, 'b')$q$) AS sw_null_secret,
       pg_temp.try($q$SELECT callback_center.sign_webhook('whsec_YWJjZA==', NULL, 1, 'b')$q$) AS sw_null_id,
       pg_temp.try($q$SELECT callback_center.sign_webhook('whsec_YWJjZA==', 'm', NULL, 'b')$q$) AS sw_null_ts,
       pg_temp.try($q$SELECT callback_center.sign_webhook('whsec_YWJjZA==', 'm', 1, NULL)$q$) AS sw_null_body;
SELECT pg_temp.try($q$SELECT callback_center.sign_stripe(NULL, 1, 'b')$q$) AS st_null_secret,
       pg_temp.try($q$SELECT callback_center.sign_stripe('k', NULL, 'b')$q$) AS st_null_ts,
       pg_temp.try($q$SELECT callback_center.sign_stripe('k', 1, NULL)$q$) AS st_null_body;
SELECT count(*) AS sig_x_rows FROM callback_center.providers WHERE name = 'sig_x';

-- The application role verifies but cannot read secrets or manage providers.
-- Members of the group roles may use this database.
GRANT USAGE ON SCHEMA callback_center TO callback_center_app, callback_center_admin;
SET ROLE callback_center_app;
SELECT callback_center.verify_signature('sig_stripe',
           jsonb_build_object('Stripe-Signature',
               callback_center.sign_stripe('whsec_stripe_old', pg_temp.now_s(), 'b')),
           'b') AS app_verifies;
SELECT pg_temp.try($q$SELECT count(*) FROM callback_center.providers$q$) AS app_reads_providers;
SELECT pg_temp.try($q$SELECT callback_center.set_provider('sig_x', 'stripe', ARRAY['k'])$q$) AS app_sets_provider;
RESET ROLE;
SET ROLE callback_center_admin;
SELECT pg_temp.try($q$SELECT count(*) FROM callback_center.providers$q$) AS admin_reads_providers;
SELECT callback_center.set_provider('sig_admin', 'stripe', ARRAY['k']);
SELECT callback_center.drop_provider('sig_admin');
RESET ROLE;
REVOKE USAGE ON SCHEMA callback_center FROM callback_center_app, callback_center_admin;

-- Dropped providers are unknown.
SELECT callback_center.drop_provider(name) FROM callback_center.providers
 WHERE name IN ('sig_vector', 'sig_rot', 'sig_stripe') ORDER BY name;
SELECT pg_temp.try($q$SELECT callback_center.verify_signature('sig_rot', '{}', 'b')$q$)
       AS dropped_provider;

-- Leave the database as found (sql/install.sql expects no extension).
SET client_min_messages = warning;
DROP EXTENSION callback_center;
DROP EXTENSION IF EXISTS pgcrypto;
RESET client_min_messages;
