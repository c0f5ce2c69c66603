-- Payment channels, outbound: the admin functions of the adapter layer
-- (doc/adapters.md).  Every refused input gives a clear SQLSTATE and writes
-- nothing; no message or detail quotes a key.  The keys below are test
-- fixtures made for this file with openssl, used nowhere else.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS callback_center CASCADE;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE TABLE ad_keys (name text PRIMARY KEY, pem text NOT NULL);
INSERT INTO ad_keys VALUES
  ('key2048', $k$-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDyUB8dvecXX3j3
FNd/5kAXdkrvt8cBBrs+du+9AtBQ7+18FbL6DZ++NM7VPbIJLoMIberFCZ2gtyH6
keGM8xb9sMAVQ+Xx0hZpnSurzYMo9n1RsYUw95TdEwtRZu12gBQyBNhrVqpDQqQQ
EPBWyYovnIQds9ninXMiicJH/ZuX+XN7BVspNXibC3W3//q/JkHALyH966yK0WFf
Vrw78ntxKdA68detdUB6AChHgNdPQZb787jm+P6a5L+l1BXjWoTI1SDx5LGl/OMh
5eVqBGbXj2hx/FRNVGPsH2AmEyu5nvTMdCvPRyXkvQGV7rg3A0r3cnIkn93nYNPv
/oBw5z3ZAgMBAAECggEAFGm9hVLnMefgF+iQkvzBr3hOrc0snaCEi6mXXrPq+raL
qiVl03zsVSi7t+kfo3hgn4gq+/hoaA6ldSdu+eHMsQh/1grHR0zsiG8uK6X/g6bo
PcaXst1YlBszm+Lw5Ee7687OsJQ3eb0WdygGJzmJQ6OK2bm6BEZBWcqDLG9n+TBn
nFRLSR6uoS3dO2zWTj3Xo9JNjEcDrhiIAu9tKenESsSTGPWIqMW5VL8/P5fwZXML
A1ABgSvi6RriyEcEkajLJF8u5eqJMeQCWgl1cRzGJbem17FzIzKyIK0tXLzjD+RT
ZD47Q+Szv25ADlAs1eLvqu2FYgow1nSfiZCq96bydQKBgQD5K1PfTjA6cMO0NzSr
FdUgbXFHTSGfNeZdai26eFDtQeZRwFXp+u+OxTfXOC5TgFhCje+pRQX9qhQKhUPo
XYSAIvrbgPDEZTfJdIJcfCIrvkbK2ozVS+sT7xwF1PjMpIX0KYkDgWvwYApIZ0LY
f4ehIKnjgRbT9X3DCyulaLoorwKBgQD49K0wfNkE3DgoMhqROQF5iBFknBU3nVXv
oGy/HfXAPNsUIaUsa2v0dHFUZ+CWkccKx7zk32pmBjNWnu0nUwu40+2Aas/ks5GS
4dcb794Xjspf87HzLLop8u/gU1EwKvcv0CUv5xr7dX1IzjbhJrtBVLYWkKMCxi/C
eeN6J0sT9wKBgQDofHnkiJLNZHvmAgCdhWB3wkYIzjoJ0IPiM3j5XNu9lFhvfPNs
vtuYrgF9SYlIFh/D8aVlneaKGZBbhJ6pB+DiokDIYJXF2d9kk9Yyrww/Hmn1SlhP
iGeOEPNnqaB/aR8ngz25TJ/HCAVwKxEe6ldFizGY+dCv8oXmX9zYmE/iNwKBgQCl
na/xR7zfnNjG9L3zyiaPANQBSExdGQ/oP6LYaUfpQRLFC7TkHfpNP4F9EzW3NPdi
1ol1AKO5h3pzr3o45OgxZtriySvQCx1Wx2LgtOvcZCOBPY8uJJ0b9v9ZDlQ+ZPbY
GfIDMg0jJ3/XBUhA9BEyXvZbgJDQ8aMoDwojYyxw9QKBgFqVureMghKLioulrEPM
5Z7ytNcls3jyf5j7wlMBTOvvOjbjlNTAalaSE3c08iPSEGD2+lqWMEycQ6o4ZZIo
aLXQzcK+8wrWsIROJH7QiQj6WlwyveidEuCKNqWD8jpsAkOEve/7DUIy7mXIF9gN
oYv3QH43XsMyuvpCZex6C5CK
-----END PRIVATE KEY-----
$k$),
  ('key1024', $k$-----BEGIN PRIVATE KEY-----
MIICdgIBADANBgkqhkiG9w0BAQEFAASCAmAwggJcAgEAAoGBAL8sd6k2T2jRHP+J
HI3wI1t3GjpOy+Fc4VrWa9WkSnSWMJuU1mzkXUyAMpSMoenylXEQmlxlvNrWOaJ0
N1k1hAHfkRekqOAHpJJN1ARAMHo085E25zGN+cRix+1OLCpD30v7UAgf6Xo1s8U+
XCzlxTGUDBbZ3GWKvq50xxicEX2XAgMBAAECgYB0XEqRUh9Pe0idOQWKV0oOGBZ8
uw1ZpMD+G1kTdqZjBC+d4yAIs48eS0F+LYM39JGFekeaScqDoLT/7qDpyasIst2X
dMH1ToiycggYQ7R5zA/u4cjEcl4Kk0NpcKXQww+ywIj3vqAOnUhfshxe7858gJ9E
oFivUU8+H8IkxeVUgQJBAO2rM6UL8Js913WF55a+l84OEObd1jhKMFonm5FFafWZ
90CqvzF1LWysFGyTsuHMoBzHx/F1NNhj5eNwKB9evmECQQDN6zcXirIlAudJ9U15
zu4+1tmfWR0j8ilnCvNO6FwBTrOyKc66rZAmLqpLyD0mPrLEMLNij5+h2EceCdWY
zo73AkBNvL27slgUrvmWWyIQ0G5e24LzwIOdDcca9fGQZp/t0VpqMG8xAh7FeNOF
YBoWeRO11jKz655JWQOMjNbSy+6BAkEAq4q7xnzgkzyr+UzFUig1CVxqxvix8fQW
0aSptJ6VpvEtecqiUZmtcGGHtMIHTwkEW7RGfGExlt5ZwIhozHenWQJAGTUP90kX
FxlpgdNmuUcEJ2ykKrkbmeDBCNVKFb6VGLDPrVDYK/wgZ+ShoIEFzCIjP2rS/Iic
gxiyQxMII4qQWQ==
-----END PRIVATE KEY-----
$k$),
  ('pub2048', $k$-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA8lAfHb3nF1949xTXf+ZA
F3ZK77fHAQa7PnbvvQLQUO/tfBWy+g2fvjTO1T2yCS6DCG3qxQmdoLch+pHhjPMW
/bDAFUPl8dIWaZ0rq82DKPZ9UbGFMPeU3RMLUWbtdoAUMgTYa1aqQ0KkEBDwVsmK
L5yEHbPZ4p1zIonCR/2bl/lzewVbKTV4mwt1t//6vyZBwC8h/eusitFhX1a8O/J7
cSnQOvHXrXVAegAoR4DXT0GW+/O45vj+muS/pdQV41qEyNUg8eSxpfzjIeXlagRm
149ocfxUTVRj7B9gJhMruZ70zHQrz0cl5L0Ble64NwNK93JyJJ/d52DT7/6AcOc9
2QIDAQAB
-----END PUBLIC KEY-----
$k$),
  ('keyenc', $k$-----BEGIN ENCRYPTED PRIVATE KEY-----
MIIFLTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQIfR9olFbX7NECAggA
MAwGCCqGSIb3DQIJBQAwHQYJYIZIAWUDBAECBBCebYKG4zV3NrNyPdtVxGekBIIE
0NSMkmcbZSCb2hpMrUkcXUJVoySYIVk8HIkfPHQpQIt1Fuxg/fEDeyYLYC7gf3IF
kjRSPS6quNRJHGXP2WhYNCvcDg0yrO+W75q7HYKbes5/USSwBCn4NxM4nkhipkvk
4tBiGkvT1xkIaoheBWYNjOFCzCWiiNI0ZLQMenq/LczewoUQ1m+61qw1IDfgzZAm
MokDvzuEgWNH1+Ks5+voYOpSZQwPluG90Ijz4zhWcWJ3t/EP0NWqATzADfdu/G+K
rB39mpArhxlmt4TCOEKwG0M+3CCOUEOmP/MDCIQ11aka7/vezWenk9eMSVbEDJO/
K53rkgcXHh5ESGcd/vM2IljOOaZBRFp1cKdJEm/i2B+DLmx7RdF1YXnY0T9rmvBw
kBB+jn+wy3103Vn8YUh5C72J7jovcc4sC+wIxuxRQ/ecLF1y8ycbinK1D/dUr6/m
XGG6u+3kdBSmzrzXVFSb1vgqo77iuS/Ch4RxesB1A1UlIF/gP3ZK21ktzAOpT57I
QnFijac0NrRTPR2rrp1W9l2dyKjlnkODvW5eX17tVH2HqpUt35vgJQk78Bca2X9Z
7LO/4KmhjPOdNInZ01IWB01hg9qLtZTJlrLiKR3n1ywH+30VclyQWZ2/NB8pXEIQ
52DnLZRIWPhP2aaeuA/VIr3K0gseaXUJHQvtGm1GVxiVg6/3m+9VMEgzF74hqYTF
ftxSOQ18g9vGAGqIiaP27V07hRgpV6IV3oRco7aMM10a9SM7ewqUpI0sHUJbd6hu
xBNhWLANbosBK3OoHTTtA4g00KaXh4teHK2MFDtiwIM8Nj4LqHjKunsJ6G/s9r0a
oZ0wNsAEJW3zpz1ARrPfn3P4jBkb8GL0zfRmorUN7CR3FIbYnIrItvwIWQh6h3hu
U8isdQKPA9eY3pxZNEnmVIiYA4rXnSzwDjzq59FQfMMXvAAUUZ8reeSdwsGuuXwf
12XqKzOlOs5hbOcnpYhOo+0I0Yv3oh43QF5KwmM8DFHl9Ba2GqPnqW8RrErdupQz
r+2Alo7tRwpsZIQ6s56PiJcDzbt59CIZRamfIDZj26ayAwMpyfvnehr+gP6ZO0IS
/5DS9y741cLmVidsF4uoVjP2re1/mxqSEZSWqkPdOvSF7E7cfQBq3qa4+EUgEkqZ
IQV1F341c/VXDWv5nZksLT7xam6+dcfmaZhuxf7BVq+kcKhdV3hnUnXU068E0taH
xpvbv72fwl67YlpmFfdlMNqRNdL+frqLizSKeN4V4ETJHvvC2hDKRwx7QOI9GqG/
PKT3xkba0hi0GitOQ+bMRJ15Ue5e1bPFWM3M9Yg4Kbf4Vj16w+WrAxIDluDxPzb+
B5SBRSKYpkpJob8H73MaXlCFOBirfODlODkeN8QTh3tNnv7rQEK8KlAy/RLf+ApU
8I5wuOme5aSnH/2syo9h3gHW1tA84ESY2BSXp9I5L8dOgfxlmtsOGB2xVyxtWNRd
d4WEFRa1Q8Y4bLl2OW6DyZW+77tuB8+jUAlqugyWFjuMFAqGZYUTGhZtK1A6g7iy
jNtEuWI6Kf7nGvR9VMn2sJ8IppfV9vqMiKcPrx4WQUVpCcwTIC8ygyM3NItvmxkn
xUe9Ua0H/vX/J3Hh1Mn4+EGEo8GUSGQLGOMtCqmW01/6
-----END ENCRYPTED PRIVATE KEY-----
$k$);
CREATE FUNCTION ad_key(n text) RETURNS text LANGUAGE sql AS $$ SELECT pem FROM ad_keys WHERE name = n $$;

