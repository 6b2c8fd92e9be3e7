"""The model artifact's contract: metadata that travels with every exported model.

ONNX files carry it in ``metadata_props["fundus_edge"]`` (one JSON string); TensorRT
engines carry it in a sidecar file ``<engine path>.json`` (never glued to the plan, so
trtexec, Triton and DeepStream still read the plan). The runtime reads preprocessing,
label names and thresholds from here; nothing is re-typed by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError

__all__ = [
    "CONTRACT_OUTPUTS",
    "METADATA_FORMAT",
    "METADATA_KEY",
    "contract_from_checkpoint",
    "metadata_from_session",
    "parse_metadata",
    "read_metadata",
    "sidecar_path",
    "validate_metadata",
]

METADATA_KEY = "fundus_edge"
METADATA_FORMAT = 1
# What the runtime cannot work without; the rest is provenance.
_REQUIRED = ("format", "label_names", "thresholds", "input_size", "preprocess", "outputs")


def sidecar_path(path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``: where a TensorRT engine's metadata lives."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def parse_metadata(text: str, source: str) -> dict[str, Any]:
    """Parse and validate a metadata JSON string; ``source`` names where it came from."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: model metadata is not valid JSON ({exc})") from exc
    return validate_metadata(meta, source)


def validate_metadata(meta: Any, source: str) -> dict[str, Any]:
    """Check the fields the runtime needs; raise one :class:`UserError` line naming the gap.

    Args:
        meta: the decoded metadata.
        source: the artifact it came from, for the message.

    Returns:
        ``meta`` itself.
    """
    if not isinstance(meta, dict):
        raise UserError(
            f"{source}: model metadata must be a JSON object, got {type(meta).__name__}"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{source}: model metadata lacks {', '.join(missing)}")
    if meta["format"] != METADATA_FORMAT:
        raise UserError(
            f"{source}: model metadata format {meta['format']!r} is not supported "
            f"(this fundus-edge reads format {METADATA_FORMAT}; upgrade fundus-edge or re-export)"
        )
    names, thresholds = meta["label_names"], meta["thresholds"]
    if not isinstance(names, list) or not names:
        raise UserError(f"{source}: model metadata label_names must be a non-empty list")
    if not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{source}: model metadata label_names must be non-empty strings")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{source}: model metadata names label {dup[0]!r} twice")
    if not isinstance(thresholds, list) or len(thresholds) != len(names):
        raise UserError(
            f"{source}: model metadata has {len(thresholds) if isinstance(thresholds, list) else '?'} "
            f"thresholds for {len(names)} labels"
        )
    for name, t in zip(names, thresholds, strict=True):
        # A null or out-of-range threshold would switch a finding off (or on) without a word.
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise UserError(
                f"{source}: model metadata threshold of {name} is {t!r}; expected a number in [0, 1]"
            )
    if meta.get("temperature") is not None:  # optional: temperature scaling (operating.py)
        from fundus_edge.operating import temperature_vector

        temperature_vector(meta["temperature"], len(names), f"{source}: model metadata")
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is not None and not (
            isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ):
            raise UserError(f"{source}: model metadata {key} must be three numbers, got {v!r}")
    for key in ("preprocess", "quality"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            raise UserError(f"{source}: model metadata {key} must be a mapping, got {meta[key]!r}")
    size = meta["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise UserError(
            f"{source}: model metadata input_size must be a positive integer, got {size!r}"
        )
    pre_size = (meta.get("preprocess") or {}).get("size", size)
    if pre_size != size:
        raise UserError(
            f"{source}: model metadata preprocess.size {pre_size} differs from input_size {size}"
        )
    screening = meta.get("screening_label")
    if screening is not None and screening not in names:
        raise UserError(f"{source}: screening_label {screening!r} is not one of label_names")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the metadata of an exported model.

    ``.onnx``: the ``fundus_edge`` entry of ``metadata_props`` (read with ONNX Runtime alone).
    ``.engine`` / ``.plan`` (TensorRT) and ``.xml`` (OpenVINO IR): the sidecar
    ``<path>.json``. ``.json``: that file.

    Args:
        path: the model file.

    Returns:
        The metadata dict (its fields: README, "Export", "Metadata").

    Raises:
        UserError: the file or its metadata is missing, unreadable or incomplete.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _read_onnx(path)
    if suffix in (".engine", ".plan", ".xml"):
        side = sidecar_path(path)
        if not side.is_file():
            kind = "OpenVINO IR" if suffix == ".xml" else "TensorRT engine"
            raise UserError(
                f"{path}: {kind} has no metadata sidecar {side.name} "
                "(export writes it next to the model; copy the files together)"
            )
        return parse_metadata(side.read_text(encoding="utf-8"), str(side))
    if suffix == ".json":
        return parse_metadata(path.read_text(encoding="utf-8"), str(path))
    raise UserError(f"{path}: cannot read model metadata from a '{suffix}' file")


def _read_onnx(path: Path) -> dict[str, Any]:
    from fundus_edge.errors import require

    ort = require("onnxruntime", purpose="reading ONNX model metadata")
    opts = ort.SessionOptions()
    # Only the metadata is wanted: skip graph optimisation, it costs seconds on big graphs.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise UserError(f"{path}: ONNX Runtime cannot load this model ({exc})") from exc
    return metadata_from_session(sess, str(path))


def metadata_from_session(sess: Any, source: str) -> dict[str, Any]:
    """The validated metadata of an ``onnxruntime.InferenceSession``."""
    custom = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in custom:
        raise UserError(
            f"{source}: ONNX model has no '{METADATA_KEY}' metadata "
            "(export it with `fundus-edge export`, which records labels, thresholds and preprocessing)"
        )
    return parse_metadata(custom[METADATA_KEY], source)


CONTRACT_OUTPUTS = ("probs", "logits", "cams", "attention")


def contract_from_checkpoint(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """The artifact contract (as an exported model carries it) from a checkpoint's meta.

    The checkpoint records the model config, labels, thresholds and the training
    preprocessing (``preprocess``, written by the trainer); the runtime needs them in
    the export's shape.
    """
    from fundus_edge.log import get_logger
    from fundus_edge.preprocess import PreprocessConfig
    from fundus_edge.quality import QualityConfig

    cfg = meta.get("config") or {}
    labels = list(meta.get("label_names") or cfg.get("label_names") or [])
    size = int(cfg.get("image_size") or (meta.get("preprocessing") or {}).get("image_size") or 0)
    pre = meta.get("preprocess")
    if pre is None:
        # Checkpoints saved outside the trainer carry no preprocessing record.
        get_logger("artifact").warning(
            "%s: checkpoint has no preprocess record; using the defaults at %d px", source, size
        )
        pre = PreprocessConfig(size=size).to_dict()
    screening = meta.get("screening_label")
    if screening is None and "Disease_Risk" in labels:
        screening = "Disease_Risk"
    contract = {
        "format": METADATA_FORMAT,
        "label_names": labels,
        "screening_label": screening,
        "thresholds": meta.get("thresholds"),
        "threshold_policy": meta.get("threshold_policy"),
        "input_size": size,
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
        "preprocess": pre,
        "quality": meta.get("quality") or QualityConfig().to_dict(),
        "members": cfg.get("members"),
        "head": cfg.get("head"),
        "member_head": cfg.get("member_head"),
        "enhance": cfg.get("enhance"),
        "precision": "fp32",
        "outputs": list(CONTRACT_OUTPUTS),
        "views": cfg.get("views"),
        "versions": meta.get("versions") or {},
    }
    return validate_metadata(contract, source)
