"""The run's data: both splits opened and cached, each epoch's order, and the batch the step sees.

An epoch's order and augmentation draws derive from ``(seed, epoch, index)`` only, so an
interrupted epoch continues from its next batch exactly (see :mod:`fundus_edge.trainer`).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fundus_edge.config import TrainConfig
from fundus_edge.errors import DataError, UserError
from fundus_edge.log import get_logger
from fundus_edge.trainer.dist import Dist

__all__ = ["Batch", "ExtraData", "TrainData", "fingerprint", "open_data"]

log = get_logger("train")


@dataclass
class Batch:
    """One training batch as the step and the objectives see it.

    Attributes:
        x: (N,3,S,S) normalised images.
        y: (N,C) 0/1 labels (zeros for rows without labels).
        index: (N,) the rows' indices in the training split (-1: rows from elsewhere, e.g.
            :class:`ExtraData`); objectives look precomputed per-image values up by it.
        masks: (N,C,h,w) lesion masks, with ``has_mask`` (N,C): the mask-attention term.
        has_mask: see ``masks``.
        labelled: (N,) bool; None means every row is labelled. The supervised loss sees the
            labelled rows only.
        extra: any further tensors (teacher targets, ...): moved to the device with the rest.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None
    labelled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``."""

        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "extra"},
            extra={k: move(v) for k, v in self.extra.items()},
        )

    def cat(self, other: Batch) -> Batch:
        """This batch followed by ``other`` (both labelled flags filled in; masks dropped
        unless both carry them; extra keys must match)."""

        def both(a, b):
            return None if a is None or b is None else torch.cat([a, b])

        def flags(b: Batch) -> torch.Tensor:
            if b.labelled is not None:
                return b.labelled
            return torch.ones(len(b), dtype=torch.bool, device=b.x.device)

        def index(b: Batch) -> torch.Tensor:
            if b.index is not None:
                return b.index
            return torch.full((len(b),), -1, dtype=torch.long, device=b.x.device)

        if set(self.extra) != set(other.extra):
            raise ValueError(
                f"batch extra keys differ: {sorted(self.extra)} vs {sorted(other.extra)}"
            )
        return Batch(
            x=torch.cat([self.x, other.x]),
            y=torch.cat([self.y, other.y]),
            index=torch.cat([index(self), index(other)]),
            masks=both(self.masks, other.masks),
            has_mask=both(self.has_mask, other.has_mask),
            labelled=torch.cat([flags(self), flags(other)]),
            extra={k: torch.cat([v, other.extra[k]]) for k, v in self.extra.items()},
        )


class ExtraData(Protocol):
    """More rows for each training batch (e.g. unlabelled images for distillation).

    ``batch(epoch, step)`` returns a :class:`Batch` (on the CPU, ``labelled`` set, ``y`` zeros
    where unknown) appended to the step's labelled batch, or None for none at that step. It
    must depend on ``(epoch, step)`` only, so that a resumed run sees the same rows.
    """

    def batch(self, epoch: int, step: int) -> Batch | None: ...


class _Skips:
    """Unreadable images met in training: counted per epoch, each file named once in the log."""

    def __init__(self, ds, split: str, main: bool) -> None:
        self.ds = ds
        self.split = split
        self.epoch = 0
        self.total = 0
        self._named: set[int] = set()
        self.main = main

    def announce_preloaded(self) -> None:
        bad = sorted(self.ds.unreadable)
        if bad and self.main:
            log.warning(
                "%d %s image(s) cannot be read and will be skipped; first: %s",
                len(bad),
                self.split,
                self.ds.unreadable[bad[0]],
            )
        self._named.update(bad)

    def add(self, dropped: list[int]) -> None:
        self.epoch += len(dropped)
        self.total += len(dropped)
        for i in dropped:
            if i not in self._named:
                self._named.add(i)
                log.warning("skipping unreadable %s image: %s", self.split, self.ds.failure(i))


@dataclass
class TrainData:
    """The run's data: datasets (cached), label names, the screening label, skip counters."""

    cfg: TrainConfig
    dist: Dist
    train_ds: Any
    val_ds: Any
    label_names: list[str]
    screening: str
    pre: Any
    train_labels: np.ndarray
    skips: _Skips
    train_fingerprint: str = ""  # which images and labels train: a resumed run must match

    @classmethod
    def open(cls, cfg: TrainConfig, dist_: Dist) -> TrainData:
        """Index the data, build and fill both datasets; refuse what cannot train.

        Raises:
            UserError: no or missing data folder, ``mask_weight > 0`` without any mask.
            DataError: a split is empty, or no training image can be read.
        """
        from fundus_edge.torchdata import FundusTorchDataset

        ds, train_samples, val_samples = open_data(cfg)
        label_names = list(ds.label_names)
        d = cfg.data
        pre, aug = d.preprocess, d.augment
        mask_weight = cfg.optim.loss.mask_weight
        mean, std = cfg.model.mean, cfg.model.std
        train_ds = FundusTorchDataset(
            train_samples,
            pre,
            mean,
            std,
            aug,
            cfg.seed,
            d.cache,
            mask_labels=label_names if mask_weight > 0 else None,
        )
        val_ds = FundusTorchDataset(val_samples, pre, mean, std, None, 0, d.cache)
        threads = max(1, min(8, os.cpu_count() or 1))
        train_ds.preload(threads)
        val_ds.preload(threads)
        skips = _Skips(train_ds, "training", dist_.main)
        skips.announce_preloaded()
        _Skips(val_ds, "validation", dist_.main).announce_preloaded()
        if len(train_ds.unreadable) == len(train_ds):
            raise DataError(
                f"{cfg.data.root}: none of the {len(train_ds)} training images can be read"
            )
        if mask_weight > 0:
            _check_masks(train_ds, mask_weight, cfg.data.root, dist_.main)
        return cls(
            cfg,
            dist_,
            train_ds,
            val_ds,
            label_names,
            ds.screening_label or "Disease_Risk",
            pre,
            train_ds.labels(),
            skips,
            fingerprint(train_samples),
        )

    def _order(self, epoch: int) -> list[int]:
        from fundus_edge.torchdata import epoch_indices

        c = self.cfg
        n = len(self.train_ds)
        ws = self.dist.world_size
        return epoch_indices(
            n, epoch, c.seed, c.data.sampler, self.train_labels, self.dist.rank, ws
        )

    @functools.cached_property
    def _per_rank(self) -> int:
        return len(self._order(0))

    @property
    def drop_last(self) -> bool:
        """Whole batches only, unless a rank's share is smaller than one batch."""
        return self._per_rank >= self.cfg.data.batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch on each rank."""
        per_rank, bs = self._per_rank, self.cfg.data.batch_size
        steps = per_rank // bs if self.drop_last else math.ceil(per_rank / bs)
        return max(1, steps)

    def loader(self, epoch: int, first: int):
        """Epoch ``epoch``'s DataLoader from batch ``first`` on (this rank's share).

        Seeds torch's RNG from ``(seed, epoch, rank)``: dropout and the loader's base seed of
        epoch e depend on those only, not on history.
        """
        from torch.utils.data import DataLoader

        cfg, ds, bs = self.cfg, self.train_ds, self.cfg.data.batch_size
        order = self._order(epoch)
        drop_last = self.drop_last
        if drop_last:
            order = order[: (len(order) // bs) * bs]
        ds.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(cfg.seed, epoch) + self.dist.rank)
        return DataLoader(
            ds,
            batch_size=bs,
            sampler=order[first * bs :],
            num_workers=cfg.data.num_workers,
            pin_memory=self.dist.device.type == "cuda",
            drop_last=drop_last,
        )

    def val_loader(self):
        """The validation split in order, ``data.eval_batch_size`` at a time."""
        from torch.utils.data import DataLoader

        d = self.cfg.data
        return DataLoader(
            self.val_ds,
            batch_size=d.eval_batch_size,
            shuffle=False,
            num_workers=d.num_workers,
        )

    def batch(self, loaded: tuple) -> Batch | None:
        """A loader's tuple -> the readable rows as a :class:`Batch` (unreadable ones counted).

        Returns None when no row is readable. Under DDP every rank must still join the
        gradient all-reduce: :meth:`fallback` gives the rows to take a zero-weighted step on.
        """
        from fundus_edge.torchdata import split_unreadable

        x_all, y_all, idx, *masks_all = loaded
        x, y, *masks, dropped = split_unreadable(x_all, y_all, idx, *masks_all)
        self.skips.add(dropped)
        if not len(y):
            return None
        keep = idx >= 0
        return Batch(x, y, idx[keep], *(masks or (None, None)))

    @staticmethod
    def fallback(loaded: tuple) -> Batch:
        """All rows of a loader's tuple, unreadable ones included (for a zero-weighted step)."""
        x_all, y_all, idx, *masks_all = loaded
        return Batch(x_all, y_all, idx, *(masks_all or (None, None)))


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def open_data(cfg: TrainConfig):
    """The run's dataset and its training and validation samples (``data.limit`` applied).

    The trainer and the tracking callback (its fixed images, its data fingerprint) open the
    data through this one function, so both see the same samples.

    Returns:
        ``(dataset, train samples, validation samples)``.

    Raises:
        UserError: no ``data.root``, or a folder that does not exist.
        DataError: an empty training or validation split.
    """
    from fundus_edge.data import open_dataset

    root = Path(cfg.data.root) if cfg.data.root else None
    if root is None:
        raise UserError("--data: no dataset folder given (or data.root in the config)")
    if not root.exists():
        raise UserError(f"--data {root}: dataset folder does not exist")
    ds = open_dataset(root, format=cfg.data.format)
    train = ds.splits.get("train") or []
    val = ds.splits.get("val") or []
    if not train:
        raise DataError(f"{root}: no training samples found")
    if not val:
        raise DataError(f"{root}: no validation samples found (needed to select and tune)")
    if cfg.data.limit:
        train, val = train[: cfg.data.limit], val[: cfg.data.limit]
    return ds, train, val


def fingerprint(samples) -> str:
    """A short hash of the training split's ids and labels (``--resume`` refuses other data)."""
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.id}\t{''.join('1' if v else '0' for v in s.labels)}\n".encode())
    return h.hexdigest()[:16]


def _check_masks(train_ds, mask_weight: float, root: Any, main: bool) -> None:
    """Refuse a mask loss without masks; name unreadable masks once; say what is supervised."""
    n_masked = train_ds.masked_count()
    if not n_masked:
        raise UserError(
            f"optim.loss.mask_weight={mask_weight:g}, but no training image in "
            f"{root} has a lesion mask for a model label; set it to 0"
        )
    if train_ds.bad_masks:
        log.warning(
            "%d lesion mask(s) unreadable and left out, e.g. %s",
            len(train_ds.bad_masks),
            next(iter(sorted(train_ds.bad_masks.values()))),
        )
    if main:
        log.info(
            "mask-attention loss (weight %g) on the %d of %d training images with lesion masks",
            mask_weight,
            n_masked,
            len(train_ds),
        )
