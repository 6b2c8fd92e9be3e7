"""``onnx_to_engine``: build a TensorRT engine from the fused ONNX, on the target device.

TensorRT engines are tied to the GPU architecture and the TensorRT version, so the engine is
built where it runs (a Jetson builds its own). The file name encodes precision, TensorRT
version and compute capability; the artifact contract lives in a sidecar JSON
(``<engine>.json``), never glued in front of the plan, so trtexec, Triton and DeepStream read
the plan unchanged. A persisted timing cache makes rebuilds fast.

Written against the TensorRT 10 Python API (``Builder`` -> ``create_network(0)`` ->
``OnnxParser`` -> ``BuilderConfig`` -> ``build_serialized_network``). TensorRT 11 drops
``BuilderFlag.FP16/INT8``: there the precision comes from the ONNX itself (an FP16 or Q/DQ
graph in a strongly typed network), which this code selects when the flags are absent.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError, require
from fundus_edge.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from fundus_edge.log import get_logger

__all__ = [
    "FP32_LAYER_PATTERNS",
    "engine_path_for",
    "engine_staleness",
    "gpu_compute_capability",
    "onnx_to_engine",
    "read_sidecar",
]

log = get_logger("convert.tensorrt")

# Layers kept in FP32 in reduced-precision engines: the class maps, the attention map and the
# final sigmoid. Their value ranges (un-normalised CAM sums, min-max divisions) are where FP16
# loses accuracy; they cost little.
FP32_LAYER_PATTERNS = (r"cam", r"attention", r"[Ss]igmoid", r"ReduceM(ax|in)", r"/Div")

TRT_INSTALL_HINT = (
    "TensorRT is not installed here: run the same command on the target device. "
    "On Jetson TensorRT comes with JetPack (sudo apt install nvidia-jetpack; then create the venv "
    "with --system-site-packages), not from pip; on x86_64: pip install 'fundus-edge[trt]'"
)


def gpu_compute_capability() -> str | None:
    """``"8.7"``-style compute capability of GPU 0, through cuda-python, pycuda or nvidia-smi."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return f"{props.major}.{props.minor}"
    try:
        import pycuda.driver as drv

        drv.init()
        major, minor = drv.Device(0).compute_capability()
        return f"{major}.{minor}"
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.split()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def engine_path_for(
    onnx_path: str | Path, precision: str, trt_version: str, capability: str | None
) -> Path:
    """``model.fp16.trt10.3.0.sm87.engine`` beside the ONNX."""
    onnx_path = Path(onnx_path)
    sm = f"sm{capability.replace('.', '')}" if capability else "smNA"
    ver = ".".join(trt_version.split(".")[:3])
    return onnx_path.with_name(f"{onnx_path.stem}.{precision}.trt{ver}.{sm}.engine")


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    side = Path(str(engine) + ".json")
    if not side.is_file():
        raise UserError(
            f"{engine}: sidecar metadata {side.name} is missing (rebuild with fundus-edge export)"
        )
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{side}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def engine_staleness(
    engine: str | Path, trt_version: str, capability: str | None, onnx_sha256: str | None = None
) -> list[str]:
    """Why an existing engine cannot be used here (empty when it can)."""
    try:
        side = read_sidecar(engine)
    except UserError as exc:
        return [str(exc)]
    built = side.get("tensorrt", {})
    reasons = []
    if built.get("version") != trt_version:
        reasons.append(f"built with TensorRT {built.get('version')}, this is {trt_version}")
    if capability and built.get("compute_capability") != capability:
        reasons.append(
            f"built for compute capability {built.get('compute_capability')}, this GPU is {capability}"
        )
    if onnx_sha256 and built.get("onnx_sha256") != onnx_sha256:
        reasons.append("the ONNX changed since the engine was built")
    return reasons


def _mark_fp32_layers(network, trt) -> int:
    """Pin numerically sensitive layers to FP32; returns how many were pinned."""
    pats = [re.compile(p) for p in FP32_LAYER_PATTERNS]
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(p.search(layer.name) for p in pats):
            try:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(j, trt.float32)
                pinned += 1
            except (AttributeError, RuntimeError, TypeError):  # shape/int layers have no precision
                continue
    return pinned


