#!/usr/bin/env bash
# Instructions per call of a bench case's scripts, immune to machine load:
# the case's setup on a cluster whose backends run under callgrind, then
# each script (product, baseline, second baseline) by one pgbench client,
# -t N1 and -t N2 transactions in two fresh connections; the backend's
# instructions per transaction are (Ir(N2) - Ir(N1)) / (N2 - N1), which
# leaves out connection start-up and exit.  Also prints pg_stat_statements
# (statements run inside each transaction, track = all) from a third run;
# the counted runs have pg_stat_statements.track = none.
#
#   bash bench/profile_case.sh stock_hot [N1 N2]     default 300 1300
#   PROFILE_TOP=30 bash bench/profile_case.sh outbox_enqueue
#                  (also the top functions of each script, inclusive;
#                  the profiles are kept in bench/results/callgrind.CASE.KIND)
#
# One client: contention (row locks, a hot page) is not measured, only
# what each call executes.  Not part of make bench.
set -u
. "$(dirname "$0")/../test/lib.sh"

case_name=${1:?usage: profile_case.sh CASE [N1 N2]}
n1=${2:-300}
n2=${3:-1300}
case_file=$CC_ROOT/bench/cases/${case_name%.case}.case
[ -f "$case_file" ] || { echo "no such case: $case_file" >&2; exit 1; }
command -v callgrind_annotate >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
cc_ensure_packages || exit 1
[ -n "${PROFILE_NO_BUILD:-}" ] || cc_build_install >/dev/null || exit 1

work=$(cc_cluster_dir cc_profile_case) || exit 1
port=$(cc_free_port 56032)
cleanup() {
    [ -f "$work/data/postmaster.pid" ] &&
        as_pg "$CC_BINDIR/pg_ctl" -D "$work/data" -m immediate -w stop >/dev/null 2>&1
    for _ in $(seq 50); do
        pgrep -f -- "-D $work/data" >/dev/null || break
        sleep 0.2
    done
    [ -n "${PROFILE_KEEP:-}" ] && echo "kept $work" || as_root rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CASE_SETUP="" CASE_BASELINE="" CASE_BASELINE2="" CASE_PRODUCT="" CASE_CONF=""
# shellcheck disable=SC1090
. "$case_file"

cc_cluster_init "$work" "$port" <<CONF || exit 1
shared_preload_libraries = 'callback_center, pg_stat_statements'
pg_stat_statements.track = all
callback_center.database = 'postgres'
callback_center.allowed_destinations = '127.0.0.1, ::1'
synchronous_commit = on
shared_buffers = 256MB
autovacuum = off
$CASE_CONF
CONF
(cc_without_fds as_pg valgrind --tool=callgrind --trace-children=yes \
    --callgrind-out-file="$work/cg.%p" --log-file="$work/vg.%p.log" \
    "$CC_BINDIR/postgres" -D "$work/data" >"$work/server.log" 2>&1 &)
for _ in $(seq 600); do
    as_pg "$CC_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" && break
    sleep 0.5
done
psql_() { cc_psql "$port" -A -t "$@"; }
psql_ -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION callback_center CASCADE' \
    -c 'CREATE EXTENSION pg_stat_statements' >/dev/null || exit 1
printf '%s\n' "$CASE_SETUP" | psql_ >/dev/null || exit 1

# Instructions of one pgbench connection running script $1 for $2
# transactions: the profile its backend writes at exit.
backend_ir() {
    local f best=0 bestf=""
    ls "$work" | grep '^cg\.' >"$work/before"
    printf '%s\n' "$1" | as_pg tee "$work/script.sql" >/dev/null
    as_pg env PGOPTIONS="-c pg_stat_statements.track=${3:-none}" "$CC_BINDIR/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres -c 1 -t "$2" \
        -f "$work/script.sql" postgres >"$work/pgbench.log" 2>&1 ||
        { cat "$work/pgbench.log" >&2; return 1; }
    # The backend writes its profile as it exits, after pgbench returns:
    # wait until no backend of ours is left, then take the largest new one.
    for _ in $(seq 100); do
        [ "$(psql_ -c "SELECT count(*) FROM pg_stat_activity
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")" = 0 ] && break
        sleep 0.3
    done
    sleep 1
    for f in $(ls "$work" | grep '^cg\.' | grep -vxF -f "$work/before"); do
        ir=$(sed -n 's/^totals: //p' "$work/$f")
        [ "${ir:-0}" -gt "$best" ] && { best=$ir; bestf=$work/$f; }
    done
    echo "$bestf $best"
}

for kind in PRODUCT BASELINE BASELINE2; do
    script=$(eval echo "\"\${CASE_$kind}\"")
    [ -n "$script" ] || continue
    read -r _ ir1 <<<"$(backend_ir "$script" "$n1")" || exit 1
    read -r prof ir2 <<<"$(backend_ir "$script" "$n2")" || exit 1
    psql_ -c 'SELECT pg_stat_statements_reset()' >/dev/null
    backend_ir "$script" "$n1" all >/dev/null || exit 1
    cc_say "$kind: $(( (ir2 - ir1) / (n2 - n1) )) instructions per transaction"
    psql_ -F ' | ' -c "SELECT round(calls::numeric / $n1, 2) AS per_xact,
                              round(rows::numeric / $n1, 2) AS rows,
                              left(regexp_replace(query, '\s+', ' ', 'g'), 110)
                         FROM pg_stat_statements
                        WHERE calls >= $n1 ORDER BY calls DESC, query"
    if [ -n "${PROFILE_TOP:-}" ]; then
        cp "$prof" "$CC_ROOT/bench/results/callgrind.$case_name.$kind" 2>/dev/null
        callgrind_annotate --inclusive=yes "$prof" 2>/dev/null | sed -n '/^Ir/,$p' |
            head -"$PROFILE_TOP"
    fi
done
