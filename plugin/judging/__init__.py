"""The VLM judge: prompt, answer parsing, expert crops, reference images, score fusion and the run.

``fav.judge`` is :func:`~.run.judge`; this package is named ``judging`` so that the function does not
shadow its own module.

Example:
    >>> from fiftyone_anomaly_vlm.judging import parse_answer
    >>> parse_answer("No. Defect: none. Location: none. Explanation: the part matches.").answer
    'no'
"""

from ..fields import JudgeFieldNames
from .fusion import FUSE_METHODS, fuse_scores
from .job import JudgeJob, backend_spec, build_backend, describe_backend, load_rgb
from .parse import ParsedAnswer, normalize_location, parse_answer
from .prompt import (GRID, QUESTION, SYSTEM, VERDICT_WORDS, build_request, expert_verdict_words,
                     knowledge_for)
from .references import MAX_REFERENCE_POOL, References, cheap_embedding, class_path, class_value
from .regions import CROP_FRACTION, expert_crops, grid_word, read_heatmap, top_regions
from .qa import SUBTASKS, Question, make_questions, parse_choice
from .qa_run import evaluate_judge
from .run import JudgeResults, judge

__all__ = [
    "CROP_FRACTION",
    "FUSE_METHODS",
    "GRID",
    "MAX_REFERENCE_POOL",
    "QUESTION",
    "Question",
    "SUBTASKS",
    "SYSTEM",
    "VERDICT_WORDS",
    "JudgeFieldNames",
    "JudgeJob",
    "JudgeResults",
    "ParsedAnswer",
    "References",
    "backend_spec",
    "build_backend",
    "build_request",
    "cheap_embedding",
    "class_path",
    "class_value",
    "describe_backend",
    "expert_crops",
    "evaluate_judge",
    "expert_verdict_words",
    "fuse_scores",
    "grid_word",
    "judge",
    "knowledge_for",
    "load_rgb",
    "make_questions",
    "normalize_location",
    "parse_answer",
    "parse_choice",
    "read_heatmap",
    "top_regions",
]
