"""The ensemble: members, first pass with forward-only CAMs, attention, enhanced second pass."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger
from fundus_edge.models.cam import FusionHead
from fundus_edge.models.enhance import EnhanceConfig, apply_enhancement
from fundus_edge.models.enhance import attention_from as _attention_from
from fundus_edge.models.members import MEMBER_HEADS, Member, build_member
from fundus_edge.models.registry import get_backbone
from fundus_edge.options import options_from_dict

__all__ = ["HEADS", "VIEWS", "Ensemble", "EnsembleConfig", "build_ensemble"]

HEADS = ("average", "fusion")
VIEWS = ("both", "original")

log = get_logger(__name__)


@dataclass
class EnsembleConfig:
    """Everything needed to rebuild an :class:`Ensemble` (saved in every checkpoint).

    Attributes:
        members: registry names, e.g. ``("vgg19", "resnet50")``.
        num_classes: C.
        label_names: C names; default ``class_0 ...``.
        head: ``"average"`` (per-member heads, probabilities averaged) or ``"fusion"``
            (one Linear over the concatenated pooled features of all members).
        member_head: ``"native"`` or ``"gap"`` (per-member heads only).
        weights: ``"none"``, ``"imagenet"`` or a path to a fundus-edge checkpoint to fine-tune.
        dropout: dropout before the GAP / fusion Linear.
        image_size: model input side in pixels.
        mean, std: input normalisation (RGB, 0-1 scale).
        views: ``"both"`` (original + enhanced view) or ``"original"``.
        enhance: the enhancement operator.
        imagenet_dir: folder with torchvision weight files (default torch's hub cache).
    """

    members: tuple[str, ...] = ("vgg19", "resnet50")
    num_classes: int = 28
    label_names: tuple[str, ...] | None = None
    head: str = "average"
    member_head: str = "native"
    weights: str = "none"
    dropout: float = 0.0
    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    views: str = "both"
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    imagenet_dir: str | None = None

    def __post_init__(self) -> None:
        self.members = tuple(self.members)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if isinstance(self.enhance, dict):
            self.enhance = EnhanceConfig.from_dict(self.enhance)
        if not self.members:
            raise UserError("'members' is empty; name at least one backbone")
        for name in self.members:
            get_backbone(name)
        if int(self.num_classes) < 1:
            raise UserError(f"'num_classes' must be >= 1, got {self.num_classes}")
        self.num_classes = int(self.num_classes)
        if self.label_names is None:
            self.label_names = tuple(f"class_{i}" for i in range(self.num_classes))
        self.label_names = tuple(str(s) for s in self.label_names)
        if len(self.label_names) != self.num_classes:
            raise UserError(
                f"'label_names' has {len(self.label_names)} names but num_classes is {self.num_classes}"
            )
        for key, allowed in (("head", HEADS), ("member_head", MEMBER_HEADS), ("views", VIEWS)):
            if getattr(self, key) not in allowed:
                raise UserError(
                    f"unknown {key} {getattr(self, key)!r}; choose from: {', '.join(allowed)}"
                )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"'dropout' must be in [0, 1), got {self.dropout}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError("'mean' and 'std' need 3 values each, std > 0")

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        for key in ("members", "label_names", "mean", "std"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EnsembleConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a user error naming them."""
        return options_from_dict(cls, d, "model config")


class Ensemble(nn.Module):
    """Members + (average | fusion) head + attention-guided enhanced view.

    ``forward(x)`` returns a dict (forward-only maps, no autograd, no Python branching on
    tensor values, so it traces and exports):

    * ``probs`` (N,C): mean over heads and views of sigmoid(logits);
    * ``logits`` (N,M',C): per-head logits on the original; M' = M members for
      ``head="average"``, M' = 1 (the fused logits) for ``head="fusion"``;
    * ``cams`` (N,M,C,h,w): per-member raw maps (ReLU, not normalised) on the original,
      resampled bilinearly to the first member's grid when grids differ (bilinear resampling
      commutes with min-max normalisation, so normalised maps are unchanged);
    * ``attention`` (N,1,h,w) in [0,1];
    * ``logits_enhanced`` (N,M',C) when ``views="both"``. With ``op="drop"`` in eval mode
      the enhanced view is the original image, so these equal ``logits``.
    """

    def __init__(self, config: EnsembleConfig, members: list[Member]) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(members)
        self.fusion: FusionHead | None = None
        if config.head == "fusion":
            self.fusion = FusionHead(
                [m.feature_dim for m in members], config.num_classes, config.dropout
            )

    @property
    def num_heads(self) -> int:
        """M': how many logit rows ``logits`` has per image."""
        return 1 if self.fusion is not None else len(self.members)

    def first_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N,3,H,W) -> logits (N,M',C), raw cams (N,M,C,h,w)."""
        if self.fusion is not None:
            feats = [m.forward_features(x) for m in self.members]
            fused, cams = self.fusion.forward_with_cam(feats)
            logits = fused.unsqueeze(1)  # (N,1,C)
        else:
            pairs = [m.forward_with_cam(x) for m in self.members]
            logits = torch.stack([p[0] for p in pairs], dim=1)  # (N,M,C)
            cams = [p[1] for p in pairs]
        # Members' grids can differ (VGG floors odd sizes, ResNet ceils them): resample to
        # the first member's grid. Unconditional, so a trace holds for any input size; at
        # equal size bilinear with align_corners=False is an exact copy.
        size = cams[0].shape[-2:]
        cams = [cams[0]] + [
            F.interpolate(c, size=size, mode="bilinear", align_corners=False) for c in cams[1:]
        ]
        return logits, torch.stack(cams, dim=1)  # (N,M,C,h,w)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x -> logits (N,M',C) without maps (the enhanced view needs none)."""
        if self.fusion is not None:
            return self.fusion([m.forward_features(x) for m in self.members]).unsqueeze(1)
        return torch.stack([m(x) for m in self.members], dim=1)

    def attention_from(self, cams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """cams (N,M,C,h,w), class weights (N,C) -> attention (N,1,h,w) (config's mode)."""
        return _attention_from(cams, weights, self.config.enhance.attention)

    def enhance(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The enhanced view of x (N,3,H,W) under the config's operator."""
        return apply_enhancement(x, attention, self.config.enhance, self.training)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run both views.

        Args:
            x: (N,3,H,W) normalised input.
            targets: optional (N,C) labels in {0,1}: during training, attention follows the
                true findings (images with none fall back to the predicted probabilities).

        Returns:
            The dict described in the class docstring.
        """
        logits, cams = self.first_pass(x)
        probs = torch.sigmoid(logits).mean(dim=1)  # (N,C)
        weights = probs.detach()
        if targets is not None:
            t = targets.to(weights.dtype)
            weights = torch.where(t.sum(dim=1, keepdim=True) > 0, t, weights)
        # The map guides the second view; it is not trained through.
        attention = self.attention_from(cams.detach(), weights)
        out = {"logits": logits, "cams": cams, "attention": attention}
        if self.config.views == "original":
            out["probs"] = probs
            return out
        if self.config.enhance.op == "drop" and not self.training:
            logits_enh = logits  # drop is training-only: the eval view is the original
        else:
            logits_enh = self.head_logits(self.enhance(x, attention))
        out["logits_enhanced"] = logits_enh
        out["probs"] = 0.5 * (probs + torch.sigmoid(logits_enh).mean(dim=1))
        return out


def _load_finetune_state(model: Ensemble, path: Path) -> None:
    """Copy a checkpoint's tensors into ``model``; only head Linears may change shape."""
    from fundus_edge.models.checkpoint import read_checkpoint_tensors

    tensors, meta = read_checkpoint_tensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        members = meta.get("config", {}).get("members")
        raise UserError(
            f"{path}: checkpoint (members {members}) lacks {len(missing)} tensors of this model, "
            f"e.g. {missing[0]}; 'weights' must be a checkpoint of the same members and heads"
        )
    load, skipped = {}, []
    for key, t in tensors.items():
        if key not in own:
            continue
        if own[key].shape == t.shape:
            load[key] = t
        else:
            skipped.append(key)
    if skipped:
        log.info(
            "fine-tuning %s: new shapes (class count changed) for %s", path, ", ".join(skipped)
        )
    model.load_state_dict(load, strict=False)


def build_ensemble(config: EnsembleConfig) -> Ensemble:
    """Build the ensemble a config describes, initialised per ``config.weights``.

    Args:
        config: the model config. ``weights="imagenet"`` initialises every member's kept
            layers from torchvision's files (offline; a missing file is a UserError naming
            it and its folder); a path loads a fundus-edge checkpoint to fine-tune (tensors
            whose shapes changed, i.e. the class count, keep their fresh init).

    Returns:
        The ensemble in training mode.
    """
    is_path = config.weights not in ("none", "imagenet")
    per_member_c = None if config.head == "fusion" else config.num_classes
    members = [
        build_member(
            name,
            per_member_c,
            config.member_head,
            "none" if is_path else config.weights,
            config.dropout,
            config.imagenet_dir,
        )
        for name in config.members
    ]
    model = Ensemble(config, members)
    if is_path:
        path = Path(os.path.expanduser(config.weights))
        if not path.is_file():
            raise UserError(f"'weights' checkpoint not found: {path}")
        _load_finetune_state(model, path)
    return model
