"""Inference backends, one class per runtime, chosen by the model file's suffix.

``load_backend("model.onnx")`` -> ONNX Runtime, ``"model.engine"`` / ``".plan"`` ->
TensorRT, ``"model.safetensors"`` / ``".pt"`` -> PyTorch. Each module imports its runtime
(onnxruntime, tensorrt, torch) only when a model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fundus_edge.backends.base import CONTRACT_OUTPUTS, INPUT_NAME, Backend
from fundus_edge.backends.onnxruntime import OnnxRuntimeBackend
from fundus_edge.backends.tensorrt import TensorRTBackend
from fundus_edge.backends.torch import TorchBackend
from fundus_edge.errors import UserError

__all__ = [
    "BACKENDS",
    "CONTRACT_OUTPUTS",
    "INPUT_NAME",
    "Backend",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "TorchBackend",
    "backend_for",
    "load_backend",
]

BACKENDS: tuple[type[Backend], ...] = (OnnxRuntimeBackend, TensorRTBackend, TorchBackend)


def backend_for(path: str | os.PathLike) -> type[Backend]:
    """The backend class that loads ``path``, by suffix."""
    suffix = Path(path).suffix.lower()
    for cls in BACKENDS:
        if suffix in cls.suffixes:
            return cls
    known = ", ".join(s for cls in BACKENDS for s in cls.suffixes)
    raise UserError(f"{path}: unknown model type '{suffix}' (expected one of {known})")


def load_backend(path: str | os.PathLike, **options: Any) -> Backend:
    """Load a model with the backend its suffix names.

    Args:
        path: ``.onnx``, ``.engine``/``.plan`` or ``.safetensors``/``.pt``.
        **options: backend options; None values are dropped, so a CLI can pass every
            option it has (``provider=None``). Options another backend owns are an error.

    Returns:
        The loaded :class:`Backend`.
    """
    cls = backend_for(path)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    return cls.load(path, **given)
