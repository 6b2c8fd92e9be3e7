"""The edge runtime: sources, the predictor, rendering, sinks and the ``run`` pipeline.

Nothing here imports torch; only :class:`fundus_edge.backends.TorchBackend` does, when a
checkpoint is loaded.
"""

from __future__ import annotations

from fundus_edge.runtime.pipeline import RunConfig, RunSummary, run
from fundus_edge.runtime.predictor import Prediction, Predictor, Prepared
from fundus_edge.runtime.sources import Frame, Skipped, Source, open_source

__all__ = [
    "Frame",
    "Prediction",
    "Predictor",
    "Prepared",
    "RunConfig",
    "RunSummary",
    "Skipped",
    "Source",
    "open_source",
    "run",
]
