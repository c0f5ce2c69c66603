#!/usr/bin/env bash
# What the delivery worker costs per event, in instructions and statements:
# figures that a busy machine does not disturb (wall-clock rates do).
#
#   bash bench/profile_delivery.sh [EVENTS]      (default 5000)
#
# Starts its own cluster with the postmaster under callgrind and
# pg_stat_statements, and its own nginx.  Callgrind cannot be told to start
# or stop counting in a forked backend (callgrind_control reaches only the
# postmaster), so each process dumps its counts whenever it re-reads the
# configuration (--dump-before=ProcessConfigFile) and starts again from zero.
# The worker first delivers 500 events (plans prepared, caches and the
# connection warm; dumped at the next reload), then EVENTS events queued in
# one transaction; the second dump is what those cost.  Prints the worker's
# instructions per delivered event, the statements it ran per event
# (pg_stat_statements calls and rows), and the functions that cost most
# inclusive of callees; the profile is kept as bench/results/callgrind.worker
# (read it with callgrind_annotate).  A tool, not part of make bench: under
# valgrind the worker runs some 50 times slower than nginx answers, so its
# record batches differ from a native run's: compare figures of this script
# with each other.
set -u
. "$(dirname "$0")/../test/lib.sh"
events=${1:-5000}

command -v callgrind_control >/dev/null ||
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
command -v callgrind_control >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
cc_ensure_packages || exit 1
cc_build_install || exit 1

work=$(cc_cluster_dir cc_profile) || exit 1
nginx_port=$(cc_free_port 18280)
port=$(cc_free_port 55732)
results_dir=$CC_ROOT/bench/results
cleanup() {
    [ -f "$work/nginx.pid" ] && as_root nginx -p "$work/nginx" -c "$work/nginx.conf" -s stop 2>/dev/null
    [ -f "$work/data/postmaster.pid" ] &&
        as_pg "$CC_BINDIR/pg_ctl" -D "$work/data" -m immediate -w stop >/dev/null 2>&1
    # Children under valgrind write their last dump after the postmaster is
    # gone: wait for them, or they recreate the directory.
    for _ in $(seq 50); do
        pgrep -f -- "-D $work/data" >/dev/null || break
        sleep 0.2
    done
    [ -n "${PROFILE_KEEP:-}" ] && echo "kept $work" || as_root rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$work/nginx/logs"
cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx/logs/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx/body;
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

cc_cluster_init "$work" "$port" <<CONF || exit 1
shared_preload_libraries = 'callback_center, pg_stat_statements'
pg_stat_statements.track = all
callback_center.database = 'postgres'
callback_center.allowed_destinations = '127.0.0.1, ::1'
callback_center.delivery_enabled = off
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
${PROFILE_CONF:-}
CONF
vg="valgrind --tool=callgrind"
# PROFILE_NATIVE=1: statements only, at full speed (no instruction counts).
[ -n "${PROFILE_NATIVE:-}" ] && vg=""
(cc_without_fds as_pg $vg ${vg:+--dump-before=ProcessConfigFile} \
    ${vg:+--callgrind-out-file="$work/cg.%p" --log-file="$work/vg.%p.log"} \
    "$CC_BINDIR/postgres" -D "$work/data" >"$work/server.log" 2>&1 &)
for _ in $(seq 600); do
    as_pg "$CC_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" && break
    sleep 0.5
done
psql_() { cc_psql "$port" -A -t "$@"; }
psql_ -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION callback_center CASCADE' \
    -c 'CREATE EXTENSION pg_stat_statements' || exit 1
# PROFILE_SQL: run after CREATE EXTENSION (to compare a setting or a table option).
[ -n "${PROFILE_SQL:-}" ] && { psql_ -c "$PROFILE_SQL" >/dev/null || exit 1; }
psql_ -c "SELECT callback_center.create_endpoint('prof', 'http://127.0.0.1:$nginx_port/hooks', '{prof.ev}')" >/dev/null || exit 1
pid=""
for _ in $(seq 600); do
    pid=$(psql_ -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'callback_center worker'")
    [ -n "$pid" ] && break
    sleep 0.5
done
[ -n "$pid" ] || { echo "no worker" >&2; exit 1; }

# The event of bench/delivery.sh.
enqueue() {
    psql_ -c "SELECT count(callback_center.enqueue('prof.ev', 'order-' || g,
                jsonb_build_object('order_id', 'order-' || g, 'amount_cents', 4200, 'currency', 'CNY',
                                   'user_id', 'u-' || (g % 1000), 'merchant_id', 'm-17')))
                FROM generate_series(1, $1) g" >/dev/null
}
drained() {
    local _
    for _ in $(seq 18000); do
        [ "$(psql_ -c "SELECT count(*) FROM callback_center.outbox WHERE status = 'delivered'")" = "$1" ] && return 0
        sleep 0.2
    done
    return 1
}
reload() { psql_ -c "SELECT pg_reload_conf()" >/dev/null; sleep 2; }

