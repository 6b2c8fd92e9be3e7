"""Teacher targets, computed once per image and cached: soft labels, class maps, attention.

The teacher runs once, in eval mode, on each training (and unlabelled) image as the edge
pipeline prepares it (no augmentation). For every image it leaves:

* ``logits`` (N, C): ``logit(p)`` of the teacher's output probability ``p`` (the mean over its
  heads and views); the soft label at temperature ``T`` is ``sigmoid(logit / T)``;
* ``maps`` (N, C, h, w): the teacher's combined class maps, made by the one map
  normalisation (:func:`fundus_edge.maps.normalise_member_maps`: per member peak-scaled, mean
  over members) directly on the student's grid ``(h, w)``;
* ``attention`` (N, 1, h, w): the teacher's attention (what guides its second view),
  resampled onto the student's grid and peak-scaled (:mod:`fundus_edge.maps`).

Caching instead of a teacher forward pass per training step: the teacher (two members, two
views) costs several times the student's step; one pass over the images costs about one
student epoch. The price is that a training image's geometric augmentation (flips, rotation)
must move its cached maps too: :func:`augment_maps` replays the training dataset's own
augmentation draws (:mod:`fundus_edge.torchdata`: every draw comes from a generator seeded by
``(seed, epoch, index)``) on the maps, so image and maps always agree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fundus_edge.errors import DataError
from fundus_edge.log import get_logger, progress

__all__ = ["TeacherTargets", "augment_maps", "compute_targets", "soft_labels"]

log = get_logger("distill")

#: :func:`augment_maps` moves maps on a square of this many pixels per map cell (a 8x8 grid:
#: 64 px), not at the input size: the same motion, a fraction of the work.
MAP_WORK_CELLS = 8

#: Probabilities are clipped to [P_EPS, 1 - P_EPS] before the logit (a saturated teacher would
#: otherwise give an infinite soft-label logit).
P_EPS = 1e-6


@dataclass
class TeacherTargets:
    """What the teacher says about each of N images (see the module docstring).

    Attributes:
        logits: (N, C) float32 teacher logits (``logit`` of its output probabilities).
        maps: (N, C, h, w) float32 combined class maps on the student's grid, in [0, 1].
        attention: (N, 1, h, w) float32 attention on the student's grid, in [0, 1].
        readable: (N,) bool: False where the image could not be read (the row is zeros).
    """

    logits: np.ndarray
    maps: np.ndarray
    attention: np.ndarray
    readable: np.ndarray

    def __len__(self) -> int:
        return len(self.logits)

    @property
    def probs(self) -> np.ndarray:
        """(N, C) teacher probabilities (temperature 1)."""
        return soft_labels(self.logits, 1.0)

    def item(self, i: int) -> dict[str, np.ndarray]:
        """Image ``i``'s targets: ``logits`` (C,), ``maps`` (C, h, w), ``attention`` (1, h, w)."""
        return {"logits": self.logits[i], "maps": self.maps[i], "attention": self.attention[i]}


