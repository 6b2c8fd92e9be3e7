"""Temperature scaling end to end: `export --calibrate` re-stamps a fitted temperature into an
exported model, and `run` (the Predictor) then reports calibrated probabilities; thresholds
carried over keep the decisions of the uncalibrated model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from test_backends import make_metadata, make_onnx_model

from fundus_edge.artifact import read_metadata
from fundus_edge.data import open_dataset
from fundus_edge.operating import apply_temperature
from fundus_edge.runtime import Predictor, RunConfig, run


@pytest.fixture
def frame() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skdata.retina())  # RGB, a real fundus photograph


def test_calibrated_model_runs_with_its_temperature(tiny_synth, tmp_path, frame):
    from fundus_edge.convert.restamp import restamp_model

    labels = list(open_dataset(tiny_synth).label_names)
    (tmp_path / "m").mkdir()
    src = make_onnx_model(tmp_path / "m" / "model.onnx", meta=make_metadata(64, labels))
    restamp_model(src, tmp_path / "cal", reason="calibrate on val", data=tiny_synth, calibrate=True)
    dst = tmp_path / "cal" / "model.onnx"
    meta = read_metadata(dst)
    t = np.asarray(meta["temperature"], np.float64)
    assert t.shape == (len(labels),) and np.all(t > 0)
    assert not np.allclose(t, 1.0)  # something was fitted (the tiny model is not calibrated)

    before, after = Predictor(str(src)).predict(frame), Predictor(str(dst)).predict(frame)
    assert before.inferred and after.inferred
    want = apply_temperature(before.raw_probabilities, t)
    np.testing.assert_allclose(after.raw_probabilities, want, rtol=1e-5, atol=1e-6)
    # the maps do not depend on the temperature
    np.testing.assert_allclose(after.maps, before.maps, atol=1e-6)

    # `run` writes the calibrated probabilities in its records
    img = tmp_path / "in" / "retina.png"
    img.parent.mkdir()
    cv2.imwrite(str(img), frame[:, :, ::-1])
    log = tmp_path / "out.jsonl"
    run(RunConfig(model=dst, source=str(img), headless=True, jsonl=log), handle_signals=False)
    (rec,) = [json.loads(line) for line in log.read_text().splitlines()]
    got = np.array([rec["probabilities"][n] for n in labels])
    np.testing.assert_allclose(got, want, atol=1e-4)
    thr = dict(zip(labels, meta["thresholds"], strict=True))
    assert set(rec["positive"]) == {n for n in labels if rec["probabilities"][n] >= thr[n]}
