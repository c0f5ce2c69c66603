#!/usr/bin/env bash
# The README's benchmark command (make bench): builds and installs
# callback_center, starts a throwaway preloaded cluster, and for each case
# file runs pgbench on the baseline script(s) and on the product script,
# printing a markdown table of transactions per second and their ratio.
#
#   bash bench/run.sh                          every bench/cases/*.case
#   bash bench/run.sh outbox_enqueue ...       the named cases
#   BENCH_ROUNDS=7 bash bench/run.sh           rounds per case (default 5);
#                                              each round runs every script
#                                              once, in a rotating order
#   BENCH_SECONDS=5 BENCH_CLIENTS=8 ...        override every case's figures
#   BENCH_PRELOAD=0 bash bench/run.sh          no shared_preload_libraries: no
#                                              worker (to see its share)
#   CC_INSTALL_LOCK=/tmp/cc-install.lock ...   lock only around the install
#
# Case file format: bench/README.md.  Results: bench/results/latest.md.
set -u
. "$(dirname "$0")/../test/lib.sh"
. "$(dirname "$0")/csv.sh"

BENCH_ROUNDS=${BENCH_ROUNDS:-5}
bench_dir=$CC_ROOT/bench
results_dir=$bench_dir/results

cc_ensure_packages || exit 1
# CC_INSTALL_LOCK=/path: hold that flock(1) lock from the install until the
# extension is created (a shared install directory), not for the runs.
if [ -n "${CC_INSTALL_LOCK:-}" ]; then
    exec 9>"$CC_INSTALL_LOCK"
    cc_say "waiting for $CC_INSTALL_LOCK"
    flock 9
fi
cc_build_install || { echo "build failed" >&2; exit 1; }

