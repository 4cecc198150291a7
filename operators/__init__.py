"""FiftyOne operators: thin forms over the core calls in ``fiftyone_anomaly_vlm``."""

from .clip_expert import CreateClipExpert
from .ensemble import EnsembleExperts
from .evaluate import EvaluateAnomalies
from .evaluate_judge import EvaluateJudge
from .export_expert import ExportExpert, ImportExpert
from .fit_expert import FitExpert
from .judge import JudgeSamples
from .review import ReviewSamples
from .score import ScoreSamples
from .select_experts import SelectExperts
from .video import ScoreVideo

OPERATORS = [FitExpert, ScoreSamples, CreateClipExpert, EvaluateAnomalies, ReviewSamples, JudgeSamples, ScoreVideo,
             EnsembleExperts, SelectExperts, EvaluateJudge, ExportExpert, ImportExpert]


def register(p) -> None:
    """Register every operator of the plugin."""
    for cls in OPERATORS:
        p.register(cls)
