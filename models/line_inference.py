"""Run an exported expert at the line: score one image with only numpy, pillow and one runtime.

:func:`fiftyone_anomaly_vlm.export_expert` writes a folder holding the model (ONNX, OpenVINO IR or anomalib's
torch export), ``expert.json`` (input size, calibration, thresholds; see :data:`METADATA`) and a copy of this
file as ``infer.py``. This file imports nothing of FiftyOne or of the plugin, and at module level only numpy
and pillow; the runtime of the folder's format is imported when the model is loaded: ``onnxruntime``
(format ``onnx``), ``openvino`` (``openvino``) or ``torch`` (``torch``: anomalib's ``to_torch`` pickles the
whole anomalib model, so unpickling it also needs anomalib installed).

It gives the plugin's decision: the image is decoded and resized as the plugin decodes it, the exported
network returns the raw image score and raw anomaly map (anomalib's pre-processing is inside the exported
graph, its post-processing is replaced by the plugin's calibration), and the calibration recorded at fit
time turns them into the calibrated score (share of known-good samples scoring lower), the label
(``raw score > image threshold``), the heatmap (two fixed anchors) and the mask (``raw map > pixel
threshold``).

Usage::

    python infer.py part.png [--heatmap part_map.png] [--mask part_mask.png] [--group mono]
    python -m fiftyone_anomaly_vlm.models.line_inference /deploy/padim part.png

It prints one JSON line: ``{"image", "raw_score", "score", "label", "anomalous_pixels"}``. ``--heatmap``
writes the calibrated heatmap as a 16-bit PNG (0-65535, the plugin's ``<key>_map`` scale), ``--mask`` the
mask as an 8-bit PNG (255 = anomalous). Composite experts (one expert per group) need ``--group``, the value
of the field that picks the group (:data:`ROUTING`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: the metadata file of an exported folder
METADATA = "expert.json"
#: version of its layout (increases when a reader must change)
FORMAT_VERSION = 1
#: kind of a folder holding one member folder per group (``members/<name>``) and no model of its own
ROUTING = "composite"
#: group name of composite members that score every image (ensembles)
ALL = "*"
# decoding, as the plugin's fiftyone_anomaly_vlm.images decodes
_REDUCE_ABOVE_PIXELS = 4096 * 4096
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
Image.MAX_IMAGE_PIXELS = 16384 * 16384


# ---------------------------------------------------------------------------------------------- calibration
def score_scale(image_scores) -> tuple[np.ndarray, np.ndarray, float]:
    """Sorted calibration scores, their ranks ``i / (n + 1)`` and the scale of the tails."""
    c = np.asarray(image_scores, dtype=np.float64)
    return c, np.arange(1, c.size + 1) / (c.size + 1), float(c.std()) or float(abs(c[-1]) * 0.1) or 1.0


def calibrated_scores(raw, image_scores) -> np.ndarray:
    """Share of the calibration normals' (sorted) ``image_scores`` below each raw score: linear between them,
    hyperbolic tails beyond (strictly increasing, never exactly 0 or 1)."""
    raw = np.asarray(raw, dtype=np.float64)
    c, ranks, scale = score_scale(image_scores)
    out = np.array(np.interp(raw, c, ranks) if c.size > 1 else np.full_like(raw, 0.5), dtype=np.float64)
    lo, hi = raw < c[0], raw > c[-1]
    out[lo] = ranks[0] / (1.0 + (c[0] - raw[lo]) / scale)
    out[hi] = 1.0 - (1.0 - ranks[-1]) / (1.0 + (raw[hi] - c[-1]) / scale)
    return out


def standardized_scores(raw, image_scores) -> np.ndarray:
    """``(raw - median) / std`` of the calibration normals' ``image_scores`` (one normal, or all equal: the scale of
    :func:`calibrated_scores`' tails instead of the std): unlike the calibrated share it keeps
    *how far* beyond the normals a score lies (a changed texture 30 standard deviations out, a faint speck 1),
    which a weighted ensemble (``combine="weighted"``) needs to keep one member's noise below another's alarm."""
    c, _, scale = score_scale(image_scores)  # the tails' scale: the std, else 10 % of the largest, else 1
    return (np.asarray(raw, dtype=np.float64) - float(np.median(c))) / scale


class MemberCombiner:
    """Combines an ensemble's (or a grouped expert's) member outputs into the composite's image scores and maps,
    the one way the plugin (:class:`CompositeExpert`), ``select_experts``' ranking and this file's line inference
    all do it.

    Rules: ``"mean"`` (mean of the members' calibrated scores and [0, 1] maps), ``"max"`` (the highest of each),
    ``"weighted"`` (``weights``-weighted sum of the members' *standardised* scores, weighted mean of the maps);
    a supervised ``head`` (``coef`` per member, ``intercept``) replaces the score by sigmoid(coef . calibrated +
    intercept) (extra logit terms go to :attr:`logit`). ``image_size`` None: scores only.

    Example:
        >>> comb = MemberCombiner(n=4, image_size=(64, 64), rule="max")
        >>> comb.add(range(4), 0, scores_a, None, maps_a); comb.add(range(4), 1, scores_b, None, maps_b)
        >>> score, maps = comb.result()
    """

    def __init__(self, n: int, image_size: tuple[int, int] | None, rule: str | None = "mean",
                 weights=None, head: dict | None = None) -> None:
        self.rule, self.weights, self.head = rule or "mean", weights, head
        self.score_sum, self.score_max, self.count = np.zeros(n), np.full(n, -np.inf), np.zeros(n)
        shape = (n, *image_size) if image_size is not None else None
        self.map_sum = np.zeros(shape) if shape else None
        self.map_max = np.full(shape, -np.inf) if shape else None
        self.logit = np.full(n, float(head["intercept"])) if head else None

    def add(self, idx, j: int, scores, standardised=None, maps=None) -> None:
        """Member ``j``'s calibrated ``scores`` (its ``standardised`` ones under ``"weighted"``) and [0, 1] ``maps``
        for the images ``idx``."""
        idx = np.asarray(list(idx), dtype=int)
        w = float(self.weights[j]) if self.rule == "weighted" else 1.0
        self.score_sum[idx] += w * np.asarray(standardised if self.rule == "weighted" else scores, dtype=np.float64)
        self.score_max[idx] = np.maximum(self.score_max[idx], scores)
        self.count[idx] += w
        if self.logit is not None:
            self.logit[idx] += float(self.head["coef"][j]) * np.asarray(scores, dtype=np.float64)
        if self.map_sum is not None and maps is not None:
            self.map_sum[idx] += w * maps
            self.map_max[idx] = np.maximum(self.map_max[idx], maps)

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The composite's image scores ``(N,)`` and maps ``(N, H, W)`` (None without ``image_size``)."""
        if self.logit is not None:
            score = 1.0 / (1.0 + np.exp(-self.logit))
        elif self.rule == "weighted":
            score = self.score_sum
        else:
            score = self.score_max if self.rule == "max" else self.score_sum / self.count
        if self.map_sum is None:
            return score, None
        return score, self.map_max if self.rule == "max" else self.map_sum / self.count[:, None, None]


def normalized_map(raw_map, low: float, high: float) -> np.ndarray:
    """Raw pixel scores -> [0, 1]: ``low`` (median normal pixel) maps to 0, ``high`` to 1, for every image."""
    return np.clip((np.asarray(raw_map, dtype=np.float64) - low) / (high - low), 0, 1)


# ---------------------------------------------------------------------------------------------- images
def float_array(img: Image.Image) -> np.ndarray:
    """A decoded image as ``(H, W, 3)`` float32 in [0, 1] (16-bit and float images scaled, other modes converted
    to RGB by pillow, alpha dropped)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.int32).astype(np.float32)
        arr = np.clip(arr / (65535.0 if arr.max(initial=0) > 255 else 255.0), 0.0, 1.0)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("image has non-finite pixels; it cannot be scored")
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
    else:
        arr = np.asarray(img if mode == "RGB" else img.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr


def resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` float32 -> ``size`` ``(height, width)``, per channel with pillow's antialiased bilinear
    filter (the filter torchvision's ``antialias=True`` reproduces)."""
    if arr.shape[:2] == tuple(size):
        return arr
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, k], dtype=np.float32)).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32) for k in range(arr.shape[2])]
    return np.stack(chans, axis=2)


