"""fundus-edge: the Grad-CAM-augmented retinal multi-disease ensemble, from workstation to edge.

The embedding API for device makers is :class:`fundus_edge.Predictor`::

    from fundus_edge import Predictor

    with Predictor("model.onnx") as predictor:       # .onnx, .engine/.plan or a checkpoint
        result = predictor.predict(frame_rgb_uint8)   # full camera frame, any size
        print(result.positive, result.probability("DR"), result.quality.passed)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Prediction", "Predictor", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from fundus_edge.runtime.predictor import Prediction, Predictor


def __getattr__(name: str) -> Any:
    # Lazy: `import fundus_edge` (and `fundus-edge --help`) must not load OpenCV or ONNX Runtime.
    if name in ("Predictor", "Prediction"):
        from fundus_edge.runtime import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'fundus_edge' has no attribute {name!r}")
