"""``fundus-edge export --thresholds FILE.json`` (or ``--threshold-policy``, ``--calibrate``):
re-stamp an exported ONNX model's thresholds and temperature without re-exporting it.

The ONNX file is copied into ``--out`` and only its ``metadata_props`` (the artifact contract,
written by :func:`fundus_edge.convert.steps._restamp`) change: the graph, its initializers and
every parity check made at export stay valid. Each re-stamp appends a record to the
contract's ``threshold_history``: who (``getpass``, else ``$USER``), when (ISO 8601, UTC),
why (``--reason``, required), the old and new thresholds and temperatures, and the policy and
data they were tuned on.

The thresholds file is one of::

    {"thresholds": {"Disease_Risk": 0.41, "DR": 0.37, ...}}   # every label of the model
    {"policy": "sens@0.90", "data": "data/rfmid"}             # tuned on data's val split

Thresholds apply to the probabilities the runtime thresholds, i.e. after the (new)
temperature. ``--calibrate`` alone fits a temperature per label and carries the old
thresholds through it, so no decision changes.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = ["read_thresholds_file", "restamp_model"]

log = get_logger("export")


def read_thresholds_file(path: str | os.PathLike, labels: list[str]) -> dict[str, Any]:
    """``{"thresholds": [C floats]}`` or ``{"policy": Policy, "data": Path | None}``.

    Raises:
        UserError: one line naming the file: not JSON, neither form, an unknown or a missing
            label, a threshold outside [0, 1], a bad policy.
    """
    from fundus_edge.operating import parse_policy

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--thresholds {path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(doc, dict) and "thresholds" in doc and "policy" not in doc:
        thr = doc["thresholds"]
        if not isinstance(thr, dict):
            raise UserError(f"{path}: thresholds must be a mapping label -> number")
        unknown = [k for k in thr if k not in labels]
        if unknown:
            raise UserError(
                f"{path}: unknown label {unknown[0]!r} (the model's labels: {', '.join(labels)})"
            )
        missing = [n for n in labels if n not in thr]
        if missing:
            raise UserError(f"{path}: no threshold for {', '.join(missing)}")
        for name, t in thr.items():
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                raise UserError(
                    f"{path}: threshold of {name} is {t!r}; expected a number in [0, 1]"
                )
        return {"thresholds": [float(thr[n]) for n in labels]}
    if isinstance(doc, dict) and "policy" in doc and "thresholds" not in doc:
        policy = parse_policy(str(doc["policy"]), f"{path}: policy")
        data = doc.get("data")
        if data is not None and not isinstance(data, str):
            raise UserError(f"{path}: data must be a dataset folder path, got {data!r}")
        if data is not None and not Path(data).exists() and (path.parent / data).exists():
            data = str(path.parent / data)  # relative to the file
        return {"policy": policy, "data": None if data is None else Path(data)}
    raise UserError(
        f'{path}: expected {{"thresholds": {{label: t}}}} or {{"policy": "sens@0.90", "data": DIR}}'
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a container, no LOGNAME
        return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"


def _validation_probs(model: Path, data: Path, labels: list[str], batch_size: int):
    """``(y (N, C), probs (N, C), scored column indices, images)`` on ``data``'s val split."""
    from fundus_edge.backends import load_backend
    from fundus_edge.data import open_dataset
    from fundus_edge.evaluate import align_labels, backend_predictor, predict_samples
    from fundus_edge.preprocess import PreprocessConfig

    if not Path(data).exists():
        raise UserError(f"{data}: dataset folder does not exist")
    ds = open_dataset(data)
    val = ds.splits.get("val") or []
    if not val:
        raise UserError(f"{data}: no validation split to tune thresholds or temperature on")
    m_idx, d_idx, _ = align_labels(labels, ds.label_names)
    runner = load_backend(model)
    try:
        pre = PreprocessConfig.from_dict(runner.metadata["preprocess"])
        probs = predict_samples(
            backend_predictor(runner),
            val,
            pre,
            batch_size,
            keep_maps=lambda i, s: False,
            description="val",
        ).probs
    finally:
        runner.close()
    y = np.zeros((len(val), len(labels)))
    y[:, m_idx] = np.stack([s.labels for s in val])[:, d_idx]
    return y, probs, m_idx, len(val)


