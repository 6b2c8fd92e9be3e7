"""The distillation terms: soft labels at a temperature, class maps, attention.

All three compare the student with cached teacher targets (:mod:`fundus_edge.distill.targets`):

* :func:`soft_label_loss`: Hinton et al.'s knowledge distillation for multi-label outputs, one
  Bernoulli per label: ``T² · KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s/T)))`` averaged over labels
  (``T²`` keeps the gradient's scale independent of ``T``). It is zero when the student's
  logits equal the teacher's.
* :func:`map_loss`: ``1 - cos(student map, teacher map)`` per image and label, weighted by the
  teacher's probability of that label (a map of a finding the teacher does not see is little
  evidence of where to look), per student member. The cosine is invariant to each map's
  scale, so the student's raw maps compare directly with the teacher's maps made by the one
  normalisation (:func:`fundus_edge.maps.normalise_member_maps`, peak scaling): no second
  normalisation is written here.
* :func:`attention_loss`: ``1 - cos`` between the student's attention (its model's own
  :meth:`~fundus_edge.models.Ensemble.attention_from`, weighted by the teacher's
  probabilities so both attend to the same findings) and the teacher's attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_loss", "cosine_distance", "map_loss", "soft_label_loss"]

_EPS = 1e-7


def soft_label_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature-scaled Bernoulli KL per label, times ``T²``.

    Args:
        student_logits: (N, C) or (N, M', C) (every head is distilled).
        teacher_logits: (N, C) teacher logits.
        temperature: ``T`` > 0.
        weight: optional (N,) per-image weights (0 leaves an image out).

    Returns:
        Scalar mean over images (weighted), heads and labels.
    """
    t = float(temperature)
    zs = student_logits.float() / t
    zt = teacher_logits.float() / t
    if zs.dim() == 3:
        zt = zt.unsqueeze(1).expand_as(zs)
    pt = torch.sigmoid(zt)
    # BCE(zs; pt) - H(pt) = KL(pt || σ(zs)); H(pt) is BCE(zt; pt).
    kl = F.binary_cross_entropy_with_logits(
        zs, pt, reduction="none"
    ) - F.binary_cross_entropy_with_logits(zt, pt, reduction="none")
    per_image = kl.reshape(kl.shape[0], -1).mean(dim=1) * (t * t)  # (N,)
    return _weighted_mean(per_image, weight)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` over the last two axes of non-negative maps ``(..., h, w)`` -> ``(...)``.

    A map that is all zero has cosine 0 (distance 1) with anything.
    """
    a = a.float().flatten(-2)
    b = b.float().flatten(-2)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + _EPS)
    return 1.0 - cos


def map_loss(
    student_cams: torch.Tensor,
    teacher_maps: torch.Tensor,
    teacher_probs: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-map distillation, weighted by the teacher's probabilities.

    Args:
        student_cams: (N, M, C, h, w) the student's raw maps (with their graph).
        teacher_maps: (N, C, h, w) teacher maps on the same grid.
        teacher_probs: (N, C) teacher probabilities (label weights).
        weight: optional (N,) per-image weights.

    Returns:
        Scalar: ``sum w·(1 - cos) / sum w`` over members, images and labels, with
        ``w = teacher_probs · weight``; labels whose teacher map is empty are left out.
    """
    if student_cams.shape[-2:] != teacher_maps.shape[-2:]:
        raise ValueError(
            f"student maps {tuple(student_cams.shape)} and teacher maps "
            f"{tuple(teacher_maps.shape)} are on different grids"
        )
    d = cosine_distance(student_cams, teacher_maps.unsqueeze(1))  # (N, M, C)
    w = teacher_probs.float() * (teacher_maps.flatten(-2).amax(-1) > 0).float()  # (N, C)
    if weight is not None:
        w = w * weight.float().unsqueeze(1)
    w = w.unsqueeze(1).expand_as(d)
    return (d * w).sum() / w.sum().clamp_min(_EPS)


def attention_loss(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 - cos`` between (N, 1, h, w) attention maps; scalar (weighted) mean over images."""
    d = cosine_distance(student_attention, teacher_attention)[:, 0]  # (N,)
    return _weighted_mean(d, weight)


def _weighted_mean(v: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return v.mean()
    w = weight.float()
    return (v * w).sum() / w.sum().clamp_min(_EPS)
