"""Images for INT8 calibration and parity checks, preprocessed by the model's own contract.

One function serves the exporter, ``fundus-edge bench`` and the benchmark suite, so every
INT8 artifact is calibrated the same way whoever asks for it:

* a **dataset** folder (RFMiD, ODIR-5K, a CSV: anything :func:`fundus_edge.data.open_dataset`
  reads) gives its images split by split, in the order asked for, with their labels
  aligned to the model's label names (a label the data lacks is a column of NaN);
* any other **folder** gives its image files (searched recursively, sorted), without labels;
* **no folder** gives generated synthetic fundus photographs (:mod:`fundus_edge.synth`),
  labelled as such wherever their figures are reported.

Each image is read and preprocessed exactly as the camera loop does
(:func:`fundus_edge.preprocess.preprocess` with the contract's ``PreprocessConfig``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError

__all__ = ["SYNTHETIC_NOTE", "ImageSet", "load_images", "synthetic_frames", "synthetic_images"]

SYNTHETIC_NOTE = (
    "generated synthetic fundus images (fundus_edge.synth), not real data: INT8 scales and "
    "parity figures are only indicative"
)


@dataclass
class ImageSet:
    """Preprocessed images and where they came from.

    Attributes:
        images: uint8 (N, S, S, 3) RGB, as the model's input.
        labels: (N, C) in the requested label order (NaN where the data lacks a label), or
            None when the images carry no labels.
        origin: where they came from, in words (for reports).
    """

    images: np.ndarray
    labels: np.ndarray | None
    origin: str

    def __len__(self) -> int:
        return len(self.images)


def synthetic_frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` generated fundus photographs (size, size, 3) uint8 RGB, deterministic per seed."""
    from fundus_edge.synth import DEFAULT_PREVALENCE, generate_image, sample_labels

    out = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7, i)))
        out.append(generate_image(rng, size, sample_labels(rng, DEFAULT_PREVALENCE))[0])
    return out


def synthetic_images(pre_cfg: Any, n: int, seed: int = 0) -> ImageSet:
    """``n`` synthetic photographs preprocessed with ``pre_cfg`` (no labels)."""
    from fundus_edge.preprocess import preprocess

    frames = synthetic_frames(n, max(256, int(pre_cfg.size)), seed)
    return ImageSet(np.stack([preprocess(f, pre_cfg).image for f in frames]), None, SYNTHETIC_NOTE)


def _aligned(labels: np.ndarray, data_names: Sequence[str], names: Sequence[str]) -> np.ndarray:
    out = np.full((len(labels), len(names)), np.nan, np.float32)
    for j, name in enumerate(names):
        if name in data_names:
            out[:, j] = labels[:, list(data_names).index(name)]
    return out


def load_images(
    path: str | os.PathLike | None,
    pre_cfg: Any,
    limit: int,
    prefer: Sequence[str] = ("train", "val", "test"),
    label_names: Sequence[str] | None = None,
    option: str = "--calib",
    seed: int = 0,
) -> ImageSet:
    """Up to ``limit`` preprocessed images from ``path`` (see the module docstring).

    Args:
        path: a dataset or image folder; None generates synthetic photographs.
        pre_cfg: the model's :class:`~fundus_edge.preprocess.PreprocessConfig`.
        limit: at most this many images.
        prefer: dataset splits to take images from, the first that has any.
        label_names: the model's labels, to align a dataset's labels to.
        option: the option that named ``path``, for messages.
        seed: seed of the synthetic photographs.

    Raises:
        UserError: the folder does not exist or holds no image; an image cannot be read.
    """
    if path is None:
        return synthetic_images(pre_cfg, limit, seed)
    from fundus_edge.preprocess import preprocess, read_image

    root = Path(path)
    if not root.exists():
        raise UserError(f"{option} {root}: no such folder")
    if not root.is_dir():
        raise UserError(f"{option} {root}: must be a folder of images or a dataset")
    labels = None
    try:
        from fundus_edge.data import open_dataset

        ds = open_dataset(root)
    except UserError:
        ds = None  # not a dataset: a plain folder of images
    if ds is not None:
        samples = next((ds.splits[s][:limit] for s in prefer if ds.splits.get(s)), [])
        paths = [s.path for s in samples]
        if samples:
            raw = np.stack([s.labels for s in samples]).astype(np.float32)
            labels = raw if label_names is None else _aligned(raw, ds.label_names, label_names)
        where = f"{len(paths)} images of {root} ({next((s for s in prefer if ds.splits.get(s)), '-')} split)"
    else:
        from fundus_edge.media import is_still_file

        paths = sorted(
            p
            for p in root.rglob("*")
            if not p.name.startswith(".") and p.is_file() and is_still_file(p)
        )[:limit]
        where = f"{len(paths)} images from {root}"
    if not paths:
        raise UserError(f"{option} {root}: no fundus images found")
    images = np.stack([preprocess(read_image(p), pre_cfg).image for p in paths])
    return ImageSet(images, labels, where)
