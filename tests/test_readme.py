"""The README is the manual users copy from: every ```python block in it runs, and its operator table is complete.

Blocks run in README order, each ``exec``-ed in a fresh namespace (as a reader pastes it into a new
interpreter), on one database, as a reader following the README would: the first block fits and scores the
expert ``padim`` that later blocks use. The parts dataset ``anomaly-vlm-parts`` is generated smaller than the
demo's (26 images of 64 px instead of 84 of 128 px) so the whole README runs in about 80 s on 2 cores.

A block that needs something this machine lacks (model weights, a GPU, a server, another dataset) carries a
marker on the line right above its fence, and a visible note above that (an italic line saying what it
needs), e.g.::

    *Needs a VLM's weights; the tests run it with a tiny random Qwen2-VL.*
    <!-- readme-test: needs-weights; sub "/models/Qwen2-VL-2B-Instruct" "{tiny_qwen}" -->

Directives, separated by ``;``:

- ``needs-<what>``: documents the need (the note above must exist);
- ``sub "OLD" "NEW"``: replace OLD by NEW before running (OLD must occur: a marker cannot outlive its
  block); NEW may name ``{tiny_qwen}`` (a tiny Qwen2-VL folder), ``{tiny_clip}`` (a tiny open_clip config),
  ``{server_url}`` / ``{server_model}`` (a local OpenAI-compatible server answering with it);
- ``skip "reason"``: not run (at most :data:`MAX_SKIPS` blocks);
- ``needs-ffmpeg``: skipped (counted as a skip) only where ffmpeg is missing.

Test-side prelude (the only one): the generated parts get a string field ``station`` (A / B), the group
field the grouped-expert block is pointed at instead of ELPV's ``cell_type.label``.
"""

from __future__ import annotations

import json
import re
import shlex
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import fiftyone as fo

from conftest import ROOT
from fiftyone_anomaly_vlm.datasets import make_parts_dataset
from fiftyone_anomaly_vlm.datasets import ffmpeg_available

README = ROOT / "README.md"
MAX_SKIPS = 1
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:(.*?)-->\s*$")


@dataclass
class Block:
    """One fenced code block of the README."""

    line: int  # 1-based line of its first code line
    lang: str
    code: str
    directives: list[list[str]] = field(default_factory=list)
    note: str | None = None  # the visible italic note above the marker

    @property
    def needs(self) -> list[str]:
        return [d[0][len("needs-"):] for d in self.directives if d[0].startswith("needs-")]

    @property
    def skip(self) -> str | None:
        return next((" ".join(d[1:]) for d in self.directives if d[0] == "skip"), None)

    @property
    def subs(self) -> list[tuple[str, str]]:
        return [(d[1], d[2]) for d in self.directives if d[0] == "sub"]


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with the marker directly above its fence (if any) and the note above it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        block = Block(line=start + 2, lang=m.group(1), code="\n".join(lines[start + 1:j]) + "\n")
        marker = _MARKER.match(lines[start - 1]) if start else None
        if marker:
            block.directives = [shlex.split(part) for part in marker.group(1).split(";") if part.strip()]
            k = start - 1  # the paragraph right above the marker, if it is an italic note saying what is needed
            while k > 0 and lines[k - 1].strip():
                k -= 1
            note = " ".join(lines[k:start - 1])
            block.note = note if re.match(r"^\*\s*Needs\b.*\*$", note, re.S) else None
        blocks.append(block)
        i = j + 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for b in readme_blocks(README.read_text()) if b.lang == "python"]


def prepare(block: Block, values: dict[str, str]) -> str:
    """The block's code after its substitutions, padded so tracebacks give README line numbers."""
    code = block.code
    for old, new in block.subs:
        assert old in code, f"README.md:{block.line}: marker replaces {old!r}, which the block no longer holds"
        code = code.replace(old, new.format(**values))
    return "\n" * (block.line - 1) + code


