"""Attention and attention-guided image enhancement (the operators are described below).

Attention (documented choice, ``attention="prob_weighted"``): each member's class maps are
min-max normalised per class at the layer's resolution, averaged over classes weighted by
the class probabilities of the first pass (or by the target labels during training, falling
back to the probabilities for images without a positive label), averaged over members,
then min-max normalised: one map (N,1,h,w) in [0,1] that follows the findings the model
believes in, in proportion to its belief. ``attention="top_class"`` uses the most probable
class only. The map is a guide, not trained through: callers pass detached maps.

Operators act on the *normalised* input x (N,3,H,W) with the attention upsampled bilinearly
(``align_corners=False``) and min-max normalised again, M in [0,1]. Because x is
normalised, "dark" means the dataset mean colour (x = 0), not black.

* ``weight``: ``x' = x * (lam + (1 - lam) * M)``; lam keeps context.
* ``crop``: box = all pixels with ``M >= theta * max(M)`` (the bounding box of all of them,
  not of the largest component: that would need data-dependent control flow), padded by
  ``pad`` times the box size on each side, clamped to the image, resampled to (H,W) with
  ``grid_sample``. Tensor ops only, so it traces and exports (ONNX GridSample, opset 16+).
* ``drop`` (training only, WS-DAN): ``x' = x * (M < theta * max(M))``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fundus_edge.errors import UserError
from fundus_edge.models.cam import minmax
from fundus_edge.options import options_from_dict

__all__ = [
    "ATTENTIONS",
    "OPS",
    "EnhanceConfig",
    "apply_enhancement",
    "attention_box",
    "attention_from",
    "crop_enhance",
    "drop_enhance",
    "upsample_attention",
    "weight_enhance",
]

OPS = ("weight", "crop", "drop")
ATTENTIONS = ("prob_weighted", "top_class")


@dataclass
class EnhanceConfig:
    """How the enhanced view is made.

    Attributes:
        op: ``"weight"``, ``"crop"`` or ``"drop"`` (drop is training-only; in eval the
            enhanced view is the original image).
        lam: context kept by ``weight`` (0 = attention only, 1 = no change).
        theta: threshold, as a fraction of the attention max, for ``crop`` and ``drop``.
        pad: ``crop`` box padding, as a fraction of the box size on each side.
        attention: ``"prob_weighted"`` or ``"top_class"`` (see the module docstring).
    """

    op: str = "weight"
    lam: float = 0.5
    theta: float = 0.5
    pad: float = 0.1
    attention: str = "prob_weighted"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise UserError(f"unknown enhance op {self.op!r}; choose from: {', '.join(OPS)}")
        if self.attention not in ATTENTIONS:
            raise UserError(
                f"unknown enhance attention {self.attention!r}; choose from: {', '.join(ATTENTIONS)}"
            )
        for key, lo, hi in (("lam", 0.0, 1.0), ("theta", 0.0, 1.0), ("pad", 0.0, 1.0)):
            v = getattr(self, key)
            if not lo <= float(v) <= hi:
                raise UserError(f"enhance {key} must be in [{lo}, {hi}], got {v}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnhanceConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a user error naming them."""
        return options_from_dict(cls, d, "enhance")


def attention_from(
    cams: torch.Tensor, weights: torch.Tensor, mode: str = "prob_weighted"
) -> torch.Tensor:
    """Combine class maps into one attention map.

    Args:
        cams: (N,M,C,h,w) raw per-member class maps.
        weights: (N,C) class weights (probabilities, or labels), non-negative.
        mode: ``"prob_weighted"`` or ``"top_class"``.

    Returns:
        (N,1,h,w) attention in [0,1].
    """
    if mode == "top_class":
        weights = F.one_hot(weights.argmax(dim=1), weights.shape[1]).to(cams.dtype)
    norm = minmax(cams)  # (N,M,C,h,w), per class per member
    w = weights.to(cams.dtype)[:, None, :, None, None]  # (N,1,C,1,1)
    att = (norm * w).sum(dim=2) / (w.sum(dim=2) + 1e-7)  # (N,M,h,w)
    return minmax(att.mean(dim=1, keepdim=True))  # (N,1,h,w)


