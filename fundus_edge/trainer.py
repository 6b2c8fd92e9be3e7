"""Training loop: CAM-guided enhancement, imbalance-aware losses, transfer learning, runs that
lose nothing.

One epoch, after the enhancement warm-up::

    x (N,3,S,S) --Ensemble.forward(x, targets)--> logits (N,M',C), cams (N,M,C,h,w)
                  attention = attention_from(cams.detach(), targets or probs)   (N,1,h,w)
                  x' = enhance(x, attention)  -> logits_enhanced (N,M',C)
    loss = (loss(logits, y) + loss(logits_enhanced, y)) / 2

The maps come from the same forward pass (the model's forward-only CAM kernels); no extra
backward pass. ``enhance.cam_method`` other than ``kernel`` builds the attention with the
``grad-cam`` package instead (one backward per class and member: slow, for comparison).
:func:`training_step` is that one step as a public function (the benchmark times it).

A run directory ``runs/<name>/`` holds::

    config.yaml          the resolved TrainConfig
    metrics.jsonl        one JSON record per finished epoch
    metrics.csv          the same records as a table (rewritten atomically every epoch)
    last.safetensors     model after the last finished epoch (EMA weights when EMA is on)
    best.safetensors     model of the best validation epoch, thresholds tuned on validation
    last.state.pt        optimiser, scheduler, scaler, EMA, RNG states, epoch, step: --resume
    training_curves.png  losses and validation metrics per epoch

Resuming restores the state file exactly; an interrupted epoch (Ctrl-C saves the state at the
current step) continues from its next batch with the same order and augmentation draws,
because both derive from ``(seed, epoch, index)``. A run killed without warning resumes from
the last finished epoch.

Failures that must not cost a long run: an image that cannot be decoded is skipped and counted
(``skipped_images`` in the metrics, a warning naming the file once); a non-finite loss or
gradient stops the run before the optimiser applies it, with one line
(:class:`NonFiniteLossError`, exit code 2), leaving the checkpoints of finished epochs as
they were.

Multi-GPU: launched by ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) the model is
wrapped in DistributedDataParallel (BatchNorm converted to SyncBatchNorm on CUDA), each rank
takes a strided share of the epoch's order (DistributedSampler's), validation runs on rank 0
and only rank 0 writes. ``data.batch_size`` is per process; the effective batch size
(``batch_size * world_size``) is logged and recorded in every metrics record.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fundus_edge.config import CAM_METHODS, TrainConfig, save_config
from fundus_edge.errors import DataError, UserError
from fundus_edge.fileio import atomic_open, atomic_write_text
from fundus_edge.log import get_logger, progress

__all__ = [
    "STATE_FILE",
    "ModelEMA",
    "NonFiniteLossError",
    "RunResult",
    "cam_attention_gradcam",
    "resolve_device",
    "train",
    "training_step",
]

log = get_logger("train")

STATE_FILE = "last.state.pt"
_RUN_MARKER = "config.yaml"


class NonFiniteLossError(UserError):
    """The loss or the gradient became NaN/inf; training stopped before applying it (exit 2)."""


@dataclass
class RunResult:
    """What :func:`train` did.

    Attributes:
        run_dir: the run directory.
        epochs_done: finished epochs (all of them, including earlier resumed ones).
        best_path: best checkpoint (None before a validation epoch finished).
        last_path: last checkpoint.
        best_metric: the selection metric's value at the best epoch (a loss as it is).
        best_name: which metric that is (``val_riadd``, ``val_loss``, ...).
        history: the ``metrics.jsonl`` records.
        stopped_early: stopped by ``stop_after`` before ``epochs``.
        train_time_s: wall time of this call (data loading included).
        effective_batch_size: ``data.batch_size * world_size``.
        skipped_images: unreadable training images this process skipped, summed over epochs.
        val_skipped_images: unreadable validation images (each epoch skips the same ones).
        rank: this process's rank (0 without torchrun); only rank 0 wrote the run dir.
    """

    run_dir: Path
    epochs_done: int
    best_path: Path | None
    last_path: Path | None
    best_metric: float | None
    best_name: str | None = None
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    train_time_s: float = 0.0
    effective_batch_size: int = 0
    skipped_images: int = 0
    val_skipped_images: int = 0
    rank: int = 0


# --------------------------------------------------------------------------------------------
# Devices, distribution, determinism


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without CUDA is a user error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA"
            raise UserError(
                f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                f"built with {built}); use --device cpu"
            )
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_spec: str) -> tuple[_Dist, torch.device]:
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return _Dist(), resolve_device(device_spec)
    import torch.distributed as dist

    d = _Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True)
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _epoch_seed(seed: int, epoch: int) -> int:
    # Dropout and other torch draws of epoch e depend on (seed, e) only, not on history.
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate((s["python"][1], tuple(s["python"][0]), None))


# --------------------------------------------------------------------------------------------
# EMA


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
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(self.decay).add_(src[k].detach(), alpha=1.0 - self.decay)
            else:
                v.copy_(src[k])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)


# --------------------------------------------------------------------------------------------
# Model pieces


class _TrainForward(nn.Module):
    """The training step's forward, one module so DistributedDataParallel can wrap it.

    ``forward(x, targets, mode, attention, want_cams)`` -> ``(logits, logits_enhanced or None,
    cams or None)``. ``mode`` ``"plain"``: the original view; ``"kernel"``: the ensemble's own
    two-view forward; ``"given"``: enhanced view from an attention computed outside (the
    grad-cam slow path). ``want_cams`` also returns the first pass's raw class maps
    ``(N,M,C,h,w)`` with their graph (the mask-attention loss trains through them).
    """

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None,
        mode: str,
        attention: torch.Tensor | None = None,
        want_cams: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        ens = self.ensemble
        if mode == "kernel":
            out = ens(x, targets)
            return out["logits"], out["logits_enhanced"], out["cams"] if want_cams else None
        if want_cams:
            logits, cams = ens.first_pass(x)  # (N,M',C), (N,M,C,h,w)
        else:
            logits, cams = ens.head_logits(x), None
        if mode == "plain":
            return logits, None, cams
        return logits, ens.head_logits(ens.enhance(x, attention)), cams


def _backbone_and_head_params(ensemble: nn.Module) -> tuple[list, list]:
    backbone, head = [], []
    for m in ensemble.members:
        backbone += list(m.features.parameters())
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in ensemble.parameters() if id(p) not in backbone_ids]
    return backbone, head


def _set_frozen(ensemble: nn.Module, frozen: bool) -> None:
    for m in ensemble.members:
        for p in m.features.parameters():
            p.requires_grad_(not frozen)


def _train_mode(ensemble: nn.Module, frozen: bool) -> None:
    ensemble.train()
    if frozen:
        # A frozen backbone keeps its (ImageNet) BatchNorm statistics too.
        for m in ensemble.members:
            m.features.eval()


class _LogitsView(nn.Module):
    """(N,3,H,W) -> (N,C) mean head logits: the model the grad-cam package sees."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.head_logits(x).mean(dim=1)


