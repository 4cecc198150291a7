"""Test set-up: a private MongoDB database, data folder and plugins folder for the whole session.

The environment is set before FiftyOne is imported, so no test touches a user's database.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="fav-tests-"))


def _remove_test_files() -> None:
    """Remove this process's images, heatmaps and plugins link (~2 GB a run: 500 runs left behind filled a 250 GB
    disk); its database folder too unless a ``mongod`` still runs on it (this process started the service, which
    other test processes may share, and it stops after this process exits)."""
    import psutil

    db = str(_TMP / "db")
    in_use = any(db in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
    for path in ([_TMP / "data", _TMP / "plugins"] if in_use else [_TMP]):
        shutil.rmtree(path, ignore_errors=True)


if not os.environ.get("FAV_KEEP_TEST_FILES"):
    atexit.register(_remove_test_files)
_PLUGINS = _TMP / "plugins"
_PLUGINS.mkdir()
(_PLUGINS / "anomaly-vlm").symlink_to(ROOT, target_is_directory=True)
os.environ.update(
    FIFTYONE_DATABASE_DIR=os.environ.get("FAV_TEST_DATABASE_DIR", str(_TMP / "db")),
    FIFTYONE_DATABASE_NAME=f"fav_test_{uuid.uuid4().hex[:8]}",
    FIFTYONE_DEFAULT_DATASET_DIR=str(_TMP / "data"),
    FIFTYONE_PLUGINS_DIR=str(_PLUGINS),
    FIFTYONE_DO_NOT_TRACK="true",
    FIFTYONE_DATABASE_VALIDATION="false",
    FIFTYONE_SHOW_PROGRESS_BARS="false",
    HF_HUB_OFFLINE="1",
)
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of scripts/test.sh's processes: one torch thread each, so two
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # processes do not fight over the cores


def _start_private_mongod() -> None:
    """Run the suite on a ``mongod`` of its own (FiftyOne's binary, this process's database folder, a free port)
    and point FiftyOne at it with ``FIFTYONE_DATABASE_URI``; xdist workers, App servers and delegated workers
    started by the tests inherit the URI. Without it every process attaches to whatever FiftyOne database service
    already runs on the machine, whose owner may stop it (or delete its folder) in the middle of the suite: a
    suite run beside a benchmark lost its database halfway (ServerSelectionTimeoutError in 15 tests)."""
    import importlib.util
    import socket
    import subprocess
    import time

    # FiftyOne's own binary (fiftyone/db/bin, as DatabaseService.find_mongod), found without importing fiftyone:
    # FiftyOne reads FIFTYONE_DATABASE_URI once, at import
    mongod = Path(importlib.util.find_spec("fiftyone").origin).parent / "db" / "bin" / "mongod"
    db = _TMP / "db"
    (db / "log").mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(mongod), "--dbpath", str(db), "--logpath", str(db / "log" / "mongo.log"),
                             "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(lambda: (proc.terminate(), proc.wait(30)))  # registered after the file clean-up: runs first
    end = time.time() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        if proc.poll() is not None or time.time() > end:
            raise RuntimeError(f"the test database (mongod) did not start: see {db / 'log' / 'mongo.log'}")
        time.sleep(0.2)
    os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"


if not os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("FIFTYONE_DATABASE_URI"):
    _start_private_mongod()
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest  # noqa: E402

import fiftyone as fo  # noqa: E402

import fiftyone_anomaly_vlm as fav  # noqa: E402
from fiftyone_anomaly_vlm.datasets import make_parts_dataset  # noqa: E402

IMAGE_SIZE = 96
FIT_KWARGS = dict(model="padim", pretrained=False, backbone="resnet18", image_size=IMAGE_SIZE, device="cpu",
                  model_kwargs={"layers": ["layer1", "layer2"]})


def subprocess_env() -> dict[str, str]:
    """Environment for a child Python process that must see the same database and data."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="session")
def parts_template() -> fo.Dataset:
    """The generated parts dataset (never modified: clone it)."""
    return make_parts_dataset("fav-parts-template", num_normal=30, num_anomalous=12, size=IMAGE_SIZE, seed=3)


@pytest.fixture
def parts(parts_template, request) -> fo.Dataset:
    """A fresh clone of the parts dataset for one test."""
    name = f"parts-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    ds = parts_template.clone(name)
    yield ds
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


@pytest.fixture
def fitted(parts) -> fo.Dataset:
    """A parts clone with a PaDiM expert 'padim' fitted on its train-tagged normals (random backbone)."""
    fav.fit_expert(parts.match_tags("train"), key="padim", **FIT_KWARGS)
    return parts


@contextlib.contextmanager
def fitted_clone(parts_template: fo.Dataset, name: str):
    """A parts clone named ``name`` with the PaDiM expert 'padim' (for module-scoped fixtures); deleted after."""
    ds = parts_template.clone(name)
    fav.fit_expert(ds.match_tags("train"), key="padim", **FIT_KWARGS)
    try:
        yield ds
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


def pytest_sessionfinish(session, exitstatus):  # noqa: D103
    sys.stdout.flush()


def pytest_configure(config):
    """Connect to the database in the first pytest process, before scripts/test.sh's two worker processes
    (pytest-xdist) start. With the suite's own mongod this only checks it answers; otherwise it starts (or attaches to) FiftyOne's service once:
    two processes starting the service at the same moment read each other's replies ("Got response id ... but
    expected ...") and failed their tests."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        fo.list_datasets()
