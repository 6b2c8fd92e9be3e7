"""eval --faithfulness: deletion/insertion AUC and ROAD rank a right map above a shuffled one;
the report section's shape; ROAD present exactly when torch and grad-cam are (else a note);
option validation; no grad-cam without a checkpoint (a note)."""

from __future__ import annotations

import importlib.util
import math

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from fundus_edge.cli import app
from fundus_edge.data import Sample
from fundus_edge.errors import UserError
from fundus_edge.faithfulness import (
    ROAD_PERCENTILES,
    add_faithfulness,
    auc,
    curves,
    parse_road_percentiles,
    road,
    road_unavailable,
    validate_options,
)
from fundus_edge.preprocess import PreprocessConfig

S = 64  # the blur baseline: sigma 2 px
LABELS = ("A", "B")
HAVE_ROAD = all(importlib.util.find_spec(m) for m in ("torch", "scipy", "pytorch_grad_cam"))
ROAD_KEYS = {"road_morf", "road_lerf", "road_combined"}


def _region(c: int) -> tuple[slice, slice]:
    return (slice(8, 16), slice(8, 16)) if c == 0 else (slice(40, 48), slice(40, 48))


def _predict(images: np.ndarray) -> dict:
    """Label c's probability: the sharp bright share of its own square - the right map is known
    (the blurred copy has none: its peak falls below 240)."""
    sharp = np.asarray(images).min(axis=-1) >= 240
    probs = np.stack([sharp[(slice(None), *_region(c))].mean(axis=(1, 2)) for c in (0, 1)], 1)
    cams = np.zeros((len(images), 2, 8, 8), dtype=np.float32)
    cams[:, 0, 1, 1] = 1.0  # 8-px cells: the squares at 8..16 and 40..48
    cams[:, 1, 5, 5] = 1.0
    return {"probs": probs, "cams": cams}


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (S, S, 3), dtype=np.uint8)
    for c in (0, 1):
        img[_region(c)] = 250
    return img


def test_auc_trapezoid():
    assert auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert auc(np.array([1.0, 0.0])) == pytest.approx(0.5)


def test_right_map_beats_shuffled():
    image = _image()
    right = _predict(image[None])["cams"][0, 0]
    shuffled = np.random.default_rng(1).permutation(right.ravel()).reshape(right.shape)
    res = curves(_predict, image, {"right": right, "shuffled": shuffled}, label=0, steps=16)
    (d_r, i_r), (d_s, i_s) = res["right"], res["shuffled"]
    assert d_r.shape == (17,) and i_r.shape == (17,)
    assert d_r[0] == pytest.approx(d_s[0]) and i_r[-1] == pytest.approx(i_s[-1])  # shared ends
    assert auc(d_r) < auc(d_s) - 0.1  # deletion: lower is better
    assert auc(i_r) > auc(i_s) + 0.1  # insertion: higher is better


@pytest.fixture()
def split(tmp_path):
    samples = []
    for k in range(4):
        path = tmp_path / f"img{k}.png"
        cv2.imwrite(str(path), cv2.cvtColor(_image(k), cv2.COLOR_RGB2BGR))
        labels = np.array([1.0, float(k % 2)], dtype=np.float32)  # A: 4 positives, B: 2
        samples.append(Sample(f"img{k}", path, labels, "test"))
    return samples


def test_report_section_shape(split, tmp_path):
    pre = PreprocessConfig(size=S, crop_fov=False, mask=False)
    report: dict = {"figures": {}}
    # one ROAD percentile keeps it quick (a sparse solve per percentile, order, map and image)
    sec = add_faithfulness(
        report, _predict, split, LABELS, LABELS, pre, images=3, steps=4, road_percentiles=(50,)
    )
    assert report["faithfulness"] is sec
    # no checkpoint (an exported model's path): kernel and random rows, and a note, no error
    assert sec["methods"] == ["kernel", "random"]
    assert any("grad-cam needs a checkpoint" in n for n in sec["notes"])
    assert set(sec["per_label"]) == {"A", "B"}
    assert sec["per_label"]["A"]["kernel"]["n"] == 3  # capped by images
    assert sec["per_label"]["B"]["random"]["n"] == 2
    road_keys = ROAD_KEYS if HAVE_ROAD else set()
    for row in sec["per_label"].values():
        for m in ("kernel", "random"):
            assert set(row[m]) == {"deletion_auc", "insertion_auc", "n"} | road_keys
    assert set(sec["macro"]) == {"kernel", "random"}
    assert sec["macro"]["kernel"]["labels"] == 2
    k, r = sec["macro"]["kernel"], sec["macro"]["random"]
    assert k["deletion_auc"] < r["deletion_auc"] and k["insertion_auc"] > r["insertion_auc"]
    if HAVE_ROAD:  # ROAD is never silently absent where it can run
        assert sec["road"]["percentiles"] == [50]
        assert k["road_combined"] > r["road_combined"] and k["road_morf"] < r["road_morf"]
        assert not any("ROAD" in n for n in sec["notes"])
    else:
        assert sec["road"] is None and any("ROAD left out" in n for n in sec["notes"])
    c = sec["curves"]["kernel"]
    assert len(c["fraction"]) == len(c["deletion"]) == len(c["insertion"]) == 5
    assert sec["steps"] == 4 and sec["images_per_label"] == 3 and sec["figure"] is None
    # seeded: the same numbers again
    again = add_faithfulness(
        {}, _predict, split, LABELS, LABELS, pre, images=3, steps=4, road_percentiles=(50,)
    )
    assert again["macro"] == sec["macro"]


