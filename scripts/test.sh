#!/usr/bin/env bash
# The README's test command (and CI's): install, then run the whole suite on a private database.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two processes (FAV_TEST_WORKERS), each taking whole files (module fixtures are built once) and its own private
# database, data and plugins folder (tests/conftest.py): the browser, App-server and worker tests spend much of
# their time waiting, so two processes finish the suite in far less time even on 2 cores.
exec "${FAV_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider -n "${FAV_TEST_WORKERS:-2}" --dist loadfile --durations=30 "$@"
