#!/usr/bin/env bash
# Build golconde.capture() in C (sql/capture_c) and install its library, golconde_capture.so, into
# the library directory of every PostgreSQL server installed under /usr/lib/postgresql (Debian's
# layout), or of the one whose pg_config is on PATH when there is none there. Installs the server
# headers (postgresql-server-dev-<major>), make and gcc when missing. Idempotent: installs the
# library only when it differs from the one in place.
#
# Databases pick the library up at their next `golconde trigger install` (or
# golconde.trigger.install_schema()); without it, golconde.capture() stays in PL/pgSQL. A server
# process keeps the library it loaded first: after replacing it, reconnect before installing.
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

# Debian's server packages: /usr/lib/postgresql/<major>/bin/postgres, pg_config beside it once
# postgresql-server-dev-<major> is installed. The pg_config on PATH only where there are none
# (it may belong to a client library of another major version).
configs=()
for server in /usr/lib/postgresql/*/bin/postgres; do
    [ -x "$server" ] && configs+=("$(dirname "$server")/pg_config")
done
if [ "${#configs[@]}" -eq 0 ] && command -v pg_config >/dev/null 2>&1; then
    configs+=("$(command -v pg_config)")
fi
[ "${#configs[@]}" -gt 0 ] || die "no PostgreSQL server found (no /usr/lib/postgresql/*/bin/postgres, no pg_config)"

apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "missing $*, and no apt-get to install it"
    info "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
             && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; } \
        || die "apt-get install $* failed"
}

tools=()
command -v make >/dev/null 2>&1 || tools+=(make)
command -v gcc >/dev/null 2>&1 || tools+=(gcc)
[ "${#tools[@]}" -eq 0 ] || apt_install "${tools[@]}"

declare -A done_dirs=()
for pg_config in "${configs[@]}"; do
    case "$pg_config" in
        /usr/lib/postgresql/*) major="$(basename "$(dirname "$(dirname "$pg_config")")")" ;;
        *) major="$("$pg_config" --version | awk '{print $2}' | cut -d. -f1)" ;;
    esac
    step "C capture trigger for PostgreSQL ${major} (${pg_config})"
    if [ ! -x "$pg_config" ] || [ ! -f "$("$pg_config" --includedir-server 2>/dev/null)/postgres.h" ]; then
        apt_install "postgresql-server-dev-${major}"
    fi
    libdir="$("$pg_config" --pkglibdir)"
    [ -z "${done_dirs[$libdir]:-}" ] || { info "already installed in ${libdir}"; continue; }
    # build out of the source tree, one directory per server version (objects differ)
    build="$ROOT/var/build/capture_c-$("$pg_config" --version | tr -c 'A-Za-z0-9.\n' '_')"
    mkdir -p "$build"
    cp "$SRC/golconde_capture.c" "$SRC/Makefile" "$build/"   # fresh mtimes: make rebuilds (cmp decides the install)
    # with_llvm=no: no JIT bitcode, so clang is not needed
    make -s -C "$build" PG_CONFIG="$pg_config" with_llvm=no >/dev/null \
        || die "building golconde_capture for ${major} failed"
    done_dirs[$libdir]=1
    if cmp -s "$build/golconde_capture.so" "$libdir/golconde_capture.so"; then
        info "${libdir}/golconde_capture.so is up to date"
        continue
    fi
    as_root make -s -C "$build" PG_CONFIG="$pg_config" with_llvm=no install >/dev/null \
        || die "installing golconde_capture into ${libdir} failed"
    # JIT bitcode of an earlier build would be stale
    as_root rm -rf "${libdir}/bitcode/golconde_capture" "${libdir}/bitcode/golconde_capture.index.bc"
    info "installed ${libdir}/golconde_capture.so"
done