def soft_labels(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logits / T)``: the teacher's soft labels at temperature ``T`` (float32)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def compute_targets(
    teacher,
    samples: Sequence,
    grid: tuple[int, int],
    preprocess: dict | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    show_progress: bool | None = None,
    channels_last: bool = False,
) -> TeacherTargets:
    """Run the teacher once over ``samples`` and keep its targets on the student's grid.

    Args:
        teacher: a :class:`~fundus_edge.distill.teacher.Teacher`.
        samples: :class:`~fundus_edge.data.Sample` objects (labels are not used).
        grid: the student's map grid ``(h, w)``.
        preprocess: :class:`~fundus_edge.preprocess.PreprocessConfig` options (the training
            data's); the size is always the teacher's input size.
        batch_size: images per teacher forward pass.
        device: the teacher's device.
        show_progress: progress bar on/off (default: on a terminal).
        channels_last: run the teacher in channels_last memory format (``optim.memory_format``
            of the run: faster convolutions on CPU, the same targets to rounding).

    Returns:
        The targets, one row per sample, in the order of ``samples``.

    Raises:
        DataError: none of the images can be read.
    """
    import torch

    from fundus_edge.maps import normalise_member_maps, peak_normalise, resample
    from fundus_edge.preprocess import PreprocessConfig
    from fundus_edge.torchdata import FundusTorchDataset

    cfg = teacher.config
    pre = PreprocessConfig.from_dict({**(preprocess or {}), "size": int(cfg.image_size)})
    t0 = time.time()
    ds = FundusTorchDataset(samples, pre, cfg.mean, cfg.std, None, 0, cache=True)
    ds.preload(max(1, min(8, os.cpu_count() or 1)))  # decoding in threads (OpenCV frees the GIL)
    n, c = len(samples), cfg.num_classes
    gh, gw = int(grid[0]), int(grid[1])
    logits = np.zeros((n, c), dtype=np.float32)
    maps = np.zeros((n, c, gh, gw), dtype=np.float32)
    attention = np.zeros((n, 1, gh, gw), dtype=np.float32)
    readable = np.ones(n, dtype=bool)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    model = teacher.model.to(device).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    with torch.no_grad():
        for x, _, idx in progress(
            loader, total=len(loader), description="teacher targets", disable=_off(show_progress)
        ):
            rows = idx.numpy()
            bad = rows < 0
            rows = np.where(bad, -rows - 1, rows)
            readable[rows[bad]] = False
            if bad.all():
                continue
            keep = rows[~bad]
            out = model(x[torch.from_numpy(~bad)].to(device).contiguous(memory_format=fmt))
            p = out["probs"].float().cpu().numpy().clip(P_EPS, 1.0 - P_EPS)
            logits[keep] = np.log(p) - np.log1p(-p)
            cams = out["cams"].float().cpu().numpy()  # (n, M, C, h_t, w_t) raw
            maps[keep] = normalise_member_maps(cams, grid=(gh, gw))
            att = out["attention"].float().cpu().numpy()  # (n, 1, h_t, w_t) in [0, 1]
            attention[keep] = peak_normalise(resample(att, (gh, gw)))
    if not readable.any():
        raise DataError(f"the teacher could read none of the {n} images")
    if not readable.all():
        log.warning("teacher targets: %d unreadable image(s) left out", int((~readable).sum()))
    log.info("teacher targets: %d images in %.1f s", int(readable.sum()), time.time() - t0)
    return TeacherTargets(logits, maps, attention, readable)


def _off(show: bool | None) -> bool | None:
    return None if show is None else not show


def augment_maps(
    maps: np.ndarray, size: int, augment, seed: int, epoch: int, index: int
) -> np.ndarray:
    """Move cached maps as the training dataset moved image ``index`` in ``epoch``.

    Replays :func:`fundus_edge.torchdata.augment_image` with the dataset's generator
    ``default_rng((seed, epoch, index))``: the same flips and rotation (the photometric draws
    that follow change nothing here). Each map is taken bilinearly onto a square of
    ``MAP_WORK_CELLS`` pixels per grid cell (a rotation about the centre and a flip are the
    same at any scale), moved there, and area-averaged back onto its grid.

    Args:
        maps: (K, h, w) float maps of one image (class maps and attention stacked).
        size: the model input side the dataset augments at.
        augment: the dataset's :class:`~fundus_edge.torchdata.AugmentConfig` (None: no-op).
        seed, epoch, index: the dataset's seed, the epoch and the sample index.

    Returns:
        (K, h, w) float32 maps, non-negative.
    """
    from fundus_edge.maps import resample
    from fundus_edge.torchdata import augment_image

    maps = np.asarray(maps, dtype=np.float32)
    if augment is None or (augment.hflip <= 0 and augment.vflip <= 0 and augment.rotate <= 0):
        return maps
    h, w = maps.shape[-2:]
    work = min(int(size), MAP_WORK_CELLS * max(h, w))
    big = resample(maps, (work, work))  # (K, s, s)
    rng = np.random.default_rng((int(seed), int(epoch), int(index)))
    blank = np.zeros((work, work, 3), dtype=np.uint8)
    _, moved = augment_image(blank, augment, rng, list(big))
    out = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) for m in moved])
    return np.clip(out, 0.0, None).astype(np.float32)
