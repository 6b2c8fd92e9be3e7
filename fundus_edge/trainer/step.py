"""The training step: one module (DistributedDataParallel wraps it) from a batch to its loss.

::

    batch --attention.prepare (outside DDP; grad-cam only)--> prepared attention
    batch --TrainStep.forward--> views: logits (N,M',C) [, logits_enhanced, cams]
          loss = loss_fn(logits, y)                  (labelled rows only)
                 then (loss + loss_fn(logits_enhanced, y)) / 2   when the strategy enhances
               + mask_weight * mask_attention_loss(cams, masks)  (optim.loss.mask_weight > 0)
               + sum of objective(views, batch)                  (extra terms: distillation)

:func:`take_step` adds the backward and the update; :func:`training_step` is one whole step as
a public function (the benchmark times it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from torch import nn

from fundus_edge.config import TrainConfig
from fundus_edge.errors import UserError
from fundus_edge.trainer.attention import AttentionStrategy, NoAttention, from_mode
from fundus_edge.trainer.batches import Batch
from fundus_edge.trainer.optim import Optimisation

__all__ = [
    "NonFiniteLossError",
    "Objective",
    "TrainStep",
    "build_model",
    "take_step",
    "training_step",
]


class NonFiniteLossError(UserError):
    """The loss or the gradient became NaN/inf; training stopped before applying it (exit 2)."""


class Objective(Protocol):
    """An extra loss term of the step (see :mod:`fundus_edge.trainer` for the contract).

    Attributes:
        name: the metrics key is ``train_<name>`` (its epoch mean).
        needs_cams: optional; True asks the step for ``outputs["cams"]`` (N,M,C,h,w).
    """

    name: str

    def __call__(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor: ...


def build_model(cfg: TrainConfig, label_names: list[str]) -> nn.Module:
    """The ensemble ``cfg`` describes for these labels (weights loaded per ``model.weights``).

    Raises:
        UserError: unknown members, missing ImageNet files, a checkpoint that does not fit.
    """
    from fundus_edge.models import build_ensemble

    ensemble = build_ensemble(cfg.ensemble_config(label_names))
    if cfg.optim.bn_momentum is not None:
        for m in ensemble.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.optim.bn_momentum
    return ensemble


class TrainStep(nn.Module):
    """Batch -> views and loss: the one module DistributedDataParallel wraps.

    Only ``ensemble`` is a submodule: the loss and the objectives (a teacher, say) stay
    outside what DDP synchronises.

    Args:
        ensemble: the :class:`~fundus_edge.models.Ensemble` being trained.
        loss_fn: the supervised loss (``(N,C)`` logits and labels -> scalar).
        attention: the views' strategy; :attr:`attention` may be swapped between epochs.
        objectives: extra terms, each added to the loss as it returns it.
        mask_weight: the mask-attention term's weight (0: off).
        autocast: the forward's mixed-precision context factory.
    """

    def __init__(
        self,
        ensemble: nn.Module,
        loss_fn: nn.Module,
        attention: AttentionStrategy | None = None,
        objectives: Iterable[Objective] = (),
        mask_weight: float = 0.0,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        super().__init__()
        self.ensemble = ensemble
        self._loss = (loss_fn,)  # a tuple: not a submodule
        self.attention = attention or NoAttention()
        self.objectives: tuple[Objective, ...] = tuple(objectives)
        self.mask_weight = float(mask_weight)
        self.autocast = autocast
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names) or "mask_loss" in names:
            raise ValueError(f"objective names must be unique and not 'mask_loss': {names}")

    @property
    def loss_fn(self) -> nn.Module:
        """The supervised loss."""
        return self._loss[0]

    @property
    def term_names(self) -> list[str]:
        """The logged terms' names, in order: ``mask_loss`` (when on), then the objectives'."""
        return (["mask_loss"] if self.mask_weight > 0 else []) + [o.name for o in self.objectives]

    def forward(
        self, batch: Batch, prepared: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """The views (see :meth:`AttentionStrategy.views`) plus ``loss`` (scalar, graph kept)
        and ``terms`` (name -> scalar: the mask term unweighted, objectives as returned)."""
        from fundus_edge.losses import mask_attention_loss

        masked = batch.masks is not None and self.mask_weight > 0
        want_cams = masked or any(getattr(o, "needs_cams", False) for o in self.objectives)
        with self.autocast():
            out = self.attention.views(self.ensemble, batch.x, batch.y, prepared, want_cams)
        loss = self._supervised(out["logits"], batch)
        if "logits_enhanced" in out:
            loss = 0.5 * (loss + self._supervised(out["logits_enhanced"], batch))
        terms: dict[str, torch.Tensor] = {}
        if masked:
            # It computes in fp32.
            terms["mask_loss"] = mask_attention_loss(
                out["cams"], batch.masks, batch.has_mask, batch.y
            )
            loss = loss + self.mask_weight * terms["mask_loss"]
        for objective in self.objectives:
            terms[objective.name] = objective(out, batch)
            loss = loss + terms[objective.name]
        return {**out, "loss": loss, "terms": terms}

    def _supervised(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        loss_fn = self.loss_fn
        keep = batch.labelled
        if keep is None or bool(keep.all()):
            return loss_fn(logits.float(), batch.y)
        if not bool(keep.any()):
            return logits.float().sum() * 0.0  # no labels in this batch: no supervised term
        return loss_fn(logits[keep].float(), batch.y[keep])


def take_step(
    module: nn.Module,
    step: TrainStep,
    batch: Batch,
    opt: Optimisation,
    *,
    restore_mode: Callable[[], None],
    agree: Callable[[bool], bool],
    fail: Callable[[str, float], Exception],
    weight: float = 1.0,
) -> dict[str, float]:
    """Forward, loss, backward, clip, optimiser and EMA update for one batch.

    Args:
        module: ``step`` or the DistributedDataParallel wrapping it.
        step: the step module (its strategy prepares outside ``module``).
        batch: the batch, on the step's device.
        opt: the optimisation.
        restore_mode: puts the model back in its training mode (grad-cam switches it).
        agree: a flag -> whether it holds on every rank.
        fail: ``(what, value)`` -> the :class:`NonFiniteLossError` to raise.
        weight: 0 for a step every rank must join but that must change nothing.

    Returns:
        ``loss`` (weighted) and each term's value.

    Raises:
        NonFiniteLossError: a non-finite loss (on any rank) or gradient norm; nothing applied.
    """
    prepared = step.attention.prepare(step.ensemble, batch.x, batch.y, restore_mode)
    out = module(batch, prepared)
    loss = out["loss"]
    if weight != 1.0:
        loss = loss * weight
    if not agree(bool(torch.isfinite(loss))):
        raise fail("the loss", float(loss.detach()))
    opt.update(loss, fail)
    values = {name: float(v.detach()) for name, v in out["terms"].items()}
    return {"loss": float(loss.detach()), **values}


def training_step(
    ensemble: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str | AttentionStrategy = "kernel",
    train_weights: str = "targets",
    grad_clip: float = 0.0,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask_weight: float = 0.0,
    objectives: Sequence[Objective] = (),
) -> float:
    """One training step as :func:`~fundus_edge.trainer.train` takes it: forward, loss,
    backward, optimiser step.

    Args:
        ensemble: an :class:`~fundus_edge.models.Ensemble` (put in training mode here).
        x: ``(N, 3, S, S)`` normalised images.
        y: ``(N, C)`` 0/1 labels.
        loss_fn: a loss from :func:`fundus_edge.losses.build_loss`.
        optimizer: stepped when given (gradients are zeroed first).
        mode: an attention strategy, or its name: ``"plain"`` (original view only);
            ``"kernel"`` (CAM-augmented: maps from the forward-only kernels of the same pass,
            then the enhanced view; needs ``views="both"``); or a ``grad-cam`` method
            (``gradcam``, ``gradcam++``, ...: the maps from the package, one backward per
            member and class present).
        train_weights: ``"targets"`` (maps of the true labels) or ``"probs"`` (with a name).
        grad_clip: max gradient norm; 0 disables.
        masks: ``(N,C,H,W)`` lesion masks and ``(N,C)`` has-mask flags, for the
            mask-attention term.
        mask_weight: that term's weight (0: off).
        objectives: extra loss terms (see :class:`Objective`).

    Returns:
        The loss value.

    Raises:
        UserError: an unknown mode, or an enhancing one on a model built without the second
            view.
    """
    strategy = mode if isinstance(mode, AttentionStrategy) else from_mode(mode, train_weights)
    strategy.check(ensemble)
    ensemble.train()
    step = TrainStep(ensemble, loss_fn, strategy, objectives, mask_weight)
    batch = Batch(x, y, masks=masks[0] if masks else None, has_mask=masks[1] if masks else None)
    prepared = strategy.prepare(ensemble, x, y, ensemble.train)
    loss = step(batch, prepared)["loss"]
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ensemble.parameters(), grad_clip)
    if optimizer is not None:
        optimizer.step()
    return float(loss.detach())