def onnx_to_engine(
    onnx_path: str | Path,
    engine_path: str | Path | None = None,
    precision: str = "fp16",
    workspace_mb: int = 1024,
    batch: tuple[int, int, int] = (1, 1, 4),
    timing_cache: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    rebuild: str = "stale",
) -> Path:
    """Build (or reuse) a TensorRT engine for ``onnx_path``.

    Args:
        onnx_path: the fused ONNX (FP32 for fp32/fp16 engines, the Q/DQ ONNX for int8).
        engine_path: output file; default :func:`engine_path_for` beside the ONNX.
        precision: ``fp32``, ``fp16`` or ``int8`` (int8 expects a Q/DQ graph).
        workspace_mb: builder workspace pool limit; small boards (Orin Nano) need 256-512.
        batch: optimisation profile (min, opt, max) for the dynamic batch dimension.
        timing_cache: file to load and update; default ``<onnx dir>/tensorrt.timing.cache``.
        meta: the artifact contract, written to the sidecar JSON with build facts added.
        rebuild: ``stale`` (reuse a matching engine, rebuild a stale one), ``always`` or
            ``never`` (refuse a stale engine with a clear message).

    Returns:
        The engine path.
    """
    trt = require("tensorrt", purpose="building TensorRT engines")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: no such ONNX file")
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"--precision {precision!r}: choose fp32, fp16 or int8")
    capability = gpu_compute_capability()
    engine_path = (
        Path(engine_path)
        if engine_path
        else engine_path_for(onnx_path, precision, trt.__version__, capability)
    )
    onnx_sha = sha256_file(onnx_path)
    if engine_path.exists() and rebuild != "always":
        reasons = engine_staleness(engine_path, trt.__version__, capability, onnx_sha)
        if not reasons:
            log.info("engine %s is up to date", engine_path.name)
            return engine_path
        if rebuild == "never":
            raise UserError(f"{engine_path}: stale engine: {'; '.join(reasons)}")
        log.warning("rebuilding %s: %s", engine_path.name, "; ".join(reasons))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    has_flags = hasattr(trt.BuilderFlag, "FP16")
    # TensorRT 11 has only strongly typed networks; 10 defaults to weakly typed + flags.
    net_flags = 0 if has_flags else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(
            f"{onnx_path}: TensorRT could not parse the ONNX: {errs[0] if errs else 'unknown error'}"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    pinned = 0
    if has_flags and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from Q/DQ
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _mark_fp32_layers(network, trt)

    inp = network.get_input(0)
    _, h, w, ch = inp.shape
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise UserError(f"--batch {lo},{opt},{hi}: need 1 <= min <= opt <= max")
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (lo, h, w, ch), (opt, h, w, ch), (hi, h, w, ch))
    config.add_optimization_profile(profile)

    cache_path = (
        Path(timing_cache) if timing_cache else onnx_path.with_name("tensorrt.timing.cache")
    )
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.info(
        "building %s engine from %s (this takes minutes on a Jetson)", precision, onnx_path.name
    )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(
            f"{onnx_path}: TensorRT engine build failed; on small boards raise --workspace "
            f"(now {workspace_mb} MB) or lower the max batch (now {hi})"
        )
    atomic_write_bytes(engine_path, bytes(plan))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    side = dict(meta or {})
    side["precision"] = precision
    side["tensorrt"] = {
        "version": trt.__version__,
        "compute_capability": capability,
        "onnx_sha256": onnx_sha,
        "onnx": onnx_path.name,
        "batch_profile": [lo, opt, hi],
        "workspace_mb": workspace_mb,
        "fp32_pinned_layers": pinned,
    }
    atomic_write_json(Path(str(engine_path) + ".json"), side)
    log.info("wrote %s (%.1f MB)", engine_path, engine_path.stat().st_size / 1e6)
    return engine_path
