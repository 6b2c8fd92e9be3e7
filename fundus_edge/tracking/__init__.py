"""Experiment tracking: a training run's config, provenance, metrics, maps and artifacts logged
to TensorBoard event files or a local MLflow store (SQLite; no server).

One small interface (:class:`Tracker`), three implementations chosen by name::

    none         NullTracker          nothing is logged (the default)
    tensorboard  TensorBoardTracker   event files under LOGGER_DIR/<run name>/ (tracking/tensorboard.py)
    mlflow       MlflowTracker        LOGGER_DIR/mlflow.db (SQLite) + artifacts/ (tracking/mlflow_store.py)

What a training run logs (:class:`~fundus_edge.tracking.callback.TrackingCallback`): the
resolved config, the git commit of the working directory, the training split's fingerprint,
every epoch's metrics record, the class maps of a fixed set of validation images each epoch,
and at the end the checkpoint, the metrics table and the training curves. The run directory
gets ``tracking.json`` (:data:`RECORD_FILE`) naming the tracker and its run, so
``fundus-edge export --logger`` and ``train --resume`` log into the same run.

The packages are optional (extras ``tensorboard`` and ``mlflow``); :func:`require_tracker`
checks for one before any training work, so a missing package is one line and exit 3.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError, require
from fundus_edge.layered import flatten, plain  # re-exported: the trackers' config helpers

__all__ = [
    "RECORD_FILE",
    "TRACKERS",
    "NullTracker",
    "Tracker",
    "checkpoint_run",
    "default_logger_dir",
    "flatten",
    "log_files",
    "numeric_metrics",
    "open_tracker",
    "plain",
    "read_record",
    "reopen_tracker",
    "require_tracker",
    "write_record",
]

#: The ``--logger`` choices.
TRACKERS = ("none", "tensorboard", "mlflow")

#: Written in the run directory when a tracker is open: which tracker, where, which run.
RECORD_FILE = "tracking.json"

# kind -> (module that must import, extra that brings it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


class Tracker:
    """Where a run's records go. Every method is a no-op here; subclasses log for real.

    Attributes:
        kind: the ``--logger`` name.
    """

    kind = "none"

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved training config (nested mapping), once per run (again on resume)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat ``name -> value`` facts about the run (git commit, data fingerprint, ...)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalar metrics at ``step`` (the epoch number, 1-based)."""

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Named ``(H, W, 3)`` uint8 RGB images at ``step``; the same names every step."""

    def log_artifact(self, path: str | Path) -> None:
        """A file kept with the run (checkpoint, report)."""

    def record(self) -> dict:
        """What :data:`RECORD_FILE` holds to reopen this run later (:func:`reopen_tracker`)."""
        return {"kind": self.kind}

    def close(self, ok: bool = True) -> None:
        """Flush and finish; the tracker logs nothing afterwards.

        Args:
            ok: False when the run failed or was interrupted (MLflow records it so).
        """

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        self.close(ok=exc_type is None)


class NullTracker(Tracker):
    """``--logger none``: logs nothing."""


def require_tracker(kind: str) -> None:
    """Refuse an unknown kind (exit 2) or a missing package (exit 3 naming the extra).

    Called before any training or export work, so a missing package costs nothing.
    """
    if kind not in TRACKERS:
        raise UserError(f"--logger {kind!r}: choose one of {', '.join(TRACKERS)}")
    if kind in _PACKAGES:
        module, extra = _PACKAGES[kind]
        require(module, extra=extra, purpose=f"--logger {kind}")


def default_logger_dir(kind: str, run_dir: str | Path) -> Path:
    """Where a kind logs when ``--logger-dir`` is not given: inside the run directory."""
    return Path(run_dir) / {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(kind, "tracking")


def open_tracker(
    kind: str,
    run_dir: str | Path,
    run_name: str,
    logger_dir: str | Path | None = None,
    experiment: str = "fundus-edge",
    resume: bool = False,
) -> Tracker:
    """Open the tracker ``kind`` for the training run in ``run_dir`` and record it there.

    Args:
        kind: one of :data:`TRACKERS`.
        run_dir: the training run's directory (gets :data:`RECORD_FILE`).
        run_name: the run's name in the tracker (TensorBoard: its sub-folder).
        logger_dir: TensorBoard log root or MLflow store folder; default
            :func:`default_logger_dir`.
        experiment: the MLflow experiment (created when absent).
        resume: continue the run that ``run_dir``'s record names (``train --resume``), when
            it names one of this kind; otherwise a new run.

    Raises:
        UserError: unknown kind; a logger folder that cannot be written.
        MissingDependencyError: the kind's package is not installed (exit 3).
    """
    require_tracker(kind)
    if kind == "none":
        return NullTracker()
    run_dir = Path(run_dir)
    root = Path(logger_dir) if logger_dir is not None else default_logger_dir(kind, run_dir)
    previous = read_record(run_dir) if resume else None
    if previous is not None and previous.get("kind") == kind:
        tracker = reopen_tracker(previous, source=run_dir / RECORD_FILE)
    elif kind == "tensorboard":
        from fundus_edge.tracking.tensorboard import TensorBoardTracker

        tracker = TensorBoardTracker(root / run_name)
    else:
        from fundus_edge.tracking.mlflow_store import MlflowTracker

        tracker = MlflowTracker.create(root, run_name, experiment)
    write_record(run_dir, tracker)
    return tracker


def write_record(run_dir: str | Path, tracker: Tracker) -> Path:
    """Write :data:`RECORD_FILE` (atomically) naming ``tracker``'s run."""
    from fundus_edge.fileio import atomic_write_json

    path = Path(run_dir) / RECORD_FILE
    atomic_write_json(path, tracker.record())
    return path


