"""The training run's side of tracking: a callback the trainer calls at its hooks.

    on_start()                          open the tracker (record it in the run dir); log the
                                        config, git commit, data fingerprint; pick the images
    on_epoch_end(epoch, record, model)  the epoch's metrics and the fixed images' maps
    on_train_end(result)                the checkpoint, metrics table and curves; close

Use it as a context manager around the training call: a run that fails or is interrupted still
closes its tracker (MLflow marks the run failed), and ``--resume`` continues the same run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fundus_edge.log import get_logger
from fundus_edge.tracking import NullTracker, Tracker, numeric_metrics, open_tracker

__all__ = ["TrackingCallback"]

log = get_logger("train")


class TrackingCallback:
    """Logs one training run to a tracker.

    Args:
        kind: ``none``, ``tensorboard`` or ``mlflow``.
        cfg: the command's :class:`~fundus_edge.config.TrainConfig` (``cfg.out`` or
            ``runs/<cfg.name>`` the run directory); :meth:`on_start` replaces it by the run's
            saved ``config.yaml``, the resolved one (after ``--resume``: the run's own).
        logger_dir: TensorBoard log root or MLflow store (default: inside the run directory).
        resume: continue the run's tracker run (``train --resume``).
        images: how many validation images' maps to log each epoch (0: none).
    """

    def __init__(
        self,
        kind: str,
        cfg: Any,
        logger_dir: str | Path | None = None,
        resume: bool = False,
        images: int = 4,
    ) -> None:
        self.kind, self.cfg, self.logger_dir = kind, cfg, logger_dir
        self.resume, self.images = resume, images
        self.tracker: Tracker = NullTracker()
        self.snapshots: Any = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out or Path("runs") / self.cfg.name)

    # -- the trainer's hooks -----------------------------------------------------------------

    def on_start(self) -> None:
        """Open the tracker and log what the run is: config, commit, data (the trainer's
        ``on_start``: rank 0, the run directory made and its config saved)."""
        if self.kind == "none":
            return
        from fundus_edge.config import load_config
        from fundus_edge.tracking.provenance import git_commit

        saved = self.run_dir / "config.yaml"
        if saved.is_file():  # the resolved config (after --resume: the run's own)
            self.cfg = load_config(saved)

        self.tracker = open_tracker(
            self.kind, self.run_dir, self.cfg.name, self.logger_dir, resume=self.resume
        )
        self.tracker.log_config(self.cfg.to_dict())
        samples, label_names, screening, fingerprint = _split_of(self.cfg)
        git = git_commit()
        params: dict[str, Any] = {
            "data.fingerprint": fingerprint,
            "data.val_images": len(samples),
            "labels": ",".join(label_names),
            "git.commit": git["commit"] if git else "none",
        }
        if git:
            params["git.dirty"] = git["dirty"]
        self.tracker.log_params(params)
        if self.images > 0:
            self.snapshots = _snapshots(self.cfg, samples, label_names, screening, self.images)
        log.info("tracking: %s (%s)", self.kind, _where(self.tracker))

    def on_epoch_end(self, epoch: int, record: dict, model: Any) -> None:
        """The epoch's metrics record (finite numbers) and the fixed images' maps."""
        step = int(record.get("epoch", epoch + 1))
        self.tracker.log_metrics(step, numeric_metrics(record))
        if self.snapshots is not None and len(self.snapshots) and model is not None:
            self.tracker.log_images(step, self.snapshots.render(model))

    def on_train_end(self, result: Any) -> None:
        """The checkpoint (best, else last), metrics table and curves; then close."""
        ck = result.best_path or result.last_path
        files: Sequence[Path | None] = (
            ck,
            self.run_dir / "metrics.csv",
            self.run_dir / "training_curves.png",
        )
        for f in files:
            if f is not None and Path(f).is_file():
                self.tracker.log_artifact(f)
        self.close()

    # -- lifetime ----------------------------------------------------------------------------

    def close(self, ok: bool = True) -> None:
        """Finish the tracker's run (``ok`` False: it failed or was interrupted)."""
        tracker, self.tracker = self.tracker, NullTracker()
        tracker.close(ok)

    def __enter__(self) -> TrackingCallback:
        return self

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        self.close(ok=exc_type is None)


def _split_of(cfg: Any) -> tuple[list, list[str], str, str]:
    """Validation samples, label names, screening label and the training split's fingerprint
    (the trainer's own, as ``--resume`` checks it)."""
    from fundus_edge.trainer.batches import fingerprint, open_data

    ds, train, val = open_data(cfg)
    return list(val), list(ds.label_names), ds.screening_label or "", fingerprint(train)


def _snapshots(cfg: Any, samples: list, label_names: list[str], screening: str, count: int):
    from fundus_edge.tracking.snapshots import MapSnapshots

    pre = cfg.data.preprocess
    skip = [screening] if screening else []
    return MapSnapshots.pick(
        samples, label_names, pre, cfg.model.mean, cfg.model.std, count=count, skip=skip
    )


def _where(tracker: Tracker) -> str:
    rec = tracker.record()
    return ", ".join(f"{k} {v}" for k, v in rec.items() if k != "kind")
