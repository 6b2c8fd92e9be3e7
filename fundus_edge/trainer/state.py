"""The run directory and what ``--resume`` restores: checks, state file, history, RNG, Ctrl-C.

A run directory ``runs/<name>/`` holds::

    config.yaml          the resolved TrainConfig
    metrics.jsonl        one JSON record per finished epoch
    metrics.csv          the same records as a table (rewritten atomically every epoch)
    last.safetensors     model after the last finished epoch (EMA weights when EMA is on)
    best.safetensors     model of the best validation epoch, thresholds tuned on validation
    last.state.pt        optimiser, scheduler, scaler, EMA, RNG states, epoch, step: --resume
    training_curves.png  losses and validation metrics per epoch
"""

from __future__ import annotations

import random
import shutil
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fundus_edge.config import TrainConfig
from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_open, atomic_write_text
from fundus_edge.log import get_logger

__all__ = [
    "RESUME_MAY_CHANGE",
    "RUN_MARKER",
    "STATE_FILE",
    "Callback",
    "EpochSums",
    "Interrupt",
    "RunResult",
    "RunState",
    "check_run_dir",
    "make_run_dir",
    "resumed_config",
    "save_state",
    "seed_everything",
    "write_history",
]

log = get_logger("train")

STATE_FILE = "last.state.pt"
RUN_MARKER = "config.yaml"

#: What ``--resume`` may change: a run continues as it was configured, except these.
RESUME_MAY_CHANGE = (
    "epochs",
    "stop_after",
    "device",
    "data.num_workers",
    "data.root",
    "optim.lr",
)
# Names of a run, not of its training: a recipe or --name may say anything here.
_RESUME_IGNORED = ("out", "name")


@dataclass
class RunResult:
    """What :func:`~fundus_edge.trainer.train` did.

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


class Callback(Protocol):
    """Told (on rank 0) about each finished epoch and the end; either method may be absent.

    ``epoch`` counts from 1 (as the record's ``epoch``); ``model`` is what the checkpoints
    hold (the EMA copy when EMA is on).
    """

    def on_epoch_end(self, epoch: int, record: dict, model: nn.Module) -> None: ...
    def on_train_end(self, result: RunResult) -> None: ...


def notify(callbacks: Iterable[Any], event: str, *args: Any) -> None:
    """Call ``event`` on every callback that has it."""
    for cb in callbacks:
        if hasattr(cb, event):
            getattr(cb, event)(*args)


# --------------------------------------------------------------------------------------------
# The run directory


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a conflicting run directory. Reads only: nothing is deleted before the model is
    built (:func:`make_run_dir` does that).

    Raises:
        UserError: ``resume`` with ``overwrite``, a file, an unwritable place, nothing to
            resume, an existing run without ``overwrite``, a foreign folder with it.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file, not a run directory")
    _check_writable(run_dir)
    # A run stopped before its first save (a second Ctrl-C) holds only its config.yaml:
    # nothing to lose, so it starts again without --overwrite.
    exists = run_dir.exists() and {p.name for p in run_dir.iterdir()} - {RUN_MARKER} != set()
    if resume:
        if not (run_dir / STATE_FILE).is_file():
            raise UserError(f"{run_dir}: nothing to resume (no {STATE_FILE})")
        return
    if exists and not overwrite:
        raise UserError(
            f"{run_dir}: run directory exists; pass --resume to continue it or --overwrite "
            "to replace it"
        )
    if exists and not (run_dir / RUN_MARKER).is_file():
        raise UserError(
            f"{run_dir}: not a fundus-edge run directory (no {RUN_MARKER}); refusing to "
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


def make_run_dir(run_dir: Path, resume: bool) -> None:
    """Create the run directory, emptying an old run first (after :func:`check_run_dir`)."""
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def save_state(path: Path, state: dict) -> None:
    """``torch.save`` the state atomically (a full disk leaves the old file)."""
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def write_history(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` and ``metrics.csv``, each replaced atomically."""
    import csv
    import io
    import json

    atomic_write_text(
        run_dir / "metrics.jsonl",
        "".join(json.dumps(r, allow_nan=False) + "\n" for r in history),
    )
    # Columns: every key any record has, in first-seen order (a resumed run may add keys).
    cols = list(dict.fromkeys(k for r in history for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in history:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in cols})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def resumed_config(
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


# --------------------------------------------------------------------------------------------
# Determinism


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and torch; deterministic cuDNN when asked."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def rng_state() -> dict:
    """Every RNG's state, as tensors and plain values (``torch.load(weights_only=True)``)."""
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


def set_rng_state(s: dict) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["gauss"],
        )
    )
    random.setstate((s["python"][1], tuple(s["python"][0]), None))


