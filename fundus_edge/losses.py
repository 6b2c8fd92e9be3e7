"""Multi-label losses for imbalanced fundus labels: weighted BCE, focal and asymmetric.

All losses take **logits** ``(N, C)`` (or ``(N, M, C)``: per-member logits, averaged over
members) and 0/1 targets of the same trailing shape, and return a scalar mean over elements.
They are written from log-sigmoids so large logits never produce ``log(0)``.

* ``bce``: ``-(w_c·y·log σ(z) + (1-y)·log(1-σ(z)))``, ``w_c`` the per-label positive weight
  (``pos_weights_from_labels``: negatives / positives, clipped).
* ``focal`` (Lin et al. 2017): the BCE terms scaled by ``(1 - p_t)^γ``, optional ``α`` balance;
  ``γ = 0`` and no ``α`` is exactly ``bce``.
* ``asymmetric`` (Ridnik et al. 2021): ``γ+`` on positives, ``γ-`` on negatives whose probability
  is first shifted down by a margin ``clip`` (easy negatives contribute nothing).

:func:`mask_attention_loss` is an optional second term for data with lesion masks: the share
of each positive class map's energy that falls outside its lesion (attention supervision in
the spirit of GAIN, Li et al. 2018, "Tell me where to look").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fundus_edge.errors import UserError

__all__ = [
    "LOSSES",
    "AsymmetricLoss",
    "FocalLoss",
    "LossConfig",
    "WeightedBCE",
    "build_loss",
    "mask_attention_loss",
    "pos_weights_from_labels",
]


@dataclass
class LossConfig:
    """Which loss and its parameters (a section of the training config).

    Attributes:
        name: ``"bce"``, ``"focal"`` or ``"asymmetric"``.
        pos_weight: ``"auto"`` (negatives / positives per label from the training labels),
            ``"none"``.
        pos_weight_max: clip for the automatic weights (rare labels would get ~400).
        gamma: focal exponent.
        alpha: focal class balance in ``[0, 1]`` for positives, or ``None``.
        gamma_pos: asymmetric exponent on positives.
        gamma_neg: asymmetric exponent on negatives.
        clip: asymmetric probability margin for negatives.
        mask_weight: weight of :func:`mask_attention_loss` where the training data has lesion
            masks (0: off; the maps then learn from the labels alone).
    """

    name: str = "bce"
    pos_weight: str = "auto"
    pos_weight_max: float = 20.0
    gamma: float = 2.0
    alpha: float | None = None
    gamma_pos: float = 0.0
    gamma_neg: float = 4.0
    clip: float = 0.05
    mask_weight: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def pos_weights_from_labels(labels: np.ndarray, max_weight: float = 20.0) -> np.ndarray:
    """Per-label positive weight ``negatives / positives``, clipped to ``[1, max_weight]``.

    Args:
        labels: ``(N, C)`` 0/1 training labels.
        max_weight: upper clip; a label with no positives gets ``max_weight``.

    Returns:
        ``(C,)`` float32 weights.
    """
    labels = np.asarray(labels, dtype=np.float64)
    pos = labels.sum(axis=0)
    neg = labels.shape[0] - pos
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(pos > 0, neg / np.maximum(pos, 1e-12), max_weight)
    return np.clip(w, 1.0, max_weight).astype(np.float32)


def _flatten_members(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # (N, M, C) per-member logits share the (N, C) targets: broadcast, every member is trained.
    if logits.dim() == 3 and targets.dim() == 2:
        targets = targets.unsqueeze(1).expand_as(logits)
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    return logits.float(), targets.float()


class WeightedBCE(nn.Module):
    """Binary cross-entropy on logits with optional per-label positive weights ``(C,)``."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = _flatten_members(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)


