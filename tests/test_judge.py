"""The VLM judge: tiny locally built VLMs through the real generate() path, and judge() end to end.

Six families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL, Idefics3; ``tiny_vlms.py``) go
through the same batched, left-padded backend check: P(yes) equals a direct prefill computation per sample.
The tiny models have random weights, so their answers are garbage: that exercises the "unparsed" path;
the parser is tested on hand-written answers.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.judging import (GRID, JudgeFieldNames, fuse_scores, normalize_location, parse_answer,
                                           read_heatmap, top_regions)
from fiftyone_anomaly_vlm.models.judge import JudgeBackend, JudgeRequest, make_backend
from fiftyone_anomaly_vlm.models.judge.hf import TransformersBackend, answer_token_ids, prepare_image

from tiny_vlms import BUILDERS

PLUGIN = "@anomaly-vlm/anomaly-vlm"


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """``family -> folder``: each tiny VLM is built once per session, on first use, in its own tmp dir."""
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = BUILDERS[family](str(tmp_path_factory.mktemp(f"tiny-{family}")))
        return built[family]

    return get


@pytest.fixture(scope="module")
def qwen_dir(tiny_vlm_dir) -> str:
    return tiny_vlm_dir("qwen2_vl")


@pytest.fixture(scope="module")
def qwen(qwen_dir) -> TransformersBackend:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return make_backend("transformers", model=qwen_dir, device="cpu", max_pixels=56 * 56, batch_size=8)


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 60), (90, 90), (3, 700), (50, 50)]  # (h, w); one very thin image
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _direct_p_yes(backend: TransformersBackend, req: JudgeRequest) -> tuple[float, float]:
    """P(yes) and mass from one unbatched prefill forward pass, computed here without generate()."""
    text = backend.prompt_text(req)
    images = [prepare_image(im, backend.max_pixels) for im in req.images]
    enc = backend.processor(text=[text], images=[images], return_tensors="pt")
    with torch.inference_mode():
        logits = backend.model(**enc).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    yes, no = answer_token_ids(backend.tokenizer)
    ly, ln = torch.logsumexp(logp[yes], 0).item(), torch.logsumexp(logp[no], 0).item()
    return float(torch.sigmoid(torch.tensor(ly - ln))), float(np.exp(ly) + np.exp(ln))


MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_backend_batched_left_padded_matches_direct_logits(tiny_vlm_dir, qwen, family):
    """Every family: one left-padded batch gives each sample the P(yes) of its own unbatched prefill."""
    backend = qwen if family == "qwen2_vl" else make_backend(
        "transformers", model=tiny_vlm_dir(family), device="cpu", max_pixels=64 * 64, batch_size=8)
    _check_backend(backend)
    assert backend.describe()["model_class"] == MODEL_CLASSES[family]


@pytest.mark.parametrize("family, expected", [("qwen3_vl", "qwen"), ("internvl", "internvl"),
                                              ("idefics3", "idefics3"), ("llava_onevision", None)])
def test_pixel_budget_bounds_image_tokens(tiny_vlm_dir, family, expected):
    """``max_pixels`` reaches processors that enlarge or tile images themselves: fewer pixels, fewer tokens."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    lengths = []
    for budget in (32 * 32, 128 * 128):
        backend = make_backend("transformers", model=tiny_vlm_dir(family), device="cpu", max_pixels=budget)
        assert backend.describe()["pixel_budget"] == expected
        req = JudgeRequest(images=[image], user="Defect?")
        text = backend.prompt_text(req)
        lengths.append(backend.encode([text], [[prepare_image(image, budget)]])["input_ids"].shape[1])
    assert lengths[0] < lengths[1]


