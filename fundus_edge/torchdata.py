"""PyTorch data pipeline over :class:`fundus_edge.data.Sample`: the edge preprocessing, then
training augmentation, then normalisation.

Determinism: every random choice of an augmentation comes from a generator seeded by
``(seed, epoch, sample index)``, and the epoch's sample order from ``(seed, epoch)``; so the
batches of epoch ``e`` are the same whatever the number of workers and whether the run was
resumed. Preprocessing is the same :func:`fundus_edge.preprocess.preprocess` the edge runtime
uses, so training and deployment cannot drift.

Unreadable images never stop a run: :meth:`FundusTorchDataset.__getitem__` returns a zero image
with the *negative* index ``-(i + 1)`` for a sample whose file cannot be decoded (found when the
cache is filled, or at read time without a cache), and the training loop drops, counts and
reports those rows (:func:`split_unreadable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from fundus_edge.data import Sample
from fundus_edge.errors import DataError
from fundus_edge.log import get_logger
from fundus_edge.models.fused import normalise_input
from fundus_edge.preprocess import PreprocessConfig, preprocess, read_image, read_mask

__all__ = [
    "MASK_STRIDE",
    "AugmentConfig",
    "FundusTorchDataset",
    "augment_image",
    "epoch_indices",
    "label_aware_weights",
    "split_unreadable",
    "to_tensor",
]

log = get_logger("torchdata")


@dataclass
class AugmentConfig:
    """Geometric and photometric training augmentation on the preprocessed uint8 image."""

    hflip: float = 0.5
    vflip: float = 0.0
    rotate: float = 15.0
    brightness: float = 0.1
    contrast: float = 0.1


def augment_image(
    img: np.ndarray,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    masks: Sequence[np.ndarray] = (),
) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
    """Random flip, rotation about the centre, brightness and contrast; uint8 in, uint8 out.

    Rotation keeps the square and fills the corners black, which matches the masked area
    outside the field of view.

    Args:
        img: ``(S, S, 3)`` uint8 image.
        cfg: the augmentation.
        rng: the draws (the same draws whether or not masks are given).
        masks: ``(S, S)`` uint8 lesion masks that follow the image's flips and rotation.

    Returns:
        The augmented image; with ``masks``, ``(image, [augmented masks])``.
    """
    out, ms = img, list(masks)
    if cfg.hflip > 0 and rng.random() < cfg.hflip:
        out, ms = out[:, ::-1], [m[:, ::-1] for m in ms]
    if cfg.vflip > 0 and rng.random() < cfg.vflip:
        out, ms = out[::-1, :], [m[::-1, :] for m in ms]
    if cfg.rotate > 0:
        angle = float(rng.uniform(-cfg.rotate, cfg.rotate))
        s = out.shape[0]
        rot = cv2.getRotationMatrix2D(((s - 1) / 2.0, (s - 1) / 2.0), angle, 1.0)

        def warp(a: np.ndarray) -> np.ndarray:
            return cv2.warpAffine(
                np.ascontiguousarray(a),
                rot,
                (a.shape[1], s),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=(0, 0, 0),
            )

        out, ms = warp(out), [warp(m) for m in ms]
    if cfg.brightness > 0 or cfg.contrast > 0:
        b = 1.0 + float(rng.uniform(-cfg.brightness, cfg.brightness))
        c = 1.0 + float(rng.uniform(-cfg.contrast, cfg.contrast))
        f = out.astype(np.float32)
        mean = f.mean()
        f = (f - mean) * c + mean * b
        out = np.clip(f, 0, 255).astype(np.uint8)
    out = np.ascontiguousarray(out)
    if not masks:
        return out
    return out, [np.ascontiguousarray(m) for m in ms]


def to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` RGB -> normalised float ``(3, H, W)``, as the exported graph does it
    (:func:`fundus_edge.models.fused.normalise_input`)."""
    return normalise_input(torch.from_numpy(np.ascontiguousarray(img)), mean, std)


#: Lesion masks reach the loss at ``1 / MASK_STRIDE`` of the input side, as the fraction of
#: each cell inside the mask: finer than any CAM grid (output stride >= 8), a 16th of the
#: memory of full-size masks.
MASK_STRIDE = 4


