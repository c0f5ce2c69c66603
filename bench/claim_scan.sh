#!/usr/bin/env bash
# What the delivery worker's claim reads as an endpoint's backlog drains
# before vacuum has run: the claim picks the oldest due rows through the
# partial index outbox_due (status pending or delivering), and every row
# delivered since the last vacuum leaves two dead entries in it (its
# pending version where it was due, its delivering version at its lease),
# ahead of the live ones in next_attempt_at order.  Until VACUUM removes
# them each claim walks them; after the first walk they are only marked
# dead (LP_DEAD), not removed, because no insert lands on their pages.
#
#   bash bench/claim_scan.sh            1,000,000 events (about 2 minutes)
#   CLAIM_SCAN_N=200000 bash bench/claim_scan.sh
#
# Queues N events to one endpoint with delivery and autovacuum off, then
# moves them as the worker does (claimed: delivering with a lease; recorded:
# delivered) in batches of 10,000, and after 0, 10%, 30% and 70% of them
# prints the buffers and time of the claim's pick of 32 rows (EXPLAIN
# ANALYZE, the third of three runs: the steady state once the walk has
# marked the entries dead), then the same after a VACUUM.  Starts and stops
# its own cluster.  Figures: bench/README.md ("No decay").
set -u
. "$(dirname "$0")/../test/lib.sh"

N=${CLAIM_SCAN_N:-1000000}
cc_ensure_packages || exit 1
cc_build_install || { echo "build failed" >&2; exit 1; }
dir=$(cc_cluster_dir cc_claim_scan) || exit 1
port=$(cc_free_port 56100)
trap 'cc_cluster_stop "$dir"' EXIT
cc_cluster_init "$dir" "$port" <<CONF || exit 1
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
callback_center.delivery_enabled = off
callback_center.jobs_enabled = off
callback_center.allowed_destinations = '127.0.0.1'
shared_buffers = 1GB
autovacuum = off
CONF
cc_cluster_start "$dir" || exit 1
psql_() { cc_psql "$port" -A -t "$@"; }
psql_ -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION callback_center CASCADE' || exit 1
ep=$(psql_ -c "SELECT callback_center.create_endpoint('scan', 'http://127.0.0.1:9/x', '{scan.paid}')") || exit 1
for ((c = 0; c < N; c += 100000)); do
    psql_ -c "SELECT count(callback_center.enqueue('scan.paid', 'order-' || g, jsonb_build_object('order_id', 'order-' || g)))
                FROM generate_series($c + 1, least($c + 100000, $N)) g" >/dev/null || exit 1
done
psql_ -c "VACUUM ANALYZE callback_center.outbox" || exit 1

# The claim's pick (src/queue.c CLAIM_PICK) for an endpoint without ordering.
pick="EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF)
      SELECT o.id FROM callback_center.outbox o
       WHERE o.endpoint_id = $ep AND o.status IN ('pending', 'delivering')
         AND o.next_attempt_at <= pg_catalog.now()
       ORDER BY o.next_attempt_at LIMIT 32 FOR UPDATE SKIP LOCKED"
measure() {
    local out hits ms
    for _ in 1 2 3; do
        out=$(psql_ -c BEGIN -c "$pick" -c ROLLBACK) || exit 1
    done
    hits=$(printf '%s\n' "$out" | sed -n 's/^ *Buffers: shared hit=\([0-9]*\).*/\1/p' | head -1)
    ms=$(printf '%s\n' "$out" | sed -n 's/^Execution Time: \([0-9.]*\) ms/\1/p')
    printf '| %s | %s | %s |\n' "$1" "$hits" "$ms"
}
echo "| delivered since the last vacuum | buffers read by the pick of 32 | ms |"
echo "|---|---:|---:|"
measure 0
moved=0
for pct in 10 30 70; do
    target=$((N * pct / 100))
    while [ "$moved" -lt "$target" ]; do
        psql_ -c "UPDATE callback_center.outbox
                     SET status = 'delivering', next_attempt_at = pg_catalog.now() + interval '30 s'
                   WHERE id > $moved AND id <= $moved + 10000" \
              -c "UPDATE callback_center.outbox SET status = 'delivered', delivered_at = pg_catalog.now()
                   WHERE id > $moved AND id <= $moved + 10000" >/dev/null || exit 1
        moved=$((moved + 10000))
    done
    measure "$moved"
done
psql_ -c "VACUUM callback_center.outbox" || exit 1
measure "$moved, then VACUUM"
