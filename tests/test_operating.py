"""Operating points: threshold policies, bootstrap intervals, ECE, temperature scaling, and
re-stamping an exported model's thresholds without touching its graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fundus_edge.errors import UserError
from fundus_edge.operating import (
    Policy,
    apply_temperature,
    bootstrap_rates,
    ece,
    fit_temperature,
    map_thresholds,
    operating_points,
    parse_policy,
    tune,
)


def _scores(n: int = 400, c: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.array([0.3, 0.1, 0.5])[:c]).astype(np.float64)
    z = rng.normal(0, 1, (n, c)) + 1.5 * (2 * y - 1)
    return y, 1 / (1 + np.exp(-z))


def _rates(y, p, thr):
    pred = p >= thr[None]
    t = y > 0.5
    sens = (pred & t).sum(0) / t.sum(0)
    spec = (~pred & ~t).sum(0) / (~t).sum(0)
    return sens, spec


# ------------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("f1", Policy("f1")),
        ("Youden", Policy("youden")),
        ("sens@0.90", Policy("sens", 0.9)),
        ("spec@.95", Policy("spec", 0.95)),
    ],
)
def test_parse_policy(text, want):
    assert parse_policy(text) == want
    assert parse_policy(str(want)) == want


@pytest.mark.parametrize("bad", ["", "f2", "sens", "sens@1", "sens@0", "spec@1.5", "npv@0.9"])
def test_parse_policy_bad(bad):
    with pytest.raises(UserError) as exc:
        parse_policy(bad)
    msg = str(exc.value)
    assert "--threshold-policy" in msg and "\n" not in msg


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sens_policy_meets_target_and_is_highest(target):
    y, p = _scores()
    thr = tune(y, p, f"sens@{target}")
    sens, _ = _rates(y, p, thr)
    assert (sens >= target).all()
    # the highest such threshold: just above the next distinct score it falls below the target
    for c in range(y.shape[1]):
        above = np.unique(p[:, c])[np.unique(p[:, c]) > thr[c]]
        if above.size:
            s_up, _ = _rates(y[:, [c]], p[:, [c]], np.array([np.nextafter(above[0], 2)]))
            assert s_up[0] < target


def test_spec_policy_meets_target_and_is_lowest():
    y, p = _scores()
    thr = tune(y, p, "spec@0.95")
    _, spec = _rates(y, p, thr)
    assert (spec >= 0.95).all()
    for c in range(y.shape[1]):
        below = np.unique(p[:, c])[np.unique(p[:, c]) < thr[c]]
        _, s_down = _rates(y[:, [c]], p[:, [c]], np.array([below[-1]]))
        assert s_down[0] < 0.95


def test_youden_maximises_j():
    y, p = _scores()
    thr = tune(y, p, "youden")
    sens, spec = _rates(y, p, thr)
    j = sens + spec - 1
    for c in range(y.shape[1]):
        for t in np.unique(p[:, c]):
            s, sp = _rates(y[:, [c]], p[:, [c]], np.array([t]))
            assert s[0] + sp[0] - 1 <= j[c] + 1e-12


def test_f1_policy_is_todays_tuning():
    from fundus_edge.metrics import tune_thresholds

    y, p = _scores()
    np.testing.assert_array_equal(tune(y, p, "f1"), tune_thresholds(y, p))


def test_one_class_label_keeps_default():
    y, p = _scores()
    y[:, 1] = 0
    assert tune(y, p, "sens@0.9")[1] == 0.5


# ------------------------------------------------------------------ intervals, ECE


def test_bootstrap_contains_point_and_shrinks_with_n():
    widths = []
    for n in (100, 1600):
        y, p = _scores(n=n, seed=1)
        b = bootstrap_rates(y, p >= 0.5, n_boot=500, seed=0)
        for rate in b.values():
            assert (rate["lo"] <= rate["value"] + 1e-12).all()
            assert (rate["value"] <= rate["hi"] + 1e-12).all()
        widths.append(np.mean([(r["hi"] - r["lo"]).mean() for r in b.values()]))
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 16x the images, ~1/4 the width


def test_bootstrap_is_seeded_and_handles_undefined_rates():
    y, p = _scores(n=200)
    y[:, 2] = 0  # no positives: sensitivity undefined
    a = bootstrap_rates(y, p >= 0.5, n_boot=200, seed=3)
    b = bootstrap_rates(y, p >= 0.5, n_boot=200, seed=3)
    np.testing.assert_array_equal(a["ppv"]["lo"], b["ppv"]["lo"])
    assert np.isnan(a["sensitivity"]["value"][2]) and np.isnan(a["sensitivity"]["lo"][2])
    ops = operating_points(y, p, ["a", "b", "c"], [0.5] * 3, "f1", n_boot=200)
    assert ops["c"]["sensitivity"] == {"value": None, "ci": [None, None]}
    assert ops["a"]["n_pos"] + ops["a"]["n_neg"] == 200
    lo, hi = ops["a"]["specificity"]["ci"]
    assert lo <= ops["a"]["specificity"]["value"] <= hi


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = rng.random(p.size) < p  # calibrated by construction
    assert ece(y, p) < 0.01
    z = np.log(p) - np.log1p(-p)
    over = 1 / (1 + np.exp(-3 * z))  # same ranking, three times too sure
    assert ece(y, over) > 0.1
    assert ece(np.ones(4), np.ones(4)) == 0.0


def test_temperature_recovers_known_t_and_keeps_decisions():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (20_000, 2))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)  # calibrated logits z
    for true_t in (0.5, 2.5):
        p = 1 / (1 + np.exp(-z * true_t))  # overconfident (2.5) or underconfident (0.5)
        t = fit_temperature(y, p)
        np.testing.assert_allclose(t, true_t, rtol=0.05)
        scaled = apply_temperature(p, t)
        assert ece(y, scaled) < ece(y, p)
        thr = np.array([0.3, 0.7])
        assert ((p >= thr) == (scaled >= map_thresholds(thr, t))).all()
    np.testing.assert_allclose(
        apply_temperature(apply_temperature(p, t), t, inverse=True), p, atol=1e-9
    )


# ----------------------------------------------------------------------- re-stamp


def _tiny_onnx(path, labels=("Disease_Risk", "DR", "MH")):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from fundus_edge.convert.onnx_export import embed_metadata

    c = len(labels)
    w = numpy_helper.from_array(np.arange(4 * c, dtype=np.float32).reshape(4, c), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["probs"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, c])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = {
        "format": 1,
        "label_names": list(labels),
        "thresholds": [0.5] * c,
        "input_size": 64,
        "preprocess": {"size": 64},
        "outputs": ["probs"],
        "precision": "fp32",
    }
    embed_metadata(model, meta)
    onnx.save(model, str(path))
    return path


def test_restamp_keeps_graph_and_records_history(tmp_path, monkeypatch):
    import onnx

    from fundus_edge.artifact import read_metadata
    from fundus_edge.convert.restamp import restamp_model

    src = _tiny_onnx(tmp_path / "model.onnx")
    spec = tmp_path / "thr.json"
    spec.write_text(json.dumps({"thresholds": {"Disease_Risk": 0.3, "DR": 0.25, "MH": 0.6}}))
    monkeypatch.setenv("USER", "dr-who")
    res = restamp_model(src, tmp_path / "out", reason="clinic asked", thresholds_file=spec)
    dst = tmp_path / "out" / "model.onnx"
    assert res["path"] == str(dst)
    a, b = onnx.load(str(src)), onnx.load(str(dst))
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.SerializeToString() == y.SerializeToString()
    meta = read_metadata(dst)
    assert meta["thresholds"] == [0.3, 0.25, 0.6]
    (h,) = meta["threshold_history"]
    assert h["reason"] == "clinic asked" and h["user"]
    assert h["old"] == {"Disease_Risk": 0.5, "DR": 0.5, "MH": 0.5}
    assert h["new"]["DR"] == 0.25 and "T" in h["time"]
    # the source is untouched; a second re-stamp in place appends
    assert read_metadata(src)["thresholds"] == [0.5] * 3
    restamp_model(dst, tmp_path / "out", reason="again", thresholds_file=spec)
    assert len(read_metadata(dst)["threshold_history"]) == 2


def test_temperature_in_contract_is_validated():
    from fundus_edge.artifact import validate_metadata

    meta = {
        "format": 1,
        "label_names": ["a", "b"],
        "thresholds": [0.5, 0.5],
        "input_size": 64,
        "preprocess": {"size": 64},
        "outputs": ["probs"],
    }
    validate_metadata({**meta, "temperature": [1.5, 2.0]}, "m")
    validate_metadata({**meta, "temperature": 1.5}, "m")
    for bad in ([1.0], [1.0, -2.0], "hot", 0):
        with pytest.raises(UserError, match="temperature"):
            validate_metadata({**meta, "temperature": bad}, "m")


runner = CliRunner()


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"thresholds": {"Disease_Risk": 0.3, "DR": 0.2, "MH": 0.1, "XX": 0.5}}, "unknown label"),
        ({"thresholds": {"Disease_Risk": 0.3, "DR": 0.2}}, "no threshold for MH"),
        ({"thresholds": {"Disease_Risk": 0.3, "DR": 2, "MH": 0.1}}, "threshold of DR"),
        ({"policy": "sens@2"}, "policy"),
        ({"foo": 1}, "expected"),
    ],
)
def test_bad_thresholds_file_exits_2(tmp_path, doc, needle):
    from fundus_edge.cli import app

    src = _tiny_onnx(tmp_path / "model.onnx")
    spec = tmp_path / "thr.json"
    spec.write_text(json.dumps(doc))
    args = ["export", "--model", str(src), "--thresholds", str(spec), "--out", str(tmp_path)]
    res = runner.invoke(app, [*args, "--reason", "r"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "thr.json" in lines[0], res.output


def test_bad_policy_and_missing_reason_exit_2(tmp_path):
    from fundus_edge.cli import app

    src = _tiny_onnx(tmp_path / "model.onnx")
    res = runner.invoke(app, ["export", "-m", str(src), "--threshold-policy", "sens@9", "-o", "x"])
    assert res.exit_code == 2 and "--threshold-policy" in res.output
    spec = tmp_path / "thr.json"
    spec.write_text(json.dumps({"thresholds": {"Disease_Risk": 0.3, "DR": 0.2, "MH": 0.1}}))
    res = runner.invoke(app, ["export", "-m", str(src), "--thresholds", str(spec), "-o", "x"])
    assert res.exit_code == 2 and "--reason" in res.output
    res = runner.invoke(
        app, ["eval", "-m", str(src), "-d", str(tmp_path), "--threshold-policy", "best"]
    )
    assert res.exit_code == 2 and "--threshold-policy" in res.output


def test_evaluate_operating_on_synthetic_split(tiny_synth, tmp_path):
    """The eval path: re-tuned on val, temperature fitted, intervals and ECE reported."""
    from fundus_edge.data import open_dataset
    from fundus_edge.operating import evaluate_operating
    from fundus_edge.preprocess import PreprocessConfig

    ds = open_dataset(tiny_synth)
    if not ds.splits.get("val"):
        pytest.skip("the synthetic set has no validation split")
    labels = list(ds.label_names)

    def predict(images):
        m = images.reshape(len(images), -1).mean(1) / 255.0
        k = np.arange(len(labels))[None, :]
        return {"probs": 1 / (1 + np.exp(-(8 * m[:, None] - 2 + 0.1 * k))), "cams": None}

    meta = {"thresholds": [0.5] * len(labels)}
    rep = evaluate_operating(
        predict,
        ds,
        "test",
        labels,
        PreprocessConfig(size=64),
        meta,
        threshold_policy="sens@0.9",
        calibrate=True,
        n_boot=100,
    )
    ops = rep["operating_points"]
    assert set(ops) == set(rep["per_label"])
    first = next(iter(ops.values()))
    assert first["policy"].startswith("sens@0.9 on ")
    assert {"sensitivity", "specificity", "ppv", "npv", "n_pos", "n_neg"} <= set(first)
    cal = rep["calibration"]
    assert cal["before"]["pooled"] is not None and cal["after"]["pooled"] is not None
    assert len(cal["temperature"]) == len(labels)
    assert any("thresholds: sens@0.9" in n for n in rep["notes"])
