"""Choose experts by evidence: fit candidates, score a validation set, keep the best single expert or ensemble.

A patch model (PaDiM, PatchCore) finds small local defects and is nearly blind to a change over the whole
image; a global model (DFM, DFKDE, the texture-statistics expert) is the other way round. Which one a
dataset needs, with which layers and size, is found here by measuring, not guessed:

1. every candidate is fitted on the known-good training samples and calibrated on its held-out normals, as
   :func:`~fiftyone_anomaly_vlm.fit_expert` does (a candidate that fails is listed with its error; one whose
   estimated cost no longer fits the time budget is skipped and listed; with ``group_by``, one expert per group,
   as ``fit_expert(group_by=...)`` fits them, each validation image scored by its group's expert);
2. each scores a validation set: the labelled anomalies and normals of ``val_view`` when it has some (AUROC,
   then AP), otherwise synthetic anomalies made from good images none of the candidates trained on: the
   validation images and the candidates' calibration hold-out (local and global kinds, small spots and
   scratches among the local ones, :mod:`.synthetic`; a candidate's objective is the mean of its local and
   its global AUROC, so both kinds count);
3. the best single candidate and the best ensemble of 2-``max_members`` of the best candidates are compared,
   each ensemble as the mean and as the max of its members' calibrated scores and as weighted sums of their
   standardised scores (:mod:`.combined`: the max and the weights keep a patch member's alarm on a speck that a
   texture member cannot see, the mean averages out members that see the same defects). On synthetic anomalies
   the option with the smallest *shortfall* wins: how far it falls, on its worst kind, below the best single
   candidate on that kind (each kind's best candidate is in the ensembles' pool); with labels, the highest
   AUROC (with ``kind_field`` naming each anomaly's kind, the shortfall first, as on synthetic anomalies). Near ties (within :data:`.options.TIE`) go to fewer members, the higher objective, the simpler rule. The
   winner is recorded as ``<key>_expert``, a composite expert whose members are the kept candidates
   ``<key>__<candidate>``;
4. with labelled anomalies, an optional supervised head (a strongly regularised, cross-validated logistic
   regression on the candidates' calibrated scores and 3 PCA components of a candidate's pooled backbone
   statistics, :mod:`.head`) replaces the mean only when its out-of-fold AUROC beats the unsupervised choice
   on the same samples; its interval is recorded either way.

The run records the table of candidates (``load_expert(ds, key).options["selection"]``,
:func:`~.selection_report.selection_table`), and the App's form shows it.

Example:
    >>> expert = fav.select_experts(ds.match_tags("train"), key="auto_ens", budget_s=300)
    >>> print(fav.format_selection(ds, "auto_ens"))
    >>> fav.score(ds.match_tags("test"), expert="auto_ens")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf

from .._common import check_key, check_image_collection
from ..calibration import calibrated_arrays, threshold_from_normals
from ..models import backbones as fbb
from ..models.anomalib_build import name_key
from ..models.base import resolve_device
from ..runs import delete_expert_runs, expert_run_key, expert_state
from .candidates import Candidate, resolve_candidates
from .combined import ALL
from .options import combined_scores, rank_options
from .grouped import fit_grouped_expert, register_composite
from .head import fit_supervised_head, pooled_descriptors, pooled_projection, project
from .record import Expert, list_experts, load_expert, member_calibration
from .single import fit_single_expert
from .synthetic import GENERATORS, GLOBAL_KINDS, LOCAL_KINDS, resolve_kinds
from .validation import decode_square, validation_set

logger = logging.getLogger(__name__)

#: relative cost of one image through a model, against one backbone forward pass (the budget's estimate)
_COST = {"patchcore": 2.5, "dfkde": 1.2}
#: seconds a fit costs beyond its forward passes (Lightning trainer, checkpoint, calibration bookkeeping)
_FIXED_S = 3.0


def _objective_text(kinds: Sequence[str]) -> str:
    """How a synthetic option's objective is made, naming the kinds of each family that were synthesised."""
    families = [f"{fam} ({', '.join(k for k in kinds if k in of)})" for fam, of in
                (("local", LOCAL_KINDS), ("global", GLOBAL_KINDS)) if set(kinds) & set(of)]
    return ("the mean of the " + " and ".join(families) + " AUROC" if len(families) > 1
            else f"the mean AUROC of the {families[0]} kinds")


