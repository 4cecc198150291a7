#!/usr/bin/env bash
# The README's test command (and CI's): install, then run the whole suite on a private database.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FAV_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
