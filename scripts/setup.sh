#!/usr/bin/env bash
# Set up everything Golconde's tests and demo need: services, the C capture trigger's library,
# then the Python virtualenv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/setup-services.sh"
bash "$HERE/build-capture.sh"
bash "$HERE/setup-python.sh"
