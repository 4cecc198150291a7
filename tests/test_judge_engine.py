"""judge() on the run engine: overwrite clears the run's old values on the target samples, and arguments are
checked before anything is written. A canned backend (no model) answers, so these run in seconds."""

from __future__ import annotations

import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.models.judge import JudgeAnswer, JudgeBackend


class _Canned(JudgeBackend):
    """Answers every request with the same text and P(yes); named after a model."""

    name = "canned"

    def __init__(self, model: str, text: str, p_yes: float) -> None:
        self.model, self.text, self.p_yes = model, text, p_yes

    def describe(self):
        return {"backend": self.name, "model": self.model}

    def judge(self, requests):
        return [JudgeAnswer(text=self.text, p_yes=self.p_yes, answered_mass=0.9, meta=r.meta) for r in requests]


MODEL_A = _Canned("model-a", "Yes. Defect: scratch. Location: top left. Explanation: a line crosses the part.", 0.9)
MODEL_B = _Canned("model-b", "No. Defect: none. Location: none. Explanation: the part looks fine.", 0.2)


def test_overwrite_clears_old_values_of_the_target_samples(parts):
    """overwrite=True used to judge again over the old values: a run stopped midway kept the other model's
    verdicts on the samples it had not reached, and the next call skipped them as done. Now the target's old
    values are cleared first; samples outside the target keep theirs."""
    view = parts.match_tags("train", bool=False).limit(6)
    outside = parts.match_tags("train", bool=False).skip(6).limit(2)
    both = view.concat(outside)
    first = fav.judge(both, key="vlm", backend=MODEL_A, batch_size=2, prefetch=0)
    assert first.num_judged == 8 and both.count_values("vlm_defect.label") == {"scratch": 8}

    # another model under the same key: refused without overwrite, nothing changed
    with pytest.raises(ValueError, match="model"):
        fav.judge(view, key="vlm", backend=MODEL_B, batch_size=2)
    assert both.count_values("vlm.label") == {"anomalous": 8}

    class Cancelled(Exception):
        pass

    def cancel_after_first_batch(pb):
        if pb.iteration >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        fav.judge(view, key="vlm", backend=MODEL_B, batch_size=2, prefetch=0, overwrite=True,
                  progress=cancel_after_first_batch)
    # the first batch holds model B's answers; the other 4 samples of the target hold nothing of model A
    assert view.count_values("vlm.label") == {"normal": 2, None: 4}
    for name in ("vlm_p_anomalous", "vlm_defect", "vlm_location", "vlm_explanation", "vlm_answer"):
        assert view.count(name) == 2, name
    assert outside.count_values("vlm.label") == {"anomalous": 2}

    rest = fav.judge(view, key="vlm", backend=MODEL_B, batch_size=2, prefetch=0)
    assert rest.num_skipped == 2 and rest.num_judged == 4
    assert view.count_values("vlm.label") == {"normal": 6}
    assert view.count_values("vlm_defect.label") == {"none": 6}
    assert parts.get_run_info("vlm").config.backend["model"] == "model-b"


def test_batch_size_below_one_fails_before_any_write(parts):
    view = parts.limit(3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            fav.judge(view, key="vlm0", backend=MODEL_A, batch_size=bad)
    assert "vlm0" not in parts.list_runs()
    assert not [name for name in parts.get_field_schema() if name.startswith("vlm0")]
    assert isinstance(fav.judge(view, key="vlm0", backend=MODEL_A, batch_size=1).fields, fav.JudgeFieldNames)
    assert view.count_values("vlm0.label") == {"anomalous": 3} and all(
        isinstance(s["vlm0"], fo.Classification) for s in view)
