"""Registry of torchvision backbones that can be ensemble members.

A backbone is one entry: its name, the torchvision constructor, the ImageNet ``Weights``
enum member, the pooled feature dimension ``K`` and a *split* function that cuts the
torchvision network into ``features`` (ending at the CAM target layer) and its native
head (a pooling size plus the classifier ``nn.Sequential``). Split functions are shared
by a family, so adding e.g. ``resnet101`` is one more decorator line::

    @register_backbone("resnet101", tvm.resnet101, tvm.ResNet101_Weights.DEFAULT, 2048)
    @register_backbone("resnet50", tvm.resnet50, tvm.ResNet50_Weights.DEFAULT, 2048)
    def _split_resnet(net): ...

ImageNet weights are never downloaded: they are read from torchvision's own cache file
(``torch.hub.get_dir()/checkpoints/<file>``) or a folder the user names, and a missing
file raises :class:`~fundus_edge.errors.UserError` that says which file to put where.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from fundus_edge.errors import UserError

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "NativeSplit",
    "backbone_names",
    "get_backbone",
    "imagenet_weights_file",
    "load_imagenet_state_dict",
    "register_backbone",
]


@dataclass
class NativeSplit:
    """A torchvision network cut at its CAM target layer.

    Attributes:
        features: input -> A (N,K,h,w); ``features[-1]`` produces A.
        pool_size: the native head's adaptive average pool output side (7 for VGG, else 1).
        classifier: the native head after pooling and flattening (Linear/activation/Dropout).
        target_layer: the module whose output is A, handed to ``pytorch_grad_cam``.
    """

    features: nn.Sequential
    pool_size: int
    classifier: nn.Sequential
    target_layer: nn.Module


@dataclass
class BackboneSpec:
    """One registry entry.

    Attributes:
        name: registry name, e.g. ``"resnet50"``.
        constructor: torchvision constructor, called as ``constructor(weights=None)``.
        imagenet: the torchvision ``Weights`` enum member whose file ``weights="imagenet"`` loads.
        feature_dim: K, channels of A (= the pooled feature length used by GAP/fusion heads).
        split: turns the constructed network into a :class:`NativeSplit`.
    """

    name: str
    constructor: Callable[..., nn.Module]
    imagenet: tvm.WeightsEnum
    feature_dim: int
    split: Callable[[nn.Module], NativeSplit] = field(repr=False)


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    constructor: Callable[..., nn.Module],
    imagenet: tvm.WeightsEnum,
    feature_dim: int,
) -> Callable[[Callable[[nn.Module], NativeSplit]], Callable[[nn.Module], NativeSplit]]:
    """Decorator registering a split function under ``name``; stack it for a family.

    Args:
        name: registry name (must be new).
        constructor: torchvision model constructor.
        imagenet: torchvision ``Weights`` enum member for ImageNet initialisation.
        feature_dim: channels K at the CAM target layer.

    Returns:
        The decorator; it returns the split function unchanged.
    """

    def deco(split: Callable[[nn.Module], NativeSplit]) -> Callable[[nn.Module], NativeSplit]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = BackboneSpec(name, constructor, imagenet, feature_dim, split)
        return split

    return deco


def backbone_names() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone; an unknown name is a user error naming the valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(
            f"unknown backbone {name!r} in 'members'; choose from: {', '.join(backbone_names())}"
        ) from None


def imagenet_weights_file(
    spec: BackboneSpec, imagenet_dir: str | os.PathLike | None = None
) -> Path:
    """Where the ImageNet file for ``spec`` is expected (torchvision's own file name).

    Args:
        spec: the backbone.
        imagenet_dir: folder holding torchvision weight files; default torchvision's cache
            ``torch.hub.get_dir()/checkpoints``.
    """
    folder = Path(imagenet_dir) if imagenet_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / spec.imagenet.url.rsplit("/", 1)[-1]


def load_imagenet_state_dict(
    spec: BackboneSpec, imagenet_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Read the ImageNet state dict from disk, never from the network.

    Raises:
        UserError: the file is absent (the message says which file to place where and
            where to get it) or is not a tensors-only torch file.
    """
    path = imagenet_weights_file(spec, imagenet_dir)
    if not path.is_file():
        raise UserError(
            f"ImageNet weights for {spec.name} not found: place {path.name} in {path.parent} "
            f"(download it on a connected machine from {spec.imagenet.url})"
        )
    try:
        # weights_only: a tensors-only load, never an arbitrary pickle.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable torchvision weights file ({exc})") from exc
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


# --- entries ----------------------------------------------------------------------------------


@register_backbone("resnet18", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512)
@register_backbone("resnet50", tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, 2048)
def _split_resnet(net: nn.Module) -> NativeSplit:
    # CAM target: layer4's last block (its output is layer4's output).
    feats = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return NativeSplit(feats, 1, nn.Sequential(net.fc), net.layer4[-1])


@register_backbone("vgg11_bn", tvm.vgg11_bn, tvm.VGG11_BN_Weights.IMAGENET1K_V1, 512)
@register_backbone("vgg19", tvm.vgg19, tvm.VGG19_Weights.IMAGENET1K_V1, 512)
@register_backbone("vgg19_bn", tvm.vgg19_bn, tvm.VGG19_BN_Weights.IMAGENET1K_V1, 512)
def _split_vgg(net: nn.Module) -> NativeSplit:
    # CAM target: features[-1], the last max-pool; native head pools to 7x7 before the MLP.
    return NativeSplit(net.features, 7, net.classifier, net.features[-1])


@register_backbone(
    "mobilenet_v3_large", tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1, 960
)
@register_backbone(
    "efficientnet_b0", tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, 1280
)
def _split_features_classifier(net: nn.Module) -> NativeSplit:
    # CAM target: the last features block (1x1 conv + BN + activation).
    return NativeSplit(net.features, 1, net.classifier, net.features[-1])


# Output stride 16 variants: class maps at twice the resolution (8x8 instead of 4x4 at 128 px),
# for localisation on small findings (optic disc, macula). Same parameters and ImageNet files.
@register_backbone(
    "resnet50_os16",
    functools.partial(tvm.resnet50, replace_stride_with_dilation=[False, False, True]),
    tvm.ResNet50_Weights.IMAGENET1K_V2,
    2048,
)
def _split_resnet_dilated(net: nn.Module) -> NativeSplit:
    return _split_resnet(net)


@register_backbone("resnet18_os16", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512)
def _split_resnet18_os16(net: nn.Module) -> NativeSplit:
    # BasicBlock has no dilation: drop layer4's stride instead (its receptive field shrinks).
    block = net.layer4[0]
    block.conv1.stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    return _split_resnet(net)


@register_backbone(
    "mobilenet_v3_large_os16",
    functools.partial(tvm.mobilenet_v3_large, dilated=True),
    tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    960,
)
def _split_mobilenet_dilated(net: nn.Module) -> NativeSplit:
    return _split_features_classifier(net)