-- SQLSTATE, message and detail of a statement that must fail.
CREATE FUNCTION ad_err(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    detail text;
BEGIN
    EXECUTE stmt;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    RETURN SQLSTATE || ': ' || SQLERRM || coalesce(' (' || nullif(detail, '') || ')', '');
END $$;
CREATE FUNCTION ad_written() RETURNS text LANGUAGE sql AS $$
    SELECT (SELECT count(*) FROM callback_center.merchant_settings) || ' merchants, '
        || (SELECT count(*) FROM callback_center.endpoints WHERE format <> 'standard_webhooks')
        || ' formatted endpoints' $$;

SELECT callback_center.set_provider('ad-wx', 'wechatpay_v3', ARRAY['0123456789abcdef0123456789abcdef']);
SELECT callback_center.set_provider('ad-ali', 'alipay', ARRAY[ad_key('pub2048')]);
SELECT callback_center.set_provider('ad-up', 'unionpay', NULL);
SELECT callback_center.set_provider('ad-sw', 'standard_webhooks',
    ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.create_endpoint('ad-api', 'https://api.mch.weixin.qq.com', '{payment.query}') > 0 AS api;

-- set_merchant refuses, writing nothing.
SELECT ad_err(format('SELECT callback_center.set_merchant(NULL, %L, %L, %L)', '1900000109', ad_key('key2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, NULL, %L, %L)', 'ad-wx', ad_key('key2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, NULL, %L)', 'ad-wx', '1900000109', 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L, NULL)', 'ad-wx', '1900000109', ad_key('key2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'nobody', '1900000109', ad_key('key2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L)', 'ad-sw', '1900000109', ad_key('key2048')));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '', ad_key('key2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', 'mch id!', ad_key('key2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '1900000109', 'not a key', 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '1900000109', '', 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '1900000109',
    '-----BEGIN PRIVATE KEY-----' || chr(10) || 'AAAA' || chr(10) || '-----END PRIVATE KEY-----', 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('pub2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('key1024'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('keyenc'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L)', 'ad-wx', '1900000109', ad_key('key2048')));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L)', 'ad-up', '777290058110048', ad_key('key2048')));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-ali', '2021000000000001', ad_key('key2048'), 'S1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('key2048'), 'S 1'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('key2048'), 'S1', '[]'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('key2048'), 'S1',
    '{"back_url":"https://m.example/back"}'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('key2048'), 'S1',
    '{"notify_url":"ftp://m.example/notify"}'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, %L, %L)', 'ad-wx', '1900000109', ad_key('key2048'), 'S1',
    '{"notify_url":42}'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, NULL, %L)', 'ad-ali', '2021000000000001', ad_key('key2048'),
    '{"app_cert_sn":"not an sn"}'));
