#!/usr/bin/env bash
# Timeout close at scale: 100,000 expired orders closed by the jobs worker
# while 16 pgbench clients place new orders.  One throwaway cluster, one run:
#
#   1. setup: 100,000 orders placed with a 1 s pay timeout (all expired by
#      the time the setup ends), jobs_enabled = off;
#   2. workload alone: pgbench places orders for BENCH_SECONDS (baseline);
#   3. jobs_enabled = on and the same workload at the same time: the worker
#      closes the backlog (stock restored, order.closed queued) while the
#      workload runs;
#   4. the workload alone again once the backlog is gone (drift check).
#
# Prints orders closed per second (during the workload and overall) and the
# workload's tps without and with the job.  Not part of make test.
#
#   bash bench/jobs_timeout.sh
#   BENCH_ORDERS=20000 BENCH_SECONDS=10 BENCH_CLIENTS=16 JOBS_BATCH=100 bash bench/jobs_timeout.sh
set -u
. "$(dirname "$0")/../test/lib.sh"
. "$(dirname "$0")/csv.sh"

BENCH_ORDERS=${BENCH_ORDERS:-100000}
BENCH_SECONDS=${BENCH_SECONDS:-20}
BENCH_CLIENTS=${BENCH_CLIENTS:-16}
JOBS_BATCH=${JOBS_BATCH:-100}

cc_ensure_packages || exit 1
cc_build_install || { echo "build failed" >&2; exit 1; }

work=$(cc_cluster_dir callback_center_jobs_bench) || exit 1
port=$(cc_free_port 55532)
trap 'cc_cluster_stop "$work"' EXIT
trap 'exit 130' INT TERM

cc_say "initdb in $work (port $port)"
cc_cluster_init "$work" "$port" <<CONF || exit 1
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
# Loopback is refused unless listed: the test receivers listen there.
callback_center.allowed_destinations = '127.0.0.1, ::1'
callback_center.jobs_enabled = off
callback_center.jobs_interval = '100ms'
callback_center.jobs_batch = $JOBS_BATCH
# Events wait in the outbox: this measures closing, not HTTP delivery.
callback_center.delivery_enabled = off
synchronous_commit = on
shared_buffers = 1GB
max_connections = 200
CONF
cc_cluster_start "$work" || exit 1

psql_() { cc_psql "$port" -A -t "$@"; }
now_s() { date +%s.%N; }
# calc EXPR [DECIMALS]: arithmetic on decimals (awk; no bc needed).
calc() { awk "BEGIN { printf \"%.${2:-2}f\", ($1) }"; }  # parenthesised: a bare > in awk printf redirects to a file

psql_ -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION callback_center CASCADE' || exit 1

# Stock for the backlog (bx-) and, separately, for the workload (bw-);
# an endpoint so that every close queues order.closed.
cc_say "setup: $BENCH_ORDERS expired orders"
t0=$(now_s)
psql_ <<SQL || exit 1
SELECT count(callback_center.set_stock('bx-' || i, 1000000000)) FROM generate_series(0, 999) i;
SELECT count(callback_center.set_stock('bw-' || i, 1000000000)) FROM generate_series(0, 9999) i;
SELECT callback_center.create_endpoint('bench-sink', 'http://127.0.0.1:9/sink', '{order.closed}') > 0;
SQL
chunk=10000
for ((from = 1; from <= BENCH_ORDERS; from += chunk)); do
    to=$((from + chunk - 1))
    [ $to -gt "$BENCH_ORDERS" ] && to=$BENCH_ORDERS
    psql_ >/dev/null <<SQL || exit 1
SET callback_center.pay_timeout = '1s';
SELECT count(*) FROM generate_series($from, $to) i,
     LATERAL callback_center.place_order('bx-' || i, 'u',
         jsonb_build_array(jsonb_build_object('sku', 'bx-' || (i % 1000), 'qty', 1)), 100);
SQL
done
psql_ -c 'VACUUM ANALYZE' || exit 1
t1=$(now_s)
open=$(psql_ -c "SELECT count(*) FROM callback_center.orders WHERE order_id LIKE 'bx-%' AND status = 'confirmed' AND pay_deadline < now()")
cc_say "setup took $(calc "$t1 - $t0" 1) s; $open expired orders waiting"

