"""Options of ``fundus-edge export`` and the export profiles that supply their defaults.

Profiles are YAML files of :class:`ExportConfig` fields, one per target device (the
repository's ``export/`` folder). They ship inside the wheel as ``fundus_edge/profiles/``
(in the source tree a link to ``export/``), so ``--profile NAME`` works from an installed
package on the device; ``--profile`` also takes a path to a profile of one's own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fundus_edge.convert.quantize import CALIB_METHODS
from fundus_edge.errors import UserError
from fundus_edge.options import load_yaml_mapping

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "PROFILE_DIR",
    "ExportConfig",
    "load_profile",
    "profile_names",
    "resolve_export",
]

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


#: Fields that record where the options came from; a profile cannot set them.
_RECORD_KEYS = ("profile", "profile_keys")


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read an export profile: a YAML mapping of :class:`ExportConfig` fields (and an optional
    ``description``), each key and type checked with the file named in the message.

    Args:
        path: a profile file, or the bare name of a shipped one (``x86-cpu-int8``).

    Returns:
        The profile's options, plus ``profile`` (the file) and ``profile_keys`` (its keys).

    Raises:
        UserError: no such file or shipped profile, invalid YAML, an unknown key, a wrong type.
    """
    from fundus_edge.layered import check_layer

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
    for key in _RECORD_KEYS:
        if key in data:
            raise UserError(f"{path}: {key}: set by export itself, not by a profile")
    data = check_layer(ExportConfig, data, str(path))
    return {**data, "profile": str(path), "profile_keys": tuple(data)}


def resolve_export(
    model: str | Path,
    profile: str | Path | None = None,
    options: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> ExportConfig:
    """The export's options from the one layered loader (:func:`fundus_edge.layered.resolve`):
    :class:`ExportConfig`'s defaults <- ``defaults`` <- the profile <- ``options``.

    Args:
        model: the checkpoint or ONNX file to export.
        profile: ``--profile``: a file or a shipped profile's name.
        options: the command-line options given (None values are left out).
        defaults: what this model implies (its name, its output folder, the format the
            machine can build), under the profile.

    Returns:
        The checked config; its messages about a value name the profile when the profile
        set it (``profile_keys``), else the command-line option.

    Raises:
        UserError: a bad profile or option, naming the file or option and the key.
    """
    from fundus_edge.layered import resolve

    prof = load_profile(profile) if profile else {}
    record = {k: prof.pop(k) for k in _RECORD_KEYS if k in prof}
    given = {k: v for k, v in (options or {}).items() if v is not None}
    given["model"] = str(model)
    if record:  # messages name the profile only for the keys it set and the command did not
        record["profile_keys"] = tuple(k for k in record["profile_keys"] if k not in given)
    layers = [
        (f"export defaults for {model}", defaults or {}),
        (record.get("profile", "--profile"), prof),
        ("command-line options", given),
        ("--profile", record),
    ]
    return resolve(ExportConfig, layers, "export options")


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package (``--profile NAME``)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
