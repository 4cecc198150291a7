"""FiftyOne run records of every run kind, typed.

Every run is an ordinary FiftyOne run (``dataset.list_runs()``, ``get_run_info``, ``rename_run``,
``delete_run``); its kind is its ``method`` (:data:`SCORE_METHOD`, :data:`JUDGE_METHOD`...), found with
:func:`runs_of`. Configs are typed classes with named parameters (one module per kind); recorded configs
are changed only through :func:`update_run_config`. Deleting a run removes every field it wrote (frame
fields too) and the files the plugin made for it.

The classes keep their import path ``fiftyone_anomaly_vlm.runs.<Class>`` (earlier releases stored it in
users' databases), so runs recorded before still load, list, re-threshold, score and delete.

Example:
    >>> runs_of(dataset, SCORE_METHOD)
    ['padim']
    >>> dataset.get_run_info("padim").config.expert
    'padim'
    >>> dataset.delete_run("padim")   # removes padim, padim_score, padim_map, padim_mask, padim_error...
"""

from .base import (CLIP_METHOD, COMPOSITE_METHOD, EVALUATION_METHOD, EXPERT_METHOD, EXPERT_METHODS, JUDGE_METHOD,
                   QUESTIONS_METHOD, SCORE_METHOD, VIDEO_METHOD, AnomalyRunConfig, FieldsRun, recorded_config,
                   remove_owned_dir, run_method, run_owned_fields, runs_of, update_run_config)
from .evaluation import AnomalyEvaluationRun, AnomalyEvaluationRunConfig
from .expert import (EXPERT_RUN_SUFFIX, EXPERT_STATE, ExpertRun, ExpertRunConfig, ExpertRunResults, delete_expert_runs,
                     expert_run_key, expert_state, register_expert_run)
from .judge import JudgeRun, JudgeRunConfig
from .judge_eval import JUDGE_EVAL_METHOD, JudgeEvalRun, JudgeEvalRunConfig, JudgeEvalRunResults
from .score import AnomalyScoreRun, AnomalyScoreRunConfig
from .video import QuestionRun, QuestionRunConfig, VideoAnomalyRun, VideoAnomalyRunConfig

__all__ = [
    "AnomalyEvaluationRun", "AnomalyEvaluationRunConfig", "AnomalyRunConfig", "AnomalyScoreRun",
    "AnomalyScoreRunConfig", "CLIP_METHOD", "COMPOSITE_METHOD", "EVALUATION_METHOD", "EXPERT_METHOD",
    "EXPERT_METHODS", "EXPERT_RUN_SUFFIX", "JUDGE_EVAL_METHOD", "JudgeEvalRun", "JudgeEvalRunConfig",
    "JudgeEvalRunResults", "EXPERT_STATE", "ExpertRun", "ExpertRunConfig", "ExpertRunResults", "FieldsRun", "JUDGE_METHOD", "JudgeRun",
    "JudgeRunConfig", "QUESTIONS_METHOD", "QuestionRun", "QuestionRunConfig", "SCORE_METHOD", "VIDEO_METHOD",
    "VideoAnomalyRun", "VideoAnomalyRunConfig", "delete_expert_runs", "expert_run_key", "expert_state", "register_expert_run",
    "recorded_config", "remove_owned_dir", "run_method", "run_owned_fields", "runs_of", "update_run_config",
]