SELECT ad_err(format('SELECT callback_center.set_merchant(%L, %L, %L, NULL, %L)', 'ad-ali', '2021000000000001', ad_key('key2048'),
    '{"notify_url":"https://m.example/n"}'));
SELECT ad_written();

-- alter_endpoint refuses a bad format, writing nothing.
SELECT ad_err('SELECT callback_center.alter_endpoint(NULL, ''{"format": "alipay"}'')');
SELECT ad_err('SELECT callback_center.alter_endpoint(''ad-api'', ''{"format": null}'')');
SELECT ad_err('SELECT callback_center.alter_endpoint(''nowhere'', ''{"format": "alipay"}'')');
SELECT ad_err('SELECT callback_center.alter_endpoint(''ad-api'', ''{"format": "wechatpay_v2"}'')');
SELECT ad_written();

-- Accepted: shown without the key; loaded again, replaced.
SELECT callback_center.set_merchant('ad-wx', '1900000109', ad_key('key2048'), 'MCHSERIAL0001',
    '{"notify_url":"https://m.example/wx/refund"}');
SELECT callback_center.set_merchant('ad-ali', '2021000000000001', ad_key('key2048'), NULL,
    '{"app_cert_sn":"0123456789abcdef0123456789abcdef","alipay_root_cert_sn":"0123456789abcdef0123456789abcdef_fedcba9876543210fedcba9876543210"}');
