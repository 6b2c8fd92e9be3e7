"""Ensemble members: a backbone cut at its CAM target layer plus a CAM-capable head."""

from __future__ import annotations

import os

import torch
from torch import nn

from fundus_edge.errors import UserError
from fundus_edge.models.cam import PooledHead
from fundus_edge.models.registry import get_backbone, load_imagenet_state_dict

__all__ = ["MEMBER_HEADS", "Member", "build_member"]

MEMBER_HEADS = ("native", "gap")


class Member(nn.Module):
    """One backbone: normalised float NCHW -> logits (N,C), with its CAM seam exposed.

    A plain ``nn.Module``, so any ``pytorch_grad_cam`` method works on it unchanged with
    ``target_layers=[member.target_layer]``.

    Attributes:
        name: registry name.
        features: x -> A (N,K,h,w), the activations at the CAM target layer.
        head: A -> logits; a :class:`PooledHead`, or ``None`` for a features-only member
            inside a fusion ensemble (the fusion head reads its A).
        feature_dim: K.
    """

    def __init__(
        self,
        name: str,
        features: nn.Sequential,
        head: PooledHead | None,
        feature_dim: int,
        target_path: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.features = features
        self.head = head
        self.feature_dim = int(feature_dim)
        # A dotted path, not a submodule attribute: registering the layer twice would put
        # shared tensors in the state dict, which safetensors rightly refuses.
        self._target_path = target_path

    @property
    def target_layer(self) -> nn.Module:
        """The module whose output is A (hand it to ``pytorch_grad_cam``)."""
        return self.features.get_submodule(self._target_path)

    @property
    def num_classes(self) -> int:
        if self.head is None:
            raise UserError(f"member {self.name} has no head of its own (fusion ensemble)")
        return self.head.num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) -> A (N,K,h,w)."""
        return self.features(x)

    def _need_head(self) -> PooledHead:
        if self.head is None:
            raise UserError(
                f"member {self.name} is part of a fusion ensemble and has no head of its own; "
                "use the Ensemble"
            )
        return self.head

    def forward_head(self, a: torch.Tensor) -> torch.Tensor:
        """A (N,K,h,w) -> logits (N,C)."""
        return self._need_head()(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) -> logits (N,C)."""
        return self.forward_head(self.forward_features(x))

    def cam(self, a: torch.Tensor) -> torch.Tensor:
        """Raw class maps (N,C,h,w) of A, forward-only (ReLU applied, not normalised)."""
        return self._need_head().cam(a)

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: logits (N,C) and raw class maps (N,C,h,w)."""
        return self._need_head().forward_with_cam(self.forward_features(x))


def _replace_last_linear(classifier: nn.Sequential, num_classes: int) -> nn.Sequential:
    last = classifier[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError(f"native head must end with a Linear, got {type(last).__name__}")
    classifier[-1] = nn.Linear(last.in_features, num_classes)
    return classifier


def build_member(
    name: str,
    num_classes: int | None,
    member_head: str = "native",
    weights: str = "none",
    dropout: float = 0.0,
    imagenet_dir: str | os.PathLike | None = None,
) -> Member:
    """Build a registered backbone as a :class:`Member`.

    Args:
        name: registry name (see ``BACKBONES``).
        num_classes: C; ``None`` builds a features-only member (for a fusion head).
        member_head: ``"native"`` (torchvision's head with its last Linear replaced by C
            outputs: VGG's MLP, ResNet's pooled fc, MobileNet/EfficientNet classifiers) or
            ``"gap"`` (global average pool + dropout + Linear(K, C), for any backbone).
        weights: ``"none"`` (random init) or ``"imagenet"`` (torchvision's file, read from
            ``imagenet_dir`` or torch's hub cache; never downloaded). The ImageNet head is
            dropped: only the layers kept in the member are initialised from it.
        dropout: dropout before the GAP head's Linear (native heads keep torchvision's).
        imagenet_dir: folder holding torchvision weight files.

    Raises:
        UserError: unknown name/option, or ImageNet weights file missing (names file and folder).
    """
    spec = get_backbone(name)
    if member_head not in MEMBER_HEADS:
        raise UserError(
            f"unknown member_head {member_head!r}; choose from: {', '.join(MEMBER_HEADS)}"
        )
    if weights not in ("none", "imagenet"):
        raise UserError(f"build_member weights must be 'none' or 'imagenet', got {weights!r}")
    net = spec.constructor(weights=None)
    if weights == "imagenet":
        net.load_state_dict(load_imagenet_state_dict(spec, imagenet_dir))
    split = spec.split(net)
    target_path = next(
        (p for p, m in split.features.named_modules() if m is split.target_layer), None
    )
    if not target_path:
        raise TypeError(f"{name}: target layer is not inside its features")

    head: PooledHead | None = None
    if num_classes is not None:
        if member_head == "native":
            head = PooledHead(split.pool_size, _replace_last_linear(split.classifier, num_classes))
        else:
            head = PooledHead(
                1, nn.Sequential(nn.Dropout(dropout), nn.Linear(spec.feature_dim, num_classes))
            )
    return Member(name, split.features, head, spec.feature_dim, target_path)
