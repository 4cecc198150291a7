"""Fit an anomalib model on decoded normal images with anomalib's ``Engine``.

The images come from FiftyOne samples already decoded (a list of tensors, or a sequence that decodes them
when read); they become anomalib ``ImageItem`` objects in a datamodule that does no splitting of its own.

Progress: given a callable (FiftyOne's progress convention), a Lightning callback (:func:`phase_callback`)
reports each phase of the fit with its own bar: the training batches (``"extracting features"`` for models that
make one pass, ``"training epoch e/E"`` otherwise), fitting the model between training and validation
(PaDiM's Gaussians, PatchCore's coreset: no counts), and the validation batches.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .efficient_ad import offline_efficient_ad
from .progress import phase_bar


class TensorDataset(torch.utils.data.Dataset):
    """Decoded images as anomalib ``ImageItem`` objects (all normal: ``gt_label = 0``)."""

    def __init__(self, images: Sequence[torch.Tensor], paths: Sequence[str]) -> None:
        from anomalib.data import ImageBatch

        self.images = images  # any sequence: a list of tensors, or images that decode when read
        self.paths = list(paths)
        self.augmentations = None  # set by AnomalibDataModule._update_augmentations (the model's Resize)
        self.collate_fn = ImageBatch.collate

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from anomalib.data import ImageItem

        image = self.images[index].float()
        if self.augmentations is not None:
            image = self.augmentations(image)
        return ImageItem(image=image, gt_label=torch.tensor(0), image_path=self.paths[index])


def make_datamodule(train: TensorDataset, val: TensorDataset, train_batch_size: int, eval_batch_size: int):
    """An anomalib datamodule serving ``train`` and ``val`` (also as its test set) as they are."""
    from anomalib.data import AnomalibDataModule

    class _FiftyOneDataModule(AnomalibDataModule):
        """Train/val sets already decoded from FiftyOne samples; no splitting here."""

        def _setup(self, _stage: str | None = None) -> None:  # pragma: no cover - setup() is overridden
            pass

        def setup(self, stage: str | None = None) -> None:
            self.train_data, self.val_data, self.test_data = train, val, val
            self._update_augmentations()

    return _FiftyOneDataModule(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size, num_workers=0)


def phase_callback(progress: Callable[[Any], None], model_name: str):
    """A Lightning ``Callback`` reporting the phases of a fit to ``progress`` (see the module docs)."""
    from lightning.pytorch.callbacks import Callback

    class _PhaseProgress(Callback):
        def __init__(self) -> None:
            self.bar = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            phase = ("extracting features" if epochs == 1
                     else f"training epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else ""))
            total = trainer.num_training_batches
            self.bar = phase_bar(progress, phase, int(total) if total != float("inf") else None, "batch")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.bar is not None:
                self.bar.update()

        def on_validation_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:  # runs before the model's own hook, which fits memory-bank models
                phase_bar(progress, f"fitting {model_name}")

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            if batch_idx == 0 and not trainer.sanity_checking:
                self.bar = phase_bar(progress, "validating", int(sum(trainer.num_val_batches)), "batch")

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            if self.bar is not None and not trainer.sanity_checking:
                self.bar.update()

    return _PhaseProgress()


def fit_model(
    model: Any,
    device: torch.device,
    train_images: Sequence[torch.Tensor],
    val_images: Sequence[torch.Tensor],
    *,
    train_paths: Sequence[str] | None = None,
    val_paths: Sequence[str] | None = None,
    batch_size: int = 8,
    max_epochs: int | None = None,
    work_dir: str | None = None,
    progress: bool | Callable[[Any], None] = False,
    seed: int | None = None,
) -> None:
    """Fit ``model`` (an ``AnomalibModule``) on ``device``; see :meth:`.AnomalibExpert.fit` for the arguments.

    ``progress``: True shows Lightning's bar; a callable (FiftyOne's progress convention) gets the phases of
    the fit, each as its own :class:`~.progress.PhaseBar` (:func:`phase_callback`).

    The model is left in eval mode on ``device``.
    """
    from anomalib.engine import Engine

    if not train_images:
        raise ValueError("no training images")
    if not val_images:
        raise ValueError("no held-out normal images for calibration")
    train = TensorDataset(train_images, train_paths or [f"train_{i}" for i in range(len(train_images))])
    val = TensorDataset(val_images, val_paths or [f"val_{i}" for i in range(len(val_images))])
    train_bs = 1 if isinstance(model, offline_efficient_ad()) else batch_size
    datamodule = make_datamodule(train, val, train_batch_size=train_bs, eval_batch_size=batch_size)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    trainer_kwargs: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": 1,
        "enable_progress_bar": progress is True,
        "enable_model_summary": False,
    }
    if callable(progress):
        trainer_kwargs["callbacks"] = [phase_callback(progress, type(model).__name__)]
    if max_epochs is not None:
        trainer_kwargs["max_epochs"] = max_epochs
    if work_dir is not None:
        os.makedirs(work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="anomalib-", dir=work_dir) as tmp:
        # anomalib's Engine lets a model's own trainer_arguments win (PaDiM/PatchCore: one epoch).
        engine = Engine(default_root_dir=tmp, **trainer_kwargs)
        if seed is not None:
            from lightning.fabric.utilities.seed import seed_everything

            seed_everything(seed, verbose=False)
        with _quiet_tqdm(progress is not True):
            engine.fit(model=model, datamodule=datamodule)
    model.to(device).eval()


#: progress bars anomalib draws with tqdm inside a fit, whatever the trainer's settings (PatchCore's coreset)
_ANOMALIB_BARS = ("Selecting Coreset Indices",)


@contextlib.contextmanager
def _quiet_tqdm(quiet: bool):
    """Without ``progress=True``, anomalib's own tqdm bars inside a fit stay off the console: what the fit writes
    to ``sys.stderr`` is held and written out after it, less those bars' lines (tqdm reads its ``TQDM_*``
    settings once, at import, so they cannot switch it off here)."""
    if not quiet:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        kept = [line for line in re.split(r"[\r\n]+", held.getvalue())
                if line.strip() and not line.lstrip().startswith(_ANOMALIB_BARS)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
