#!/usr/bin/env bash
# The README's demo command: install, then run the demo (extra arguments go to the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FIFTYONE_DO_NOT_TRACK=true FIFTYONE_DATABASE_VALIDATION=false
exec "${FAV_VENV:-.venv}/bin/python" -m fiftyone_anomaly_vlm.demo "$@"
