"""Model package: registry shapes, ensemble outputs, enhancement, checkpoints, export."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision.models as tvm

from fundus_edge.errors import UserError
from fundus_edge.models import (
    BACKBONES,
    EnhanceConfig,
    Ensemble,
    EnsembleConfig,
    Member,
    attention_box,
    build_ensemble,
    build_member,
    imagenet_weights_file,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from fundus_edge.models.enhance import attention_from, upsample_attention, weight_enhance


def _small(**kw) -> EnsembleConfig:
    base = dict(members=("resnet18", "mobilenet_v3_large"), num_classes=3, image_size=64)
    base.update(kw)
    return EnsembleConfig(**base)


# --- registry / members ---------------------------------------------------------------------


def test_registry_has_required_and_small_backbones() -> None:
    want = {
        "vgg19",
        "vgg19_bn",
        "resnet50",
        "resnet18",
        "vgg11_bn",
        "mobilenet_v3_large",
        "efficientnet_b0",
    }
    assert want <= set(BACKBONES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_member_shapes_and_single_pass(name: str) -> None:
    torch.manual_seed(0)
    member = build_member(name, 5, "native").eval()
    assert isinstance(member, Member)
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    handle = member.target_layer.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        a = member.forward_features(x)
        logits, cams = member.forward_with_cam(x)
        plain = member(x)
    handle.remove()
    n, k, h, w = a.shape
    assert (n, k) == (2, BACKBONES[name].feature_dim)
    assert torch.equal(seen["a"], a)  # the target layer's output is A
    assert logits.shape == (2, 5)
    assert cams.shape == (2, 5, h, w)
    assert torch.equal(logits, plain)
    assert torch.equal(member.forward_head(a), plain)
    assert torch.allclose(member.cam(a), cams)
    assert (cams >= 0).all()


def test_gap_head_on_any_backbone_is_pooled_linear() -> None:
    torch.manual_seed(0)
    member = build_member("vgg11_bn", 4, "gap", dropout=0.2).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a = member.forward_features(x)  # (2,512,3,3)
        logits, cams = member.forward_with_cam(x)
    lin = member.head.classifier[-1]
    assert torch.allclose(logits, a.mean((2, 3)) @ lin.weight.T + lin.bias, atol=1e-5)
    expect = torch.relu(torch.einsum("ck,nkhw->nchw", lin.weight, a)) / 9
    assert torch.allclose(cams, expect, atol=1e-6)


def test_unknown_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown backbone 'vgg99'"):
        EnsembleConfig(members=("vgg99",), num_classes=2)
    with pytest.raises(UserError, match="label_names"):
        EnsembleConfig(members=("resnet18",), num_classes=2, label_names=("a",))
    with pytest.raises(UserError, match="head"):
        EnsembleConfig(members=("resnet18",), num_classes=2, head="max")
    with pytest.raises(UserError, match="op"):
        EnhanceConfig(op="blur")


# --- ImageNet weights (offline) -------------------------------------------------------------


def test_missing_imagenet_weights_names_file_and_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(UserError) as err:
        build_member("resnet50", 3, weights="imagenet")
    msg = str(err.value)
    assert "resnet50-11ad3fa6.pth" in msg and str(folder) in msg
    assert not folder.exists()  # nothing was downloaded or created
    with pytest.raises(UserError, match=r"vgg19-dcbb9e9d\.pth"):
        build_ensemble(EnsembleConfig(members=("vgg19",), num_classes=2, weights="imagenet"))


def test_imagenet_weights_load_from_given_folder(tmp_path) -> None:
    torch.manual_seed(3)
    src = tvm.resnet18()
    spec = BACKBONES["resnet18"]
    torch.save(src.state_dict(), imagenet_weights_file(spec, tmp_path))
    member = build_member("resnet18", 3, weights="imagenet", imagenet_dir=tmp_path)
    assert torch.equal(member.features[0].weight, src.conv1.weight)
    assert torch.equal(member.target_layer.conv2.weight, src.layer4[-1].conv2.weight)
    assert member.head.classifier[-1].out_features == 3  # ImageNet fc replaced


# --- ensemble -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "views", "op"),
    [
        ("average", "both", "weight"),
        ("average", "both", "crop"),
        ("fusion", "both", "drop"),
        ("fusion", "original", "weight"),
    ],
)
def test_ensemble_output_shapes(head: str, views: str, op: str) -> None:
    torch.manual_seed(0)
    cfg = _small(head=head, views=views, enhance=EnhanceConfig(op=op))
    model = build_ensemble(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    mh = 1 if head == "fusion" else 2
    assert out["logits"].shape == (2, mh, 3)
    assert out["cams"].shape == (2, 2, 3, 2, 2)
    assert out["attention"].shape == (2, 1, 2, 2)
    assert out["probs"].shape == (2, 3)
    assert ((out["probs"] >= 0) & (out["probs"] <= 1)).all()
    att = out["attention"]
    assert att.min() >= 0 and att.max() <= 1
    p1 = torch.sigmoid(out["logits"]).mean(1)
    if views == "original":
        assert "logits_enhanced" not in out
        assert torch.allclose(out["probs"], p1)
    else:
        p2 = torch.sigmoid(out["logits_enhanced"]).mean(1)
        assert torch.allclose(out["probs"], (p1 + p2) / 2, atol=1e-6)
    if op == "drop":  # training-only: eval's enhanced view is the original
        assert torch.equal(out["logits_enhanced"], out["logits"])


def test_ensemble_cams_resampled_when_member_grids_differ() -> None:
    torch.manual_seed(0)
    model = build_ensemble(_small(members=("resnet18", "vgg11_bn"), member_head="gap")).eval()
    x = torch.randn(2, 3, 80, 80)  # resnet18 -> 3x3, vgg11_bn -> 2x2
    with torch.no_grad():
        out = model(x)
        a_vgg = model.members[1].forward_features(x)
    assert a_vgg.shape[-2:] == (2, 2)
    assert out["cams"].shape == (2, 2, 3, 3, 3)


def test_ensemble_trains_with_targets() -> None:
    torch.manual_seed(0)
    model = build_ensemble(_small(enhance=EnhanceConfig(op="drop"))).train()
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    out = model(x, targets=targets)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.cat([out["logits"], out["logits_enhanced"]], 1),
        targets[:, None].expand(-1, 4, -1),
    )
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:5])


def test_attention_follows_weights() -> None:
    cams = torch.zeros(1, 2, 2, 4, 4)
    cams[0, :, 0, 0, 0] = 1.0  # class 0 peaks top-left
    cams[0, :, 1, 3, 3] = 2.0  # class 1 peaks bottom-right
    att0 = attention_from(cams, torch.tensor([[0.9, 0.0]]))
    att1 = attention_from(cams, torch.tensor([[0.0, 0.9]]))
    top = attention_from(cams, torch.tensor([[0.2, 0.3]]), mode="top_class")
    assert att0.shape == (1, 1, 4, 4)
    assert att0[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-6) and att0[0, 0, 3, 3] == 0
    assert att1[0, 0, 3, 3] == pytest.approx(1.0, abs=1e-6) and att1[0, 0, 0, 0] == 0
    assert torch.allclose(top, att1)


# --- enhancement ----------------------------------------------------------------------------


def test_weight_op_equals_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    att = torch.rand(2, 1, 4, 4)
    m = upsample_attention(att, (32, 32))
    assert m.amin() == 0 and m.amax() == pytest.approx(1.0, abs=1e-6)
    model = build_ensemble(_small(members=("resnet18",), enhance=EnhanceConfig(lam=0.3)))
    out = model.enhance(x, att)
    assert torch.allclose(out, x * (0.3 + 0.7 * m), atol=1e-6)
    assert torch.allclose(weight_enhance(x, m, 0.3), out)


def _peaked(n: int, size: int, centres: list[tuple[int, int]], sigma: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    maps = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)) for cy, cx in centres]
    return torch.stack(maps)[:, None].float()[:n]


def test_crop_box_contains_attention_peak() -> None:
    att = _peaked(3, 7, [(1, 5), (5, 2), (3, 3)], 1.0)  # (3,1,7,7)
    m = upsample_attention(att, (112, 112))
    box = attention_box(m, theta=0.5, pad=0.1)
    for i in range(3):
        flat = int(m[i, 0].argmax())
        py, px = divmod(flat, 112)
        x0, y0, x1, y1 = box[i].tolist()
        assert x0 <= px + 0.5 <= x1 and y0 <= py + 0.5 <= y1
        assert (x1 - x0) < 112 and (y1 - y0) < 112  # a real crop, not the whole image
        assert min(x0, y0) >= 0 and max(x1, y1) <= 112


def test_crop_enhance_zooms_into_box() -> None:
    # A flat attention keeps the whole image: the crop is then the identity.
    cfg = EnhanceConfig(op="crop", theta=0.5, pad=0.0)
    model = build_ensemble(_small(members=("resnet18",), enhance=cfg)).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model.enhance(x, torch.ones(1, 1, 4, 4)), x, atol=1e-5)
    # Attention on the top-left quadrant: the output shows only that quadrant, enlarged.
    att = torch.zeros(1, 1, 32, 32)
    att[..., :16, :16] = 1.0
    ramp = torch.arange(32.0).expand(1, 3, 32, 32)  # x value = column index
    out = model.enhance(ramp, att)
    assert out.amax() <= 16.0 and out.amin() >= 0.0
    assert out[0, 0, 0, -1] > 14.0  # the right edge now shows column ~15


def test_drop_only_in_training() -> None:
    cfg = EnhanceConfig(op="drop", theta=0.5)
    model = build_ensemble(_small(members=("resnet18",), enhance=cfg))
    x = torch.ones(1, 3, 16, 16)
    att = torch.zeros(1, 1, 16, 16)
    att[..., 4:8, 4:8] = 1.0
    model.train()
    dropped = model.enhance(x, att)
    assert dropped[0, 0, 5, 5] == 0 and dropped[0, 0, 12, 12] == 1
    model.eval()
    assert torch.equal(model.enhance(x, att), x)


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_round_trip_identical(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = _small(head="fusion", label_names=("a", "b", "c"), enhance=EnhanceConfig(op="crop"))
    model = build_ensemble(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    path = save_checkpoint(
        tmp_path / "m.safetensors", model, thresholds=[0.4, 0.5, 0.6], metrics={"auc": 0.9}, epoch=3
    )
    assert path.read_bytes()[:8]  # safetensors header length, no pickle
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, Ensemble) and not loaded.training
    with torch.no_grad():
        after = loaded(x)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert meta["label_names"] == ["a", "b", "c"]
    assert meta["thresholds"] == [0.4, 0.5, 0.6]
    assert meta["epoch"] == 3 and meta["metrics"] == {"auc": 0.9}
    assert meta["preprocessing"]["image_size"] == 64
    assert loaded.config.to_dict() == cfg.to_dict()
    assert read_checkpoint_meta(path) == meta
    json.dumps(meta)


def test_finetune_from_checkpoint_with_new_classes(tmp_path) -> None:
    torch.manual_seed(0)
    src = build_ensemble(_small(members=("resnet18",)))
    path = save_checkpoint(tmp_path / "src.safetensors", src)
    dst = build_ensemble(_small(members=("resnet18",), num_classes=5, weights=str(path)))
    assert torch.equal(dst.members[0].features[0].weight, src.members[0].features[0].weight)
    assert dst.members[0].head.classifier[-1].out_features == 5
    with pytest.raises(UserError, match="lacks"):
        build_ensemble(_small(members=("vgg11_bn",), weights=str(path)))


def test_bad_checkpoint_is_user_error(tmp_path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"x\.safetensors"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


# --- export ---------------------------------------------------------------------------------


class _Outputs(torch.nn.Module):
    def __init__(self, model: Ensemble) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        out = self.model(x)
        return out["probs"], out["cams"], out["attention"]


@pytest.mark.parametrize(
    ("head", "member_head", "op"),
    [("average", "native", "crop"), ("fusion", "gap", "weight")],
)
def test_onnx_export_matches_onnxruntime(head: str, member_head: str, op: str) -> None:
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    pytest.importorskip("onnx", reason="needs onnx")
    torch.manual_seed(0)
    cfg = _small(head=head, member_head=member_head, enhance=EnhanceConfig(op=op))
    model = _Outputs(build_ensemble(cfg)).eval()
    x = torch.randn(2, 3, 64, 64)
    buf = io.BytesIO()
    torch.onnx.export(
        model, (x,), buf, dynamo=False, opset_version=17,
        input_names=["image"], output_names=["probs", "cams", "attention"],
    )  # fmt: skip
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    probs, cams, att = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert np.abs(probs - ref[0].numpy()).max() <= 1e-4
    assert np.abs(att - ref[2].numpy()).max() <= 1e-3
    assert cams.shape == tuple(ref[1].shape)
    assert np.allclose(cams, ref[1].numpy(), rtol=1e-3, atol=1e-6)


def test_enhance_config_unknown_key_is_a_user_error() -> None:
    from fundus_edge.errors import UserError
    from fundus_edge.models import EnhanceConfig

    with pytest.raises(UserError, match="'strength'"):
        EnhanceConfig.from_dict({"op": "weight", "strength": 2})
