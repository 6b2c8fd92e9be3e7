"""Multi-label metrics: per-label and macro/micro AUROC, AP, F1; the paper's element-wise scores;
the RIADD challenge score; threshold tuning; map localisation against lesion masks.

Conventions:
* ``y_true`` ``(N, C)`` 0/1, ``y_prob`` ``(N, C)`` probabilities, ``label_names`` ``C`` names.
* Rank metrics (AUROC, AP) are computed here in numpy, with scikit-learn's definitions (the
  tests compare them with scikit-learn to 1e-12), so ``eval`` runs on an edge install: AUROC
  is the trapezoidal area under the ROC curve (ties between scores count half), AP is
  ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (no interpolation). A label with
  only one class in the split has no AUROC/AP: it is reported as ``None`` (JSON ``null``) and
  left out of the macro means; the ``notes`` list of the report names it.
* RIADD score (the RIADD 2021 challenge on RFMiD): ``0.5·AUROC(Disease_Risk) + 0.5·(macro AUROC + mAP)/2``,
  the classification part over every label except the screening label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "average_precision_score",
    "binary_counts",
    "elementwise_scores",
    "energy_inside",
    "multilabel_report",
    "nanmean_or_none",
    "pointing_game",
    "precision_recall_curve",
    "riadd_score",
    "roc_auc_score",
    "roc_curve",
    "tune_thresholds",
]


def _binary_clf_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives at each distinct score, highest score first.

    Returns:
        ``(fps, tps, thresholds)``: counts of predictions ``score >= threshold``.
    """
    y = np.asarray(y_true).ravel() > 0.5
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and y_score {s.shape} differ")
    order = np.argsort(s, kind="mergesort")[::-1]  # (N,) descending, stable
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each distinct score
    tps = np.cumsum(y, dtype=np.float64)[last]
    fps = 1.0 + last - tps
    return fps, tps, s[last]


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of a binary problem, starting at (0, 0) (threshold +inf)."""
    fps, tps, thr = _binary_clf_curve(y_true, y_score)
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


def roc_auc_score(y_true, y_score) -> float:
    """Area under the ROC curve (trapezoidal: tied scores count half).

    Raises:
        ValueError: only one class in ``y_true`` (AUROC is undefined).
    """
    fpr, tpr, _ = roc_curve(y_true, y_score)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        raise ValueError("only one class present in y_true: ROC AUC is not defined")
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def precision_recall_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)``, recall decreasing, ending at (P=1, R=0).

    As scikit-learn: one point per distinct score, then the (1, 0) end point.
    """
    fps, tps, thr = _binary_clf_curve(y_true, y_score)
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0)
    recall = tps / tps[-1] if tps[-1] > 0 else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def average_precision_score(y_true, y_score) -> float:
    """AP: ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (no interpolation)."""
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def _has_both(y: np.ndarray) -> bool:
    return bool(y.min() != y.max()) if y.size else False


