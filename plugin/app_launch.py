"""Open a dataset in the App with scheduling enabled and a delegated-operation worker.

The open-source App offers "Schedule" (delegated execution) only when the App server runs with
``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true`` (``fo.config.allow_legacy_orchestrators``); what is scheduled
runs in a worker, ``fiftyone delegated launch``. :func:`launch_app` sets both up: the environment (that variable,
and ``FIFTYONE_PLUGINS_DIR`` at a folder where this plugin is found), the App on the dataset, and ``workers``
worker processes started as its children, stopped when the App stops (Ctrl+C). ``bash scripts/demo.sh --app``
calls it on the demo dataset.

A worker killed while it ran an operation leaves that operation "running" for ever: mark it failed with
``fiftyone delegated fail <id>`` (the id is in the review panel's Runs section and ``fiftyone delegated list``)
and schedule the run again (an interrupted scoring run resumes where it stopped).

Example:
    >>> from fiftyone_anomaly_vlm.app_launch import launch_app
    >>> launch_app("anomaly-vlm-parts", port=5151)   # blocks until Ctrl+C
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import fiftyone as fo
import fiftyone.plugins as fop

#: the plugin's name in ``fiftyone.yml``
PLUGIN_NAME = "@anomaly-vlm/anomaly-vlm"
#: the App server variable that enables "Schedule" in the open-source App
ALLOW_SCHEDULING = "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS"
#: the folder name of the link :func:`plugins_dir_with_plugin` makes in a plugins folder
LINK_NAME = "anomaly-vlm"
#: the review panel's name (``panels/review.py``)
REVIEW_PANEL = "anomaly_review"


def review_layout() -> fo.Space:
    """The App's layout that :func:`launch_app` opens: the sample grid with the review panel beside it (whose
    Runs section lists the scheduled runs)."""
    return fo.Space(children=[fo.Panel(type="Samples", pinned=True), fo.Panel(type=REVIEW_PANEL)],
                    orientation="horizontal")


def plugin_folder() -> Path:
    """The folder holding this plugin's ``fiftyone.yml`` (the repository, for an editable install).

    Raises:
        FileNotFoundError: the package was installed without the plugin's files (not ``pip install -e .``).
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "fiftyone.yml").is_file():
        raise FileNotFoundError(f"no fiftyone.yml beside the package ({root}): install the plugin from its "
                                "repository with 'pip install -e .', or set FIFTYONE_PLUGINS_DIR to a folder "
                                "holding the repository")
    return root


def plugins_dir_with_plugin() -> str:
    """A plugins folder where FiftyOne finds this plugin: ``fo.config.plugins_dir`` when it holds it already,
    else that folder (created if missing) after linking ``<plugins_dir>/anomaly-vlm`` to :func:`plugin_folder`."""
    plugins_dir = fo.config.plugins_dir
    try:
        fop.find_plugin(PLUGIN_NAME)
        return plugins_dir
    except ValueError:
        pass
    link = Path(plugins_dir) / LINK_NAME
    if link.is_symlink() or link.exists():
        raise FileExistsError(f"{link} exists but holds no plugin {PLUGIN_NAME}: remove it or set "
                              "FIFTYONE_PLUGINS_DIR to a folder holding this repository")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(plugin_folder(), target_is_directory=True)
    print(f"linked {link} -> {plugin_folder()} (FiftyOne's plugins folder)", flush=True)
    return plugins_dir


def app_environment(plugins_dir: str | None = None) -> dict[str, str]:
    """This process's environment with scheduling enabled and ``FIFTYONE_PLUGINS_DIR`` at ``plugins_dir``
    (default: :func:`plugins_dir_with_plugin`): for the App server and the workers."""
    env = dict(os.environ)
    env[ALLOW_SCHEDULING] = "true"
    env["FIFTYONE_PLUGINS_DIR"] = str(plugins_dir or plugins_dir_with_plugin())
    return env


def worker_command() -> list[str]:
    """``fiftyone delegated launch``, with the ``fiftyone`` command of this Python environment."""
    beside = Path(sys.executable).parent / "fiftyone"
    return [str(beside) if beside.is_file() else (shutil.which("fiftyone") or "fiftyone"), "delegated", "launch"]


