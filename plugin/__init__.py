"""fiftyone-anomaly-vlm: find, explain and review anomalies in FiftyOne datasets.

Example:
    >>> import fiftyone as fo
    >>> import fiftyone_anomaly_vlm as fav
    >>> ds = fo.load_dataset("anomaly-vlm-parts")
    >>> expert = fav.fit_expert(ds.match_tags("train"), model="padim", key="padim", pretrained=False)
    >>> fav.score(ds, expert="padim")
    >>> ds.list_runs()
    ['padim', 'padim_expert']
"""

from .evaluation import evaluate, label_accuracy
from .experts import (CompositeExpert, Expert, create_clip_expert, ensemble_experts, fit_expert, list_experts,
                      load_expert)
from .experts.select import select_experts
from .experts.selection_report import format_selection, selection_markdown, selection_table
from .experts import export_expert, import_expert
from .fields import FieldNames
from .judging import JudgeFieldNames, JudgeResults, judge
from .judging.qa_run import evaluate_judge
from .metrics import image_metrics
from .models import available_models
from .reviewing import (ReviewTarget, create_review_indexes, flagged_view, recalibrate_from_review,
                        refit_with_reviewed, review, review_target, reviewed_anomalies, reviewed_normals, run_fields,
                        score_histogram, scoring_runs, threshold_counts)
from .scoring import ScoreResults, score
from .shards import QueuedShards, resume_shards, shard_states
from .storage import delete_dataset, storage_root
from .thresholds import set_threshold
from .video import (LearnedQuestions, VideoFieldNames, VideoResults, learn_questions, load_questions, score_video,
                    video_frames)

__all__ = [
    "CompositeExpert",
    "Expert",
    "FieldNames",
    "ScoreResults",
    "QueuedShards",
    "create_review_indexes",
    "resume_shards",
    "delete_dataset",
    "storage_root",
    "shard_states",
    "available_models",
    "create_clip_expert",
    "ensemble_experts",
    "evaluate",
    "evaluate_judge",
    "fit_expert",
    "image_metrics",
    "judge",
    "learn_questions",
    "LearnedQuestions",
    "load_questions",
    "JudgeFieldNames",
    "JudgeResults",
    "label_accuracy",
    "list_experts",
    "load_expert",
    "export_expert",
    "import_expert",
    "score",
    "score_video",
    "select_experts",
    "selection_table",
    "selection_markdown",
    "format_selection",
    "set_threshold",
    "flagged_view",
    "recalibrate_from_review",
    "refit_with_reviewed",
    "review",
    "review_target",
    "ReviewTarget",
    "run_fields",
    "reviewed_anomalies",
    "reviewed_normals",
    "score_histogram",
    "scoring_runs",
    "threshold_counts",
    "video_frames",
    "VideoFieldNames",
    "VideoResults",
]
