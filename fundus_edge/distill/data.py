"""The student's extra inputs: unlabelled images, and teacher targets that follow augmentation.

Unlabelled images are any images under a folder (every format the readers know: the media
table's stills, DICOM included; ``Masks``/``Meta`` folders skipped, as in a dataset), found
with the dataset file index (:class:`fundus_edge.data.files.FileIndex`). Images of the labelled
dataset (any split: the same file or a byte-identical copy) are left out, so pointing
``--unlabelled`` at the dataset, or at a folder holding copies of its test images, cannot leak
held-out images into training.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fundus_edge.distill.targets import augment_maps
from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = ["TeacherTargetSource", "unlabelled_samples"]

log = get_logger("distill")

#: The split name of unlabelled samples.
UNLABELLED = "unlabelled"


def unlabelled_samples(
    folder: str | os.PathLike,
    num_classes: int,
    exclude: Iterable[os.PathLike] = (),
    limit: int | None = None,
) -> list:
    """Samples for the images under ``folder`` (labels all zero; they are not used).

    Args:
        folder: any folder of images.
        num_classes: C (the zero label vector's length).
        exclude: image files to leave out (the labelled dataset's), found again by path or
            as byte-identical copies anywhere under ``folder``.
        limit: keep at most this many (the first by path).

    Raises:
        UserError: no such folder, or no image in it (after the exclusions).
    """
    from fundus_edge.data import Sample
    from fundus_edge.data.files import FileIndex

    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        raise UserError(f"--unlabelled {root}: no such folder")
    found = sorted(FileIndex(root).all_images())
    paths = _outside(found, [Path(p) for p in exclude])
    if len(paths) < len(found):
        log.info(
            "--unlabelled: %d image(s) of the labelled dataset (or copies) left out",
            len(found) - len(paths),
        )
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise UserError(f"--unlabelled {root}: no image found (outside the labelled dataset)")
    zeros = np.zeros(num_classes, dtype=np.float32)
    return [
        Sample(id=str(p.relative_to(root)), path=p, labels=zeros.copy(), split=UNLABELLED)
        for p in paths
    ]


def _outside(found: list[Path], exclude: list[Path]) -> list[Path]:
    """``found`` without the files of ``exclude`` and byte-identical copies of them (only
    files of equal size are hashed)."""
    from fundus_edge.fileio import sha256_file

    skip = {p.resolve() for p in exclude}
    kept = [p for p in found if p.resolve() not in skip]
    sizes: dict[int, list[Path]] = {}
    for p in exclude:
        try:
            sizes.setdefault(p.stat().st_size, []).append(p)
        except OSError:
            continue
    candidates = {p: p.stat().st_size for p in kept}
    if not any(size in sizes for size in candidates.values()):
        return kept
    hashes = {sha256_file(q) for size in set(candidates.values()) & set(sizes) for q in sizes[size]}
    return [p for p in kept if candidates[p] not in sizes or sha256_file(p) not in hashes]


class TeacherTargetSource:
    """The teacher's targets of every row of a training batch, and the unlabelled rows.

    It is the run's :class:`~fundus_edge.trainer.ExtraData`: the trainer asks it for more rows
    (``batch(epoch, step)``) just before each step, which also tells it the epoch whose
    augmentation the step's images went through. The objectives then ask :meth:`targets` for
    the batch's teacher targets:

    * rows with ``index >= 0`` (the labelled training split): cached targets by index, maps
      moved as the training dataset moved that image in this epoch
      (:func:`~fundus_edge.distill.targets.augment_maps`);
    * rows with ``index == -1``: the unlabelled rows this object added at this step, in order
      (the trainer appends them after the labelled rows).

    Unlabelled rows are drawn from ``(epoch, step)`` alone: the epoch's permutation of the
    unlabelled images (seeded by ``(seed, epoch)``), ``per_step`` of them per step, strided by
    rank under torchrun, wrapping around; a resumed run sees the same rows.

    Args:
        targets: :class:`~fundus_edge.distill.targets.TeacherTargets` for the labelled split
            (dataset order) followed by the unlabelled images.
        n_labelled: how many of the targets' rows are the labelled split's.
        size: the training input side.
        augment: the training dataset's :class:`~fundus_edge.torchdata.AugmentConfig`.
        seed: the training seed (the training dataset's augmentation seed).
        unlabelled: a :class:`~fundus_edge.torchdata.FundusTorchDataset` of the unlabelled
            images (augmented like the training split, from its own seed), or None.
        per_step: unlabelled rows added to each step.
    """

    def __init__(
        self,
        targets,
        n_labelled: int,
        size: int,
        augment,
        seed: int,
        unlabelled=None,
        per_step: int = 0,
    ) -> None:
        n_extra = 0 if unlabelled is None else len(unlabelled)
        if len(targets) != n_labelled + n_extra:
            raise ValueError(
                f"{len(targets)} target rows for {n_labelled} labelled + {n_extra} unlabelled"
            )
        self.cached = targets
        self.n_labelled = int(n_labelled)
        self.size = int(size)
        self.augment = augment
        self.seed = int(seed)
        self.unlabelled = unlabelled
        self.per_step = int(per_step) if unlabelled is not None else 0
        self.epoch = 0
        self._rows: list[int] = []  # unlabelled rows (0-based among them) of the current step
        self._cache: tuple[object, dict] | None = None

    # ExtraData ------------------------------------------------------------------------------

    def batch(self, epoch: int, step: int):
        """This step's unlabelled rows as a trainer :class:`~fundus_edge.trainer.Batch` (or
        None), and the epoch noted for :meth:`targets`."""
        self.epoch, self._rows, self._cache = int(epoch), [], None
        if not self.per_step:
            return None
        import torch

        from fundus_edge.trainer import Batch

        rank, world = _rank()
        n = len(self.unlabelled)
        order = np.random.default_rng((self.seed, int(epoch), 1)).permutation(n)
        first = (int(step) * world + rank) * self.per_step
        self._rows = [int(order[(first + k) % n]) for k in range(self.per_step)]
        self.unlabelled.set_epoch(epoch)
        items = [self.unlabelled[i] for i in self._rows]
        readable = [it for it in items if it[2] >= 0]
        self._rows = [int(it[2]) for it in readable]
        if not readable:
            return None
        x = torch.stack([it[0] for it in readable])
        masks = has = None
        if len(readable[0]) > 3:  # the training split carries lesion masks: keep the shape
            masks = torch.stack([it[3] for it in readable])
            has = torch.stack([it[4] for it in readable])
        return Batch(
            x=x,
            y=torch.zeros(len(readable), self.cached.logits.shape[1]),
            index=torch.full((len(readable),), -1, dtype=torch.long),
            masks=masks,
            has_mask=has,
            labelled=torch.zeros(len(readable), dtype=torch.bool),
        )

    # Targets --------------------------------------------------------------------------------

    def targets(self, batch) -> dict:
        """``logits`` (N,C), ``maps`` (N,C,h,w), ``attention`` (N,1,h,w) of ``batch``'s rows,
        on its device (computed once per batch, shared by the objectives)."""
        import torch

        if self._cache is not None and self._cache[0] is batch:
            return self._cache[1]
        index = batch.index.detach().cpu().numpy() if batch.index is not None else None
        if index is None:
            raise ValueError("distillation needs the batch's row indices (Batch.index)")
        extra = iter(self._rows)
        # (target row, augmentation seed, index in its own dataset) per batch row
        rows: list[tuple[int, int, int]] = []
        for i in index:
            if i >= 0:
                rows.append((int(i), self.seed, int(i)))
                continue
            j = next(extra, None)
            if j is None:
                raise ValueError("more unlabelled rows in the batch than were added")
            rows.append((self.n_labelled + j, self.unlabelled.seed, j))
        t = self.cached
        moved = []
        for r, seed, own in rows:
            stacked = np.concatenate([t.maps[r], t.attention[r]])  # (C+1, h, w)
            moved.append(augment_maps(stacked, self.size, self.augment, seed, self.epoch, own))
        m = torch.from_numpy(np.stack(moved)).to(batch.x.device)
        out = {
            "logits": torch.from_numpy(t.logits[[r for r, _, _ in rows]]).to(batch.x.device),
            "maps": m[:, :-1],
            "attention": m[:, -1:],
        }
        self._cache = (batch, out)
        return out


def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