def cam_attention_gradcam(
    ensemble: nn.Module, x: torch.Tensor, weights: torch.Tensor, method: str
) -> torch.Tensor:
    """Attention (N,1,H,W) from the ``grad-cam`` package's maps (the slow comparison path).

    For each member (its ``target_layer``) and each class with a non-zero weight in the batch,
    one ``grad-cam`` call with ``ClassifierOutputTarget(c)`` for every image gives normalised
    maps at input resolution; they are combined as the kernel path does
    (:meth:`Ensemble.attention_from`). The package calls ``model.eval()`` and accumulates
    parameter gradients: the caller restores the training mode and zeroes the gradients.
    """
    from fundus_edge.errors import require

    require("pytorch_grad_cam", purpose="--cam-method " + method)
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "xgradcam": pgc.XGradCAM,
        "hirescam": pgc.HiResCAM,
        "layercam": pgc.LayerCAM,
        "eigencam": pgc.EigenCAM,
    }
    cls = classes[method]
    n, _, h, w = x.shape
    c = weights.shape[1]
    members = list(ensemble.members)
    maps = torch.zeros(n, len(members), c, h, w, device=x.device)  # (N,M,C,H,W)
    view = _LogitsView(ensemble)
    active = [j for j in range(c) if float(weights[:, j].sum()) > 0]
    for mi, member in enumerate(members):
        with cls(model=view, target_layers=[member.target_layer]) as cam:
            for j in active:
                g = cam(input_tensor=x, targets=[ClassifierOutputTarget(j)] * n)  # (N,H,W)
                maps[:, mi, j] = torch.from_numpy(np.ascontiguousarray(g)).to(x.device)
    return ensemble.attention_from(maps, weights.detach())


# --------------------------------------------------------------------------------------------
# Schedules


