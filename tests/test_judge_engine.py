"""judge() on the run engine: overwrite clears the run's old values on the target samples, and arguments are
checked before anything is written. Two tiny random Qwen2-VL models built at test time (two folders, so two
model ids) answer through the real processor and generate()."""

from __future__ import annotations

import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.models.judge import make_backend

from tiny_vlms import BUILDERS

ANSWER_FIELDS = ("vlm_p_anomalous", "vlm_answer")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Qwen2-VL judges with different weights and ids."""
    return [make_backend("transformers", model=BUILDERS["qwen2_vl"](str(tmp_path_factory.mktemp(f"judge-{i}")),
                                                                   seed=i),
                         device="cpu", max_pixels=56 * 56) for i in (1, 2)]


def test_overwrite_clears_old_values_of_the_target_samples(parts, models):
    """overwrite=True used to judge again over the old values: a run stopped midway kept the other model's
    verdicts on the samples it had not reached, and the next call skipped them as done. Now the target's old
    values are cleared first; samples outside the target keep theirs."""
    model_a, model_b = models
    view = parts.match_tags("train", bool=False).limit(6)
    outside = parts.match_tags("train", bool=False).skip(6).limit(2)
    both = view.concat(outside)
    first = fav.judge(both, key="vlm", backend=model_a, batch_size=2, prefetch=0, max_new_tokens=8)
    assert first.num_judged + first.num_errors == 8 and both.count("vlm") == 8
    answers_a = dict(zip(*outside.values(["id", "vlm_answer"])))

    # another model under the same key: refused without overwrite, nothing changed
    with pytest.raises(ValueError, match="model"):
        fav.judge(view, key="vlm", backend=model_b, batch_size=2)
    assert both.count("vlm") == 8

    class Cancelled(Exception):
        pass

    def cancel_after_first_batch(pb):
        if pb.iteration >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        fav.judge(view, key="vlm", backend=model_b, batch_size=2, prefetch=0, overwrite=True, max_new_tokens=8,
                  progress=cancel_after_first_batch)
    # the first batch holds model B's answers; the other 4 samples of the target hold nothing of model A
    assert view.count("vlm") == 2
    for name in ANSWER_FIELDS:
        assert view.count(name) == 2, name
    assert dict(zip(*outside.values(["id", "vlm_answer"]))) == answers_a  # outside the target: untouched

    rest = fav.judge(view, key="vlm", backend=model_b, batch_size=2, prefetch=0, max_new_tokens=8)
    assert rest.num_skipped == 2 and rest.num_judged + rest.num_errors == 4
    assert view.count("vlm") == 6
    assert parts.get_run_info("vlm").config.backend["model"] == model_b.describe()["model"]


def test_batch_size_below_one_fails_before_any_write(parts, models):
    view = parts.limit(3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            fav.judge(view, key="vlm0", backend=models[0], batch_size=bad)
    assert "vlm0" not in parts.list_runs()
    assert not [name for name in parts.get_field_schema() if name.startswith("vlm0")]
    assert isinstance(fav.judge(view, key="vlm0", backend=models[0], batch_size=1, max_new_tokens=8).fields,
                      fav.JudgeFieldNames)
    assert view.count("vlm0") == 3 and all(isinstance(s["vlm0"], fo.Classification) for s in view)
