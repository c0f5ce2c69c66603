#!/usr/bin/env bash
# The delivery worker against its performance targets (issue 4), in one run:
#
#   1. wrk POSTing an event-sized body to a loopback nginx: the HTTP ceiling;
#   2. throughput draining N events queued to one endpoint (>= 20,000/s and
#      >= 0.30 of wrk);
#   3. latency from commit to delivery at 1,000 events per second (p50 <= 2
#      ms, p99 <= 10 ms), and at 10,000 per second offered (p99 <= 50 ms),
#      one event a transaction and, reported, ten;
#   4. no decay: the last 10% of 1,000,000 events drain at >= 90% of the
#      rate of the first 10%;
#   5. the worker's memory flat (within 10%) from 500,000 to 1,000,000
#      deliveries;
#   6. isolation: while one receiver holds every request 20 s, another
#      endpoint's p99 at 1,000 events per second stays <= 1 s.
#
#   bash bench/delivery.sh            full run (about 6 to 12 minutes)
#   bash bench/delivery.sh --quick    smaller sizes (about 2 minutes)
#   DELIVERY_ROUNDS=5 bash bench/delivery.sh     drains of step 2 (default 3)
#   DELIVERY_STEPS="wrk lat" bash bench/delivery.sh   only some steps
#                                     (wrk thr lat big stall; default all)
#   DELIVERY_CONF="callback_center.batch_size = 500" ...  extra settings
#
# Starts and stops its own PostgreSQL cluster (library preloaded) and its own
# nginx on free loopback ports; everything is stopped on exit.  Honours
# CC_BINDIR (test/lib.sh).  Prints a table (also written to
# bench/results/delivery.md; the server log is kept as
# bench/results/delivery_server.log) and exits non-zero when a target is
# missed.
# Method and figures: bench/README.md.
set -u
. "$(dirname "$0")/../test/lib.sh"
. "$(dirname "$0")/csv.sh"

QUICK=0
for a in "$@"; do
    case $a in
        --quick) QUICK=1 ;;
        *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
    esac
done
if [ $QUICK = 1 ]; then
    N_THR=${DELIVERY_N:-20000} ROUNDS=${DELIVERY_ROUNDS:-2}
    LAT_SECONDS=10 N_BIG=200000 MEM_FIRST=20000 WRK_SECONDS=3
else
    N_THR=${DELIVERY_N:-100000} ROUNDS=${DELIVERY_ROUNDS:-3}
    LAT_SECONDS=20 N_BIG=1000000 MEM_FIRST=100000 WRK_SECONDS=5
fi
LAT_RATE=1000 LAT_HIGH=10000 STALL_S=20
STEPS=" ${DELIVERY_STEPS:-wrk thr lat big stall} "
step() { [[ $STEPS == *" $1 "* ]]; }
CHUNK=50000                     # events per enqueuing transaction

cc_ensure_packages || exit 1
cc_build_install || { echo "build failed" >&2; exit 1; }

work=$(cc_cluster_dir cc_delivery_bench) || exit 1
nginx_port=$(cc_free_port 18180)
port=$(cc_free_port 55632)
results_dir=$CC_ROOT/bench/results

cleanup() {
    # The server log (with the worker's memory-context dumps) outlives the run.
    [ -f "$work/server.log" ] && mkdir -p "$results_dir" &&
        cp "$work/server.log" "$results_dir/delivery_server.log"
    if [ -f "$work/nginx.pid" ]; then
        as_root nginx -p "$work/nginx" -c "$work/nginx.conf" -s stop 2>/dev/null
    fi
    cc_cluster_stop "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# nginx: one worker process, keep-alive without limits, 200 to everything.
mkdir -p "$work/nginx/logs"
cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx/logs/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {
        listen 127.0.0.1:$nginx_port;
        location / { return 200 "ok"; }
    }
}
NGINX
(cc_without_fds as_root nginx -p "$work/nginx" -c "$work/nginx.conf") ||
    { echo "nginx did not start" >&2; exit 1; }

