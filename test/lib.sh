# Shared by test/run_all.sh, test/demo.sh and the bench scripts.  Source it.
#
# Everything here works as root (CI) and as an ordinary user with sudo.
# Clusters always run as the unprivileged OS user "postgres" (initdb and
# postgres refuse root).

CC_ROOT=${CC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CC_PG_VERSION=15
# A relocated copy of the PostgreSQL tree (see CONTRIBUTING in README) may be
# named by CC_BINDIR so parallel work does not share one install directory.
CC_BINDIR=${CC_BINDIR:-/usr/lib/postgresql/$CC_PG_VERSION/bin}
CC_PG_USER=postgres

# Debian packages the build, the tests, the demo and the benchmarks need.
CC_PACKAGES="postgresql-$CC_PG_VERSION postgresql-server-dev-$CC_PG_VERSION
postgresql-$CC_PG_VERSION-cron postgresql-contrib libcurl4-openssl-dev libssl-dev
libipc-run-perl make gcc ca-certificates python3 curl procps iproute2 nginx-light wrk"

cc_say() { printf '==> %s\n' "$*"; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a command as the unprivileged cluster owner with the open-file soft
# limit raised to the hard limit: runuser's PAM session resets it to 1024,
# so it is raised inside, after the switch.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$CC_PG_USER" -- bash -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"' bash "$@"
    else
        sudo -u "$CC_PG_USER" -- bash -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"' bash "$@"
    fi
}

# Installs whichever of CC_PACKAGES are missing.  apt-get update runs only
# when something must be installed, so a second run is quick and offline.
cc_ensure_packages() {
    local missing="" p
    for p in $CC_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        cc_say "installing Debian packages:$missing"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # policy-rc.d keeps the packages from starting their own servers.
        as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
            apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
    # The Debian packages may start a default cluster or nginx; we never use
    # them, and stop neither: our servers run on their own ports.
    id "$CC_PG_USER" >/dev/null 2>&1 || { echo "no $CC_PG_USER user" >&2; return 1; }
    export PATH="$CC_BINDIR:$PATH"
}

# Builds and installs the extension from CC_ROOT.
cc_build_install() {
    cc_say "building and installing callback_center"
    make -C "$CC_ROOT" -s PG_CONFIG="$CC_BINDIR/pg_config" >/dev/null || return 1
    as_root make -C "$CC_ROOT" -s install PG_CONFIG="$CC_BINDIR/pg_config" >/dev/null || return 1
}

# Copies the source tree to a fresh directory the cluster owner can write,
# and prints its path.  Tests write results and temp clusters there.
cc_work_copy() {
    local dir
    dir=$(mktemp -d /tmp/callback_center.XXXXXX)
    (cd "$CC_ROOT" && tar --exclude=.git --exclude='tmp_check*' --exclude=results \
        --exclude=log -cf - .) | tar -C "$dir" -xf -
    chmod 755 "$dir"
    as_root chown -R "$CC_PG_USER" "$dir"
    echo "$dir"
}

# Prints a TCP port on 127.0.0.1 that no socket uses: nothing listens on
# it, and no connection has it as its local port.  The bases the scripts
# pass lie in Linux's ephemeral range (32768-60999), so a client's
# connection may hold one; a server cannot bind it then.
cc_free_port() {
    local p=${1:-54320}
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null ||
        [ -n "$(ss -Htan "sport = :$p" 2>/dev/null)" ]; do
        p=$((p + 1))
    done
    echo "$p"
}

# --- throwaway clusters (test/demo.sh and the bench scripts) ---------------
#
#   dir=$(cc_cluster_dir NAME)         a fresh directory the cluster owner owns
#   cc_cluster_init "$dir" "$port" <<CONF  initdb into $dir/data; base settings
#   ...settings of the caller...           (loopback on $port, socket in $dir)
#   CONF                                   then the caller's from stdin
#   cc_cluster_start "$dir"            pg_ctl start, log in $dir/server.log
#   cc_psql "$port" -c ...             psql as postgres to database postgres
#   cc_cluster_stop "$dir" [MODE]      stop (immediate by default), remove $dir

# Makes a directory /tmp/NAME.XXXXXX owned by the cluster owner, readable
# by all, and prints its path.
cc_cluster_dir() {
    local dir
    dir=$(mktemp -d "/tmp/$1.XXXXXX") || return 1
    chmod 755 "$dir"
    as_root chown "$CC_PG_USER" "$dir" || return 1
    echo "$dir"
}

# Runs a command with no open file descriptors beyond 0-2.  A server started
# under "flock LOCK" (CC_INSTALL_LOCK) or from a pipe must not inherit them:
# one that outlived us would hold the lock or keep the pipe open.
cc_without_fds() {
    local fd
    for fd in $(ls /proc/$BASHPID/fd); do
        [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    "$@"
}

# initdb in DIR/data (trust, UTF8, locale C), listening on 127.0.0.1:PORT
# with its socket in DIR, and with the settings read from stdin appended.
cc_cluster_init() {
    local dir=$1 port=$2
    as_pg "$CC_BINDIR/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 \
        --locale=C --no-instructions >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log"; return 1; }
    {
        cat <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
CONF
        cat
    } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
}

# Starts the cluster in DIR/data and waits until it accepts connections;
# prints the server log if it does not start.
cc_cluster_start() {
    local dir=$1
    (cc_without_fds as_pg "$CC_BINDIR/pg_ctl" -D "$dir/data" -l "$dir/server.log" \
        -w start) >/dev/null || { cat "$dir/server.log"; return 1; }
}

# Stops the cluster in DIR/data if it runs (MODE: immediate unless given),
# then removes DIR.
cc_cluster_stop() {
    local dir=$1 mode=${2:-immediate}
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_pg "$CC_BINDIR/pg_ctl" -D "$dir/data" -m "$mode" -w stop >/dev/null 2>&1
    fi
    as_root rm -rf "$dir"
}

# psql as postgres to database postgres on 127.0.0.1:PORT, stopping at the
# first error; further arguments are psql's.
cc_psql() {
    local port=$1
    shift
    as_pg "$CC_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" \
        -U postgres -d postgres "$@"
}

# Runs pgbench with SCRIPT (a file the cluster owner can read) on
# 127.0.0.1:PORT, CLIENTS clients for SECONDS; prints the tps (without
# connection time), or the tail of pgbench's output on stderr and fails.
cc_pgbench_tps() {
    local port=$1 clients=$2 seconds=$3 script=$4 out
    out=$(as_pg "$CC_BINDIR/pgbench" -n -h 127.0.0.1 -p "$port" -U postgres \
        -c "$clients" -j 2 -T "$seconds" -f "$script" postgres 2>&1)
    if ! printf '%s\n' "$out" | grep -q '^tps = '; then
        printf '%s\n' "$out" | tail -n 20 >&2
        return 1
    fi
    printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}

# --- released versions, for the upgrade test ------------------------------
#
# Release 0.1.0 is commit a022782 of main.  cc_build_release builds it from
# git into a relocated copy of the PostgreSQL tree (test/private_pg.sh) of
# its own, so that a test can run a cluster with the old library, then
# switch it to the current one.  Prints the installation prefix (the
# directory holding bin/).  The tree is kept and reused while the commit is
# the same.
CC_RELEASE_0_1_0=a0227820b5a348649fbbf5bc35a6c982e85454bd

cc_build_release() {
    local commit=$1 dir=${2:-/tmp/callback_center_release_$1} src bindir
    git -C "$CC_ROOT" rev-parse -q --verify "$commit^{commit}" >/dev/null 2>&1 || {
        echo "release commit $commit is not in $CC_ROOT (a clone with history is needed)" >&2
        return 1
    }
    if [ ! -f "$dir/built" ]; then
        as_root rm -rf "$dir"
        bindir=$(bash "$CC_ROOT/test/private_pg.sh" "$dir") || return 1
        # Nothing of the current build may stay in the copy.
        as_root rm -f "$dir"/usr/lib/postgresql/$CC_PG_VERSION/lib/callback_center.so \
            "$dir"/usr/share/postgresql/$CC_PG_VERSION/extension/callback_center*
        src=$(mktemp -d /tmp/callback_center_src.XXXXXX)
        git -C "$CC_ROOT" archive "$commit" | tar -x -C "$src" || return 1
        make -C "$src" -s PG_CONFIG="$bindir/pg_config" >/dev/null 2>&1 &&
            as_root make -C "$src" -s install PG_CONFIG="$bindir/pg_config" >/dev/null 2>&1 ||
            { echo "could not build release $commit" >&2; rm -rf "$src"; return 1; }
        rm -rf "$src"
        as_root touch "$dir/built"
    fi
    echo "$dir/usr/lib/postgresql/$CC_PG_VERSION"
}