def nanmean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values, ``None`` when there are none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def binary_counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` over all elements of two 0/1 arrays."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    return (
        int(np.sum(t & p)),
        int(np.sum(~t & p)),
        int(np.sum(t & ~p)),
        int(np.sum(~t & ~p)),
    )


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    # Zero-division convention: 0.0 (as sklearn's zero_division=0).
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def tune_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, default: float = 0.5, metric: str = "f1"
) -> np.ndarray:
    """Per-label threshold that maximises F1 (or Youden's J) on a validation split.

    Candidates are the midpoints between consecutive distinct probabilities, so the chosen
    threshold separates the validation scores rather than sitting on one of them. Labels with
    one class only keep ``default``.

    Args:
        y_true: ``(N, C)`` 0/1.
        y_prob: ``(N, C)`` probabilities.
        default: threshold for labels that cannot be tuned.
        metric: ``"f1"`` or ``"youden"``.

    Returns:
        ``(C,)`` float thresholds.
    """
    if metric not in ("f1", "youden"):
        raise ValueError(f"metric must be 'f1' or 'youden', got {metric!r}")
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    out = np.full(y_true.shape[1], default, dtype=np.float64)
    for c in range(y_true.shape[1]):
        t, p = y_true[:, c] > 0.5, y_prob[:, c]
        if not _has_both(t.astype(np.int8)):
            continue
        u = np.unique(p)
        cands = (u[:-1] + u[1:]) / 2 if u.size > 1 else u
        # Predictions p >= thr for every candidate at once: (T, N).
        pred = p[None, :] >= cands[:, None]
        tp = (pred & t[None]).sum(1)
        fp = (pred & ~t[None]).sum(1)
        fn = (~pred & t[None]).sum(1)
        tn = (~pred & ~t[None]).sum(1)
        if metric == "f1":
            score = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        else:
            score = tp / np.maximum(tp + fn, 1) - fp / np.maximum(fp + tn, 1)
        out[c] = float(cands[int(np.argmax(score))])
    return out


def elementwise_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The paper's accuracy, precision and recall: every (image, label) pair is one element.

    With ~5 % prevalence these flatter the model (predicting all-negative gives ~95 %
    accuracy); report them beside macro AUROC / mAP.
    """
    tp, fp, fn, tn = binary_counts(y_true, y_pred)
    precision, recall, f1 = _prf(tp, fp, fn)
    total = tp + fp + fn + tn
    return {
        "accuracy": (tp + tn) / total if total else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def riadd_score(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    label_names: Sequence[str],
    screening_label: str = "Disease_Risk",
) -> dict[str, float | None]:
    """RIADD challenge score: ``0.5·AUROC(screening) + 0.5·mean(macro AUROC, mAP)``.

    The classification part averages over the labels other than ``screening_label`` that
    have both classes. Any missing part makes the final score ``None``.

    Returns:
        ``{"screening_auroc", "macro_auroc", "map", "classification", "score"}``.
    """
    names = list(label_names)
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    screen = None
    if screening_label in names:
        j = names.index(screening_label)
        if _has_both(y_true[:, j]):
            screen = float(roc_auc_score(y_true[:, j], y_prob[:, j]))
    aucs, aps = [], []
    for c, name in enumerate(names):
        if name == screening_label or not _has_both(y_true[:, c]):
            continue
        aucs.append(float(roc_auc_score(y_true[:, c], y_prob[:, c])))
        aps.append(float(average_precision_score(y_true[:, c], y_prob[:, c])))
    macro_auc = nanmean_or_none(aucs)
    m_ap = nanmean_or_none(aps)
    cls = None if macro_auc is None or m_ap is None else (macro_auc + m_ap) / 2
    score = None if cls is None or screen is None else 0.5 * screen + 0.5 * cls
    return {
        "screening_auroc": screen,
        "macro_auroc": macro_auc,
        "map": m_ap,
        "classification": cls,
        "score": score,
    }


def multilabel_report(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    label_names: Sequence[str],
    thresholds: np.ndarray | Sequence[float] | None = None,
    screening_label: str = "Disease_Risk",
) -> dict:
    """Every classification metric for one split, as a JSON-ready dict.

    Args:
        y_true: ``(N, C)`` 0/1.
        y_prob: ``(N, C)`` probabilities.
        label_names: the ``C`` names.
        thresholds: ``(C,)`` decision thresholds (tuned on validation); default 0.5.
        screening_label: the image-level "any disease" label for the RIADD score.

    Returns:
        ``{"n", "per_label": {name: {...}}, "macro": {...}, "micro": {...},
        "elementwise": {...}, "riadd": {...}, "notes": [...]}``.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    n, c = y_true.shape
    if len(label_names) != c or y_prob.shape != y_true.shape:
        raise ValueError(
            f"shapes differ: y_true {y_true.shape}, y_prob {y_prob.shape}, {len(label_names)} names"
        )
    thr = np.full(c, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    y_pred = (y_prob >= thr[None, :]).astype(np.int8)
    yt = (y_true > 0.5).astype(np.int8)
    per_label: dict[str, dict] = {}
    notes: list[str] = []
    one_class: list[str] = []
    for j, name in enumerate(label_names):
        tp, fp, fn, tn = binary_counts(yt[:, j], y_pred[:, j])
        precision, recall, f1 = _prf(tp, fp, fn)
        auc = ap = None
        if _has_both(yt[:, j]):
            auc = float(roc_auc_score(yt[:, j], y_prob[:, j]))
            ap = float(average_precision_score(yt[:, j], y_prob[:, j]))
        else:
            one_class.append(name)
        per_label[name] = {
            "positives": int(yt[:, j].sum()),
            "threshold": float(thr[j]),
            "auroc": auc,
            "ap": ap,
            "f1": f1,
            "precision": precision,
            "recall": recall,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
        }
    if one_class:
        notes.append(
            "AUROC/AP undefined (one class in this split), excluded from macro means: "
            + ", ".join(one_class)
        )
    macro = {
        "auroc": nanmean_or_none([v["auroc"] for v in per_label.values()]),
        "ap": nanmean_or_none([v["ap"] for v in per_label.values()]),
        "f1": float(np.mean([v["f1"] for v in per_label.values()])),
        "precision": float(np.mean([v["precision"] for v in per_label.values()])),
        "recall": float(np.mean([v["recall"] for v in per_label.values()])),
        "labels_in_rank_means": c - len(one_class),
    }
    micro: dict[str, float | None] = {"auroc": None, "ap": None}
    if _has_both(yt.ravel()):
        micro["auroc"] = float(roc_auc_score(yt.ravel(), y_prob.ravel()))
        micro["ap"] = float(average_precision_score(yt.ravel(), y_prob.ravel()))
    tp, fp, fn, _ = binary_counts(yt, y_pred)
    micro["precision"], micro["recall"], micro["f1"] = _prf(tp, fp, fn)
    return {
        "n": int(n),
        "per_label": per_label,
        "macro": macro,
        "micro": micro,
        "elementwise": elementwise_scores(yt, y_pred),
        "riadd": riadd_score(yt, y_prob, label_names, screening_label),
        "notes": notes,
    }


def pointing_game(cam: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """True when the map's maximum falls inside the mask (ties: the first maximum).

    Args:
        cam: ``(H, W)`` map.
        mask: ``(H, W)`` lesion mask.
        tolerance: also a hit when the maximum lies within this many pixels of the mask
            (Zhang et al. 2016, "Top-down neural attention by excitation backprop", use 15 px
            on ~400-px images); 0 is the strict game.
    """
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask) > 0
    if cam.shape != mask.shape:
        raise ValueError(f"map {cam.shape} and mask {mask.shape} differ")
    i = int(np.argmax(cam))
    if mask.ravel()[i]:
        return True
    if tolerance <= 0:
        return False
    r, c = divmod(i, cam.shape[1])
    t = math.ceil(tolerance)
    r0, c0 = max(0, r - t), max(0, c - t)
    win = mask[r0 : r + t + 1, c0 : c + t + 1]
    ys, xs = np.nonzero(win)
    if not len(ys):
        return False
    d2 = (ys + r0 - r) ** 2 + (xs + c0 - c) ** 2
    return bool(d2.min() <= tolerance**2)


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Fraction of the (non-negative) map's mass inside the mask; ``None`` for an empty map."""
    cam = np.clip(np.asarray(cam, dtype=np.float64), 0.0, None)
    if cam.shape != mask.shape:
        raise ValueError(f"map {cam.shape} and mask {mask.shape} differ")
    total = cam.sum()
    if total <= 0:
        return None
    return float(cam[np.asarray(mask) > 0].sum() / total)
