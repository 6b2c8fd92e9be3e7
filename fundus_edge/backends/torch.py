"""PyTorch backend: a training checkpoint run through the same fused forward as export.

``fundus_edge.models.fused.FusedModel`` wraps the ensemble so it takes uint8 NHWC frames
and returns the exported graph's outputs; running a checkpoint here therefore gives
what its ONNX export would, without exporting. torch is imported when a model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fundus_edge.artifact import contract_from_checkpoint
from fundus_edge.backends.base import Backend
from fundus_edge.errors import UserError, require, require_all
from fundus_edge.log import get_logger

__all__ = ["TorchBackend", "contract_from_checkpoint"]  # re-exported for callers

log = get_logger("backends")


class TorchBackend(Backend):
    """A ``.safetensors`` / ``.pt`` checkpoint run by PyTorch.

    Args:
        path: the checkpoint (saved by ``fundus_edge.models.save_checkpoint``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; None or ``"auto"`` picks CUDA when
            available.

    Attributes:
        model: the :class:`~fundus_edge.models.fused.FusedModel` it runs (in eval mode, on
            :attr:`device`), for what needs the torch module itself: grad-cam's maps.
    """

    name: ClassVar[str] = "torch"
    suffixes: ClassVar[tuple[str, ...]] = (".safetensors", ".pt", ".pth")
    options: ClassVar[tuple[str, ...]] = ("device",)

    def __init__(self, path: Path, device: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such checkpoint")
        require_all(
            [
                ("torch", "running PyTorch checkpoints"),
                ("torchvision", "running PyTorch checkpoints"),
                ("safetensors", "reading checkpoints"),
            ]
        )
        torch = require("torch", purpose="running PyTorch checkpoints")
        from fundus_edge.models import load_checkpoint
        from fundus_edge.models.fused import FusedModel

        self._torch = torch
        device = _resolve_device(torch, device)
        ensemble, meta = load_checkpoint(self.path)
        self.metadata = contract_from_checkpoint(meta, str(self.path))
        if meta.get("temperature") is not None:
            # A checkpoint's own temperature (optional) reaches the runtime as an export's would.
            from fundus_edge.operating import temperature_vector

            labels = self.metadata["label_names"]
            temperature_vector(meta["temperature"], len(labels), f"{self.path}: checkpoint")
            self.metadata["temperature"] = meta["temperature"]
        self._model = FusedModel(ensemble).eval().to(device)
        self.device = str(device)

    @property
    def model(self):
        """The :class:`~fundus_edge.models.fused.FusedModel` this backend runs."""
        if self._model is None:
            raise UserError(f"{self.path}: the torch backend is closed")
        return self._model

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        x = torch.from_numpy(batch).to(self.device)  # (N, S, S, 3) uint8
        with torch.inference_mode():
            out: dict[str, Any] = self._model.predict(x)
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}

    def close(self) -> None:
        self._model = None


def _resolve_device(torch: Any, device: str | None) -> str:
    """``None``/``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` checked.

    Raises:
        UserError: an unknown device, or CUDA asked for where this PyTorch has none.
    """
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA"
        raise UserError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
            f"built with {built}); use --device cpu"
        )
    return device
