#!/usr/bin/env bash
# Create the project's virtualenv (.venv in the project root) if missing and install Golconde into
# it in editable mode with its test extras. Prints the venv path.
#
# Environment knobs:
#   PYTHON                 interpreter to build the venv from (default: python3 on PATH)
#   GOLCONDE_FORCE_INSTALL=1  reinstall even when setup.py/pyproject.toml have not changed
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.golconde-install-stamp"
PYTHON="${PYTHON:-python3}"

# shellcheck disable=SC2034  # read by lib.sh
SCRIPT_NAME=setup-python
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

venv_works() {
    [ -x "$VPY" ] && "$VPY" -c 'import sys; assert sys.version_info >= (3, 9)' >/dev/null 2>&1 \
        && "$VPY" -m pip --version >/dev/null 2>&1
}

make_venv() {
    "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 && venv_works
}

step "Python virtualenv at ${VENV}"
if venv_works; then
    info "exists: reusing it"
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "no '${PYTHON}' on PATH (set PYTHON=/path/to/python3)"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
        || die "$("$PYTHON" --version 2>&1) is too old: Golconde needs Python >= 3.9"
    if [ -e "$VENV" ]; then
        info "broken or unusable: recreating it"
        rm -rf "$VENV"
    fi
    info "creating it with $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
    if ! make_venv; then
        rm -rf "$VENV"
        # Debian's own python3 ships venv/ensurepip separately (python3-venv).
        if command -v apt-get >/dev/null 2>&1; then
            info "'${PYTHON} -m venv' failed: installing python3-venv"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null \
                || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
                     && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null; } \
                || die "could not install python3-venv"
        fi
        make_venv || { "$PYTHON" -m venv "$VENV" || true; die "could not create a working venv at ${VENV} with ${PYTHON}"; }
    fi
    info "upgrading pip"
    "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip \
        || die "pip upgrade in ${VENV} failed"
fi

step "Installing golconde (editable, with [test] extras)"
# Editable installs pick up code changes by themselves; reinstall only when the packaging changes.
want_stamp="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" 2>/dev/null | cksum)"
if [ "${GOLCONDE_FORCE_INSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
        && "$VPY" -c 'import golconde, stomp, psycopg2, yaml, pydantic, simplejson, daemon, pytest, hypothesis, pyflakes' >/dev/null 2>&1; then
    info "up to date"
else
    rm -f "$STAMP"
    (cd "$ROOT" && "$VPY" -m pip install -q --disable-pip-version-check -e '.[test]') \
        || die "pip install -e '.[test]' failed"
    printf '%s\n' "$want_stamp" >"$STAMP"
    info "installed"
fi

printf '%s\n' "$VENV"
