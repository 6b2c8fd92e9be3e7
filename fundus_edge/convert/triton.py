"""A Triton Inference Server model repository for the fused graph.

Layout (Triton's convention)::

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx      (platform onnxruntime_onnx)   or
    REPO/<name>/1/model.plan      (platform tensorrt_plan)

The batch dimension is Triton's (``max_batch_size`` > 0), so ``dims`` exclude it. Dynamic
batching gathers frames from many cameras into one batch. The artifact's contract (labels,
thresholds, preprocessing) travels as the config parameter ``fundus_edge`` so a client can
read it from the server (``GET v2/models/<name>/config``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_text

__all__ = ["triton_config", "write_triton_repository"]

_PLATFORMS = {
    ".onnx": ("onnxruntime_onnx", "model.onnx"),
    ".plan": ("tensorrt_plan", "model.plan"),
    ".engine": ("tensorrt_plan", "model.plan"),
}


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'


def triton_config(
    meta: dict[str, Any],
    name: str,
    platform: str,
    max_batch_size: int = 8,
    preferred_batch_sizes: tuple[int, ...] = (4, 8),
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: str = "KIND_GPU",
) -> str:
    """``config.pbtxt`` text for the fused graph described by ``meta`` (the artifact contract).

    Raises:
        UserError: ``max_batch_size`` below 1 (the batch dimension is Triton's here, and
            ``dims`` exclude it) or ``instances`` below 1.
    """
    if int(max_batch_size) < 1:
        raise UserError(f"--max-batch {max_batch_size}: Triton max_batch_size must be at least 1")
    if int(instances) < 1:
        raise UserError(f"triton_instances {instances}: must be at least 1")
    size = int(meta["input_size"])
    c = len(meta["label_names"])
    m = len(meta["members"])
    h, w = meta["map_size"]
    pref = [b for b in preferred_batch_sizes if b <= max_batch_size] or [max_batch_size]
    inputs = _tensor("image", "TYPE_UINT8", [size, size, 3])
    outputs = ",\n".join(
        [
            _tensor("probs", "TYPE_FP32", [c]),
            _tensor("logits", "TYPE_FP32", [m, c]),
            _tensor("cams", "TYPE_FP32", [m, c, h, w]),
            _tensor("attention", "TYPE_FP32", [1, h, w]),
        ]
    )
    contract = json.dumps(meta, separators=(",", ":")).replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, pref))} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
        'parameters: {\n  key: "fundus_edge"\n'
        f'  value: {{\n    string_value: "{contract}"\n  }}\n}}\n'
    )


def write_triton_repository(
    model_path: str | Path,
    repo: str | Path,
    meta: dict[str, Any],
    name: str = "fundus_edge",
    version: int = 1,
    max_batch_size: int = 8,
    instances: int = 1,
    kind: str = "KIND_GPU",
) -> Path:
    """Copy ``model_path`` (.onnx or .plan/.engine) into a Triton repository and write its config.

    Returns:
        The model's folder ``repo/name``.
    """
    model_path = Path(model_path)
    if model_path.suffix not in _PLATFORMS:
        raise UserError(f"{model_path}: Triton needs an .onnx or a TensorRT .plan/.engine file")
    if not model_path.is_file():
        raise UserError(f"{model_path}: no such file")
    platform, fname = _PLATFORMS[model_path.suffix]
    dest = Path(repo) / name
    vdir = dest / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    tmp = vdir / f".{fname}.tmp"
    shutil.copyfile(model_path, tmp)
    tmp.replace(vdir / fname)
    text = triton_config(
        meta, name, platform, max_batch_size=max_batch_size, instances=instances, kind=kind
    )
    atomic_write_text(dest / "config.pbtxt", text)
    return dest
