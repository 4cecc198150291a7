"""MMAD (ICLR'25) with the plugin's judge backends: read MMAD's own question file and images, ask in its 1-shot
protocol, score with its rules, print the per-subtask table in the published layout next to reference rows.

MMAD's files are never downloaded here: point ``--mmad-json`` at its ``mmad.json`` and ``--images`` at the
folder its image paths are relative to (``git clone https://huggingface.co/datasets/jiang-cc/MMAD`` on a
connected machine). Protocol (MMAD's ``evaluation/examples``): every question is asked on its own, with
the entry's first ``random_templates`` image (``--similar-template``: ``similar_templates``) as the normal
reference shown first, then the query image, then MMAD's instruction, "The first 1 image is the normal
sample...", "The last image is the query image" and the question with its lettered options. Deviation,
said here: MMAD's instruction also asks for a numbered answer list (it sends several questions at once);
one question per request needs only "Answer with the option's letter from the given choices directly.", so
that line replaces the list format.

Answer: ``--answer-from probs`` (default) takes the option letter with the highest first-token probability
(the plugin's reading, as for P(yes)); a server without logprobs falls back to the text. ``--answer-from
text`` parses the generated text exactly as MMAD does (the last standalone A-E letter, else the closest
option text by ``difflib``). Scoring is MMAD's ``caculate_accuracy_mmad``: answers outside A-E are dropped
(counted here), accuracy per dataset and question type ("Object Structure"/"Object Details" are "Object
Analysis"), anomaly discrimination as the mean of the normal and anomalous accuracies ("good" in the path =
normal), the average over types per dataset, then the mean over datasets.

``--compare-batching`` times the same questions one request at a time and batched (questions/s).
``--demo DIR`` writes a tiny MMAD-format fixture (``tests/mmad_fixture.py``) and a tiny random Qwen2-VL
(``tests/tiny_vlms.py``) in DIR and runs on them: its accuracies are noise; it shows the path and the speed.

Usage:
    .venv/bin/python benchmarks/mmad.py --mmad-json /data/MMAD/mmad.json --images /data/MMAD \\
        --backend transformers --model /models/Qwen2.5-VL-7B-Instruct --max-pixels 401408 --limit 200
    .venv/bin/python benchmarks/mmad.py --mmad-json /data/MMAD/mmad.json --images /data/MMAD \\
        --backend openai --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct
    .venv/bin/python benchmarks/mmad.py --demo /tmp/mmad-demo --compare-batching
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from difflib import get_close_matches

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

#: MMAD's instruction (evaluation/examples/GPT4), without the numbered-list format (see the module docstring)
INSTRUCTION = ("You are an industrial inspector who checks products by images. You should judge whether there is "
               "a defect in the query image and answer the questions about it.\n"
               "Answer with the option's letter from the given choices directly.\n")
#: MMAD's question types -> the published table's columns, in its order
COLUMNS = {"Anomaly Detection": "Anomaly Discrimination", "Defect Classification": "Defect Classification",
           "Defect Localization": "Defect Localization", "Defect Description": "Defect Description",
           "Defect Analysis": "Defect Analysis", "Object Classification": "Object Classification",
           "Object Analysis": "Object Analysis"}
#: averages from the issue (MMAD paper and AD-Copilot, 1-shot); per-subtask numbers are in those papers
REFERENCE = [("Human expert", 86.7), ("AD-Copilot-Thinking (7B)", 82.3), ("Qwen2-VL-72B", 78.6),
             ("GPT-4o", 74.3), ("Qwen2.5-VL-7B", 72.2)]
LETTERS = ("A", "B", "C", "D", "E")


def load_questions(json_path: str, images: str, limit: int | None, similar: bool) -> list[dict]:
    """MMAD's questions as dicts ``image, dataset, normal, type, question, options, answer, template, query``.

    ``limit``: the first ``limit`` images of the json (all their questions)."""
    with open(json_path) as f:
        data = json.load(f)
    out = []
    for n, (rel, entry) in enumerate(data.items()):
        if limit is not None and n >= limit:
            break
        templates = entry.get("similar_templates" if similar else "random_templates") or []
        if not templates:
            raise ValueError(f"{rel}: no {'similar' if similar else 'random'}_templates for the 1-shot reference")
        for qa in entry.get("conversation") or []:
            qtype = qa["type"]
            qtype = "Object Analysis" if qtype in ("Object Structure", "Object Details") else qtype
            out.append({"image": rel, "dataset": rel.split("/")[0], "normal": "good" in rel, "type": qtype,
                        "question": qa["Question"], "options": dict(qa["Options"]), "answer": qa["Answer"],
                        "template": os.path.join(images, templates[0]), "query": os.path.join(images, rel)})
    return out


def request_for(q: dict, max_new_tokens: int):
    """One MMAD question as a judge request: template image, query image, MMAD's 1-shot text."""
    from PIL import Image

    from fiftyone_anomaly_vlm.models.judge.base import JudgeRequest

    images = []
    for path in (q["template"], q["query"]):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    options = "".join(f"{k}. {v}\n" for k, v in q["options"].items())
    text = (INSTRUCTION + "The first 1 image is the normal sample, which can be used as a template to compare. "
            "The last image is the query image. Following is the question list: \n"
            f"Question: {q['question']} \n{options}")
    return JudgeRequest(images=images, user=text, system="", max_new_tokens=max_new_tokens,
                        options=tuple(q["options"]))


