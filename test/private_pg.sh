#!/bin/bash
# Makes a relocated copy of the Debian PostgreSQL tree under DIR and prints
# the CC_BINDIR to use with it.  PostgreSQL finds its share and lib
# directories relative to its binaries, so several people (or agents) can
# build, install and test the extension at once without sharing one install
# directory:
#   export CC_BINDIR=$(bash test/private_pg.sh /opt/pgpriv/me)
#   bash test/run_all.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
dir=${1:?usage: private_pg.sh DIR}
v=$CC_PG_VERSION
if [ ! -x "$dir/usr/lib/postgresql/$v/bin/postgres" ]; then
    as_root mkdir -p "$dir/usr/lib/postgresql" "$dir/usr/share/postgresql" "$dir/usr/include"
    as_root cp -a "/usr/lib/postgresql/$v" "$dir/usr/lib/postgresql/"
    as_root cp -a "/usr/share/postgresql/$v" "$dir/usr/share/postgresql/"
    as_root cp -a /usr/include/postgresql "$dir/usr/include/"
fi
echo "$dir/usr/lib/postgresql/$v/bin"
