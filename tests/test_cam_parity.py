"""Forward-only CAMs equal pytorch_grad_cam.GradCAM, per head type and per class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fundus_edge.models import EnsembleConfig, build_ensemble, build_member, gradcam_normalise

pytest.importorskip("pytorch_grad_cam", reason="needs grad-cam (pip install 'fundus-edge[train]')")
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

MAX_ABS = 1e-2
MIN_CORR = 0.999


def _calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running stats to x's batch stats.

    Random-init MobileNet/EfficientNet blocks shrink activations to ~1e-12 with the default
    running stats, which makes every map numerically constant; real statistics fix that.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        model.eval()
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch -> exactly its stats
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _reference(model: nn.Module, layer: nn.Module, x: torch.Tensor, c: int) -> np.ndarray:
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for _ in range(len(x))])


def _assert_close(ref: np.ndarray, ours: np.ndarray, what: str) -> None:
    assert ref.shape == ours.shape, what
    for i in range(len(ref)):
        # A constant map compares equal trivially: require a real one.
        assert ref[i].max() - ref[i].min() > 0.5, f"{what} image {i}: degenerate reference map"
        corr = np.corrcoef(ref[i].ravel(), ours[i].ravel())[0, 1]
        assert corr >= MIN_CORR, f"{what} image {i}: correlation {corr}"
    diff = np.abs(ref - ours).max()
    assert diff <= MAX_ABS, f"{what}: max abs diff {diff}"


def _live_classes(cams: torch.Tensor) -> list[int]:
    """Classes whose raw map is clearly non-zero on every image.

    With random weights, ReLU(sum_k alpha_k A_k) is all zero for some classes (every
    location negative), and nearly-zero maps are cancellation noise once min-max scaled.
    Those say nothing about parity, so the comparison runs on the live classes only.
    """
    peak = cams.amax(dim=(-2, -1))  # (N,C)
    live = (peak > 0.05 * peak.amax()).all(dim=0)
    return [c for c in range(cams.shape[1]) if live[c]]


def _check_member(
    name: str, head: str, size: tuple[int, int], min_live: int, max_classes: int = 8, seed: int = 0
) -> None:
    torch.manual_seed(seed)
    member = build_member(name, 8, head)
    x = torch.randn(2, 3, *size)
    _calibrate_bn(member, x)
    with torch.no_grad():
        cams = member.forward_with_cam(x)[1]  # (N,8,h,w)
    classes = _live_classes(cams)[:max_classes]
    assert len(classes) >= min_live, f"only classes {classes} have live maps; change the seed"
    ours = gradcam_normalise(cams, size).numpy()  # (N,C,H,W)
    for c in classes:
        _assert_close(
            _reference(member, member.target_layer, x, c), ours[:, c], f"{name}/{head}/c{c}"
        )


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("resnet18", "native"),  # pooled-linear head
        ("vgg11_bn", "native"),  # VGG MLP head (W1pool kernel, ReLU masks)
        ("mobilenet_v3_large", "native"),  # MLP with Hardswish
        ("efficientnet_b0", "native"),  # dropout + linear
        ("resnet18", "gap"),
        ("vgg11_bn", "gap"),
        ("resnet18_os16", "gap"),  # output stride 16: 4x4 maps at 64 px
        ("mobilenet_v3_large_os16", "native"),  # dilated last stage
    ],
)
def test_member_cam_matches_gradcam_every_class(name: str, head: str) -> None:
    _check_member(name, head, (64, 64), min_live=4, max_classes=4)


@pytest.mark.parametrize(("name", "head"), [("resnet50", "native"), ("vgg19", "native")])
def test_required_members_small_input(name: str, head: str) -> None:
    _check_member(name, head, (64, 64), min_live=2, max_classes=2, seed=2)


def test_vgg19_mlp_head_at_160() -> None:
    # 160 -> features[-1] is 5x5: the adaptive 7x7 pool has overlapping, uneven cells.
    _check_member("vgg19", "native", (160, 160), min_live=1, max_classes=1)


def test_vgg_mlp_head_at_non_square_size() -> None:
    # 100x136 -> features[-1] is 3x4.
    _check_member("vgg11_bn", "native", (100, 136), min_live=3, max_classes=3)


class _Fused(nn.Module):
    """grad-cam view of a fusion ensemble: x -> fused logits (N,C)."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.head_logits(x)[:, 0]


def test_fusion_head_cams_match_gradcam_per_member() -> None:
    torch.manual_seed(0)
    cfg = EnsembleConfig(members=("resnet18", "vgg11_bn"), num_classes=6, head="fusion")
    ens = build_ensemble(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = [m.forward_features(x) for m in ens.members]
        fused, cams = ens.fusion.forward_with_cam(feats)
        assert torch.equal(fused, ens.head_logits(x)[:, 0])
    wrapped = _Fused(ens)
    for mi, member in enumerate(ens.members):
        classes = _live_classes(cams[mi])
        assert len(classes) >= 2, f"{member.name}: only {classes} live"
        ours = gradcam_normalise(cams[mi], (64, 64)).numpy()
        for c in classes[:2]:
            ref = _reference(wrapped, member.target_layer, x, c)
            _assert_close(ref, ours[:, c], f"fusion/{member.name}/c{c}")