enqueue 500 || exit 1
psql_ -c "ALTER SYSTEM SET callback_center.delivery_enabled = on" >/dev/null
reload
drained 500 || { echo "the warm-up did not drain" >&2; exit 1; }
psql_ -c "VACUUM ANALYZE callback_center.outbox" -c "CHECKPOINT" -c "SELECT pg_stat_statements_reset()" -c "SELECT pg_stat_reset()" >/dev/null
reload
cc_say "worker $pid: delivering $events events under callgrind"
enqueue "$events" || exit 1
drained $((events + 500)) || echo "not all delivered" >&2
reload
delivered=$(($(psql_ -c "SELECT count(*) FROM callback_center.outbox WHERE status = 'delivered'") - 500))

mkdir -p "$results_dir"
if [ -z "$vg" ]; then
    ir=0
else
prof=$(ls -v "$work"/cg."$pid".* | tail -1)
# A forked child's "summary:" starts from its parent's counts; "totals:" is
# the sum of what the dump lists, which callgrind_annotate takes from it.
ir=$(sed -n 's/^totals: //p' "$prof")
sed "s/^summary: .*/summary: $ir/" "$prof" >"$results_dir/callgrind.worker"
prof=$results_dir/callgrind.worker
fi
cc_say "worker: $ir instructions for $delivered events: $((ir / (delivered > 0 ? delivered : 1))) per event"
# The worker's statements: those on the delivery tables, without enqueue's.
worker_sql="(query ~ 'callback_center\.(outbox|endpoints|endpoint_state|delivery_attempts)'
             AND query !~ 'INSERT INTO callback_center\.outbox|callback_center\.enqueue|^SELECT count\(\*\) FROM')"
cc_say "statements per delivered event (pg_stat_statements: calls, rows)"
psql_ -F ' | ' -c "SELECT round(calls::numeric / $delivered, 4) AS calls_per_event,
                          round(rows::numeric / $delivered, 3) AS rows_per_event,
                          left(regexp_replace(query, '\s+', ' ', 'g'), 90)
                     FROM pg_stat_statements WHERE $worker_sql ORDER BY calls DESC"
psql_ -c "SELECT 'statements per event: ' || round(sum(calls)::numeric / $delivered, 4)
            FROM pg_stat_statements WHERE $worker_sql"
psql_ -c "SELECT 'outbox: ' || n_tup_upd || ' updates, ' || n_tup_hot_upd || ' HOT'
            FROM pg_stat_user_tables WHERE relid = 'callback_center.outbox'::regclass"
cc_say "index reads per delivered event (pg_stat_user_indexes, after the warm-up)"
psql_ -F ' | ' -c "SELECT indexrelname, round(idx_scan::numeric / $delivered, 3) AS scans,
                          round(idx_tup_read::numeric / $delivered, 2) AS entries_read,
                          round(idx_tup_fetch::numeric / $delivered, 2) AS heap_fetched
                     FROM pg_stat_user_indexes WHERE schemaname = 'callback_center' AND idx_scan > 0
                    ORDER BY idx_tup_read DESC"
[ -z "$vg" ] && exit 0
cc_say "top functions, inclusive (callgrind_annotate --inclusive=yes)"
callgrind_annotate --inclusive=yes "$prof" 2>/dev/null | sed -n '/^Ir/,$p' | head -${PROFILE_TOP:-45}