class FocalLoss(nn.Module):
    """Focal loss on logits; ``gamma=0, alpha=None`` equals :class:`WeightedBCE`."""

    def __init__(
        self, gamma: float = 2.0, alpha: float | None = None, pos_weight: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.alpha = alpha
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = _flatten_members(logits, targets)
        log_p = F.logsigmoid(logits)  # log σ(z)
        log_q = F.logsigmoid(-logits)  # log (1 - σ(z))
        pw = 1.0 if self.pos_weight is None else self.pos_weight
        pos = -pw * y * log_p
        neg = -(1.0 - y) * log_q
        if self.gamma != 0.0:
            # (1 - p_t)^γ: for positives 1 - p = σ(-z), for negatives p = σ(z).
            pos = pos * torch.exp(self.gamma * log_q)
            neg = neg * torch.exp(self.gamma * log_p)
        if self.alpha is not None:
            pos = pos * self.alpha
            neg = neg * (1.0 - self.alpha)
        return (pos + neg).mean()


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL) on logits: separate focusing for positives and negatives.

    Negatives use the shifted probability ``p_m = max(p - clip, 0)``, so easy negatives
    (``p < clip``) add nothing; ``gamma_neg > gamma_pos`` down-weights the many negatives.
    """

    def __init__(
        self,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        pos_weight: torch.Tensor | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)
        self.eps = eps
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = _flatten_members(logits, targets)
        p = torch.sigmoid(logits)
        log_p = F.logsigmoid(logits)
        pw = 1.0 if self.pos_weight is None else self.pos_weight
        pos = -pw * y * log_p
        if self.gamma_pos != 0.0:
            pos = pos * (1.0 - p).pow(self.gamma_pos)
        p_m = (p - self.clip).clamp(min=0.0) if self.clip > 0 else p
        neg = -(1.0 - y) * torch.log((1.0 - p_m).clamp(min=self.eps))
        if self.gamma_neg != 0.0:
            neg = neg * p_m.pow(self.gamma_neg)
        return (pos + neg).mean()


LOSSES = ("bce", "focal", "asymmetric")


def build_loss(cfg: LossConfig, train_labels: np.ndarray | None = None) -> nn.Module:
    """Build the configured loss; ``pos_weight="auto"`` needs the ``(N, C)`` training labels.

    Raises:
        UserError: unknown loss name or positive-weight mode.
    """
    if cfg.pos_weight not in ("auto", "none"):
        raise UserError(f"loss.pos_weight: expected 'auto' or 'none', got {cfg.pos_weight!r}")
    pw = None
    if cfg.pos_weight == "auto":
        if train_labels is None:
            raise UserError("loss.pos_weight='auto' needs the training labels")
        pw = torch.from_numpy(pos_weights_from_labels(train_labels, cfg.pos_weight_max))
    if cfg.name == "bce":
        return WeightedBCE(pw)
    if cfg.name == "focal":
        return FocalLoss(cfg.gamma, cfg.alpha, pw)
    if cfg.name == "asymmetric":
        return AsymmetricLoss(cfg.gamma_pos, cfg.gamma_neg, cfg.clip, pw)
    raise UserError(f"loss.name: unknown loss {cfg.name!r}; choose one of {', '.join(LOSSES)}")


def mask_attention_loss(
    cams: torch.Tensor, masks: torch.Tensor, has: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The share of each class map's energy outside its lesion mask, for positive labels.

    ``1 - sum(cam * t) / sum(cam)`` per member, image and label with a mask and a positive
    target, where ``t`` is the mask area-pooled onto the map's grid and scaled so its best
    cell is 1 (a lesion smaller than a cell can still reach 0). Maps of an image's other
    labels and of negatives are untouched, so the term never asks a map to find a lesion
    that is not there.

    Args:
        cams: ``(N, M, C, h, w)`` raw class maps (ReLU applied), differentiable.
        masks: ``(N, C, H, W)`` lesion masks in ``[0, 1]`` (fractions), ``H >= h``.
        has: ``(N, C)`` bool: the sample has a mask for that label.
        targets: ``(N, C)`` 0/1 labels.

    Returns:
        Scalar mean over the selected (member, image, label) maps; a zero that keeps the
        graph when none is selected.
    """
    if (
        cams.dim() != 5
        or masks.dim() != 4
        or (masks.shape[0], masks.shape[1]) != (cams.shape[0], cams.shape[2])
    ):
        raise ValueError(f"cams {tuple(cams.shape)} and masks {tuple(masks.shape)} differ")
    sel = has.bool() & (targets > 0.5)  # (N, C)
    if not bool(sel.any()):
        return cams.sum() * 0.0
    t = F.adaptive_avg_pool2d(masks.float(), cams.shape[-2:])  # (N, C, h, w)
    t = t / t.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    cam = cams.float()
    inside = (cam * t.unsqueeze(1)).sum(dim=(-2, -1))  # (N, M, C)
    total = cam.sum(dim=(-2, -1))
    outside = 1.0 - inside / (total + 1e-6)
    return outside[sel.unsqueeze(1).expand_as(outside)].mean()
