#!/usr/bin/env bash
# One command for a fresh Debian machine: install and start what is missing, then run the demo
# (pgbench's workload through capture triggers, and the slides' packets through the client flow,
# each to two target databases; ends with `golconde compare`). Options go to scripts/demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
