# Helpers shared by the set-up scripts (sourced, not run). The sourcing script sets SCRIPT_NAME
# first, for its error messages.
# shellcheck shell=bash

step() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "${SCRIPT_NAME:-setup}" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "${SCRIPT_NAME:-setup}" "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo (non-interactive when there
# is no terminal, so CI fails at once instead of hanging on a password prompt).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
    else
        die "need root for: $* (not root and no sudo available)"
    fi
}
