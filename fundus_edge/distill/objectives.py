"""The distillation terms as training objectives: each has a ``name`` and is called with the
student's forward outputs and the batch, and returns its weighted scalar term.

The teacher's targets of a batch's rows come from a shared
:class:`~fundus_edge.distill.data.TeacherTargetSource` (looked up by the rows' indices, maps
moved with each image's augmentation): ``logits`` (N, C), ``maps`` (N, C, h, w), ``attention``
(N, 1, h, w). The student's outputs are the trainer's views (``logits`` (N, M', C),
``logits_enhanced`` with two passes, ``cams`` (N, M, C, h, w) with their graph: the map terms
set ``needs_cams``). The contract is :mod:`fundus_edge.trainer`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fundus_edge.distill.losses import attention_loss, map_loss, soft_label_loss

__all__ = ["AttentionObjective", "MapObjective", "SoftLabelObjective", "build_objectives"]


class SoftLabelObjective:
    """``weight`` x the temperature-scaled soft-label KL on every head and view."""

    name = "soft"
    needs_cams = False

    def __init__(self, source, temperature: float, weight: float = 1.0) -> None:
        self.source = source
        self.temperature = float(temperature)
        self.weight = float(weight)

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        teacher = self.source.targets(batch)["logits"]
        views = [outputs["logits"]]
        if outputs.get("logits_enhanced") is not None:
            views.append(outputs["logits_enhanced"])
        term = sum(soft_label_loss(v, teacher, self.temperature) for v in views) / len(views)
        return self.weight * term


class MapObjective:
    """``weight`` x the class-map term (each label weighted by the teacher's probability)."""

    name = "maps"
    needs_cams = True

    def __init__(self, source, weight: float = 1.0) -> None:
        self.source = source
        self.weight = float(weight)

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        t = self.source.targets(batch)
        probs = torch.sigmoid(t["logits"].float())
        return self.weight * map_loss(outputs["cams"], t["maps"], probs)


class AttentionObjective:
    """``weight`` x the attention term: the student's attention, made by its own mode from its
    maps weighted by the teacher's probabilities, against the teacher's attention."""

    name = "attention"
    needs_cams = True

    def __init__(self, source, mode: str, weight: float = 1.0) -> None:
        self.source = source
        self.mode = mode
        self.weight = float(weight)

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        from fundus_edge.models.enhance import attention_from

        t = self.source.targets(batch)
        probs = torch.sigmoid(t["logits"].float())
        student = attention_from(outputs["cams"].float(), probs, self.mode)  # (N,1,h,w)
        return self.weight * attention_loss(student, t["attention"])


def build_objectives(section, source, attention_mode: str) -> list:
    """The objectives a :class:`~fundus_edge.distill.config.DistillSection` asks for (weight 0:
    left out), reading the teacher's targets from ``source``
    (:class:`~fundus_edge.distill.data.TeacherTargetSource`)."""
    out: list = []
    if section.soft_weight > 0:
        out.append(SoftLabelObjective(source, section.temperature, section.soft_weight))
    if section.map_weight > 0:
        out.append(MapObjective(source, section.map_weight))
    if section.attention_weight > 0:
        out.append(AttentionObjective(source, attention_mode, section.attention_weight))
    return out
