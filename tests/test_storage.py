"""One storage root on several machines (issue #21): records relative to the root, labels under the run's App root,
clean-up of every shard's files, runs recorded by earlier releases, output folders checked before any work.

Two "machines" are two processes whose roots are two symlinks to one shared folder; the App's machine's link is
removed while the other machine runs, so that machine cannot reach a file through the App's paths. For the
deletion, the test's own process takes machine B's root (the root is read from the environment at each call).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import fiftyone as fo
import fiftyone.core.odm as foo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.storage import APP_ROOT_ENV, ROOT_ENV
from conftest import FIT_KWARGS, subprocess_env
from test_panel_browser import (_click, _input_after_label, _notification, _text, _wait, browser,  # noqa: F401
                                open_operator_form, served_app)

SCORE_KW = dict(device="cpu", batch_size=16, num_workers=0)

#: machine B: score shard 1 of 2 of run "s" and re-threshold it (every mask rewritten)
_MACHINE_B = r"""
import json, sys
import fiftyone as fo
import fiftyone_anomaly_vlm as fav
ds = fo.load_dataset(sys.argv[1])
r = fav.score(ds, expert="padim", key="s", shard=(1, 2), device="cpu", batch_size=16, num_workers=0)
fav.set_threshold(ds, "s", rule="far", param=0.2)
print(json.dumps({"scored": r.num_scored, "output_dir": r.output_dir,
                  "checkpoint": fav.load_expert(ds, "padim").checkpoint}))
"""


def _raw_config(ds, key: str) -> dict:
    """Run ``key``'s config as stored in the database."""
    return foo.get_db_conn().runs.find_one({"_id": ds._doc.runs[key].id})["config"]


def _machine_b(ds, root, app_root) -> dict:
    env = dict(subprocess_env(), **{ROOT_ENV: str(root), APP_ROOT_ENV: str(app_root)})
    out = subprocess.run([sys.executable, "-c", _MACHINE_B, ds.name], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pngs(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".png")) if os.path.isdir(folder) else []


def test_two_machines_mounting_the_storage_elsewhere_share_experts_scores_and_clean_up(parts, tmp_path, monkeypatch):
    shared = tmp_path / "nfs"
    shared.mkdir()
    mnt_a, mnt_b = tmp_path / "a" / "fav", tmp_path / "b" / "fav"
    for link in (mnt_a, mnt_b):
        link.parent.mkdir()
        link.symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv(ROOT_ENV, str(mnt_a))  # machine A: this process; it runs the App
    monkeypatch.delenv(APP_ROOT_ENV, raising=False)

    fav.fit_expert(parts.match_tags("train"), key="padim", **FIT_KWARGS)
    expert = _raw_config(parts, "padim_expert")
    assert expert["checkpoint"].startswith(f"{parts.name}/experts/padim/fit-")  # relative to the root
    assert expert["output_dir"] == f"{parts.name}/experts/padim" and expert["storage_root"] == str(mnt_a)
    first = fav.score(parts, expert="padim", key="s", shard=(0, 2), **SCORE_KW)

    mnt_a.unlink()  # machine B cannot see A's mount: it finds everything under its own
    started = time.time()
    b = _machine_b(parts, mnt_b, mnt_a)
    assert b["checkpoint"] == os.path.join(str(mnt_b), expert["checkpoint"])
    assert b["output_dir"] == os.path.join(str(mnt_b), parts.name, "scores", "s")
    assert b["scored"] > 0 and first.num_scored + b["scored"] == len(parts)
    maps_dir = shared / parts.name / "scores" / "s" / "maps"
    # B finished the run (the last shard): it removed no PNG in use, though the labels name A's paths
    assert len(_pngs(maps_dir)) == len(parts)
    masks_dir = maps_dir.parent / "masks"  # B re-thresholded A's masks too (reached through its own mount)
    assert min(os.path.getmtime(masks_dir / n) for n in _pngs(masks_dir)) >= started

    mnt_a.symlink_to(shared, target_is_directory=True)  # the App's machine again
    parts.reload()
    paths = parts.values("s_map.map_path") + parts.values("s_mask.mask_path")
    assert all(p.startswith(str(mnt_a) + os.sep) and os.path.isfile(p) for p in paths)  # every label opens in A
    raw = _raw_config(parts, "s")
    assert raw["output_dirs"] == [f"{parts.name}/scores/s"] and raw["app_root"] == str(mnt_a)
    assert parts.get_run_info("s").config.output_dir == os.path.join(str(mnt_a), parts.name, "scores", "s")

    mnt_a.unlink()  # this process as machine B now (its root, A's mount gone): it deletes every shard's files
    monkeypatch.setenv(ROOT_ENV, str(mnt_b))
    parts.delete_run("s")
    assert not (shared / parts.name / "scores" / "s").exists()
    parts.delete_run("padim_expert")
    assert not (shared / parts.name / "experts" / "padim").exists()


