"""The import path of the question-learning names before 0.2: run records stored in users' databases name
``fiftyone_anomaly_vlm.questions.QuestionRunConfig``. The code lives in :mod:`fiftyone_anomaly_vlm.video`
(:mod:`~fiftyone_anomaly_vlm.video.questions`, :mod:`~fiftyone_anomaly_vlm.video.proposers`,
:mod:`~fiftyone_anomaly_vlm.video.learning`).
"""

from .runs import QuestionRun, QuestionRunConfig
from .video import (COMBINE, DEFAULT_QUESTIONS, OPTIMIZER_SYSTEM, VIDEO_SYSTEM, LearnedQuestions, Proposer,
                    QuestionSetResult, combine_questions, frame_windows, joint_prompt, learn_questions,
                    load_questions, make_proposer, optimizer_prompt, parse_questions, question_prompt,
                    question_scores)

__all__ = [
    "COMBINE", "DEFAULT_QUESTIONS", "OPTIMIZER_SYSTEM", "VIDEO_SYSTEM", "LearnedQuestions", "Proposer",
    "QuestionRun", "QuestionRunConfig", "QuestionSetResult", "combine_questions", "frame_windows", "joint_prompt",
    "learn_questions", "load_questions", "make_proposer", "optimizer_prompt", "parse_questions", "question_prompt",
    "question_scores",
]