def _check_backend(qwen: TransformersBackend) -> None:
    ims = _images()
    reqs = [JudgeRequest(images=[im] * (1 + i % 2), system="You inspect parts.",
                         user="Is this part anomalous? " * (1 + i), max_new_tokens=6, meta={"i": i})
            for i, im in enumerate(ims)]
    batched = qwen.judge(reqs)
    longest = max(len(t) for t in qwen.tokenizer.batch_decode([[i] for i in range(len(qwen.tokenizer))]))
    assert [a.meta["i"] for a in batched] == [0, 1, 2, 3]
    for req, ans in zip(reqs, batched):
        assert ans.error is None
        single = qwen.judge([req])[0]
        p, mass = _direct_p_yes(qwen, req)
        assert ans.p_yes == pytest.approx(single.p_yes, abs=1e-4)
        assert ans.p_yes == pytest.approx(p, abs=1e-4)
        assert ans.answered_mass == pytest.approx(mass, rel=1e-3)
        assert 0.0 <= ans.p_yes <= 1.0 and 0.0 <= ans.answered_mass <= 1.0
        # only generated tokens are decoded: never the prompt, never more than the budget
        assert "inspect parts" not in ans.text and "anomalous?" not in ans.text
        assert len(ans.text) <= req.max_new_tokens * longest
    d = qwen.describe()
    assert d["backend"] == "transformers" and d["model"] == qwen.model_name and "revision" in d
    # yes/no spellings: every id decodes to yes/no after normalisation
    yes, no = answer_token_ids(qwen.tokenizer)
    assert {qwen.tokenizer.decode([i]).strip().lower() for i in yes} <= {"yes"} and len(yes) >= 2
    assert {qwen.tokenizer.decode([i]).strip().lower() for i in no} <= {"no"} and len(no) >= 2


def test_backend_per_request_errors(qwen):
    ok = JudgeRequest(images=[_images()[0]], user="Defect? Yes or No.", max_new_tokens=2)
    bad = JudgeRequest(images=[], user="no image", max_new_tokens=2)
    out = qwen.judge([bad, ok])
    assert out[0].error and "no image" in out[0].error
    assert out[1].error is None and out[1].p_yes is not None
    with pytest.raises(ValueError, match="unknown judge backend"):
        make_backend("nope")


def test_parser_on_hand_written_answers():
    a = parse_answer("Yes. Defect: scratch. Location: top left. Explanation: a thin line crosses the surface.")
    assert (a.answer, a.defect, a.location) == ("yes", "scratch", "top left")
    assert a.explanation == "a thin line crosses the surface"
    b = parse_answer("**No**\nDefect: none\nLocation: none\nExplanation: The part matches the reference.")
    assert (b.answer, b.defect, b.location, b.explanation) == ("no", "none", "none", "The part matches the reference")
    assert parse_answer("no").answer == "no" and parse_answer("no").defect is None
    g = parse_answer("ufa contam suspicious 4d")
    assert g.answer is None and g.location is None and g.explanation is None
    assert parse_answer("").answer is None
    assert normalize_location("Upper-left corner") == "top left"
    assert normalize_location("at the bottom of the image") == "bottom center"
    assert normalize_location("centre") == "center" and normalize_location("right side") == "middle right"
    assert normalize_location("somewhere") is None
    assert set(GRID) == {normalize_location(w) for w in GRID}


def test_regions_and_fusion_helpers():
    m = np.zeros((30, 30))
    m[5, 25], m[20, 4], m[6, 24] = 1.0, 0.8, 0.9  # the 0.9 sits in the first box: suppressed
    boxes = top_regions(m, 3)
    assert len(boxes) == 3 and boxes[0][4] == 1.0 and boxes[1][4] == 0.8
    x0, y0, x1, y1, _ = boxes[0]
    assert x0 <= 25 < x1 and y0 <= 5 < y1 and x1 - x0 == 10
    assert all(0 <= b[0] and b[2] <= 30 and 0 <= b[1] and b[3] <= 30 for b in boxes)
    e, v = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.9, 0.6])
    assert fuse_scores(e, v, "rank").tolist() == pytest.approx([0.15, 0.7, 0.75])  # per sample, not per view
    lg = fuse_scores(e, v, "logistic")
    assert lg[0] < lg[1] and np.all((lg > 0) & (lg < 1)) and lg[2] == pytest.approx(
        1 / (1 + np.exp(-0.5 * (np.log(9) + np.log(1.5)))))


def _scored_subset(ds, tmp_path):
    """Score the dataset with the 'padim' expert; add one sample whose image file is broken."""
    fav.score(ds, expert="padim", device="cpu", num_workers=0)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    ds.add_sample(fo.Sample(filepath=str(bad), tags=["broken"]))
    anomalous = ds.match(fo.ViewField("ground_truth.label") == "anomalous").limit(3)
    normal = ds.match_tags("train", bool=False).match(fo.ViewField("ground_truth.label") == "normal").limit(2)
    ids = anomalous.values("id") + normal.values("id") + ds.match_tags("broken").values("id")
    return ds.select(ids)