def test_road_scores_a_right_map_above_a_shuffled_one():
    pytest.importorskip("pytorch_grad_cam", reason="ROAD is grad-cam's (the train extra)")
    torch = pytest.importorskip("torch")
    image = _image()
    right = _predict(image[None])["cams"][0, 0]
    shuffled = np.random.default_rng(1).permutation(right.ravel()).reshape(right.shape)
    maps = {"right": right, "shuffled": shuffled}
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    res = road(_predict, image, maps, label=0, percentiles=(20, 50, 90), seed=3)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's torch RNG is untouched
    again = road(_predict, image, maps, label=0, percentiles=(20, 50, 90), seed=3)
    for m in maps:
        assert res[m]["morf"].shape == res[m]["lerf"].shape == (3,)
        assert np.isfinite(res[m]["morf"]).all() and np.isfinite(res[m]["lerf"]).all()
        np.testing.assert_array_equal(res[m]["morf"], again[m]["morf"])  # seeded
    # Removing the most relevant 10 % or more imputes the whole square (1.6 % of the pixels):
    # the probability (1.0 on the image) drops to 0; removing the least relevant leaves it.
    np.testing.assert_allclose(res["right"]["morf"], -1.0)
    np.testing.assert_allclose(res["right"]["lerf"], 0.0)
    assert res["shuffled"]["morf"].mean() > -0.9 and res["shuffled"]["lerf"].mean() < -0.1


def test_road_absent_is_a_note(split, monkeypatch):
    """Without grad-cam ROAD is left out with a note saying so; with it, never left out."""
    pre = PreprocessConfig(size=S, crop_fov=False, mask=False)
    assert (road_unavailable() is None) == HAVE_ROAD
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pytorch_grad_cam" else real(name, *a),
    )
    assert "grad-cam is not installed" in road_unavailable()
    sec = add_faithfulness({}, _predict, split, LABELS, LABELS, pre, images=1, steps=2)
    assert sec["road"] is None
    assert any("ROAD left out: grad-cam is not installed" in n for n in sec["notes"])
    for row in sec["per_label"].values():
        assert not ROAD_KEYS & set(row["kernel"])
    with pytest.raises(UserError, match="ROAD percentiles"):
        add_faithfulness({}, _predict, split, LABELS, LABELS, pre, road_percentiles=(0, 50))


def test_road_figures_are_finite(split):
    pytest.importorskip("pytorch_grad_cam", reason="ROAD is grad-cam's (the train extra)")
    import inspect

    # eval --faithfulness asks for grad-cam's own percentiles
    defaults = inspect.signature(add_faithfulness).parameters["road_percentiles"].default
    assert tuple(defaults) == ROAD_PERCENTILES == (10, 20, 30, 40, 50, 60, 70, 80, 90)
    pre = PreprocessConfig(size=S, crop_fov=False, mask=False)
    sec = add_faithfulness(
        {}, _predict, split, LABELS, LABELS, pre, images=1, steps=2, road_percentiles=(30, 70)
    )
    assert sec["road"]["removed_fraction"] == [0.7, 0.3]
    for m in ("kernel", "random"):
        assert all(math.isfinite(sec["macro"][m][k]) for k in ROAD_KEYS)
        assert len(sec["road"]["curves"][m]["morf"]) == 2


def test_report_plot(split, tmp_path):
    pytest.importorskip("matplotlib")
    pre = PreprocessConfig(size=S, crop_fov=False, mask=False)
    report: dict = {"figures": {}}
    add_faithfulness(
        report,
        _predict,
        split,
        LABELS,
        LABELS,
        pre,
        images=1,
        steps=2,
        road_percentiles=(50,),
        out_dir=tmp_path,
    )
    assert (tmp_path / "faithfulness.png").stat().st_size > 0
    assert report["figures"]["faithfulness"] == str(tmp_path / "faithfulness.png")


def test_options_validated(tmp_path):
    validate_options(1, 2)
    with pytest.raises(UserError, match="faithfulness-steps"):
        validate_options(1, 1)
    with pytest.raises(UserError, match="faithfulness-images"):
        validate_options(0, 16)
    assert parse_road_percentiles("10, 50,90") == (10, 50, 90)
    assert parse_road_percentiles("None") == ()
    for bad in ("0,50", "50,100", "a", "50,50", ""):
        with pytest.raises(UserError, match="--faithfulness-road"):
            parse_road_percentiles(bad)
    runner = CliRunner()
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    for opt, val in (("--faithfulness-steps", "1"), ("--faithfulness-images", "0")):
        res = runner.invoke(
            app, ["eval", "-m", str(model), "-d", str(tmp_path), "--faithfulness", opt, val]
        )
        assert res.exit_code != 0
        assert opt in res.output