def read_record(run_dir: str | Path) -> dict | None:
    """The run directory's :data:`RECORD_FILE`, or None when it has none.

    Raises:
        UserError: the file is not a JSON object naming a tracker.
    """
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable tracking record ({exc})") from None
    if not isinstance(rec, dict) or rec.get("kind") not in TRACKERS:
        raise UserError(f"{path}: not a tracking record (no 'kind' of {', '.join(TRACKERS)})")
    return rec


def reopen_tracker(record: Mapping[str, Any], source: str | Path = RECORD_FILE) -> Tracker:
    """The tracker a :data:`RECORD_FILE` names, open again to log more into the same run.

    Raises:
        UserError: the record lacks what its kind needs (``source`` names the file).
        MissingDependencyError: the kind's package is not installed (exit 3).
    """
    kind = record.get("kind")
    require_tracker(str(kind))
    try:
        if kind == "tensorboard":
            from fundus_edge.tracking.tensorboard import TensorBoardTracker

            return TensorBoardTracker(Path(record["logdir"]))
        if kind == "mlflow":
            from fundus_edge.tracking.mlflow_store import MlflowTracker

            return MlflowTracker.reopen(record["tracking_uri"], record["run_id"])
    except KeyError as exc:
        raise UserError(f"{source}: a {kind} record without {exc.args[0]!r}") from None
    return NullTracker()


def numeric_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (booleans, None, NaN and ``epoch`` left out)."""
    out = {}
    for k, v in record.items():
        if k == "epoch" or isinstance(v, bool) or not isinstance(v, int | float | np.number):
            continue
        v = float(v)
        if np.isfinite(v):
            out[k] = v
    return out


def checkpoint_run(checkpoint: str | Path, kind: str) -> dict | None:
    """The tracking record of the run a checkpoint came from, for ``export --logger``.

    Checked before any export work: the kind's package, a checkpoint in a run folder, a
    record there of the same kind.

    Returns:
        The record (:func:`read_record`), or None for ``kind == "none"``.

    Raises:
        UserError: not a checkpoint; its folder has no record, or one of another kind.
        MissingDependencyError: the kind's package is not installed (exit 3).
    """
    require_tracker(kind)
    if kind == "none":
        return None
    ck = Path(checkpoint)
    if ck.suffix != ".safetensors":
        raise UserError(
            f"--logger {kind}: {ck} is not a training checkpoint; the export report is logged "
            "into the run a .safetensors checkpoint came from"
        )
    rec = read_record(ck.parent)
    if rec is None:
        raise UserError(
            f"--logger {kind}: {ck.parent} has no {RECORD_FILE} (train with --logger {kind} "
            "to track the run)"
        )
    if rec["kind"] != kind:
        raise UserError(
            f"--logger {kind}: {ck.parent / RECORD_FILE} tracks the run with {rec['kind']}"
        )
    return rec


def log_files(record: Mapping[str, Any], files: list[str | Path], source: str | Path = "") -> None:
    """Log ``files`` as artifacts into the run a record names (then close it again)."""
    with reopen_tracker(record, source=source or RECORD_FILE) as tracker:
        for f in files:
            tracker.log_artifact(f)
