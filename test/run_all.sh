#!/usr/bin/env bash
# The README's test command (make test): installs what is missing, builds,
# installs, then runs pg_regress, the isolation specs and the TAP suite, each
# on clusters it starts itself as the unprivileged "postgres" user.
# Ends with "N passed, N failed" and exits non-zero on any failure.
set -u
. "$(dirname "$0")/lib.sh"

cc_ensure_packages || exit 1
cc_build_install || { echo "build failed"; echo "0 passed, 1 failed"; exit 1; }
# Release 0.1.0 for the upgrade test (test/t/095_upgrade.pl), unless the run
# leaves the TAP suite out.
if [ "${CC_PROVE:-}" != none ]; then
    cc_say "building release 0.1.0 for the upgrade test"
    CC_RELEASE_INSTALL=$(cc_build_release "$CC_RELEASE_0_1_0") || CC_RELEASE_INSTALL=
    export CC_RELEASE_INSTALL
fi

work=$(cc_work_copy)
# Logs belong to whoever runs this (the work copy belongs to postgres).
logs=$(mktemp -d /tmp/callback_center_logs.XXXXXX)
passed=0
failed=0

# Counts pg_regress / pg_isolation_regress result lines of a log (PG15
# prints "test NAME ... ok" or "... FAILED").  A suite that exits non-zero
# without a FAILED line (a missing expected file, a crashed instance) still
# counts as one failure.
count_regress() {
    local log=$1 rc=$2 p f
    p=$(grep -cE '^(test | +)?[[:alnum:]_]+ +\.\.\. ok' "$log")
    f=$(grep -cE '^(test | +)?[[:alnum:]_]+ +\.\.\. (FAILED|failed)' "$log")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1
        tail -n 30 "$log"
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    echo "    $p passed, $f failed"
}

# CC_REGRESS, CC_ISOLATION, CC_PROVE narrow a run to some tests (developer
# loops), e.g. CC_REGRESS="install stock" CC_PROVE=test/t/010_x.pl; "none"
# skips a suite.
filters=()
[ -n "${CC_REGRESS:-}" ] && filters+=("REGRESS=$CC_REGRESS")
[ -n "${CC_ISOLATION:-}" ] && filters+=("ISOLATION=$CC_ISOLATION")
[ -n "${CC_PROVE:-}" ] && filters+=("PROVE_TESTS=$CC_PROVE")

run_suite() {
    local name=$1 target=$2 log=$logs/$1.log
    cc_say "$name"
    as_pg make -C "$work" -s "$target" PG_CONFIG="$CC_BINDIR/pg_config" "${filters[@]}" >"$log" 2>&1
    local rc=$?
    grep -E '\.\.\. |^ok |^not ok|^t/|^test/t/|Result:' "$log" | sed 's/^/    /'
    return $rc
}

[ "${CC_REGRESS:-}" = none ] || {
run_suite regress regresscheck
rc=$?
count_regress "$logs/regress.log" $rc
if [ $rc -ne 0 ] && [ -f "$work/regression.diffs" ]; then
    head -n 200 "$work/regression.diffs"
fi
}

if [ "${CC_ISOLATION:-}" != none ] && ls "$CC_ROOT"/specs/*.spec >/dev/null 2>&1; then
    run_suite isolation isolationcheck
    rc=$?
    count_regress "$logs/isolation.log" $rc
    [ $rc -ne 0 ] && [ -f "$work/output_iso/regression.diffs" ] &&
        head -n 200 "$work/output_iso/regression.diffs"
fi

# TAP: one count per test file, as prove reports them.
if [ "${CC_PROVE:-}" != none ]; then
run_suite tap tapcheck
rc=$?
p=$(grep -cE '^test/t/[^ ]+ \.+ ok' "$logs/tap.log")
f=$(grep -cE '^test/t/[^ ]+ \.+ ' "$logs/tap.log")
f=$((f - p))
if [ $rc -ne 0 ] && [ $f -eq 0 ]; then f=1; fi
passed=$((passed + p))
failed=$((failed + f))
echo "    $p passed, $f failed"
if [ $rc -ne 0 ]; then
    grep -vE '^test/t/[^ ]+ \.+ ok' "$logs/tap.log" | tail -n 60
    for l in "$work"/tmp_check/log/regress_log_*; do
        [ -f "$l" ] || continue
        grep -q 'not ok' "$l" && { echo "--- $l"; tail -n 80 "$l"; }
    done
fi
fi

if [ "$failed" -eq 0 ]; then
    as_root rm -rf "$work"
    rm -rf "$logs"
else
    echo "logs kept in $logs, the test tree in $work"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
