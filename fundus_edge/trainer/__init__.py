"""Training: CAM-guided enhancement, imbalance-aware losses, transfer learning, runs that lose
nothing; shared by ``fundus-edge train``, the ablation and distillation.

One epoch, after the enhancement warm-up (the ``kernel`` attention strategy)::

    x (N,3,S,S) --Ensemble.forward(x, targets)--> logits (N,M',C), cams (N,M,C,h,w)
                  attention = attention_from(cams.detach(), targets or probs)   (N,1,h,w)
                  x' = enhance(x, attention)  -> logits_enhanced (N,M',C)
    loss = (loss(logits, y) + loss(logits_enhanced, y)) / 2

The maps come from the same forward pass (the model's forward-only CAM kernels); no extra
backward pass. ``enhance.cam_method`` other than ``kernel`` builds the attention with the
``grad-cam`` package instead (one backward per class and member: slow, for comparison).

The package, one job per module:

====================  ==========================================================================
``loop.py``           :func:`train`: set up, the epoch loop, validate and save after each epoch
``parts.py``          the run's parts made once from the config
``step.py``           :class:`TrainStep` (the one module DistributedDataParallel wraps),
                      :func:`take_step`, :func:`training_step` (the benchmark times it)
``attention.py``      attention strategies: :class:`NoAttention`, :class:`KernelAttention`,
                      :class:`GradCamAttention` (chosen once from ``enhance``)
``batches.py``        the data of a run, each epoch's loader, :class:`Batch`
``optim.py``          optimiser groups, :class:`Schedule`, mixed precision, :class:`ModelEMA`,
                      freezing
``validate.py``       validation, the epoch record, best-epoch selection
``state.py``          the run directory, ``last.state.pt`` and ``--resume``, RNG, Ctrl-C
``dist.py``           torchrun: process group, SyncBatchNorm, collectives
====================  ==========================================================================

Extending the step (distillation, semi-supervised data, experiment tracking)
----------------------------------------------------------------------------

``train(cfg, objectives=[...], extra_data=..., callbacks=[...])``:

* **Objectives** are extra loss terms: objects with ``name: str`` and
  ``__call__(outputs, batch) -> torch.Tensor`` returning a scalar, already weighted. The
  step adds it to the loss (inside the module DDP wraps, so gradients are synchronised), and
  the epoch's mean (over images) is logged as ``train_<name>`` in ``metrics.jsonl``.
  ``outputs`` holds ``logits`` (N,M',C, the original view's per-head logits, fp32 or the
  autocast dtype), ``logits_enhanced`` (N,M',C) in enhanced epochs, and ``cams``
  (N,M,C,h,w, with their graph) when the objective sets ``needs_cams = True`` (or the mask
  term is on). ``batch`` is a :class:`Batch` on the training device: ``x`` (N,3,S,S),
  ``y`` (N,C), ``index`` (N,) the rows' indices in the training split (``-1`` for rows from
  ``extra_data``; look precomputed per-image targets up by it), ``labelled`` (N,) bool or
  None (all), ``extra`` a dict of further per-row tensors. Names must be unique and not
  ``mask_loss``. An objective holding a model (a teacher) keeps it out of DDP: only the
  ensemble is a submodule of :class:`TrainStep`; put the teacher on the device, in eval
  mode, and compute under ``torch.no_grad()``.
* **Extra data** (:class:`ExtraData`): ``batch(epoch, step) -> Batch | None`` adds rows to
  every training batch (CPU tensors; ``labelled`` False for unlabelled rows, ``y`` zeros
  there; ``extra`` keys as the objectives expect). The supervised loss sees labelled rows
  only; the objectives see all rows. Draw the rows from ``(epoch, step)`` alone so that a
  resumed run sees the same ones.
* **Callbacks** (:class:`Callback`, rank 0 only): ``on_epoch_end(epoch, record, model)``
  after each epoch is saved (``epoch`` from 1, ``record`` the ``metrics.jsonl`` line,
  ``model`` what the checkpoints hold) and ``on_train_end(result)`` with the
  :class:`RunResult`. Either method may be missing.

A run directory ``runs/<name>/`` holds ``config.yaml``, ``metrics.jsonl``/``.csv``,
``last.safetensors``, ``best.safetensors``, ``last.state.pt`` and ``training_curves.png``
(see :mod:`fundus_edge.trainer.state`).

Resuming restores the state file exactly; an interrupted epoch (Ctrl-C saves the state at the
current step) continues from its next batch with the same order and augmentation draws,
because both derive from ``(seed, epoch, index)``. A run killed without warning resumes from
the last finished epoch.

Failures that must not cost a long run: an image that cannot be decoded is skipped and counted
(``skipped_images`` in the metrics, a warning naming the file once); a non-finite loss or
gradient stops the run before the optimiser applies it, with one line
(:class:`NonFiniteLossError`, exit code 2), leaving the checkpoints of finished epochs as
they were.

Multi-GPU: launched by ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) the step is
wrapped in DistributedDataParallel (BatchNorm converted to SyncBatchNorm on CUDA), each rank
takes a strided share of the epoch's order (DistributedSampler's), validation runs on rank 0
and only rank 0 writes. ``data.batch_size`` is per process; the effective batch size
(``batch_size * world_size``) is logged and recorded in every metrics record.
"""

from fundus_edge.trainer.attention import (
    AttentionStrategy,
    GradCamAttention,
    KernelAttention,
    NoAttention,
    cam_attention_gradcam,
)
from fundus_edge.trainer.batches import Batch, ExtraData
from fundus_edge.trainer.dist import resolve_device
from fundus_edge.trainer.loop import train
from fundus_edge.trainer.optim import ModelEMA
from fundus_edge.trainer.state import (
    RESUME_MAY_CHANGE,
    STATE_FILE,
    Callback,
    RunResult,
)
from fundus_edge.trainer.step import (
    NonFiniteLossError,
    Objective,
    TrainStep,
    take_step,
    training_step,
)

__all__ = [
    "RESUME_MAY_CHANGE",
    "STATE_FILE",
    "AttentionStrategy",
    "Batch",
    "Callback",
    "ExtraData",
    "GradCamAttention",
    "KernelAttention",
    "ModelEMA",
    "NoAttention",
    "NonFiniteLossError",
    "Objective",
    "RunResult",
    "TrainStep",
    "cam_attention_gradcam",
    "resolve_device",
    "take_step",
    "train",
    "training_step",
]
