"""The options :func:`~fiftyone_anomaly_vlm.select_experts` compares, and how it ranks them.

Options are the single candidates and ensembles of 2-``max_members`` candidates of a pool, each ensemble as the
mean and the max of its members' calibrated scores and as weighted sums of their standardised scores
(:mod:`.combined`). On synthetic anomalies (or labelled ones named by kind) the first criterion is the
*shortfall*: how far the option falls, on its worst kind, below the best single candidate on that kind (the
issue's "as good as the best single expert on every kind"), so the pool holds each kind's best candidate.
Without kinds (labelled anomalies of one kind) the first criterion is the objective (AUROC, then AP).
Near-ties (:data:`TIE`) on the first criterion go to fewer members, then the higher objective, then the simpler
rule (mean, max, weighted; larger weights first): a small validation set cannot tell them apart.

Example:
    >>> tried = rank_options(rows, columns, standardised, val.metrics, max_members=3)
    >>> tried[0]["members"], tried[0].get("combine"), tried[0].get("shortfall")
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from ..models.line_inference import MemberCombiner

#: ensembles are formed from at most this many candidates (each kind's champion first, then the best ranked)
ENSEMBLE_POOL = 5
#: weights a "weighted" ensemble tries for each member (relative: the largest is 1)
WEIGHTS = (1.0, 0.5, 0.25, 0.1)
#: objectives (and shortfalls) closer than this are a tie: validation sets are small, and hundreds of weighted
#: variants would otherwise win by noise
TIE = 0.005
_SIMPLICITY = {"mean": 0, "max": 1, "weighted": 2}


def combined_scores(option: dict[str, Any], columns: dict[str, np.ndarray],
              standardised: dict[str, np.ndarray]) -> np.ndarray:
    """The validation scores of a single candidate or an ensemble (``members``, ``combine``, ``weights``), as
    :class:`~.combined.CompositeExpert` combines them."""
    members = option["members"]
    comb = MemberCombiner(len(columns[members[0]]), None, option.get("combine"), option.get("weights"))
    for j, name in enumerate(members):
        comb.add(range(len(columns[name])), j, columns[name], standardised[name])
    return comb.result()[0]


def weight_grid(k: int) -> list[tuple[float, ...]]:
    """The weights a ``"weighted"`` ensemble of ``k`` members tries: each from :data:`WEIGHTS`, the largest 1,
    not all equal to 1 (that is tried as well, it is the plain standardised sum)."""
    return [w for w in itertools.product(WEIGHTS, repeat=k) if max(w) == 1.0]


def rank_options(rows: list[dict[str, Any]], columns: dict[str, np.ndarray], standardised: dict[str, np.ndarray],
                 metrics: Callable[[np.ndarray], dict[str, Any]], max_members: int,
                 tie: float = TIE) -> list[dict[str, Any]]:
    """Every option (``members``, ``combine``, ``weights`` and its ``metrics``; ``shortfall`` where kinds are
    known), best first.

    Args:
        rows: the fitted candidates' table rows (``candidate``, ``objective``, ``per_kind`` or None).
        columns: candidate -> calibrated validation scores; ``standardised``: the same, standardised.
        metrics: the validation set's metrics of a score array (:meth:`.validation.ValidationSet.metrics`).
        max_members: the largest ensemble.
        tie: shortfalls and objectives closer than this are a tie (:data:`TIE`).
    """
    ranked = sorted(columns, key=lambda n: -next(r["objective"] for r in rows if r["candidate"] == n))
    per_kind = {n: next(r.get("per_kind") for r in rows if r["candidate"] == n) for n in ranked}
    best_of_kind = ({k: max(per_kind[n][k] for n in ranked) for k in per_kind[ranked[0]]}
                    if per_kind[ranked[0]] else {})  # synthetic kinds, or labelled ones named by kind_field
    # each kind's champion (the best-ranked of those tied at the top: several candidates score 1.00 on an easy kind)
    champions = {next(n for n in ranked if per_kind[n][k] >= best) for k, best in best_of_kind.items()}
    pool = list(dict.fromkeys([n for n in ranked if n in champions][:ENSEMBLE_POOL] + ranked))[:ENSEMBLE_POOL]
    options: list[tuple[tuple[str, ...], str, tuple[float, ...] | None]] = [((n,), "mean", None) for n in ranked]
    for k in range(2, min(max_members, len(pool)) + 1):
        for combo in itertools.combinations(pool, k):
            options += [(combo, "mean", None), (combo, "max", None)]
            options += [(combo, "weighted", w) for w in sorted(weight_grid(k), key=lambda w: -sum(w))]
    tried = []
    for order, (combo, rule, weights) in enumerate(options):
        option = {"members": list(combo)}
        if len(combo) > 1:
            option.update(combine=rule, **({"weights": list(weights)} if weights else {}))
        m = metrics(combined_scores(option, columns, standardised))
        if best_of_kind:
            m["shortfall"] = max(best - m["per_kind"][k] for k, best in best_of_kind.items())
        tried.append({**option, **m, "_order": order})
    # first the shortfall where kinds are known, else the objective (labelled anomalies of one kind): near-ties on
    # that first criterion only go to fewer members
    tried.sort(key=lambda t: (round(t["shortfall"] / tie) if best_of_kind else -round(t["objective"] / tie),
                              len(t["members"]), -round(t["objective"] / tie), _SIMPLICITY[t.get("combine", "mean")],
                              -sum(t.get("weights", [])), t["_order"]))
    for t in tried:
        t.pop("_order")
    return tried