SELECT callback_center.set_merchant('ad-wx', '1900000110', ad_key('key2048'), 'MCHSERIAL0002');
SELECT provider, format, merchant_id, key_serial, key_bits, options FROM callback_center.merchants ORDER BY provider;
SELECT callback_center.alter_endpoint('ad-api', '{"format": "wechatpay_v3"}');
SELECT ad_written();

-- A query endpoint of a provider format needs no https: its answers are verified.
SELECT callback_center.create_endpoint('ad-plain', 'http://127.0.0.1:9', '{payment.query}') > 0 AS plain;
SELECT ad_err('SELECT callback_center.set_provider_query_endpoint(''ad-wx'', ''ad-plain'')');
SELECT callback_center.alter_endpoint('ad-plain', '{"format": "wechatpay_v3"}');
SELECT callback_center.set_provider_query_endpoint('ad-wx', 'ad-plain');

-- Requests: built and signed, or the reason the event cannot be sent.
SELECT split_part(r, E'\n', 1) AS request_line,
       split_part(r, E'\n', 2) ~ '^Authorization: WECHATPAY2-SHA256-RSA2048 mchid="1900000110",nonce_str="[0-9a-f]{32}",signature="[A-Za-z0-9+/]+=*",timestamp="[0-9]+",serial_no="MCHSERIAL0002"$' AS authorization
  FROM callback_center._adapter_request((SELECT id FROM callback_center.endpoints WHERE name = 'ad-api'),
           'payment.query', 'o 1', '{"order_id":"o 1","provider":"ad-wx"}') r;
