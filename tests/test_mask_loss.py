"""Lesion-mask attention supervision: the loss, the masks the data pipeline delivers (same crop
and augmentation as the image), one training step, and the run-level errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")
pytest.importorskip("torchvision", reason="torchvision is not installed (extra: train)")

from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.losses import LossConfig, build_loss, mask_attention_loss  # noqa: E402


def _cams(n=1, m=1, c=2, h=4):
    return torch.zeros(n, m, c, h, h)


def test_loss_is_zero_inside_one_outside_and_skips_negatives_and_unmasked():
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :4, :4] = 1.0  # label 0: the top-left cell of a 4x4 grid
    has = torch.tensor([[True, False]])
    y = torch.tensor([[1.0, 1.0]])
    inside = _cams()
    inside[0, 0, 0, 0, 0] = 3.0
    inside[0, 0, 1, 3, 3] = 5.0  # label 1 has no mask: ignored whatever its map
    assert float(mask_attention_loss(inside, masks, has, y)) == pytest.approx(0.0, abs=1e-6)
    outside = _cams()
    outside[0, 0, 0, 3, 3] = 2.0
    assert float(mask_attention_loss(outside, masks, has, y)) == pytest.approx(1.0, abs=1e-6)
    half = _cams()
    half[0, 0, 0, 0, 0] = half[0, 0, 0, 2, 2] = 1.0
    assert float(mask_attention_loss(half, masks, has, y)) == pytest.approx(0.5, abs=1e-6)
    # A negative label's mask (there is none to find) adds nothing and keeps the graph.
    cams = outside.clone().requires_grad_(True)
    zero = mask_attention_loss(cams, masks, has, torch.tensor([[0.0, 1.0]]))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_small_lesion_can_reach_zero_and_gradient_moves_energy_inside():
    masks = torch.zeros(1, 1, 16, 16)
    masks[0, 0, 5:7, 9:11] = 1.0  # 4 pixels of one 4x4-pixel cell: a lesion smaller than a cell
    cams = torch.rand(1, 2, 1, 4, 4, requires_grad=True)
    loss = mask_attention_loss(cams, masks, torch.tensor([[True]]), torch.tensor([[1.0]]))
    loss.backward()
    g = cams.grad[0, :, 0]
    assert (g[:, 1, 2] < 0).all()  # the lesion's cell: raising it lowers the loss
    g_out = g.clone()
    g_out[:, 1, 2] = 0
    assert (g_out >= 0).all() and (g_out > 0).any()
    only = torch.zeros(1, 1, 1, 4, 4)
    only[..., 1, 2] = 1.0
    v = mask_attention_loss(only, masks, torch.tensor([[True]]), torch.tensor([[1.0]]))
    assert float(v) == pytest.approx(0.0, abs=1e-6)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        mask_attention_loss(
            _cams(c=2), torch.zeros(1, 3, 16, 16), torch.ones(1, 3), torch.ones(1, 3)
        )


def test_negative_mask_weight_is_a_config_error():
    from fundus_edge.config import TrainConfig

    cfg = TrainConfig.from_dict({"optim": {"loss": {"mask_weight": -1}}})
    with pytest.raises(UserError, match=r"optim\.loss\.mask_weight: must be in \[0, inf\)"):
        cfg.validate()


def test_augment_moves_masks_with_the_image_and_draws_the_same():
    from fundus_edge.torchdata import AugmentConfig, augment_image

    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :8] = 200  # a bright band on the left
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :8] = 255  # and its mask
    cfg = AugmentConfig(hflip=1.0, rotate=5.0, brightness=0.0, contrast=0.0)
    alone = augment_image(img, cfg, np.random.default_rng(7))
    both, (m,) = augment_image(img, cfg, np.random.default_rng(7), [mask])
    assert np.array_equal(alone, both)  # masks do not change the image's draws
    assert m.shape == (32, 32) and m[:, -6:].mean() > 200 and m[:, :20].max() == 0
    assert np.abs(m / 255.0 - both[..., 0] / 200.0).max() < 0.02  # the same warp


@pytest.fixture(scope="module")
def data_dir(tiny_synth):
    return tiny_synth


def test_dataset_returns_masks_on_the_model_grid(data_dir):
    from fundus_edge.data import open_dataset
    from fundus_edge.preprocess import PreprocessConfig, preprocess, read_image, read_mask
    from fundus_edge.torchdata import MASK_STRIDE, FundusTorchDataset

    ds_info = open_dataset(data_dir)
    names = list(ds_info.label_names)
    samples = [s for s in ds_info.splits["train"] if s.masks]
    assert samples, "the synthetic set has lesion masks"
    pre = PreprocessConfig(size=64)
    for cache in (True, False):
        ds = FundusTorchDataset(
            samples, pre, (0.5,) * 3, (0.25,) * 3, cache=cache, mask_labels=names
        )
        ds.preload(2)
        assert ds.masked_count() == len(samples)
        x, _y, i, m, has = ds[0]
        assert i == 0
        assert x.shape == (3, 64, 64) and m.shape == (
            len(names),
            64 // MASK_STRIDE,
            64 // MASK_STRIDE,
        )
        s = samples[0]
        assert sorted(np.flatnonzero(has.numpy())) == sorted(names.index(k) for k in s.masks)
        c = names.index(next(iter(s.masks)))
        # The mask is where the preprocessed crop puts it: compare with cropping it directly.
        pp = preprocess(read_image(s.path), pre)
        g = pp.geometry
        from fundus_edge.preprocess import crop_square

        full = read_mask(s.masks[names[c]], g.frame).astype(np.float32)
        ref = crop_square(full, g.x0, g.y0, g.side, 64 // MASK_STRIDE, 3)  # INTER_AREA
        assert np.abs(m[c].numpy() - ref).max() < 0.2 and float(m[c].sum()) > 0
        assert float(m[~has].abs().sum()) == 0.0
    plain = FundusTorchDataset(samples, pre, (0.5,) * 3, (0.25,) * 3)
    assert len(plain[0]) == 3


def test_training_step_with_masks_lowers_the_mask_term():
    from fundus_edge.models import EnsembleConfig, build_ensemble
    from fundus_edge.trainer import Batch, TrainStep, training_step

    torch.manual_seed(0)
    ens = build_ensemble(
        EnsembleConfig(members=("resnet18",), num_classes=2, member_head="gap", views="both")
    )
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    masks = torch.zeros(4, 2, 16, 16)
    masks[:, 0, :8, :8] = 1.0  # label 0 lives top-left, label 1 bottom-right
    masks[:, 1, 8:, 8:] = 1.0
    has = torch.ones(4, 2, dtype=torch.bool)
    loss_fn = build_loss(LossConfig(pos_weight="none"))
    opt = torch.optim.Adam(ens.parameters(), lr=1e-3)

    def term() -> float:
        ens.train()
        with torch.no_grad():
            out = TrainStep(ens, loss_fn, mask_weight=1.0)(Batch(x, y, masks=masks, has_mask=has))
        return float(out["terms"]["mask_loss"])

    before = term()
    for mode in ("plain", "kernel") * 6:
        v = training_step(ens, x, y, loss_fn, opt, mode=mode, masks=(masks, has), mask_weight=5.0)
        assert np.isfinite(v)
    assert term() < 0.5 * before


def test_train_with_mask_weight(data_dir, tmp_path):
    from typer.testing import CliRunner

    import fundus_edge.cli.cmd_train  # noqa: F401  (registers train)
    from fundus_edge.cli.app import app

    tiny = [
        "--members", "resnet18", "--member-head", "gap", "--weights", "none",
        "--image-size", "48", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--seed", "0", "--set", "optim.loss.mask_weight=0.5",
    ]  # fmt: skip
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(data_dir), "--out", str(out), *tiny])
    assert res.exit_code == 0, res.output
    assert "mask-attention loss (weight 0.5)" in res.output
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 < rec["train_mask_loss"] <= 1.0

    # Data without masks: one line naming the option, exit 2, nothing trained.
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(data_dir, bare)
    for d in bare.glob("*/Masks"):
        shutil.rmtree(d)
    res = CliRunner().invoke(
        app, ["train", "--data", str(bare), "--out", str(tmp_path / "run2"), *tiny]
    )
    assert res.exit_code == 2, res.output
    assert "optim.loss.mask_weight=0.5" in res.output and "no training image" in res.output
    assert "Traceback" not in res.output
