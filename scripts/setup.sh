#!/usr/bin/env bash
# Set up everything Golconde's tests and demo need: services, the C capture trigger's library,
# then the Python virtualenv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/setup-services.sh"
# without the C capture trigger's library, golconde.capture() stays in PL/pgSQL: warn, go on
bash "$HERE/build-capture.sh" \
    || echo "setup: warning: the C capture trigger was not built; golconde.capture() stays in PL/pgSQL" >&2
bash "$HERE/setup-python.sh"