def test_judge_end_to_end_resume_and_delete(fitted, qwen, tmp_path):
    ds = fitted
    view = _scored_subset(ds, tmp_path)
    knowledge = {"default": "A round metal part; defects are scratches, holes and stains."}
    res = fav.judge(view, key="vlm", backend=qwen, expert="padim", reference="auto", knowledge=knowledge,
                    crops=3, batch_size=4, max_new_tokens=12, prefetch=1)
    f = JudgeFieldNames("vlm")
    assert res.num_samples == 6 and res.num_judged == 5 and res.num_errors == 1
    assert "vlm" in ds.list_runs()

    # a broken image: its error, no verdict; the rest goes on
    bad = ds.match_tags("broken").first()
    assert bad[f.error] and bad[f.label] is None
    normals = set(ds.match(fo.ViewField("padim.label") == "normal").values("id"))
    for s in view.match_tags("broken", bool=False):
        lab = s[f.label]
        assert isinstance(lab, fo.Classification) and lab.label in ("anomalous", "normal", "unparsed")
        assert 0.0 <= lab.p_anomalous <= 1.0 and 0.0 <= lab.answered_mass <= 1.0
        assert s[f.p_anomalous] == pytest.approx(lab.p_anomalous)
        assert isinstance(s[f.answer], str) and s[f.error] is None
        if lab.label == "unparsed":  # a random model's garbage: kept as raw text
            assert lab.confidence is None and s[f.answer] is not None
        assert s[f.defect] is None or isinstance(s[f.defect], fo.Classification)
        assert s[f.location] is None or s[f.location].label in (*GRID, "none")
        assert s[f.explanation] is None or isinstance(s[f.explanation], str)
        # reference: a sample the expert called normal, never the sample itself
        assert lab.reference_id in normals and lab.reference_id != s.id
        # crops: 3 boxes from the expert map; the first covers the map's maximum
        dets = s[f.regions].detections
        assert len(dets) == 3
        hm = read_heatmap(s["padim_map"].map_path)
        cy, cx = np.unravel_index(np.argmax(hm), hm.shape)
        x, y, w, h = dets[0].bounding_box
        assert x <= (cx + 0.5) / hm.shape[1] <= x + w and y <= (cy + 0.5) / hm.shape[0] <= y + h
        assert dets[0].confidence == pytest.approx(hm.max(), abs=1e-6)
        assert 0.0 <= s[f.fused] <= 1.0
    assert res.num_unparsed == view.count_values(f"{f.label}.label").get("unparsed", 0)
    # fused score: the rank average of the expert score and P(anomalous)
    judged = view.exists(f.fused)
    e, v, fused = judged.values(["padim_score", f.p_anomalous, f.fused])
    assert fused == pytest.approx(fuse_scores(np.array(e), np.array(v), "rank").tolist())

    cfg = ds.get_run_info("vlm").config
    assert cfg.expert == "padim" and cfg.prompt["crops"] == 3 and cfg.prompt["reference"] == "auto"
    assert cfg.prompt["knowledge_text"] == knowledge and cfg.backend["model"] == qwen.model_name
    assert not any("api" in k.lower() for k in cfg.backend)

    # resume: nothing judged twice (the broken sample is retried and fails again)
    again = fav.judge(view, key="vlm", backend=qwen, expert="padim", reference="auto", knowledge=knowledge,
                      batch_size=4, max_new_tokens=12)
    assert again.num_skipped == 5 and again.num_judged == 0 and again.num_errors == 1
    over = fav.judge(view, key="vlm", backend=qwen, expert="padim", crops=0, use_expert_verdict=False,
                     batch_size=4, max_new_tokens=4, overwrite=True)
    assert over.num_judged == 5 and over.num_skipped == 0
    assert ds.get_run_info("vlm").config.prompt["crops"] == 0
    assert all(r is None for r in view.match_tags("broken", bool=False).values(f.regions))
    # only flagged: the expert's anomalous samples
    flagged = fav.judge(view, key="vlm_flagged", backend=qwen, expert="padim", only_flagged=True, crops=1,
                        max_new_tokens=2)
    n_flagged = view.match(fo.ViewField("padim.label") == "anomalous").count()
    assert flagged.num_not_flagged == 6 - n_flagged and flagged.num_judged + flagged.num_errors == n_flagged
    with pytest.raises(ValueError, match="another kind"):
        fav.judge(view, key="padim_expert", backend=qwen)

    ds.delete_run("vlm")
    schema = ds.get_field_schema()
    assert not [name for name in f.all() if name in schema]
    assert "padim_score" in schema and "vlm_flagged" in schema