# --- the markers themselves (fast) ---------------------------------------------------------------------------
def test_markers_are_visible_and_skips_are_few():
    blocks = python_blocks()
    assert len(blocks) >= 8, "fewer Python blocks than expected: did the fence parsing break?"
    for b in blocks:
        for d in b.directives:
            assert d[0] in ("sub", "skip") or d[0].startswith("needs-"), f"README.md:{b.line}: unknown {d[0]!r}"
            assert d[0] != "sub" or len(d) == 3, f"README.md:{b.line}: sub takes OLD and NEW: {d}"
        if b.needs or b.skip:
            assert b.note, f"README.md:{b.line}: a block that needs {b.needs or 'skipping'} says so in an italic note"
        if set(b.needs) - {"ffmpeg", "data"} and not b.skip:
            assert b.subs, f"README.md:{b.line}: needs {b.needs} but the marker substitutes nothing"
    assert sum(b.skip is not None for b in blocks) <= MAX_SKIPS


def test_operator_table_lists_every_operator_and_panel():
    manifest = yaml.safe_load((ROOT / "fiftyone.yml").read_text())
    text = README.read_text()
    app = text[text.index("## From the App"):]
    app = app[:app.index("\n## ", 1)]
    rows = [line for line in app.splitlines() if line.startswith("| ")]
    listed = {m for line in rows for m in re.findall(r"\(`(\w+)`\)", line.split("|")[1])}
    assert set(manifest["operators"]) <= listed, f"missing from the table: {set(manifest['operators']) - listed}"
    assert listed <= set(manifest["operators"]) | set(manifest["panels"]), f"not in fiftyone.yml: {listed}"
    for panel in manifest["panels"]:
        assert f"`{panel}`" in app, f"panel {panel} is not mentioned in the App section"
    for row in rows[2:]:
        assert row.split("|")[2].strip(), f"no form fields in {row}"


# --- running them (about 80 s on 2 cores) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny local stand-ins for the weights the README names, and a local OpenAI-compatible server."""
    from openai_server import OpenAITestServer, build_tiny_qwen2vl
    from test_clip_expert import TINY
    from tiny_vlms import build_qwen2_vl

    folder = tmp_path_factory.mktemp("readme-models")
    clip = folder / "tiny-clip.json"
    clip.write_text(json.dumps(TINY))
    with OpenAITestServer(build_tiny_qwen2vl(folder / "served-qwen2-vl")) as server:
        yield {"tiny_qwen": build_qwen2_vl(str(folder / "tiny-qwen2-vl")), "tiny_clip": str(clip),
               "server_url": server.base_url, "server_model": "tiny-qwen2-vl"}


@pytest.fixture(scope="module")
def parts_dataset():
    ds = make_parts_dataset("anomaly-vlm-parts", num_normal=20, num_anomalous=6, size=64, seed=0)
    ds.set_values("station", ["A" if i % 2 else "B" for i in range(len(ds))])
    yield ds
    for name in ("anomaly-vlm-parts", "anomaly-vlm-videos"):
        if fo.dataset_exists(name):
            fo.load_dataset(name).delete_runs()
            fo.delete_dataset(name)


def test_every_python_block_runs(parts_dataset, tiny_models):
    ran, skipped = [], []
    for block in python_blocks():
        reason = block.skip or ("ffmpeg missing" if "ffmpeg" in block.needs and not ffmpeg_available() else None)
        if reason:
            skipped.append((block.line, reason))
            continue
        code = prepare(block, tiny_models)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
        except Exception:  # noqa: BLE001 - report which block failed, with the README's line numbers
            pytest.fail(f"README.md block at line {block.line} failed:\n{traceback.format_exc(limit=-4)}")
        ran.append(block.line)
        print(f"README.md:{block.line}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
    assert len(skipped) <= MAX_SKIPS, skipped
    assert ran, "no block ran"
