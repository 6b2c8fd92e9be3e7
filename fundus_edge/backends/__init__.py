"""Inference backends, one class per runtime, chosen by the model file's suffix or by name.

``load_backend("model.onnx")`` -> ONNX Runtime, ``"model.engine"`` / ``".plan"`` ->
TensorRT, ``"model.xml"`` -> OpenVINO, ``"model.safetensors"`` / ``".pt"`` -> PyTorch;
``load_backend("model.onnx", backend="openvino")`` picks a backend by name (``--backend``).
Each module imports its runtime (onnxruntime, openvino, tensorrt, torch) only when a model
is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fundus_edge.backends.base import CONTRACT_OUTPUTS, INPUT_NAME, Backend
from fundus_edge.backends.onnxruntime import OnnxRuntimeBackend
from fundus_edge.backends.openvino import OpenVinoBackend
from fundus_edge.backends.tensorrt import TensorRTBackend
from fundus_edge.backends.torch import TorchBackend
from fundus_edge.errors import UserError

__all__ = [
    "BACKENDS",
    "CONTRACT_OUTPUTS",
    "INPUT_NAME",
    "Backend",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "TensorRTBackend",
    "TorchBackend",
    "backend_for",
    "load_backend",
]

BACKENDS: tuple[type[Backend], ...] = (
    OnnxRuntimeBackend,
    TensorRTBackend,
    OpenVinoBackend,
    TorchBackend,
)


def backend_for(path: str | os.PathLike, name: str | None = None) -> type[Backend]:
    """The backend class for ``path``: by suffix, or the one called ``name``.

    Raises:
        UserError: an unknown suffix or name, or a backend that cannot load this file.
    """
    suffix = Path(path).suffix.lower()
    if name is not None:
        by_name = {cls.name: cls for cls in BACKENDS}
        if name not in by_name:
            raise UserError(f"--backend {name!r}: choose {', '.join(by_name)}")
        cls = by_name[name]
        if suffix not in (cls.loads or cls.suffixes):
            raise UserError(
                f"--backend {name}: cannot load a '{suffix}' file "
                f"(it loads {', '.join(cls.loads or cls.suffixes)})"
            )
        return cls
    for cls in BACKENDS:
        if suffix in cls.suffixes:
            return cls
    known = ", ".join(s for cls in BACKENDS for s in cls.suffixes)
    raise UserError(f"{path}: unknown model type '{suffix}' (expected one of {known})")


def load_backend(path: str | os.PathLike, backend: str | None = None, **options: Any) -> Backend:
    """Load a model with the backend its suffix names, or the one ``backend`` names.

    Args:
        path: ``.onnx``, ``.engine``/``.plan``, ``.xml`` (OpenVINO IR) or a checkpoint.
        backend: ``onnxruntime``, ``openvino``, ``tensorrt`` or ``torch``; None: by suffix.
        **options: backend options; None values are dropped, so a CLI can pass every
            option it has (``provider=None``). Options another backend owns are an error.

    Returns:
        The loaded :class:`Backend`.
    """
    cls = backend_for(path, backend)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    return cls.load(path, **given)