def test_runs_recorded_with_absolute_paths_load_score_and_delete(parts, tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv(ROOT_ENV, str(root))
    monkeypatch.delenv(APP_ROOT_ENV, raising=False)
    fav.fit_expert(parts.match_tags("train"), key="padim", **FIT_KWARGS)
    train = parts.match_tags("train")
    fav.score(train, expert="padim", key="old", **SCORE_KW)
    runs = foo.get_db_conn().runs
    for key in ("padim_expert", "old"):  # as earlier releases wrote them: absolute paths, no roots recorded
        config = _raw_config(parts, key)
        for name in ("checkpoint", "output_dir", "maps_dir", "masks_dir"):
            if config.get(name):
                config[name] = str(root / config[name])
        if "output_dirs" in config:
            config["output_dirs"] = [str(root / d) for d in config["output_dirs"]]
        config.pop("storage_root")
        config.pop("app_root", None)
        runs.update_one({"_id": parts._doc.runs[key].id}, {"$set": {"config": config}})
    parts.reload()
    checkpoint = _raw_config(parts, "padim_expert")["checkpoint"]
    assert os.path.isabs(checkpoint) and fav.load_expert(parts, "padim").checkpoint == checkpoint

    resumed = fav.score(parts, expert="padim", key="old", **SCORE_KW)  # the old run resumes on the rest
    assert resumed.num_skipped == len(train) and resumed.num_scored == len(parts) - len(train)
    assert all(os.path.isfile(p) for p in parts.values("old_map.map_path"))
    out_dir = root / parts.name / "scores" / "old"
    assert len(_pngs(out_dir / "maps")) == len(parts)
    parts.delete_run("old")
    assert not out_dir.exists()
    parts.delete_run("padim_expert")
    assert not os.path.exists(os.path.dirname(checkpoint))


def test_output_folders_are_checked_first_relative_ones_go_under_the_root_and_delete_dataset_removes_all(
        parts, tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv(ROOT_ENV, str(root))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fav.fit_expert(parts.match_tags("train"), key="x", output_dir=str(blocker), **FIT_KWARGS)
    with pytest.raises(ValueError, match="cannot be created: .* is a file"):
        fav.fit_expert(parts.match_tags("train"), key="x", output_dir=str(blocker / "sub"), **FIT_KWARGS)
    assert parts.list_runs() == []

    fav.fit_expert(parts.match_tags("train"), key="padim", output_dir="line3/padim", **FIT_KWARGS)
    assert _raw_config(parts, "padim_expert")["output_dir"] == "line3/padim"
    with pytest.raises(ValueError, match="cannot be created"):
        fav.score(parts, expert="padim", key="bad", output_dir=str(blocker / "sub"), **SCORE_KW)
    assert "bad" not in parts.list_runs() and not parts.has_field("bad_score")
    result = fav.score(parts, expert="padim", output_dir="line3/scores", **SCORE_KW)
    assert result.output_dir == str(root / "line3" / "scores")
    assert len(_pngs(root / "line3" / "scores" / "maps")) == len(parts)

    fav.delete_dataset(parts.name)  # fo.delete_dataset would leave every file behind
    assert not fo.dataset_exists(parts.name)
    assert [f for _, _, f in os.walk(root) if f] == []


def test_score_form_output_folder_in_the_app(parts, browser, tmp_path, monkeypatch):  # noqa: F811
    driver = browser
    root = tmp_path / "root"
    monkeypatch.setenv(ROOT_ENV, str(root))  # the App server (a child process) inherits it
    fav.fit_expert(parts.match_tags("train"), key="padim", **FIT_KWARGS)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with served_app(driver, parts) as session:
        open_operator_form(driver, "score samples", "Anomaly: score samples")
        field = _input_after_label(driver, "Output folder")
        field.send_keys(str(blocker))
        _wait("the form's message", lambda: "is a file, not a folder" in _text(driver), 30)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("line3/from-the-app")
        execute = "//button[normalize-space(.)='Execute']"
        _wait("the form to accept the folder", lambda: "is a file" not in _text(driver)
              and driver.find_element(By.XPATH, execute).is_enabled(), 30)
        _click(driver, "button", "Execute")
        _notification(driver, "flagged anomalous in 'padim'", timeout=300)
        parts.reload()
        out = root / "line3" / "from-the-app"
        assert len(_pngs(out / "maps")) == len(parts) and len(_pngs(out / "masks")) == len(parts)
        assert _raw_config(parts, "padim")["output_dir"] == "line3/from-the-app"
        map_path = parts.first()["padim_map"].map_path
        assert map_path.startswith(str(out))
        url = f"http://127.0.0.1:{session.server_port}/media?filepath={urllib.request.quote(map_path)}"
        with urllib.request.urlopen(url, timeout=30) as reply:  # the App serves the label's file
            assert reply.status == 200 and reply.read(8) == b"\x89PNG\r\n\x1a\n"
