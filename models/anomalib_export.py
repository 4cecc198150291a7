"""anomalib's own export and checkpoint formats, for taking experts to the line and bringing models in.

Export goes through ``AnomalibModule.to_onnx`` / ``to_openvino`` / ``to_torch`` (anomalib's export; nothing is
re-implemented here). The exported network is anomalib's pre-processor (resize + normalisation, in the graph)
and torch model, without anomalib's post-processor: the plugin replaces that with its normal-only calibration,
which :mod:`.line_inference` applies at the line from the exported ``expert.json``. The input size is fixed
(the expert's ``image_size``): anomalib 2.7 exports ONNX with PyTorch's dynamo exporter only (its legacy path
is gone) and dynamic spatial axes are what fails there (anomalib #3398); the batch axis stays dynamic.

Import reads anomalib's two model files: a Lightning ``.ckpt`` (``Engine.fit`` writes it; the plugin's own
add ``fav_model_class``) and a ``to_torch`` ``.pt`` (the pickled module under ``"model"``).

Example:
    >>> files = export_model(expert, "/deploy/padim", "onnx")        # ["model.onnx"]
    >>> model, class_path = read_model_file("/models/padim.ckpt")
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .anomalib_build import model_classes, name_key

#: format -> the packages it needs to export and to run (the ``export`` extra installs them)
FORMAT_PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino"),
                   "torch": ()}
FORMATS = tuple(FORMAT_PACKAGES)
#: format -> the model file in the exported folder (OpenVINO also writes ``model.bin``)
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torch": "model.pt"}


def check_format(fmt: str) -> None:
    """Raise a clear error for an unknown format or one whose packages are not installed.

    Raises:
        ValueError: unknown format.
        ModuleNotFoundError: a package the format needs is missing (the message says what to install).
    """
    if fmt not in FORMAT_PACKAGES:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    missing = [p for p in FORMAT_PACKAGES[fmt] if importlib.util.find_spec(p) is None]
    if missing:
        raise ModuleNotFoundError(f"format {fmt!r} needs {', '.join(missing)}: pip install "
                                  "'fiftyone-anomaly-vlm[export]' (onnx, onnxscript, onnxruntime, openvino)")


def export_model(model: Any, image_size: tuple[int, int], folder: str | Path, fmt: str) -> list[str]:
    """Export an ``AnomalibModule`` with anomalib's exporter for ``fmt`` into ``folder``; returns the file names.

    The module is copied to the CPU without its post-processor, so the exported network returns the raw image
    score and raw anomaly map (see the module docs); ``model`` itself is left as it is.
    """
    net = copy.deepcopy(model).cpu().eval()
    net.post_processor = None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = (int(image_size[0]), int(image_size[1]))
    with tempfile.TemporaryDirectory(prefix="fav-export-") as tmp:
        if fmt == "onnx":
            path = net.to_onnx(tmp, input_size=size)
        elif fmt == "openvino":
            path = net.to_openvino(tmp, input_size=size)
        elif fmt == "torch":
            path = net.to_torch(tmp)
        else:
            raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
        names = []
        for src in sorted(Path(path).parent.iterdir()):  # e.g. model.xml + model.bin, model.onnx (+ .data)
            shutil.move(str(src), folder / src.name)
            names.append(src.name)
    return names


def read_model_file(path: str | Path, model: str | None = None) -> tuple[Any, str]:
    """Load an anomalib model file (Lightning ``.ckpt`` or ``to_torch`` ``.pt``) on the CPU, in eval mode.

    Args:
        path: the file.
        model: the anomalib model name, for checkpoints that do not record their class (``Engine.fit``'s do
            not; the class is then inferred from the checkpoint's hyper-parameters when only one fits).

    Returns:
        ``(module, class path)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch file (corrupt, truncated, something else), a module that is not an anomalib
            model, a class anomalib does not know, or a checkpoint that does not fit the class.
    """
    from anomalib.models.components import AnomalibModule

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a readable model file"
        raise ValueError(f"{path} is not a readable anomalib checkpoint (Lightning .ckpt or to_torch .pt): "
                         f"{type(exc).__name__}: {exc}") from exc
    if isinstance(content, dict) and "model" in content and "state_dict" not in content:  # to_torch
        module = content["model"]
        if not isinstance(module, AnomalibModule):
            raise ValueError(f"{path} holds a {type(module).__name__}, not an anomalib model")
        return module.eval(), class_path(type(module))
    if not (isinstance(content, dict) and "state_dict" in content):
        raise ValueError(f"{path} is not an anomalib checkpoint: no state_dict (Lightning .ckpt) or model "
                         "(to_torch .pt) in it")
    klass = _checkpoint_class(path, content, model)
    try:
        module = klass.load_from_checkpoint(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - missing/unexpected keys, shape mismatches, bad hyper-parameters
        raise ValueError(f"{path} does not load as anomalib's {klass.__name__}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]}") from exc
    return module.eval(), class_path(klass)


def class_path(klass: type) -> str:
    """``module.QualName`` of a class."""
    return f"{klass.__module__}.{klass.__qualname__}"


def _checkpoint_class(path: Path, content: dict, model: str | None) -> type:
    classes = model_classes()
    if model is not None:
        if name_key(model) not in classes:
            raise ValueError(f"unknown anomalib model {model!r}; available: {', '.join(sorted(classes))}")
        return classes[name_key(model)]
    recorded = content.get("fav_model_class")
    if recorded:
        module_name, _, name = recorded.rpartition(".")
        return getattr(importlib.import_module(module_name), name)
    hparams = set(dict(content.get("hyper_parameters") or {}))
    fits = [k for k, c in classes.items() if hparams <= set(inspect.signature(c.__init__).parameters)]
    if len(fits) == 1:
        return classes[fits[0]]
    if not fits:
        raise ValueError(f"{path} holds a model anomalib does not know (hyper-parameters {sorted(hparams)} fit "
                         "no anomalib image model); pass model=<name> if it is one")
    raise ValueError(f"{path} does not record its model class and its hyper-parameters fit {', '.join(fits)}; "
                     "pass model=<name>")
