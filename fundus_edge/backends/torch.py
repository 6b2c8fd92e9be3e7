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
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; None picks CUDA when available.
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
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: this PyTorch has no CUDA device")
        ensemble, meta = load_checkpoint(self.path)
        self.metadata = contract_from_checkpoint(meta, str(self.path))
        self._model = FusedModel(ensemble).eval().to(device)
        self.device = str(device)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        x = torch.from_numpy(batch).to(self.device)  # (N, S, S, 3) uint8
        with torch.inference_mode():
            out: dict[str, Any] = self._model.predict(x)
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}

    def close(self) -> None:
        self._model = None