class _Watched(JudgeBackend):
    """The real tiny backend, noting when batch 2's preparation starts and which thread prepares."""

    name = "transformers"

    def __init__(self, inner: TransformersBackend, wait_s: float):
        self.inner, self.wait_s = inner, wait_s
        self.second_prepare = threading.Event()
        self.prepare_threads: list[str] = []
        self.overlapped: bool | None = None

    def describe(self):
        return self.inner.describe()

    def judge(self, requests):
        return self.inner.judge(requests)

    def prepare(self, requests):
        self.prepare_threads.append(threading.current_thread().name)
        if len(self.prepare_threads) == 2:
            self.second_prepare.set()
        return self.inner.prepare(requests)

    def judge_prepared(self, prepared):
        if self.overlapped is None:  # answering batch 1: does batch 2 get prepared meanwhile?
            self.overlapped = self.second_prepare.wait(self.wait_s)
        return self.inner.judge_prepared(prepared)


def test_judge_prepares_next_batch_while_generating(parts, qwen):
    """prefetch=1: batch n+1 is prepared in a worker thread during batch n's generate(), same answers as 0."""
    view = parts.match_tags("train", bool=False).limit(5)
    kwargs = dict(reference="train", batch_size=2, max_new_tokens=3)
    serial = _Watched(qwen, wait_s=1.0)
    fav.judge(view, key="serial", backend=serial, prefetch=0, **kwargs)
    assert serial.overlapped is False and set(serial.prepare_threads) == {threading.current_thread().name}
    piped = _Watched(qwen, wait_s=60.0)
    res = fav.judge(view, key="piped", backend=piped, prefetch=1, **kwargs)
    assert piped.overlapped is True and len(piped.prepare_threads) == 3
    assert all(name.startswith("fav-judge-prepare") for name in piped.prepare_threads)
    assert res.num_judged == 5 and res.num_errors == 0
    assert view.values("piped_p_anomalous") == pytest.approx(view.values("serial_p_anomalous"), abs=1e-5)
    assert view.values("piped_answer") == view.values("serial_answer")
    assert not [t for t in threading.enumerate() if t.name.startswith("fav-judge-prepare")]


def test_judge_cancelled_mid_run_stops_and_resumes(parts, qwen):
    """A progress callback that raises (a cancelled run) stops the run, its worker thread, and keeps the
    finished batches; the next call judges only the rest."""
    view = parts.match_tags("train", bool=False).limit(6)

    class Cancelled(Exception):
        pass

    def cancel_after_first_batch(pb):
        if pb.iteration >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        fav.judge(view, key="vlm", backend=qwen, batch_size=2, max_new_tokens=2, prefetch=2,
                  progress=cancel_after_first_batch)
    assert not [t for t in threading.enumerate() if t.name.startswith("fav-judge-prepare")]
    assert view.count("vlm") == 2
    rest = fav.judge(view, key="vlm", backend=qwen, batch_size=2, max_new_tokens=2)
    assert rest.num_skipped == 2 and rest.num_judged == 4 and view.count("vlm") == 6


def test_judge_operator_runs_local_model(parts, qwen_dir):
    ds = parts
    view = ds.limit(2)
    result = foo.execute_operator(
        f"{PLUGIN}/judge_anomalies",
        ctx=dict(view=view, params=dict(key="op_vlm", backend="transformers", model=qwen_dir, device="cpu",
                                        max_pixels=56 * 56, expert="(none)", reference="tag",
                                        reference_tag="train", batch_size=2, max_new_tokens=3)),
    )
    result.raise_exceptions()
    assert view.count("op_vlm") == 2 and view.count("op_vlm_answer") == 2
    cfg = ds.get_run_info("op_vlm").config
    assert cfg.expert is None and cfg.prompt["reference"] == "train" and cfg.fuse is None


def test_operator_builds_server_backend_without_storing_the_key(monkeypatch):
    from fiftyone_anomaly_vlm.operators.judge import backend_from_params

    monkeypatch.setenv("FAV_VLM_API_KEY", "sk-env-secret")
    backend = backend_from_params(dict(backend="openai", base_url="http://127.0.0.1:9/v1", server_model="m"),
                                  secrets={"FAV_VLM_API_KEY": "sk-from-secrets"})
    assert backend.name == "openai"
    text = repr(backend.describe())
    assert "sk-from-secrets" not in text and "sk-env-secret" not in text
