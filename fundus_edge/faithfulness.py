"""Faithfulness of class maps: deletion and insertion AUC (Petsiuk et al., RISE, BMVC 2018)
and ROAD (Rong et al., ICML 2022).

A map is *faithful* when the pixels it ranks highest are the ones the model's probability for
that label depends on. For a label and an image where the label is positive in the ground
truth, the map (at the model input's resolution: :func:`fundus_edge.maps.resample`, bilinear,
onto the preprocessed square) ranks the input's pixels; then

* **deletion**: the top ``k/steps`` fraction of pixels (k = 0..steps) is replaced by a blurred
  copy of the image, and the label's probability is tracked - it should fall fast, so the area
  under the curve (over the fraction of pixels, 0..1) is **lower for a better map**;
* **insertion**: starting from the blurred image, the top fraction is restored from the
  original - the probability should rise fast, so its AUC is **higher for a better map**.

Deleted pixels take the value of a Gaussian-blurred copy (sigma :data:`BLUR_SIGMA` of the input
side), the "blur" baseline common since RISE: replacing with black would put sharp edges (a
new, out-of-distribution feature) into a fundus photograph whose background is already black.
The fraction counts every pixel of the square input, the black outside the field of view
included (a map puts little there, so it is deleted last). Ties in a map (large zero areas)
are broken in a seeded random order. The probability is the model's own (before any
temperature ``eval --calibrate`` fits), read through the same predict function ``eval`` uses,
in batches.

**ROAD** (RemOve And Debias) removes pixels by *imputing* them from their neighbours
(``pytorch_grad_cam.metrics.road``: ``NoisyLinearImputer``, through its
``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` perturbations) rather than blurring, so
the removed region's shape leaks less into the score. At each of :data:`ROAD_PERCENTILES`
(the package's own, 10..90) p, the package imputes the pixels ranked above the p-th
percentile: **MoRF** removes the most relevant ``100 - p`` % of the pixels (the probability
should fall: lower is better), **LeRF** the least relevant ``100 - p`` % (it should stay:
higher is better). Each score is the label's probability after imputation minus before,
averaged over the percentiles; **combined** is ``(LeRF - MoRF) / 2`` as ``ROADCombined``
computes it (higher is better). Deviations from the package's own metric, for the edge
contract: the map is turned into its pixel ranking first (ties broken in the seeded order,
so a map with large zero areas removes exactly the share asked for, where the package's
``mask < threshold`` would remove every tied pixel); the image is imputed on the 0-1 scale
(the imputer's default noise, 0.01, is then 2.55 grey levels) and rounded back to uint8,
the input every fundus-edge model takes; and the probability is read through the same
predict function as above, not a torch module. So ROAD needs torch, SciPy and grad-cam in
this environment (the ``train`` extra) but not a torch *model*: an exported model gets it
too. Without them the report's ``road`` is None and a note says which package is missing.
The imputer's noise is drawn from torch's generator seeded with ``seed`` inside a forked RNG
state (the caller's torch RNG is left as it was), so the figures repeat.

Methods: ``kernel`` (the model's own maps, the exported graph's CAM kernels, combined as
:mod:`fundus_edge.maps` does), ``gradcam`` (``pytorch_grad_cam.GradCAM`` on each member's CAM
target layer, through :class:`fundus_edge.explain._CheckpointMaps` on the torch backend's
module, members combined the same way; checkpoints with the ``train`` extra only) and
``random`` (a seeded uniform map at the kernel maps' grid, resampled like them: the baseline a
map has to beat).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger, progress
from fundus_edge.maps import normalise_member_maps, resample

__all__ = [
    "BLUR_SIGMA",
    "DEFAULT_IMAGES",
    "DEFAULT_STEPS",
    "METHODS",
    "ROAD_PERCENTILES",
    "add_faithfulness",
    "auc",
    "blurred",
    "checkpoint_gradcam",
    "curves",
    "faithfulness_report",
    "parse_road_percentiles",
    "road",
    "road_unavailable",
    "validate_options",
]

log = get_logger("faithfulness")

#: Method names, in report order.
METHODS = ("kernel", "gradcam", "random")
DEFAULT_STEPS = 16
DEFAULT_IMAGES = 32
#: Gaussian sigma of the deletion/insertion baseline, as a fraction of the input side.
BLUR_SIGMA = 1 / 32
#: ROAD percentiles (``pytorch_grad_cam.metrics.road``'s defaults): at p, 100 - p % is removed.
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)

PredictFn = Callable[[np.ndarray], dict[str, Any]]
#: (image uint8 (S,S,3), class indices) -> (L, h, w) combined maps for those classes.
GradcamFn = Callable[[np.ndarray, list[int]], np.ndarray]


def validate_options(images: int, steps: int) -> None:
    """``--faithfulness-images`` >= 1 and ``--faithfulness-steps`` >= 2, else a UserError."""
    if int(images) < 1:
        raise UserError(f"--faithfulness-images {images}: must be >= 1")
    if int(steps) < 2:
        raise UserError(f"--faithfulness-steps {steps}: must be >= 2")


def parse_road_percentiles(text: str) -> tuple[int, ...]:
    """``--faithfulness-road``: ``"10,50,90"`` -> ``(10, 50, 90)``; ``"none"`` -> ``()`` (no ROAD).

    Raises:
        UserError: not integers in 1..99, or a repeated one.
    """
    text = text.strip()
    if text.lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(
            f"--faithfulness-road {text!r}: give percentiles such as 10,50,90, or none"
        ) from None
    if any(not 0 < v < 100 for v in values) or len(set(values)) != len(values):
        raise UserError(f"--faithfulness-road {text!r}: distinct percentiles in 1..99, or none")
    return values


def blurred(image: np.ndarray) -> np.ndarray:
    """The baseline deleted pixels take: Gaussian blur, sigma :data:`BLUR_SIGMA` x side."""
    sigma = max(1.0, BLUR_SIGMA * max(image.shape[:2]))
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)


def auc(y: np.ndarray) -> float:
    """Trapezoidal area under ``y`` sampled at evenly spaced fractions 0..1."""
    y = np.asarray(y, dtype=np.float64)
    return float((y[:-1] + y[1:]).sum() / (2.0 * (len(y) - 1)))


def _ranks(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank of each pixel (0 = most important), ties in a seeded random order."""
    flat = np.asarray(m, dtype=np.float64).ravel()
    order = np.lexsort((rng.permutation(flat.size), -flat))
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(m.shape)


