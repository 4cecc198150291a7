"""Video anomaly scoring: frame scores from an image expert and/or VLM questions, smoothed over time,
anomalous stretches as temporal detections on the App's timeline.

Frames are sampled at a chosen rate with FiftyOne's own video tooling (``to_frames(sample_frames=True)``,
which runs ``ffmpeg``; frame images are kept under the plugin's folder and recorded in ``frames.filepath``;
:mod:`.frames`). Each sampled frame is scored (:mod:`.scorer`) by

- a fitted image expert (:func:`~fiftyone_anomaly_vlm.fit_expert`, e.g. fitted on the frames of normal
  videos: ``fit_expert(video_frames(ds.match_tags("train"), fps=4), ...)``): its calibrated score, and/or
- a VLM through the judge backends, asked VERA-style guiding questions (:mod:`.questions`): P(yes) per
  question, frame score = max or mean over the questions (or one joint question). Video-capable models see
  ``frames_per_prompt`` consecutive frames per request; image-only models one frame. Question sets can be
  learned on labelled videos (:mod:`.learning`, with an optimizer LLM from :mod:`.proposers`).

With both, the frame score is the mean of the two. Frame scores are smoothed over time (:mod:`.timeline`: a
uniform or Gaussian window of ``window`` sampled frames; frames that failed are skipped, not counted as
zeros, as in VERA's temporal smoothing); runs of smoothed scores at or above the threshold become segments,
whose ends are refined by the unsmoothed scores (smoothing decides *whether*, the frame scores *where*).

Fields written under the run key ``K`` (see :class:`~fiftyone_anomaly_vlm.fields.VideoFieldNames`):

- frames: ``frames.K`` (``fo.Classification`` normal/anomalous at the threshold), ``frames.K_score``
  (smoothed), ``frames.K_raw_score`` (before smoothing), ``frames.K_expert_score``, ``frames.K_vlm_score``,
  ``frames.K_question_scores`` (P(yes) per question, in the run's question order), ``frames.K_error``
  (why a sampled frame could not be scored, e.g. it could not be decoded);
- videos: ``K`` (``fo.Classification``), ``K_score`` (max smoothed frame score), ``K_segments``
  (``fo.TemporalDetections``, label ``"anomalous"``, ``support`` in frame numbers, ``confidence`` = peak
  score, attributes ``explanation``, ``peak_frame``, ``top_question``), ``K_error`` (a video with no
  decodable frame).

The run goes through the one run engine (:mod:`.run`): it is recorded (questions, rate, window, threshold,
expert, backend), ``delete_run`` removes every field, a run that was killed resumes (videos that already
have ``K_score`` are skipped) and ``overwrite`` clears the old sample and frame values first.

Example:
    >>> fav.fit_expert(fav.video_frames(ds.match_tags("train"), fps=4), key="frames_padim")
    >>> res = fav.score_video(ds, key="vid", expert="frames_padim", fps=4, window=5)
    >>> ds.first().vid_segments.detections[0].support
    [13, 24]
"""

from ..fields import VideoFieldNames
# the run classes' import path of releases before 0.2 (stored in users' databases)
from ..runs import VideoAnomalyRun, VideoAnomalyRunConfig
from .frames import (NOT_EXTRACTED, SampledVideo, check_video_collection, extract_frames, load_frame_images,
                     video_frames)
from .learning import LearnedQuestions, QuestionJob, QuestionSetResult, learn_questions, load_questions
from .proposers import OPTIMIZER_SYSTEM, Proposer, make_proposer, optimizer_prompt, parse_questions
from .questions import (COMBINE, DEFAULT_QUESTIONS, VIDEO_SYSTEM, combine_questions, frame_windows, joint_prompt,
                        question_prompt, question_scores)
from .run import VideoJob, VideoResults, resolve_questions, score_video
from .scorer import FrameScorer, FrameScores
from .timeline import SMOOTHING, find_segments, segment_support, smooth_scores

__all__ = [
    "COMBINE", "DEFAULT_QUESTIONS", "NOT_EXTRACTED", "OPTIMIZER_SYSTEM", "SMOOTHING", "VIDEO_SYSTEM", "FrameScorer",
    "FrameScores", "LearnedQuestions", "Proposer", "QuestionJob", "QuestionSetResult", "SampledVideo",
    "VideoAnomalyRun", "VideoAnomalyRunConfig", "VideoFieldNames", "VideoJob", "VideoResults",
    "check_video_collection", "combine_questions", "extract_frames", "find_segments", "frame_windows",
    "joint_prompt", "learn_questions", "load_frame_images", "load_questions", "make_proposer", "optimizer_prompt",
    "parse_questions", "question_prompt", "question_scores", "resolve_questions", "score_video", "segment_support",
    "smooth_scores", "video_frames",
]
