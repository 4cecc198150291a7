"""evaluate_judge (MMAD-style questions from a dataset's labels) and the MMAD benchmark script, with a tiny real
Qwen2-VL built locally, through the local backend and through a local OpenAI-compatible server.

The tiny model's weights are random, so its accuracies are noise; what is checked is the path: questions made
deterministically from the labels, letter probabilities equal to a direct forward pass, one stored answer per
(sample, question, variant), the report and the run (listed, shown in the runs view, deleted), the bad inputs
of the issue, and MMAD's file format and scoring rules.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from mmad_fixture import write_mmad_fixture
from openai_server import OpenAITestServer, build_tiny_qwen2vl
from test_panel_browser import browser  # noqa: F401 - the App test's fixture
from tiny_vlms import build_qwen2_vl

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.datasets import make_parts_dataset
from fiftyone_anomaly_vlm.judging.qa import (DEFECT_CLASSIFICATION, DISCRIMINATION, LOCALIZATION,
                                             OBJECT_CLASSIFICATION, Pools, SampleTruth, cells_of_boxes,
                                             cells_of_mask, make_questions, parse_choice)
from fiftyone_anomaly_vlm.models.judge import make_backend
from fiftyone_anomaly_vlm.models.judge.base import JudgeRequest, option_letter, option_probs_from_logprobs
from fiftyone_anomaly_vlm.models.judge.hf_inputs import option_token_ids
from fiftyone_anomaly_vlm.runs import JUDGE_EVAL_METHOD, runs_of

VARIANTS = {"plain": {}, "ref": {"reference": "good"}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl")))


@pytest.fixture(scope="module")
def backend(tiny_dir):
    return make_backend("transformers", model=tiny_dir, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def labelled():
    """6 parts: 2 normal, 4 anomalous (scratch, pit, stain, scratch) with masks; product 'a'/'b', two defect
    types each."""
    ds = make_parts_dataset(f"fav-qa-labelled-{uuid.uuid4().hex[:6]}", num_normal=2, num_anomalous=4, size=48, seed=5)
    defects = ds.values("defect_type")
    assert sorted(d for d in defects if d) == ["pit", "scratch", "scratch", "stain"]
    seen: dict = {}
    product = []
    for d in defects:  # normals a, b; scratch a then b; pit a; stain b
        n = seen[d] = seen.get(d, -1) + 1
        product.append({"pit": "a", "stain": "b"}.get(d, "ab"[n % 2]))
    ds.set_values("product", product)
    yield ds
    ds.delete()


def _pools() -> Pools:
    return Pools(defects={"screw": ["pit", "scratch"], "nut": ["dent"]}, classes=["nut", "screw"])


def test_questions_follow_the_labels_and_are_seeded():
    cells = cells_of_mask(np.pad(np.ones((4, 4), bool), ((0, 8), (8, 0))))  # top right block
    info = SampleTruth("s1", True, "scratch", "screw", cells)
    qs, skipped = make_questions(info, _pools(), seed=0)
    assert [q.subtask for q in qs] == [DISCRIMINATION, DEFECT_CLASSIFICATION, LOCALIZATION, OBJECT_CLASSIFICATION]
    assert skipped == []
    for q in qs:
        assert len(set(q.options)) == len(q.options) and q.prompt().endswith("given choices directly.")
    assert qs[0].options[qs[0].answer] == "Yes"
    assert qs[1].options[qs[1].answer] == "scratch" and set(qs[1].options) == {"scratch", "pit"}
    assert qs[2].options[qs[2].answer] == "top right" and len(qs[2].options) == 4
    assert qs[3].options[qs[3].answer] == "screw"
    assert make_questions(info, _pools(), seed=0)[0] == qs  # deterministic
    other = [make_questions(SampleTruth("s1", True, "scratch", "screw", cells), _pools(), seed=s)[0][2].options
             for s in range(1, 6)]
    assert any(o != qs[2].options for o in other)  # the seed changes the draws
    # a class with one defect type: no classification question; no mask: no localization
    qs2, skipped2 = make_questions(SampleTruth("s2", True, "dent", "nut", None), _pools())
    assert [q.subtask for q in qs2] == [DISCRIMINATION, OBJECT_CLASSIFICATION]
    assert any("one defect type in class 'nut'" in s for s in skipped2)
    assert any("without a mask" in s for s in skipped2)
    # a normal sample: discrimination (+ object) only
    assert [q.subtask for q in make_questions(SampleTruth("s3", False, None, "nut"), _pools())[0]] == [
        DISCRIMINATION, OBJECT_CLASSIFICATION]
    assert make_questions(SampleTruth("s4", None), _pools()) == ([], ["no ground truth"])
    boxes = cells_of_boxes([[0.0, 0.7, 0.3, 0.3]])
    assert int(np.argmax(boxes)) == 6 and cells_of_boxes([]) is None
    assert parse_choice("Answer: B.", "AB") == "B" and parse_choice("a cat", "AB") is None
    assert parse_choice("C", "AB") is None


def test_option_letters_odd_tokens_and_direct_forward(backend):
    assert [option_letter(t) for t in ("A", " A", "ĠB", "▁C", "(D", "E)", "a", "AB", "Answer", " ")] == [
        "A", "A", "B", "C", "D", "E", None, None, None, None]
    probs, mass = option_probs_from_logprobs([(" A", -1.0), ("A", -2.0), ("B", -1.5), ("Yes", -0.1)], "ABC")
    assert probs["C"] == 0 and probs["A"] > probs["B"] and np.isclose(sum(probs.values()), 1.0)
    assert np.isclose(mass, np.exp(-1) + np.exp(-2) + np.exp(-1.5))
    assert option_probs_from_logprobs([("Yes", -0.1)], "AB") == (None, 0.0)

    # a tokenizer with merged letter tokens (" A", "A.", "(B") and a two-letter one ("AB", never a letter)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backend.model_name)
    tok.add_tokens([" A", "A.", "(B", "AB"])
    ids = option_token_ids(tok, "AB")
    names = {k: sorted(tok.decode([i]) for i in v) for k, v in ids.items()}
    assert {" A", "A.", "A"} <= set(names["A"]) and "AB" not in names["A"] + names["B"]
    assert {"(B", "B"} <= set(names["B"])
    # a tokenizer where no token spells a letter alone: every letter encodes to the same unknown token -> none
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"<unk>": 0, "xA": 1, "xB": 2}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    odd = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>")
    assert option_token_ids(odd, "AB") == {"A": [], "B": []}

    # the backend's letter probabilities are a direct forward pass's, over every token spelling each letter
    rng = np.random.default_rng(0)
    from PIL import Image

    req = JudgeRequest(images=[Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))],
                       user="Question: which?\nA. x\nB. y\nC. z", system="You inspect parts.", max_new_tokens=1,
                       options=("A", "B", "C"))
    ans = backend.judge([req])[0]
    inputs = backend.processor(text=[backend.prompt_text(req)], images=req.images, return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(**inputs).logits[0, -1].double(), dim=-1)
    letter_ids = option_token_ids(backend.tokenizer, "ABC")
    lse = torch.stack([torch.logsumexp(logp[letter_ids[k]], 0) for k in "ABC"])
    direct = torch.softmax(lse, 0).tolist()
    assert np.allclose([ans.option_probs[k] for k in "ABC"], direct, atol=1e-4)
    assert np.isclose(ans.option_mass, float(lse.exp().sum()), rtol=1e-3)


def _stored(ds, key):
    return [(sid, lab) for sid, labs in zip(*ds.values(["id", f"{key}.classifications"])) for lab in labs or []]


def test_evaluate_judge_end_to_end(labelled, backend):
    ds = labelled
    report = fav.evaluate_judge(ds, backend=backend, key="qa", gt_field="ground_truth", defect_field="defect_type",
                                mask_field="ground_truth_mask", class_field="product", variants=VARIANTS,
                                max_new_tokens=1)
    stored = _stored(ds, "qa")
    # one answer per (sample, question, variant): every question asked under both variants
    per_variant = {v: sorted((sid, lab.subtask, tuple(lab.options)) for sid, lab in stored if lab.variant == v)
                   for v in VARIANTS}
    assert per_variant["plain"] == per_variant["ref"] and per_variant["plain"]
    # the variants really differ (the reference image changes what the model sees, so its probabilities)
    probs = {(sid, lab.subtask, lab.variant): lab.probs for sid, lab in stored}
    assert any(not np.allclose(p, probs[(sid, sub, "ref")]) for (sid, sub, v), p in probs.items() if v == "plain")
    subtasks = {lab.subtask for _, lab in stored}
    assert subtasks == {DISCRIMINATION, DEFECT_CLASSIFICATION, LOCALIZATION, OBJECT_CLASSIFICATION}
    n_anom = ds.match(fo.ViewField("ground_truth.label") == "anomalous").count()
    assert sum(lab.subtask == DISCRIMINATION for _, lab in stored) == 2 * len(ds)
    assert sum(lab.subtask == LOCALIZATION for _, lab in stored) == 2 * n_anom
    for _, lab in stored:
        assert lab.correct == (lab.choice == lab.truth) and not lab.from_text and lab.error is None
        assert np.isclose(sum(lab.probs), 1.0) and lab.choice == "ABCD"[int(np.argmax(lab.probs))]
        assert lab.label == lab.options["ABCD".index(lab.choice)].split(". ", 1)[1]
    # the report counts exactly the stored answers
    assert sum(r["n"] for r in report.rows) == len(stored)
    for r in report.rows:
        mine = [lab for _, lab in stored if lab.subtask == r["subtask"] and lab.variant == r["variant"]]
        assert r["n"] == len(mine) and r["correct"] == sum(lab.correct for lab in mine)
        assert r["wilson"][0] <= r["accuracy"] <= r["wilson"][1]
    assert {r["cls"] for r in report.per_class} == {"a", "b"}
    table = report.table()
    assert "| subtask | plain | ref |" in table and "defect localization" in table
    best = report.best_variant(DISCRIMINATION)
    assert best in [{"crops": 0, "reference": None, "knowledge": None, "use_expert_verdict": False},
                    {"crops": 0, "reference": "good", "knowledge": None, "use_expert_verdict": False}]
    assert report.winner(DISCRIMINATION)["variant"] in VARIANTS
    # a recorded run: listed, loaded back, shown in the runs view
    assert runs_of(ds, JUDGE_EVAL_METHOD) == ["qa"]
    loaded = ds.load_run_results("qa", cache=False)
    assert loaded.rows == report.rows and loaded.table() == table
    from fiftyone_anomaly_vlm.panels.runs_view import runs_state

    md = runs_state(ds)["runs_md"]
    assert "| qa | judge evaluation |" in md and "Judge evaluation `qa`" in md and "| subtask | plain | ref |" in md
    # a second call resumes: nothing asked again, the same report
    again = fav.evaluate_judge(ds, backend=backend, key="qa", gt_field="ground_truth", defect_field="defect_type",
                               mask_field="ground_truth_mask", class_field="product", variants=VARIANTS,
                               max_new_tokens=1)
    assert again.rows == report.rows and again.counts.get("questions", 0) == 0
    # asked again with overwrite: the same questions (seeded by sample id), new answers replace the old
    two = ds.limit(2)
    fav.evaluate_judge(two, backend=backend, key="qa", gt_field="ground_truth", defect_field="defect_type",
                       mask_field="ground_truth_mask", class_field="product", variants=VARIANTS, max_new_tokens=1,
                       overwrite=True)
    redo = {(sid, lab.subtask, lab.variant): lab.options for sid, lab in _stored(two, "qa")}
    before = {(sid, lab.subtask, lab.variant): lab.options for sid, lab in stored if sid in set(two.values("id"))}
    assert redo == before
    # the same key with other variants is refused, before any write
    with pytest.raises(ValueError, match="holds results of"):
        fav.evaluate_judge(ds, backend=backend, key="qa", gt_field="ground_truth", variants={"x": {"crops": 0}})
    ds.delete_run("qa")
    assert "qa" not in ds.list_runs() and "qa" not in ds.get_field_schema() and "qa_error" not in ds.get_field_schema()


def test_bad_inputs(labelled, backend, caplog):
    ds = labelled.clone(f"fav-qa-bad-{uuid.uuid4().hex[:6]}")
    try:
        ds.set_field("defect_type", None).save()
        ds.set_values("product", ["only"] * len(ds))
        for kwargs, match in [
            ({"variants": {"x": {"crop": 3}}}, "may set"),
            ({"variants": {"x": {"crops": 3}}}, "pass expert"),
            ({"variants": {}}, "non-empty"),
            ({"subtasks": ["defect analysis"]}, "unknown subtasks"),
            ({"max_options": 1}, "max_options"),
            ({"defect_field": "nope"}, "not a field"),
            ({"mask_field": "product"}, "must hold"),
            ({"gt_field": "nope"}, "unknown ground-truth field"),
            ({"expert": "padim"}, "not a scoring run"),
        ]:
            with pytest.raises(ValueError, match=match):
                fav.evaluate_judge(ds, backend=backend, key="bad", **kwargs)
            assert "bad" not in ds.list_runs() and "bad" not in ds.get_field_schema()
        caplog.set_level(logging.WARNING, logger="fiftyone_anomaly_vlm.judging.qa_run")
        report = fav.evaluate_judge(ds, backend=backend, key="bad", gt_field="ground_truth",
                                    defect_field="defect_type", class_field="product", max_new_tokens=1)
        # no defect types, no masks, one class: only discrimination questions, each reason said once
        assert [r["subtask"] for r in report.rows] == [DISCRIMINATION]
        assert report.rows[0]["n"] == len(ds)
        warned = [r.getMessage() for r in caplog.records if "evaluate_judge" in r.getMessage()]
        for note in ("no defect types in 'defect_type'", "no mask_field", "one product class"):
            assert sum(note in w for w in warned) == 1, (note, warned)
            assert any(note in n for n in report.notes)
        with pytest.raises(ValueError, match="no 'defect classification' questions"):
            report.best_variant(DEFECT_CLASSIFICATION)
        # boxes instead of masks: localization from fo.Detections (all in the top right cell here)
        anomalous = [g == "anomalous" for g in ds.values("ground_truth.label")]
        box = [0.7, 0.05, 0.2, 0.2]
        ds.set_values("boxes", [fo.Detections(detections=[fo.Detection(label="defect", bounding_box=box)])
                                if a else None for a in anomalous])
        fav.evaluate_judge(ds, backend=backend, key="boxes_qa", gt_field="ground_truth", mask_field="boxes",
                           subtasks=[LOCALIZATION], max_new_tokens=1)
        located = [lab for _, lab in _stored(ds, "boxes_qa")]
        assert len(located) == sum(anomalous) and {lab.truth_label for lab in located} == {"top right"}
    finally:
        ds.delete()


def _with_letters_on_top(model_dir) -> None:
    """Shape the server's tiny Qwen2-VL as its builder shapes yes/no: the LM-head rows of "A".."D" along the
    (nearly fixed) last hidden state, so the letters are among the 20 most likely first tokens the server
    returns, with a random part so their probabilities still depend on the input."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                        add_generation_prompt=True, tokenize=False)
        hidden = model(**proc(text=[text], return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0, -1]
        head = model.get_output_embeddings().weight
        for letter, logit in zip("ABCD", (3.2, 3.0, 2.8, 2.6)):
            (i,) = proc.tokenizer.encode(letter, add_special_tokens=False)
            head[i] = hidden * (logit / hidden.dot(hidden)) + torch.randn_like(hidden) * (2.0 / hidden.norm())
    model.save_pretrained(model_dir)


def test_server_backend_with_and_without_logprobs(labelled, tmp_path):
    model_dir = build_tiny_qwen2vl(tmp_path / "srv")
    _with_letters_on_top(model_dir)
    view = labelled.limit(3)
    with OpenAITestServer(model_dir) as server:
        be = make_backend("openai", base_url=server.base_url, model="tiny", max_concurrency=4, timeout=60.0)
        rep = fav.evaluate_judge(view, backend=be, key="srv", gt_field="ground_truth", defect_field="defect_type",
                                 mask_field="ground_truth_mask", max_new_tokens=2)
        stored = _stored(view, "srv")
        assert stored and all(lab.from_text == (lab.probs is None) for _, lab in stored)
        with_probs = [lab for _, lab in stored if lab.probs is not None]
        for lab in with_probs:  # read from the server's top_logprobs: the argmax letter is the choice
            assert lab.choice == "ABCD"[int(np.argmax(lab.probs))]
        assert all(body["logprobs"] and body["top_logprobs"] == 20 for body in server.bodies)
        # through the wire, the letter probabilities are the model's own over its 20 most likely first tokens
        from PIL import Image

        req = JudgeRequest(images=[Image.new("RGB", (40, 40), (90, 120, 30))], system="You inspect parts.",
                           user="Question: which?\nA. x\nB. y\nC. z", max_new_tokens=1, options=("A", "B", "C"))
        got = be.judge([req])[0]
        messages = [{"role": "system", "content": [{"type": "text", "text": req.system}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": req.user}]}]
        text = server.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = server.processor(text=[text], images=req.images, return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(server.model(**inputs).logits[0, -1].float(), dim=-1)
        vals, idx = logp.topk(20)
        top = [(server.processor.tokenizer.decode([i]), float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
        direct, _ = option_probs_from_logprobs(top, "ABC")
        assert direct is not None and got.option_probs is not None
        assert np.allclose([got.option_probs[k] for k in "ABC"], [direct[k] for k in "ABC"], atol=1e-4)
        assert with_probs, "the shaped model's letters are in the server's top 20"
        server.reset()
        server.logprobs_enabled = False  # a server that ignores logprobs: parsed from the text, marked so
        rep2 = fav.evaluate_judge(view, backend=be, key="srv2", gt_field="ground_truth", max_new_tokens=4,
                                  subtasks=[DISCRIMINATION])
        stored2 = _stored(view, "srv2")
        assert len(stored2) == 3 and all(lab.from_text and lab.probs is None for _, lab in stored2)
        for _, lab in stored2:
            assert lab.choice == parse_choice(lab.answer_text, "AB")
            assert lab.correct == (lab.choice == lab.truth)
        assert rep2.rows[0]["from_text"] == 3 and any("parsed from the text" in n for n in rep2.notes)
        assert rep.rows
    labelled.delete_run("srv")
    labelled.delete_run("srv2")


def _mmad_module():
    spec = importlib.util.spec_from_file_location("mmad_bench", ROOT / "benchmarks" / "mmad.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mmad_scoring_rules():
    mmad = _mmad_module()
    q = lambda ds, t, normal, ans: {"dataset": ds, "type": t, "normal": normal, "answer": ans}  # noqa: E731
    questions = [q("X", "Anomaly Detection", True, "B"), q("X", "Anomaly Detection", True, "B"),
                 q("X", "Anomaly Detection", False, "A"), q("X", "Object Analysis", False, "C"),
                 q("X", "Defect Classification", False, "D"), q("Y", "Object Analysis", True, "A")]
    table, dropped = mmad.score(questions, ["B", "A", "A", "C", "", "B"])
    # discrimination balanced: normal 1/2, anomalous 1/1 -> 75; the unanswered one is dropped (MMAD's rule)
    assert table["X"] == {"Anomaly Discrimination": 75.0, "Object Analysis": 100.0, "Average": 87.5}
    assert table["Y"] == {"Object Analysis": 0.0, "Average": 0.0} and dropped == 1
    assert mmad.mmad_text_answer("1. Answer: B.", {"A": "Yes.", "B": "No."}) == "B"
    assert mmad.mmad_text_answer("no defect", {"A": "Yes.", "B": "No."}) == "B"


def test_mmad_script_end_to_end(tiny_dir, tmp_path, capsys):
    """The script's main() as the command line runs it (in this process: no second interpreter to start)."""
    mmad = _mmad_module()
    root = tmp_path / "MMAD"
    json_path = write_mmad_fixture(str(root))
    entries = json.loads(Path(json_path).read_text())
    assert all({"conversation", "similar_templates", "random_templates"} <= set(e) for e in entries.values())
    out = tmp_path / "answers.json"
    rc = mmad.main(["--mmad-json", json_path, "--images", str(root), "--model", tiny_dir, "--device", "cpu",
                    "--limit", "2", "--batch-size", "4", "--answers-out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    first_two = list(entries)[:2]
    n_questions = sum(len(entries[k]["conversation"]) for k in first_two)
    assert f"{n_questions} questions over 2 images" in stdout
    assert "MMAD layout (1-shot" in stdout and "(this run)" in stdout
    assert "| Human expert (published) |  86.7 |" in stdout
    answers = json.loads(out.read_text())
    assert [a["image"] for a in answers] == [k for k in first_two for _ in entries[k]["conversation"]]
    assert all(a["gpt_answer"] in "ABCD" and a["gpt_answer"] and not a["from_text"] for a in answers)
    assert {a["question_type"] for a in answers} >= {"Anomaly Detection", "Object Analysis"}
    # the 1-shot reference is the entry's first random template, shown before the query image
    questions = mmad.load_questions(json_path, str(root), 1, similar=False)
    assert questions[0]["template"] == str(root / entries[first_two[0]]["random_templates"][0])
    assert mmad.request_for(questions[0], 1).user.startswith(mmad.INSTRUCTION)
    # MMAD's own text reading: the letter parsed from the generated text, marked so
    assert mmad.main(["--mmad-json", json_path, "--images", str(root), "--model", tiny_dir, "--device", "cpu",
                      "--limit", "1", "--answer-from", "text", "--max-new-tokens", "4", "--answers-out", str(out)]) == 0
    assert all(a["from_text"] for a in json.loads(out.read_text()))
    assert mmad.main(["--mmad-json", str(tmp_path / "none.json"), "--model", tiny_dir]) == 2
    assert "is not there: nothing run" in capsys.readouterr().out


def test_evaluate_judge_operator_in_the_app(labelled, tiny_dir, browser):
    """The operator's form in the served App: the tiny model's folder typed in, Execute, the run and its answers in
    the database (the form's defaults: ground_truth, defect_type, ground_truth_mask, variant 'plain')."""
    from test_panel_browser import _notification, run_operator, served_app

    ds = labelled
    with served_app(browser, ds):
        run_operator(browser, "evaluate the VLM", "Anomaly: evaluate the VLM judge (MMAD-style)",
                     texts={"Model": tiny_dir})
        _notification(browser, "Judge evaluation 'judge_eval'")
    ds.reload()
    assert runs_of(ds, JUDGE_EVAL_METHOD) == ["judge_eval"]
    config = ds.get_run_info("judge_eval").config
    assert (config.gt_field, config.defect_field, config.mask_field) == ("ground_truth", "defect_type",
                                                                         "ground_truth_mask")
    assert list(config.variants) == ["plain"]
    report = ds.load_run_results("judge_eval", cache=False)
    assert sum(r["n"] for r in report.rows) == len(_stored(ds, "judge_eval")) > 0
    ds.delete_run("judge_eval")