def mmad_text_answer(text: str, options: dict) -> str:
    """MMAD's ``parse_answer``: the last standalone A-E letter; else the option closest to the text."""
    found = re.findall(r"\b([A-E])\b", text or "")
    if found:
        return found[-1]
    close = get_close_matches(text or "", list(options.values()), n=1, cutoff=0.0)
    return next((k for k, v in options.items() if close and v == close[0]), "")


def answer_of(ans, q: dict, answer_from: str) -> tuple[str, bool]:
    """``(letter, from_text)`` for one backend answer."""
    if ans.error is not None:
        return "", False
    if answer_from == "probs" and ans.option_probs:
        return max(ans.option_probs, key=ans.option_probs.get), False
    return mmad_text_answer(ans.text, q["options"]), True


def score(questions: list[dict], letters: list[str]) -> tuple[dict, int]:
    """MMAD's ``caculate_accuracy_mmad``: ``({dataset: {column: accuracy %}}, dropped)``."""
    stats: dict[str, dict[str, list[int]]] = {}
    det: dict[str, dict[bool, list[int]]] = {}
    dropped = 0
    for q, got in zip(questions, letters):
        if q["answer"] not in LETTERS or got not in LETTERS:
            dropped += 1
            continue
        ok = int(got == q["answer"])
        s = stats.setdefault(q["dataset"], {}).setdefault(q["type"], [0, 0])
        s[0] += 1
        s[1] += ok
        if q["type"] == "Anomaly Detection":
            d = det.setdefault(q["dataset"], {True: [0, 0], False: [0, 0]})[q["normal"]]
            d[0] += 1
            d[1] += ok
    table = {}
    for ds, types in stats.items():
        row = {}
        for qtype, (n, k) in types.items():
            if qtype == "Anomaly Detection":
                (nn, kn), (na, ka) = det[ds][True], det[ds][False]
                row[COLUMNS[qtype]] = ((kn / nn if nn else 0.0) + (ka / na if na else 0.0)) / 2 * 100
            else:
                row[COLUMNS.get(qtype, qtype)] = k / n * 100 if n else 0.0
        row["Average"] = sum(row.values()) / len(row)
        table[ds] = row
    return table, dropped


def _fmt(v) -> str:
    return f"{v:5.1f}" if isinstance(v, (int, float)) else f"{'—':>5}"


def print_tables(table: dict, model: str, shot_note: str) -> None:
    """Per dataset (MMAD's helper layout), then the published layout: one row per model, average first."""
    cols = [c for c in COLUMNS.values() if any(c in r for r in table.values())]
    print("\nPer dataset (accuracy %):\n")
    print("| dataset | " + " | ".join(cols) + " | Average |")
    print("|---|" + "---|" * (len(cols) + 1))
    for ds, row in table.items():
        print(f"| {ds} | " + " | ".join(_fmt(row.get(c)) for c in cols) + f" | {_fmt(row['Average'])} |")
    mean = {c: sum(r[c] for r in table.values() if c in r) / sum(1 for r in table.values() if c in r) for c in cols}
    average = sum(r["Average"] for r in table.values()) / len(table)
    all_cols = list(COLUMNS.values())
    print(f"\nMMAD layout ({shot_note}; accuracy %):\n")
    print("| Model | Average | " + " | ".join(all_cols) + " |")
    print("|---|---|" + "---|" * len(all_cols))
    print(f"| {model} (this run) | {_fmt(average)} | " + " | ".join(_fmt(mean.get(c)) for c in all_cols) + " |")
    for name, avg in REFERENCE:
        print(f"| {name} (published) | {_fmt(avg)} | " + " | ".join(_fmt(None) for _ in all_cols) + " |")
    print("\nPublished rows: averages only (from the MMAD paper / AD-Copilot, 1-shot); their per-subtask numbers are "
          "in those papers, not copied here. A run on a slice (--limit) or without every subtask is not comparable "
          "to the full benchmark.")


def make_backend_from(args):
    """The judge backend the arguments name."""
    from fiftyone_anomaly_vlm.models.judge import make_backend

    if args.backend == "openai":
        if not args.base_url:
            raise SystemExit("--backend openai needs --base-url (e.g. http://localhost:8000/v1)")
        return make_backend("openai", base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                            max_concurrency=args.batch_size)
    return make_backend("transformers", model=args.model, device=args.device, dtype=args.dtype,
                        max_pixels=args.max_pixels, batch_size=args.batch_size)


