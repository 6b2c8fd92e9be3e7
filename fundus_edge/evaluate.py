"""Evaluate a model on a dataset split: metrics JSON, ROC/PR curves, map overlays, localisation.

The evaluation consumes a *predict function*, not a model, so a PyTorch checkpoint, an ONNX
graph or a TensorRT engine are evaluated by the same code::

    predict(images: uint8 (N, S, S, 3) RGB, preprocessed) -> {
        "probs": (N, C) float probabilities,
        "cams":  (N, C, h, w) class maps in [0, 1] (optional: None or absent skips localisation),
    }

:func:`backend_predictor` builds one from any :mod:`fundus_edge.backends` backend, and
:func:`evaluate_model` opens every model that way (``load_backend``, as ``run`` does): a
checkpoint runs in the torch backend's fused forward, the graph its export traces, so the
input is normalised in one place (:func:`fundus_edge.models.fused.normalise_input`) whatever
the model file. Class maps for localisation and overlays combine members with
:mod:`fundus_edge.maps` (each member resampled onto the first member's grid, scaled to its
peak, averaged): the same maps ``run`` shows and the export checks compare.

Localisation (only where :attr:`Sample.masks` has a lesion mask for a positive label): the
label's map is brought back onto the original frame with
:meth:`fundus_edge.preprocess.Geometry.map_to_frame` and compared with the mask there —
pointing game (the map's maximum inside the mask; strict, and with Zhang et al.'s tolerance
scaled to fundus photographs: :data:`POINTING_TOLERANCE` of the field-of-view diameter) and
energy inside the mask. *Global* findings (media haze: the whole field of view is its mask)
are reported per label but left out of the macro means, which would otherwise be flattered by
a target nothing can miss; a synthetic set names them in ``synth.json`` (``global_labels``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fundus_edge.data import Sample
from fundus_edge.errors import DataError, UserError
from fundus_edge.faithfulness import ROAD_PERCENTILES
from fundus_edge.log import get_logger, progress
from fundus_edge.maps import display, map_on_frame, normalise_member_maps
from fundus_edge.metrics import energy_inside, multilabel_report, nanmean_or_none, pointing_game
from fundus_edge.preprocess import (
    Geometry,
    PreprocessConfig,
    preprocess,
    read_image,
    read_mask,
)

__all__ = [
    "POINTING_TOLERANCE",
    "PredictFn",
    "Predictions",
    "align_labels",
    "backend_predictor",
    "evaluate",
    "evaluate_model",
    "global_labels_of",
    "localisation_report",
    "predict_samples",
]

log = get_logger("evaluate")

PredictFn = Callable[[np.ndarray], dict[str, Any]]

#: Pointing-game tolerance as a fraction of the crop side (the FOV diameter): Zhang et al.'s
#: 15 px on ~400-px PASCAL images is ~4 % of the object-bearing frame.
POINTING_TOLERANCE = 0.04


@dataclass
class Predictions:
    """What one pass over a split produced.

    Attributes:
        ids: sample ids, in order.
        probs: ``(N, C)`` probabilities in the model's label order.
        geometries: where each model input came from in its frame.
        maps: sample index -> ``(C, h, w)`` class maps (kept for masked and overlay samples).
        images: sample index -> preprocessed uint8 image (kept for overlay samples).
    """

    ids: list[str]
    probs: np.ndarray
    geometries: list[Geometry]
    maps: dict[int, np.ndarray] = field(default_factory=dict)
    images: dict[int, np.ndarray] = field(default_factory=dict)


def backend_predictor(backend) -> PredictFn:
    """Predict function over a loaded model: any :mod:`fundus_edge.backends` backend.

    Its raw member maps ``(N, M, C, h, w)`` are combined into ``(N, C, h, w)`` by
    :func:`fundus_edge.maps.normalise_member_maps`.
    """

    def predict(images: np.ndarray) -> dict[str, Any]:
        out = backend.infer(np.ascontiguousarray(images))
        cams = out.get("cams")
        return {
            "probs": np.asarray(out["probs"], dtype=np.float32),
            "cams": None if cams is None else normalise_member_maps(cams),
        }

    return predict


def align_labels(
    model_labels: Sequence[str], data_labels: Sequence[str]
) -> tuple[list[int], list[int], list[str]]:
    """Columns shared by model and data: ``(model_idx, data_idx, notes)``.

    Raises:
        DataError: the model and the data share no label.
    """
    shared = [name for name in model_labels if name in data_labels]
    if not shared:
        raise DataError(
            f"the model's labels ({', '.join(model_labels)}) and the data's labels "
            f"({', '.join(data_labels)}) have nothing in common"
        )
    notes = []
    missing = [n for n in model_labels if n not in data_labels]
    extra = [n for n in data_labels if n not in model_labels]
    if missing:
        notes.append(
            f"labels the model predicts but the data lacks (not scored): {', '.join(missing)}"
        )
    if extra:
        notes.append(f"labels in the data the model does not predict (ignored): {', '.join(extra)}")
    return (
        [list(model_labels).index(n) for n in shared],
        [list(data_labels).index(n) for n in shared],
        notes,
    )


def predict_samples(
    predict: PredictFn,
    samples: Sequence[Sample],
    preprocess_cfg: PreprocessConfig,
    batch_size: int = 16,
    keep_maps: Callable[[int, Sample], bool] | None = None,
    keep_images: int = 0,
    description: str = "eval",
) -> Predictions:
    """Preprocess each sample as the edge does, run ``predict`` in batches, collect outputs.

    Args:
        predict: the predict function.
        samples: the split.
        preprocess_cfg: the model's preprocessing (from its metadata).
        batch_size: images per call.
        keep_maps: which samples' class maps to keep (default: those with masks).
        keep_images: keep the preprocessed image and maps of the first this-many samples.
        description: progress-bar label.
    """
    if keep_maps is None:

        def keep_maps(i: int, s: Sample) -> bool:
            return bool(s.masks)

    probs: list[np.ndarray] = []
    geos: list[Geometry] = []
    maps: dict[int, np.ndarray] = {}
    images: dict[int, np.ndarray] = {}
    starts = range(0, len(samples), batch_size)
    for start in progress(starts, total=len(starts), description=description):
        chunk = samples[start : start + batch_size]
        pre = [preprocess(read_image(s.path), preprocess_cfg) for s in chunk]
        out = predict(np.stack([p.image for p in pre]))
        probs.append(np.asarray(out["probs"], dtype=np.float64))
        cams = out.get("cams")
        for k, (s, p) in enumerate(zip(chunk, pre, strict=True)):
            i = start + k
            geos.append(p.geometry)
            if cams is not None and (keep_maps(i, s) or i < keep_images):
                maps[i] = np.asarray(cams[k], dtype=np.float32)
            if i < keep_images:
                images[i] = p.image
    c = probs[0].shape[1] if probs else 0
    return Predictions(
        ids=[s.id for s in samples],
        probs=np.concatenate(probs) if probs else np.zeros((0, c)),
        geometries=geos,
        maps=maps,
        images=images,
    )


def localisation_report(
    samples: Sequence[Sample],
    preds: Predictions,
    label_names: Sequence[str],
    global_labels: Sequence[str] = (),
    tolerance: float = POINTING_TOLERANCE,
) -> dict | None:
    """Pointing game and energy-inside-mask per label, over positive labels that have a mask.

    Args:
        samples: the split.
        preds: predictions with maps for the masked samples.
        label_names: the maps' label order.
        global_labels: labels without a place (their mask is the whole field of view):
            reported, but left out of the macro means.
        tolerance: pointing-game tolerance as a fraction of the crop side (FOV diameter).

    Returns:
        ``{"per_label": {name: {"n", "pointing_game", "pointing_game_tol", "energy_inside",
        "global"}}, "macro": {...}, "excluded": [...], "tolerance": ...}``, or None when no
        sample has both a mask and a map.
    """
    per: dict[str, dict[str, list]] = {}
    for i, s in enumerate(samples):
        if not s.masks or i not in preds.maps:
            continue
        geo = preds.geometries[i]
        for label, mpath in s.masks.items():
            if label not in label_names:
                continue
            c = list(label_names).index(label)
            mask = read_mask(mpath, geo.frame)
            if not mask.any():
                continue
            frame_map = map_on_frame(preds.maps[i][c], geo)  # (H,W) on the original frame
            rec = per.setdefault(label, {"hit": [], "hit_tol": [], "energy": []})
            rec["hit"].append(pointing_game(frame_map, mask))
            rec["hit_tol"].append(pointing_game(frame_map, mask, tolerance * geo.side))
            rec["energy"].append(energy_inside(frame_map, mask))
    if not per:
        return None
    out = {}
    for label, rec in per.items():
        out[label] = {
            "n": len(rec["hit"]),
            "pointing_game": float(np.mean(rec["hit"])),
            "pointing_game_tol": float(np.mean(rec["hit_tol"])),
            "energy_inside": nanmean_or_none(rec["energy"]),
            "global": label in global_labels,
        }
    local = [v for v in out.values() if not v["global"]]
    return {
        "per_label": out,
        "macro": {
            key: nanmean_or_none([v[key] for v in local])
            for key in ("pointing_game", "pointing_game_tol", "energy_inside")
        },
        "excluded": sorted(k for k, v in out.items() if v["global"]),
        "tolerance": tolerance,
    }


def global_labels_of(data_dir: str | Path) -> list[str]:
    """Labels whose masks cover the whole field of view, as the data set declares them.

    A synthetic set lists them in ``synth.json`` (``global_labels``); other data sets
    declare none.
    """
    path = Path(data_dir) / "synth.json"
    if not path.is_file():
        return []
    try:
        labels = json.loads(path.read_text(encoding="utf-8")).get("global_labels", [])
    except (json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"{path}: not a valid synth.json ({exc})") from None
    return [str(x) for x in labels]


def _overlay_tiles(samples, preds: Predictions, label_names, probs):
    images, maps, titles, masks = [], [], [], []
    for i in sorted(preds.images):
        s = samples[i]
        img = preds.images[i]
        size = img.shape[0]
        pos = [j for j, v in enumerate(s.labels) if v > 0.5 and j < len(label_names)]
        # Show the most probable ground-truth label (else the most probable prediction).
        c = max(pos, key=lambda j: probs[i, j]) if pos else int(np.argmax(probs[i]))
        m = cv2.resize(preds.maps[i][c], (size, size), interpolation=cv2.INTER_LINEAR)
        m = display(m)
        mask = None
        name = label_names[c]
        if name in s.masks:
            g = preds.geometries[i]
            mask = g.crop(read_mask(s.masks[name], g.frame).astype(np.uint8) * 255) > 127
        images.append(img)
        maps.append(m)
        masks.append(mask)
        truth = "+" if pos and c in pos else "-"
        titles.append(f"{s.id}: {name}{truth} p={probs[i, c]:.2f}")
    return images, maps, titles, masks


def evaluate(
    predict: PredictFn,
    samples: Sequence[Sample],
    data_label_names: Sequence[str],
    model_label_names: Sequence[str],
    preprocess_cfg: PreprocessConfig,
    thresholds: Sequence[float] | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    screening_label: str = "Disease_Risk",
    overlays: int = 8,
    split: str = "test",
    global_labels: Sequence[str] = (),
) -> dict:
    """Run ``predict`` over ``samples`` and report every metric; write PNGs into ``out_dir``.

    Args:
        predict: see the module docstring.
        samples: the split to evaluate.
        data_label_names: the dataset's label columns (``Sample.labels`` order).
        model_label_names: the model's output order.
        preprocess_cfg: the model's preprocessing.
        thresholds: per model label (tuned on validation); None -> 0.5 with a note.
        out_dir: where to write ``roc.png``, ``pr.png``, ``maps.png`` (None: no plots).
        batch_size: images per predict call.
        screening_label: label for the RIADD screening AUROC.
        overlays: number of map-overlay tiles.
        split: the split's name, for the report.
        global_labels: labels whose mask is the whole FOV (left out of localisation means).

    Returns:
        The report (see :func:`fundus_edge.metrics.multilabel_report`) plus ``split``,
        ``localisation`` and ``figures``.
    """
    if not samples:
        raise UserError(f"split {split!r} has no samples to evaluate")
    m_idx, d_idx, notes = align_labels(model_label_names, data_label_names)
    names = [model_label_names[j] for j in m_idx]
    preds = predict_samples(
        predict, samples, preprocess_cfg, batch_size, keep_images=overlays if out_dir else 0
    )
    y_true = np.stack([s.labels for s in samples])[:, d_idx]
    y_prob = preds.probs[:, m_idx]
    if thresholds is None:
        thr = np.full(len(m_idx), 0.5)
        notes.append("no tuned thresholds in the model: 0.5 used for every label")
    else:
        thr = np.asarray(thresholds, dtype=np.float64)[m_idx]
    report = multilabel_report(y_true, y_prob, names, thr, screening_label)
    report["notes"] = notes + report["notes"]
    report["split"] = split
    # Localisation uses the model's label order for maps; samples' masks are named by label.
    report["localisation"] = localisation_report(samples, preds, model_label_names, global_labels)
    figures: dict[str, str] = {}
    if out_dir is not None:
        from fundus_edge import plots

        out = Path(out_dir)
        figures["roc"] = str(
            plots.plot_roc(y_true, y_prob, names, out / "roc.png", f"ROC ({split})")
        )
        figures["pr"] = str(
            plots.plot_pr(y_true, y_prob, names, out / "pr.png", f"Precision-recall ({split})")
        )
        if preds.images and preds.maps:
            # Tiles use the sample's labels in data order; remap to model order for the title.
            remapped = [
                Sample(
                    s.id,
                    s.path,
                    _to_model_order(s.labels, m_idx, d_idx, len(model_label_names)),
                    s.split,
                    s.masks,
                )
                for s in samples[: len(preds.images)]
            ]
            tiles = _overlay_tiles(remapped, preds, model_label_names, preds.probs)
            figures["maps"] = str(plots.plot_map_grid(*tiles[:3], out / "maps.png", masks=tiles[3]))
    report["figures"] = figures
    # Per image, so any other consumer (`fundus-edge run` on the same files) can be compared.
    report["predictions"] = [
        {
            "id": s.id,
            "path": str(s.path),
            "probabilities": {
                n: round(float(p), 6) for n, p in zip(model_label_names, row, strict=True)
            },
        }
        for s, row in zip(samples, preds.probs, strict=True)
    ]
    return report


def _to_model_order(labels: np.ndarray, m_idx: list[int], d_idx: list[int], c: int) -> np.ndarray:
    out = np.zeros(c, dtype=np.float32)
    out[m_idx] = np.asarray(labels)[d_idx]
    return out


def evaluate_model(
    model_path: str | Path,
    data_dir: str | Path,
    split: str = "test",
    json_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    data_format: str = "auto",
    backend: str | None = None,
    precision: str | None = None,
    threshold_policy: str | None = None,
    calibrate: bool = False,
    faithfulness: int | None = None,
    faithfulness_steps: int = 16,
    faithfulness_road: Sequence[int] | None = ROAD_PERCENTILES,
) -> dict:
    """``fundus-edge eval``: evaluate a checkpoint or an exported model on one split.

    Every model opens through :func:`fundus_edge.backends.load_backend`, as ``run`` opens it:
    by its suffix, or the runtime ``backend`` names (``openvino`` at ``precision``
    fp32/bf16/int8). A checkpoint (``.safetensors``) runs in the torch backend on ``device``
    (``auto``, ``cpu``, ``cuda[:N]``); an exported graph (``.onnx``, ``.engine``/``.plan``,
    ``.xml``) needs no PyTorch. The labels, thresholds, temperature and preprocessing come
    from the backend's contract (a checkpoint's meta, an export's metadata). ``faithfulness``
    (images per label) adds deletion/insertion AUCs and ROAD at ``faithfulness_road``'s
    percentiles (grad-cam's by default; empty or None: no ROAD) of the maps
    (:mod:`fundus_edge.faithfulness`); grad-cam's maps there use the torch backend's module.

    Args:
        device: ``auto`` leaves the choice to the backend (the torch backend takes CUDA when
            available); anything else is passed on, and a backend without a ``device``
            option (ONNX Runtime, TensorRT) refuses it.

    Raises:
        UserError: missing model or data, unknown split, no samples, an option the model's
            backend does not take.
    """
    from fundus_edge.backends import load_backend
    from fundus_edge.data import open_dataset
    from fundus_edge.fileio import atomic_write_json
    from fundus_edge.operating import evaluate_operating

    model_path = Path(model_path)
    if not model_path.exists():
        raise UserError(f"{model_path}: model file does not exist")
    ds = open_dataset(data_dir, format=data_format)
    if split not in ds.splits or not ds.splits[split]:
        have = ", ".join(k for k, v in ds.splits.items() if v) or "none"
        raise UserError(f"{data_dir}: split {split!r} has no samples (splits with samples: {have})")
    runner = load_backend(
        model_path,
        backend=backend,
        precision=precision,
        device=None if device == "auto" else device,
    )
    try:
        meta = runner.metadata
        predict = backend_predictor(runner)
        labels = list(meta["label_names"])
        pre = PreprocessConfig.from_dict(meta["preprocess"])
        # Thresholds/temperature: the model's, or tuned/fitted on val (--threshold-policy,
        # --calibrate); adds operating points with intervals and calibration to the report.
        report = evaluate_operating(
            predict,
            ds,
            split,
            labels,
            pre,
            meta,
            threshold_policy=threshold_policy,
            calibrate=calibrate,
            out_dir=out_dir,
            batch_size=batch_size,
            screening_label=ds.screening_label or "Disease_Risk",
            global_labels=global_labels_of(ds.root),
        )
        if faithfulness is not None:  # eval --faithfulness: deletion/insertion AUC, ROAD
            from fundus_edge.faithfulness import add_faithfulness

            add_faithfulness(
                report,
                predict,
                ds.splits[split],
                ds.label_names,
                labels,
                pre,
                backend=runner,
                images=faithfulness,
                steps=faithfulness_steps,
                road_percentiles=faithfulness_road,
                batch_size=batch_size,
                out_dir=out_dir,
            )
    finally:
        runner.close()
    report["model"] = str(model_path)
    report["backend"] = {"name": runner.name, "device": runner.device}
    report["data"] = str(data_dir)
    if json_path is not None:
        atomic_write_json(json_path, report)
    return report
