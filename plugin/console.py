"""A quiet console: filters for the known, harmless chatter of the libraries the plugin drives.

Fitting and scoring go through anomalib, Lightning, timm and torch, which print deprecation warnings
about their own internals, Lightning's start-up lines ("GPU available: False", "💡 Tip: ... litlogger")
and anomalib's advice to add anomalous validation images (the plugin sets thresholds from held-out
normals itself). None of it is actionable for a user of the plugin, and it buries the lines that are.

:func:`quiet_third_party` filters exactly those messages, matched by message *and* module, so every
other warning (the plugin's own ``ThresholdUncertaintyWarning``, a new warning of any library) still
shows. It is called by the plugin's entry points only: the App / delegated-worker registration
(``register`` in the root ``__init__.py``) and the demo. Importing ``fiftyone_anomaly_vlm`` from a script
changes no filter; call it yourself for the same quiet console:

Example:
    >>> from fiftyone_anomaly_vlm.console import quiet_third_party
    >>> quiet_third_party()
"""

from __future__ import annotations

import logging
import re
import warnings

#: (category, message regex, module regex) of the warnings that are known noise
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"Importing from timm\.models\.layers is deprecated", r"timm\."),
    (FutureWarning, r"The anomalib\.models\.components\.dinov2 package is deprecated", r"anomalib\."),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\."),
    (UserWarning, r"`LightningModule\.configure_optimizers` returned `None`", r"lightning\."),
    (UserWarning, r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\."),
    (UserWarning, r"The '\w+_dataloader' does not have many workers", r"lightning\."),
    (UserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval", r"lightning\."),
)

# Lightning's rank-zero info lines: accelerator inventory, product tips, loop notices
_LIGHTNING_INFO = (
    r"^(GPU|TPU|HPU|IPU) available", r"^💡 Tip:", r"^`Trainer\(val_check_interval=",
    r"^`Trainer\.fit` stopped: `max_epochs=\d+` reached", r"^You are using a CUDA device",
    r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
)

#: logger name -> message regexes of its known-noise records (other records of the logger still show).
#: Lightning's rank-zero helpers log through whichever of these loggers the last imported of ``lightning``,
#: ``lightning_fabric`` (imported by anomalib) and ``pytorch_lightning`` set, so all get the filter.
KNOWN_LOG_LINES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": _LIGHTNING_INFO,
    "lightning.fabric.utilities.rank_zero": _LIGHTNING_INFO,
    "lightning_fabric.utilities.rank_zero": _LIGHTNING_INFO,
    "pytorch_lightning.utilities.rank_zero": _LIGHTNING_INFO,
    "lightning_utilities.core.rank_zero": _LIGHTNING_INFO,
    "lightning.pytorch.trainer.connectors.checkpoint_connector": (r"^`weights_only` was not set",),
    # the plugin calibrates from held-out normals; anomalib's fallback threshold is never used
    "anomalib.metrics.threshold.f1_adaptive_threshold": (
        r"^The validation set does not contain any anomalous images",),
}


class _DropKnown(logging.Filter):
    """Drops the log records whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_third_party() -> None:
    """Install the filters for :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_LINES`.

    Safe to call again (no filter is added twice; warning filters reset by ``warnings.catch_warnings`` are
    put back). Imports nothing heavy: warning filters match by module name, and the log filters attach to
    the named loggers before or after their libraries are imported.
    """
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in KNOWN_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(patterns))