def upsample_attention(attention: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N,1,h,w) -> (N,1,H,W): bilinear (``align_corners=False``), then min-max again."""
    up = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
    return minmax(up)


def weight_enhance(x: torch.Tensor, m: torch.Tensor, lam: float) -> torch.Tensor:
    """``x * (lam + (1 - lam) * M)``; x (N,3,H,W), M (N,1,H,W)."""
    return x * (lam + (1.0 - lam) * m)


def drop_enhance(x: torch.Tensor, m: torch.Tensor, theta: float) -> torch.Tensor:
    """Zero (= mean colour) where ``M >= theta * max(M)``; x (N,3,H,W), M (N,1,H,W)."""
    peak = m.amax(dim=(-2, -1), keepdim=True)
    return x * (m < theta * peak).to(x.dtype)


def attention_box(m: torch.Tensor, theta: float, pad: float) -> torch.Tensor:
    """Padded box around all pixels with ``M >= theta * max(M)``, with tensor ops only.

    Args:
        m: (N,1,H,W) upsampled attention.
        theta: threshold fraction of the max.
        pad: padding fraction of the box size, per side.

    Returns:
        (N,4) float boxes ``(x0, y0, x1, y1)`` in pixel-edge coordinates: the box covers
        pixels ``x0 <= col + 0.5 <= x1``; clamped to ``[0, W] x [0, H]``.
    """
    h, w = m.shape[-2:]
    peak = m.amax(dim=(-2, -1), keepdim=True)
    mask = (m >= theta * peak).to(m.dtype)[:, 0]  # (N,H,W); never empty: the peak passes
    rows = mask.amax(dim=2)  # (N,H)
    cols = mask.amax(dim=1)  # (N,W)

    def span(hit: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(size, dtype=m.dtype, device=m.device)  # (size,)
        lo = torch.where(hit > 0, idx, torch.full_like(idx, size)).amin(dim=1)
        hi = torch.where(hit > 0, idx, torch.full_like(idx, -1)).amax(dim=1) + 1.0
        margin = pad * (hi - lo)
        return (lo - margin).clamp(0, size), (hi + margin).clamp(0, size)

    y0, y1 = span(rows, h)
    x0, x1 = span(cols, w)
    return torch.stack([x0, y0, x1, y1], dim=1)


def crop_enhance(x: torch.Tensor, m: torch.Tensor, theta: float, pad: float) -> torch.Tensor:
    """Crop the attention box and resize it back to (H,W) (bilinear ``grid_sample``)."""
    n, _, h, w = x.shape
    box = attention_box(m, theta, pad)  # (N,4)
    # Output pixel centres in normalised coordinates (align_corners=False): (2i+1)/S - 1.
    base_x = (torch.arange(w, dtype=x.dtype, device=x.device) * 2 + 1) / w - 1  # (W,)
    base_y = (torch.arange(h, dtype=x.dtype, device=x.device) * 2 + 1) / h - 1  # (H,)
    # Box centre and half-size in normalised coordinates.
    cx = (box[:, 0] + box[:, 2]) / w - 1
    sx = (box[:, 2] - box[:, 0]) / w
    cy = (box[:, 1] + box[:, 3]) / h - 1
    sy = (box[:, 3] - box[:, 1]) / h
    gx = cx[:, None, None] + sx[:, None, None] * base_x[None, None, :]  # (N,1,W)
    gy = cy[:, None, None] + sy[:, None, None] * base_y[None, :, None]  # (N,H,1)
    grid = torch.stack([gx.expand(n, h, w), gy.expand(n, h, w)], dim=-1)  # (N,H,W,2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def apply_enhancement(
    x: torch.Tensor, attention: torch.Tensor, cfg: EnhanceConfig, training: bool = False
) -> torch.Tensor:
    """Make the enhanced view of x.

    Args:
        x: (N,3,H,W) normalised input.
        attention: (N,1,h,w) attention in [0,1].
        cfg: the operator and its parameters.
        training: ``drop`` only acts in training; in eval it returns x unchanged.

    Returns:
        (N,3,H,W) enhanced input.
    """
    m = upsample_attention(attention, tuple(x.shape[-2:]))  # (N,1,H,W)
    if cfg.op == "weight":
        return weight_enhance(x, m, cfg.lam)
    if cfg.op == "crop":
        return crop_enhance(x, m, cfg.theta, cfg.pad)
    return drop_enhance(x, m, cfg.theta) if training else x
