"""Importers for real inspection data that installs from PyPI.

ELPV (``pip install elpv-dataset``): 2,624 electroluminescence images of solar cells (300x300, 8-bit grey)
from Buerhop-Lutz et al. / Deitsch et al., labelled with a defect probability (0, 1/3, 2/3, 1) and the
cell type (mono/poly). Licence CC BY-NC-SA 4.0: the samples point at the image files inside the installed
package; nothing is copied.

Example:
    >>> ds = load_elpv("elpv")
    >>> ds.count_sample_tags()
    {'train': 754, 'test': 1870}
"""

from __future__ import annotations

import os

import numpy as np

import fiftyone as fo


def elpv_root() -> str:
    """Folder of the installed ``elpv-dataset`` package's data (``labels.csv`` and ``images/``).

    Raises:
        ImportError: the package is not installed (the message says how to install it).
    """
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ImportError("the ELPV solar-cell data comes from PyPI: pip install elpv-dataset") from exc
    return os.path.join(os.path.dirname(elpv_dataset.__file__), "data")


def load_elpv(
    name: str = "elpv",
    *,
    fit_fraction: float = 0.5,
    seed: int = 0,
    max_samples: int | None = None,
    persistent: bool = False,
    overwrite: bool = False,
) -> fo.Dataset:
    """Load ELPV into a FiftyOne dataset with ground truth and a normal-only training split.

    Fields: ``defect_probability`` (float), ``ground_truth`` (``fo.Classification``: ``normal`` when the
    probability is 0, else ``anomalous``), ``cell_type`` (``fo.Classification`` mono/poly). Tags: a seeded
    ``fit_fraction`` of the probability-0 cells ``train``; every other cell ``test``.

    Args:
        name: dataset name.
        fit_fraction: share of the normal cells tagged ``train``.
        seed: seed of the split.
        max_samples: keep a stratified random subset of this size (tests); the split is made first.
        persistent: keep the dataset across sessions.
        overwrite: replace an existing dataset of that name (else it is returned as is).
    """
    if fo.dataset_exists(name):
        if not overwrite:
            return fo.load_dataset(name)
        fo.delete_dataset(name)
    root = elpv_root()
    data = np.genfromtxt(os.path.join(root, "labels.csv"), dtype=["|S19", "<f8", "|S4"],
                         names=["path", "probability", "type"])
    paths = [os.path.join(root, p.decode()) for p in data["path"]]
    probs = data["probability"].astype(float)
    types = [t.decode() for t in data["type"]]
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(probs == 0)
    train = set(rng.permutation(normal)[: int(round(fit_fraction * len(normal)))].tolist())
    order = np.arange(len(paths))
    if max_samples is not None and max_samples < len(paths):
        keep = []
        for group in (sorted(train), [i for i in normal if i not in train], np.flatnonzero(probs > 0)):
            k = max(1, int(round(max_samples * len(group) / len(paths))))
            keep.extend(rng.choice(group, size=min(k, len(group)), replace=False).tolist())
        order = np.array(sorted(keep))
    samples = []
    for i in order:
        p = round(float(probs[i]), 4)
        samples.append(fo.Sample(
            filepath=paths[i],
            tags=["train"] if i in train else ["test"],
            defect_probability=p,
            ground_truth=fo.Classification(label="normal" if p == 0 else "anomalous"),
            cell_type=fo.Classification(label=types[i]),
        ))
    dataset = fo.Dataset(name, persistent=persistent)
    dataset.add_samples(samples, progress=False)
    dataset.info["source"] = "elpv-dataset (PyPI), CC BY-NC-SA 4.0; Deitsch et al. 2019, Buerhop-Lutz et al. 2018"
    dataset.info["split"] = {"fit_fraction": fit_fraction, "seed": seed}
    dataset.save()
    return dataset