def restamp_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reason: str,
    thresholds_file: str | os.PathLike | None = None,
    policy: str | None = None,
    data: str | os.PathLike | None = None,
    calibrate: bool = False,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Copy ``model`` (.onnx) into ``out`` with new thresholds and/or temperature.

    Args:
        model: an exported ``.onnx`` with a fundus-edge contract.
        out: the output folder (the file keeps its name; the same file is rewritten in place).
        reason: why, recorded in ``threshold_history``.
        thresholds_file: see the module docstring.
        policy: a threshold policy (``--threshold-policy``), tuned on ``data``'s val split.
        data: dataset for ``policy`` / ``calibrate`` (the file's ``data`` wins for its policy).
        calibrate: fit a temperature per label on ``data``'s val split.
        batch_size: images per inference call.

    Returns:
        ``{"path", "history"}``: the written model and the record appended to its history.
    """
    from fundus_edge.artifact import read_metadata, validate_metadata
    from fundus_edge.convert.steps import _now, _restamp
    from fundus_edge.fileio import sha256_file
    from fundus_edge.operating import (
        apply_temperature,
        fit_temperature,
        map_thresholds,
        parse_policy,
        temperature_vector,
        tune,
    )

    model = Path(model)
    if model.suffix.lower() != ".onnx":
        raise UserError(
            f"--model {model}: re-stamping thresholds works on an exported .onnx "
            "(export the checkpoint first, then re-stamp the model.onnx)"
        )
    if not (reason or "").strip():
        raise UserError("--reason TEXT is required when re-stamping thresholds (who asked, why)")
    meta = read_metadata(model)
    labels = list(meta["label_names"])
    c = len(labels)
    old_thr = [float(t) for t in meta["thresholds"]]
    old_t = temperature_vector(meta.get("temperature"), c, f"{model}: model metadata")
    pol = parse_policy(policy) if policy is not None else None
    explicit = None
    if thresholds_file is not None:
        spec = read_thresholds_file(thresholds_file, labels)
        if "thresholds" in spec:
            explicit = spec["thresholds"]
        else:
            pol, data = spec["policy"], spec["data"] or data
    if explicit is None and pol is None and not calibrate:
        raise UserError("nothing to re-stamp: give --thresholds, --threshold-policy or --calibrate")
    new_t = old_t
    new_thr = list(old_thr)
    n_val = None
    if pol is not None or calibrate:
        if data is None:
            raise UserError(
                "--threshold-policy / --calibrate need a dataset with a validation split: "
                '--data DIR (or "data" in the thresholds file)'
            )
        y, probs, m_idx, n_val = _validation_probs(model, Path(data), labels, batch_size)
        if calibrate:
            fitted = np.ones(c) if old_t is None else old_t.copy()
            fitted[m_idx] = fit_temperature(y[:, m_idx], probs[:, m_idx])
            new_t = fitted
            if explicit is None and pol is None:  # decisions unchanged
                raw = apply_temperature(np.asarray(old_thr), old_t, inverse=True)
                new_thr = map_thresholds(raw, new_t).tolist()
        if pol is not None:
            t_val = None if new_t is None else new_t[m_idx]
            tuned = tune(y[:, m_idx], apply_temperature(probs[:, m_idx], t_val), pol)
            for k, j in enumerate(m_idx):
                new_thr[j] = float(tuned[k])
    if explicit is not None:
        new_thr = explicit
    record = {
        "user": _user(),
        "time": _now(),
        "reason": reason.strip(),
        "old": {n: round(t, 6) for n, t in zip(labels, old_thr, strict=True)},
        "new": {n: round(float(t), 6) for n, t in zip(labels, new_thr, strict=True)},
        "policy": str(pol)
        if pol is not None
        else ("explicit" if explicit is not None else "unchanged (temperature only)"),
        "thresholds_file": None if thresholds_file is None else str(thresholds_file),
        "data": None if data is None or n_val is None else str(data),
        "val_images": n_val,
        "temperature_old": None if old_t is None else [round(float(v), 6) for v in old_t],
        "temperature_new": None if new_t is None else [round(float(v), 6) for v in new_t],
        "source": model.name,
        "source_sha256": sha256_file(model),
    }
    new_meta = dict(meta)
    # Full precision: a rounded threshold can move a decision (a saturated label at 1 - 1e-7).
    new_meta["thresholds"] = [float(t) for t in new_thr]
    if new_t is not None:
        new_meta["temperature"] = [float(v) for v in new_t]
    if pol is not None or explicit is not None:
        new_meta["threshold_policy"] = record["policy"]
    new_meta["threshold_history"] = [*(meta.get("threshold_history") or []), record]
    validate_metadata(new_meta, str(model))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / model.name
    if dest.exists() and dest.resolve() == model.resolve():
        _restamp(dest, new_meta)  # in place, atomic
    else:  # a copy, re-stamped, then moved in: --out never holds a half-written model
        tmp = dest.with_name(f".{dest.name}.restamp")
        try:
            shutil.copyfile(model, tmp)
            _restamp(tmp, new_meta)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    log.info("re-stamped %s (%s): %s", dest, record["policy"], reason.strip())
    return {"path": str(dest), "history": record}
