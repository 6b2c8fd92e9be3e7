"""The fused inference graph: uint8 camera frame in, probabilities, maps and attention out.

This module is exactly what ``fundus-edge export`` traces into ONNX, and what the PyTorch
backend of ``fundus-edge run`` executes, so both paths compute the same thing.

Interface (README "The fused graph"):

* input ``image``: uint8 (N,H,W,3) RGB, already FOV-cropped and resized by
  :mod:`fundus_edge.preprocess`;
* outputs ``probs`` (N,C), ``logits`` (N,M',C), ``cams`` (N,M,C,h,w), ``attention`` (N,1,h,w).
"""

from __future__ import annotations

import torch
from torch import nn

from fundus_edge.artifact import CONTRACT_OUTPUTS as OUTPUT_NAMES
from fundus_edge.models.ensemble import Ensemble

__all__ = ["OUTPUT_NAMES", "FusedModel", "normalise_input"]


def normalise_input(image: torch.Tensor, mean, std) -> torch.Tensor:
    """The model input's normalisation: uint8 RGB -> float32 ``(x / 255 - mean) / std``.

    The one place it is written: the fused graph (so every export, ``run``, ``eval``), the
    training data loader and the maps ``explain`` draws all call it, so they cannot drift.
    Computed as ``(x - 255 mean) / (255 std)``: in the exported graph the scaled constants fold
    into one Sub and one Div on the uint8 input.

    Args:
        image: uint8 (or float 0-255) ``(N, H, W, 3)`` or ``(H, W, 3)`` RGB.
        mean: 3 channel means on the 0-1 scale (a sequence or a tensor).
        std: 3 channel standard deviations on the 0-1 scale.

    Returns:
        float32 ``(N, 3, H, W)`` (or ``(3, H, W)`` for one image) on ``image``'s device.
    """
    if image.dim() == 3:
        return normalise_input(image[None], mean, std)[0]
    x = image.permute(0, 3, 1, 2).to(torch.float32)  # (N,3,H,W)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    return (x - m * 255.0) / (s * 255.0)


class FusedModel(nn.Module):
    """uint8 NHWC RGB -> (probs, logits, cams, attention), everything in one forward.

    Args:
        ensemble: a trained :class:`~fundus_edge.models.Ensemble` (put in eval mode here).
        with_maps: ``False`` builds the comparison graph for benchmarks: the same two passes
            (original and a second view) without class maps, attention or enhancement; its
            ``cams``/``attention`` outputs are zeros. Used to measure the maps' overhead.
    """

    def __init__(self, ensemble: Ensemble, with_maps: bool = True) -> None:
        super().__init__()
        self.ensemble = ensemble.eval()
        self.with_maps = with_maps
        cfg = ensemble.config
        # Buffers, so they follow the module's device (normalise_input folds in the 255).
        mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (N,H,W,3) -> float (N,3,H,W): :func:`normalise_input` with the model's mean/std."""
        return normalise_input(image, self.mean, self.std)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalise(image)
        if not self.with_maps:
            logits = self.ensemble.head_logits(x)  # (N,M',C)
            second = self.ensemble.head_logits(x.flip(-1))  # same cost as the enhanced view
            probs = 0.5 * (torch.sigmoid(logits).mean(1) + torch.sigmoid(second).mean(1))
            n, c = probs.shape
            cams = probs.new_zeros((n, len(self.ensemble.members), c, 1, 1))
            return probs, logits, cams, probs.new_zeros((n, 1, 1, 1))
        out = self.ensemble(x)
        return out["probs"], out["logits"], out["cams"], out["attention"]

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on a uint8 (N,H,W,3) tensor; a dict keyed by :data:`OUTPUT_NAMES`."""
        return dict(zip(OUTPUT_NAMES, self.forward(image), strict=True))
