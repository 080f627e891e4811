#!/usr/bin/env bash
# A throwaway Postgres cluster for the store's tests.
#
#   eval "$(scripts/postgres.sh)"        # start one; exports FERRUM_TEST_POSTGRES_URL and
#                                         # FERRUM_TEST_POSTGRES_DIR
#   cargo test -p ferrum-store
#   scripts/postgres.sh stop "$FERRUM_TEST_POSTGRES_DIR"
#
# The cluster lives in a fresh directory under /tmp and listens only on a Unix socket in that
# directory (no TCP port, so nothing can clash with another cluster), with fsync off because its
# data is thrown away. It needs the Postgres server binaries (initdb, pg_ctl, createdb) on PATH
# or under /usr/lib/postgresql/*/bin (Debian: `apt-get install postgresql`). initdb refuses to
# run as root, so as root the cluster runs as the `postgres` user.
#
# Only `export` lines go to stdout (for eval); progress and errors go to stderr. Exit status 2
# means the server binaries are missing, so a caller can skip the Postgres tests on that alone.
set -euo pipefail

MARKER=.ferrum-test-postgres

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}

# The directory holding initdb and pg_ctl: PATH first, else the newest Debian install.
find_bin() {
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
        echo "$dir"
        return
    fi
    echo "postgres.sh: no Postgres server binaries (initdb, pg_ctl) found;" \
        "install them with: apt-get install -y postgresql" >&2
    exit 2
}

# Runs a command as USER: directly if that is who we are, else through runuser or su.
run_as() {
    local user=$1
    shift
    if [[ "$user" == "$(id -un)" ]]; then
        "$@"
    elif command -v runuser >/dev/null; then
        runuser -u "$user" -- "$@"
    else
        su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
    fi
}

start() {
    local bin user dir
    bin=$(find_bin)
    user=$(id -un)
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root and there is no 'postgres' user for initdb"
        user=postgres
    fi
    dir=$(mktemp -d /tmp/ferrum-pg.XXXXXX)
    touch "$dir/$MARKER"
    chown "$user" "$dir"
    chmod 700 "$dir"

    echo "postgres.sh: starting a cluster in $dir as $user ($bin)" >&2
    run_as "$user" "$bin/initdb" -D "$dir/data" -U ferrum --auth=trust --no-locale \
        --encoding=UTF8 --no-sync >"$dir/initdb.log" 2>&1 ||
        die "initdb failed; see $dir/initdb.log"
    # listen_addresses='' turns TCP off: clients use the socket in $dir.
    run_as "$user" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses='' -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >&2 || die "the server did not start; see $dir/server.log"
    run_as "$user" "$bin/createdb" -h "$dir" -U ferrum ferrum >&2 ||
        die "createdb failed (the cluster is still running: $0 stop $dir)"

    echo "export FERRUM_TEST_POSTGRES_URL='postgres://ferrum@localhost/ferrum?host=$dir'"
    echo "export FERRUM_TEST_POSTGRES_DIR='$dir'"
    echo "postgres.sh: ready; stop it with: $0 stop $dir" >&2
}

stop() {
    local dir=${1:-}
    [[ -n "$dir" ]] || die "usage: $0 stop DIR"
    # The marker makes sure `rm -rf` only ever removes a directory this script created.
    [[ -f "$dir/$MARKER" ]] || die "$dir is not a cluster started by this script"
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        local bin owner
        bin=$(find_bin)
        owner=$(stat -c %U "$dir/data")
        # Immediate mode: the data is thrown away, so there is nothing to flush.
        run_as "$owner" "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 ||
            echo "postgres.sh: pg_ctl stop failed; removing $dir anyway" >&2
    fi
    rm -rf "$dir"
}

case "${1:-start}" in
start) start ;;
stop) stop "${2:-}" ;;
*) die "usage: $0 [start] | $0 stop DIR" ;;
esac
