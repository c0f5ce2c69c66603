#!/usr/bin/env bash
# The README's main command (make demo): installs what is missing, builds,
# installs, starts a throwaway cluster as the unprivileged "postgres" user on
# a free loopback port with callback_center preloaded, tells the end-to-end
# story of PRODUCT.md with test/demo.sql, and stops everything it started.
#
#   make demo            run the story, then stop the cluster
#   make demo KEEP=1     leave the cluster running and print how to connect
set -u
. "$(dirname "$0")/lib.sh"

cc_ensure_packages || exit 1
cc_build_install || exit 1

dir=$(mktemp -d /tmp/callback_center_demo.XXXXXX)
as_root chown "$CC_PG_USER" "$dir"
chmod 755 "$dir"
port=$(cc_free_port 55432)
pgdata=$dir/data
started=0

stop_all() {
    if [ "$started" = 1 ] && [ "${KEEP:-0}" != 1 ]; then
        as_pg "$CC_BINDIR/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null 2>&1
        as_root rm -rf "$dir"
        cc_say "stopped the demo cluster and removed $dir"
    fi
}
trap stop_all EXIT

cc_say "starting a throwaway cluster on 127.0.0.1:$port (data in $pgdata)"
as_pg "$CC_BINDIR/initdb" -D "$pgdata" -A trust -U postgres --no-instructions >/dev/null || exit 1
cat <<CONF | as_pg tee -a "$pgdata/postgresql.conf" >/dev/null
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
callback_center.poll_interval = '200ms'
CONF
as_pg "$CC_BINDIR/pg_ctl" -D "$pgdata" -l "$dir/server.log" -w start >/dev/null || {
    cat "$dir/server.log"; exit 1; }
started=1

psql_demo() {
    as_pg "$CC_BINDIR/psql" -X -q -h "$dir" -p "$port" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 "$@"
}

cc_say "running the story (test/demo.sql)"
psql_demo -f "$CC_ROOT/test/demo.sql" || { echo "demo failed"; exit 1; }

if [ "${KEEP:-0}" = 1 ]; then
    cat <<MSG
==> the cluster keeps running. Connect with:
      sudo -u postgres psql -h $dir -p $port -U postgres postgres
    Stop it with:
      sudo -u postgres $CC_BINDIR/pg_ctl -D $pgdata stop && sudo rm -rf $dir
MSG
fi
cc_say "demo finished"
