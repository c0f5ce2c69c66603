# One result line per measurement, shared by the bench scripts and read by
# bench/all.sh (make bench) to print the one table, the CSV and the chart.
# Source it.  Nothing is written unless BENCH_CSV names a file.
#
#   bench_csv WORKLOAD FIGURE UNIT BASELINE RATIO RATIO_MIN RATIO_MAX P50_MS P99_MS TARGET VERDICT
#
# FIGURE is our rate (or a ratio for memory), BASELINE the rate of the
# baseline measured in the same run (in UNIT, or followed by its own unit:
# "145808 req/s"), RATIO our figure over it (median of the
# rounds, with their spread); empty fields are "-" in the table.  TARGET is
# what RATIO (or FIGURE, when there is no baseline) must reach, prefixed
# with <= where lower is better.
BENCH_CSV_HEADER="workload,figure,unit,baseline,ratio,ratio_min,ratio_max,p50_ms,p99_ms,target,verdict"

bench_csv() {
    [ -n "${BENCH_CSV:-}" ] || return 0
    [ -s "$BENCH_CSV" ] || echo "$BENCH_CSV_HEADER" >"$BENCH_CSV"
    local f out=""
    for f in "$@"; do
        f=${f//,/;}
        out="${out:+$out,}$f"
    done
    echo "$out" >>"$BENCH_CSV"
}

# Prints a rate with a precision its size deserves: 12339, 9.87, 0.254.
bench_fmt() {
    awk -v v="$1" 'BEGIN { if (v == "") print ""; else if (v >= 100) printf "%.0f\n", v;
                           else if (v >= 1) printf "%.2f\n", v; else printf "%.3g\n", v }'
}
