"""Human review of scoring runs: what can be reviewed (:mod:`.targets`), the panel's database queries
(:mod:`.queries`), and verdicts with what they feed back (:mod:`.verdicts`). The review panel
(``panels/review.py``) and the ``review_anomalies`` operator are thin wrappers over these functions.

Example:
    >>> import fiftyone_anomaly_vlm as fav
    >>> hist = fav.score_histogram(ds, "padim", gt_field="ground_truth")
    >>> flagged = fav.flagged_view(ds, "padim")
    >>> fav.review(flagged.limit(3), "accept", key="padim", user="qa")
    >>> fav.recalibrate_from_review(ds, "padim", rule="f1")
"""

from ..runs import run_owned_fields
from .queries import create_review_indexes, flagged_view, raw_threshold, run_errors, score_histogram, threshold_counts
from .targets import (FUSED_SUFFIX, ReviewTarget, calibration_of, default_threshold, review_target, run_fields,
                      scoring_runs)
from .verdicts import (REVIEW_FIELD, REVIEWED_TAG, VERDICTS, recalibrate_from_review, recalibration_caution,
                       refit_with_reviewed, review, reviewed_anomalies, reviewed_normals, set_calibrated_threshold,
                       threshold_caution)

__all__ = ["FUSED_SUFFIX", "REVIEWED_TAG", "REVIEW_FIELD", "ReviewTarget", "VERDICTS", "calibration_of",
           "create_review_indexes",
           "default_threshold", "flagged_view", "raw_threshold", "recalibrate_from_review", "recalibration_caution",
           "refit_with_reviewed", "review", "review_target", "reviewed_anomalies", "reviewed_normals", "run_errors",
           "run_fields", "run_owned_fields", "score_histogram", "scoring_runs", "set_calibrated_threshold",
           "threshold_caution", "threshold_counts"]
