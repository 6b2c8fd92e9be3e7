"""ONNX Runtime backend: ``.onnx`` models on the best execution provider available."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fundus_edge.backends.base import INPUT_NAME, Backend
from fundus_edge.errors import UserError, require
from fundus_edge.log import get_logger

__all__ = ["PROVIDER_ALIASES", "PROVIDER_PREFERENCE", "OnnxRuntimeBackend", "choose_providers"]

log = get_logger("backends")

# Fastest first; CPU is always last so a session always has somewhere to fall back.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def choose_providers(available: list[str], requested: str | None = None) -> list[str]:
    """Order execution providers: the requested one (must be available) or the best available.

    Args:
        available: ``onnxruntime.get_available_providers()``.
        requested: an alias (``"cuda"``) or a full provider name; None picks the best.

    Returns:
        Providers to give the session, best first, ending with the CPU provider.
    """
    if requested:
        name = PROVIDER_ALIASES.get(requested.lower(), requested)
        if name not in available:
            raise UserError(
                f"--provider {requested}: {name} is not available in this onnxruntime "
                f"(available: {', '.join(available)})"
            )
        chosen = [name]
    else:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available][:1]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeBackend(Backend):
    """An ``.onnx`` artifact run by ONNX Runtime.

    Args:
        path: the model file (metadata in its ``metadata_props``).
        provider: force an execution provider (``tensorrt``, ``cuda``, ``cpu`` or a full name).
        threads: intra-op threads (0 = ONNX Runtime's default).

    ``InferenceSession.run`` may be called from several threads at once (ONNX Runtime's
    documented guarantee), so :attr:`concurrent`: with one intra-op thread each call computes
    on its caller's thread, and two calls use two cores.
    """

    name: ClassVar[str] = "onnxruntime"
    concurrent: ClassVar[bool] = True
    suffixes: ClassVar[tuple[str, ...]] = (".onnx",)
    options: ClassVar[tuple[str, ...]] = ("provider", "threads")

    def __init__(self, path: Path, provider: str | None = None, threads: int = 0) -> None:
        from fundus_edge.artifact import metadata_from_session

        ort = require("onnxruntime", purpose="running .onnx models")
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such model file")
        providers = choose_providers(ort.get_available_providers(), provider)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self._sess = ort.InferenceSession(
                str(self.path), opts, providers=[(p, self._provider_options(p)) for p in providers]
            )
        except Exception as exc:  # ORT's Fail / InvalidGraph / NoSuchFile share no base class
            raise UserError(f"{self.path}: ONNX Runtime cannot load this model ({exc})") from exc
        self.metadata = metadata_from_session(self._sess, str(self.path))
        used = self._sess.get_providers()
        self.device = used[0]
        if provider is None and used[0] != providers[0]:
            # ORT falls back silently when a GPU provider fails to initialise; say so.
            log.warning(
                "%s: %s unavailable at run time, using %s", self.path, providers[0], used[0]
            )
        self._check_io()
        self._outputs = [o.name for o in self._sess.get_outputs()]

    def _provider_options(self, provider: str) -> dict[str, Any]:
        if provider == "TensorrtExecutionProvider":
            # Building TensorRT engines takes minutes: cache them beside the model.
            cache = self.path.with_name(self.path.name + ".trt-cache")
            return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
        return {}

    def _check_io(self) -> None:
        inputs = self._sess.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            got = ", ".join(f"{i.name} {i.type}" for i in inputs)
            raise UserError(f"{self.path}: expected one input '{INPUT_NAME}', model has: {got}")
        inp = inputs[0]
        if inp.type != "tensor(uint8)":
            raise UserError(
                f"{self.path}: input '{INPUT_NAME}' must be uint8, model has {inp.type}"
            )
        shape = list(inp.shape)
        s = self.input_size
        # Static dims must agree with the metadata; symbolic ones (str/None) are free.
        expected = [None, s, s, 3]
        if len(shape) != 4 or any(
            isinstance(d, int) and e is not None and d != e
            for d, e in zip(shape, expected, strict=False)
        ):
            raise UserError(
                f"{self.path}: input '{INPUT_NAME}' has shape {shape}, "
                f"metadata input_size {s} needs [N, {s}, {s}, 3]"
            )
        self._check_outputs([o.name for o in self._sess.get_outputs()])

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self._sess.run(self._outputs, {INPUT_NAME: batch})
        return dict(zip(self._outputs, values, strict=True))

    def close(self) -> None:
        self._sess = None  # type: ignore[assignment]
