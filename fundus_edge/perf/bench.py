"""``fundus-edge bench``: one model, every backend x precision x batch, measured and checked.

:func:`run_bench` returns a :class:`~fundus_edge.perf.report.BenchResult` (data first);
:func:`write_outputs` renders it (JSON, Markdown with the extra sections below, PNG plots).

What a run does, in order:

1. **Artifacts**, made by the export chain's own steps (:mod:`fundus_edge.convert.steps`),
   never by a copy of export logic. The model is an ``.onnx``, a TensorRT ``.engine``/``.plan``
   or a checkpoint (``.safetensors``/``.pt``, the ``train`` extra). A checkpoint goes through
   ``CheckpointToOnnx`` into the work folder. Precisions other than the file's are derived
   from the FP32 ONNX: FP16 by ``OnnxToFp16``, INT8 by ``OnnxToInt8`` calibrated on
   ``--calib`` images or, labelled as such in the result, on generated synthetic fundus
   images; TensorRT rows build engines with ``OnnxToEngine``. On an edge install (no
   PyTorch) an ``.onnx`` or an engine is benchmarked with the base dependencies alone.
2. **Model-only rows** per backend x precision x batch: warm-up, then timed ``infer`` calls
   (min/mean/median/p90/p95/p99/std, throughput). Every backend's ``infer`` returns host
   arrays (TensorRT synchronises its stream, PyTorch copies to the CPU), so each sample
   already ends after the device finished. Rows that cannot run here are ``skipped`` with the
   reason (TensorRT without TensorRT, FP16 on the PyTorch backend, ...).
3. **Parity** of every row against the FP32 reference on the same images: max |Δ| of
   ``probs`` and agreement of positive labels (per label and whole positive sets).
4. **End-to-end rows** (batch 1): decode (JPEG) -> preprocess (+ quality gate) -> infer ->
   postprocess -> render, per stage, like jetson-inference's timing report.
5. **Memory** (process RSS sampled during each row; torch CUDA peaks where present), Jetson
   **power and temperature** from ``tegrastats`` during each row, the **device record**, and a
   **roofline projection** for Jetson modules from the FP32 graph, labelled as an estimate.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.convert.calibration import SYNTHETIC_NOTE, load_images, synthetic_frames
from fundus_edge.convert.steps import (
    Artifact,
    CheckpointToOnnx,
    OnnxToEngine,
    OnnxToFp16,
    OnnxToInt8,
    StepContext,
)
from fundus_edge.errors import UserError, require_all
from fundus_edge.fileio import atomic_write_json, atomic_write_text
from fundus_edge.log import get_logger
from fundus_edge.perf.device import RssSampler, device_record, memory_record, start_tegrastats
from fundus_edge.perf.report import BenchResult, BenchRow, render_markdown, write_report
from fundus_edge.perf.stats import LatencyStats
from fundus_edge.perf.timer import StageTimer, measure

__all__ = [
    "BACKEND_NAMES",
    "PRECISIONS",
    "SYNTHETIC_NOTE",
    "BenchConfig",
    "device_slug",
    "parity_record",
    "render_bench_markdown",
    "run_bench",
    "write_outputs",
]

log = get_logger("perf.bench")

BACKEND_NAMES = ("onnxruntime", "openvino", "tensorrt", "torch")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
E2E_STAGES = ("decode", "preprocess", "infer", "postprocess", "render")
# Parity tolerances on probs vs FP32 (same as the export checks); INT8 is reported, not gated.
PARITY_TOLERANCE: dict[str, float | None] = {
    "fp32": 1e-4,
    "fp16": 1e-2,
    "bf16": 5e-2,  # the OpenVINO export gate (convert.verify.TOLERANCES.bf16_probs)
    "int8": None,
}


@dataclass
class BenchConfig:
    """Options of ``fundus-edge bench``.

    Attributes:
        model: ``.onnx``, ``.engine``/``.plan`` or checkpoint (``.safetensors``/``.pt``).
        backends: any of ``onnxruntime``, ``openvino``, ``tensorrt``, ``torch``.
        precisions: any of ``fp32``, ``fp16``, ``bf16`` (OpenVINO), ``int8``.
        batches: batch sizes of the model-only rows.
        warmup_iters: untimed calls before timing (default 3 unless ``warmup_s``).
        warmup_s: alternatively, seconds of untimed calls.
        iters: timed calls per row.
        duration_s: alternatively, seconds of timed calls per row (default 3 s).
        min_iters: least timed calls of a duration-based row.
        calib: folder of fundus images (or a dataset) for INT8 calibration and parity.
        calib_count: images used for INT8 calibration.
        calib_method: ``percentile``, ``minmax`` or ``entropy``.
        parity_images: images the parity checks run on.
        pipeline: measure the end-to-end rows.
        pipeline_frames: frames per end-to-end row.
        frame_size: side of the synthetic camera frames of the end-to-end rows.
        provider: ONNX Runtime execution provider (``cpu``, ``cuda``, ``tensorrt``).
        threads: ONNX Runtime intra-op threads (0 = its default).
        device: PyTorch device for checkpoints (default CUDA when available).
        roofline: add the Jetson roofline projection of the FP32 graph.
        work_dir: keep derived models here (default: a temporary folder, removed after).
        seed: seed of the synthetic images.
        auto: ``auto`` was among the backends: also run the ``--backend auto`` measurement
            (:mod:`fundus_edge.backends.auto`) on the model and record its choice.
    """

    model: str
    backends: tuple[str, ...] = BACKEND_NAMES
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = (1,)
    warmup_iters: int | None = None
    warmup_s: float | None = None
    iters: int | None = None
    duration_s: float | None = None
    min_iters: int = 10
    calib: str | None = None
    calib_count: int = 16
    calib_method: str = "percentile"
    parity_images: int = 4
    pipeline: bool = True
    pipeline_frames: int = 20
    frame_size: int = 512
    provider: str | None = None
    threads: int = 0
    device: str | None = None
    roofline: bool = True
    work_dir: str | None = None
    seed: int = 0
    auto: bool = False

    def __post_init__(self) -> None:
        if "auto" in self.backends:
            # Every runtime that can run here, plus the measured choice of --backend auto.
            self.auto = True
            rest = [b for b in self.backends if b != "auto"]
            self.backends = (*rest, "onnxruntime", "openvino", "tensorrt")
        self.backends = tuple(dict.fromkeys(self.backends))
        self.precisions = tuple(dict.fromkeys(self.precisions))
        self.batches = tuple(dict.fromkeys(int(b) for b in self.batches))
        for name, values, allowed in (
            ("--backend", self.backends, (*BACKEND_NAMES, "auto")),
            ("--precision", self.precisions, PRECISIONS),
        ):
            if not values:
                raise UserError(f"{name}: give at least one of {', '.join(allowed)}")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise UserError(f"{name} {bad[0]!r}: choose from {', '.join(allowed)}")
        if not self.batches or min(self.batches) < 1:
            raise UserError(f"--batch: sizes must be >= 1, got {list(self.batches)}")
        if self.warmup_iters is not None and self.warmup_s is not None:
            raise UserError("give either --warmup-iters or --warmup-s, not both")
        if self.iters is not None and self.duration_s is not None:
            raise UserError("give either --iters or --duration, not both")
        for name, v in (
            ("--iters", self.iters),
            ("--parity-images", self.parity_images),
            ("--calib-count", self.calib_count),
            ("--frames", self.pipeline_frames),
        ):
            if v is not None and v < 1:
                raise UserError(f"{name} must be >= 1, got {v}")
        for name, v, low in (
            ("--warmup-iters", self.warmup_iters, 0),
            ("--warmup-s", self.warmup_s, 0),
            ("--threads", self.threads, 0),
        ):
            if v is not None and v < low:
                raise UserError(f"{name} must be >= {low}, got {v}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise UserError(f"--duration must be > 0 seconds, got {self.duration_s}")
        from fundus_edge.convert.quantize import CALIB_METHODS

        if self.calib_method not in CALIB_METHODS:
            raise UserError(
                f"--calib-method {self.calib_method!r}: choose {', '.join(CALIB_METHODS)}"
            )
        if self.frame_size < 64:
            raise UserError(f"--frame-size must be >= 64, got {self.frame_size}")
        if self.calib is not None and not Path(self.calib).exists():
            raise UserError(f"--calib {self.calib}: no such folder")

    def timing(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~fundus_edge.perf.timer.measure`."""
        warm = {"warmup_s": self.warmup_s} if self.warmup_s is not None else {}
        if not warm:
            warm = {"warmup_iters": 3 if self.warmup_iters is None else self.warmup_iters}
        if self.iters is not None:
            return {**warm, "iters": self.iters}
        return {
            **warm,
            "duration_s": 3.0 if self.duration_s is None else self.duration_s,
            "min_iters": self.min_iters,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("backends", "precisions", "batches"):
            d[k] = list(d[k])
        return d


# ---------------------------------------------------------------------------- artifacts


def _batch_of(images: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` images cycled from ``images`` (N, S, S, 3)."""
    idx = np.arange(batch) % len(images)
    return np.ascontiguousarray(images[idx])


@dataclass
class _Artifacts:
    """What each precision runs from, per backend kind, or why it cannot."""

    kind: str  # "onnx", "engine" or "checkpoint"
    source: Path
    onnx: dict[str, Artifact] = field(default_factory=dict)
    onnx_skip: dict[str, str] = field(default_factory=dict)
    engine_precision: str | None = None
    input_size: int = 0
    preprocess: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)


def _model_kind(path: Path) -> str:
    from fundus_edge.backends import backend_for

    name = backend_for(path).name
    return {"onnxruntime": "onnx", "tensorrt": "engine", "torch": "checkpoint"}[name]


def _prepare(cfg: BenchConfig, work: Path) -> tuple[_Artifacts, np.ndarray, str, StepContext]:
    """Resolve/derive every precision's ONNX with the export chain's steps; return them with
    the parity/calibration images and the steps' context (engines are built later in it)."""
    from fundus_edge.artifact import read_metadata
    from fundus_edge.preprocess import PreprocessConfig

    src = Path(cfg.model)
    if src.is_dir():
        raise UserError(f"--model {src}: is a folder; give the model file")
    if not src.is_file():
        raise UserError(f"--model {src}: no such file")
    kind = _model_kind(src)
    art = _Artifacts(kind=kind, source=src)
    needs_onnx = "onnxruntime" in cfg.backends or "tensorrt" in cfg.backends
    if kind == "checkpoint":
        # Benchmarking a checkpoint is a workstation job: PyTorch, checked before any work.
        require_all(
            [("torch", "benchmarking a checkpoint (benchmark its exported .onnx on the edge)")]
            + (
                CheckpointToOnnx(gradcam=False).needs()
                if needs_onnx
                else [("safetensors", "reading checkpoints")]
            )
        )
        from fundus_edge.artifact import contract_from_checkpoint
        from fundus_edge.models import read_checkpoint_meta

        meta = contract_from_checkpoint(read_checkpoint_meta(src), str(src))
        file_precision = "fp32"
    else:
        meta = read_metadata(src)
        file_precision = str(meta.get("precision") or "fp32")
        if kind == "onnx":
            art.onnx[file_precision] = Artifact(f"onnx_{file_precision}", src, meta)
        else:
            art.engine_precision = file_precision
    art.input_size = int(meta["input_size"])
    art.preprocess = dict(meta["preprocess"])
    pre_cfg = PreprocessConfig.from_dict(art.preprocess)
    n_img = max(cfg.parity_images, cfg.calib_count if "int8" in cfg.precisions else 0)
    images = load_images(cfg.calib, pre_cfg, n_img, seed=cfg.seed)
    # The export chain's steps make every derived artifact: the same code as export.
    ctx = StepContext(out=work, verify=False, calib_set=images)
    if kind == "checkpoint" and needs_onnx:
        log.info("exporting %s to ONNX for the ONNX Runtime / TensorRT rows", src.name)
        art.onnx["fp32"] = (
            CheckpointToOnnx("model", simplify=False, gradcam=False)
            .run(Artifact("checkpoint", src), ctx)
            .artifact
        )
        art.derived["fp32"] = "exported from the checkpoint (export step torch_to_onnx)"

    fp32 = art.onnx.get("fp32")
    for p in cfg.precisions:
        if p in art.onnx:
            continue
        if p == "bf16":  # a compute precision of OpenVINO, not a file
            art.onnx_skip[p] = (
                "ONNX Runtime's CPU provider has no BF16 compute; BF16 runs on the openvino backend"
            )
            continue
        if fp32 is None:
            art.onnx_skip[p] = (
                f"cannot derive {p} from a {file_precision} {kind}; give the FP32 .onnx "
                "or the checkpoint"
            )
            continue
        try:
            if p == "fp16":
                art.onnx[p] = OnnxToFp16("model").run(fp32, ctx).artifact
                art.derived[p] = "export step onnx_to_fp16 of the FP32 ONNX"
            else:
                # One INT8 file serves every row: the TensorRT-ready symmetric Q/DQ when a
                # TensorRT row asks for it, else ONNX Runtime's faster u8s8 CPU variant.
                trt_rows = "tensorrt" in cfg.backends and _tensorrt_missing() is None
                step = OnnxToInt8(
                    "model", cfg.calib_method, "tensorrt" if trt_rows else "cpu", cfg.calib_count
                )
                res = step.run(fp32, ctx)
                art.onnx[p] = res.artifact
                art.derived[p] = {
                    "how": "export step onnx_to_int8 of the FP32 ONNX",
                    **res.record["quantization"],
                }
        except UserError as exc:
            art.onnx_skip[p] = f"deriving {p} failed: {exc}"
    return art, images.images[: cfg.parity_images], images.origin, ctx


# ---------------------------------------------------------------------------- rows


def parity_record(
    reference: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    thresholds: Sequence[float],
    *,
    reference_name: str,
    tolerance: float | None,
) -> dict[str, Any]:
    """Agreement of ``outputs`` with ``reference`` on the same images.

    Returns:
        ``max_abs_diff`` of probs, ``label_agreement`` (fraction of image x label decisions
        that agree at the model's thresholds), ``positive_sets_equal`` (fraction of images
        whose whole positive-label set agrees), the tolerance on probs and ``ok`` (None when
        the precision is reported, not gated).
    """
    ref = np.asarray(reference["probs"], dtype=np.float64)
    got = np.asarray(outputs["probs"], dtype=np.float64)
    if ref.shape != got.shape:
        raise UserError(f"parity: probs shape {got.shape} differs from the reference {ref.shape}")
    thr = np.asarray(thresholds, dtype=np.float64)[None, :]
    pos_ref, pos_got = ref >= thr, got >= thr  # (N, C)
    diff = float(np.abs(ref - got).max())
    return {
        "reference": reference_name,
        "images": int(ref.shape[0]),
        "max_abs_diff": diff,
        "mean_abs_diff": float(np.abs(ref - got).mean()),
        "label_agreement": float((pos_ref == pos_got).mean()),
        "positive_sets_equal": float((pos_ref == pos_got).all(axis=1).mean()),
        "tolerance": tolerance,
        "ok": None if tolerance is None else bool(diff <= tolerance),
    }


def _backend_label(backend: Any) -> str:
    """``onnxruntime-cpu``, ``onnxruntime-cuda``, ``openvino-cpu``, ``tensorrt``, ``torch-cpu``."""
    if backend.name == "openvino":
        return "openvino-" + str(backend.device).split()[2].lower()
    if backend.name == "onnxruntime":
        dev = backend.device.replace("ExecutionProvider", "").lower()
        return f"onnxruntime-{dev}"
    if backend.name == "torch":
        return f"torch-{str(backend.device).split(':')[0]}"
    return backend.name


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return (
            "TensorRT is not installed here; run the bench on the Jetson (TensorRT comes "
            "with JetPack) or on an x86 GPU with pip install 'fundus-edge[trt]'"
        )
    return None


class _Failure(str):
    """A reason that marks its rows ``failed`` (something broke), not ``skipped``."""


def _plan(cfg: BenchConfig, art: _Artifacts, ctx: StepContext) -> Iterator[tuple[str, str, Any]]:
    """(backend, precision, model path | skip reason) in run order: FP32 first."""
    order = sorted(cfg.precisions, key=PRECISIONS.index)
    for precision in order:
        for backend in cfg.backends:
            if backend == "onnxruntime":
                if art.kind == "engine":
                    yield backend, precision, "a TensorRT engine runs on TensorRT only"
                elif precision in art.onnx:
                    yield backend, precision, art.onnx[precision].path
                else:
                    yield backend, precision, art.onnx_skip[precision]
            elif backend == "tensorrt":
                if precision == "bf16":
                    yield backend, precision, "fundus-edge builds FP32, FP16 and INT8 engines"
                else:
                    yield backend, precision, _engine_for(art, precision, ctx)
            elif backend == "openvino":
                yield backend, precision, _openvino_for(art, precision)
            else:
                if art.kind != "checkpoint":
                    yield (
                        backend,
                        precision,
                        "the PyTorch backend needs a checkpoint (.safetensors)",
                    )
                elif precision != "fp32":
                    yield backend, precision, "the PyTorch backend runs checkpoints in FP32 only"
                else:
                    yield backend, precision, art.source


def _openvino_for(art: _Artifacts, precision: str) -> Path | str:
    """The ONNX an OpenVINO row runs (the FP32 graph for fp32/bf16, the Q/DQ one for int8)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed here (pip install 'fundus-edge[openvino]')"
    if art.kind != "onnx" and art.kind != "checkpoint":
        return "OpenVINO runs ONNX graphs and IRs, not TensorRT engines"
    if precision == "fp16":
        return "OpenVINO computes FP32, BF16 or INT8 (an IR stores FP16 weights: export --format openvino)"
    if precision == "bf16":
        from fundus_edge.backends.openvino import cpu_supports_bf16

        if not cpu_supports_bf16():
            return "this CPU has no BF16 compute (AMX or AVX-512-BF16)"
    src = art.onnx.get("int8" if precision == "int8" else "fp32")
    if src is None:
        return art.onnx_skip.get(precision, f"no ONNX to run {precision} from")
    return src.path


def _engine_for(art: _Artifacts, precision: str, ctx: StepContext) -> Path | str:
    if art.kind == "engine":
        if precision != art.engine_precision:
            return (
                f"the engine is {art.engine_precision}; build a {precision} engine from the ONNX "
                "with fundus-edge export"
            )
        return art.source
    missing = _tensorrt_missing()
    if missing:
        return missing
    src = art.onnx.get("int8" if precision == "int8" else "fp32")
    if src is None:
        return art.onnx_skip.get(precision, f"no ONNX to build a {precision} engine from")
    try:
        step = OnnxToEngine(precision, batch=(1, 1, 8), rebuild="always")
        return step.run(src, ctx).artifact.path
    except UserError as exc:  # the row reports it; other precisions and backends still run
        return _Failure(f"building the {precision} engine failed: {exc}")


@contextmanager
def _sampling() -> Iterator[dict[str, Any]]:
    """RSS (always) and tegrastats (on Jetson) during a block; their summaries after it."""
    rec: dict[str, Any] = {}
    rss = RssSampler()
    tegra = start_tegrastats()
    rss.start()
    try:
        yield rec
    finally:
        rss.stop()
        rec["memory"] = memory_record(rss)
        rec["power"] = tegra.stop() if tegra is not None else None


def _load(backend: str, precision: str, path: Path, cfg: BenchConfig) -> Any:
    from fundus_edge.backends import load_backend

    if backend == "onnxruntime":
        return load_backend(path, provider=cfg.provider, threads=cfg.threads or None)
    if backend == "torch":
        return load_backend(path, device=cfg.device)
    if backend == "openvino":
        return load_backend(
            path, backend="openvino", precision=precision, threads=cfg.threads or None
        )
    return load_backend(path)


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 2)


def _row_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def _e2e_row(
    label: str, precision: str, backend: Any, jpegs: list[bytes], cfg: BenchConfig
) -> BenchRow:
    """decode -> preprocess -> infer -> postprocess -> render over the frames, per stage."""
    import cv2

    from fundus_edge.runtime import Predictor
    from fundus_edge.runtime.render import render

    predictor = Predictor(backend, gate=False)

    def one(timer: StageTimer, data: bytes) -> None:
        with timer.stage("decode"):
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            frame = np.ascontiguousarray(bgr[:, :, ::-1])
        with timer.stage("preprocess"):
            prepared = predictor.prepare(frame)
        with timer.stage("infer"):
            (raw,) = predictor.infer([prepared])
        with timer.stage("postprocess"):
            pred = predictor.finish(prepared, raw)
        with timer.stage("render"):
            render(frame, pred)

    one(StageTimer(), jpegs[0])  # warm-up: first-call allocations are not the steady state
    timer = StageTimer()
    with _sampling() as sampled:
        for data in jpegs:
            one(timer, data)
    per_frame = np.sum([timer.samples_ms[s] for s in E2E_STAGES], axis=0)  # (frames,)
    return BenchRow(
        backend=f"{label} end-to-end",
        precision=precision,
        batch=1,
        name=f"e2e {label} {precision}",
        stats=LatencyStats.from_samples(per_frame),
        stages=timer.stats(),
        samples_ms=[float(v) for v in per_frame],
        memory=sampled["memory"],
        power=sampled["power"],
    )


def _skip(backend: str, precision: str, batch: int, why: str) -> BenchRow:
    return BenchRow(backend, precision, batch, status="skipped", error=why)


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Benchmark ``cfg.model`` on every requested backend x precision x batch.

    Returns:
        The result: model-only rows, end-to-end rows, parity, memory, device, roofline.

    Raises:
        UserError: a bad option or an unreadable model. A row that fails to load or run is
            recorded with status ``failed`` and its error, and the run goes on.
    """
    own_work = cfg.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="fe-bench-")) if own_work else Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(cfg: BenchConfig, work: Path) -> BenchResult:
    import cv2

    t_start = time.perf_counter()
    art, images, origin, ctx = _prepare(cfg, work)
    result = BenchResult(device=device_record())
    jpegs: list[bytes] = []
    if cfg.pipeline:
        for f in synthetic_frames(cfg.pipeline_frames, cfg.frame_size, cfg.seed + 1):
            ok, buf = cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:
                raise UserError("OpenCV cannot encode JPEG here (needed for the decode stage)")
            jpegs.append(buf.tobytes())
    reference: tuple[str, dict[str, np.ndarray]] | None = None
    for backend_name, precision, target in _plan(cfg, art, ctx):
        if isinstance(target, str):
            for b in cfg.batches:
                row = _skip(backend_name, precision, b, target)
                if isinstance(target, _Failure):
                    row.status = "failed"
                result.add(row)
            continue
        try:
            backend = _load(backend_name, precision, target, cfg)
        except Exception as exc:  # recorded as a failed row: one backend must not end the run
            log.warning("%s %s: %s", backend_name, precision, _row_error(exc))
            for b in cfg.batches:
                result.add(
                    BenchRow(backend_name, precision, b, status="failed", error=_row_error(exc))
                )
            continue
        label = _backend_label(backend)
        try:
            outputs = backend.infer(images)
            if reference is None and precision == "fp32":
                reference = (f"{label} fp32", outputs)
            parity = None
            if reference is not None:
                parity = parity_record(
                    reference[1],
                    outputs,
                    backend.metadata["thresholds"],
                    reference_name=reference[0],
                    tolerance=PARITY_TOLERANCE[precision],
                )
            metric = (
                {"name": "label agreement vs fp32", "value": parity["label_agreement"]}
                if parity
                else None
            )
            for b in cfg.batches:
                result.add(
                    _model_row(backend, label, precision, b, images, target, parity, metric, cfg)
                )
            if cfg.pipeline:
                result.add(_e2e_row(label, precision, backend, jpegs, cfg))
        except Exception as exc:  # as above: the row says what went wrong
            log.warning("%s %s: %s", label, precision, _row_error(exc))
            for b in cfg.batches:
                name = f"{label} {precision} b{b}"
                if name not in result.names():
                    result.add(
                        BenchRow(
                            label, precision, b, status="failed", name=name, error=_row_error(exc)
                        )
                    )
        finally:
            backend.close()

    result.config = {
        "bench": cfg.to_dict(),
        "model_kind": art.kind,
        "input_size": art.input_size,
        "derived": {k: v for k, v in art.derived.items()},
        "images": origin,
        "timing": "model-only rows: infer() on a host uint8 batch, outputs back on the host "
        "(GPU backends synchronise before the clock is read)",
        "load_average": _loadavg(),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    if cfg.auto:
        result.config["auto"] = _auto_choice(art)
    if cfg.roofline and "fp32" in art.onnx:
        result.roofline = _roofline(art.onnx["fp32"].path, art.input_size, result)
    return result


def _auto_choice(art: _Artifacts) -> dict[str, Any]:
    """What ``run --backend auto`` picks for this model here (the cached choice if current)."""
    from fundus_edge.backends.auto import choose

    if art.kind != "onnx" or art.source.suffix.lower() != ".onnx" or "fp32" not in art.onnx:
        return {"note": "--backend auto chooses for the FP32 model.onnx export wrote"}
    try:
        choice = choose(art.source)
    except UserError as exc:
        return {"note": str(exc)}
    return {**choice.record, "cached": choice.cached}


def _model_row(
    backend: Any,
    label: str,
    precision: str,
    batch: int,
    images: np.ndarray,
    path: Path,
    parity: dict[str, Any] | None,
    metric: dict[str, Any] | None,
    cfg: BenchConfig,
) -> BenchRow:
    x = _batch_of(images, batch)
    with _sampling() as sampled:
        m = measure(lambda: backend.infer(x), **cfg.timing())
    return BenchRow(
        backend=label,
        precision=precision,
        batch=batch,
        stats=m.stats(batch=batch),
        samples_ms=m.samples_ms,
        size_mb=_size_mb(path),
        parity=parity,
        metric=metric,
        memory=sampled["memory"],
        power=sampled["power"],
    )


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _roofline(onnx_path: Path, size: int, result: BenchResult) -> dict[str, Any]:
    from fundus_edge.perf.roofline import roofline

    rf = roofline(onnx_path, batch=1, input_size=size)
    rf["model"] = onnx_path.name
    if result.device.get("jetson"):
        # On a Jetson the estimate sits next to what was measured here.
        rf["measured"] = [
            {"row": r.name, "ms_per_image": r.stats.ms_per_image}
            for r in result.rows
            if r.stats is not None and r.batch == 1 and "end-to-end" not in r.backend
        ]
    return rf


# ---------------------------------------------------------------------------- rendering


def device_slug(device: dict[str, Any]) -> str:
    """A folder name for results: ``jetson-orin-nano...``, ``gpu-...`` or ``cpu-amd-epyc-2c``."""

    def slug(text: str) -> str:
        text = re.sub(r"\((r|tm)\)|cpu @.*|processor", "", text.lower())
        return re.sub(r"[^a-z0-9]+", "-", text).strip("-")

    jet = device.get("jetson") or {}
    if jet.get("module"):
        return "jetson-" + slug(str(jet["module"]).replace("NVIDIA", "").replace("Jetson", ""))
    gpus = device.get("gpus") or []
    if gpus and gpus[0].get("name"):
        return "gpu-" + slug(str(gpus[0]["name"]).replace("NVIDIA", ""))
    cpu = device.get("cpu") or {}
    model = slug(str(cpu.get("model") or cpu.get("machine") or "unknown"))
    return f"cpu-{model}-{cpu.get('cores') or '?'}c"


_KEY_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "neon",
)


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{nd}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return [*out, ""]


def render_bench_markdown(result: BenchResult, title: str = "fundus-edge benchmark") -> str:
    """:func:`~fundus_edge.perf.report.render_markdown` plus scenario targets, parity,
    memory, power and the device record."""
    out = [render_markdown(result, title=title), ""]
    targets = result.config.get("targets") or []
    if targets:
        out += ["## Scenario ratios vs targets (median, 95% bootstrap interval)", ""]
        out += _table(
            ["Scenario", "Ratio", "median", "95% CI", "target", "met"],
            [
                [
                    t["scenario"],
                    t["ratio"],
                    # A target that is not a speed-up (a FLOP ratio, a map difference, an
                    # estimated FPS, "not measured") carries its own text.
                    t.get("display") or f"{t['value']:.2f}x",
                    "-" if t.get("ci_low") is None else f"{t['ci_low']:.2f}-{t['ci_high']:.2f}",
                    t.get("target") or "-",
                    {True: "yes", False: "NO", None: "-"}[t.get("met")],
                ]
                for t in targets
            ],
        )
    notes = result.config.get("notes") or []
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    with_parity = [r for r in result.rows if r.parity]
    if with_parity:
        out += ["## Parity vs the FP32 reference", ""]
        out += _table(
            [
                "Row",
                "reference",
                "images",
                "max abs Δprobs",
                "label agreement",
                "same positives",
                "tol",
                "ok",
            ],
            [
                [
                    r.name,
                    p["reference"],
                    p["images"],
                    f"{p['max_abs_diff']:.3g}",
                    _f(p["label_agreement"]),
                    _f(p["positive_sets_equal"]),
                    "-" if p["tolerance"] is None else f"{p['tolerance']:g}",
                    {True: "yes", False: "NO", None: "reported"}[p["ok"]],
                ]
                for r in with_parity
                for p in [r.parity]
            ],
        )
    with_mem = [r for r in result.rows if r.memory]
    if with_mem:
        out += ["## Memory (process RSS; GPU where present)", ""]
        out += _table(
            ["Row", "RSS peak during row (MiB)", "process peak (MiB)", "GPU (MiB)"],
            [
                [
                    r.name,
                    _f(r.memory.get("rss_peak_mb"), 1),
                    _f(r.memory.get("vm_hwm_mb") or r.memory.get("ru_maxrss_mb"), 1),
                    _f((r.memory.get("gpu") or {}).get("torch_max_allocated_mb"), 1),
                ]
                for r in with_mem
            ],
        )
    with_power = [r for r in result.rows if r.power]
    if with_power:
        out += ["## Power and temperature (tegrastats, during each row)", ""]
        out += _table(
            ["Row", "mean power (W)", "max temp (C)", "GPU load (%)"],
            [
                [
                    r.name,
                    _f(r.power.get("mean_power_w"), 2),
                    _f(max((r.power.get("temp_max_c") or {}).values(), default=None), 1),
                    _f(r.power.get("gpu_load_mean_pct"), 1),
                ]
                for r in with_power
            ],
        )
    rf = result.roofline or {}
    if rf.get("measured"):
        out += ["## Measured here (next to the roofline estimate above)", ""]
        out += _table(
            ["Row", "measured ms/img"], [[m["row"], _f(m["ms_per_image"])] for m in rf["measured"]]
        )
    out += _device_section(result.device)
    return "\n".join(out)


def _device_section(dev: dict[str, Any]) -> list[str]:
    cpu = dev.get("cpu") or {}
    flags = set(cpu.get("flags") or [])
    lines = [
        "## Device",
        "",
        f"- CPU: {cpu.get('model')} ({cpu.get('machine')}), {cpu.get('cores')} cores, "
        f"{cpu.get('memory_gib')} GiB; flags: "
        + (", ".join(f for f in _KEY_FLAGS if f in flags) or "none of " + ", ".join(_KEY_FLAGS)),
    ]
    for g in dev.get("gpus") or []:
        lines.append(f"- GPU: {g.get('name')}, driver {g.get('driver')}, {g.get('memory')}")
    if dev.get("onnxruntime_providers"):
        lines.append(f"- ONNX Runtime providers: {', '.join(dev['onnxruntime_providers'])}")
    lines.append(f"- TensorRT: {dev.get('tensorrt') or 'not installed'}")
    jet = dev.get("jetson")
    if jet:
        lines.append(
            f"- Jetson: {jet.get('module')}, L4T {jet.get('l4t')}, JetPack {jet.get('jetpack')}, "
            f"power mode {jet.get('power_mode')}, clocks locked: {jet.get('clocks_locked')}"
        )
    pk = dev.get("packages") or {}
    lines.append(
        "- Python " + str(dev.get("python")) + "; " + ", ".join(f"{k} {v}" for k, v in pk.items())
    )
    return [*lines, ""]


def write_outputs(
    result: BenchResult,
    out_dir: str | os.PathLike | None = None,
    *,
    json_path: str | os.PathLike | None = None,
    md_path: str | os.PathLike | None = None,
    plots: bool = True,
    title: str = "fundus-edge benchmark",
    extra_plots: Callable[[BenchResult, Path], dict[str, Path]] | None = None,
) -> dict[str, Path]:
    """Write the result: a folder (JSON, Markdown, PNGs) and/or single JSON/Markdown files.

    Returns:
        The paths written, by kind.
    """
    paths: dict[str, Path] = {}
    markdown = render_bench_markdown(result, title=title) + "\n"
    if out_dir is not None:
        paths.update(write_report(result, out_dir, plots=plots))
        atomic_write_text(paths["markdown"], markdown)
        if plots and extra_plots is not None:
            paths.update(extra_plots(result, Path(out_dir)))
    if json_path is not None:
        atomic_write_json(json_path, result.to_dict())
        paths["json_file"] = Path(json_path)
    if md_path is not None:
        atomic_write_text(md_path, markdown)
        paths["markdown_file"] = Path(md_path)
    return paths
