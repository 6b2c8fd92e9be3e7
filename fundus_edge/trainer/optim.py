"""Optimiser, learning-rate schedule, mixed precision, EMA and backbone freezing.

:class:`Optimisation` is everything that turns a loss into new weights: zero the gradients,
(scaled) backward, clip, optimiser step, EMA update. Its state is what ``last.state.pt`` saves
beside the model.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fundus_edge.config import OptimSection
from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

log = get_logger("train")

__all__ = ["ModelEMA", "Optimisation", "Schedule", "build_optimizer", "set_phase"]


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers.

    ``ema = decay * ema + (1 - decay) * weights`` after every optimiser step; integer buffers
    (BatchNorm's batch counter) are copied. The averaged copy is what validation and the
    saved checkpoints use.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s weights."""
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(self.decay).add_(src[k].detach(), alpha=1.0 - self.decay)
            else:
                v.copy_(src[k])

    def state_dict(self) -> dict:
        """The averaged weights."""
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        """Restore the averaged weights (``--resume``)."""
        self.module.load_state_dict(sd)


@dataclass
class Schedule:
    """Linear warm-up over ``warmup`` steps, then cosine to ``min_ratio`` (or constant)."""

    total: int
    warmup: int
    kind: str = "cosine"  # "cosine" | "constant"
    min_ratio: float = 0.01

    def factor(self, step: int) -> float:
        """The learning-rate multiplier at global step ``step``."""
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        done = (step - self.warmup) / max(1, self.total - self.warmup)
        m = self.min_ratio
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every parameter group's ``lr`` to its ``base_lr`` times :meth:`factor`."""
        f = self.factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * f


def _backbone_and_head_params(ensemble: nn.Module) -> tuple[list, list]:
    backbone = []
    for m in ensemble.members:
        backbone += list(m.features.parameters())
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in ensemble.parameters() if id(p) not in backbone_ids]
    return backbone, head


def build_optimizer(o: OptimSection, ensemble: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD with two groups: backbones (``lr * backbone_lr_mult``) and heads (``lr``).

    Each group keeps its ``base_lr``: the schedule scales it, ``--resume --lr`` replaces it.
    """
    backbone, head = _backbone_and_head_params(ensemble)
    groups = [
        {
            "params": backbone,
            "lr": o.lr * o.backbone_lr_mult,
            "base_lr": o.lr * o.backbone_lr_mult,
        },
        {"params": head, "lr": o.lr, "base_lr": o.lr},
    ]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def set_phase(ensemble: nn.Module, frozen: bool) -> None:
    """Training mode, the backbones frozen or not.

    A frozen backbone keeps its (ImageNet) BatchNorm statistics too: it stays in eval mode.
    """
    for m in ensemble.members:
        for p in m.features.parameters():
            p.requires_grad_(not frozen)
    train_mode(ensemble, frozen)


def train_mode(ensemble: nn.Module, frozen: bool) -> None:
    """``ensemble.train()``, frozen backbones back in eval mode."""
    ensemble.train()
    if frozen:
        for m in ensemble.members:
            m.features.eval()


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX), where oneDNN runs
    ``torch.autocast("cpu", torch.bfloat16)`` natively rather than emulating it."""
    from fundus_edge.doctor import cpu_info

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))


class Optimisation:
    """Optimiser, gradient scaler, EMA and clipping: one loss in, one update out.

    Args:
        o: the config's ``optim`` section.
        ensemble: the model whose parameters train.
        device: where it trains (mixed precision needs CUDA).

    Raises:
        UserError: ``optim.amp`` fp16 on a device other than CUDA (bf16 runs on CUDA and on
            the CPU: oneDNN's bfloat16 kernels on AVX-512 BF16 and AMX).
    """

    def __init__(self, o: OptimSection, ensemble: nn.Module, device: torch.device) -> None:
        self.ensemble = ensemble
        self.optimizer = build_optimizer(o, ensemble)
        amp = o.amp
        if amp == "auto":
            amp = "fp16" if device.type == "cuda" else "none"
        if amp == "fp16" and device.type != "cuda":
            raise UserError(
                f"optim.amp=fp16: float16 mixed precision needs CUDA (device is {device})"
            )
        if amp == "bf16" and device.type not in ("cuda", "cpu"):
            raise UserError(
                f"optim.amp=bf16: mixed precision needs CUDA or the CPU (device is {device})"
            )
        if amp == "bf16" and device.type == "cpu" and not cpu_has_bf16():
            log.warning(
                "optim.amp=bf16 on a CPU without AVX-512 BF16 or AMX: bfloat16 is emulated "
                "there, slower than float32"
            )
        self.device_type = device.type
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.ema = ModelEMA(ensemble, o.ema) if o.ema > 0 else None
        self.grad_clip = o.grad_clip

    def autocast(self):
        """The forward's mixed-precision context (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    @property
    def lr(self) -> float:
        """The heads' current learning rate."""
        return self.optimizer.param_groups[-1]["lr"]

    @property
    def eval_model(self) -> nn.Module:
        """What validation and checkpoints use: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.ensemble

    def update(self, loss: torch.Tensor, fail: Callable[[str, float], Exception]) -> None:
        """Backward ``loss``, clip, step, EMA.

        Args:
            loss: the batch's scalar loss (already checked finite).
            fail: builds the error for a non-finite gradient norm (fp32 only: with fp16 the
                scaler skips such steps itself).
        """
        scaler = self.scaler
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.grad_clip > 0:
            scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.ensemble.parameters(), self.grad_clip)
            if not scaler.is_enabled() and not torch.isfinite(norm):
                raise fail("the gradient norm", float(norm))
        scaler.step(self.optimizer)
        scaler.update()
        if self.ema is not None:
            self.ema.update(self.ensemble)

    def state_dict(self) -> dict:
        """Optimiser, scaler and EMA states (for ``last.state.pt``)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, st: dict, o: OptimSection) -> float | None:
        """Restore :meth:`state_dict`; ``o.lr`` other than the saved one rescales both groups.

        Returns:
            The saved learning rate when ``o.lr`` replaced it (``--resume --lr``), else None.
        """
        self.optimizer.load_state_dict(st["optimizer"])
        backbone, head = self.optimizer.param_groups
        old = head["base_lr"]
        if old != o.lr:  # the schedule goes on, rescaled
            backbone["base_lr"], head["base_lr"] = o.lr * o.backbone_lr_mult, o.lr
        self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        return old if old != o.lr else None
