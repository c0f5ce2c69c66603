#!/usr/bin/env bash
# Throughput of the HTTP layer (src/http.c) through http_probe(), against a
# loopback nginx that answers "return 200", next to wrk against the same
# nginx.  Not a test: prints figures.  Uses the installed build, so run it
# with the install lock (it installs the tree first):
#
#   flock /tmp/cc-install.lock bash bench/http_probe.sh [URLS] [CONCURRENCY] [ROUNDS]
#
# Defaults: 20000 URLs in one call, max_concurrent 32, 3 rounds.
set -eu
. "$(dirname "$0")/../test/lib.sh"

N=${1:-20000}
C=${2:-32}
ROUNDS=${3:-3}

cc_ensure_packages
cc_build_install

dir=$(mktemp -d /tmp/cc_http_bench.XXXXXX)
chmod 755 "$dir"
as_root chown "$CC_PG_USER" "$dir"
nginx_port=$(cc_free_port 18080)
pg_port=$(cc_free_port 55500)

cleanup() {
    [ -f "$dir/nginx.pid" ] && as_root nginx -p "$dir" -c "$dir/nginx.conf" -s stop 2>/dev/null
    [ -f "$dir/data/postmaster.pid" ] && as_pg pg_ctl -D "$dir/data" -m fast -w stop >/dev/null 2>&1
    as_root rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/nginx.conf" <<NGINX
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx_error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {
        listen 127.0.0.1:$nginx_port;
        location / { return 200; }
    }
}
NGINX
as_root nginx -p "$dir" -c "$dir/nginx.conf"

as_pg initdb -D "$dir/data" -A trust >/dev/null
cat >>"$dir/data/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = ''
unix_socket_directories = '$dir'
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
# Loopback is refused unless listed: the test receivers listen there.
callback_center.allowed_destinations = '127.0.0.1, ::1'
CONF
as_pg pg_ctl -D "$dir/data" -l "$dir/pg.log" -w start >/dev/null
psql_pg() { as_pg psql -X -q -h "$dir" -p "$pg_port" -d postgres "$@"; }
psql_pg -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION callback_center CASCADE'

cc_say "http_probe: $N URLs in one call, max_concurrent $C, $ROUNDS rounds (one session)"
sql="DO \$\$
DECLARE t0 timestamptz; ok bigint; secs float8;
BEGIN
  FOR r IN 1..$ROUNDS LOOP
    t0 := clock_timestamp();
    SELECT count(*) FILTER (WHERE status = 200) INTO ok
      FROM callback_center.http_probe(
        array(SELECT 'http://127.0.0.1:$nginx_port/d/' || g FROM generate_series(1, $N) g),
        max_concurrent => $C);
    secs := extract(epoch FROM clock_timestamp() - t0);
    RAISE NOTICE 'round %: % of % answered 200 in % s: % per second',
      r, ok, $N, round(secs::numeric, 3), round(($N / secs)::numeric);
  END LOOP;
END \$\$;"
out=$(psql_pg -c "$sql" 2>&1)
echo "$out" | sed 's/^NOTICE:  /    /'
best=$(echo "$out" | sed -n 's/.*: \([0-9]*\) per second/\1/p' | sort -n | tail -1)

cc_say "wrk -t2 -c$C -d5s against the same nginx"
wrk_out=$(wrk -t2 -c"$C" -d5s "http://127.0.0.1:$nginx_port/")
echo "$wrk_out" | sed 's/^/    /'
wrk_rps=$(echo "$wrk_out" | awk '/Requests\/sec/ {printf "%d", $2}')

# http_probe is one process on one core; wrk -t1 is the same shape.
cc_say "wrk -t1 -c$C -d5s (one thread, like the one backend)"
wrk1=$(wrk -t1 -c"$C" -d5s "http://127.0.0.1:$nginx_port/" | awk '/Requests\/sec/ {printf "%d", $2}')
echo "    Requests/sec: $wrk1"

echo
printf 'http_probe best round: %s req/s; wrk: %s req/s; ratio %s\n' "$best" "$wrk_rps" \
    "$(awk -v a="$best" -v b="$wrk_rps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
printf 'wrk one thread: %s req/s; ratio %s\n' "$wrk1" \
    "$(awk -v a="$best" -v b="$wrk1" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
