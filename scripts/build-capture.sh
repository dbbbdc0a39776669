#!/usr/bin/env bash
# Build golconde.capture() in C (sql/capture_c) and install its library, golconde_capture.so, into
# the library directory of every PostgreSQL server installed under /usr/lib/postgresql (Debian's
# layout) and of the one whose pg_config is on PATH. Installs the server headers
# (postgresql-server-dev-<major>) when missing. Idempotent: rebuilds only what changed.
#
# Databases pick the library up at their next `golconde trigger install` (or
# golconde.trigger.install_schema()); without it, golconde.capture() stays in PL/pgSQL.
#
# Environment knobs:
#   GOLCONDE_CAPTURE_C=skip   do nothing (the PL/pgSQL capture is used)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/sql/capture_c"

# shellcheck disable=SC2034  # read by lib.sh
SCRIPT_NAME=build-capture
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ "${GOLCONDE_CAPTURE_C:-}" = "skip" ]; then
    step "C capture trigger: skipped (GOLCONDE_CAPTURE_C=skip)"
    exit 0
fi

configs=()
for candidate in /usr/lib/postgresql/*/bin/pg_config; do
    [ -x "$candidate" ] && configs+=("$candidate")
done
# servers installed without their pg_config (no headers package yet): name it, it comes with them
for server in /usr/lib/postgresql/*/bin/postgres; do
    [ -x "$server" ] || continue
    candidate="$(dirname "$server")/pg_config"
    [ -x "$candidate" ] || configs+=("$candidate")
done
if command -v pg_config >/dev/null 2>&1; then
    configs+=("$(command -v pg_config)")
fi
[ "${#configs[@]}" -gt 0 ] || die "no PostgreSQL server found (no /usr/lib/postgresql/*/bin/postgres, no pg_config)"

declare -A done_dirs=()
for pg_config in "${configs[@]}"; do
    case "$pg_config" in
        /usr/lib/postgresql/*) major="$(basename "$(dirname "$(dirname "$pg_config")")")" ;;
        *) major="$("$pg_config" --version | awk '{print $2}' | cut -d. -f1)" ;;
    esac
    step "C capture trigger for PostgreSQL ${major} (${pg_config})"
    if [ ! -x "$pg_config" ] || [ ! -f "$("$pg_config" --includedir-server 2>/dev/null)/postgres.h" ]; then
        command -v apt-get >/dev/null 2>&1 || die "no server headers for PostgreSQL ${major} and no apt-get to install postgresql-server-dev-${major}"
        info "installing postgresql-server-dev-${major}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-server-dev-${major}" >/dev/null \
            || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
                 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-server-dev-${major}" >/dev/null; } \
            || die "apt-get install postgresql-server-dev-${major} failed"
    fi
    libdir="$("$pg_config" --pkglibdir)"
    [ -z "${done_dirs[$libdir]:-}" ] || { info "already installed in ${libdir}"; continue; }
    # build out of the source tree, one directory per server version (objects differ)
    build="$ROOT/var/build/capture_c-$("$pg_config" --version | tr -c 'A-Za-z0-9.\n' '_')"
    mkdir -p "$build"
    cp -p "$SRC/golconde_capture.c" "$SRC/Makefile" "$build/"
    make -s -C "$build" PG_CONFIG="$pg_config" >/dev/null || die "building golconde_capture for ${major} failed"
    as_root make -s -C "$build" PG_CONFIG="$pg_config" install >/dev/null \
        || die "installing golconde_capture into ${libdir} failed"
    done_dirs[$libdir]=1
    info "installed ${libdir}/golconde_capture.so"
done
