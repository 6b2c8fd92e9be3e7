"""The model package: backbone registry, CAM-capable members, the ensemble, checkpoints.

Imports torch and torchvision: the edge runtime path must not import this package.
"""

from __future__ import annotations

from fundus_edge.models.cam import FusionHead, PooledHead, gradcam_normalise, minmax
from fundus_edge.models.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from fundus_edge.models.enhance import EnhanceConfig, apply_enhancement, attention_box
from fundus_edge.models.ensemble import Ensemble, EnsembleConfig, build_ensemble
from fundus_edge.models.members import Member, build_member
from fundus_edge.models.registry import (
    BACKBONES,
    BackboneSpec,
    backbone_names,
    imagenet_weights_file,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "EnhanceConfig",
    "Ensemble",
    "EnsembleConfig",
    "FusionHead",
    "Member",
    "PooledHead",
    "apply_enhancement",
    "attention_box",
    "backbone_names",
    "build_ensemble",
    "build_member",
    "gradcam_normalise",
    "imagenet_weights_file",
    "load_checkpoint",
    "minmax",
    "read_checkpoint_meta",
    "register_backbone",
    "save_checkpoint",
]