def load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` as the plugin does (JPEG draft, EXIF orientation, huge images reduced) -> ``(3, H, W)`` float32 in [0, 1]."""
    with Image.open(path) as img:
        img.draft("RGB", (size[1] * 2, size[0] * 2))
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is read as "as stored"
            orientation = 1
        if orientation != 1:
            img = ImageOps.exif_transpose(img)  # upright, as the plugin and the App show it
        n_pixels = img.width * img.height
        if n_pixels > _REDUCE_ABOVE_PIXELS and img.mode not in _WIDE_MODES:
            img = img.reduce(int(np.sqrt(n_pixels / _REDUCE_ABOVE_PIXELS)) + 1)
        else:
            img.load()
        arr = float_array(img)
    return np.clip(resize(arr, size), 0.0, 1.0).transpose(2, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- runtimes
def _onnx_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    return lambda x: dict(zip(names, session.run(None, {input_name: x})))


def _openvino_runner(path: Path):
    import openvino as ov

    # f32: on CPUs with bf16/AMX units OpenVINO otherwise runs in bf16 (scores off by up to a few %)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = [(o.get_any_name(), o) for o in compiled.outputs]
    return lambda x: (lambda res: {name: res[o] for name, o in outputs})(compiled(x))


def _torch_runner(path: Path):
    import torch

    model = torch.load(path, map_location="cpu", weights_only=False)["model"].eval()  # anomalib's to_torch file

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
        return {k: v.float().numpy() for k, v in out._asdict().items() if isinstance(v, torch.Tensor)}

    return run


RUNNERS = {"onnx": _onnx_runner, "openvino": _openvino_runner, "torch": _torch_runner}


# ---------------------------------------------------------------------------------------------- experts
class LineExpert:
    """An exported expert folder, loaded. ``predict(x)`` takes ``(N, 3, H, W)`` float32 images in [0, 1] at
    :attr:`image_size`; composite folders also take each image's group (``groups``).

    Raises:
        ValueError: a folder without a readable ``expert.json`` or of a newer layout.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / METADATA
        if not meta_path.is_file():
            raise ValueError(f"{self.folder} is not an exported expert folder (no {METADATA})")
        self.meta = json.loads(meta_path.read_text())
        if int(self.meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{meta_path} has layout {self.meta['format_version']}; this reader knows "
                             f"{FORMAT_VERSION}: use the infer.py exported with it")
        self.image_size = tuple(int(s) for s in self.meta["input"]["size"])
        cal = self.meta["calibration"]
        self.image_scores = np.asarray(cal["image_scores"], dtype=np.float64)
        self.map_low, self.map_high = float(cal["map_low"]), float(cal["map_high"])
        self.image_threshold = float(self.meta["threshold"]["image"])
        self.pixel_threshold = float(self.meta["threshold"]["pixel"])
        self.kind = self.meta["kind"]
        if self.kind == ROUTING:
            self.group_field = self.meta["routing"]["group_field"]
            self.members = {group: [LineExpert(self.folder / "members" / name) for name in names]
                            for group, names in self.meta["routing"]["groups"].items()}
        else:
            self.run = RUNNERS[self.meta["format"]](self.folder / self.meta["model_file"])

    def raw(self, x: np.ndarray, groups: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw image scores ``(N,)`` and raw maps ``(N, H, W)`` (a composite: the mean, or with ``routing.combine``
        ``"max"`` the highest, of its members' calibrated outputs; ``"weighted"``: the weighted sum of their
        standardised scores and the weighted mean of their maps)."""
        if self.kind == ROUTING:
            return self._composite_raw(x, groups)
        out = self.run(np.ascontiguousarray(x, dtype=np.float32))
        amap = out.get("anomaly_map")
        score = out.get("pred_score")
        score = np.amax(amap, axis=(-2, -1)) if score is None else score
        score = np.asarray(score, dtype=np.float32).reshape(-1)
        amap = np.broadcast_to(score[:, None, None], (len(score), *self.image_size)) if amap is None else amap
        return score, np.asarray(amap, dtype=np.float32).reshape(len(score), *np.shape(amap)[-2:])

    def _composite_raw(self, x: np.ndarray, groups: list | None) -> tuple[np.ndarray, np.ndarray]:
        n = x.shape[0]
        if self.group_field is None:
            keys = [ALL] * n
        else:
            if groups is None or len(groups) != n:
                raise ValueError(f"this expert routes on field {self.group_field!r}: give each image's group "
                                 f"(--group; groups: {sorted(self.members)})")
            keys = [str(g) for g in groups]
            unknown = sorted({g for g in keys if g not in self.members})
            if unknown:
                raise ValueError(f"no expert for {self.group_field} = {unknown} (groups: {sorted(self.members)})")
        routing = self.meta["routing"]  # folders exported before the rules have no "combine": the mean
        comb = MemberCombiner(n, self.image_size, routing.get("combine"), routing.get("weights"), routing.get("head"))
        for key in dict.fromkeys(keys):
            idx = [i for i, g in enumerate(keys) if g == key]
            for j, member in enumerate(self.members[key]):
                raw, raw_map = member.raw(x[idx])
                comb.add(idx, j, calibrated_scores(raw, member.image_scores),
                         standardized_scores(raw, member.image_scores) if comb.rule == "weighted" else None,
                         normalized_map(raw_map, member.map_low, member.map_high))
        score, maps = comb.result()
        return score.astype(np.float32), maps.astype(np.float32)

    def predict(self, x: np.ndarray, groups: list | None = None) -> dict[str, np.ndarray]:
        """``raw_score``, ``score`` (calibrated), ``label`` (True: anomalous), ``heatmap`` ([0, 1]), ``mask``."""
        raw, raw_map = self.raw(x, groups)
        return {"raw_score": raw, "score": calibrated_scores(raw, self.image_scores),
                "label": raw > self.image_threshold, "heatmap": normalized_map(raw_map, self.map_low, self.map_high),
                "mask": raw_map > self.pixel_threshold}

    def predict_path(self, path: str, group=None) -> dict[str, np.ndarray]:
        """:meth:`predict` for one image file."""
        return self.predict(load_image(path, self.image_size)[None], None if group is None else [group])


def main(argv: list[str] | None = None) -> int:
    """Command line: score one image with an exported folder (this file's own folder when run as infer.py)."""
    here = Path(__file__).resolve().parent
    standalone = (here / METADATA).is_file()
    parser = argparse.ArgumentParser(description="Score an image with an exported anomaly expert.")
    if not standalone:
        parser.add_argument("folder", help="the exported expert folder")
    parser.add_argument("image", help="image file")
    parser.add_argument("--heatmap", help="write the calibrated heatmap here (16-bit PNG)")
    parser.add_argument("--mask", help="write the anomaly mask here (8-bit PNG, 255 = anomalous)")
    parser.add_argument("--group", help="the image's group (composite experts)")
    args = parser.parse_args(argv)
    try:
        expert = LineExpert(here if standalone else args.folder)
        out = expert.predict_path(args.image, args.group)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = "anomalous" if bool(out["label"][0]) else "normal"
    if args.heatmap:
        Image.fromarray((out["heatmap"][0] * 65535 + 0.5).astype(np.uint16)).save(args.heatmap)
    if args.mask:
        Image.fromarray(out["mask"][0].astype(np.uint8) * 255).save(args.mask)
    print(json.dumps({"image": args.image, "raw_score": float(out["raw_score"][0]), "score": float(out["score"][0]),
                      "label": label, "anomalous_pixels": float(out["mask"][0].mean())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
