"""Faithfulness of class maps: deletion and insertion AUC (Petsiuk et al., RISE, BMVC 2018).

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

Methods: ``kernel`` (the model's own maps, the exported graph's CAM kernels, combined as
:mod:`fundus_edge.maps` does), ``gradcam`` (``pytorch_grad_cam.GradCAM`` on each member's CAM
target layer, through :class:`fundus_edge.explain._CheckpointMaps`, members combined the same
way; checkpoints with the ``train`` extra only) and ``random`` (a seeded uniform map at the
kernel maps' grid, resampled like them: the baseline a map has to beat). ROAD
(``pytorch_grad_cam.metrics.road``) is not computed: it needs the model as a torch module and
its own imputation, which an exported model does not offer.
"""

from __future__ import annotations

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
    "add_faithfulness",
    "auc",
    "blurred",
    "checkpoint_gradcam",
    "curves",
    "faithfulness_report",
    "validate_options",
]

log = get_logger("faithfulness")

#: Method names, in report order.
METHODS = ("kernel", "gradcam", "random")
DEFAULT_STEPS = 16
DEFAULT_IMAGES = 32
#: Gaussian sigma of the deletion/insertion baseline, as a fraction of the input side.
BLUR_SIGMA = 1 / 32

PredictFn = Callable[[np.ndarray], dict[str, Any]]
#: (image uint8 (S,S,3), class indices) -> (L, h, w) combined maps for those classes.
GradcamFn = Callable[[np.ndarray, list[int]], np.ndarray]


def validate_options(images: int, steps: int) -> None:
    """``--faithfulness-images`` >= 1 and ``--faithfulness-steps`` >= 2, else a UserError."""
    if int(images) < 1:
        raise UserError(f"--faithfulness-images {images}: must be >= 1")
    if int(steps) < 2:
        raise UserError(f"--faithfulness-steps {steps}: must be >= 2")


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


def checkpoint_gradcam(model, device: str) -> GradcamFn:
    """Grad-CAM maps from an :class:`~fundus_edge.models.Ensemble`, as ``explain`` makes them.

    Each member's map at its CAM target layer (``pytorch_grad_cam.GradCAM``), combined by
    :func:`fundus_edge.maps.normalise_member_maps`.
    """
    from types import SimpleNamespace

    from fundus_edge.explain import _CheckpointMaps
    from fundus_edge.models.fused import FusedModel

    maps = _CheckpointMaps(
        SimpleNamespace(_model=FusedModel(model).eval().to(device), device=str(device))
    )

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
    batch_size: int = 16,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Deletion/insertion AUC per label and method over the label's positive images.

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
        batch_size: images per predict call.
        seed: random maps and tie-breaking.
        out_dir: where to write ``faithfulness.png`` (None: no plot).

    Returns:
        ``{"per_label": {label: {method: {"deletion_auc", "insertion_auc", "n"}}},
        "macro": {method: {"deletion_auc", "insertion_auc", "labels"}}, "curves": {method:
        {"fraction", "deletion", "insertion"}}, "methods", "steps", "images_per_label",
        "baseline", "seed", "notes", "figure"}``.
    """
    from fundus_edge.evaluate import align_labels
    from fundus_edge.preprocess import preprocess, read_image

    validate_options(images, steps)
    m_idx, d_idx, _ = align_labels(model_label_names, data_label_names)
    notes: list[str] = []
    if gradcam is None and gradcam_note:
        notes.append(gradcam_note)
    # Which images, for which labels (model index): the first `images` positives per label.
    wanted: dict[int, list[int]] = {}
    for mi, di in zip(m_idx, d_idx, strict=True):
        pos = [i for i, s in enumerate(samples) if float(s.labels[di]) > 0.5][:images]
        for i in pos:
            wanted.setdefault(i, []).append(mi)
    rng = np.random.default_rng(seed)
    rows: dict[int, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {}
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
            res = curves(
                predict, image, maps, c, steps, batch_size, seed=int(rng.integers(2**31)), ends=ends
            )
            per = rows.setdefault(c, {})
            for m, pair in res.items():
                per.setdefault(m, []).append(pair)
    if no_kernel:
        notes.append("the model gives no class maps: no kernel row")
    methods = [m for m in METHODS if any(m in per for per in rows.values())]
    per_label: dict[str, dict[str, dict[str, Any]]] = {}
    label_curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in methods}
    for c in sorted(rows):
        name = str(model_label_names[c])
        per_label[name] = {}
        for m in methods:
            pairs = rows[c].get(m, [])
            if not pairs:
                continue
            dele = np.mean([p[0] for p in pairs], axis=0)
            ins = np.mean([p[1] for p in pairs], axis=0)
            label_curves[m].append((dele, ins))
            per_label[name][m] = {
                "deletion_auc": round(float(np.mean([auc(p[0]) for p in pairs])), 6),
                "insertion_auc": round(float(np.mean([auc(p[1]) for p in pairs])), 6),
                "n": len(pairs),
            }
    missing = [str(model_label_names[c]) for c in m_idx if c not in rows]
    if missing:
        notes.append(f"no positive images in the split (not scored): {', '.join(missing)}")
    macro: dict[str, dict[str, Any]] = {}
    mean_curves: dict[str, dict[str, list[float]]] = {}
    fraction = [round(k / steps, 6) for k in range(steps + 1)]
    for m in methods:
        vals = [v[m] for v in per_label.values() if m in v]
        macro[m] = {
            "deletion_auc": round(float(np.mean([v["deletion_auc"] for v in vals])), 6),
            "insertion_auc": round(float(np.mean([v["insertion_auc"] for v in vals])), 6),
            "labels": len(vals),
        }
        mean_curves[m] = {
            "fraction": fraction,
            "deletion": [round(float(x), 6) for x in np.mean([c[0] for c in label_curves[m]], 0)],
            "insertion": [round(float(x), 6) for x in np.mean([c[1] for c in label_curves[m]], 0)],
        }
    report: dict[str, Any] = {
        "per_label": per_label,
        "macro": macro,
        "curves": mean_curves,
        "methods": methods,
        "steps": steps,
        "images_per_label": images,
        "baseline": f"Gaussian blur of the input, sigma {BLUR_SIGMA:.4g} of its side",
        "seed": seed,
        "notes": [*notes, "ROAD (pytorch_grad_cam.metrics.road) is not computed"],
        "figure": None,
    }
    if out_dir is not None and mean_curves:
        from fundus_edge import plots

        report["figure"] = str(
            plots.plot_faithfulness(mean_curves, macro, Path(out_dir) / "faithfulness.png")
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
    torch_model: tuple[Any, str] | None = None,
    images: int = DEFAULT_IMAGES,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``eval --faithfulness``: :func:`faithfulness_report` into ``report`` (and its figure).

    ``torch_model`` is ``(ensemble, device)`` for a checkpoint (grad-cam's maps need it and the
    ``train`` extra); without it (an exported model) the report has the kernel and random rows
    and a note saying why grad-cam is missing.
    """
    import importlib.util

    gradcam, note = None, None
    if torch_model is None:
        note = (
            "grad-cam needs a checkpoint (.safetensors): an exported model gives kernel maps only"
        )
    elif importlib.util.find_spec("pytorch_grad_cam") is None:
        note = "grad-cam left out: pytorch_grad_cam is not installed (the train extra)"
    else:
        gradcam = checkpoint_gradcam(*torch_model)
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
        batch_size=batch_size,
        out_dir=out_dir,
    )
    report["faithfulness"] = section
    if section.get("figure"):
        report.setdefault("figures", {})["faithfulness"] = section["figure"]
    return section
