"""One map normalisation: eval, run (Predictor) and the export check give the same map."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_edge import maps
from fundus_edge.convert import verify
from fundus_edge.errors import UserError
from fundus_edge.evaluate import backend_predictor
from fundus_edge.preprocess import PreprocessConfig, preprocess
from fundus_edge.runtime.predictor import Predictor

skdata = pytest.importorskip("skimage.data", reason="scikit-image supplies the test fundus")

LABELS = ("Disease_Risk", "DR", "ARMD", "MH")


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return cv2.resize(skdata.retina(), (320, 320), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------------
# The normalisation itself
# ------------------------------------------------------------------------------------------------


def test_peak_scaling_keeps_zero_and_flat_maps_flat():
    flat = np.full((1, 1, 4, 4), 0.9, np.float32)
    flat[0, 0, 0, 0] = 1.0
    out = maps.normalise_member_maps(flat[:, None])  # (N=1, M=1, C=1, 4, 4)
    assert out.shape == (1, 1, 4, 4)
    assert out.min() > 0.85 and out.max() == pytest.approx(1.0, abs=1e-6)  # not stretched
    zero = maps.normalise_member_maps(np.zeros((2, 3, 4, 4), np.float32))
    assert zero.shape == (3, 4, 4) and not zero.any()
    neg = maps.peak_normalise(np.array([[-1.0, 2.0], [0.0, 4.0]], np.float32))
    np.testing.assert_allclose(neg, [[0.0, 0.5], [0.0, 1.0]], atol=1e-6)


def test_members_count_equally_and_coarse_grids_are_resampled():
    a = np.zeros((1, 4, 4), np.float32)
    a[0, 0, 0] = 1000.0  # a member on a large scale
    b = np.zeros((1, 2, 2), np.float32)
    b[0, 1, 1] = 0.01  # a member on a tiny scale and a coarser grid
    out = maps.normalise_member_maps([a, b])
    assert out.shape == (1, 4, 4)
    assert out[0, 0, 0] == pytest.approx(0.5, abs=1e-5)  # a's peak, half the mean
    assert out[0, 3, 3] == pytest.approx(0.5, abs=1e-5)  # b's peak, resampled onto a's grid
    # Resampled before scaling, as the graph does: same as the array on one grid.
    on_grid = np.stack([a, maps.resample(b, (4, 4))])  # (M, C, h, w)
    np.testing.assert_allclose(out, maps.normalise_member_maps(on_grid), atol=1e-6)


def test_map_on_frame_is_display_then_geometry(frame):
    pre = preprocess(frame, PreprocessConfig(size=64))
    m = np.random.default_rng(0).random((8, 8)).astype(np.float32) * 7.0
    heat = maps.map_on_frame(m, pre.geometry, frame.shape)
    assert heat.shape == frame.shape[:2] and heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(heat, pre.geometry.map_to_frame(m / m.max()), atol=1e-6)
    with pytest.raises(UserError, match="not the geometry"):
        maps.map_on_frame(m, pre.geometry, (10, 10))


# ------------------------------------------------------------------------------------------------
# eval, run and the export check agree
# ------------------------------------------------------------------------------------------------


def _same_everywhere(model: Path, frame: np.ndarray, backend) -> np.ndarray:
    """The map from run (Predictor), eval (backend_predictor) and verify (combined_maps)."""
    with Predictor(model, gate=False) as p:
        res = p.predict(frame)
        cfg = p.preprocess_config
    images = preprocess(frame, cfg).image[None]
    evaluated = backend_predictor(backend)(images)["cams"][0]  # (C, h, w)
    checked = verify.combined_maps(verify.ort_outputs(model, images))[0]
    np.testing.assert_allclose(res.maps, evaluated, atol=1e-6)
    np.testing.assert_allclose(res.maps, checked, atol=1e-6)
    for k, name in enumerate(res.label_names):
        np.testing.assert_allclose(
            res.map_on_frame(name), maps.map_on_frame(evaluated[k], res.geometry), atol=1e-6
        )
    return res.maps


def test_eval_run_and_export_check_agree_on_a_tiny_graph(tmp_path, frame):
    pytest.importorskip("onnxruntime")
    from test_backends import make_onnx_model

    from fundus_edge.backends import load_backend

    path = make_onnx_model(tmp_path / "tiny.onnx")
    with load_backend(path) as b:
        got = _same_everywhere(path, frame, b)
    assert got.shape == (3, 8, 8) and got.max() <= 1.0 + 1e-6


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_cam_ensemble):
    pytest.importorskip("torch", reason="export needs torch")
    pytest.importorskip("onnx")
    pytest.importorskip("pytorch_grad_cam", reason="the export check needs grad-cam")
    from fundus_edge.convert.chain import export_model
    from fundus_edge.convert.export_config import ExportConfig
    from fundus_edge.models import save_checkpoint

    tmp = tmp_path_factory.mktemp("maps")
    ens = tiny_cam_ensemble(LABELS)
    ckpt = save_checkpoint(
        tmp / "tiny.safetensors",
        ens,
        extra={"preprocess": PreprocessConfig(size=64).to_dict()},
    )
    report = export_model(
        ExportConfig(model=str(ckpt), out=str(tmp / "out"), verify_images=2, simplify=False)
    )
    return ckpt, tmp / "out" / "model.onnx", report, ens


def test_eval_run_and_export_check_agree_on_an_exported_ensemble(exported, frame):
    import torch

    from fundus_edge.backends import load_backend

    ckpt, onnx_path, report, ens = exported
    check = report["checks"]["onnxruntime_vs_pytorch"]
    assert check["maps_max_abs"] <= 1e-4  # the export check compares the maps users see
    with load_backend(onnx_path) as b:
        from_onnx = _same_everywhere(onnx_path, frame, b)
    with Predictor(ckpt, device="cpu", gate=False) as p:
        res = p.predict(frame)
    images = preprocess(frame, PreprocessConfig(size=64)).image[None]
    with load_backend(ckpt, device="cpu") as b:  # eval opens a checkpoint this way
        from_eval_torch = backend_predictor(b)(images)["cams"][0]
    assert from_onnx.shape == (len(LABELS), 4, 4)
    np.testing.assert_allclose(res.maps, from_onnx, atol=1e-4)
    np.testing.assert_allclose(from_eval_torch, from_onnx, atol=1e-4)
    # Each member's map at its own grid combines to the graph's map (resampled, then scaled).
    x = (
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        - torch.tensor(ens.config.mean).view(1, 3, 1, 1)
    ) / torch.tensor(ens.config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        native = [m.forward_with_cam(x)[1][0].numpy() for m in ens.members]
    assert native[0].shape[-2:] == (4, 4) and native[1].shape[-2:] == (2, 2)
    np.testing.assert_allclose(maps.normalise_member_maps(native), from_onnx, atol=1e-4)