class FundusTorchDataset(Dataset):
    """Samples -> ``(x (3,S,S) float32, y (C,) float32, index)``.

    With ``mask_labels``, items are ``(x, y, index, masks (C,S/4,S/4) float32, has (C,) bool)``:
    each label's lesion mask (the fraction of every 4x4 cell inside it, after the same crop
    and augmentation as the image) and whether the sample has a mask for that label.

    A sample whose image cannot be read yields a zero ``x`` and index ``-(i + 1)``; the reason
    is in :attr:`unreadable` when the cache found it, else :meth:`failure` reads it again.

    Args:
        samples: the split's samples.
        preprocess_cfg: the edge preprocessing (its ``size`` is the model input side).
        mean: normalisation mean (RGB, 0..1 scale).
        std: normalisation std.
        augment: training augmentation, or None for evaluation.
        seed: run seed (augmentation randomness derives from it).
        cache: keep preprocessed uint8 images in memory once :meth:`preload` ran.
        mask_labels: the model's label names: also return the samples' lesion masks.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocess_cfg: PreprocessConfig,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None = None,
        seed: int = 0,
        cache: bool = True,
        mask_labels: Sequence[str] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.pre = preprocess_cfg
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.augment = augment
        self.seed = int(seed)
        self.cache = cache
        self.epoch = 0
        self.mask_labels = None if mask_labels is None else list(mask_labels)
        self._images: np.ndarray | None = None
        self._masks: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        #: sample index -> why its image could not be read (filled by :meth:`preload`).
        self.unreadable: dict[int, str] = {}
        #: lesion mask files that could not be read (left out; the image still trains).
        self.bad_masks: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws ``__getitem__`` makes."""
        self.epoch = int(epoch)

    def labels(self) -> np.ndarray:
        """``(N, C)`` float32 labels of all samples."""
        return np.stack([s.labels for s in self.samples]).astype(np.float32)

    def masked_count(self) -> int:
        """How many samples have at least one lesion mask for a model label."""
        if self.mask_labels is None:
            return 0
        names = set(self.mask_labels)
        return sum(1 for s in self.samples if names & set(s.masks))

    def load(self, i: int) -> np.ndarray:
        """The preprocessed uint8 ``(S, S, 3)`` image of sample ``i``."""
        if self._images is not None:
            return self._images[i]
        return self._read(i)[0]

    def _read(self, i: int) -> tuple[np.ndarray, tuple[list[int], list[np.ndarray]]]:
        """Image and (label indices, ``(S, S)`` uint8 masks) of sample ``i``, preprocessed."""
        s = self.samples[i]
        pp = preprocess(read_image(s.path), self.pre)
        if self.mask_labels is None or not s.masks:
            return pp.image, ([], [])
        g = pp.geometry
        idx, arrs = [], []
        for c, name in enumerate(self.mask_labels):
            if name not in s.masks:
                continue
            try:
                m = read_mask(s.masks[name], g.frame).astype(np.uint8) * 255
            except DataError as exc:
                self.bad_masks[str(s.masks[name])] = str(exc)
                continue
            idx.append(c)
            arrs.append(g.crop(m, cv2.INTER_AREA))
        return pp.image, (idx, arrs)

    def preload(self, threads: int = 4) -> None:
        """Preprocess every image (and mask) once into memory (OpenCV releases the GIL).

        Images that cannot be read are recorded in :attr:`unreadable` (and skipped later)
        instead of failing the whole run.
        """
        if not self.cache or self._images is not None or not self.samples:
            return
        s = self.pre.size
        arr = np.zeros((len(self.samples), s, s, 3), dtype=np.uint8)

        def work(i: int) -> str | None:
            try:
                arr[i], masks = self._read(i)
            except DataError as exc:
                return str(exc)
            if masks[0]:
                self._masks[i] = masks
            return None

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            errors = list(pool.map(work, range(len(self.samples))))
        self.unreadable.update({i: e for i, e in enumerate(errors) if e is not None})
        self._images = arr

    def failure(self, i: int) -> str:
        """Why sample ``i`` cannot be read (one line naming the file)."""
        if i in self.unreadable:
            return self.unreadable[i]
        try:
            read_image(self.samples[i].path)
        except DataError as exc:
            return str(exc)
        return f"{self.samples[i].path}: could not be read earlier (readable now)"

    def __getitem__(self, i: int) -> tuple:
        y = torch.from_numpy(np.asarray(self.samples[i].labels, dtype=np.float32))
        if i in self.unreadable:
            return self._failed(i, y)
        try:
            if self._images is not None:
                img, (idx, masks) = self._images[i], self._masks.get(i, ([], []))
            else:
                img, (idx, masks) = self._read(i)
        except DataError:
            # Worker processes cannot report back: the negative index tells the loop.
            return self._failed(i, y)
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, int(i)))
            if masks:
                img, masks = augment_image(img, self.augment, rng, masks)
            else:
                img = augment_image(img, self.augment, rng)
        x = to_tensor(img, self.mean, self.std)
        if self.mask_labels is None:
            return x, y, int(i)
        m, has = self._empty_masks()
        g = m.shape[-1]
        for c, a in zip(idx, masks, strict=True):
            small = cv2.resize(a, (g, g), interpolation=cv2.INTER_AREA)
            m[c] = torch.from_numpy(small.astype(np.float32) / 255.0)
            has[c] = True
        return x, y, int(i), m, has

    def _empty_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, g = len(self.mask_labels or ()), max(1, self.pre.size // MASK_STRIDE)
        return torch.zeros(c, g, g), torch.zeros(c, dtype=torch.bool)

    def _failed(self, i: int, y: torch.Tensor) -> tuple:
        x = torch.zeros(3, self.pre.size, self.pre.size)
        if self.mask_labels is None:
            return x, y, -(int(i) + 1)
        return (x, y, -(int(i) + 1), *self._empty_masks())


def split_unreadable(
    x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, *extra: torch.Tensor
) -> tuple:
    """Drop the rows of a batch whose image could not be read.

    Args:
        x: ``(N, 3, S, S)`` images.
        y: ``(N, C)`` labels.
        index: ``(N,)`` dataset indices, ``-(i + 1)`` for an unreadable sample ``i``.
        extra: more per-row tensors of the batch (lesion masks), filtered alike.

    Returns:
        ``(x, y, *extra)`` of the readable rows and the sample indices of the dropped ones
        (last).
    """
    bad = index < 0
    if not bool(bad.any()):
        return (x, y, *extra, [])
    dropped = (-index[bad] - 1).tolist()
    keep = ~bad
    return (x[keep], y[keep], *(t[keep] for t in extra), dropped)


def label_aware_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling weight per image: the inverse frequency of its rarest positive label.

    Images without positives count as one more "normal" class. The weights make every label
    roughly as likely to be drawn as the most common one.
    """
    labels = np.asarray(labels) > 0.5
    freq = labels.sum(0).astype(np.float64)
    normal = ~labels.any(1)
    inv = np.where(freq > 0, 1.0 / np.maximum(freq, 1), 0.0)
    w = (labels * inv[None]).max(1)
    if normal.any():
        w[normal] = 1.0 / normal.sum()
    return w / w.sum()


def epoch_indices(
    n: int,
    epoch: int,
    seed: int,
    mode: str = "shuffle",
    labels: np.ndarray | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[int]:
    """This rank's sample order for one epoch (the same on every call with the same arguments).

    ``shuffle`` is :class:`torch.utils.data.DistributedSampler`'s order (padded to a multiple of
    ``world_size``, strided per rank); ``label_aware`` draws ``n`` indices with replacement with
    :func:`label_aware_weights` from a generator seeded by ``(seed, epoch)``, then strides.
    """
    if mode == "shuffle":

        class _Sized:
            def __len__(self) -> int:
                return n

        sampler = DistributedSampler(
            _Sized(),  # type: ignore[arg-type]
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
        )
        sampler.set_epoch(epoch)
        return list(sampler)
    if mode == "label_aware":
        if labels is None:
            raise ValueError("label_aware sampling needs the labels")
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        w = torch.from_numpy(label_aware_weights(labels))
        total = -(-n // world_size) * world_size
        idx = torch.multinomial(w, total, replacement=True, generator=g).tolist()
        return idx[rank::world_size]
    raise ValueError(f"unknown sampler {mode!r}")
