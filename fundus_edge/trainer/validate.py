"""Validation after each epoch, the epoch's record, and which epoch is best.

The record of a finished epoch (one line of ``metrics.jsonl``)::

    epoch, train_loss, [train_mask_loss], [train_<objective> ...], val_loss, val_macro_auroc,
    val_map, val_macro_f1, val_micro_f1, val_riadd, val_screening_auroc,
    val_elementwise_accuracy, lr, enhance, frozen, time_s, skipped_images,
    val_skipped_images, world_size, effective_batch_size, best
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fundus_edge.errors import DataError
from fundus_edge.trainer.step import NonFiniteLossError

__all__ = [
    "EpochStats",
    "Validation",
    "epoch_line",
    "epoch_record",
    "selection",
    "selection_key",
    "validate",
]


@dataclass
class EpochStats:
    """What one epoch's training pass measured (summed over ranks under DDP)."""

    train_loss: float
    terms: dict[str, float]  # term name -> epoch mean (``train_<name>`` in the record)
    skipped: int
    frozen: bool
    enhance: bool
    t0: float


@torch.no_grad()
def validate(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    device: torch.device,
    autocast,
    label_names: list[str],
    screening: str,
    where: str,
    policy: str = "f1",
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Validation report, predictions and thresholds tuned by ``policy``.

    Args:
        model: the model to validate (put in eval mode here).
        loader: the validation split's loader.
        loss_fn: the training loss (the report's ``loss``).
        device: where ``model`` is.
        autocast: the forward's mixed-precision context factory.
        label_names: the C label names.
        screening: the screening label (the RIADD score's first half).
        where: names the point of training in an error (``epoch 3``).
        policy: threshold policy (see :mod:`fundus_edge.operating`).

    Returns:
        ``(report, probabilities (N,C), thresholds (C,))``; ``report["skipped_images"]``
        counts unreadable validation images left out.

    Raises:
        DataError: no validation image could be read.
        NonFiniteLossError: non-finite predictions.
    """
    from fundus_edge.metrics import multilabel_report
    from fundus_edge.operating import tune
    from fundus_edge.torchdata import split_unreadable

    model.eval()
    probs, labels, losses = [], [], []
    skipped: list[int] = []
    for x, y, idx in loader:
        x, y, dropped = split_unreadable(x, y, idx)
        skipped += dropped
        if not len(y):
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        losses.append(float(loss_fn(out["logits"].float(), y)) * len(y))
        probs.append(out["probs"].float().cpu().numpy())
        labels.append(y.cpu().numpy())
    if not probs:
        raise DataError(f"no validation image could be read ({len(skipped)} unreadable)")
    p = np.concatenate(probs)
    t = np.concatenate(labels)
    if not np.isfinite(p).all():
        raise NonFiniteLossError(
            f"validation predictions are not finite after {where}; training stopped, "
            "checkpoints of earlier epochs kept; lower optim.lr or raise optim.grad_clip"
        )
    thr = tune(t, p, policy)
    rep = multilabel_report(t, p, label_names, thr, screening)
    rep["loss"] = float(np.sum(losses) / len(t))
    rep["skipped_images"] = len(skipped)
    return rep, p, thr


class Validation:
    """Rank 0's end of an epoch: validate the model, make the record, score it.

    Args:
        cfg: the run's config (``threshold_policy``, ``select``, ``data``).
        data: the run's :class:`~fundus_edge.trainer.batches.TrainData`.
        loss_fn: the training loss.
        autocast: the forward's mixed-precision context factory.
    """

    def __init__(self, cfg, data, loss_fn: nn.Module, autocast) -> None:
        self.cfg, self.data, self.loss_fn, self.autocast = cfg, data, loss_fn, autocast
        self.loader = data.val_loader()

    def __call__(
        self, model: nn.Module, epoch: int, stats: EpochStats, lr: float
    ) -> tuple[dict, float, dict, np.ndarray]:
        """``(record, selection score, report, thresholds)`` of finished epoch ``epoch``."""
        d, cfg, ws = self.data, self.cfg, self.data.dist.world_size
        rep, _, thr = validate(
            model,
            self.loader,
            self.loss_fn,
            d.dist.device,
            self.autocast,
            d.label_names,
            d.screening,
            f"epoch {epoch + 1}",
            cfg.threshold_policy,
        )
        rec = epoch_record(epoch, stats, rep, lr, ws, cfg.data.batch_size * ws)
        return rec, selection(cfg.select, rec), rep, thr


def _none_if_nan(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _summary(rep: dict) -> dict:
    return {
        "val_loss": rep["loss"],
        "val_macro_auroc": rep["macro"]["auroc"],
        "val_map": rep["macro"]["ap"],
        "val_macro_f1": rep["macro"]["f1"],
        "val_micro_f1": rep["micro"]["f1"],
        "val_riadd": rep["riadd"]["score"],
        "val_screening_auroc": rep["riadd"]["screening_auroc"],
        "val_elementwise_accuracy": _none_if_nan(rep["elementwise"]["accuracy"]),
    }


def epoch_record(
    epoch: int,
    stats: EpochStats,
    rep: dict,
    lr: float,
    world_size: int,
    effective_bs: int,
) -> dict:
    """The record of finished epoch ``epoch`` (0-based; the record counts from 1), no ``best``."""
    return {
        "epoch": epoch + 1,
        "train_loss": stats.train_loss,
        **{f"train_{k}": v for k, v in stats.terms.items()},
        **_summary(rep),
        "lr": lr,
        "enhance": stats.enhance,
        "frozen": stats.frozen,
        "time_s": round(time.time() - stats.t0, 2),
        "skipped_images": stats.skipped,
        "val_skipped_images": rep["skipped_images"],
        "world_size": world_size,
        "effective_batch_size": effective_bs,
    }


def selection_key(select: str, rec: dict) -> str:
    """The record's key that ``select`` names; ``auto``: RIADD score, else macro AUROC, else
    the validation loss."""
    if select != "auto":
        return select  # one of config.SELECT_METRICS, all in every record
    for key in ("val_riadd", "val_macro_auroc"):
        if rec.get(key) is not None:
            return key
    return "val_loss"


def selection(select: str, rec: dict) -> float:
    """Higher is better: the selected metric, negated for a loss; a missing value is worst."""
    key = selection_key(select, rec)
    v = rec[key]
    if v is None:
        return -math.inf
    return -float(v) if key.endswith("loss") else float(v)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def epoch_line(rec: dict, epochs: int) -> str:
    """The log line of one finished epoch."""
    flags = " ".join(
        f
        for f, on in (
            ("[best]", rec["best"]),
            ("[enhance]", rec["enhance"]),
            ("[frozen]", rec["frozen"]),
        )
        if on
    )
    mask = f"(mask {rec['train_mask_loss']:.3f})  " if "train_mask_loss" in rec else ""
    return (
        f"epoch {rec['epoch']}/{epochs}  train_loss {rec['train_loss']:.4f}  {mask}"
        f"val_loss {rec['val_loss']:.4f}  macro_AUROC {_fmt(rec['val_macro_auroc'])}  "
        f"mAP {_fmt(rec['val_map'])}  RIADD {_fmt(rec['val_riadd'])}  "
        f"lr {rec['lr']:.2e}  {rec['time_s']:.1f}s {flags}".rstrip()
    )
