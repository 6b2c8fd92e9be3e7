"""Options of ``fundus-edge export`` and the export profiles that supply their defaults.

Profiles are YAML files of :class:`ExportConfig` fields, one per target device (the
repository's ``export/`` folder). They ship inside the wheel as ``fundus_edge/profiles/``
(in the source tree a link to ``export/``), so ``--profile NAME`` works from an installed
package on the device; ``--profile`` also takes a path to a profile of one's own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fundus_edge.convert.quantize import CALIB_METHODS
from fundus_edge.errors import UserError
from fundus_edge.options import load_yaml_mapping

__all__ = ["FORMATS", "PRECISIONS", "PROFILE_DIR", "ExportConfig", "load_profile", "profile_names"]

FORMATS = ("onnx", "engine", "triton", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")
#: The profiles shipped with the package (``export/`` of the repository).
PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"

# Command-line spelling of ExportConfig fields (profile-only fields keep their key).
_FLAGS = {
    "model": "--model",
    "out": "--out",
    "format": "--format",
    "precision": "--precision",
    "calib": "--calib",
    "calib_count": "--calib-count",
    "calib_method": "--calib-method",
    "int8_target": "--int8-target",
    "opset": "--opset",
    "workspace_mb": "--workspace",
    "batch": "--batch",
    "rebuild": "--rebuild",
    "triton_backend": "--triton-backend",
    "triton_max_batch": "--max-batch",
    "name": "--name",
}


@dataclass
class ExportConfig:
    """Options of ``fundus-edge export``; a profile in ``export/`` supplies defaults.

    Attributes:
        model: the checkpoint (``.safetensors``) to export, or an FP32 ``.onnx`` written by
            export (the device's starting point: everything but the grad-cam check).
        out: output folder.
        format: ``onnx``, ``engine`` (TensorRT, built here: run it on the device), ``triton``
            or ``openvino`` (an IR for OpenVINO: FP16-stored weights, or INT8 from the Q/DQ graph).
        precision: ``fp32``, ``fp16`` or ``int8``.
        calib: folder of fundus images or a dataset, for INT8 calibration and parity checks.
        calib_count: images used for calibration.
        calib_method: ``percentile``, ``minmax`` or ``entropy``.
        int8_target: ``auto`` (``tensorrt`` for engine/Triton-engine formats, else ``cpu``),
            ``tensorrt`` (symmetric s8 Q/DQ) or ``cpu`` (u8s8, ONNX Runtime's fast x86 path).
        verify: run the parity checks (ORT vs PyTorch, maps vs grad-cam, precision vs FP32).
        verify_images: images used for parity checks.
        opset: ONNX opset.
        simplify: try onnxslim / ORT basic optimisation and keep what is faster.
        workspace_mb: TensorRT builder workspace.
        batch: TensorRT optimisation profile (min, opt, max).
        rebuild: TensorRT engine reuse policy: stale, always, never.
        triton_backend: for ``triton``: ``onnx`` (onnxruntime_onnx) or ``engine`` (tensorrt_plan).
        triton_max_batch: Triton ``max_batch_size`` [8; with ``triton_backend: engine``, the
            engine's max batch].
        triton_instances: model instances per GPU.
        triton_kind: ``KIND_GPU`` or ``KIND_CPU``.
        name: model name (file stem and Triton model name).
        profile: the profile file the defaults came from, if any.
        profile_keys: the fields whose value came from ``profile`` (so messages name it).
    """

    model: str = ""
    out: str = "exports/model"
    format: str = "onnx"
    precision: str = "fp32"
    calib: str | None = None
    calib_count: int = 64
    calib_method: str = "percentile"
    int8_target: str = "auto"
    verify: bool = True
    verify_images: int = 4
    opset: int = 17
    simplify: bool = True
    workspace_mb: int = 1024
    batch: tuple[int, int, int] = (1, 1, 4)
    rebuild: str = "stale"
    triton_backend: str = "onnx"
    triton_max_batch: int | None = None
    triton_instances: int = 1
    triton_kind: str = "KIND_GPU"
    name: str = "model"
    profile: str | None = field(default=None)
    profile_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Every option is checked here, before any work: a bad value must not cost an export.
        try:
            self.batch = tuple(int(b) for b in self.batch)  # type: ignore[assignment]
        except (TypeError, ValueError):
            raise UserError(
                f"{self.where('batch')}: expected three integers min,opt,max like 1,1,4"
            ) from None
        self.profile_keys = tuple(self.profile_keys)
        choices = {
            "format": FORMATS,
            "precision": PRECISIONS,
            "calib_method": CALIB_METHODS,
            "rebuild": ("stale", "always", "never"),
            "int8_target": ("auto", "tensorrt", "cpu"),
            "triton_backend": ("onnx", "engine"),
            "triton_kind": ("KIND_GPU", "KIND_CPU"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{self.where(key)}: choose {', '.join(allowed)}")
        if self.triton_max_batch is None:  # the engine's own max batch, else Triton's usual 8
            self.triton_max_batch = self.batch[2] if self.triton_backend == "engine" else 8
        for key in (
            "calib_count",
            "verify_images",
            "workspace_mb",
            "triton_max_batch",
            "triton_instances",
            "opset",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                try:
                    value = int(str(value))
                except ValueError:
                    raise UserError(f"{self.where(key)}: must be an integer") from None
                setattr(self, key, value)
            if key != "opset" and value < 1:
                raise UserError(f"{self.where(key)}: must be at least 1")
        if len(self.batch) != 3:
            raise UserError(f"{self.where('batch')}: needs three numbers min,opt,max")
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"{self.where('batch')}: need 1 <= min <= opt <= max")
        if (
            self.format == "triton"
            and self.triton_backend == "engine"
            and self.triton_max_batch > hi
        ):
            raise UserError(
                f"{self.where('triton_max_batch')}: above the engine's max batch {hi} "
                f"({self.where('batch')}); Triton would refuse to load the plan"
            )
        if self.opset < 9 or self.opset > 20:
            raise UserError(f"{self.where('opset')}: TensorRT 10 parses opsets 9-20")
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise UserError(f"{self.where('name')}: a plain file name, without folders")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise UserError(
                f"{self.where('name')}: letters, digits, '.', '_' and '-' only (it names files "
                "and the Triton model)"
            )

    def where(self, key: str) -> str:
        """Where the value of ``key`` came from, for messages: the option, or the profile file."""
        value = getattr(self, key)
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        if self.profile and key in self.profile_keys:
            return f"{key}: {value!r} in --profile {self.profile}"
        return f"{_FLAGS.get(key, key)} {value!r}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch"] = list(self.batch)
        return d


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read an export profile (YAML mapping of :class:`ExportConfig` fields)."""

    path = Path(path)
    if not path.is_file():
        # A bare name: one of the profiles shipped with the package.
        cand = PROFILE_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
        if path.parent != Path(".") or not cand.is_file():
            raise UserError(
                f"--profile {path}: no such file or shipped profile "
                f"(shipped: {', '.join(profile_names()) or 'none'})"
            )
        path = cand
    data = load_yaml_mapping(path, "--profile")
    data.pop("description", None)
    known = {f.name for f in fields(ExportConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown export option(s): {', '.join(unknown)}")
    data["profile"] = str(path)
    data["profile_keys"] = tuple(k for k in data if k != "profile")
    return data


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package (``--profile NAME``)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
