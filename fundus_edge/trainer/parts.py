"""The parts of a training run, made once from its config: data, model, step, optimisation,
schedule, state and validation (:func:`~fundus_edge.trainer.train` builds them, the epochs
use them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fundus_edge.config import TrainConfig
from fundus_edge.log import get_logger
from fundus_edge.trainer.batches import ExtraData, TrainData
from fundus_edge.trainer.dist import Dist, sync_batchnorm
from fundus_edge.trainer.optim import Optimisation, Schedule
from fundus_edge.trainer.state import RunState
from fundus_edge.trainer.step import Objective, TrainStep, build_model
from fundus_edge.trainer.validate import Validation

__all__ = ["Parts", "use_channels_last"]

log = get_logger("train")


def use_channels_last(memory_format: str, device: torch.device) -> bool:
    """Whether ``optim.memory_format`` puts the model in channels_last on ``device``.

    ``auto`` chooses it on CPU only: there oneDNN's convolutions (forward and backward) skip a
    layout reorder per layer: a training step of the demo's MobileNetV3-OS16 + ResNet18 at
    128 px, batch 32, 1.41 s instead of 1.77 s on a 2-core EPYC; elsewhere the backbones' own layout is kept. The
    weights are the same numbers in another stride order; checkpoints are written contiguous.
    """
    if memory_format == "auto":
        return device.type == "cpu"
    return memory_format == "channels_last"


@dataclass
class Parts:
    """Everything the epochs of one run share.

    Attributes:
        meta: checkpoint metadata beside the weights (preprocessing, the training config).
        extra: more rows for every batch; callbacks: told about epochs (rank 0).
        bar_off: the progress bar forced off (True) or on (False); None: on a terminal.
    """

    cfg: TrainConfig
    dist: Dist
    data: TrainData
    step: TrainStep
    opt: Optimisation
    schedule: Schedule
    state: RunState
    validation: Validation
    meta: dict
    extra: ExtraData | None = None
    callbacks: Sequence[Any] = field(default_factory=tuple)
    bar_off: bool | None = None

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        dist_: Dist,
        run_dir: Path,
        resume: bool,
        objectives: Sequence[Objective] = (),
    ) -> Parts:
        """Open the data, build the model (weights loaded) and the rest; restore a resumed
        state. Nothing is written: a start that fails leaves the run directory as it was.

        Args:
            cfg: the resolved config.
            dist_: this process's place in the job.
            run_dir: the run directory (its state file when ``resume``).
            resume: restore the state file.
            objectives: extra loss terms of the step.

        Raises:
            UserError: missing data, unknown members or weights, a state that does not fit.
            DataError: empty splits, no readable training image.
        """
        from fundus_edge import losses

        o, bs, ws = cfg.optim, cfg.data.batch_size, dist_.world_size
        data = TrainData.open(cfg, dist_)
        ensemble = build_model(cfg, data.label_names).to(dist_.device)
        if use_channels_last(o.memory_format, dist_.device):
            ensemble = ensemble.to(memory_format=torch.channels_last)
        ensemble = sync_batchnorm(ensemble, dist_)
        loss_fn = losses.build_loss(o.loss, data.train_labels).to(dist_.device)
        opt = Optimisation(o, ensemble, dist_.device)
        if dist_.main:
            log.info(
                "effective batch size %d (%d per process x %d process%s, device %s)",
                bs * ws,
                bs,
                ws,
                "" if ws == 1 else "es",
                dist_.device,
            )
        n = data.steps_per_epoch
        schedule = Schedule(n * cfg.epochs, round(o.warmup_epochs * n), o.schedule, o.min_lr_ratio)
        step = TrainStep(ensemble, loss_fn, None, objectives, o.loss.mask_weight, opt.autocast)
        run = RunState(run_dir, data.label_names, data.train_fingerprint)
        if resume:
            run.load(ensemble, opt, cfg)
        validation = Validation(cfg, data, loss_fn, opt.autocast)
        train_meta = {
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "world_size": ws,
            "effective_batch_size": bs * ws,
        }
        meta = {
            "preprocess": data.pre.to_dict(),
            "train": train_meta,
            "threshold_policy": cfg.threshold_policy,
        }
        return cls(cfg, dist_, data, step, opt, schedule, run, validation, meta)

    @property
    def effective_batch_size(self) -> int:
        """``data.batch_size * world_size``."""
        return self.cfg.data.batch_size * self.dist.world_size

    def non_finite(self, what: str, value: float, *, epoch: int, step: int) -> Exception:
        """The error that stops training at ``(epoch, step)`` (0-based) before an update."""
        return self.state.non_finite(what, value, epoch, step, self.opt.lr, self.cfg.optim.lr)