# The workload: each transaction places one order of 1-3 items (30 min
# timeout, so the job never closes these).
script=$work/place.sql
cat <<'SQL' | as_pg tee "$script" >/dev/null
\set n random(1, 2000000000)
\set a random(0, 9999)
\set b random(0, 9999)
SELECT status FROM callback_center.place_order('w' || :client_id || '-' || :n, 'u',
    jsonb_build_array(jsonb_build_object('sku', 'bw-' || :a, 'qty', 1),
                      jsonb_build_object('sku', 'bw-' || :b, 'qty', 2)), 300);
SQL
run_pgbench() { cc_pgbench_tps "$port" "$BENCH_CLIENTS" "$BENCH_SECONDS" "$script"; }
closed_so_far() { psql_ -c 'SELECT orders_closed FROM callback_center.jobs_status()'; }
set_jobs() {
    psql_ -c "ALTER SYSTEM SET callback_center.jobs_enabled = $1" -c 'SELECT pg_reload_conf()' >/dev/null
}

cc_say "workload alone: $BENCH_CLIENTS clients, ${BENCH_SECONDS}s"
tps_before=$(run_pgbench) || exit 1

cc_say "workload with the jobs worker closing the backlog"
c0=$(closed_so_far)
t_on=$(now_s)
set_jobs on
tps_with=$(run_pgbench) || exit 1
t_wl=$(now_s)
c_wl=$(closed_so_far)
# Let it finish the backlog (bounded wait: 20 minutes).
while :; do
    c=$(closed_so_far)
    [ $((c - c0)) -ge "$open" ] && break
    if [ "$(calc "$(now_s) - $t_on > 1200" 0)" = 1 ]; then
        echo "backlog not closed after 20 minutes ($((c - c0)) of $open)" >&2
        exit 1
    fi
    sleep 0.2
done
t_done=$(now_s)
c_done=$(closed_so_far)

cc_say "workload alone again"
tps_after=$(run_pgbench) || exit 1

# Every expired order closed once: none open, stock back in full.
check=$(psql_ <<'SQL'
SELECT (SELECT count(*) FROM callback_center.orders
         WHERE order_id LIKE 'bx-%' AND status <> 'closed') || ' open, '
    || (SELECT count(*) FROM callback_center.stock
         WHERE sku_id LIKE 'bx-%' AND available <> 1000000000) || ' SKUs short, '
    || (SELECT count(*) FROM callback_center.outbox
         WHERE aggregate_id LIKE 'bx-%' AND event_type = 'order.closed') || ' order.closed events'
SQL
)
errors=$(psql_ -c 'SELECT errors FROM callback_center.jobs_status()')

during=$(calc "($c_wl - $c0) / ($t_wl - $t_on)" 0)
overall=$(calc "($c_done - $c0) / ($t_done - $t_on)" 0)
ratio=$(calc "$tps_with / $tps_before")
ratio_after=$(calc "$tps_after / $tps_before")

bench_csv "timeout close: $open expired orders while $BENCH_CLIENTS clients place orders" \
    "$during" "closes/s" "" "" "" "" "" "" "" "report only"
bench_csv "timeout close: place_order tps with the job vs without" "$(bench_fmt "$tps_with")" "tps" \
    "$(bench_fmt "$tps_before")" "$ratio" "" "" "" "" "" "report only"

cat <<TABLE

jobs_timeout: $open expired orders, jobs_batch $JOBS_BATCH, $BENCH_CLIENTS clients placing orders, ${BENCH_SECONDS}s per phase
| measure | value |
|---|---:|
| orders closed per second, during the workload | $during |
| orders closed per second, start to last close | $overall |
| time to close the backlog | $(calc "$t_done - $t_on" 1) s |
| workload tps, job off (before) | $tps_before |
| workload tps, job closing the backlog | $tps_with ($ratio of before) |
| workload tps, job off (after) | $tps_after ($ratio_after of before) |
| check | $check, $errors job errors |
TABLE
