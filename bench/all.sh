#!/usr/bin/env bash
# make bench: every workload, each against its baseline measured in the same
# run, as ONE table (bench/results/summary.md), a CSV (summary.csv) and a
# chart of the ratios against their targets (summary.png, gnuplot).
#
#   bash bench/all.sh             full run (about 30 to 40 minutes)
#   bash bench/all.sh --short     the same workloads, small (under 2 minutes
#                                 of measuring; builds and setups come on top)
#   bash bench/all.sh --readme    also writes the table and the chart into
#                                 README.md's Performance section
#
# The pieces (bench/run.sh for the pgbench cases, bench/delivery.sh against
# nginx and wrk, bench/jobs_timeout.sh) start their own clusters and servers
# and each write one line per measurement through bench/csv.sh.
set -u
. "$(dirname "$0")/../test/lib.sh"
. "$(dirname "$0")/csv.sh"

SHORT=0 README=0
for a in "$@"; do
    case $a in
        --short) SHORT=1 ;;
        --readme) README=1 ;;
        *) echo "usage: $0 [--short] [--readme]" >&2; exit 2 ;;
    esac
done

CC_PACKAGES="$CC_PACKAGES gnuplot-nox"
cc_ensure_packages || exit 1
results=$CC_ROOT/bench/results
mkdir -p "$results"
export BENCH_CSV=$results/summary.csv
rm -f "$BENCH_CSV"
started=$(date -u '+%Y-%m-%d %H:%M UTC')

# A piece that could not measure (a cluster that did not start, a drain that
# did not finish) is named at the end and makes the run fail; a missed
# target is a FAIL row of the table, not an error of the run.
broken=()
piece() {
    local name=$1 before
    shift
    before=$(cat "$BENCH_CSV" 2>/dev/null | wc -l)
    # The pieces exit non-zero for a missed target too: what tells a broken
    # piece is that it wrote no result.
    env "$@" || [ "$(cat "$BENCH_CSV" 2>/dev/null | wc -l)" -gt "$before" ] || broken+=("$name")
}
if [ $SHORT = 1 ]; then
    # recon_1m's setup alone loads 3,000,000 rows: left to the full run.
    piece pgbench BENCH_ROUNDS=3 BENCH_SECONDS=3 bash "$CC_ROOT/bench/run.sh" \
        stock_deduct stock_hot callback_record outbox_enqueue orders_payment_callback orders_place_order
    piece delivery DELIVERY_STEPS="wrk thr lat" bash "$CC_ROOT/bench/delivery.sh" --quick
    piece jobs_timeout BENCH_ORDERS=5000 BENCH_SECONDS=5 bash "$CC_ROOT/bench/jobs_timeout.sh"
else
    piece pgbench BENCH_ROUNDS="${BENCH_ROUNDS:-3}" bash "$CC_ROOT/bench/run.sh"
    piece delivery bash "$CC_ROOT/bench/delivery.sh"
    piece jobs_timeout bash "$CC_ROOT/bench/jobs_timeout.sh"
fi

[ -s "$BENCH_CSV" ] || { echo "no results were written" >&2; exit 1; }
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
machine="$(nproc) CPUs ($cpu), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo),"
machine="$machine PostgreSQL $("$CC_BINDIR/postgres" --version | awk '{ print $3 }'), synchronous_commit on"
mode=$([ $SHORT = 1 ] && echo "short mode (--short: 3 s pgbench rounds, quick delivery sizes)" || echo "full run")

# A baseline in the figure's unit unless it names its own ("145808 req/s").
base_cell() {
    case $1 in
        "") echo - ;;
        *[!0-9.]*) echo "$1" ;;
        *) echo "$1 $2" ;;
    esac
}

# The table.
{
    echo "$started, $machine; $mode. Ratios are product / baseline of the same round,"
    echo "median of the rounds with their spread; method: [bench/README.md](bench/README.md)."
    echo
    echo "| workload | ours | baseline (same run) | ratio | spread | p50 / p99 | target | verdict |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    tail -n +2 "$BENCH_CSV" | while IFS=, read -r w fig unit base r rmin rmax p50 p99 target verdict; do
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$w" \
            "$fig $unit" "$(base_cell "$base" "$unit")" "${r:--}" \
            "$([ -n "$rmin" ] && echo "$rmin-$rmax" || echo -)" \
            "$([ -n "$p50" ] && echo "$p50 / $p99 ms" || echo -)" "${target:--}" "$verdict"
    done
} >"$results/summary.md"

# The chart: for each workload with a target, its ratio as a share of the
# target (1 = target met; lower-is-better targets inverted), one horizontal
# bar each, labelled with the figures.
awk -F, 'NR > 1 && $5 != "" && $10 ~ /^(<=)?[0-9.]+$/ {
            t = $10; low = sub(/^<=/, "", t); w = $1; sub(/ vs .*/, "", w)
            share = low ? t / $5 : $5 / t
            printf "%d %.3f \"%s (%s, target %s)\"\n", n++, share, w, $5, $10 }' \
    "$BENCH_CSV" >"$results/summary.dat"
if [ -s "$results/summary.dat" ] && command -v gnuplot >/dev/null; then
    rows=$(wc -l <"$results/summary.dat")
    gnuplot <<PLOT
set terminal pngcairo size 900,$((110 + 40 * rows)) font "DejaVu Sans,10" noenhanced
set output "$results/summary.png"
set title "callback_center: each ratio to its same-run baseline, as a share of its target\n$started, $(nproc) CPUs, PostgreSQL $CC_PG_VERSION, $mode"
set style fill solid 0.8 border -1
set xrange [0:*]
set yrange [-0.6:$rows - 0.4]
set ytics () 
set ytics nomirror
set grid xtics
set xlabel "share of target (1 = met)"
set key off
set lmargin 48
set arrow from 1, graph 0 to 1, graph 1 nohead lc rgb "#d83b3b" lw 2
plot "$results/summary.dat" using (\$2/2):1:(\$2/2):(0.35):ytic(3) with boxxyerror lc rgb "#3b7dd8"
PLOT
fi

cat "$results/summary.md"
echo
echo "written to bench/results/summary.md, summary.csv$([ -f "$results/summary.png" ] && echo ', summary.png')"

if [ $README = 1 ]; then
    cp "$results/summary.png" "$CC_ROOT/doc/bench.png" 2>/dev/null
    python3 - "$CC_ROOT/README.md" "$results/summary.md" <<'PY'
import sys
readme, table = sys.argv[1], open(sys.argv[2]).read().rstrip() + "\n"
s = open(readme).read()
a, b = "<!-- bench:table -->", "<!-- /bench:table -->"
i, j = s.index(a) + len(a), s.index(b)
s = s[:i] + "\n" + table + "\n![Ratios against targets](doc/bench.png)\n" + s[j:]
open(readme, "w").write(s)
PY
    echo "README.md's Performance section and doc/bench.png updated"
fi

if [ ${#broken[@]} -gt 0 ]; then
    echo "could not measure: ${broken[*]} (see above)" >&2
    exit 1
fi