def _forward_seconds(backbone: str, size: int, device: torch.device, batch: int = 4) -> float:
    """Seconds one image takes through ``backbone`` at ``size`` (features only), measured here."""
    import timm  # heavy: only when a budget is estimated

    net = timm.create_model(backbone, pretrained=False, features_only=True).eval().to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    times = []
    with torch.inference_mode():
        net(x)  # warm-up
        for _ in range(3):  # the least of three: other processes on the machine only ever add time
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    return min(times) / batch


def _candidate_scores(spec: Expert, images: list[torch.Tensor], size: int, device, batch_size: int,
                      group_by: str | None = None, groups: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated and standardised image scores of a fitted candidate on ``images`` (resized to ``size`` when
    they differ; a candidate that calibrates itself: its score twice). A candidate fitted per group
    (``group_by``) scores each image with its group's member, picked by ``groups``, as at scoring time."""
    model = spec.load(device=device)
    cal = member_calibration(spec)
    out, standard = [], []
    for start in range(0, len(images), batch_size):
        x = torch.stack([t.float() for t in images[start:start + batch_size]])
        if tuple(x.shape[-2:]) != (size, size):
            x = nnf.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        output = (model.predict(x, fields={group_by: groups[start:start + batch_size]}) if group_by else
                  model.predict(x))
        scores, _, _, _ = calibrated_arrays(output, cal)
        out.append(scores)
        standard.append(scores if cal is None or output.raw_score is None else
                        cal.standardize_scores(output.raw_score.numpy()))
    return np.concatenate(out), np.concatenate(standard)


def _pooled_features(key: str, order: list[str], sizes: dict[str, int], fit_view, val, device, batch_size: int,
                     seed: int) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """The supervised head's pooled features: the first candidate of ``order`` whose backbone can be pooled
    (:meth:`~..models.anomalib_expert.AnomalibExpert.pooled_features`) describes up to 100 of its training
    images and the validation images (a PCA of both, labels unused: :func:`.head.pooled_projection`); returns
    the validation images in that PCA's coordinates.

    Returns ``(projection with member_name and num_fit, (N_val, k) array)``, or ``(None, None)``.
    """
    dataset = fit_view._root_dataset
    paths = fit_view.values("filepath")
    if len(paths) > 100:
        paths = list(np.random.default_rng(seed).choice(paths, 100, replace=False))
    for name in order:
        size = sizes[name]
        model = load_expert(dataset, f"{key}__{name}").load(device=device)
        try:
            val_features = pooled_descriptors(model, val.images, size, batch_size)
        except (ValueError, AttributeError) as exc:  # no backbone to pool (a ViT, EfficientAd...): try the next
            logger.info("select_experts: %s has no pooled features: %s", name, exc)
            continue
        # the PCA sees the validation images too (never their labels): a defect's direction is one the
        # good images alone barely vary along
        train_features = pooled_descriptors(model, decode_square(paths, size), size, batch_size)
        projection = pooled_projection(np.vstack([train_features, val_features]))
        return {**projection, "member_name": name, "num_fit": len(paths) + len(val.images)}, project(
            val_features, projection)
    return None, None


def select_experts(
    train_view,
    val_view=None,
    candidates: str | Sequence[str | dict | Candidate] = "auto",
    key: str = "auto_ens",
    *,
    gt_field: str = "ground_truth",
    positive: str = "anomalous",
    kind_field: str | None = None,
    group_by: str | None = None,
    synthetic: bool = True,
    synthetic_kinds: str | Sequence[str] = "all",
    budget_s: float = 600.0,
    image_size: int = 128,
    pretrained: bool | str = True,
    backbone: str | None = None,
    max_members: int = 3,
    supervised_head: bool = True,
    keep_candidates: bool = False,
    selection_share: float = 0.3,
    holdout: float = 0.2,
    seed: int = 51,
    device: str | None = "auto",
    batch_size: int = 8,
    threshold: str = "far",
    threshold_param: float | None = None,
    overwrite: bool = False,
    progress: bool | Any = None,
) -> Expert:
    """Fit candidate experts, rank them on validation anomalies and record the best single one or ensemble.

    See the module documentation for the procedure.

    Args:
        train_view: known-good samples to fit the candidates on.
        val_view: validation samples: with labelled anomalies (``gt_field`` label ``positive``; 2+ of each class,
            5-20 anomalies are plenty) the candidates are ranked by AUROC (then AP) on them; with good samples
            only, synthetic anomalies are made from those. None: a ``selection_share`` of ``train_view`` is held
            out of fitting and synthetic anomalies are made from it. On synthetic anomalies the good images the
            candidates hold out for calibration (``holdout``) join the validation normals, with theirs.
        candidates: ``"auto"`` (:func:`.candidates.auto_candidates`: PaDiM at two sizes, PatchCore, DFM, DFKDE,
            two texture-statistics experts) or a list of model names, ``{"name", "model", "image_size",
            "model_kwargs"}`` dicts or :class:`Candidate` objects.
        key: the selected expert's name; candidates are fitted as ``<key>__<candidate>``; the ones kept are
            its members (deleted with it), the others are deleted.
        gt_field: the ``fo.Classification`` field of ``val_view`` holding the labels.
        positive: the label meaning anomalous.
        kind_field: a field of ``val_view`` naming each labelled anomaly's kind (a string, or a classification's
            label: "speck", "grain"...): the options are then ranked as on synthetic anomalies, by their
            shortfall on the worst kind against the best single candidate on that kind, then by AUROC. With a
            handful of anomalies per kind the per-kind AUROCs are coarse; without it, one AUROC over all
            anomalies favours the kind that has the most of them.
        group_by: a sample field (``"cell_type.label"``, ``"camera"``...): every candidate is fitted one expert per
            group, as ``fit_expert(group_by=...)`` does, and the options combine these per-group candidates (on
            ELPV: PaDiM and PatchCore per cell type). Each validation image is scored by its group's member (a
            synthetic anomaly by its good image's); labelled validation samples of a group without training
            samples fail before any fit. No pooled features for the supervised head (scores only).
        synthetic: allow synthetic anomalies when no labelled anomaly is given.
        synthetic_kinds: which synthetic kinds rank the candidates: ``"all"`` (default), ``"local"`` (perlin,
            cutpaste, spot, scratch), ``"global"`` (colour, blur, grain) or a list of kind names and these words.
            Your product knowledge: when the defects you expect are all local (cracks, specks), ranking on the
            global kinds too asks every option to protect a kind the line never sees (on ELPV per cell type, the
            blur kind decided the choice; ranked on the local kinds only it stayed the same, README). Unused with
            labelled anomalies.
        budget_s: wall-clock budget in seconds for fitting and scoring the candidates. Each candidate's cost is
            estimated from a timed forward pass of its backbone; one that would end past the budget is
            skipped and listed.
        image_size: the candidates' default side (``"auto"`` also tries half of it).
        pretrained: backbone weights, as for :func:`~fiftyone_anomaly_vlm.fit_expert`.
        backbone: timm backbone (default: the offline EfficientNet-Lite).
        max_members: the largest ensemble tried.
        supervised_head: with 5+ labelled anomalies and normals, try the logistic-regression head.
        keep_candidates: keep the candidates that were not chosen as experts of their own (to score and compare
            them); by default they are deleted.
        selection_share: share of ``train_view`` held out for synthetic anomalies when ``val_view`` is None
            (exactly ``round(selection_share * len(train_view))`` images, chosen by a hash of their paths).
        holdout: each candidate's held-out share for calibration.
        seed: seed of the splits, fits and synthetic anomalies.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``...
        batch_size: images per forward pass.
        threshold: threshold rule of the recorded expert (see :func:`~fiftyone_anomaly_vlm.fit_expert`).
        threshold_param: its parameter.
        overwrite: replace an expert recorded under ``key``.
        progress: FiftyOne progress convention (passed to each candidate's fit).

    Returns:
        The recorded :class:`Expert`; its ``options["selection"]`` holds the table
        (:func:`~.selection_report.format_selection`).

    Raises:
        ValueError: before any fit: a bad key or an existing one, an empty or non-image view, unknown
            candidate models, a validation view whose labels are all anomalous, one without anomalies while
            ``synthetic=False``, too few validation images, a budget too small for any candidate; after the
            fits: no candidate could be fitted (each one's error is in the message).
    """
    started = time.perf_counter()
    key = check_key(key)
    check_image_collection(train_view, "select_experts")
    dataset = train_view._root_dataset
    if expert_run_key(key) in dataset.list_runs() and not overwrite:
        raise ValueError(f"an expert named {key!r} already exists; pass overwrite=True or another key")
    if not budget_s or budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    if max_members < 1:
        raise ValueError(f"max_members must be 1 or more, got {max_members}")
    threshold_from_normals(np.zeros(1), threshold, threshold_param)
    made_kinds = resolve_kinds(synthetic_kinds)
    dev = resolve_device(device)
    n_train = train_view.count()
    cands = resolve_candidates(candidates, int(image_size), backbone, int(n_train * (1 - selection_share) * (1 - holdout)))
    size = max(c.image_size for c in cands)
    val, fit_view = validation_set(train_view, val_view, gt_field, positive, synthetic, selection_share, seed, size,
                                   kind_field, holdout, group_by, made_kinds)

    # the budget: every candidate's cost estimated from a timed forward pass of its backbone
    bb = backbone or fbb.default_offline_backbone() or "resnet18"
    n_fit = fit_view.count()
    per_image = {s: _forward_seconds(bb, s, dev) for s in {c.image_size for c in cands}}
    estimates = {c.name: _FIXED_S + per_image[c.image_size] * _COST.get(name_key(c.model), 1.0)
                 * (n_fit * (1 + holdout * (2 if group_by else 1)) + len(val.images)) * 1.5 for c in cands}
    cheapest = min(estimates.values())
    if cheapest > budget_s:
        raise ValueError(f"budget_s={budget_s:g} s is too small for any candidate: the cheapest "
                         f"({min(estimates, key=estimates.get)}) needs about {cheapest:.0f} s on {dev}; "
                         "raise the budget, lower image_size or fit on fewer images")

    rows: list[dict[str, Any]] = []
    columns: dict[str, np.ndarray] = {}  # calibrated validation scores per candidate
    standardised: dict[str, np.ndarray] = {}  # and standardised ones (weighted ensembles)
    ratios: list[float] = []  # measured / estimated time of the candidates done so far: corrects the estimates
    for cand in sorted(cands, key=lambda c: estimates[c.name]):
        estimate = estimates[cand.name] * (float(np.median(ratios)) if ratios else 1.0)
        row = {**cand.row(), "estimate_s": round(estimate, 1)}
        rows.append(row)
        elapsed = time.perf_counter() - started
        if elapsed + estimate > budget_s:
            row.update(status="skipped", error=f"over budget: {elapsed:.0f} s spent, about "
                                               f"{estimate:.0f} s more needed, budget {budget_s:g} s")
            continue
        member = f"{key}__{cand.name}"
        t0 = time.perf_counter()
        fit = partial(fit_grouped_expert, fit_view, group_by) if group_by else partial(fit_single_expert, fit_view)
        try:
            spec = fit(cand.model, member, pretrained=pretrained, backbone=backbone,
                                     image_size=cand.image_size, model_kwargs=cand.model_kwargs, holdout=holdout,
                                     device=device, batch_size=batch_size, seed=seed, threshold=threshold,
                                     threshold_param=threshold_param, overwrite=True, progress=progress)
            row["fit_s"] = round(time.perf_counter() - t0, 1)
            # on the recorded calibration: the scales the chosen composite combines at scoring time
            scores, standard = _candidate_scores(spec, val.images, cand.image_size, device, batch_size, group_by,
                                                 val.groups)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is listed, the others go on
            logger.warning("select_experts: candidate %s failed: %s", cand.name, exc)
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            # with its groups' experts when a later group failed
            delete_expert_runs(dataset, [member] + [e for e in list_experts(dataset) if e.startswith(member + "__")])
            continue
        row.update(status="fitted", total_s=round(time.perf_counter() - t0, 1), **val.metrics(scores))
        ratios.append(row["total_s"] / estimates[cand.name])
        columns[cand.name] = scores
        standardised[cand.name] = standard
    if not columns:
        raise ValueError("select_experts: no candidate could be fitted: " + "; ".join(
            f"{r['candidate']}: {r.get('error')}" for r in rows))

    tried = rank_options(rows, columns, standardised, val.metrics, max_members)
    chosen = tried[0]
    members = chosen["members"]
    combine, weights = chosen.get("combine", "mean"), chosen.get("weights")

    head = None
    head_info = {"used": False, "reason": "no labelled anomalies" if val.mode == "synthetic" else "switched off"}
    if val.mode == "labelled" and supervised_head:
        names = list(columns)
        kinds = {c.name: name_key(c.model) for c in cands}
        ranked = list(dict.fromkeys(m for t in tried if len(t["members"]) == 1 for m in t["members"]))
        order = [n for n in names if kinds[n] == "texturestats"] + [n for n in ranked if kinds[n] != "texturestats"]
        pooled, z = (None, None) if group_by else _pooled_features(
            key, order, {c.name: c.image_size for c in cands}, fit_view, val, device, batch_size, seed)
        features = np.stack([columns[n] for n in names], axis=1)
        feature_names = list(names)
        if pooled is not None:
            features = np.hstack([features, z])
            feature_names += [f"{pooled['member_name']} pooled PC{i + 1}" for i in range(z.shape[1])]
        head_info = fit_supervised_head(features, feature_names, val.labels,
                                        combined_scores(chosen, columns, standardised), seed)
        head_info["pooled_features"] = (f"{pooled['member_name']}'s pooled backbone statistics, PCA to "
                                        f"{z.shape[1]} (fitted on {pooled['num_fit']} training and validation images)"
                                        if pooled is not None else "none (candidates fitted per group)" if group_by
                                        else "none (no candidate's backbone could be pooled)")
        if head_info["used"]:
            members = names
            coef = head_info["coef"]
            head = {"members": names, "coef": coef[:len(names)], "intercept": head_info["intercept"]}
            if pooled is not None:
                head["pooled"] = {"member": names.index(pooled["member_name"]), "coef": coef[len(names):],
                                  **{k: pooled[k] for k in ("mean", "components", "scale")}}

    if not keep_candidates:
        delete_expert_runs(dataset, [f"{key}__{n}" for n in columns if n not in members])
    member_keys = [f"{key}__{n}" for n in members]
    common = None
    for m in member_keys:
        held = set(expert_state(dataset, expert_run_key(m))["holdout_ids"] or [])
        common = held if common is None else common & held
    selection = {
        "validation": val.mode,
        "generators": {k: GENERATORS[k] for k in made_kinds} if val.mode == "synthetic" else None,
        "synthetic_kinds": list(made_kinds) if val.mode == "synthetic" else None,
        "num_normal": int((val.labels == 0).sum()), "num_anomalous": int(val.labels.sum()),
        "num_calibration_normals": val.num_calibration_normals, "group_by": group_by,
        "objective": ("AUROC on labelled anomalies (then AP)" if val.mode == "labelled" and "shortfall" not in chosen else
                      f"smallest shortfall on the worst kind of {kind_field!r} against the best single candidate on "
                      "that kind, then AUROC on labelled anomalies" if val.mode == "labelled" else
                      "smallest shortfall on the worst synthetic kind against the best single candidate on that "
                      "kind, then " + _objective_text(made_kinds)),
        "candidates": rows, "ensembles": tried[:10], "num_options": len(tried), "chosen": chosen, "head": head_info,
        "budget_s": float(budget_s), "elapsed_s": round(time.perf_counter() - started, 1), "device": str(dev),
    }
    logger.info("select_experts: %s chosen on %s anomalies (objective %.3f)",
                f" {combine} ".join(members) if len(members) > 1 else members[0], val.mode, chosen["objective"])
    size_of = {c.name: c.image_size for c in cands}
    return register_composite(
        train_view, key, {ALL: member_keys}, group_field=None, image_size=(max(size_of[n] for n in members),) * 2,
        calibration_ids=sorted(common or []), owned=member_keys,
        kind=("head over " if head else f"selected ({combine}): " if len(members) > 1 else "selected: ")
        + " + ".join(members),
        threshold=threshold, threshold_param=threshold_param, batch_size=batch_size, seed=seed, device=device,
        progress=progress, selection=selection, head=head, combine="mean" if head else combine,
        weights=None if head else weights)