def _lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress_ = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def _build_optimizer(cfg: TrainConfig, ensemble: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    backbone, head = _backbone_and_head_params(ensemble)
    groups = [
        {"params": backbone, "lr": o.lr * o.backbone_lr_mult, "base_lr": o.lr * o.backbone_lr_mult},
        {"params": head, "lr": o.lr, "base_lr": o.lr},
    ]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


# --------------------------------------------------------------------------------------------
# Run directory


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a conflicting run directory. Reads only: nothing is deleted before the model is
    built (:func:`_make_run_dir` does that)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file, not a run directory")
    _check_writable(run_dir)
    # A run stopped before its first save (a second Ctrl-C) holds only its config.yaml:
    # nothing to lose, so it starts again without --overwrite.
    exists = run_dir.exists() and {p.name for p in run_dir.iterdir()} - {_RUN_MARKER} != set()
    if resume:
        if not (run_dir / STATE_FILE).is_file():
            raise UserError(f"{run_dir}: nothing to resume (no {STATE_FILE})")
        return
    if exists and not overwrite:
        raise UserError(
            f"{run_dir}: run directory exists; pass --resume to continue it or --overwrite "
            "to replace it"
        )
    if exists and not (run_dir / _RUN_MARKER).is_file():
        raise UserError(
            f"{run_dir}: not a fundus-edge run directory (no {_RUN_MARKER}); refusing to "
            "delete it with --overwrite"
        )


def _check_writable(run_dir: Path) -> None:
    """Prove a file can be created in the run dir, or in the folder it will be made in, now
    rather than after the data and model are loaded. Leaves nothing behind."""
    from fundus_edge.fileio import probe_writable

    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        probe_writable(folder)
    except OSError as exc:
        raise UserError(
            f"--out {run_dir}: cannot write in {folder} ({exc.strerror or type(exc).__name__})"
        ) from exc


def _make_run_dir(run_dir: Path, resume: bool) -> None:
    """Create the run directory, emptying an old run first (after :func:`_check_run_dir`)."""
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _save_state(path: Path, state: dict) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def _write_history(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` and ``metrics.csv``, each replaced atomically."""
    import csv
    import io
    import json

    atomic_write_text(
        run_dir / "metrics.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in history)
    )
    # Columns: every key any record has, in first-seen order (a resumed run may add keys).
    cols = list(dict.fromkeys(k for r in history for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in history:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in cols})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


# --------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def _validate(
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
    """Validation report, predictions and thresholds tuned by ``policy`` (see
    :mod:`fundus_edge.operating`); ``rep["skipped_images"]`` counts unreadable validation
    images left out."""
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


def _selection_key(select: str, rec: dict) -> str:
    """The record's key that ``select`` names; ``auto``: RIADD score, else macro AUROC, else
    the validation loss."""
    if select != "auto":
        return select  # one of config.SELECT_METRICS, all in every record
    for key in ("val_riadd", "val_macro_auroc"):
        if rec.get(key) is not None:
            return key
    return "val_loss"


def _selection(select: str, rec: dict) -> float:
    """Higher is better: the selected metric, negated for a loss; a missing value is worst."""
    key = _selection_key(select, rec)
    v = rec[key]
    if v is None:
        return -math.inf
    return -float(v) if key.endswith("loss") else float(v)


# --------------------------------------------------------------------------------------------
# The run


class _Interrupt:
    """SIGINT sets a flag checked between steps; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.flag = False
        self._old = None

    def __enter__(self) -> _Interrupt:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, plain KeyboardInterrupt
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        log.warning(
            "interrupt: saving a resumable checkpoint after this step (Ctrl-C again to abort)"
        )

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _open_data(cfg: TrainConfig):
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


def _build_model(cfg: TrainConfig, label_names: list[str]):
    from fundus_edge.models import EnhanceConfig, EnsembleConfig, build_ensemble

    e = cfg.enhance
    ecfg = EnsembleConfig(
        members=tuple(cfg.model.members),
        num_classes=len(label_names),
        label_names=tuple(label_names),
        head=cfg.model.head,
        member_head=cfg.model.member_head,
        weights=cfg.model.weights,
        imagenet_dir=cfg.model.imagenet_dir,
        dropout=cfg.model.dropout,
        image_size=cfg.model.image_size,
        mean=tuple(cfg.model.mean),
        std=tuple(cfg.model.std),
        views="original" if e.op == "none" else "both",
        enhance=EnhanceConfig(
            op="weight" if e.op == "none" else e.op,
            lam=e.lam,
            theta=e.theta,
            pad=e.pad,
            attention=e.attention,
        ),
    )
    return build_ensemble(ecfg)


_GRADCAM_METHODS = tuple(m for m in CAM_METHODS if m != "kernel")


def _step_loss(
    forward: nn.Module,
    ensemble: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    mode: str,
    train_weights: str,
    restore_mode,
    autocast=contextlib.nullcontext,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss of one batch: ``mode`` ``plain``, ``kernel`` or a ``grad-cam`` method name.

    With ``masks`` (``(N,C,H,W)`` lesion masks, ``(N,C)`` has-mask) and ``mask_weight > 0``
    the loss adds ``mask_weight`` x :func:`~fundus_edge.losses.mask_attention_loss` on the
    original view's maps. Returns ``(total loss, mask term or None)``.
    """
    from fundus_edge.losses import mask_attention_loss

    targets = y if train_weights == "targets" else None
    attention = None
    kind = mode
    if mode not in ("plain", "kernel"):
        with torch.no_grad():
            probs = torch.sigmoid(ensemble.head_logits(x)).mean(1)  # (N,C)
        w = (
            probs
            if targets is None
            else torch.where(targets.sum(1, keepdim=True) > 0, targets, probs)
        )
        attention = cam_attention_gradcam(ensemble, x, w, mode).detach()  # (N,1,H,W)
        ensemble.zero_grad(set_to_none=True)  # the package's backward passes left gradients
        restore_mode()  # and it switched the model to eval mode
        kind = "given"
    want_cams = masks is not None and mask_weight > 0
    with autocast():
        logits, logits_enh, cams = forward(x, targets, kind, attention, want_cams)
    loss = loss_fn(logits.float(), y)
    if logits_enh is not None:
        loss = 0.5 * (loss + loss_fn(logits_enh.float(), y))
    mask_term = None
    if want_cams:
        mask_term = mask_attention_loss(cams, masks[0], masks[1], y)  # it computes in fp32
        loss = loss + mask_weight * mask_term
    return loss, mask_term


def training_step(
    ensemble: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str = "kernel",
    train_weights: str = "targets",
    grad_clip: float = 0.0,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask_weight: float = 0.0,
) -> float:
    """One training step as :func:`train` takes it: forward, loss, backward, optimiser step.

    Args:
        ensemble: an :class:`~fundus_edge.models.Ensemble` (put in training mode here).
        x: ``(N, 3, S, S)`` normalised images.
        y: ``(N, C)`` 0/1 labels.
        loss_fn: a loss from :func:`fundus_edge.losses.build_loss`.
        optimizer: stepped when given (gradients are zeroed first).
        mode: ``"plain"`` (original view only); ``"kernel"`` (CAM-augmented: maps from the
            forward-only kernels of the same pass, then the enhanced view; needs
            ``views="both"``); or a ``grad-cam`` method (``gradcam``, ``gradcam++``, ...:
            the maps from the package, one backward per member and class present).
        train_weights: ``"targets"`` (maps of the true labels) or ``"probs"``.
        grad_clip: max gradient norm; 0 disables.
        masks: ``(N,C,H,W)`` lesion masks and ``(N,C)`` has-mask flags, for the
            mask-attention term.
        mask_weight: that term's weight (0: off).

    Returns:
        The loss value.

    Raises:
        UserError: an unknown mode, or ``kernel`` on a model built without the second view.
    """
    if mode not in ("plain", "kernel", *_GRADCAM_METHODS):
        raise UserError(
            f"mode {mode!r}: choose plain, kernel or one of {', '.join(_GRADCAM_METHODS)}"
        )
    if mode != "plain" and ensemble.config.views != "both":
        raise UserError(f"mode {mode!r} needs a model built with views='both'")
    ensemble.train()
    loss, _ = _step_loss(
        _TrainForward(ensemble),
        ensemble,
        x,
        y,
        loss_fn,
        mode,
        train_weights,
        ensemble.train,
        masks=masks,
        mask_weight=mask_weight,
    )
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ensemble.parameters(), grad_clip)
    if optimizer is not None:
        optimizer.step()
    return float(loss.detach())


def _sync_batchnorm(ensemble: nn.Module, dist_: _Dist, device: torch.device) -> nn.Module:
    """SyncBatchNorm under DDP on CUDA; on CPU (gloo) torch has no SyncBatchNorm kernel."""
    if not dist_.enabled or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ensemble.modules()
    ):
        return ensemble
    if device.type != "cuda":
        if dist_.main:
            log.info(
                "BatchNorm statistics stay per process: SyncBatchNorm needs CUDA (device %s)",
                device,
            )
        return ensemble
    # In place below the root: module names, and so checkpoint keys, do not change.
    ensemble = nn.SyncBatchNorm.convert_sync_batchnorm(ensemble)
    if dist_.main:
        log.info(
            "BatchNorm layers converted to SyncBatchNorm across %d processes", dist_.world_size
        )
    return ensemble


def _all_true(flag: bool, dist_: _Dist, device: torch.device) -> bool:
    """``flag`` on every rank (a MIN all-reduce) so all ranks take the same branch."""
    if not dist_.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


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
class _TrainData:
    """The run's data: datasets (cached), label names, the screening label, skip counters."""

    train_ds: Any
    val_ds: Any
    label_names: list[str]
    screening: str
    pre: Any
    train_labels: np.ndarray
    skips: _Skips
    train_fingerprint: str = ""  # which images and labels train: a resumed run must match

    @classmethod
    def open(cls, cfg: TrainConfig, dist_: _Dist) -> _TrainData:
        """Index the data, build and fill both datasets; refuse what cannot train.

        Raises:
            UserError: preprocessing size conflicts; ``mask_weight > 0`` without any mask.
            DataError: no training image can be read.
        """
        from fundus_edge.preprocess import PreprocessConfig
        from fundus_edge.torchdata import AugmentConfig, FundusTorchDataset

        ds, train_samples, val_samples = _open_data(cfg)
        label_names = list(ds.label_names)
        pre_d = dict(cfg.data.preprocess)
        if "size" in pre_d and pre_d["size"] != cfg.model.image_size:
            raise UserError(
                f"data.preprocess.size {pre_d['size']} differs from model.image_size "
                f"{cfg.model.image_size}; set only model.image_size"
            )
        pre = PreprocessConfig.from_dict({**pre_d, "size": cfg.model.image_size})
        d = cfg.data
        aug = AugmentConfig(d.hflip, d.vflip, d.rotate, d.brightness, d.contrast)
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
            train_ds,
            val_ds,
            label_names,
            ds.screening_label or "Disease_Risk",
            pre,
            train_ds.labels(),
            skips,
            _fingerprint(train_samples),
        )


def _fingerprint(samples) -> str:
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


@dataclass
class _EpochStats:
    """What one epoch's training pass measured (summed over ranks under DDP)."""

    train_loss: float
    mask_loss: float
    skipped: int
    frozen: bool
    enhance: bool
    t0: float


class _Run:
    """One training run's state and its epoch loop (:func:`train` drives it).

    Holds the model, optimiser, scaler, EMA, schedule and the bookkeeping that the
    resumable state saves: epoch/step counters, history, best metric.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        dist_: _Dist,
        device: torch.device,
        data: _TrainData,
        show_progress: bool | None,
    ) -> None:
        from torch.utils.data import DataLoader

        from fundus_edge.losses import build_loss
        from fundus_edge.torchdata import epoch_indices

        self.cfg, self.run_dir, self.dist, self.device, self.data = (
            cfg,
            run_dir,
            dist_,
            device,
            data,
        )
        self.show_progress = show_progress
        ensemble = _build_model(cfg, data.label_names).to(device)
        if cfg.optim.bn_momentum is not None:
            for m in ensemble.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = cfg.optim.bn_momentum
        self.ensemble = _sync_batchnorm(ensemble, dist_, device)
        self.loss_fn = build_loss(cfg.optim.loss, data.train_labels).to(device)
        self.optimizer = _build_optimizer(cfg, self.ensemble)
        amp = cfg.optim.amp
        if amp == "auto":
            amp = "fp16" if device.type == "cuda" else "none"
        if amp != "none" and device.type != "cuda":
            raise UserError(f"optim.amp={amp}: mixed precision needs CUDA (device is {device})")
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.ema = ModelEMA(self.ensemble, cfg.optim.ema) if cfg.optim.ema > 0 else None

        bs = cfg.data.batch_size
        self.effective_bs = bs * dist_.world_size
        if dist_.main:
            log.info(
                "effective batch size %d (%d per process x %d process%s, device %s)",
                self.effective_bs,
                bs,
                dist_.world_size,
                "" if dist_.world_size == 1 else "es",
                device,
            )
        per_rank = len(
            epoch_indices(
                len(data.train_ds),
                0,
                cfg.seed,
                cfg.data.sampler,
                data.train_labels,
                0,
                dist_.world_size,
            )
        )
        self.drop_last = per_rank >= bs
        steps = per_rank // bs if self.drop_last else math.ceil(per_rank / bs)
        self.steps_per_epoch = max(1, steps)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)

        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.history: list[dict] = []
        self.best_metric: float | None = None
        self.resume_rng: dict | None = None
        self.resumed_epoch_loss: list[float] | None = None
        self.state_path = run_dir / STATE_FILE
        self.step_module = _TrainForward(self.ensemble)
        self.ddp_module: nn.Module = self.step_module
        self.ddp_frozen: bool | None = None
        self.frozen_prev: bool | None = None
        self.val_loader = DataLoader(
            data.val_ds,
            batch_size=cfg.data.eval_batch_size,
            shuffle=False,
            num_workers=cfg.data.num_workers,
        )
        self.best_path: Path | None = None  # a resumed run's: set by load_state
        self.last_path: Path | None = None
        self.stopped_early = False
        self.meta_extra = {
            "preprocess": data.pre.to_dict(),
            "train": {
                "config": cfg.to_dict(),
                "run_dir": str(run_dir),
                "world_size": dist_.world_size,
                "effective_batch_size": self.effective_bs,
            },
        }
        # The running sums of the epoch in progress (saved mid-epoch by Ctrl-C).
        self.loss_sum, self.count, self.mask_sum = 0.0, 0, 0.0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def load_state(self) -> None:
        """Restore everything the state file holds (``--resume``).

        Raises:
            UserError: a damaged state file, or data other than the run's (labels, images).
        """
        path = self.state_path
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or not a state file: say so, do not crash
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"{path}: cannot read the run's state ({why}); the run cannot resume from it; "
                "start a new run, e.g. with --weights on its last.safetensors"
            ) from exc
        labels = st.get("label_names")
        if labels is not None and list(labels) != list(self.data.label_names):
            raise UserError(
                f"{path}: the run trained on labels {', '.join(labels)}; --data "
                f"{self.cfg.data.root} has {', '.join(self.data.label_names)}; resume on the "
                "run's data, or start a new run with --weights on its last.safetensors"
            )
        fp = st.get("train_fingerprint")
        if fp and fp != self.data.train_fingerprint:
            raise UserError(
                f"{path}: the training split of --data {self.cfg.data.root} differs from the "
                "run's (other images or labels); resume on the run's data, or start a new run "
                "with --weights on its last.safetensors"
            )
        try:
            self.ensemble.load_state_dict(st["model"])
        except RuntimeError as exc:  # a state from another model (older runs carry no labels)
            raise UserError(
                f"{path}: the saved model does not fit this run's model and data "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        best = self.run_dir / "best.safetensors"
        self.best_path = best if best.exists() else None
        self.optimizer.load_state_dict(st["optimizer"])
        o = self.cfg.optim
        backbone, head = self.optimizer.param_groups
        if head["base_lr"] != o.lr:  # --lr given on --resume: the schedule goes on, rescaled
            log.info("learning rate %.3g -> %.3g from here on", head["base_lr"], o.lr)
            backbone["base_lr"], head["base_lr"] = o.lr * o.backbone_lr_mult, o.lr
        self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.start_epoch, self.start_step = st["epoch"], st["step"]
        self.global_step = st["global_step"]
        self.history = [dict(r) for r in st["history"]]
        self.best_metric = st.get("best_metric")
        self.resume_rng = st["rng"]
        self.resumed_epoch_loss = [float(v) for v in st["epoch_loss"]]
        log.info(
            "resuming %s at epoch %d%s",
            self.run_dir,
            self.start_epoch + 1,
            f" step {self.start_step}" if self.start_step else "",
        )

    def state_dict(self, epoch: int, step: int) -> dict:
        return {
            "epoch": epoch,
            "step": step,
            "global_step": self.global_step,
            "model": self.ensemble.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": _rng_state(),
            "history": self.history,
            "best_metric": self.best_metric,
            "label_names": list(self.data.label_names),
            "train_fingerprint": self.data.train_fingerprint,
            "epoch_loss": (
                [self.loss_sum, float(self.count), self.mask_sum] if step else [0.0, 0.0, 0.0]
            ),
            "scheduler": {
                "global_step": self.global_step,
                "total": self.total_steps,
                "warmup": self.warmup_steps,
            },
        }

    def non_finite(self, what: str, value: float, epoch: int, step: int) -> NonFiniteLossError:
        kept = self.best_path if self.best_path is not None else "no checkpoint yet"
        return NonFiniteLossError(
            f"training stopped: {what} is {value} at epoch {epoch + 1} step {step + 1} "
            f"(lr {self.optimizer.param_groups[-1]['lr']:.2e}), not applied; best checkpoint "
            f"kept: {kept}; lower optim.lr (now {self.cfg.optim.lr:g}) or check the data"
        )

    def _set_phase(self, frozen: bool) -> None:
        """Freeze/unfreeze the backbones; (re)wrap in DDP when that changes what trains."""
        if frozen != self.frozen_prev:
            _set_frozen(self.ensemble, frozen)
            self.frozen_prev = frozen
        if self.dist.enabled and self.ddp_frozen != frozen:
            # DDP registers the parameters that need gradients when it is built.
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_module = DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
            self.ddp_frozen = frozen
        _train_mode(self.ensemble, frozen)

    def _loader(self, epoch: int, first: int):
        from torch.utils.data import DataLoader

        from fundus_edge.torchdata import epoch_indices

        cfg, ds, bs = self.cfg, self.data.train_ds, self.cfg.data.batch_size
        order = epoch_indices(
            len(ds),
            epoch,
            cfg.seed,
            cfg.data.sampler,
            self.data.train_labels,
            self.dist.rank,
            self.dist.world_size,
        )
        if self.drop_last:
            order = order[: (len(order) // bs) * bs]
        ds.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(cfg.seed, epoch) + self.dist.rank)
        return DataLoader(
            ds,
            batch_size=bs,
            sampler=order[first * bs :],
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=self.drop_last,
        )

    def train_epoch(self, epoch: int, interrupt: _Interrupt) -> _EpochStats:
        """One pass over the training split (from the saved step when resuming mid-epoch).

        Raises:
            KeyboardInterrupt: Ctrl-C on any rank, after the state is saved.
            NonFiniteLossError: a NaN/inf loss or gradient norm.
        """
        from fundus_edge.torchdata import split_unreadable

        cfg, dist_ = self.cfg, self.dist
        t0 = time.time()
        frozen = epoch < cfg.optim.freeze_epochs
        self._set_phase(frozen)
        enhance_on = cfg.enhance.op != "none" and epoch >= cfg.enhance.warmup_epochs
        mode = cfg.enhance.cam_method if enhance_on else "plain"
        first = self.start_step if epoch == self.start_epoch else 0
        loader = self._loader(epoch, first)
        self.loss_sum, self.count, self.mask_sum = 0.0, 0, 0.0
        self.data.skips.epoch = 0
        if first and self.resumed_epoch_loss is not None:
            saved = self.resumed_epoch_loss
            self.loss_sum, self.count = saved[0], int(saved[1])
            self.mask_sum = saved[2] if len(saved) > 2 else 0.0
        batches = iter(loader)  # draws a base seed from the torch RNG: before any restore
        if first and self.resume_rng is not None:
            _set_rng_state(self.resume_rng)  # mid-epoch: continue the interrupted draws
        step = first
        for x_all, y_all, idx, *masks_all in progress(
            batches,
            total=len(loader),
            description=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=None if self.show_progress is None else not self.show_progress,
        ):
            x, y, *masks, dropped = split_unreadable(x_all, y_all, idx, *masks_all)
            self.data.skips.add(dropped)
            weight = 1.0
            if not len(y) and dist_.enabled:
                # Every rank must join the gradient all-reduce: a zero-weighted step.
                x, y, masks, weight = x_all, y_all, masks_all, 0.0
            factor = _lr_factor(
                self.global_step,
                self.total_steps,
                self.warmup_steps,
                cfg.optim.schedule,
                cfg.optim.min_lr_ratio,
            )
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            if len(y):
                self._step(x, y, masks, weight, mode, frozen, epoch, step)
            self.global_step += 1
            step += 1
            self._stop_if_interrupted(interrupt, epoch, step)
        return self._epoch_stats(frozen, enhance_on, t0)

    def _step(self, x, y, masks, weight: float, mode: str, frozen: bool, epoch: int, step: int):
        """Forward, loss, backward, clip, optimiser and EMA update for one batch."""
        cfg, device, scaler = self.cfg, self.device, self.scaler
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        mask_batch = (masks[0].to(device), masks[1].to(device)) if masks else None
        loss, mask_term = _step_loss(
            self.ddp_module,
            self.ensemble,
            x,
            y,
            self.loss_fn,
            mode,
            cfg.enhance.train_weights,
            functools.partial(_train_mode, self.ensemble, frozen),
            self.autocast,
            mask_batch,
            cfg.optim.loss.mask_weight,
        )
        if weight != 1.0:
            loss = loss * weight
        if not _all_true(bool(torch.isfinite(loss)), self.dist, device):
            raise self.non_finite("the loss", float(loss.detach()), epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.ensemble.parameters(), cfg.optim.grad_clip)
            # With fp16 the scaler skips inf steps itself; in fp32 an inf is fatal.
            if not scaler.is_enabled() and not torch.isfinite(norm):
                raise self.non_finite("the gradient norm", float(norm), epoch, step)
        scaler.step(self.optimizer)
        scaler.update()
        if self.ema is not None:
            self.ema.update(self.ensemble)
        self.loss_sum += float(loss.detach()) * len(y) * weight
        self.count += int(len(y) * weight)
        if mask_term is not None:
            self.mask_sum += float(mask_term.detach()) * len(y) * weight

    def _stop_if_interrupted(self, interrupt: _Interrupt, epoch: int, step: int) -> None:
        stop = interrupt.flag
        if self.dist.enabled:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            torch.distributed.all_reduce(flag)
            stop = bool(flag.item() > 0)
        if not stop:
            return
        if self.dist.main:
            _save_state(self.state_path, self.state_dict(epoch, step))
            log.warning(
                "interrupted at epoch %d step %d: state saved to %s; continue with --resume",
                epoch + 1,
                step,
                self.state_path,
            )
        raise KeyboardInterrupt

    def _epoch_stats(self, frozen: bool, enhance: bool, t0: float) -> _EpochStats:
        skipped = self.data.skips.epoch
        sums = [self.loss_sum, float(self.count), float(skipped), self.mask_sum]
        if self.dist.enabled:
            t = torch.tensor(sums, device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            sums = t.tolist()
        n = max(sums[1], 1)
        return _EpochStats(sums[0] / n, sums[3] / n, int(sums[2]), frozen, enhance, t0)

    def end_epoch(self, epoch: int, stats: _EpochStats) -> None:
        """Rank 0: validate, record, save state, checkpoints and the metrics log (in that order)."""
        from fundus_edge.models import save_checkpoint

        cfg, run_dir = self.cfg, self.run_dir
        if self.dist.main:
            eval_model = self.ema.module if self.ema is not None else self.ensemble
            rep, _, thr = _validate(
                eval_model,
                self.val_loader,
                self.loss_fn,
                self.device,
                self.autocast,
                self.data.label_names,
                self.data.screening,
                f"epoch {epoch + 1}",
                cfg.threshold_policy,
            )
            masked = cfg.optim.loss.mask_weight > 0
            rec = {
                "epoch": epoch + 1,
                "train_loss": stats.train_loss,
                **({"train_mask_loss": stats.mask_loss} if masked else {}),
                **_summary(rep),
                "lr": self.optimizer.param_groups[-1]["lr"],
                "enhance": stats.enhance,
                "frozen": stats.frozen,
                "time_s": round(time.time() - stats.t0, 2),
                "skipped_images": stats.skipped,
                "val_skipped_images": rep["skipped_images"],
                "world_size": self.dist.world_size,
                "effective_batch_size": self.effective_bs,
            }
            score = _selection(cfg.select, rec)
            is_best = self.best_metric is None or score > self.best_metric
            if is_best:
                self.best_metric = score
            rec["best"] = is_best
            self.history.append(rec)
            # Order: state (authoritative for --resume), then checkpoints, then the log.
            _save_state(self.state_path, self.state_dict(epoch + 1, 0))
            ck = {
                "thresholds": thr.tolist(),
                "metrics": {"val": rec, "val_per_label": rep["per_label"]},
                "epoch": epoch + 1,
                "extra": {**self.meta_extra, "threshold_policy": cfg.threshold_policy},
            }
            self.last_path = save_checkpoint(run_dir / "last.safetensors", eval_model, **ck)
            if is_best:
                self.best_path = save_checkpoint(run_dir / "best.safetensors", eval_model, **ck)
            _write_history(run_dir, self.history)
            log.info(_epoch_line(rec, cfg.epochs))
        if self.dist.enabled:
            torch.distributed.barrier()

    def finish(self, t_start: float) -> RunResult:
        """Training curves (rank 0), the last barrier, and what happened."""
        if self.dist.main and self.history:
            from fundus_edge.plots import plot_training_curves

            plot_training_curves(self.history, self.run_dir / "training_curves.png")
        if self.dist.enabled:
            torch.distributed.barrier()
        last = self.run_dir / "last.safetensors"
        best = next((r for r in reversed(self.history) if r.get("best")), None)
        best_name = _selection_key(self.cfg.select, best) if best is not None else None
        return RunResult(
            run_dir=self.run_dir,
            epochs_done=len(self.history),
            best_path=self.best_path,
            last_path=self.last_path or (last if last.exists() else None),
            best_metric=None if best is None else best[best_name],
            best_name=best_name,
            history=self.history,
            stopped_early=self.stopped_early,
            train_time_s=round(time.time() - t_start, 2),
            effective_batch_size=self.effective_bs,
            skipped_images=self.data.skips.total,
            val_skipped_images=self.history[-1]["val_skipped_images"] if self.history else 0,
            rank=self.dist.rank,
        )


#: What ``--resume`` may change: a run continues as it was configured, except these.
RESUME_MAY_CHANGE = ("epochs", "stop_after", "device", "data.num_workers", "data.root", "optim.lr")
# Names of a run, not of its training: a recipe or --name may say anything here.
_RESUME_IGNORED = ("out", "name")


def train(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool | None = None,
    given: Iterable[str] = (),
    on_start: Callable[[], None] | None = None,
) -> RunResult:
    """Train an ensemble as ``cfg`` says; write the run directory; return what happened.

    Args:
        cfg: the resolved configuration (``cfg.out`` or ``runs/<cfg.name>`` is the run dir).
        resume: continue the run in the run dir from its state file: the saved config wins,
            except the keys of :data:`RESUME_MAY_CHANGE` (``optim.lr`` rescales the schedule
            from the next step on; ``data.root`` must hold the same training split).
        overwrite: replace an existing run dir.
        show_progress: progress bar on/off (default: on a terminal).
        given: the dotted keys the user set (recipe, options, ``--set``); on ``resume`` one
            that differs from the run's and may not change is refused instead of ignored.
        on_start: called (rank 0) once data, model and state are ready and the run directory
            is made: the point from which the run replaces what was there (an ablation
            clears its old table and other variants here).

    Raises:
        UserError: bad options, run dir conflicts, missing data, CUDA requested but absent.
        NonFiniteLossError: the loss or gradient became NaN/inf (nothing of it was applied).
        KeyboardInterrupt: after Ctrl-C, once the resumable state is saved.
    """
    from fundus_edge.config import load_config

    t_start = time.time()
    run_dir = Path(cfg.out or Path("runs") / cfg.name)
    dist_, device = _init_distributed(cfg.device)
    if dist_.main:  # other ranks could see the directory rank 0 is about to make
        _check_run_dir(run_dir, resume, overwrite)
    if resume:
        cfg = _resumed_config(cfg, load_config(run_dir / _RUN_MARKER), given, run_dir)
    cfg.out = str(run_dir)
    cfg.validate()
    if dist_.main and cfg.optim.freeze_epochs >= cfg.epochs:
        log.warning(
            "optim.freeze_epochs=%d >= epochs=%d: the backbone stays frozen the whole run "
            "(only the heads train)",
            cfg.optim.freeze_epochs,
            cfg.epochs,
        )
    _seed_everything(cfg.seed, cfg.deterministic)

    # Data, model (weights included) and a resumed state first: a start that fails leaves
    # the run directory as it was (nothing deleted, config.yaml untouched).
    data = _TrainData.open(cfg, dist_)
    run = _Run(cfg, run_dir, dist_, device, data, show_progress)
    if resume:
        run.load_state()
    if dist_.main:
        _make_run_dir(run_dir, resume)
        save_config(cfg, run_dir / _RUN_MARKER)
        if on_start is not None:
            on_start()
    if dist_.enabled:
        torch.distributed.barrier()
    with _Interrupt() as interrupt:
        for epoch in range(run.start_epoch, cfg.epochs):
            if cfg.stop_after is not None and epoch >= cfg.stop_after:
                run.stopped_early = True
                break
            run.end_epoch(epoch, run.train_epoch(epoch, interrupt))
    return run.finish(t_start)


def _resumed_config(
    cfg: TrainConfig, saved: TrainConfig, given: Iterable[str], run_dir: Path
) -> TrainConfig:
    """The run's own config with what ``--resume`` may change taken from ``cfg``.

    Raises:
        UserError: a key the user set differs from the run's and may not change.
    """
    from fundus_edge.config import config_changes

    fixed = config_changes(saved, cfg, given, keep=(*RESUME_MAY_CHANGE, *_RESUME_IGNORED))
    if fixed:
        diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in fixed[:4])
        raise UserError(
            f"--resume continues {run_dir} as it was configured, but {diff} (may change: "
            f"{', '.join(RESUME_MAY_CHANGE)}); drop those options, or start a new run with "
            f"--weights {run_dir / 'last.safetensors'}"
        )
    saved.epochs, saved.stop_after = cfg.epochs, cfg.stop_after
    saved.device, saved.data.num_workers = cfg.device, cfg.data.num_workers
    if cfg.data.root:
        saved.data.root = cfg.data.root
    if "optim.lr" in set(given):
        saved.optim.lr = cfg.optim.lr
    return saved


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _epoch_line(rec: dict, epochs: int) -> str:
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
