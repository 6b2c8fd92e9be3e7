"""Operating points: threshold policies, intervals, calibration and temperature scaling.

numpy only (an edge install has no torch or scikit-learn).

* **Threshold policies** (:func:`parse_policy`, :func:`tune`), per label, tuned on a
  validation split: ``f1`` (best F1, the trainer's default), ``youden`` (max TPR - FPR),
  ``sens@X`` (the highest threshold whose validation sensitivity is >= X: screening) and
  ``spec@X`` (the lowest threshold whose validation specificity is >= X). Candidates are the
  midpoints between consecutive distinct scores (as :func:`~fundus_edge.metrics.tune_thresholds`)
  plus the lowest score itself and a point just above the highest, so a threshold separates
  validation scores rather than sitting on one. A label with one class in the split keeps
  ``default`` (0.5).
* **Operating-point figures** (:func:`operating_points`): per label sensitivity, specificity,
  PPV and NPV at the thresholds, each with a percentile-bootstrap 95 % interval over images
  (1000 resamples, fixed seed; the resamples are drawn as multinomial image weights, so the
  counts of every resample come from one matrix product).
* **Calibration** (:func:`ece`): expected calibration error over 15 equal-width bins, per
  label and pooled over every (image, label) element; :func:`plot_reliability` draws it.
* **Temperature scaling** (:func:`fit_temperature`): one temperature *per label*, fitted on
  validation by minimising the NLL of ``sigmoid(logit(p) / T)`` (golden-section search on
  ``log T``; the NLL is convex in ``1/T``). A label with one class in the split (where the
  NLL has no finite minimum) takes the temperature fitted on all labels pooled. Exported
  models carry it as ``temperature`` (a list, one per label; a scalar is accepted) and the
  runtime applies :func:`apply_temperature` before the thresholds.
  :func:`map_thresholds` carries thresholds through the same monotone map, so calibrating
  alone changes probabilities but never a decision.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError

__all__ = [
    "ECE_BINS",
    "Policy",
    "apply_temperature",
    "bootstrap_rates",
    "ece",
    "evaluate_operating",
    "fit_temperature",
    "map_thresholds",
    "operating_points",
    "parse_policy",
    "plot_reliability",
    "temperature_vector",
    "tune",
]

ECE_BINS = 15
_EPS = 1e-12
_T_RANGE = (0.05, 20.0)


# ------------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    """A threshold policy: ``kind`` in f1, youden, sens, spec; ``target`` for sens/spec."""

    kind: str
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}@{self.target:g}"


def parse_policy(text: str | Policy, option: str = "--threshold-policy") -> Policy:
    """``f1``, ``youden``, ``sens@0.90``, ``spec@0.95`` (any value in (0, 1) after ``@``).

    Raises:
        UserError: one line naming ``option`` and the accepted forms.
    """
    if isinstance(text, Policy):
        return text
    s = str(text).strip().lower()
    if s in ("f1", "youden"):
        return Policy(s)
    m = re.fullmatch(r"(sens|spec)@([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", s)
    if m:
        target = float(m.group(2))
        if 0.0 < target < 1.0:
            return Policy(m.group(1), target)
    raise UserError(
        f"{option} {text!r}: expected f1, youden, sens@X or spec@X with X in (0, 1), e.g. sens@0.90"
    )


def _candidates(p: np.ndarray) -> np.ndarray:
    u = np.unique(p)
    mids = (u[:-1] + u[1:]) / 2
    above = min(float(np.nextafter(u[-1], np.inf)), 1.0) if u[-1] < 1.0 else float(u[-1])
    return np.unique(np.r_[u[0], mids, above])  # ascending


def tune(
    y_true: np.ndarray, probs: np.ndarray, policy: str | Policy, default: float = 0.5
) -> np.ndarray:
    """Per-label thresholds for ``policy`` on a validation split (predicted positive: p >= t).

    Args:
        y_true: ``(N, C)`` 0/1.
        probs: ``(N, C)`` probabilities.
        policy: see :func:`parse_policy`.
        default: threshold of a label with one class in the split.

    Returns:
        ``(C,)`` thresholds.
    """
    pol = parse_policy(policy)
    if pol.kind in ("f1", "youden"):
        from fundus_edge.metrics import tune_thresholds

        return tune_thresholds(y_true, probs, default=default, metric=pol.kind)
    y = np.asarray(y_true, dtype=np.float64) > 0.5
    probs = np.asarray(probs, dtype=np.float64)
    out = np.full(y.shape[1], default, dtype=np.float64)
    for c in range(y.shape[1]):
        t, p = y[:, c], probs[:, c]
        if t.all() or not t.any():
            continue
        cands = _candidates(p)  # ascending
        pos, neg = np.sort(p[t]), np.sort(p[~t])
        if pol.kind == "sens":
            # sensitivity falls as the threshold rises: the highest candidate still >= target
            sens = (pos.size - np.searchsorted(pos, cands, side="left")) / pos.size
            ok = np.flatnonzero(sens >= pol.target - 1e-12)
            out[c] = float(cands[ok[-1]])
        else:
            spec = np.searchsorted(neg, cands, side="left") / neg.size
            ok = np.flatnonzero(spec >= pol.target - 1e-12)
            out[c] = float(cands[ok[0]])
    return out


# ------------------------------------------------------------------- intervals, calibration


def _rates(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
        }


def bootstrap_rates(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, np.ndarray]]:
    """Sensitivity, specificity, PPV and NPV per label with percentile-bootstrap intervals.

    Images are resampled with replacement (one resample draws every label of an image), as
    multinomial weights: the counts of all resamples are one ``(B, N) @ (N, C)`` product.

    Returns:
        ``{rate: {"value": (C,), "lo": (C,), "hi": (C,)}}``; NaN where the rate is undefined
        (no positives, no negatives, no predicted positives...).
    """
    t = np.asarray(y_true) > 0.5
    d = np.asarray(y_pred).astype(bool)
    n = t.shape[0]
    cells = [(t & d), (~t & d), (t & ~d), (~t & ~d)]  # tp fp fn tn, (N, C)
    point = _rates(*[x.sum(0).astype(np.float64) for x in cells])
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in point}
    mats = [x.astype(np.float32) for x in cells]
    step = max(1, min(n_boot, 4_000_000 // max(n, 1)))  # ~16 MB of weights per block
    done = 0
    while done < n_boot:
        b = min(step, n_boot - done)
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float32)  # (b, N)
        for k, v in _rates(*[w @ m for m in mats]).items():
            draws[k].append(v)
        done += b
    alpha = (1.0 - level) / 2 * 100
    out = {}
    for k, v in point.items():
        arr = np.concatenate(draws[k])  # (B, C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN interval
            lo, hi = np.nanpercentile(arr, [alpha, 100 - alpha], axis=0)
        out[k] = {
            "value": v,
            "lo": np.where(np.isnan(v), np.nan, lo),
            "hi": np.where(np.isnan(v), np.nan, hi),
        }
    return out


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((np.asarray(p) * n_bins).astype(np.int64), n_bins - 1)


def ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float | None:
    """Expected calibration error of one label (or any flat set of 0/1 outcomes).

    ``sum_b (n_b / N) |mean(y)_b - mean(p)_b|`` over ``n_bins`` equal-width bins of [0, 1].
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), 0.0, 1.0)
    if not p.size:
        return None
    b = _bins(p, n_bins)
    acc = np.bincount(b, weights=y, minlength=n_bins)
    conf = np.bincount(b, weights=p, minlength=n_bins)
    return float(np.abs(acc - conf).sum() / p.size)