class Interrupt:
    """SIGINT sets a flag checked between steps; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.flag = False
        self._old = None

    def __enter__(self) -> Interrupt:
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


# --------------------------------------------------------------------------------------------
# The resumable state


@dataclass
class EpochSums:
    """Running sums of the epoch in progress (saved mid-epoch by Ctrl-C)."""

    loss: float = 0.0
    count: int = 0
    terms: dict[str, float] = field(default_factory=dict)

    def add(self, values: dict[str, float], n: int, weight: float) -> None:
        """One step's ``loss`` and terms, over ``n`` images of weight ``weight``."""
        self.loss += values["loss"] * n * weight
        self.count += int(n * weight)
        for k, v in values.items():
            if k != "loss":
                self.terms[k] = self.terms.get(k, 0.0) + v * n * weight

    def to_state(self) -> dict:
        """For the state file (``epoch_loss`` keeps the layout older runs saved)."""
        mask = self.terms.get("mask_loss", 0.0)
        return {
            "epoch_loss": [self.loss, float(self.count), mask],
            "epoch_terms": dict(self.terms),
        }

    @classmethod
    def from_state(cls, st: dict) -> EpochSums:
        """Inverse of :meth:`to_state` (older runs: loss, count and the mask term only)."""
        saved = [float(v) for v in st["epoch_loss"]]
        terms = {k: float(v) for k, v in (st.get("epoch_terms") or {}).items()}
        if "epoch_terms" not in st and len(saved) > 2:
            terms["mask_loss"] = saved[2]
        return cls(saved[0], int(saved[1]), terms)


