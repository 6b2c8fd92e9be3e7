"""Checkpoints: one ``.safetensors`` file, tensors plus a JSON meta block; never a pickle.

The meta (model config, label names, thresholds, preprocessing, metrics, epoch, versions)
lives in the safetensors header under the key ``"fundus_edge"``, so the weights and their
contract cannot be separated. :func:`load_checkpoint` is the one way back to an Ensemble.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fundus_edge import __version__
from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "read_checkpoint_meta",
    "read_checkpoint_tensors",
    "save_checkpoint",
    "update_checkpoint_meta",
]

CHECKPOINT_FORMAT = "fundus-edge-checkpoint/1"
_META_KEY = "fundus_edge"


def save_checkpoint(
    path: str | os.PathLike,
    model: Any,
    *,
    thresholds: list[float] | None = None,
    metrics: dict | None = None,
    epoch: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` (an :class:`~fundus_edge.models.Ensemble`) atomically.

    Args:
        path: output file, conventionally ``*.safetensors``.
        model: the ensemble; its config is saved with it.
        thresholds: per-class decision thresholds (C floats), default 0.5 each.
        metrics: validation metrics to record.
        epoch: training epoch.
        extra: more JSON-ready meta, merged at the top level (must not override keys).

    Returns:
        The path written.
    """
    from safetensors.torch import save

    cfg = model.config
    if thresholds is None:
        thresholds = [0.5] * cfg.num_classes
    if len(thresholds) != cfg.num_classes:
        raise UserError(f"{len(thresholds)} thresholds given for {cfg.num_classes} classes")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "label_names": list(cfg.label_names),
        "thresholds": [float(t) for t in thresholds],
        "preprocessing": {
            "image_size": cfg.image_size,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "color": "RGB",
            "layout": "NCHW",
            "scale": "0-1 before normalisation",
        },
        "metrics": metrics or {},
        "epoch": epoch,
        "versions": {"fundus_edge": __version__, "torch": torch.__version__},
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"extra meta key {key!r} would override a standard key")
        meta[key] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={_META_KEY: json.dumps(meta)})
    path = Path(path)
    atomic_write_bytes(path, blob)
    return path


def _open(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The meta dict of a checkpoint, without reading its tensors."""
    from safetensors import safe_open

    path = _open(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
    except Exception as exc:
        raise UserError(f"{path}: not a safetensors checkpoint ({exc})") from exc
    if raw is None:
        raise UserError(f"{path}: no fundus-edge meta block; not a fundus-edge checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path}: checkpoint format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}"
        )
    return meta


def read_checkpoint_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint, tensors on the CPU."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    return load_file(str(path), device="cpu"), meta


def update_checkpoint_meta(path: str | os.PathLike, updates: dict) -> Path:
    """Add or replace top-level meta keys of a checkpoint (tensors unchanged), atomically.

    Args:
        path: a file written by :func:`save_checkpoint`.
        updates: JSON-ready keys to set (the standard keys, e.g. ``config``, may not change).

    Returns:
        The path rewritten.
    """
    from safetensors.torch import save

    tensors, meta = read_checkpoint_tensors(path)
    fixed = {"format", "config", "label_names", "thresholds", "preprocessing", "versions"}
    clash = sorted(fixed & set(updates))
    if clash:
        raise ValueError(f"meta key {clash[0]!r} is the checkpoint's own; it cannot be updated")
    meta.update(updates)
    atomic_write_bytes(Path(path), save(tensors, metadata={_META_KEY: json.dumps(meta)}))
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[Any, dict]:
    """Rebuild the saved Ensemble exactly: the one function to load a checkpoint back.

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: device to put the model on.

    Returns:
        ``(ensemble, meta)``; the ensemble is in eval mode; ``meta`` is the saved dict.

    Raises:
        UserError: missing file, not a fundus-edge checkpoint, or tensors not matching its config.
    """
    from fundus_edge.models.ensemble import EnsembleConfig, build_ensemble

    tensors, meta = read_checkpoint_tensors(path)
    cfg_dict = dict(meta["config"])
    # The tensors are in this file; do not re-read ImageNet files or a parent checkpoint.
    cfg_dict["weights"] = "none"
    model = build_ensemble(EnsembleConfig.from_dict(cfg_dict))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: tensors do not match its config ({first})") from exc
    model.config.weights = meta["config"]["weights"]
    return model.to(map_location).eval(), meta
