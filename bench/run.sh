#!/usr/bin/env bash
# Golconde's benchmark: workload W through bare pgbench, logical replication, Londiste and both
# golconde flows, side by side (bench/README.md). Sets everything up first (scripts/setup.sh), then
# runs the harness with the project's venv. Options go to `python -m bench` (--quick, --rows N,
# --runs N, --modes a,b, --json FILE, --keep; --help lists them all).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m bench "$@"
