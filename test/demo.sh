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

dir=$(cc_cluster_dir callback_center_demo) || exit 1
port=$(cc_free_port 55432)
pgdata=$dir/data
started=0

rcv_pid=

stop_all() {
    if [ -n "$rcv_pid" ] && [ "${KEEP:-0}" != 1 ]; then
        kill "$rcv_pid" 2>/dev/null
        rm -rf "$rdir"
    fi
    if [ "${KEEP:-0}" != 1 ] || [ "$started" != 1 ]; then
        cc_cluster_stop "$dir" fast
        if [ "$started" = 1 ]; then
            cc_say "stopped the demo cluster and removed $dir"
        fi
    fi
}
trap stop_all EXIT

cc_say "starting a throwaway cluster on 127.0.0.1:$port (data in $pgdata)"
cc_cluster_init "$dir" "$port" <<CONF || exit 1
shared_preload_libraries = 'callback_center'
callback_center.database = 'postgres'
callback_center.poll_interval = '200ms'
# Loopback is refused unless listed: the test receivers listen there.
callback_center.allowed_destinations = '127.0.0.1, ::1'
CONF
cc_cluster_start "$dir" || exit 1
started=1

psql_demo() { cc_psql "$port" "$@"; }

# The merchant ERP, settlement and notification services: one loopback
# receiver that records and verifies every request.
secret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
# It runs as the invoking user, so its files go in a directory of its own
# (the cluster's directory belongs to postgres).
rdir=$(mktemp -d /tmp/callback_center_receiver.XXXXXX)
python3 "$CC_ROOT/test/receiver.py" --port 0 --portfile "$rdir/rcv.port" \
    --log "$rdir/rcv.jsonl" --secret "$secret" --max-seconds 900 9>&- &
rcv_pid=$!
for _ in $(seq 100); do [ -s "$rdir/rcv.port" ] && break; sleep 0.1; done
rport=$(cat "$rdir/rcv.port")
cc_say "receiver listening on 127.0.0.1:$rport"

cc_say "running the story (test/demo.sql)"
psql_demo -v rcv="http://127.0.0.1:$rport" -v secret="$secret" \
    -f "$CC_ROOT/test/demo.sql" || { echo "demo failed"; exit 1; }

# E. Receiver down: retries on schedule, dead letter, replay after recovery.
cc_say "E. the settlement service goes down"
curl -s -X POST "http://127.0.0.1:$rport/__control" \
    -d '{"path": "/settlement", "mode": "500"}' >/dev/null
psql_demo -v rcv="http://127.0.0.1:$rport" -f "$CC_ROOT/test/demo_outage.sql" --set phase=down ||
    { echo "demo failed"; exit 1; }
cc_say "E. the settlement service is back: replay its dead letters"
curl -s -X POST "http://127.0.0.1:$rport/__reset" >/dev/null
psql_demo -f "$CC_ROOT/test/demo_outage.sql" --set phase=replay || { echo "demo failed"; exit 1; }

# F. kill -9 of the worker in the middle of a burst: nothing is lost.
cc_say "F. 2,000 events, and the worker is killed with SIGKILL mid-delivery"
psql_demo -c "SELECT count(*) AS queued FROM (SELECT callback_center.enqueue('user.notify', 'crash-' || i, jsonb_build_object('i', i)) FROM generate_series(1, 2000) i) x" >/dev/null
wpid=$(psql_demo -At -c "SELECT pid FROM callback_center.worker_status()")
kill -9 "$wpid" 2>/dev/null
for _ in $(seq 600); do
    left=$(psql_demo -At -c "SELECT count(*) FROM callback_center.outbox WHERE aggregate_id LIKE 'crash-%' AND status NOT IN ('delivered', 'dead')" 2>/dev/null)
    [ "$left" = 0 ] && break
    sleep 0.2
done
psql_demo -f "$CC_ROOT/test/demo_crash.sql" || { echo "demo failed"; exit 1; }
python3 - "$rdir/rcv.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
crash = [l for l in lines if '"crash-' in l["body"]]
ids = {l["headers"]["webhook-id"] for l in crash}
print(f"   receiver: {len(lines)} requests in all, {sum(1 for l in lines if l.get('signature_ok'))} with a valid signature")
print(f"   crash burst: {len(ids)} distinct webhook-ids received for 2000 events "
      f"({len(crash) - len(ids)} duplicates, each under the same webhook-id so receivers can drop them)")
PY

if [ "${KEEP:-0}" = 1 ]; then
    cat <<MSG
==> the cluster keeps running. Connect with:
      sudo -u postgres psql -h $dir -p $port -U postgres postgres
    Stop it with:
      sudo -u postgres $CC_BINDIR/pg_ctl -D $pgdata stop && sudo rm -rf $dir
MSG
fi
cc_say "demo finished"
