# Shared by test/run_all.sh, test/demo.sh and bench/run.sh.  Source it.
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
postgresql-$CC_PG_VERSION-cron postgresql-contrib libcurl4-openssl-dev
libipc-run-perl make gcc ca-certificates python3 curl procps nginx-light wrk"

cc_say() { printf '==> %s\n' "$*"; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a command as the unprivileged cluster owner, with a raised
# open-file limit (runuser starts at 1024).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        ulimit -n 65536 2>/dev/null || true
        runuser -u "$CC_PG_USER" -- "$@"
    else
        sudo -u "$CC_PG_USER" -- bash -c 'ulimit -n 65536 2>/dev/null; exec "$@"' bash "$@"
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

# Prints a TCP port on 127.0.0.1 that nothing listens on.
cc_free_port() {
    local p=${1:-54320}
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do
        p=$((p + 1))
    done
    echo "$p"
}