# The cases to run, as file paths.
cases=()
if [ $# -gt 0 ]; then
    for name in "$@"; do
        name=${name%.case}
        f=$bench_dir/cases/${name##*/}.case
        [ -f "$f" ] || { echo "no such case: $f" >&2; exit 1; }
        cases+=("$f")
    done
else
    for f in "$bench_dir"/cases/*.case; do
        [ -f "$f" ] && cases+=("$f")
    done
fi
[ ${#cases[@]} -gt 0 ] || { echo "no cases in $bench_dir/cases" >&2; exit 1; }

# The throwaway cluster, owned by the postgres OS user, removed on exit
# whatever happens.
work=$(cc_cluster_dir callback_center_bench) || exit 1
port=$(cc_free_port 55432)
trap 'cc_cluster_stop "$work"' EXIT
trap 'exit 130' INT TERM

cc_say "initdb in $work (port $port)"
cc_cluster_init "$work" "$port" <<CONF || exit 1
$([ "${BENCH_PRELOAD:-1}" = 0 ] || echo "shared_preload_libraries = 'callback_center'")
$([ "${BENCH_PRELOAD:-1}" = 0 ] || echo "callback_center.database = 'postgres'")
# Loopback is refused unless listed: the test receivers listen there.
callback_center.allowed_destinations = '127.0.0.1, ::1'
synchronous_commit = on
shared_buffers = 1GB
max_connections = 200
CONF
# Started without our open files: under "flock /tmp/cc-install.lock" a
# server holding the lock's descriptor would keep the lock after we exit.
cc_cluster_start "$work" || exit 1

psql_() { cc_psql "$port" "$@"; }
psql_ -q -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION callback_center CASCADE' || exit 1
# Without preload each backend loads the library from disk: keep the lock.
if [ -n "${CC_INSTALL_LOCK:-}" ] && [ "${BENCH_PRELOAD:-1}" != 0 ]; then
    flock -u 9
    exec 9>&-
fi

# Runs pgbench on script text $1 with $2 clients for $3 seconds; prints the
# tps (excluding connection time), or nothing on failure.
run_pgbench() {
    local script=$work/script.sql
    printf '%s\n' "$1" | as_pg tee "$script" >/dev/null
    cc_pgbench_tps "$port" "$2" "$3" "$script"
}

# Prints "median min max" of a list of numbers.
stats() {
    printf '%s\n' "$@" | sort -g |
        awk '{ v[NR] = $1 }
             END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
                   print m, v[1], v[NR] }'
}

# Product tps $2 over baseline tps $1.
ratio() { awk -v b="$1" -v p="$2" 'BEGIN { printf "%.4f", (b > 0 ? p / b : 0) }'; }

# The 1-minute load average now.
load1() { cut -d' ' -f1 /proc/loadavg; }

mkdir -p "$results_dir"
table=$work/table.md
{
    echo "| case | baseline | baseline rate | product rate | ratio (median) | ratio spread | rounds | load seen | target | verdict |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
} >"$table"
failures=0

# Appends one table row: case, baseline label, baseline tps list name,
# product tps list name, ratio list name, target.
table_row() {
    local name=$1 label=$2 target=$3 verdict b p r
    local -n bl=$4 pl=$5 rl=$6
    read -r b _ _ <<<"$(stats "${bl[@]}")"
    read -r p _ _ <<<"$(stats "${pl[@]}")"
    read -r r rmin rmax <<<"$(stats "${rl[@]}")"
    r=$(printf '%.2f' "$r")
    if [ -z "$target" ]; then
        verdict="report only"
    elif awk -v r="$r" -v t="$target" 'BEGIN { exit !(r >= t) }'; then
        verdict="pass"
    else
        verdict="FAIL"
        failures=$((failures + 1))
    fi
    printf '| %s | %s | %s %s | %s %s | %s | %.2f-%.2f | %d | %s-%s | %s | %s |\n' \
        "$name" "$label" "$(bench_fmt "$b")" "$CASE_UNIT" "$(bench_fmt "$p")" "$CASE_UNIT" \
        "$r" "$rmin" "$rmax" "${#rl[@]}" \
        "$load_min" "$load_max" "${target:--}" "$verdict" >>"$table"
    bench_csv "$name vs $label" "$(bench_fmt "$p")" "$CASE_UNIT" "$(bench_fmt "$b")" "$r" \
        "$(printf '%.2f' "$rmin")" "$(printf '%.2f' "$rmax")" "" "" "$target" "$verdict"
}

for f in "${cases[@]}"; do
    CASE_TITLE="" CASE_SETUP="" CASE_BASELINE="" CASE_PRODUCT=""
    CASE_BASELINE_TITLE="" CASE_BASELINE2="" CASE_BASELINE2_TITLE=""
    CASE_CONF="" CASE_TEARDOWN=""
    CASE_CLIENTS=16 CASE_SECONDS=10 CASE_TARGET="" CASE_UNIT="tps"
    # shellcheck disable=SC1090
    . "$f"
    CASE_SECONDS=${BENCH_SECONDS:-$CASE_SECONDS}
    CASE_CLIENTS=${BENCH_CLIENTS:-$CASE_CLIENTS}
    name=$(basename "$f" .case)
    cc_say "$name: ${CASE_TITLE:-$name} ($CASE_CLIENTS clients, ${CASE_SECONDS}s x $BENCH_ROUNDS rounds)"
    if [ -n "$CASE_SETUP" ] && ! printf '%s\n' "$CASE_SETUP" | psql_ >"$work/setup.log" 2>&1; then
        cat "$work/setup.log" >&2
        echo "| $name | - | - | - | - | - | - | - | ${CASE_TARGET:--} | setup failed |" >>"$table"
        failures=$((failures + 1))
        continue
    fi
    # Server settings for this case only (ALTER SYSTEM, reset after it);
    # they name the worker's settings, so only with the library preloaded.
    conf_names=()
    if [ -n "$CASE_CONF" ] && [ "${BENCH_PRELOAD:-1}" != 0 ]; then
        while IFS='=' read -r k v; do
            k=$(echo $k)
            [ -n "$k" ] || continue
            psql_ -c "ALTER SYSTEM SET $k = $v" || exit 1
            conf_names+=("$k")
        done <<<"$CASE_CONF"
        psql_ -c 'SELECT pg_reload_conf()' >/dev/null || exit 1
    fi
    # The scripts of a round: product (P), baseline (B), second baseline (C).
    kinds=(P)
    [ -n "$CASE_BASELINE" ] && kinds+=(B)
    [ -n "$CASE_BASELINE2" ] && kinds+=(C)
    base=() prod=() base2=() ratios=() ratios2=() ok=1
    load_min="" load_max=""
    for ((r = 1; r <= BENCH_ROUNDS && ok; r++)); do
        # Rotate the order each round, so that neither script always runs
        # first (a warmer cache) or last (a machine getting busier).
        order=()
        for ((i = 0; i < ${#kinds[@]}; i++)); do
            order+=("${kinds[$(((i + r) % ${#kinds[@]}))]}")
        done
        l=$(load1)
        load_min=$(awk -v a="${load_min:-$l}" -v b="$l" 'BEGIN { print (b < a ? b : a) }')
        load_max=$(awk -v a="${load_max:-$l}" -v b="$l" 'BEGIN { print (b > a ? b : a) }')
        declare -A tps=()
        for k in "${order[@]}"; do
            case $k in
                P) script=$CASE_PRODUCT ;;
                B) script=$CASE_BASELINE ;;
                C) script=$CASE_BASELINE2 ;;
            esac
            tps[$k]=$(run_pgbench "$script" "$CASE_CLIENTS" "$CASE_SECONDS") || { ok=0; break; }
        done
        [ $ok -eq 1 ] || break
        prod+=("${tps[P]}")
        line="    round $r (${order[*]}, load $l): product ${tps[P]}"
        if [ -n "$CASE_BASELINE" ]; then
            base+=("${tps[B]}")
            ratios+=("$(ratio "${tps[B]}" "${tps[P]}")")
            line="$line, baseline ${tps[B]}, ratio ${ratios[-1]}"
        fi
        if [ -n "$CASE_BASELINE2" ]; then
            base2+=("${tps[C]}")
            ratios2+=("$(ratio "${tps[C]}" "${tps[P]}")")
            line="$line; second baseline ${tps[C]}, ratio ${ratios2[-1]}"
        fi
        echo "$line"
        unset tps
    done
    if [ -n "$CASE_TEARDOWN" ] && ! printf '%s\n' "$CASE_TEARDOWN" | psql_ >"$work/teardown.log" 2>&1; then
        cat "$work/teardown.log" >&2
        ok=0
    fi
    for k in "${conf_names[@]}"; do
        psql_ -c "ALTER SYSTEM RESET $k" || exit 1
    done
    [ ${#conf_names[@]} -eq 0 ] || psql_ -c 'SELECT pg_reload_conf()' >/dev/null
    if [ $ok -eq 0 ]; then
        echo "| $name | - | - | - | - | - | - | - | ${CASE_TARGET:--} | pgbench failed |" >>"$table"
        failures=$((failures + 1))
        continue
    fi
    if [ -z "$CASE_BASELINE" ]; then
        read -r p pmin pmax <<<"$(stats "${prod[@]}")"
        printf '| %s | none (rate only) | - | %s (%s-%s) %s | - | - | %d | %s-%s | - | report only |\n' \
            "$name" "$(bench_fmt "$p")" "$(bench_fmt "$pmin")" "$(bench_fmt "$pmax")" "$CASE_UNIT" \
            "${#prod[@]}" "$load_min" "$load_max" >>"$table"
        bench_csv "$name" "$(bench_fmt "$p")" "$CASE_UNIT" "" "" "" "" "" "" "" "report only"
        continue
    fi
    table_row "$name" "${CASE_BASELINE_TITLE:-baseline}" "$CASE_TARGET" base prod ratios
    if [ -n "$CASE_BASELINE2" ]; then
        table_row "$name" "${CASE_BASELINE2_TITLE:-second baseline}" "" base2 prod ratios2
    fi
done

{
    echo "# callback_center benchmarks"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), PostgreSQL $CC_PG_VERSION, $(nproc) CPUs," \
        "synchronous_commit on, $BENCH_ROUNDS rounds per case, scripts in a rotating" \
        "order; tps are medians, the ratio is the median of the rounds' ratios" \
        "(product / baseline of the same round), the spread their min-max, the load" \
        "the 1-minute load average at the rounds' starts."
    echo
    cat "$table"
} >"$results_dir/latest.md"
echo
cat "$table"
echo
echo "written to ${results_dir#"$CC_ROOT"/}/latest.md"
[ "$failures" -eq 0 ]
