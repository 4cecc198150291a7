"""The table :func:`~fiftyone_anomaly_vlm.select_experts` records with the expert it chose: read back, as text
(scripts) and as markdown (the App's form).

Example:
    >>> print(fav.format_selection(ds, "auto_ens"))
"""

from __future__ import annotations

import math
from typing import Any

from .record import load_expert
from .synthetic import KINDS

#: fewer validation normals than this get a note (an AUROC on 10 normals and 10 anomalies of a kind is known to
#: about +-0.23). More normals narrow that noise; they did not close the gap on faint specks in every run
#: (benchmarks/selection_noise.py, README)
FEW_NORMALS = 30


def selection_table(samples, key: str) -> dict[str, Any] | None:
    """The selection recorded with expert ``key`` by :func:`select_experts` (None for an expert chosen otherwise)."""
    return load_expert(samples, key).options.get("selection")


def chosen_text(chosen: dict[str, Any]) -> str:
    """The chosen members, with the ensemble's rule: ``"a + b"`` (mean; records made before the other rules have
    no ``combine``), ``"max(a, b)"`` or ``"1 a + 0.25 b (standardised)"``."""
    if chosen.get("combine") == "max":
        return "max(" + ", ".join(chosen["members"]) + ")"
    if chosen.get("combine") == "weighted":
        return " + ".join(f"{w:g} {m}" for w, m in zip(chosen["weights"], chosen["members"])) + " (standardised)"
    return " + ".join(chosen["members"])


def normals_text(sel: dict[str, Any]) -> str:
    """``"40 normal"``, or ``"40 normal, 12 of them the candidates' calibration hold-out"`` (records from before
    that reuse have no count)."""
    n = sel.get("num_calibration_normals") or 0
    return f"{sel['num_normal']} normal" + (f", {n} of them the candidates' calibration hold-out" if n else "")


def validated_text(sel: dict[str, Any]) -> str:
    """``"synthetic anomalies (70 anomalous, 10 normal)"``, with ``"; candidates fitted one per <field>"`` when they
    were (``group_by``)."""
    per = f"; candidates fitted one per {sel['group_by']}" if sel.get("group_by") else ""
    made = sel.get("synthetic_kinds")  # records from before synthetic_kinds made every kind
    only = f" of the kinds {', '.join(made)} only" if made and set(made) != set(KINDS) else ""
    return f"{sel['validation']} anomalies{only} ({sel['num_anomalous']} anomalous, {normals_text(sel)}{per})"


def families_text(m: dict[str, Any]) -> str:
    """``"local 0.712 global 0.905"``: the mean AUROC of each synthetic family that was made (``""`` on labels)."""
    return " ".join(f"{fam} {m[f'{fam}_auroc']:.3f}" for fam in ("local", "global") if f"{fam}_auroc" in m)


def evidence_note(sel: dict[str, Any]) -> str | None:
    """A note when the validation set is small: the 95 % half-width of one kind's AUROC there (Hanley-McNeil at
    AUROC 0.7), and what to do. None with :data:`FEW_NORMALS` or more normals."""
    n_normal = int(sel["num_normal"])
    if n_normal >= FEW_NORMALS:
        return None
    kinds = len(sel["chosen"].get("per_kind") or {}) or 1
    n_kind = max(1, int(sel["num_anomalous"]) // kinds)
    a = 0.7
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_kind - 1) * (q1 - a * a) + (n_normal - 1) * (q2 - a * a)) / (n_kind * n_normal)
    return (f"few validation normals ({n_normal}): an AUROC on {n_kind} anomalies of a kind is known to about "
            f"+-{1.96 * math.sqrt(var):.2f}, so near-equal options are ranked partly by chance; hold out "
            f"{FEW_NORMALS}+ good images (selection_share, or a larger val_view)")


