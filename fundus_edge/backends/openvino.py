"""OpenVINO backend: an exported ``.onnx`` or an OpenVINO IR (``.xml`` + ``.bin``) on Intel/AMD
CPUs (and OpenVINO's GPU / NPU devices), at an explicit precision.

Precision is chosen, never guessed, and recorded in :attr:`Backend.device`:

* ``fp32`` - strict FP32 (``INFERENCE_PRECISION_HINT=f32``); an IR whose weights were stored
  in FP16 is computed in FP32 from them (and says so);
* ``bf16`` - BF16 compute where the CPU has it (AMX or AVX-512-BF16: OpenVINO's ``BF16``
  optimisation capability); refused with one line elsewhere, never silently turned into FP32;
* ``int8`` - the static Q/DQ graph export wrote (``model.int8.onnx``, or an INT8 IR): the
  quantised layers in INT8, the rest (maps, attention, sigmoid) in FP32.

The default is the artifact's own precision (``fp32`` for an FP32 graph, ``int8`` for a
Q/DQ graph). After compiling, the precision OpenVINO reports is compared with the one asked
for, so a plugin that quietly changed it is an error, not a surprise in the figures.

The contract comes from the ONNX metadata, or, for an IR, from the sidecar
``<model>.xml.json`` that ``fundus-edge export --format openvino`` writes beside it (with the
OpenVINO version that wrote the IR; an IR from a newer OpenVINO is refused by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fundus_edge.artifact import read_metadata
from fundus_edge.backends.base import INPUT_NAME, Backend
from fundus_edge.errors import UserError, require

__all__ = [
    "OV_PRECISIONS",
    "OpenVinoBackend",
    "cpu_supports_bf16",
    "openvino_devices",
    "supports_bf16",
]

OV_PRECISIONS = ("fp32", "bf16", "int8")
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in str(text).split("-")[0].split(".")[:2]:
        try:
            parts.append(int(p))
        except ValueError:
            break
    return tuple(parts)


def supports_bf16(core: Any, device: str = "CPU") -> bool:
    """Whether ``device`` computes in BF16 (OpenVINO's ``BF16`` optimisation capability)."""
    try:
        return "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a device without the property
        return False


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO computes BF16 on this machine's CPU (needs OpenVINO installed)."""
    import openvino as ov

    return supports_bf16(ov.Core(), "CPU")


_PROBE = """
import json
import openvino as ov
core = ov.Core()
devices = {}
for dev in core.available_devices:
    entry = {}
    for prop, key in (("FULL_DEVICE_NAME", "name"), ("OPTIMIZATION_CAPABILITIES", "capabilities")):
        try:
            value = core.get_property(dev, prop)
            entry[key] = list(value) if isinstance(value, (list, tuple)) else str(value)
        except Exception:
            entry[key] = None
    devices[dev] = entry
print(json.dumps({"available": True, "version": ov.__version__, "devices": devices}))
"""


def openvino_devices() -> dict[str, Any]:
    """OpenVINO's version and devices (CPU, GPU, NPU) with their names and capabilities.

    Probed in a child process: loading OpenVINO's device plugins starts worker threads that
    live as long as the process, and a report (``doctor``, a benchmark's device record) must
    not leave them in the caller.
    """
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("openvino") is None:
        return {"available": False, "reason": "not installed"}
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "reason": f"probe failed: {exc}"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"available": False, "reason": f"probe failed: {last}"}
    return json.loads(out.stdout)


