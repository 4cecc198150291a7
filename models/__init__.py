"""Model adapters behind small interfaces: anomalib vision experts (and later CLIP and VLM backends).

The core (``fiftyone_anomaly_vlm``) only talks to :class:`VisionExpert`; everything that knows about a
particular library lives here.
"""

from .base import ExpertOutput, VisionExpert
from .anomalib_expert import AnomalibExpert, available_models
from .clip_expert import ClipExpert
from .tiling import TiledExpert, check_tile_settings

__all__ = ["AnomalibExpert", "ClipExpert", "ExpertOutput", "TiledExpert", "VisionExpert", "available_models",
           "check_tile_settings"]
