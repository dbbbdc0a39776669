#!/usr/bin/env bash
# Set up (services + venv), then run the test suite with the venv's pytest.
# Extra arguments go to pytest; when they name test paths, those replace the default `tests`.
# Exits with pytest's status, except that "no tests collected" (5) is reported as a failure too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

targets=(tests)
for arg in "$@"; do
    case "$arg" in
        -*) ;;
        *) if [ -e "${arg%%::*}" ]; then targets=(); break; fi ;;
    esac
done

echo "==> .venv/bin/python -m pytest ${targets[*]} -q -ra $*"
status=0
.venv/bin/python -m pytest "${targets[@]}" -q -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: ERROR: pytest collected no tests (exit 5): treating that as a failure" >&2
fi
exit "$status"
