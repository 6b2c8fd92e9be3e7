"""explain: maps per label and method from a checkpoint and its ONNX export, files and errors."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="explain's tests build a checkpoint")
pytest.importorskip("onnx", reason="the ONNX export needs onnx")
pytest.importorskip("onnxruntime", reason="the exported model runs in ONNX Runtime")
skdata = pytest.importorskip("skimage.data", reason="scikit-image supplies the test fundus")

from typer.testing import CliRunner  # noqa: E402

from fundus_edge.cli import app  # noqa: E402
from fundus_edge.preprocess import PreprocessConfig  # noqa: E402

LABELS = ("Disease_Risk", "DR", "ARMD", "MH")
MEMBERS = ("resnet18_os16", "resnet18")  # conftest.tiny_cam_ensemble: 4x4 and 2x2 at 64 px
runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_cam_ensemble):
    from fundus_edge.convert.chain import export_model
    from fundus_edge.convert.export_config import ExportConfig
    from fundus_edge.models import save_checkpoint

    tmp = tmp_path_factory.mktemp("explain")
    ens = tiny_cam_ensemble(LABELS)
    ckpt = save_checkpoint(
        tmp / "tiny.safetensors",
        ens,
        thresholds=[0.99, 0.0, 0.99, 0.99],  # DR always positive: the default label set
        extra={"preprocess": PreprocessConfig(size=64).to_dict()},
    )
    export_model(ExportConfig(model=str(ckpt), out=str(tmp / "out"), verify=False, simplify=False))
    image = tmp / "eye.png"
    frame = cv2.resize(skdata.retina(), (240, 240), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(image), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return ckpt, tmp / "out" / "model.onnx", image


def _index(out: Path) -> list[dict[str, str]]:
    with open(out / "index.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_checkpoint_kernel_and_gradcam_per_member(models, tmp_path):
    ckpt, _, image = models
    out = tmp_path / "x"
    args = ["explain", str(ckpt), str(image), "--out", str(out), "--labels", "DR,MH"]
    res = runner.invoke(app, [*args, "--method", "kernel,gradcam,eigencam", "--per-member"])
    assert res.exit_code == 0, res.output
    rows = _index(out)
    assert len(rows) == 2 * 3 * 3  # labels x methods x (ensemble + 2 members)
    assert {r["member"] for r in rows} == {"ensemble", *MEMBERS}
    assert {r["method"] for r in rows} == {"kernel", "gradcam", "eigencam"}
    assert list(rows[0]) == [
        "source", "label", "method", "member", "probability", "png", "npy", "map_max", "map_min",
    ]  # fmt: skip
    grids = {"ensemble": (4, 4), "resnet18_os16": (4, 4), "resnet18": (2, 2)}
    for r in rows:
        m = np.load(out / r["npy"])
        assert m.dtype == np.float32 and m.shape == grids[r["member"]], r
        assert float(r["map_max"]) == pytest.approx(float(m.max()), abs=1e-5)
        assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
        png = cv2.imread(str(out / r["png"]))
        assert png.shape == (240, 240, 3)  # on the original frame
        assert 0.0 <= float(r["probability"]) <= 1.0 and r["source"] == "eye.png"
    grid = cv2.imread(str(out / "eye.png" / "grid.png"))
    assert grid.shape[0] > 2 * 200 and grid.shape[1] > 9 * 200  # 2 rows, 9 columns
    # The kernel maps are Grad-CAM, computed forward-only: the package agrees per member.
    for member in MEMBERS:
        k = np.load(out / "eye.png" / f"DR_kernel_{member}.npy")
        g = np.load(out / "eye.png" / f"DR_gradcam_{member}.npy")
        if k.max() > 0 and k.min() == 0:
            np.testing.assert_allclose(k, g, atol=1e-2)


def test_default_labels_are_the_positive_findings(models, tmp_path):
    ckpt, _, image = models
    res = runner.invoke(app, ["explain", str(ckpt), str(image), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = _index(tmp_path)
    assert [(r["label"], r["method"], r["member"]) for r in rows] == [("DR", "kernel", "ensemble")]


def test_onnx_kernel_maps_equal_the_checkpoints(models, tmp_path):
    ckpt, onnx_path, image = models
    common = [str(image), "--labels", "all", "--per-member"]
    a = runner.invoke(app, ["explain", str(ckpt), *common, "--out", str(tmp_path / "ck")])
    b = runner.invoke(app, ["explain", str(onnx_path), *common, "--out", str(tmp_path / "ox")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert "first member's grid" in b.output  # the graph's members are resampled: it says so
    rows = _index(tmp_path / "ox")
    assert len(rows) == len(LABELS) * 3
    for label in LABELS:
        ours = np.load(tmp_path / "ox" / "eye.png" / f"{label}_kernel.npy")
        theirs = np.load(tmp_path / "ck" / "eye.png" / f"{label}_kernel.npy")
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        # The first member's grid is the graph's: its own map matches too.
        first = f"{label}_kernel_{MEMBERS[0]}.npy"
        np.testing.assert_allclose(
            np.load(tmp_path / "ox" / "eye.png" / first),
            np.load(tmp_path / "ck" / "eye.png" / first),
            atol=1e-4,
        )
        assert np.load(tmp_path / "ox" / "eye.png" / f"{label}_kernel_resnet18.npy").shape == (4, 4)


@pytest.mark.parametrize(
    ("which", "args", "needle"),
    [
        ("ckpt", ["--labels", "DR,XYZ"], "unknown label XYZ"),
        ("ckpt", ["--labels", ","], "--labels"),
        ("ckpt", ["--method", "kernel,saliency"], "unknown saliency"),
        ("onnx", ["--method", "gradcam"], "needs a checkpoint"),
        ("ckpt", ["--alpha", "0"], "--alpha"),
    ],
)
def test_bad_options_exit_2(models, tmp_path, which, args, needle):
    ckpt, onnx_path, image = models
    model = ckpt if which == "ckpt" else onnx_path
    res = runner.invoke(app, ["explain", str(model), str(image), "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert "Traceback" not in res.output


def test_missing_grad_cam_exits_3(models, tmp_path, monkeypatch):
    ckpt, _, image = models
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import -> ImportError
    res = runner.invoke(
        app, ["explain", str(ckpt), str(image), "--out", str(tmp_path), "--method", "layercam"]
    )
    assert res.exit_code == 3 and "train" in res.output, res.output


def test_no_such_source_exits_2(models, tmp_path):
    ckpt, _, _ = models
    res = runner.invoke(
        app, ["explain", str(ckpt), str(tmp_path / "nope.png"), "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "nope.png" in res.output


def test_outputs_never_collide(tmp_path):
    """a/1.png, b/1.png, 1.jpg and 1.png each get their own folder (path and suffix kept)."""
    from types import SimpleNamespace

    from fundus_edge.explain import _image_key

    keys = {
        _image_key(SimpleNamespace(rel=r, name=r))
        for r in ("a/1.png", "b/1.png", "1.jpg", "1.png", "a__1.png", "m.dcm#2")
    }
    assert len(keys) == 6 and "m.dcm.frame002" in keys and "a/1.png" in keys