def format_selection(samples, key: str) -> str:
    """The candidate table of expert ``key`` as text (one line per candidate, then the choice)."""
    sel = selection_table(samples, key)
    if not sel:
        return f"expert {key!r} was not chosen by select_experts"
    lines = [f"validated on {validated_text(sel)}; ranked by {sel['objective']}"]
    note = evidence_note(sel)
    if note:
        lines.append("note: " + note)
    for r in sel["candidates"]:
        if r["status"] != "fitted":
            lines.append(f"  {r['candidate']:<22} {r['status']}: {r.get('error')}")
            continue
        parts = [f"AUROC {r['auroc']:.3f}"]
        if families_text(r):
            parts.append(families_text(r))
        if r.get("per_kind"):
            parts.append("(" + " ".join(f"{kind} {v:.2f}" for kind, v in r["per_kind"].items()) + ")")
        if r.get("ap") is not None:
            parts.append(f"AP {r['ap']:.3f}")
        lines.append(f"  {r['candidate']:<22} " + ", ".join(parts) + f" (fit {r['fit_s']} s)")
    c = sel["chosen"]
    families = f"{families_text(c)}: " if families_text(c) else ""
    kinds = ("; " + families + " ".join(f"{kind} {v:.2f}" for kind, v in c["per_kind"].items())
             if "per_kind" in c else "")
    short = f"shortfall {c['shortfall']:.3f} on its worst kind, " if "shortfall" in c else ""
    lines.append(f"chosen: {chosen_text(c)} ({short}objective {c['objective']:.3f}{kinds})")
    h = sel["head"]
    if h.get("auroc") is not None:
        lines.append(f"supervised head: AUROC {h['auroc']:.3f} [{h['auroc_ci95'][0]:.3f}, {h['auroc_ci95'][1]:.3f}] "
                     f"vs {h['unsupervised_auroc']:.3f}: {'used' if h['used'] else 'not used'} ({h['reason']})")
        if h.get("pooled_features"):
            lines.append(f"  features: the candidates' calibrated scores + {h['pooled_features']}")
    else:
        lines.append(f"supervised head: not used ({h['reason']})")
    return "\n".join(lines)


def selection_markdown(samples, key: str) -> str | None:
    """The candidate table of expert ``key`` as a markdown table (None when ``key`` was not chosen by
    :func:`select_experts`); the App's form shows it."""
    try:
        sel = selection_table(samples, key)
    except (ValueError, FileNotFoundError):
        return None
    if not sel:
        return None
    synthetic = sel["validation"] == "synthetic"
    head = "| candidate | status | AUROC | " + ("local | global |" if synthetic else "AP |") + " fit s |"
    lines = [f"**{key}**: chosen **{chosen_text(sel['chosen'])}** on {validated_text(sel)}", "", head,
             "|---|---|---:|" + ("---:|---:|" if synthetic else "---:|") + "---:|"]
    note = evidence_note(sel)
    if note:
        lines[1:1] = ["", "Note: " + note]
    for r in sel["candidates"]:
        if r["status"] != "fitted":
            cells = ["", ""] if synthetic else [""]
            lines.append(f"| {r['candidate']} | {r['status']}: {r.get('error', '')} | | " + " | ".join(cells) + " | |")
            continue
        cells = ([f"{r[k]:.3f}" if k in r else "-" for k in ("local_auroc", "global_auroc")] if synthetic
                 else [f"{r['ap']:.3f}"])  # "-": a family not synthesised (synthetic_kinds)
        lines.append(f"| {r['candidate']} | fitted | {r['auroc']:.3f} | " + " | ".join(cells) + f" | {r['fit_s']} |")
    h = sel["head"]
    lines += ["", f"Supervised head: {'used' if h['used'] else 'not used'} ({h['reason']})"
              + (f", AUROC {h['auroc']:.3f} [{h['auroc_ci95'][0]:.3f}, {h['auroc_ci95'][1]:.3f}]"
                 if h.get("auroc") is not None else "")
              + (f"; features: the candidates' calibrated scores + {h['pooled_features']}"
                 if h.get("pooled_features") else "")]
    return "\n".join(lines)
