# Sourced by bench/cases/channels_<scheme>.case with the scheme as $1: sets
# the case's variables.  Verified payment callbacks per second of a payment
# channel against the HMAC path (Standard Webhooks) in the same run, 8
# clients, each transaction paying the next of BENCH_CH_ORDERS orders of
# its own: payment_callback() verifies, records once, moves payment and
# order, queues the follow-ups and answers.  The channel's notifications are
# signed (and for WeChat encrypted) in advance by bench/channel_vectors.pl
# with keys openssl makes for the run; the baseline's are signed in SQL by
# sign_webhook.  RSA-2048 verification (and for UnionPay the certificate
# chain) is the difference; target 0.5.
ch_scheme=$1
ch_n=${BENCH_CH_ORDERS:-40000}
ch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The channel's provider, keys, orders and signed notifications; a failed
# generator fails the setup.
ch_vectors=$(perl "$ch_dir/channel_vectors.pl" "$ch_scheme" "$ch_n") ||
    ch_vectors="DO \$\$ BEGIN RAISE EXCEPTION 'bench/channel_vectors.pl $ch_scheme failed'; END \$\$;"
CASE_TITLE="payment_callback() $ch_scheme (RSA) vs standard_webhooks (HMAC), verified callbacks/s"
CASE_BASELINE_TITLE="standard_webhooks payment_callback"
CASE_CLIENTS=8
CASE_SECONDS=2
CASE_TARGET=0.5
CASE_CONF="callback_center.delivery_enabled = off
callback_center.signature_tolerance = 86400"
CASE_SETUP="
SELECT callback_center.create_endpoint('bench_ch_all', 'https://all.bench.invalid/hook', '{*}');
SELECT callback_center.set_provider('bench-ch-sw-$ch_scheme', 'standard_webhooks',
       ARRAY['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw']);
SELECT callback_center.set_stock('bench-ch-sw-$ch_scheme-sku', 1000000000);
SELECT format('SELECT count(*) FROM (SELECT callback_center.place_order(''bench-ch-sw-$ch_scheme-'' || g,
                   ''bench-user'', ''[{\"sku\": \"bench-ch-sw-$ch_scheme-sku\", \"qty\": 1}]'', 100, NULL,
                   ''bench-ch-sw-$ch_scheme'') FROM generate_series(%s, %s) AS g) AS s', k + 1, least(k + 2000, $ch_n))
  FROM generate_series(0, $ch_n - 1, 2000) AS k \\gexec
CREATE TABLE public.bench_ch_sw_in (n integer PRIMARY KEY, headers jsonb, body text);
INSERT INTO public.bench_ch_sw_in
SELECT g, jsonb_build_object('webhook-id', 'msg-$ch_scheme-' || g,
           'webhook-timestamp', extract(epoch FROM now())::bigint::text,
           'webhook-signature', callback_center.sign_webhook(
               'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'msg-$ch_scheme-' || g,
               extract(epoch FROM now())::bigint, b)),
       b
  FROM generate_series(1, $ch_n) AS g,
       LATERAL (SELECT jsonb_build_object('type', 'payment.succeeded',
                    'data', jsonb_build_object('txn_id', 'bench-ch-txn-$ch_scheme-' || g,
                        'order_id', 'bench-ch-sw-$ch_scheme-' || g, 'amount_cents', 100,
                        'currency', 'CNY'))::text AS b) AS body;
CREATE SEQUENCE public.bench_ch_sw_seq;
$ch_vectors
VACUUM ANALYZE;
"
CASE_BASELINE="
SELECT nextval('public.bench_ch_sw_seq') AS n \gset
SELECT outcome FROM public.bench_ch_sw_in i,
       LATERAL callback_center.payment_callback('bench-ch-sw-$ch_scheme', i.headers, i.body) AS p
 WHERE i.n = :n;
"
CASE_PRODUCT="
SELECT nextval('public.bench_ch_${ch_scheme}_seq') AS n \gset
SELECT outcome FROM public.bench_ch_${ch_scheme}_in i,
       LATERAL callback_center.payment_callback('bench-ch-$ch_scheme', i.headers, i.body) AS p
 WHERE i.n = :n;
"
# Every notification must have paid (a refusal would time a cheaper path),
# and a run that used up the orders would time empty transactions.
CASE_TEARDOWN="
SELECT callback_center.drop_endpoint('bench_ch_all');
DO \$\$
BEGIN
    IF (SELECT last_value FROM public.bench_ch_${ch_scheme}_seq) > $ch_n
       OR (SELECT last_value FROM public.bench_ch_sw_seq) > $ch_n THEN
        RAISE EXCEPTION 'the runs used up the % orders of the setup', $ch_n;
    END IF;
    IF EXISTS (SELECT 1 FROM callback_center.orders o
                WHERE o.provider IN ('bench-ch-sw-$ch_scheme', 'bench-ch-$ch_scheme')
                  AND o.pay_status <> 'paid'
                  AND o.order_id IN (SELECT 'bench-ch-sw-$ch_scheme-' || g FROM generate_series(1,
                                         (SELECT last_value FROM public.bench_ch_sw_seq)) g
                                     UNION ALL
                                     SELECT 'bench-ch-$ch_scheme-' || g FROM generate_series(1,
                                         (SELECT last_value FROM public.bench_ch_${ch_scheme}_seq)) g)) THEN
        RAISE EXCEPTION 'a notification did not pay its order';
    END IF;
END
\$\$;
DROP TABLE public.bench_ch_sw_in, public.bench_ch_${ch_scheme}_in;
DROP SEQUENCE public.bench_ch_sw_seq, public.bench_ch_${ch_scheme}_seq;
"