def start_workers(num: int, env: dict[str, str], log_dir: str | None = None) -> list[subprocess.Popen]:
    """Start ``num`` workers (:func:`worker_command`) with ``env``, each in its own process group; their output
    goes to ``<log_dir>/worker-<i>.log`` (default: this process's output)."""
    workers = []
    for i in range(num):
        out = open(os.path.join(log_dir, f"worker-{i}.log"), "ab") if log_dir else None  # noqa: SIM115
        try:
            workers.append(subprocess.Popen(worker_command(), env=env, stdout=out, stderr=subprocess.STDOUT if out
                                            else None, start_new_session=True, preexec_fn=_default_sigint))
        finally:
            if out:
                out.close()  # the child holds its own descriptor
    return workers


def _default_sigint() -> None:
    """In a worker before it starts: SIGINT back to its default, so that :func:`stop_workers` (Ctrl+C) reaches it
    even where this process inherited SIGINT ignored (a shell's background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_on_signals() -> None:
    """Ctrl+C (SIGINT) and SIGTERM raise KeyboardInterrupt in this process's main thread, also where SIGINT was
    inherited ignored (a background job of a shell: Python then installs no handler of its own)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def stop_workers(workers: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """Stop the workers as Ctrl+C would (SIGINT to each one's process group), then kill what is left."""
    for proc in workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    for proc in workers:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class AppLaunch:
    """A running App session and its workers (:func:`launch_app`)."""

    session: fo.Session
    url: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def close(self) -> None:
        """Stop the workers, then the App."""
        stop_workers(self.workers)
        self.session.close()

    def __enter__(self) -> AppLaunch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def launch_app(dataset_name: str, port: int = 5151, workers: int = 1, address: str | None = None,
               plugins_dir: str | None = None, wait: bool = True, log_dir: str | None = None,
               **launch_kwargs) -> AppLaunch:
    """Launch the App on dataset ``dataset_name`` with "Schedule" enabled and ``workers`` delegated workers, the
    review panel open beside the grid.

    Sets ``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true`` and ``FIFTYONE_PLUGINS_DIR`` (:func:`app_environment`) in
    this process's environment, which the App server (a child process) inherits, starts the workers, launches
    the App and prints its URL.

    Args:
        dataset_name: the dataset to open.
        port: the App's port.
        workers: how many ``fiftyone delegated launch`` workers to start (0: none; run one yourself).
        address: the address the App listens on (default: FiftyOne's, localhost).
        plugins_dir: the plugins folder (default: :func:`plugins_dir_with_plugin`).
        wait: block until Ctrl+C (or the App's server ends), then stop the workers and the App; False returns
            at once (close the returned :class:`AppLaunch`; it is a context manager).
        log_dir: a folder for the workers' output (default: this process's output).
        **launch_kwargs: passed to ``fo.launch_app`` (``remote``, ``auto``...; ``spaces`` default:
            :func:`review_layout`).

    Returns:
        the :class:`AppLaunch` (already closed when ``wait``).
    """
    dataset = fo.load_dataset(dataset_name)
    env = app_environment(plugins_dir)
    os.environ.update({k: env[k] for k in (ALLOW_SCHEDULING, "FIFTYONE_PLUGINS_DIR")})
    fo.config.allow_legacy_orchestrators, fo.config.plugins_dir = True, env["FIFTYONE_PLUGINS_DIR"]
    procs = start_workers(workers, env, log_dir=log_dir)
    try:
        launch_kwargs.setdefault("spaces", review_layout())
        session = fo.launch_app(dataset, port=port, address=address, **launch_kwargs)
    except BaseException:
        stop_workers(procs)
        raise
    url = f"http://{address or 'localhost'}:{port}/datasets/{dataset_name}"
    app = AppLaunch(session, url, procs)
    print(f"App: {url}  (scheduling enabled, {workers} delegated worker(s); Ctrl+C stops both)", flush=True)
    if not wait:
        return app
    interrupt_on_signals()
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return app
