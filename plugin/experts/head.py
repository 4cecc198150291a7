"""The optional supervised head of :func:`~fiftyone_anomaly_vlm.select_experts`: a strongly regularised,
cross-validated logistic regression on the candidates' calibrated scores and a few pooled image features,
switched on only when its out-of-fold AUROC beats the unsupervised choice on the same labelled samples,
reported with bootstrap intervals.

The pooled features are a candidate's whole-image backbone descriptors (per-channel mean and standard
deviation, :meth:`~fiftyone_anomaly_vlm.models.anomalib_expert.AnomalibExpert.pooled_features`) reduced by a
PCA fitted on the known-good training images (:func:`pooled_projection`, whitened, 3 components), so a handful
of labelled defects meets a handful of features, not hundreds.

Example:
    >>> proj = pooled_projection(train_descriptors)           # (n_train, D) -> mean, components, scale
    >>> columns = np.hstack([scores, project(val_descriptors, proj)])
    >>> info = fit_supervised_head(columns, names, labels, chosen_scores, seed=51)
    >>> info["used"], info["auroc"], info["auroc_ci95"]
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf

#: components of the pooled features the head sees (a few: 5-20 labelled defects must not be memorised)
POOLED_COMPONENTS = 3


def pooled_projection(features: np.ndarray, components: int = POOLED_COMPONENTS) -> dict[str, list]:
    """A whitened PCA of pooled descriptors ``(N, D)`` of known-good images: ``mean``, ``components``
    (k x D) and ``scale`` (each component's standard deviation), as lists (recorded with the head)."""
    from sklearn.decomposition import PCA

    k = max(1, min(components, features.shape[0] - 1, features.shape[1]))
    pca = PCA(n_components=k, random_state=0).fit(features)
    scale = np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
    return {"mean": pca.mean_.tolist(), "components": pca.components_.tolist(), "scale": scale.tolist()}


def pooled_descriptors(model, images: list[torch.Tensor], size: int, batch_size: int) -> np.ndarray:
    """``(N, D)``: ``model.pooled_features`` of ``images`` (resized to ``size`` when they differ), in batches."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([t.float() for t in images[start:start + batch_size]])
        if tuple(x.shape[-2:]) != (size, size):
            x = nnf.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(model.pooled_features(x).double().numpy())
    return np.concatenate(out)


def project(features: np.ndarray, projection: dict[str, Any]) -> np.ndarray:
    """``(N, k)``: descriptors ``(N, D)`` in the whitened PCA coordinates of :func:`pooled_projection`."""
    centred = np.asarray(features, dtype=float) - np.asarray(projection["mean"], dtype=float)
    return centred @ np.asarray(projection["components"], dtype=float).T / np.asarray(projection["scale"])


def bootstrap_interval(fn, n: int, rng: np.random.Generator, labels: np.ndarray,
                       reps: int = 1000) -> tuple[float, float]:
    """95 % percentile interval of ``fn(idx)`` over bootstrap resamples of ``n`` samples with both classes."""
    vals = []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        if 0 < labels[idx].sum() < n:
            vals.append(fn(idx))
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if vals else (0.0, 1.0)


def rank_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by ranks (Mann-Whitney U; ties count half): fast enough for bootstrap intervals."""
    from scipy.stats import rankdata  # heavy: only for the head and its intervals

    ranks = rankdata(scores)
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_supervised_head(columns: np.ndarray, names: list[str], labels: np.ndarray, chosen: np.ndarray,
                     seed: int) -> dict[str, Any]:
    """The supervised head on ``columns`` (one column per feature ``names``: the candidates' calibrated scores,
    then any pooled-feature components): fitted out of fold and compared with the unsupervised choice's scores
    ``chosen`` on the same labelled samples.

    Returns a dict: ``used`` (its out-of-fold AUROC beats the choice's), ``auroc`` and ``auroc_ci95`` (bootstrap),
    ``unsupervised_auroc``, ``difference_ci95``, ``reason``; when used, the final ``coef``/``intercept``/``C``
    fitted on all labelled samples.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if min(n_pos, n_neg) < 5:
        return {"used": False, "reason": f"needs 5+ labelled anomalies and normals, got {n_pos} and {n_neg}"}
    folds = StratifiedKFold(n_splits=min(5, n_pos, n_neg), shuffle=True, random_state=seed)
    cs = [0.01, 0.1, 1.0]  # strong regularisation: a few labelled defects must not be memorised
    # standardised features, so the penalty weighs scores in [0, 1] and whitened components alike
    inner = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=cs, cv=3, scoring="roc_auc",
                                                                 class_weight="balanced", max_iter=1000))
    with warnings.catch_warnings():  # scikit-learn 1.9's notes on LogisticRegressionCV's future defaults
        warnings.simplefilter("ignore", FutureWarning)
        oof = cross_val_predict(inner, columns, labels, cv=folds, method="predict_proba")[:, 1]
    head_auc, base_auc = rank_auroc(oof, labels), rank_auroc(chosen, labels)
    rng = np.random.default_rng(seed)
    head_ci = bootstrap_interval(lambda i: rank_auroc(oof[i], labels[i]), len(labels), rng, labels)
    diff_ci = bootstrap_interval(lambda i: rank_auroc(oof[i], labels[i]) - rank_auroc(chosen[i], labels[i]),
                                 len(labels), rng, labels)
    used = head_auc > base_auc
    out = {"used": used, "auroc": head_auc, "auroc_ci95": list(head_ci), "unsupervised_auroc": base_auc,
           "difference_ci95": list(diff_ci), "features": list(names), "validation": "out-of-fold (stratified "
           f"{folds.n_splits}-fold), standardised features, C chosen by inner 3-fold CV among {cs}",
           "reason": ("its out-of-fold AUROC beats the unsupervised choice" if used else
                      "its out-of-fold AUROC does not beat the unsupervised choice")}
    if used:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scaler = StandardScaler().fit(columns)
            final = LogisticRegressionCV(Cs=cs, cv=folds, scoring="roc_auc", class_weight="balanced",
                                         max_iter=1000).fit(scaler.transform(columns), labels)
        coef = final.coef_[0] / scaler.scale_  # on the raw features: the scaler folded in
        out["coef"] = [float(c) for c in coef]
        out["intercept"] = float(final.intercept_[0] - coef @ scaler.mean_)
        out["C"] = float(final.C_[0])
    return out


