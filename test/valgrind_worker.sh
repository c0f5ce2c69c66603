#!/usr/bin/env bash
# Runs the delivery worker under valgrind (memcheck) for a short delivery
# run and prints what it leaked.  A tool, not part of the suite: it takes a
# few minutes (everything runs about 30 times slower under valgrind).
#
#   CC_BINDIR=... bash test/valgrind_worker.sh [EVENTS]
#
# A throwaway cluster is started with its postmaster under valgrind, so the
# worker (a forked child) is too.  The worker delivers EVENTS events
# (default 500) to the loopback receiver, a few more that fail (HTTP 500,
# connection refused) and one refused by callback_center.allowed_destinations,
# then is terminated (pg_terminate_backend), and valgrind's leak report of
# that process is printed.  PostgreSQL's own memory contexts are malloc'd
# blocks that stay reachable: what this finds are malloc-level leaks (libcurl,
# OpenSSL, the response buffers and allowlists of src/http.c and
# src/allowlist.c).  Needs the Debian package valgrind.
set -u
. "$(dirname "$0")/lib.sh"
events=${1:-500}

command -v valgrind >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
cc_ensure_packages || exit 1
cc_build_install || exit 1

dir=$(mktemp -d /tmp/cc_valgrind.XXXXXX)
chmod 755 "$dir"
as_root chown "$CC_PG_USER" "$dir"
port=$(cc_free_port 55432)
psql_() { as_pg "$CC_BINDIR/psql" -X -q -At -h "$dir" -p "$port" -d postgres -c "$1"; }
cleanup() {
    as_pg "$CC_BINDIR/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1
    [ -n "${rcv_pid:-}" ] && as_root kill "$rcv_pid" 2>/dev/null
}
trap cleanup EXIT

as_pg "$CC_BINDIR/initdb" -D "$dir/data" -A trust >/dev/null || exit 1
cat <<CONF | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
shared_preload_libraries = 'callback_center'
callback_center.poll_interval = '100ms'
callback_center.batch_size = 50
callback_center.retry_jitter = 0
# Loopback is refused unless listed: the test receivers listen there.
callback_center.allowed_destinations = '127.0.0.1, ::1'
max_worker_processes = 8
CONF

# The receiver, as the cluster owner (it writes into $dir).
as_pg python3 "$CC_ROOT/test/receiver.py" --port 0 --portfile "$dir/rcv.port" \
    --log "$dir/rcv.jsonl" --max-seconds 3600 >"$dir/rcv.out" 2>&1 &
rcv_pid=$!
for _ in $(seq 100); do [ -s "$dir/rcv.port" ] && break; sleep 0.1; done
rport=$(cat "$dir/rcv.port")

cc_say "starting the cluster under valgrind (logs in $dir)"
as_pg valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite,indirect \
    --errors-for-leak-kinds=definite --num-callers=30 --error-limit=no \
    --suppressions="$CC_ROOT/test/valgrind.supp" \
    --log-file="$dir/vg.%p.log" \
    "$CC_BINDIR/postgres" -D "$dir/data" >"$dir/server.log" 2>&1 &
for _ in $(seq 600); do
    as_pg "$CC_BINDIR/pg_isready" -q -h "$dir" -p "$port" && break
    sleep 0.5
done
psql_ "CREATE EXTENSION callback_center CASCADE" || exit 1
for _ in $(seq 600); do
    pid=$(psql_ "SELECT pid FROM callback_center.worker_status()")
    [ -n "$pid" ] && break
    sleep 0.5
done
cc_say "worker pid $pid; delivering $events events"
psql_ "SELECT callback_center.create_endpoint('vg', 'http://127.0.0.1:$rport/vg', '{vg.ev}')" >/dev/null
psql_ "SELECT callback_center.create_endpoint('vg_down', 'http://127.0.0.1:1/down', '{vg.down}')" >/dev/null
psql_ "SELECT callback_center.create_endpoint('vg_500', 'http://127.0.0.1:$rport/fail', '{vg.fail}')" >/dev/null
curl -s -o /dev/null -X POST "http://127.0.0.1:$rport/__control" -d '{"path": "/fail", "mode": "500"}'
psql_ "SELECT callback_center.enqueue('vg.ev', 'v' || i, jsonb_build_object('i', i)) FROM generate_series(1, $events) i" >/dev/null
psql_ "SELECT callback_center.enqueue('vg.down', 'd' || i, '{}') FROM generate_series(1, 5) i" >/dev/null
psql_ "SELECT callback_center.enqueue('vg.fail', 'f' || i, '{}') FROM generate_series(1, 5) i" >/dev/null
for _ in $(seq 1200); do
    left=$(psql_ "SELECT count(*) FROM callback_center.outbox WHERE status IN ('pending', 'delivering')")
    [ "$left" = 0 ] && break
    sleep 0.5
done
# One refused by the allowlist.
psql_ "ALTER SYSTEM SET callback_center.allowed_destinations = '10.0.0.0/8'" >/dev/null
psql_ "SELECT pg_reload_conf()" >/dev/null
psql_ "SELECT callback_center.enqueue('vg.ev', 'blocked', '{}')" >/dev/null
for _ in $(seq 600); do
    n=$(psql_ "SELECT count(*) FROM callback_center.delivery_attempts a JOIN callback_center.outbox o ON o.id = a.outbox_id WHERE o.aggregate_id = 'blocked'")
    [ "$n" != 0 ] && break
    sleep 0.5
done
psql_ "SELECT status, count(*) FROM callback_center.outbox GROUP BY 1 ORDER BY 1" | sed 's/^/    outbox: /'
psql_ "SELECT DISTINCT error FROM callback_center.delivery_attempts WHERE error LIKE 'destination%'" | sed 's/^/    /'

cc_say "terminating the worker"
psql_ "SELECT pg_terminate_backend($pid)" >/dev/null
for _ in $(seq 600); do
    grep -q "ERROR SUMMARY" "$dir/vg.$pid.log" 2>/dev/null && break
    sleep 0.5
done
cc_say "valgrind on the worker (pid $pid)"
sed -n '/HEAP SUMMARY/,$p' "$dir/vg.$pid.log"
echo "full log: $dir/vg.$pid.log"
