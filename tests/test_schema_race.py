"""Two processes declaring run fields on one dataset at the same moment keep each other's fields (issue #21, 1).

FiftyOne's ``add_sample_field`` re-reads the field list, appends and saves the whole list: two scoring processes
on one dataset (different keys) silently lost ``<key>_*`` fields. Two real processes declare the fields of their
own key on the same dataset, released together by a barrier in the database, 20 times (a new pair of keys each
time); no field (and no heatmap colorscale) may be missing. Before the fix every round lost fields (and the retry never re-declared
them: the field was still known to the losing process, so FiftyOne saved nothing).
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import fiftyone as fo
import fiftyone.core.odm as foo

from conftest import subprocess_env
from fiftyone_anomaly_vlm.fields import FieldNames

ROUNDS = 20

CHILD = """
import sys, time
import fiftyone as fo, fiftyone.core.odm as foo
from fiftyone_anomaly_vlm.fields import FieldNames
from fiftyone_anomaly_vlm.writers import declare_fields
tag, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
barrier = foo.get_db_conn()["fav_test_barrier"]
ds = fo.load_dataset(name)
for r in range(rounds):
    barrier.insert_one({"round": f"{name}-{r}", "tag": tag})
    while barrier.count_documents({"round": f"{name}-{r}"}) < 2:
        time.sleep(0.002)
    declare_fields(ds, FieldNames(f"{tag}{r}").specs())
"""


def test_two_processes_declaring_fields_at_once_lose_none():
    ds = fo.Dataset(f"race-{uuid.uuid4().hex[:6]}")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, tag, ds.name, str(ROUNDS)], env=subprocess_env(),
                                  stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
        doc = foo.get_db_conn().datasets.find_one({"_id": ds._doc.id})
        stored = [f["name"] for f in doc["sample_fields"]]
        scales = [e["path"] for e in doc["app_config"]["color_scheme"]["colorscales"]]
        assert len(stored) == len(set(stored)) and len(scales) == len(set(scales))  # no duplicates
        lost = {}
        for r in range(ROUNDS):
            for names in (FieldNames(f"a{r}"), FieldNames(f"b{r}")):
                missing = [f for f in names.all() if f not in stored] + [
                    f"colorscale of {names.map}" for _ in [0] if names.map not in scales]
                if missing:
                    lost.setdefault(r, []).extend(missing)
        assert not lost, f"{len(lost)} of {ROUNDS} rounds lost fields: {lost}"
        ds.reload()
        assert ds.count(f"a{ROUNDS - 1}_score") == 0 and ds.count("b0_score") == 0  # usable here too
    finally:
        ds.delete()