def ask(backend, questions: list[dict], max_new_tokens: int, chunk: int) -> tuple[list, float]:
    """Every question answered, ``chunk`` requests per backend call; ``(answers, seconds)``."""
    answers, t0 = [], time.perf_counter()
    for start in range(0, len(questions), chunk):
        part = questions[start:start + chunk]
        answers.extend(backend.judge([request_for(q, max_new_tokens) for q in part]))
    return answers, time.perf_counter() - t0


def set_parallel(backend, n: int) -> None:
    """One request at a time (1) or ``n`` per generate() call / in flight."""
    if hasattr(backend, "batch_size"):
        backend.batch_size = n
    if hasattr(backend, "max_concurrency"):
        backend.max_concurrency = n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmad-json", help="MMAD's mmad.json")
    p.add_argument("--images", help="the folder MMAD's image paths are relative to (default: the json's folder)")
    p.add_argument("--backend", choices=("transformers", "openai"), default="transformers")
    p.add_argument("--model", help="local model folder / hub id, or the served model name")
    p.add_argument("--base-url", help="OpenAI-compatible server root (--backend openai)")
    p.add_argument("--api-key-env", default="FAV_VLM_API_KEY")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="requests per generate() call / in flight")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the json")
    p.add_argument("--similar-template", action="store_true", help="use similar_templates (MMAD's option)")
    p.add_argument("--answer-from", choices=("probs", "text"), default="probs")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 1 with --answer-from probs, 32 with text")
    p.add_argument("--answers-out", help="write every question's answer here (JSON, MMAD's answer-file fields)")
    p.add_argument("--compare-batching", action="store_true", help="also time one request at a time")
    p.add_argument("--demo", metavar="DIR", help="write a tiny MMAD-format fixture and a tiny Qwen2-VL in DIR, run "
                                                 "on them (noise accuracies; shows the path and the speed)")
    args = p.parse_args(argv)
    if args.demo:
        from mmad_fixture import write_mmad_fixture
        from tiny_vlms import build_qwen2_vl

        args.mmad_json = write_mmad_fixture(os.path.join(args.demo, "MMAD"), copies=2)
        args.images = os.path.dirname(args.mmad_json)
        args.model = args.model or build_qwen2_vl(os.path.join(args.demo, "tiny-qwen2-vl"))
        args.device = "cpu" if args.device == "auto" else args.device
    if not args.mmad_json or not args.model:
        p.error("give --mmad-json and --model (or --demo DIR)")
    if not os.path.isfile(args.mmad_json):
        print(f"MMAD's question file {args.mmad_json} is not there: nothing run. Get MMAD on a connected machine "
              "(git clone https://huggingface.co/datasets/jiang-cc/MMAD) and pass its mmad.json and folder.")
        return 2
    images = args.images or os.path.dirname(os.path.abspath(args.mmad_json))
    max_new = args.max_new_tokens or (1 if args.answer_from == "probs" else 32)
    questions = load_questions(args.mmad_json, images, args.limit, args.similar_template)
    print(f"{len(questions)} questions over {len({q['image'] for q in questions})} images from {args.mmad_json}")
    backend = make_backend_from(args)
    backend.check()
    answers, secs = ask(backend, questions, max_new, max(1, args.batch_size) * 4)
    picked = [answer_of(a, q, args.answer_from) for a, q in zip(answers, questions)]
    letters = [x for x, _ in picked]
    table, dropped = score(questions, letters)
    errors = sum(a.error is not None for a in answers)
    from_text = sum(t for _, t in picked)
    print(f"answered in {secs:.1f} s ({len(questions) / secs:.2f} questions/s, batch {args.batch_size}); "
          f"{from_text} read from text, {errors} errors, {dropped} dropped by MMAD's rule (answer not A-E)")
    model_name = os.path.basename(str(args.model).rstrip("/")) or str(args.model)
    print_tables(table, model_name, "1-shot" + (", similar template" if args.similar_template else ""))
    if args.answers_out:
        with open(args.answers_out, "w") as f:
            json.dump([{"image": q["image"], "question": q["question"], "question_type": q["type"],
                        "correct_answer": q["answer"], "gpt_answer": got, "from_text": ft,
                        "option_probs": a.option_probs, "text": a.text, "error": a.error}
                       for q, (got, ft), a in zip(questions, picked, answers)], f, indent=1)
    if args.compare_batching:
        import torch

        print(f"\nThroughput ({args.backend}, {getattr(backend, 'device', 'server')}, "
              f"torch threads {torch.get_num_threads()}; max_new_tokens {max_new}; other jobs may share the CPU):\n")
        print("| loop | questions | seconds | questions/s |")
        print("|---|---|---|---|")
        n = args.batch_size
        for label, par in (("one request at a time", 1), (f"batched ({n} per call)", n)):
            set_parallel(backend, par)
            _, s = ask(backend, questions, max_new, max(1, n) * 4)
            print(f"| {label} | {len(questions)} | {s:.2f} | {len(questions) / s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
