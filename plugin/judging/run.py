"""``judge()``: ask a vision-language model whether each sample is anomalous, which defect, where and why.

For every sample a :class:`~fiftyone_anomaly_vlm.models.judge.JudgeRequest` is built from switchable
prompt parts (each recorded in the run config), sent in batches to a backend (local ``transformers`` or an
OpenAI-compatible server), and the answer is written under the run key ``K``
(:class:`~fiftyone_anomaly_vlm.fields.JudgeFieldNames`):

- ``K`` (``fo.Classification``): ``"anomalous"`` / ``"normal"`` from P(yes) of the first answer token, or
  ``"unparsed"`` when the answer does not start with yes/no (the raw text is kept, the run goes on);
  attributes ``p_anomalous``, ``answered_mass`` (probability on the yes/no tokens: how much the model really
  answered the question) and ``reference_id`` (the normal image shown, if any);
- ``K_p_anomalous`` (float), ``K_defect`` and ``K_location`` (``fo.Classification``; the location is one of
  the 3x3 grid words or ``"none"``), ``K_explanation`` (str), ``K_answer`` (the raw answer text),
  ``K_regions`` (``fo.Detections``: the expert regions shown as crops), ``K_error`` (str, per sample);
- ``K_fused`` (float, with an expert): the expert's calibrated score and P(anomalous) combined by rank
  average (the expert's rank among its calibration normals, P(anomalous) on its own scale) or by averaging
  their log-odds; per sample, so a run split into parts fuses as the whole view would.

Prompt parts (Triad, MoXpert, Anomaly-OV; see the README for when they help):
``crops`` (the top regions of the expert's ``<expert>_map`` around its local maxima, given with the full
image), ``reference`` (a normal image of the same product), ``knowledge`` (product/defect text, per class),
``use_expert_verdict`` (the expert's calibrated score in words). The shared parts (system text, knowledge,
reference image) come first so servers can reuse the cached prefix.

The run itself (key checks, lease, overwrite, registration, resume, prefetch, ordered writes, cancel) is
the :mod:`engine <fiftyone_anomaly_vlm.engine>`'s; :class:`~.job.JudgeJob` describes a batch.

Example:
    >>> from fiftyone_anomaly_vlm.models.judge import make_backend
    >>> backend = make_backend("transformers", model="/models/Qwen2-VL-2B-Instruct", max_pixels=448 * 448)
    >>> results = fav.judge(ds, key="vlm", backend=backend, expert="padim", reference="auto")
    >>> ds.first()["vlm"].label, ds.first()["vlm_location"].label, ds.first()["vlm_explanation"]
    ('anomalous', 'top left', 'A thin dark scratch crosses the upper left corner.')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine import check_collection, check_key, check_positive_int, queue_run_shards, run_job
from ..fields import FieldNames, JudgeFieldNames
from ..models.judge.base import JudgeBackend
from ..runs import JUDGE_METHOD, SCORE_METHOD
from ..shards import QueuedShards, check_shard
from .fusion import FUSE_METHODS
from .job import JudgeJob, backend_spec, build_backend
from .prompt import SYSTEM
from .regions import CROP_SOURCES

#: the judge operator that ``judge(..., shards=N)`` queues (``fiftyone.yml``'s plugin name / operator name)
JUDGE_OPERATOR = "@anomaly-vlm/anomaly-vlm/judge_anomalies"
@dataclass
class JudgeResults:
    """What a :func:`judge` call did.

    Attributes:
        key: the run key.
        fields: the :class:`JudgeFieldNames` written.
        num_samples: samples in the view.
        num_judged: samples answered by this call (parsed or not).
        num_skipped: samples already judged under this key (resume).
        num_not_flagged: samples left out by ``only_flagged``.
        num_errors: samples that got ``K_error`` in this call.
        num_unparsed: answers with no yes/no first word (label ``"unparsed"``).
        num_anomalous: samples of the view the VLM labelled anomalous (after this call).
        errors: sample id -> message.
    """

    key: str
    fields: JudgeFieldNames
    num_samples: int
    num_judged: int = 0
    num_skipped: int = 0
    num_not_flagged: int = 0
    num_errors: int = 0
    num_unparsed: int = 0
    num_anomalous: int = 0
    errors: dict[str, str] = field(default_factory=dict)


def judge(
    samples,
    key: str = "vlm",
    *,
    backend: JudgeBackend | Mapping[str, Any],
    expert: str | None = None,
    reference: str | None = None,
    knowledge: str | Mapping[str, str] | None = None,
    class_field: str | None = None,
    crops: int = 3,
    use_expert_verdict: bool = True,
    only_flagged: bool = False,
    batch_size: int = 8,
    fuse: str = "rank",
    max_new_tokens: int = 96,
    system: str = SYSTEM,
    overwrite: bool = False,
    prefetch: int | None = None,
    crop_source: str = "maxima",
    progress: bool | Any = None,
    shard: tuple[int, int] | None = None,
    shards: int | None = None,
) -> JudgeResults | QueuedShards:
    """Ask a VLM whether each sample is anomalous, which defect, where and why; record the run ``key``.

    Args:
        samples: a dataset or view of images.
        key: run key and field prefix (see :class:`JudgeFieldNames`).
        backend: a :class:`~fiftyone_anomaly_vlm.models.judge.JudgeBackend` (see ``make_backend``), or
            ``make_backend``'s arguments as a dict (``{"name": "openai", "base_url": [...], "model": ...}``):
            built here, or, with ``shards``, sent as is to the workers (no model loaded here; a server's API key
            is read where the workers run, from ``api_key_env``).
        expert: key of a scoring run (:func:`score`); its ``<expert>_map`` gives the crops, its
            ``<expert>_score`` the verdict in words and the fused score. None: full image only.
        reference: a normal image to compare with: a sample id, a tag (the nearest tagged sample by a cheap
            embedding), ``"auto"`` (the nearest sample the expert labelled normal; without an expert, tagged
            ``good``/``normal``), or None. With ``class_field``, references come from the same class.
        knowledge: product/defect knowledge: one text for all, a dict ``{class: text}`` (``"default"`` as
            fallback), or the name of a sample field holding the text.
        class_field: sample field with the product class (str or ``fo.Classification``); named in the prompt.
        crops: number of expert regions cut out around the map's local maxima (0: none; needs ``expert``).
        use_expert_verdict: tell the model the expert's verdict in words ("highly suspicious"...).
        only_flagged: judge only samples the expert labelled anomalous.
        batch_size: requests per backend call (and per database write).
        fuse: ``"rank"`` or ``"logistic"``, how ``K_fused`` combines the expert score and P(anomalous)
            (:func:`~.fusion.fuse_scores`; either way independent of the other samples judged).
        max_new_tokens: answer length budget.
        system: the system text (placed first).
        overwrite: judge the samples again: the run's old values on them are cleared first, whatever model
            wrote them; by default samples already judged under ``key`` are skipped, so an interrupted run
            resumes.
        prefetch: batches prepared ahead in a worker thread (images read, crops cut, reference chosen,
            the backend's processor run) while the backend answers the current one; 0: no overlap. None:
            1, except for a local model on the CPU (0), where both halves would compete for the same cores,
            and a server backend, whose requests are sent as a batch is prepared: enough batches to keep its
            whole window busy (``1 + max_in_flight / batch_size``; with servers, ``batch_size`` 32 or more
            also spreads the database writes over more samples).
        crop_source: ``"maxima"`` (crops around the expert map's highest local maxima) or ``"regions"`` (the
            expert run's defect regions ``<expert>_regions``, most anomalous first, each with a margin; a sample
            without regions falls back to maxima).
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.
        shard: ``(index, count)``: judge only that shard of ``samples`` (a hash of the sample id, see
            :mod:`~fiftyone_anomaly_vlm.shards`), e.g. from your own job scheduler; every shard writes the one
            run ``key``; the one that completes the set counts the anomalous samples of the whole view (each
            sample's ``K_fused`` is its own, whichever shard judged it).
        shards: queue this many delegated operations, one per shard, and return at once
            (:class:`~fiftyone_anomaly_vlm.shards.QueuedShards`); ``fiftyone delegated launch`` workers run them,
            each building the backend from its arguments (:meth:`~fiftyone_anomaly_vlm.models.judge.JudgeBackend.spec`).

    Returns:
        :class:`JudgeResults` with counts (of the shard, for ``shard``), or
        :class:`~fiftyone_anomaly_vlm.shards.QueuedShards` for ``shards``.

    Raises:
        ValueError: empty view, bad key or batch size, unknown expert run, a ``key`` used by another kind of
            run or by another model (without ``overwrite``), no candidate reference, bad ``fuse``.
        TypeError: ``backend`` is neither a ``JudgeBackend`` nor a dict.
        BackendUnavailable: the backend's pre-check failed (e.g. the server cannot be reached); nothing recorded.
        RunBusyError: another process is writing the run ``key``.
    """
    n_total = check_collection(samples, "judge")
    key = check_key(key)
    if shard is not None:
        shard = check_shard(shard)
    batch_size = check_positive_int("batch_size", batch_size)
    if crop_source not in CROP_SOURCES:
        raise ValueError(f"crop_source must be one of {list(CROP_SOURCES)}, got {crop_source!r}")
    if fuse not in FUSE_METHODS:
        raise ValueError(f"fuse must be 'rank' or 'logistic', got {fuse!r}")
    # a TypeError / bad dict before any write; with shards, what the workers build the backend from
    spec = backend_spec(backend) if shards is not None or not isinstance(backend, JudgeBackend) else None
    dataset = samples._root_dataset
    if expert is not None:
        if (expert not in dataset.list_runs()
                or getattr(dataset.get_run_info(expert).config, "method", None) != SCORE_METHOD):
            raise ValueError(f"expert {expert!r} is not a scoring run on this dataset; run fav.score first")
        if expert == key:
            raise ValueError("the judge run needs its own key (not the expert's)")
        if crop_source == "regions" and crops and FieldNames(expert).regions not in dataset.get_field_schema():
            raise ValueError(f"expert run {expert!r} has no regions ({FieldNames(expert).regions}): score again "
                             "or run fav.set_threshold on it, or use crop_source='maxima'")
    elif only_flagged:
        raise ValueError("only_flagged needs an expert (the samples it labelled anomalous)")
    if class_field is not None and class_field not in dataset.get_field_schema():
        raise ValueError(f"class_field {class_field!r} is not a field of this dataset")
    if shards is not None:
        args = dict(expert=expert, reference=reference, knowledge=dict(knowledge) if isinstance(knowledge, Mapping)
                    else knowledge, class_field=class_field, crops=crops, use_expert_verdict=use_expert_verdict,
                    only_flagged=only_flagged, batch_size=batch_size, fuse=fuse, max_new_tokens=max_new_tokens,
                    system=system, prefetch=prefetch, crop_source=crop_source)
        names = JudgeFieldNames(key)
        return queue_run_shards(samples, JUDGE_METHOD, names.specs(), names.label, JUDGE_OPERATOR,
                                dict(args=args, backend_spec=spec), key, shards, shard, overwrite)
    backend = build_backend(backend)
    backend.check()  # an unreachable server fails here, once, before a run is recorded
    job = JudgeJob(samples, key, backend, expert=expert, reference=reference, knowledge=knowledge,
                   class_field=class_field, crops=crops, use_expert_verdict=use_expert_verdict,
                   only_flagged=only_flagged, batch_size=batch_size, fuse=fuse, max_new_tokens=max_new_tokens,
                   system=system, prefetch=prefetch, crop_source=crop_source)
    stats = run_job(samples, job, key, overwrite=overwrite, progress=progress, shard=shard)
    return JudgeResults(
        key=key, fields=job.names, num_samples=n_total, num_judged=stats.num_done, num_skipped=stats.num_skipped,
        num_not_flagged=stats.num_samples - stats.num_selected, num_errors=stats.num_errors,
        num_unparsed=stats.counts["unparsed"], num_anomalous=stats.counts["anomalous"], errors=stats.errors,
    )
