"""Losses against their reference formulas (numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")

from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.losses import (  # noqa: E402
    AsymmetricLoss,
    FocalLoss,
    LossConfig,
    WeightedBCE,
    build_loss,
    pos_weights_from_labels,
)


def _case(seed: int = 0, n: int = 16, c: int = 5):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, c))
    y = (rng.random((n, c)) < 0.3).astype(np.float64)
    return z, y


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_bce_matches_formula_with_pos_weight():
    z, y = _case()
    w = np.array([1.0, 2.0, 5.0, 1.5, 3.0])
    p = _sig(z)
    ref = np.mean(-(w * y * np.log(p) + (1 - y) * np.log(1 - p)))
    got = WeightedBCE(torch.tensor(w, dtype=torch.float32))(torch.tensor(z), torch.tensor(y))
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_focal_gamma0_equals_bce_and_formula():
    z, y = _case(1)
    zt, yt = torch.tensor(z), torch.tensor(y)
    pw = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0])
    assert float(FocalLoss(0.0, None, pw)(zt, yt)) == pytest.approx(
        float(WeightedBCE(pw)(zt, yt)), rel=1e-6
    )
    p = _sig(z)
    pt = np.where(y > 0, p, 1 - p)
    at = np.where(y > 0, 0.25, 0.75)
    ref = np.mean(-at * (1 - pt) ** 2 * np.log(pt))
    assert float(FocalLoss(2.0, 0.25)(zt, yt)) == pytest.approx(ref, rel=1e-5)


def test_asymmetric_formula_and_easy_negatives():
    z, y = _case(2)
    p = _sig(z)
    pm = np.maximum(p - 0.05, 0)
    ref = np.mean(-(y * (1 - p) ** 1 * np.log(p) + (1 - y) * pm**4 * np.log(1 - pm)))
    got = AsymmetricLoss(gamma_pos=1.0, gamma_neg=4.0, clip=0.05)(torch.tensor(z), torch.tensor(y))
    assert float(got) == pytest.approx(ref, rel=1e-5)
    # A negative with p below the clip margin contributes exactly nothing.
    easy = AsymmetricLoss(clip=0.05)(torch.tensor([[-5.0]]), torch.tensor([[0.0]]))
    assert float(easy) == 0.0


def test_member_logits_broadcast_and_stability():
    z = torch.tensor([[[40.0, -40.0]], [[-40.0, 40.0]]]).expand(2, 3, 2)  # (N,M,C)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for loss in (WeightedBCE(), FocalLoss(2.0), AsymmetricLoss()):
        v = loss(z, y)
        assert torch.isfinite(v) and float(v) < 1e-6
    wrong = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(WeightedBCE()(z, wrong)) > 10


def test_pos_weights_and_build():
    labels = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=np.float32)
    w = pos_weights_from_labels(labels, max_weight=10)
    np.testing.assert_allclose(w, [3.0, 10.0, 3.0])
    assert isinstance(build_loss(LossConfig("focal"), labels), FocalLoss)
    assert float(build_loss(LossConfig("bce", pos_weight_max=10), labels).pos_weight[1]) == 10.0
    assert build_loss(LossConfig("asymmetric", pos_weight="none")).pos_weight is None
    with pytest.raises(UserError, match="unknown loss"):
        build_loss(LossConfig("hinge", pos_weight="none"))