@dataclass
class RunState:
    """Where the run stands: counters, history, best metric, what a resume restores.

    ``epoch``/``step``: where training (re)starts; ``global_step`` drives the schedule.
    """

    run_dir: Path
    label_names: list[str]
    train_fingerprint: str
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    best_path: Path | None = None
    last_path: Path | None = None
    resume_rng: dict | None = None
    resumed_sums: EpochSums | None = None
    sums: EpochSums = field(default_factory=EpochSums)

    @property
    def path(self) -> Path:
        """The state file."""
        return self.run_dir / STATE_FILE

    def to_dict(self, epoch: int, step: int, model: nn.Module, opt, schedule) -> dict:
        """The state file's content at ``(epoch, step)`` (``step`` 0: the epoch finished)."""
        return {
            "epoch": epoch,
            "step": step,
            "global_step": self.global_step,
            "model": model.state_dict(),
            **opt.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "best_metric": self.best_metric,
            "label_names": list(self.label_names),
            "train_fingerprint": self.train_fingerprint,
            **(self.sums if step else EpochSums()).to_state(),
            "scheduler": {
                "global_step": self.global_step,
                "total": schedule.total,
                "warmup": schedule.warmup,
            },
        }

    def save(self, epoch: int, step: int, model: nn.Module, opt, schedule) -> None:
        """Write the state file (atomically)."""
        save_state(self.path, self.to_dict(epoch, step, model, opt, schedule))

    def load(self, model: nn.Module, opt, cfg: TrainConfig) -> None:
        """Restore everything the state file holds into ``model``, ``opt`` and here.

        Raises:
            UserError: a damaged state file, or data other than the run's (labels, images).
        """
        path = self.path
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or not a state file: say so, do not crash
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"{path}: cannot read the run's state ({why}); the run cannot resume from it; "
                "start a new run, e.g. with --weights on its last.safetensors"
            ) from exc
        labels = st.get("label_names")
        if labels is not None and list(labels) != list(self.label_names):
            raise UserError(
                f"{path}: the run trained on labels {', '.join(labels)}; --data "
                f"{cfg.data.root} has {', '.join(self.label_names)}; resume on the "
                "run's data, or start a new run with --weights on its last.safetensors"
            )
        fp = st.get("train_fingerprint")
        if fp and fp != self.train_fingerprint:
            raise UserError(
                f"{path}: the training split of --data {cfg.data.root} differs from the "
                "run's (other images or labels); resume on the run's data, or start a new run "
                "with --weights on its last.safetensors"
            )
        try:
            model.load_state_dict(st["model"])
        except RuntimeError as exc:  # a state from another model (older runs carry no labels)
            raise UserError(
                f"{path}: the saved model does not fit this run's model and data "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        best = self.run_dir / "best.safetensors"
        self.best_path = best if best.exists() else None
        old_lr = opt.load_state_dict(st, cfg.optim)
        if old_lr is not None:
            log.info("learning rate %.3g -> %.3g from here on", old_lr, cfg.optim.lr)
        self.epoch, self.step = st["epoch"], st["step"]
        self.global_step = st["global_step"]
        self.history = [dict(r) for r in st["history"]]
        self.best_metric = st.get("best_metric")
        self.resume_rng = st["rng"]
        self.resumed_sums = EpochSums.from_state(st)
        log.info(
            "resuming %s at epoch %d%s",
            self.run_dir,
            self.epoch + 1,
            f" step {self.step}" if self.step else "",
        )

    def end_epoch(
        self,
        rec: dict,
        score: float,
        opt,
        schedule,
        thr: list[float],
        per_label: dict,
        extra: dict,
    ) -> None:
        """Record a validated epoch; save the state, the checkpoints and the log, in that order
        (the state is what ``--resume`` trusts).

        Args:
            rec: the epoch's record (``best`` is set here).
            score: its selection score (higher is better).
            opt: the :class:`~fundus_edge.trainer.optim.Optimisation` (the checkpoints hold
                its ``eval_model``).
            schedule: the learning-rate schedule.
            thr: the thresholds tuned on validation.
            per_label: the validation report's per-label metrics.
            extra: more checkpoint metadata (preprocessing, the training config).
        """
        from fundus_edge.models import save_checkpoint

        rec["best"] = is_best = self.best_metric is None or score > self.best_metric
        if is_best:
            self.best_metric = score
        self.history.append(rec)
        self.save(rec["epoch"], 0, opt.ensemble, opt, schedule)
        metrics = {"val": rec, "val_per_label": per_label}
        ck = {
            "thresholds": thr,
            "metrics": metrics,
            "epoch": rec["epoch"],
            "extra": extra,
        }
        self.last_path = save_checkpoint(self.run_dir / "last.safetensors", opt.eval_model, **ck)
        if is_best:
            self.best_path = save_checkpoint(
                self.run_dir / "best.safetensors", opt.eval_model, **ck
            )
        write_history(self.run_dir, self.history)

    def non_finite(
        self, what: str, value: float, epoch: int, step: int, lr: float, cfg_lr: float
    ) -> Exception:
        """The error that stops training at ``(epoch, step)`` (0-based) before an update."""
        from fundus_edge.trainer.step import NonFiniteLossError

        kept = self.best_path if self.best_path is not None else "no checkpoint yet"
        return NonFiniteLossError(
            f"training stopped: {what} is {value} at epoch {epoch + 1} step {step + 1} "
            f"(lr {lr:.2e}), not applied; best checkpoint kept: {kept}; lower "
            f"optim.lr (now {cfg_lr:g}) or check the data"
        )

    def begin_epoch(self, epoch: int) -> int:
        """The first step of ``epoch`` (mid-epoch after an interrupted run) with its sums."""
        first = self.step if epoch == self.epoch else 0
        self.sums = EpochSums()
        if first and self.resumed_sums is not None:
            self.sums = self.resumed_sums
        return first

    def result(
        self,
        rank: int,
        select: str,
        t_start: float,
        effective_bs: int,
        skipped: int,
        stopped: bool,
    ) -> RunResult:
        """What happened (see :class:`RunResult`)."""
        import time

        from fundus_edge.trainer.validate import selection_key

        last = self.run_dir / "last.safetensors"
        best = next((r for r in reversed(self.history) if r.get("best")), None)
        best_name = selection_key(select, best) if best is not None else None
        return RunResult(
            run_dir=self.run_dir,
            epochs_done=len(self.history),
            best_path=self.best_path,
            last_path=self.last_path or (last if last.exists() else None),
            best_metric=None if best is None else best[best_name],
            best_name=best_name,
            history=self.history,
            stopped_early=stopped,
            train_time_s=round(time.time() - t_start, 2),
            effective_batch_size=effective_bs,
            skipped_images=skipped,
            val_skipped_images=self.history[-1]["val_skipped_images"] if self.history else 0,
            rank=rank,
        )