def reliability(y_true, probs, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: ``(mean confidence, observed frequency, count)``; NaN for empty bins."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), 0.0, 1.0)
    b = _bins(p, n_bins)
    cnt = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(b, weights=p, minlength=n_bins) / cnt
        freq = np.bincount(b, weights=y, minlength=n_bins) / cnt
    return conf, freq, cnt


def calibration_report(
    y_true: np.ndarray, probs: np.ndarray, names: Sequence[str], n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """``{"pooled": ECE, "per_label": {name: ECE}}``."""
    y = np.asarray(y_true, dtype=np.float64) > 0.5
    p = np.asarray(probs, dtype=np.float64)
    return {
        "pooled": ece(y, p, n_bins),
        "per_label": {n: ece(y[:, j], p[:, j], n_bins) for j, n in enumerate(names)},
    }


# ------------------------------------------------------------------------ temperature


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t
    # -[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))] = softplus(s) - y s
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def _fit_one(z: np.ndarray, y: np.ndarray, iters: int = 100) -> float:
    lo, hi = math.log(_T_RANGE[0]), math.log(_T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(z, y, math.exp(a)), _nll(z, y, math.exp(b))
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(z, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(z, y, math.exp(b))
        if hi - lo < 1e-10:
            break
    return float(math.exp((lo + hi) / 2))


def fit_temperature(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One temperature per label minimising the validation NLL of ``sigmoid(logit(p) / T)``.

    Labels with one class in the split take the temperature fitted on all labels pooled.
    ``T`` is searched in [0.05, 20].

    Returns:
        ``(C,)`` temperatures (``T > 1`` softens overconfident scores).
    """
    y = (np.asarray(y_true, dtype=np.float64) > 0.5).astype(np.float64)
    z = _logit(probs)
    pooled = _fit_one(z.ravel(), y.ravel())
    out = np.full(y.shape[1], pooled, dtype=np.float64)
    for c in range(y.shape[1]):
        if 0 < y[:, c].sum() < y.shape[0]:
            out[c] = _fit_one(z[:, c], y[:, c])
    return out


def temperature_vector(temperature: Any, c: int, source: str = "model") -> np.ndarray | None:
    """The contract's ``temperature`` (None, a scalar or C values) as ``(C,)``; None if absent.

    Raises:
        UserError: wrong length or a value that is not a positive number.
    """
    if temperature is None:
        return None
    vals = temperature if isinstance(temperature, list) else [temperature] * c
    if len(vals) != c or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in vals
    ):
        raise UserError(
            f"{source}: temperature must be a positive number or {c} positive numbers (one per "
            f"label), got {temperature!r}"
        )
    return np.asarray(vals, dtype=np.float64)


def apply_temperature(
    probs: np.ndarray, temperature: np.ndarray | None, inverse: bool = False
) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` along the last axis (``inverse``: ``sigmoid(logit(p) * T)``);
    ``probs`` unchanged when ``T`` is None."""
    if temperature is None:
        return probs
    p = np.asarray(probs)
    t = np.asarray(temperature, dtype=np.float64)
    z = _logit(p) * t if inverse else _logit(p) / t
    return (1.0 / (1.0 + np.exp(-z))).astype(p.dtype if p.dtype.kind == "f" else np.float64)


def map_thresholds(thresholds: Sequence[float], temperature: np.ndarray | None) -> np.ndarray:
    """Thresholds through the temperature's monotone map: the same decisions as before."""
    thr = np.asarray(thresholds, dtype=np.float64)
    if temperature is None:
        return thr
    return np.clip(apply_temperature(thr, temperature), 0.0, 1.0)


# --------------------------------------------------------------------------- report


def operating_points(
    y_true: np.ndarray,
    probs: np.ndarray,
    names: Sequence[str],
    thresholds: Sequence[float],
    policy: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per label: threshold, policy, sens/spec/ppv/npv ``{"value", "ci": [lo, hi]}``, n_pos, n_neg."""
    y = np.asarray(y_true, dtype=np.float64) > 0.5
    thr = np.asarray(thresholds, dtype=np.float64)
    pred = np.asarray(probs, dtype=np.float64) >= thr[None, :]
    boot = bootstrap_rates(y, pred, n_boot=n_boot, seed=seed)

    def num(v) -> float | None:
        return None if not np.isfinite(v) else round(float(v), 6)

    out = {}
    for j, name in enumerate(names):
        rec: dict[str, Any] = {"threshold": float(thr[j]), "policy": policy}
        for k, b in boot.items():
            rec[k] = {"value": num(b["value"][j]), "ci": [num(b["lo"][j]), num(b["hi"][j])]}
        rec["n_pos"] = int(y[:, j].sum())
        rec["n_neg"] = int((~y[:, j]).sum())
        out[name] = rec
    return out


def plot_reliability(
    y_true: np.ndarray,
    before: np.ndarray,
    after: np.ndarray | None,
    path: str | Path,
    title: str = "Reliability",
) -> Path:
    """Pooled reliability diagram (observed frequency against mean confidence per bin)."""
    from fundus_edge.plots import _figure, _save

    plt, fig, axes = _figure(size=(5.5, 5.0))
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for probs, label, style in ((before, "model", "o-"), (after, "temperature-scaled", "s-")):
        if probs is None:
            continue
        conf, freq, cnt = reliability(y_true, probs)
        keep = cnt > 0
        ax.plot(
            conf[keep],
            freq[keep],
            style,
            ms=4,
            lw=1.2,
            label=f"{label} (ECE {ece(y_true, probs):.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"mean predicted probability ({ECE_BINS} bins)")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path)


def evaluate_operating(
    predict: Callable[[np.ndarray], dict[str, Any]],
    ds: Any,
    split: str,
    labels: Sequence[str],
    pre: Any,
    meta: dict[str, Any],
    *,
    threshold_policy: str | None = None,
    calibrate: bool = False,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    """:func:`fundus_edge.evaluate.evaluate` at an operating point, with its intervals.

    Thresholds and temperature come from the model's metadata unless ``threshold_policy``
    re-tunes the thresholds or ``calibrate`` fits a temperature, both on ``ds``'s validation
    split (``val``). A temperature (the model's or fitted) is applied to every probability
    before the thresholds. Adds ``operating_points`` (see :func:`operating_points`) and
    ``calibration`` (ECE before/after the temperature, the temperatures, the threshold
    source) to the report, and ``reliability.png`` to the figures when ``out_dir`` is set.
    """
    from fundus_edge.evaluate import align_labels, evaluate, predict_samples

    c = len(labels)
    temp = temperature_vector(meta.get("temperature"), c, "model metadata")
    thr = meta.get("thresholds")
    source = str(meta.get("threshold_policy") or "model metadata")
    notes: list[str] = []
    if threshold_policy is not None or calibrate:
        pol = parse_policy(threshold_policy) if threshold_policy is not None else None
        val = ds.splits.get("val") or []
        if not val:
            raise UserError(
                f"{ds.root}: no validation split to tune on "
                f"({'--threshold-policy' if pol else '--calibrate'} needs one)"
            )
        m_idx, d_idx, _ = align_labels(labels, ds.label_names)
        vp = predict_samples(
            predict, val, pre, batch_size, keep_maps=lambda i, s: False, description="val"
        ).probs
        vy = np.zeros((len(val), c))
        vy[:, m_idx] = np.stack([s.labels for s in val])[:, d_idx]
        if calibrate:
            old = temp
            temp = fit_temperature(vy[:, m_idx], vp[:, m_idx])
            full = np.ones(c) if old is None else old.copy()
            full[m_idx] = temp
            temp = full
            if pol is None and thr is not None:
                # calibrating alone: thresholds follow the probabilities, decisions do not move
                raw = apply_temperature(np.asarray(thr, dtype=np.float64), old, inverse=True)
                thr = map_thresholds(raw, temp).tolist()
        if pol is not None:
            tuned = np.asarray(thr if thr is not None else [0.5] * c, dtype=np.float64).copy()
            t_val = None if temp is None else temp[m_idx]
            tuned[m_idx] = tune(vy[:, m_idx], apply_temperature(vp[:, m_idx], t_val), pol)
            thr = tuned.tolist()
            source = f"{pol} on {ds.root} (val, {len(val)} images)"
        notes.append(f"thresholds: {source}")

    raw_rows: list[np.ndarray] = []

    def scaled(images: np.ndarray) -> dict[str, Any]:
        out = dict(predict(images))
        raw_rows.append(np.asarray(out["probs"], dtype=np.float64))
        out["probs"] = apply_temperature(raw_rows[-1], temp)
        return out

    report = evaluate(
        scaled,
        ds.splits[split],
        ds.label_names,
        labels,
        pre,
        thresholds=thr,
        out_dir=out_dir,
        batch_size=batch_size,
        split=split,
        **evaluate_kwargs,
    )
    report["notes"] = notes + report["notes"]
    samples = ds.splits[split]
    m_idx, d_idx, _ = align_labels(labels, ds.label_names)
    names = [labels[j] for j in m_idx]
    y = np.stack([s.labels for s in samples])[:, d_idx]
    before = np.concatenate(raw_rows)[:, m_idx]
    after = apply_temperature(before, None if temp is None else temp[m_idx])
    used = np.array([report["per_label"][n]["threshold"] for n in names])
    report["operating_points"] = operating_points(y, after, names, used, source, n_boot)
    report["calibration"] = {
        "bins": ECE_BINS,
        "temperature": None if temp is None else [round(float(v), 6) for v in temp],
        "temperature_source": None
        if temp is None
        else ("fitted on val" if calibrate else "model metadata"),
        "before": calibration_report(y, before, names),
        "after": None if temp is None else calibration_report(y, after, names),
    }
    if out_dir is not None:
        path = plot_reliability(
            y,
            before,
            None if temp is None else after,
            Path(out_dir) / "reliability.png",
            f"Reliability ({split})",
        )
        report["figures"]["reliability"] = str(path)
    return report