class OpenVinoBackend(Backend):
    """An ``.onnx`` or OpenVINO IR ``.xml`` run by OpenVINO.

    Args:
        path: the model (``.onnx`` with its metadata, or ``.xml`` with ``.bin`` and the
            ``.xml.json`` contract beside it).
        precision: ``fp32``, ``bf16`` or ``int8``; None: the artifact's own.
        device: OpenVINO device (``CPU``, ``GPU``, ``NPU``, ``AUTO``); default ``CPU``.
        threads: inference threads (0: OpenVINO's default).
    """

    name: ClassVar[str] = "openvino"
    suffixes: ClassVar[tuple[str, ...]] = (".xml",)
    loads: ClassVar[tuple[str, ...]] = (".xml", ".onnx")
    options: ClassVar[tuple[str, ...]] = ("precision", "device", "threads")

    def __init__(
        self,
        path: Path,
        precision: str | None = None,
        device: str | None = None,
        threads: int = 0,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such model file")
        ov = require("openvino", purpose="the OpenVINO backend")
        self.metadata = read_metadata(self.path)  # ONNX metadata or the IR's sidecar
        if self.path.suffix.lower() == ".xml":
            self._check_ir(ov)
        artifact = str(self.metadata.get("precision") or "fp32")
        if precision is None:
            precision = "int8" if artifact == "int8" else "fp32"
        if precision not in OV_PRECISIONS:
            raise UserError(
                f"--precision {precision!r}: the OpenVINO backend runs {', '.join(OV_PRECISIONS)}"
            )
        if (precision == "int8") != (artifact == "int8"):
            raise UserError(
                f"{self.path}: an {artifact.upper()} graph cannot run as {precision}: INT8 runs the "
                "Q/DQ graph export wrote (model.int8.onnx or its IR), FP32/BF16 the float graph"
            )
        device = (device or "CPU").upper()
        core = ov.Core()
        if device not in core.available_devices and device not in ("AUTO", "HETERO", "MULTI"):
            raise UserError(
                f"--device {device}: not an OpenVINO device here "
                f"(available: {', '.join(core.available_devices) or 'none'})"
            )
        if precision == "bf16" and not supports_bf16(core, device):
            name = _device_name(core, device)
            raise UserError(
                f"--precision bf16: {device} ({name}) has no BF16 compute (AMX or AVX-512-BF16); "
                "use fp32, or int8 with the Q/DQ graph"
            )
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one camera, batch 1: latency, not throughput
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(self.path))
            self._compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:  # OpenVINO reports every load failure as RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"{self.path}: OpenVINO {ov.__version__} cannot load it ({first})"
            ) from exc
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        got = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        want = _HINT[precision]
        if device == "CPU" and got != want:
            raise UserError(
                f"{self.path}: asked OpenVINO for {precision} ({want}), it compiled {got}; "
                "refusing a silent change of precision"
            )
        self.precision = precision
        self._check_io()
        self._request = self._compiled.create_infer_request()
        weights = (self.metadata.get("openvino") or {}).get("weights")
        stored = f", {weights} weights" if weights and weights != precision else ""
        self.device = f"OpenVINO {ov.__version__.split('-')[0]} {device} {precision}{stored}"

    def _check_ir(self, ov: Any) -> None:
        """An IR needs its .bin and a contract from an OpenVINO this one can read."""
        if not self.path.with_suffix(".bin").is_file():
            raise UserError(
                f"{self.path}: the IR's weights {self.path.with_suffix('.bin').name} are missing "
                "(copy the .xml, .bin and .xml.json together)"
            )
        made = (self.metadata.get("openvino") or {}).get("version")
        if made and _version_tuple(made) > _version_tuple(ov.__version__):
            raise UserError(
                f"{self.path}: written by OpenVINO {made}, this is {ov.__version__}; upgrade "
                "OpenVINO or export the IR again with this one (fundus-edge export --format openvino)"
            )

    def _check_io(self) -> None:
        inputs = self._compiled.inputs
        names = [sorted(i.get_names()) for i in inputs]
        if len(inputs) != 1 or INPUT_NAME not in names[0]:
            raise UserError(f"{self.path}: expected one input '{INPUT_NAME}', model has {names}")
        shape = inputs[0].get_partial_shape()
        s = self.input_size
        dims = [d.get_length() if d.is_static else None for d in shape]
        if len(dims) != 4 or dims[1:] not in ([s, s, 3], [None, None, None]):
            raise UserError(
                f"{self.path}: input '{INPUT_NAME}' has shape {dims}, metadata input_size {s} "
                f"needs [N, {s}, {s}, 3]"
            )
        # An output tensor can carry several names (the graph's and an internal one): take
        # the contract's, or OpenVINO's pick where the contract has none.
        from fundus_edge.artifact import CONTRACT_OUTPUTS

        self._outputs = []
        for out in self._compiled.outputs:
            names = out.get_names()
            ours = [n for n in CONTRACT_OUTPUTS if n in names]
            self._outputs.append(ours[0] if ours else out.get_any_name())
        self._check_outputs(self._outputs)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self._request.infer({INPUT_NAME: batch})
        return {
            name: np.array(result[out], dtype=np.float32, copy=True)
            for name, out in zip(self._outputs, self._compiled.outputs, strict=True)
        }

    def close(self) -> None:
        self._request = None
        self._compiled = None


def _device_name(core: Any, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        return "unknown"