def _perturbed(image, base, ranks, steps: int) -> np.ndarray:
    """Intermediate deletion then insertion images (k = 1..steps-1), (2*(steps-1), S, S, 3)."""
    n = ranks.size
    out = []
    for insert in (False, True):
        for k in range(1, steps):
            top = (ranks < round(k * n / steps))[..., None]
            out.append(np.where(top, image, base) if insert else np.where(top, base, image))
    return np.stack(out)


def _probs(predict: PredictFn, images: np.ndarray, batch_size: int) -> np.ndarray:
    rows = [
        np.asarray(predict(np.ascontiguousarray(images[i : i + batch_size]))["probs"])
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(rows).astype(np.float64)


def curves(
    predict: PredictFn,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    label: int,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 16,
    seed: int = 0,
    ends: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deletion and insertion curves of one image and label for each map.

    Args:
        predict: the predict function (uint8 (N,S,S,3) -> ``{"probs": (N,C)}``).
        image: the preprocessed uint8 (S,S,3) model input.
        maps: method -> a map of any grid (resampled onto the input here).
        label: the class index whose probability is tracked.
        steps: curve steps (``steps + 1`` points over the fraction 0..1).
        batch_size: images per predict call.
        seed: the tie-breaking order's seed.
        ends: the probability vectors of the image and of its blurred copy, if known.

    Returns:
        method -> (deletion, insertion), each ``(steps + 1,)`` probabilities.
    """
    base = blurred(image)
    if ends is None:
        p = _probs(predict, np.stack([image, base]), batch_size)
        ends = (p[0], p[1])
    p_img, p_base = float(ends[0][label]), float(ends[1][label])
    rng = np.random.default_rng(seed)
    names = list(maps)
    stacks = [
        _perturbed(image, base, _ranks(resample(maps[m], image.shape[:2]), rng), steps)
        for m in names
    ]
    probs = _probs(predict, np.concatenate(stacks), batch_size)[:, label]
    out = {}
    for j, m in enumerate(names):
        mid = probs[j * 2 * (steps - 1) : (j + 1) * 2 * (steps - 1)]
        dele = np.concatenate([[p_img], mid[: steps - 1], [p_base]])
        ins = np.concatenate([[p_base], mid[steps - 1 :], [p_img]])
        out[m] = (dele, ins)
    return out


def road_unavailable() -> str | None:
    """None when ROAD can run here; else a note naming the missing package."""
    import importlib.util

    for module, dist in (("torch", "torch"), ("scipy", "scipy"), ("pytorch_grad_cam", "grad-cam")):
        if importlib.util.find_spec(module) is None:
            return f"ROAD left out: {dist} is not installed (the train extra)"
    return None


def _as_uint8(x) -> np.ndarray:
    """float (3,S,S) on the 0-1 scale -> uint8 (S,S,3), rounded and clipped."""
    y = x.permute(1, 2, 0).numpy() * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def road(
    predict: PredictFn,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    label: int,
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    batch_size: int = 16,
    seed: int = 0,
    p_image: float | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """ROAD of one image and label for each map (see the module docstring).

    Args:
        predict: the predict function (uint8 (N,S,S,3) -> ``{"probs": (N,C)}``).
        image: the preprocessed uint8 (S,S,3) model input.
        maps: method -> a map of any grid (resampled onto the input here).
        label: the class index whose probability is tracked.
        percentiles: grad-cam's ROAD percentiles (at p, 100 - p % of the pixels is imputed).
        batch_size: images per predict call.
        seed: the tie-breaking order's and the imputer noise's seed.
        p_image: the label's probability on ``image``, if known.

    Returns:
        method -> ``{"morf": (P,), "lerf": (P,)}``: the probability after imputation minus
        before, per percentile.

    Raises:
        MissingDependencyError: torch or grad-cam (the ``train`` extra) is missing.
    """
    from fundus_edge.errors import require

    torch = require("torch", purpose="ROAD (eval --faithfulness)")
    road_mod = require("pytorch_grad_cam.metrics.road", purpose="ROAD (eval --faithfulness)")
    orders = (road_mod.ROADMostRelevantFirst, road_mod.ROADLeastRelevantFirst)
    rng = np.random.default_rng(seed)
    n = image.shape[0] * image.shape[1]
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)  # (3,S,S), 0-1
    names = list(maps)
    imputed = []
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # grad-cam thresholds with np.float32(tensor): NumPy 2 warns once per call about it.
        warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
        torch.manual_seed(seed)
        for m in names:
            ranks = _ranks(resample(maps[m], image.shape[:2]), rng)  # 0 = most relevant
            # The ranking as the relevance map: evenly spaced in [0, 1], no ties.
            relevance = torch.from_numpy((1.0 - ranks / max(n - 1, 1)).astype(np.float32))
            for order in orders:
                for p in percentiles:
                    imputed.append(_as_uint8(order(percentile=p).perturbation(x, relevance)))
    if p_image is None:
        p_image = float(_probs(predict, image[None], 1)[0, label])
    diff = _probs(predict, np.stack(imputed), batch_size)[:, label] - p_image
    k = len(percentiles)
    return {
        m: {
            "morf": diff[2 * j * k : (2 * j + 1) * k],
            "lerf": diff[(2 * j + 1) * k : (2 * j + 2) * k],
        }
        for j, m in enumerate(names)
    }


def checkpoint_gradcam(backend) -> GradcamFn:
    """Grad-CAM maps from the torch backend's model, as ``explain`` makes them.

    Each member's map at its CAM target layer (``pytorch_grad_cam.GradCAM``), combined by
    :func:`fundus_edge.maps.normalise_member_maps`.

    Args:
        backend: a loaded :class:`~fundus_edge.backends.TorchBackend` (its module is used as
            it is, on its device: the checkpoint is not read a second time).
    """
    from fundus_edge.explain import _CheckpointMaps

    maps = _CheckpointMaps(backend)

    def gradcam(image: np.ndarray, classes: list[int]) -> np.ndarray:
        return normalise_member_maps(maps.gradcam_members("gradcam", image, list(classes)))

    return gradcam


def faithfulness_report(
    predict: PredictFn,
    samples: Sequence[Any],
    data_label_names: Sequence[str],
    model_label_names: Sequence[str],
    preprocess_cfg: Any,
    *,
    images: int = DEFAULT_IMAGES,
    steps: int = DEFAULT_STEPS,
    gradcam: GradcamFn | None = None,
    gradcam_note: str | None = None,
    road_percentiles: Sequence[int] | None = ROAD_PERCENTILES,
    batch_size: int = 16,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Deletion/insertion AUC and ROAD per label and method over the label's positive images.

    Args:
        predict: the predict function ``eval`` uses.
        samples: the split (:class:`~fundus_edge.data.Sample`).
        data_label_names: the samples' label order.
        model_label_names: the model's label order (its maps' order).
        preprocess_cfg: the model's preprocessing.
        images: at most this many positive images per label (the split's first ones).
        steps: curve steps.
        gradcam: grad-cam maps (:func:`checkpoint_gradcam`); None leaves the method out.
        gradcam_note: why grad-cam is left out, for the report's notes.
        road_percentiles: ROAD's percentiles; None or empty leaves ROAD out, as does a
            missing torch or grad-cam (:func:`road_unavailable`); a note says why.
        batch_size: images per predict call.
        seed: random maps, tie-breaking and the ROAD imputer's noise.
        out_dir: where to write ``faithfulness.png`` (None: no plot).

    Returns:
        ``{"per_label": {label: {method: {"deletion_auc", "insertion_auc", "n"}}},
        "macro": {method: {"deletion_auc", "insertion_auc", "labels"}}, "curves": {method:
        {"fraction", "deletion", "insertion"}}, "road", "methods", "steps",
        "images_per_label", "baseline", "seed", "notes", "figure"}``. With ROAD each
        per-label and macro entry also has ``road_morf``, ``road_lerf`` and
        ``road_combined``, and ``road`` is ``{"percentiles", "removed_fraction", "curves":
        {method: {"morf", "lerf"}}, "imputer"}`` (the macro mean per percentile); else
        ``road`` is None.
    """
    from fundus_edge.evaluate import align_labels
    from fundus_edge.preprocess import preprocess, read_image

    validate_options(images, steps)
    m_idx, d_idx, _ = align_labels(model_label_names, data_label_names)
    notes: list[str] = []
    if gradcam is None and gradcam_note:
        notes.append(gradcam_note)
    percentiles = tuple(int(p) for p in (road_percentiles or ()))
    if any(not 0 < p < 100 for p in percentiles):
        raise UserError(f"ROAD percentiles {list(percentiles)}: each must be in 1..99")
    why = road_unavailable() if percentiles else "ROAD left out: not asked for (no percentiles)"
    if why is not None:
        notes.append(why)
        percentiles = ()
    # Which images, for which labels (model index): the first `images` positives per label.
    wanted: dict[int, list[int]] = {}
    for mi, di in zip(m_idx, d_idx, strict=True):
        pos = [i for i, s in enumerate(samples) if float(s.labels[di]) > 0.5][:images]
        for i in pos:
            wanted.setdefault(i, []).append(mi)
    rng = np.random.default_rng(seed)
    # label -> method -> one record per image: deletion, insertion (and ROAD's morf, lerf)
    rows: dict[int, dict[str, list[dict[str, np.ndarray]]]] = {}
    no_kernel = False
    for i in progress(sorted(wanted), total=len(wanted), description="faithfulness"):
        classes = wanted[i]
        image = preprocess(read_image(samples[i].path), preprocess_cfg).image
        base = blurred(image)
        out = predict(np.stack([image, base]))
        ends = (np.asarray(out["probs"][0]), np.asarray(out["probs"][1]))
        cams = out.get("cams")
        kernel = None if cams is None else np.asarray(cams[0], dtype=np.float32)  # (C,h,w)
        no_kernel = no_kernel or kernel is None
        grid = kernel.shape[-2:] if kernel is not None else (8, 8)
        gc = gradcam(image, classes) if gradcam is not None else None
        for j, c in enumerate(classes):
            maps: dict[str, np.ndarray] = {}
            if kernel is not None:
                maps["kernel"] = kernel[c]
            if gc is not None:
                maps["gradcam"] = gc[j]
            maps["random"] = rng.random(grid).astype(np.float32)
            # One seed per (image, label): ROAD ranks the pixels exactly as the curves do.
            s = int(rng.integers(2**31))
            res = curves(predict, image, maps, c, steps, batch_size, seed=s, ends=ends)
            rd = (
                road(predict, image, maps, c, percentiles, batch_size, s, float(ends[0][c]))
                if percentiles
                else {}
            )
            per = rows.setdefault(c, {})
            for m, (dele, ins) in res.items():
                per.setdefault(m, []).append({"deletion": dele, "insertion": ins, **rd.get(m, {})})
    if no_kernel:
        notes.append("the model gives no class maps: no kernel row")
    methods = [m for m in METHODS if any(m in per for per in rows.values())]
    per_label: dict[str, dict[str, dict[str, Any]]] = {}
    label_curves: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in methods}
    for c in sorted(rows):
        name = str(model_label_names[c])
        per_label[name] = {}
        for m in methods:
            recs = rows[c].get(m, [])
            if not recs:
                continue
            entry: dict[str, Any] = {
                "deletion_auc": round(float(np.mean([auc(r["deletion"]) for r in recs])), 6),
                "insertion_auc": round(float(np.mean([auc(r["insertion"]) for r in recs])), 6),
                "n": len(recs),
            }
            keys = (
                ("deletion", "insertion", "morf", "lerf")
                if percentiles
                else ("deletion", "insertion")
            )
            mean = {k: np.mean([r[k] for r in recs], axis=0) for k in keys}  # over images
            for k in keys:
                label_curves[m].setdefault(k, []).append(mean[k])
            if percentiles:
                entry["road_morf"] = round(float(mean["morf"].mean()), 6)
                entry["road_lerf"] = round(float(mean["lerf"].mean()), 6)
                entry["road_combined"] = round(float((mean["lerf"] - mean["morf"]).mean() / 2), 6)
            per_label[name][m] = entry
    missing = [str(model_label_names[c]) for c in m_idx if c not in rows]
    if missing:
        notes.append(f"no positive images in the split (not scored): {', '.join(missing)}")
    macro: dict[str, dict[str, Any]] = {}
    mean_curves: dict[str, dict[str, list[float]]] = {}
    road_curves: dict[str, dict[str, list[float]]] = {}
    fraction = [round(k / steps, 6) for k in range(steps + 1)]

    def _mean_curve(m: str, k: str) -> list[float]:
        return [round(float(x), 6) for x in np.mean(label_curves[m][k], axis=0)]

    for m in methods:
        vals = [v[m] for v in per_label.values() if m in v]
        scores = ["deletion_auc", "insertion_auc"]
        if percentiles:
            scores += ["road_morf", "road_lerf", "road_combined"]
        macro[m] = {k: round(float(np.mean([v[k] for v in vals])), 6) for k in scores}
        macro[m]["labels"] = len(vals)
        mean_curves[m] = {
            "fraction": fraction,
            "deletion": _mean_curve(m, "deletion"),
            "insertion": _mean_curve(m, "insertion"),
        }
        if percentiles:
            road_curves[m] = {"morf": _mean_curve(m, "morf"), "lerf": _mean_curve(m, "lerf")}
    road_section = None
    if percentiles:
        road_section = {
            "percentiles": list(percentiles),
            "removed_fraction": [round(1 - p / 100, 6) for p in percentiles],
            "curves": road_curves,
            "imputer": "pytorch_grad_cam NoisyLinearImputer (noise 0.01 on the 0-1 scale), "
            "rounded to uint8; pixels ranked by the map, ties in a seeded order",
        }
    report: dict[str, Any] = {
        "per_label": per_label,
        "macro": macro,
        "curves": mean_curves,
        "road": road_section,
        "methods": methods,
        "steps": steps,
        "images_per_label": images,
        "baseline": f"Gaussian blur of the input, sigma {BLUR_SIGMA:.4g} of its side",
        "seed": seed,
        "notes": notes,
        "figure": None,
    }
    if out_dir is not None and mean_curves:
        from fundus_edge import plots

        report["figure"] = str(
            plots.plot_faithfulness(
                mean_curves, macro, Path(out_dir) / "faithfulness.png", road=road_section
            )
        )
    return report


def add_faithfulness(
    report: dict[str, Any],
    predict: PredictFn,
    samples: Sequence[Any],
    data_label_names: Sequence[str],
    model_label_names: Sequence[str],
    preprocess_cfg: Any,
    *,
    backend: Any = None,
    images: int = DEFAULT_IMAGES,
    steps: int = DEFAULT_STEPS,
    road_percentiles: Sequence[int] | None = ROAD_PERCENTILES,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``eval --faithfulness``: :func:`faithfulness_report` into ``report`` (and its figure).

    ``backend`` is the loaded model ``predict`` runs. A checkpoint's
    :class:`~fundus_edge.backends.TorchBackend` lends its module to grad-cam (which also needs
    the ``train`` extra); any other backend, or none, gives the kernel and random rows and a
    note saying why grad-cam is missing. ROAD needs no torch model, only torch and grad-cam
    installed here.
    """
    import importlib.util

    from fundus_edge.backends import TorchBackend

    gradcam, note = None, None
    if not isinstance(backend, TorchBackend):
        note = (
            "grad-cam needs a checkpoint (.safetensors): an exported model gives kernel maps only"
        )
    elif importlib.util.find_spec("pytorch_grad_cam") is None:
        note = "grad-cam left out: pytorch_grad_cam is not installed (the train extra)"
    else:
        gradcam = checkpoint_gradcam(backend)
    section = faithfulness_report(
        predict,
        samples,
        data_label_names,
        model_label_names,
        preprocess_cfg,
        images=images,
        steps=steps,
        gradcam=gradcam,
        gradcam_note=note,
        road_percentiles=road_percentiles,
        batch_size=batch_size,
        out_dir=out_dir,
    )
    report["faithfulness"] = section
    if section.get("figure"):
        report.setdefault("figures", {})["faithfulness"] = section["figure"]
    return section
