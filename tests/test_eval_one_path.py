"""`eval` opens every model through `backends` (a checkpoint in the torch backend, its export in
ONNX Runtime) and both give the same report; `--device` reaches the torch backend; the input is
normalised by one function; `eval --faithfulness` scores ROAD through the same path."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="checkpoints need torch (the train extra)")
pytest.importorskip("onnx", reason="exporting the checkpoint needs onnx")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from fundus_edge.cli import app  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_synth):
    """A tiny two-member checkpoint (4x4 and 2x2 maps at 64 px) and its ONNX export."""
    from fundus_edge.convert.steps import Artifact, CheckpointToOnnx, StepContext
    from fundus_edge.data import open_dataset
    from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint
    from fundus_edge.preprocess import PreprocessConfig

    labels = tuple(open_dataset(tiny_synth).label_names)
    tmp = tmp_path_factory.mktemp("eval-one-path")
    torch.manual_seed(0)
    cfg = EnsembleConfig(
        members=("resnet18_os16", "resnet18"),
        member_head="gap",
        num_classes=len(labels),
        label_names=labels,
        image_size=SIZE,
    )
    ens = build_ensemble(cfg).eval()
    for m in ens.modules():  # real batch statistics, else every map is constant
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ens.train()
    with torch.no_grad():
        ens(torch.randn(4, 3, SIZE, SIZE))
    ens.eval()
    thresholds = np.linspace(0.3, 0.7, len(labels)).tolist()  # not the 0.5 default
    ckpt = save_checkpoint(
        tmp / "tiny.safetensors",
        ens,
        thresholds=thresholds,
        extra={"preprocess": PreprocessConfig(size=SIZE).to_dict()},
    )
    ctx = StepContext(out=tmp, verify=False)
    onnx = CheckpointToOnnx("tiny", simplify=False).run(Artifact("checkpoint", ckpt), ctx)
    return ckpt, onnx.artifact.path, thresholds


def test_checkpoint_and_its_onnx_give_the_same_report(models, tiny_synth):
    from fundus_edge.evaluate import evaluate_model

    ckpt, onnx_path, thresholds = models
    a = evaluate_model(ckpt, tiny_synth, "test", device="cpu")
    b = evaluate_model(onnx_path, tiny_synth, "test")
    assert a["backend"] == {"name": "torch", "device": "cpu"}
    assert b["backend"]["name"] == "onnxruntime"
    # The contract comes through the backend unchanged: labels, thresholds, preprocessing.
    ops = a["operating_points"]
    assert list(ops) == list(b["operating_points"])
    names = [p for p in a["predictions"][0]["probabilities"]]
    for name, t in zip(names, thresholds, strict=True):
        if name in ops:
            assert ops[name]["threshold"] == pytest.approx(t)
            assert b["operating_points"][name]["threshold"] == pytest.approx(t)
    pa = np.array([list(p["probabilities"].values()) for p in a["predictions"]])
    pb = np.array([list(p["probabilities"].values()) for p in b["predictions"]])
    assert pa.shape == pb.shape and pa.shape[0] > 0
    assert np.abs(pa - pb).max() <= 1e-4
    assert np.ptp(pa) > 1e-3  # a model whose outputs vary, else the comparison says nothing
    for key in ("auroc", "ap", "f1"):
        va, vb = a["macro"][key], b["macro"][key]
        assert (va is None and vb is None) or va == pytest.approx(vb, abs=1e-3), key
    assert a["riadd"]["score"] == pytest.approx(b["riadd"]["score"], abs=1e-3)
    la, lb = a["localisation"], b["localisation"]
    assert la is not None and lb is not None
    assert set(la["per_label"]) == set(lb["per_label"])
    for key in ("pointing_game", "energy_inside"):
        assert la["macro"][key] == pytest.approx(lb["macro"][key], abs=1e-3), key


def test_device_reaches_the_torch_backend(models, tiny_synth):
    from fundus_edge.backends import load_backend
    from fundus_edge.evaluate import evaluate_model

    ckpt, onnx_path, _ = models
    with load_backend(ckpt, device="auto") as b:
        assert b.device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device 'tpu'"):
        evaluate_model(ckpt, tiny_synth, "test", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            evaluate_model(ckpt, tiny_synth, "test", device="cuda:0")
    # ONNX Runtime has no device option: refused, not silently ignored.
    res = CliRunner().invoke(
        app, ["eval", "-m", str(onnx_path), "-d", str(tiny_synth), "--device", "cpu"]
    )
    assert res.exit_code == 2 and "device" in res.output and "onnxruntime" in res.output


def test_one_input_normalisation():
    """The fused graph, the training loader and the helper are one computation."""
    from fundus_edge.models.fused import normalise_input
    from fundus_edge.torchdata import to_tensor

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = (img.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    got = normalise_input(torch.from_numpy(img), mean, std)
    assert got.dtype == torch.float32 and tuple(got.shape) == (2, 3, 8, 8)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    assert torch.equal(to_tensor(img[1], mean, std), got[1])


def test_eval_faithfulness_asks_for_road_by_default(models, tiny_synth, monkeypatch):
    """`eval --faithfulness` hands grad-cam's ROAD percentiles on unless told otherwise."""
    import fundus_edge.evaluate as evaluate
    from fundus_edge.faithfulness import ROAD_PERCENTILES

    seen: list[dict] = []

    def fake(*args, **kwargs):
        seen.append(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_model", fake)
    ckpt, _, _ = models
    base = ["eval", "-m", str(ckpt), "-d", str(tiny_synth)]
    runner = CliRunner()
    for extra, expected in (
        (["--faithfulness"], ROAD_PERCENTILES),
        (["--faithfulness", "--faithfulness-road", "20,80"], (20, 80)),
        (["--faithfulness", "--faithfulness-road", "none"], ()),
        ([], None),
    ):
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2 and "stop here" in res.output, res.output
        assert seen[-1]["faithfulness_road"] == expected, extra
    res = runner.invoke(app, [*base, "--faithfulness", "--faithfulness-road", "0,50"])
    assert res.exit_code == 2 and "--faithfulness-road" in res.output
    assert len(seen) == 4  # refused before any work


def test_eval_faithfulness_cli_reports_road(models, tiny_synth, tmp_path):
    """Through the CLI on a checkpoint: kernel, grad-cam and random rows, each with ROAD."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        pytest.skip(
            "grad-cam is not installed: the absent-ROAD note is tested in test_faithfulness"
        )
    ckpt, _, _ = models
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        [
            "eval", "-m", str(ckpt), "-d", str(tiny_synth), "--device", "cpu", "--json", str(out),
            "--faithfulness", "--faithfulness-images", "1", "--faithfulness-steps", "2",
            "--faithfulness-road", "50",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "ROAD MoRF" in res.output and "combined" in res.output
    fa = json.loads(out.read_text())["faithfulness"]
    assert fa["methods"] == ["kernel", "gradcam", "random"]
    assert fa["road"]["percentiles"] == [50]
    for method in fa["methods"]:
        for key in ("road_morf", "road_lerf", "road_combined"):
            assert math.isfinite(fa["macro"][method][key]), (method, key)
        curve = fa["road"]["curves"][method]
        assert len(curve["morf"]) == len(curve["lerf"]) == 1
    for row in fa["per_label"].values():
        for m in fa["methods"]:
            assert -1.0 <= row[m]["road_morf"] <= 1.0 and -1.0 <= row[m]["road_lerf"] <= 1.0
