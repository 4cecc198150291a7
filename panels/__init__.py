"""FiftyOne panels: thin views over the core calls in ``fiftyone_anomaly_vlm``."""

from .review import ReviewPanel

PANELS = [ReviewPanel]


def register(p) -> None:
    """Register every panel of the plugin."""
    for cls in PANELS:
        p.register(cls)