SELECT split_part(r, E'\n', 1) AS request_line, split_part(r, E'\n\n', 2) AS body
  FROM callback_center._adapter_request((SELECT id FROM callback_center.endpoints WHERE name = 'ad-api'),
           'payment.close', 'o1', '{"order_id":"o1","provider":"ad-wx"}') r;
SELECT ad_err('SELECT callback_center._adapter_request((SELECT id FROM callback_center.endpoints WHERE name = ''ad-api''),
           ''payment.query'', ''o1'', ''{"order_id":"o1","provider":"ad-up"}'')');
SELECT ad_err('SELECT callback_center._adapter_request((SELECT id FROM callback_center.endpoints WHERE name = ''ad-api''),
           ''payment.query'', ''o1'', ''{"order_id":"o1","provider":"ad-ali"}'')');
SELECT ad_err('SELECT callback_center._adapter_request((SELECT id FROM callback_center.endpoints WHERE name = ''ad-api''),
           ''order.closed'', ''o1'', ''{"order_id":"o1","provider":"ad-wx"}'')');

-- Alipay's amounts are yuan.
SELECT callback_center._yuan(1), callback_center._yuan(12345), callback_center._yuan(0);
-- The exact bytes Alipay signs: the node's object, whatever follows it.
SELECT callback_center._alipay_node_text('{"alipay_trade_query_response":{"code":"10000","a":"}"},"sign":"xx"}',
                                         'alipay_trade_query_response');
SELECT callback_center._alipay_node_text('{"alipay_trade_query_response": {"a":{"b":"x\"}{y"},"c":1},"alipay_cert_sn":"x","sign":"y"}',
                                         'alipay_trade_query_response');
SELECT callback_center._alipay_node_text('{"sign":"y","alipay_trade_query_response":{"a":1}}',
                                         'alipay_trade_query_response'),
       callback_center._alipay_node_text('{"error_response":{"code":"40002"},"sign":"y"}',
                                         'alipay_trade_query_response') IS NULL AS absent;
