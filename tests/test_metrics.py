"""Metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from fundus_edge.metrics import (
    elementwise_scores,
    energy_inside,
    multilabel_report,
    pointing_game,
    riadd_score,
    tune_thresholds,
)

NAMES = ["Disease_Risk", "DR", "MH", "ODC"]


def _data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.4).astype(int)
    y[:, 0] = y[:, 1:].max(1)
    p = np.clip(y * 0.35 + rng.random((n, 4)) * 0.65, 0, 1)
    y[:, 3] = 0  # ODC: no positive in this split
    return y, p


def test_report_matches_sklearn_and_handles_one_class_label():
    y, p = _data()
    thr = np.array([0.5, 0.4, 0.6, 0.5])
    rep = multilabel_report(y, p, NAMES, thr)
    for j, name in enumerate(NAMES[:3]):
        r = rep["per_label"][name]
        assert r["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert r["ap"] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
        assert r["f1"] == pytest.approx(f1_score(y[:, j], p[:, j] >= thr[j]))
    assert rep["per_label"]["ODC"]["auroc"] is None and rep["per_label"]["ODC"]["ap"] is None
    assert rep["macro"]["labels_in_rank_means"] == 3
    assert rep["macro"]["auroc"] == pytest.approx(
        np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(3)])
    )
    assert any("ODC" in n for n in rep["notes"])
    assert rep["micro"]["auroc"] == pytest.approx(roc_auc_score(y.ravel(), p.ravel()))
    pred = p >= thr
    assert rep["micro"]["f1"] == pytest.approx(f1_score(y.ravel(), pred.ravel()))


def test_elementwise_hand_case():
    y = np.array([[1, 0, 0], [0, 0, 1]])
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    s = elementwise_scores(y, pred)
    # tp=1 fp=1 fn=1 tn=3
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(0.5)


def test_riadd_score_formula():
    y, p = _data(3)
    r = riadd_score(y, p, NAMES)
    auc_dr = roc_auc_score(y[:, 0], p[:, 0])
    aucs = [roc_auc_score(y[:, j], p[:, j]) for j in (1, 2)]  # ODC has one class
    aps = [average_precision_score(y[:, j], p[:, j]) for j in (1, 2)]
    expect = 0.5 * auc_dr + 0.5 * (np.mean(aucs) + np.mean(aps)) / 2
    assert r["score"] == pytest.approx(expect)
    assert r["screening_auroc"] == pytest.approx(auc_dr)
    assert riadd_score(y, p, ["A", "B", "C", "D"])["score"] is None  # no screening label


def test_tune_thresholds_separates_and_defaults():
    y = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [0, 0]])
    p = np.array([[0.1, 0.3], [0.2, 0.2], [0.7, 0.9], [0.6, 0.1], [0.3, 0.5]])
    thr = tune_thresholds(y, p, default=0.42)
    assert 0.3 < thr[0] < 0.6  # perfectly separable: between the classes
    pred = p[:, 0] >= thr[0]
    assert (pred == y[:, 0].astype(bool)).all()
    assert thr[1] == 0.42  # one class: default kept
    # Tuned F1 is never worse than the 0.5 threshold's on the same data.
    yy, pp = _data(5)
    t = tune_thresholds(yy, pp)
    for j in range(3):
        assert f1_score(yy[:, j], pp[:, j] >= t[j]) >= f1_score(yy[:, j], pp[:, j] >= 0.5) - 1e-12


def test_localisation_measures():
    cam = np.zeros((10, 10))
    cam[2, 3] = 1.0
    cam[7, 7] = 0.5
    mask = np.zeros((10, 10), bool)
    mask[1:4, 2:5] = True
    assert pointing_game(cam, mask) is True
    assert energy_inside(cam, mask) == pytest.approx(1.0 / 1.5)
    assert pointing_game(cam, ~mask) is False
    assert energy_inside(np.zeros((10, 10)), mask) is None


def test_pointing_game_tolerance():
    cam = np.zeros((40, 40))
    cam[10, 10] = 1.0
    mask = np.zeros((40, 40), bool)
    mask[10, 14:20] = True  # 4 px to the right of the maximum
    assert pointing_game(cam, mask) is False
    assert pointing_game(cam, mask, tolerance=3.9) is False
    assert pointing_game(cam, mask, tolerance=4.0) is True
    mask[:] = False
    mask[13, 13] = True  # diagonal: sqrt(18) = 4.24 px
    assert pointing_game(cam, mask, tolerance=4.0) is False
    assert pointing_game(cam, mask, tolerance=4.3) is True


def test_localisation_report_leaves_global_labels_out_of_the_mean(tmp_path):
    import cv2

    from fundus_edge.data import Sample
    from fundus_edge.evaluate import Predictions, localisation_report
    from fundus_edge.preprocess import PreprocessConfig, preprocess

    frame = np.zeros((64, 64, 3), np.uint8)
    geo = preprocess(frame, PreprocessConfig(size=64, crop_fov=False, mask=False)).geometry
    lesion = np.zeros((64, 64), np.uint8)
    lesion[40:50, 40:50] = 255
    cv2.imwrite(str(tmp_path / "dr.png"), lesion)
    cv2.imwrite(str(tmp_path / "mh.png"), np.full((64, 64), 255, np.uint8))
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 1, 1] = 1.0  # DR: the maximum misses the lesion
    maps[1, 4, 4] = 1.0  # MH: everything is inside the whole-FOV mask
    sample = Sample("1", tmp_path / "x.png", np.array([1, 1], np.float32), "test",
                    {"DR": tmp_path / "dr.png", "MH": tmp_path / "mh.png"})  # fmt: skip
    preds = Predictions(["1"], np.zeros((1, 2)), [geo], maps={0: maps})
    rep = localisation_report([sample], preds, ["DR", "MH"], global_labels=["MH"])
    assert rep["per_label"]["MH"]["pointing_game"] == 1.0 and rep["per_label"]["MH"]["global"]
    assert rep["macro"]["pointing_game"] == 0.0 and rep["excluded"] == ["MH"]
    both = localisation_report([sample], preds, ["DR", "MH"])
    assert both["macro"]["pointing_game"] == 0.5


def test_numpy_rank_metrics_equal_sklearn_with_ties():
    """eval runs on the edge install: AUROC, AP and the curves are ours, equal to sklearn's."""
    from sklearn.metrics import precision_recall_curve as sk_pr
    from sklearn.metrics import roc_curve as sk_roc

    from fundus_edge import metrics as m

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 120))
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1
        s = rng.random(n)
        if trial % 3 == 0:
            s = np.round(s, 1)  # many ties
        if trial % 7 == 0:
            s = rng.integers(0, 3, n).astype(float)
        assert m.roc_auc_score(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m.average_precision_score(y, s) == pytest.approx(
            average_precision_score(y, s), abs=1e-12
        )
        for ours, theirs in zip(m.precision_recall_curve(y, s), sk_pr(y, s), strict=True):
            np.testing.assert_allclose(ours, theirs, atol=1e-12)
        for ours, theirs in zip(
            m.roc_curve(y, s), sk_roc(y, s, drop_intermediate=False), strict=True
        ):
            np.testing.assert_allclose(ours, theirs, atol=1e-12)
    with pytest.raises(ValueError, match="one class"):
        m.roc_auc_score([1, 1, 1], [0.1, 0.2, 0.3])


def test_metrics_import_no_sklearn():
    import subprocess
    import sys

    code = "import sys, fundus_edge.metrics, fundus_edge.evaluate; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