cc_say "initdb in $work (port $port, nginx on $nginx_port)"
cc_cluster_init "$work" "$port" <<CONF || exit 1
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
# Loopback is refused unless listed: the test receivers listen there.
callback_center.allowed_destinations = '127.0.0.1, ::1'
synchronous_commit = on
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 30min
max_connections = 100
log_line_prefix = '%m [%p] '
${DELIVERY_CONF:-}
CONF
cc_cluster_start "$work" || exit 1

psql_() { cc_psql "$port" -A -t "$@"; }
psql_ -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION callback_center CASCADE' || exit 1

max_concurrent=$(psql_ -c "SHOW callback_center.max_concurrent")
max_per_endpoint=$(psql_ -c "SHOW callback_center.max_per_endpoint")
batch_size=$(psql_ -c "SHOW callback_center.batch_size")
# One endpoint: the worker runs at most this many requests at once.
conns=$((max_concurrent < max_per_endpoint ? max_concurrent : max_per_endpoint))
url="http://127.0.0.1:$nginx_port/hooks/orders"
psql_ -c "SELECT callback_center.create_endpoint('bench', '$url', '{bench.paid,bench.lat}')" >/dev/null || exit 1
worker_pid=$(psql_ -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'callback_center worker'")
[ -n "$worker_pid" ] || { echo "no worker running" >&2; exit 1; }

# An event body of the shape the worker sends, for wrk and for enqueue.
payload_sql="jsonb_build_object('order_id', 'order-' || g, 'amount_cents', 4200, 'currency', 'CNY', 'user_id', 'u-' || (g % 1000), 'merchant_id', 'm-17')"
body=$(psql_ -c "SELECT jsonb_build_object('type', 'bench.paid', 'timestamp', now(), 'aggregate_id', 'order-1', 'data', $payload_sql)::text FROM (SELECT 1 AS g) s")

# --- helpers ---------------------------------------------------------------

# Pauses or resumes delivery and waits until the worker has re-read it.
set_delivery() {
    local before
    before=$(psql_ -c "SELECT reloads FROM callback_center.worker_status()")
    psql_ -c "ALTER SYSTEM SET callback_center.delivery_enabled = $1" -c "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 1 200); do
        [ "$(psql_ -c "SELECT reloads FROM callback_center.worker_status()")" -gt "$before" ] && return 0
        sleep 0.05
    done
    echo "the worker did not reload" >&2
    return 1
}

# Queues $1 events of type bench.paid in transactions of CHUNK events.
enqueue_n() {
    local n=$1 done_=0 k
    while [ "$done_" -lt "$n" ]; do
        k=$((n - done_ < CHUNK ? n - done_ : CHUNK))
        psql_ -c "SELECT count(callback_center.enqueue('bench.paid', 'order-' || g, $payload_sql))
                    FROM generate_series($done_ + 1, $done_ + $k) g" >/dev/null || return 1
        done_=$((done_ + k))
    done
}

# Waits until nothing is pending or in flight (at most $1 seconds).
wait_drained() {
    local limit=$1 i
    for ((i = 0; i < limit * 10; i++)); do
        [ "$(psql_ -c "SELECT NOT EXISTS (SELECT 1 FROM callback_center.outbox WHERE status IN ('pending', 'delivering'))")" = t ] && return 0
        sleep 0.1
    done
    echo "the outbox did not drain within $limit s" >&2
    return 1
}

last_id() { psql_ -c "SELECT coalesce(max(id), 0) FROM callback_center.outbox"; }

# Prepares a drain: statistics fresh, dirty buffers written, so that a
# checkpoint does not land in the middle of the measurement.
quiesce() { psql_ -c "VACUUM ANALYZE callback_center.outbox" -c "CHECKPOINT" >/dev/null; }

# Prints a pass/FAIL verdict for "$1 >= $2" ("$3" = le for "$1 <= $2").
verdict() {
    if [ "${3:-ge}" = le ]; then
        awk -v a="$1" -v b="$2" 'BEGIN { print (a <= b) ? "PASS" : "FAIL" }'
    else
        awk -v a="$1" -v b="$2" 'BEGIN { print (a >= b) ? "PASS" : "FAIL" }'
    fi
}

median() {
    printf '%s\n' "$@" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Memory of the worker: VmRSS and RssAnon (/proc/<pid>/status; RssAnon is
# its private heap, VmRSS also counts the shared buffers it has touched),
# Pss (smaps_rollup), and the grand total of its memory contexts, which it
# logs for pg_log_backend_memory_contexts().  Appends "label rss anon pss
# context_bytes" to mem.txt.
: >"$work/mem.txt"
ndumps=0
mem_sample() {
    local label=$1 out=${2:-$work/mem.txt} rss anon pss i ctx=""
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$worker_pid/status")
    anon=$(awk '/^RssAnon:/ { print $2 }' "/proc/$worker_pid/status")
    pss=$(awk '/^Pss:/ { print $2 }' "/proc/$worker_pid/smaps_rollup")
    ndumps=$((ndumps + 1))
    psql_ -c "SELECT pg_log_backend_memory_contexts($worker_pid)" >/dev/null
    for ((i = 0; i < 100; i++)); do
        ctx=$(sed -n 's/.*Grand total: \([0-9]*\) bytes.*/\1/p' "$work/server.log" | sed -n "${ndumps}p")
        [ -n "$ctx" ] && break
        sleep 0.05
    done
    echo "$label $rss $anon $pss ${ctx:-0}" >>"$out"
}
# The worker at rest: delivery paused (no round runs, so no round's
# transient memory), three samples, the smallest kept; then resumes.
idle_sample() {
    local i
    set_delivery off || exit 1
    : >"$work/idle.txt"
    for i in 1 2 3; do
        sleep 0.3
        mem_sample "$1" "$work/idle.txt"
    done
    sort -k5,5n "$work/idle.txt" | head -1 >>"$work/mem.txt"
    set_delivery on || exit 1
}

rows=()
failures=0
row() {
    rows+=("| $1 | $2 | $3 | $4 |")
    [ "$4" = FAIL ] && failures=$((failures + 1))
    return 0
}

# --- 1. wrk -----------------------------------------------------------------

cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = [[$body]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["webhook-id"] = "msg_123456"
wrk.headers["webhook-timestamp"] = "1732500000"
wrk.headers["webhook-signature"] = "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="
LUA
wrk_rate=0
if step wrk; then
cc_say "1. wrk: POST of a ${#body}-byte body, $conns connections, ${WRK_SECONDS}s x 3"
wrk_rates=()
for r in 1 2 3; do
    rate=$(wrk -t2 -c"$conns" -d"${WRK_SECONDS}s" -s "$work/post.lua" "$url" |
        awk '/Requests\/sec/ { printf "%d", $2 }')
    echo "    round $r: $rate requests/s"
    wrk_rates+=("$rate")
done
wrk_rate=$(median "${wrk_rates[@]}")
row "wrk -t2 -c$conns POST (the HTTP ceiling), median of 3" "$(printf '%.0f/s' "$wrk_rate")" "-" "report"
bench_csv "HTTP ceiling: wrk POST to nginx" "$(bench_fmt "$wrk_rate")" "req/s" "" "" "" "" "" "" "" "report only"
fi

# --- 2. throughput ------------------------------------------------------------

if step thr; then
cc_say "2. throughput: $N_THR events to one endpoint, $ROUNDS drains"
thr_rates=()
for ((r = 1; r <= ROUNDS; r++)); do
    set_delivery off || exit 1
    base=$(last_id)
    enqueue_n "$N_THR" || exit 1
    quiesce
    t0=$(psql_ -c "SELECT extract(epoch FROM clock_timestamp())")
    set_delivery on || exit 1
    wait_drained 600 || exit 1
    line=$(psql_ -F ' ' -c "SELECT count(*), count(*) FILTER (WHERE status = 'delivered'),
                                   extract(epoch FROM max(delivered_at)) - $t0
                              FROM callback_center.outbox WHERE id > $base")
    read -r n ok secs <<<"$line"
    rate=$(awk -v n="$ok" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    printf '    round %d: %d of %d delivered in %.2f s: %s/s\n' "$r" "$ok" "$n" "$secs" "$rate"
    [ "$ok" -eq "$N_THR" ] || { echo "not every event was delivered" >&2; failures=$((failures + 1)); }
    thr_rates+=("$rate")
    [ "$r" = 1 ] && idle_sample "idle:$N_THR"
done
thr=$(median "${thr_rates[@]}")
row "throughput, $N_THR events queued then drained, median of $ROUNDS (min $(printf '%s\n' "${thr_rates[@]}" | sort -g | head -1), max $(printf '%s\n' "${thr_rates[@]}" | sort -g | tail -1))" \
    "$(printf '%.0f/s' "$thr")" ">= 20000/s" "$(verdict "$thr" 20000)"
if [ "$wrk_rate" != 0 ]; then
    thr_ratio=$(awk -v a="$thr" -v b="$wrk_rate" 'BEGIN { printf "%.2f", a / b }')
    row "throughput / wrk" "$thr_ratio" ">= 0.30" "$(verdict "$thr_ratio" 0.30)"
    read -r lo hi <<<"$(printf '%s\n' "${thr_rates[@]}" | sort -g | awk -v w="$wrk_rate" \
        'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f %.2f", lo / w, hi / w }')"
    bench_csv "delivery: $N_THR events drained vs wrk" "$(bench_fmt "$thr")" "events/s" \
        "$(bench_fmt "$wrk_rate") req/s" "$thr_ratio" "$lo" "$hi" "" "" "0.30" \
        "$( [ "$(verdict "$thr_ratio" 0.30)" = PASS ] && [ "$(verdict "$thr" 20000)" = PASS ] && echo pass || echo FAIL)"
fi
fi

# --- 3. latency ---------------------------------------------------------------

# Offers RATE enqueues per second (pgbench -R, one event per transaction,
# CLIENTS clients) for LAT_SECONDS, waits until those events are delivered
# (with UNTIL, a query that must turn true instead) and prints "n p50 p99
# max" of commit -> delivered in ms for them.
latency_run() {
    local rate=$1 clients=$2 until=${3:-} per_tx=${4:-1} base out line
    base=$(last_id)
    if [ "$per_tx" = 1 ]; then
        cat >"$work/lat.sql" <<'SQL'
\set g random(1, 100000000)
SELECT callback_center.enqueue('bench.lat', 'order-' || :g, jsonb_build_object('order_id', 'order-' || :g, 'amount_cents', 4200, 'currency', 'CNY', 'user_id', 'u-' || (:g % 1000), 'merchant_id', 'm-17'));
SQL
    else
        cat >"$work/lat.sql" <<SQL
\\set g random(1, 100000000)
SELECT count(callback_center.enqueue('bench.lat', 'order-' || (:g + i), jsonb_build_object('order_id', 'order-' || (:g + i), 'amount_cents', 4200, 'currency', 'CNY', 'user_id', 'u-' || ((:g + i) % 1000), 'merchant_id', 'm-17')))
  FROM generate_series(0, $((per_tx - 1))) i;
SQL
    fi
    chmod 644 "$work/lat.sql"
    out=$(as_pg "$CC_BINDIR/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c "$clients" -j 2 \
        -R "$((rate / per_tx))" -T "$LAT_SECONDS" -f "$work/lat.sql" postgres 2>&1)
    echo "$out" | grep -E '^(tps|latency average|number of transactions actually)' | sed 's/^/    pgbench: /' >&2
    if [ -z "$until" ]; then
        wait_drained 120 || return 1
    else
        for ((i = 0; i < 1200; i++)); do
            [ "$(psql_ -c "$until")" = t ] && break
            sleep 0.1
        done
    fi
    psql_ -F ' ' -c "SELECT count(*),
        round((percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::numeric, 2),
        round((percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::numeric, 2),
        round(max(ms)::numeric, 2)
   FROM (SELECT extract(epoch FROM delivered_at - created_at) * 1000 AS ms
           FROM callback_center.outbox
          WHERE id > $base AND event_type = 'bench.lat' AND status = 'delivered') s"
}

if step lat; then
cc_say "3. latency: pgbench -R $LAT_RATE for ${LAT_SECONDS}s, one enqueue per transaction"
read -r n p50 p99 pmax <<<"$(latency_run "$LAT_RATE" 4)" || exit 1
echo "    $n events: p50 $p50 ms, p99 $p99 ms, max $pmax ms"
echo "    measured: outbox.delivered_at - outbox.created_at, i.e. from the start of"
echo "    the enqueuing transaction (it commits right after) to the start of the"
echo "    worker's recording transaction, which begins once the HTTP 200 is in"
row "latency commit -> delivered at ${LAT_RATE}/s, p50 ($n events)" "$p50 ms" "<= 2 ms" "$(verdict "$p50" 2 le)"
row "latency p99 / max" "$p99 ms / $pmax ms" "<= 10 ms" "$(verdict "$p99" 10 le)"
bench_csv "delivery latency at ${LAT_RATE}/s (commit to delivered)" "$n" "events" "" "" "" "" \
    "$p50" "$p99" "p50 <= 2 ms; p99 <= 10 ms" \
    "$( [ "$(verdict "$p50" 2 le)" = PASS ] && [ "$(verdict "$p99" 10 le)" = PASS ] && echo pass || echo FAIL)"

cc_say "3b. latency: pgbench -R $LAT_HIGH offered for ${LAT_SECONDS}s"
read -r n p50 p99 pmax <<<"$(latency_run "$LAT_HIGH" 16)" || exit 1
achieved=$((n / LAT_SECONDS))
echo "    $n events ($achieved/s achieved): p50 $p50 ms, p99 $p99 ms, max $pmax ms"
row "latency at ${LAT_HIGH}/s offered ($achieved/s achieved), p99 / max" "$p99 ms / $pmax ms" "<= 50 ms" "$(verdict "$p99" 50 le)"
bench_csv "delivery latency at ${LAT_HIGH}/s offered ($achieved/s achieved)" "$n" "events" "" "" "" "" \
    "$p50" "$p99" "p99 <= 50 ms" "$( [ "$(verdict "$p99" 50 le)" = PASS ] && echo pass || echo FAIL)"

# The same events per second in transactions of 10 (an order paid notifies
# several endpoints): the enqueuing side commits a tenth as often, and
# leaves the cores to the worker that one-event transactions take.
cc_say "3c. latency: ${LAT_HIGH} events/s offered in transactions of 10 for ${LAT_SECONDS}s"
read -r n p50 p99 pmax <<<"$(latency_run "$LAT_HIGH" 4 "" 10)" || exit 1
achieved=$((n / LAT_SECONDS))
echo "    $n events ($achieved/s achieved): p50 $p50 ms, p99 $p99 ms, max $pmax ms"
row "latency at ${LAT_HIGH}/s offered, 10 events a transaction ($achieved/s achieved), p99 / max" \
    "$p99 ms / $pmax ms" "-" "report"
bench_csv "delivery latency at ${LAT_HIGH}/s offered, 10 events a transaction ($achieved/s achieved)" \
    "$n" "events" "" "" "" "" "$p50" "$p99" "-" "report only"
fi

# --- 4 and 5. a long drain: decay and memory -------------------------------------

if step big; then
cc_say "4/5. $N_BIG events queued, then drained; worker memory sampled"
# The worker at rest before this drain, once it has delivered (its caches
# and plans filled): the sample step 2 took after its first drain, else
# one after a drain of MEM_FIRST events here.  A sample before any
# delivery would count the caches' first filling as growth.
if ! grep -q '^idle:' "$work/mem.txt"; then
    enqueue_n "$MEM_FIRST" || exit 1
    wait_drained 120 || exit 1
    idle_sample "idle:0"
fi
set_delivery off || exit 1
base=$(last_id)
att_base=$(psql_ -c "SELECT coalesce(max(id), 0) FROM callback_center.delivery_attempts")
enqueue_n "$N_BIG" || exit 1
quiesce
t0=$(psql_ -c "SELECT extract(epoch FROM clock_timestamp())")
set_delivery on || exit 1
step=$((N_BIG / 10))
next=$MEM_FIRST
while :; do
    done_=$(psql_ -c "SELECT coalesce(max(id), 0) - $att_base FROM callback_center.delivery_attempts")
    if [ "$done_" -ge "$next" ]; then
        mem_sample "drain:$done_"
        next=$((next + step))
    fi
    [ "$done_" -ge "$N_BIG" ] && break
    sleep 0.2
    if [ $(( $(date +%s) - ${t0%.*} )) -gt 900 ]; then
        echo "the long drain did not finish within 900 s" >&2
        exit 1
    fi
done
wait_drained 120 || exit 1
idle_sample "idle:$N_BIG"
echo "    sample (deliveries)    VmRSS kB   RssAnon kB   Pss kB   context total bytes"
awk '{ printf "    %-20s %10s %12s %8s %21s\n", $1, $2, $3, $4, $5 }' "$work/mem.txt"

# Per-decile drain rates from delivered_at, starting at t0.
psql_ -F ' ' -c "SELECT k, extract(epoch FROM max(delivered_at)) - $t0, count(*)
                   FROM (SELECT delivered_at, ntile(10) OVER (ORDER BY delivered_at, id) AS k
                           FROM callback_center.outbox WHERE id > $base AND status = 'delivered') s
                  GROUP BY k ORDER BY k" >"$work/deciles.txt"
awk 'BEGIN { prev = 0 } { rate = $3 / ($2 - prev); printf "    decile %2d: %7d events by %7.2f s: %6.0f/s\n", $1, $3, $2, rate; prev = $2 }' \
    "$work/deciles.txt"
first=$(awk 'NR == 1 { printf "%.0f", $3 / $2 }' "$work/deciles.txt")
last=$(awk '{ r = $3 / ($2 - prev); prev = $2 } END { printf "%.0f", r }' "$work/deciles.txt")
ratio=$(awk -v a="$last" -v b="$first" 'BEGIN { printf "%.2f", a / b }')
bench_csv "delivery: last / first 10% of $N_BIG events" "$last" "events/s" "$first" "$ratio" "" "" "" "" \
    "0.90" "$( [ "$(verdict "$ratio" 0.9)" = PASS ] && echo pass || echo FAIL)"
row "$N_BIG events: whole drain" "$(awk '{ n += $3; t = $2 } END { printf "%.0f/s", n / t }' "$work/deciles.txt")" "-" "report"
row "last 10% / first 10% of $N_BIG ($last/s vs $first/s)" "$ratio" ">= 0.90" "$(verdict "$ratio" 0.9)"

# Private heap: the highest sample up to half of the long drain (with the
# one at rest before it) against the highest after (with the one at rest at
# the end); glibc returns freed heap to the system only now and then, so a
# single sample swings by 10 to 20%, a leak raises the peaks.  Memory
# contexts: at rest before against at rest after (a sample taken during a
# round counts that round's batch).
half=$((N_BIG / 2))
read -r anon1 anon2 <<<"$(sed 's/^[a-z]*://' "$work/mem.txt" | awk -v h="$half" \
    'NR == 1 || $1 <= h { if ($3 > e) e = $3; next } { if ($3 > l) l = $3 } END { print e + 0, l + 0 }')"
read -r _ _ _ _ ctx1 <<<"$(grep '^idle:' "$work/mem.txt" | head -1)"
read -r _ _ _ _ ctx2 <<<"$(grep '^idle:' "$work/mem.txt" | tail -1)"
anon_ratio=$(awk -v a="$anon2" -v b="$anon1" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
row "worker RssAnon, highest up to $half -> after $half deliveries" \
    "$anon1 -> $anon2 kB ($anon_ratio)" "<= 1.10" "$(verdict "$anon_ratio" 1.10 le)"
bench_csv "delivery: worker memory, $half -> $N_BIG deliveries" "$anon2" "kB" "$anon1" "$anon_ratio" "" "" "" "" \
    "<=1.10" "$( [ "$(verdict "$anon_ratio" 1.10 le)" = PASS ] && echo pass || echo FAIL)"
if [ "$ctx1" -gt 0 ] && [ "$ctx2" -gt 0 ]; then
    ctx_ratio=$(awk -v a="$ctx2" -v b="$ctx1" 'BEGIN { printf "%.2f", a / b }')
    row "worker memory contexts at rest, before -> after the $N_BIG" "$ctx1 -> $ctx2 bytes ($ctx_ratio)" "<= 1.10" "$(verdict "$ctx_ratio" 1.10 le)"
else
    row "worker memory contexts" "not logged" "<= 1.10" "FAIL"
fi
fi

# --- 6. isolation: one receiver stalls every request ---------------------------

if step stall; then
cc_say "6. isolation: a receiver holding every request ${STALL_S} s, latency of another endpoint at ${LAT_RATE}/s"
stall_port=$(cc_free_port 18380)
# Accepts, reads the request, answers 200 only after STALL_S seconds.
python3 - "$stall_port" "$STALL_S" >"$work/stall.log" 2>&1 <<'PY' &
import socket, sys, threading, time
port, hold = int(sys.argv[1]), float(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1024)
def held(c):
    try:
        c.recv(65536)
        time.sleep(hold)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=held, args=(c,), daemon=True).start()
PY
stall_pid=$!
trap 'kill $stall_pid 2>/dev/null; cleanup' EXIT
sleep 0.5
psql_ -c "SELECT callback_center.create_endpoint('stalled', 'http://127.0.0.1:$stall_port/hold',
            '{bench.stall}', NULL, '{\"timeout_ms\": $(( (STALL_S + 10) * 1000 ))}')" >/dev/null || exit 1
# Enough held events to keep every slot of the stalled endpoint busy for the
# whole measurement.
psql_ -c "SELECT count(callback_center.enqueue('bench.stall', 's-' || g, '{}')) FROM generate_series(1, 200) g" >/dev/null
for ((i = 0; i < 100; i++)); do
    [ "$(psql_ -c "SELECT count(*) > 0 FROM callback_center.outbox WHERE event_type = 'bench.stall' AND status = 'delivering'")" = t ] && break
    sleep 0.1
done
held=$(psql_ -c "SELECT count(*) FROM callback_center.outbox WHERE event_type = 'bench.stall' AND status = 'delivering'")
read -r n p50 p99 pmax <<<"$(latency_run "$LAT_RATE" 4 \
    "SELECT NOT EXISTS (SELECT 1 FROM callback_center.outbox WHERE event_type = 'bench.lat' AND status IN ('pending', 'delivering'))")" || exit 1
echo "    $held requests held by the stalled receiver; the other endpoint: $n events, p50 $p50 ms, p99 $p99 ms, max $pmax ms"
row "other endpoint's latency while one receiver holds $held requests ${STALL_S} s each, p99 / max" \
    "$p99 ms / $pmax ms" "<= 1000 ms" "$(verdict "$p99" 1000 le)"
bench_csv "delivery isolation: p99 of an endpoint beside one stalling ${STALL_S} s per request" "$n" "events" "" "" "" "" \
    "$p50" "$p99" "p99 <= 1000 ms" "$( [ "$(verdict "$p99" 1000 le)" = PASS ] && echo pass || echo FAIL)"
fi

# --- table ------------------------------------------------------------------------

{
    echo "| measurement | figure | target | verdict |"
    echo "|---|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
} >"$work/table.md"
mkdir -p "$results_dir"
{
    echo "# callback_center delivery benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), PostgreSQL $CC_PG_VERSION, $(nproc) CPUs," \
        "load average $(cut -d ' ' -f 1-3 /proc/loadavg), batch_size $batch_size," \
        "max_concurrent $max_concurrent, max_per_endpoint $max_per_endpoint$([ $QUICK = 1 ] && echo ', --quick')."
    echo
    cat "$work/table.md"
} >"$results_dir/delivery.md"
echo
tail -n +3 "$results_dir/delivery.md"
echo
echo "written to bench/results/delivery.md"
[ "$failures" -eq 0 ]
