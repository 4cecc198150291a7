"""Progress in named phases, in FiftyOne's progress convention.

A long run (a fit: decode, extract features, fit, validate, calibrate) reports each phase through its own
``fiftyone.core.utils.ProgressBar`` handed to the caller's ``progress`` callable, as FiftyOne's own loops do.
Each bar also says which phase it counts (:attr:`PhaseBar.phase`) and carries a ready label
(:attr:`PhaseBar.phase_label`, ``"extracting features: batch 2/4"``), which the App's progress dialog shows
instead of one label for the whole run.

Example:
    >>> with phase_bar(progress, "decoding images", total=30, unit="images") as pb:
    ...     for path in paths:
    ...         pb.update()
"""

from __future__ import annotations

from typing import Any

import fiftyone.core.utils as fou


class PhaseBar(fou.ProgressBar):
    """A ``fou.ProgressBar`` for one phase of a run.

    Args:
        phase: what the phase does (``"extracting features"``).
        unit: what it counts (``"batch"``, ``"images"``); None: just the counts.
        total: how many there are (None: a phase without counts, e.g. fitting a memory bank).
        progress: FiftyOne's progress convention: None/True/False, or a callable taking this bar.
    """

    def __init__(self, phase: str, unit: str | None = None, total: int | None = None, progress: Any = None) -> None:
        self.phase = phase
        self.unit = unit
        super().__init__(total=total, progress=progress, iters_str=unit or "it")

    @property
    def phase_label(self) -> str:
        """``"<phase>: <unit> i/N"`` (or ``"<phase>: i/N"``, or just the phase without a total)."""
        if not self.total:
            return self.phase
        unit = f"{self.unit} " if self.unit == "batch" else ""
        tail = f" {self.unit}" if self.unit and self.unit != "batch" else ""
        return f"{self.phase}: {unit}{self.iteration}/{self.total}{tail}"


def phase_bar(progress: Any, phase: str, total: int | None = None, unit: str | None = None) -> PhaseBar:
    """A :class:`PhaseBar` reporting to ``progress``; a callable hears of it at once (``0/N``, or the phase alone
    without counts), so the phase is named before its first step ends."""
    pb = PhaseBar(phase, unit=unit, total=total, progress=progress)
    if callable(progress):
        progress(pb)
    return pb
