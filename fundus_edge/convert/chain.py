"""``export_model``: plan the chain of steps for an :class:`ExportConfig`, run it, report.

The plan is a list of :class:`PlannedStep` (a step and the artifact it consumes)::

    source  ──> onnx_fp32 ─┬─> onnx_fp16 ─────────────┐
    (checkpoint             ├─> onnx_int8_qdq ──> engine (fp16/fp32 engines read onnx_fp32)
     or FP32 .onnx)         └──────────────────────> triton (engine, or the deployed ONNX)

so that a checkpoint on the workstation and an exported ``model.onnx`` on the device run
the same steps after the first. Every optional module the plan needs is checked before any
work (exit 3 naming the extra); the report folds each step's checks, artifacts and timings.

Everything is built in a staging folder inside ``--out`` and moved into place at the end,
the report last (:mod:`fundus_edge.convert.staging`): an interrupted or failed export leaves
``--out`` as it was.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fundus_edge.convert.export_config import ExportConfig
from fundus_edge.convert.staging import (
    REPORT,
    commit,
    mark_stage,
    prepare_out,
    sigterm_as_interrupt,
)
from fundus_edge.convert.steps import (
    Artifact,
    CheckpointToOnnx,
    EngineUnavailable,
    OnnxToEngine,
    OnnxToFp16,
    OnnxToInt8,
    ReadOnnx,
    Step,
    StepContext,
    read_export_source,
    tensorrt_available,
)
from fundus_edge.errors import UserError, require_all
from fundus_edge.fileio import atomic_write_json, sha256_file
from fundus_edge.log import get_logger

__all__ = ["CHECKPOINT_SUFFIXES", "PlannedStep", "export_model", "plan", "source_kind"]

log = get_logger("convert")

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class PlannedStep:
    """A step and the role of the artifact it consumes (``source``, ``onnx_fp32``, ...)."""

    step: Step
    input: str


def source_kind(path: Path) -> str:
    """``checkpoint`` or ``onnx``, by suffix; anything else is a one-line error."""
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".engine", ".plan"):
        raise UserError(
            f"--model {path}: a TensorRT engine is the end of the chain; export starts from a "
            "checkpoint or the FP32 model.onnx that export wrote"
        )
    raise UserError(
        f"--model {path}: expected a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or an "
        "FP32 .onnx written by export"
    )


def _int8_target(cfg: ExportConfig) -> str:
    if cfg.int8_target != "auto":
        return cfg.int8_target
    wants_trt = cfg.format == "engine" or (
        cfg.format == "triton" and cfg.triton_backend == "engine"
    )
    return "tensorrt" if wants_trt else "cpu"


def plan(cfg: ExportConfig, kind: str) -> list[PlannedStep]:
    """The steps ``cfg`` asks for, in order, starting from a ``checkpoint`` or an ``onnx``."""
    from fundus_edge.convert.steps import ToTriton

    first: Step = (
        CheckpointToOnnx(cfg.name, cfg.opset, cfg.simplify, gradcam=cfg.verify)
        if kind == "checkpoint"
        else ReadOnnx(cfg.name)
    )
    steps = [PlannedStep(first, "source")]
    wants_engine = cfg.format == "engine" or (
        cfg.format == "triton" and cfg.triton_backend == "engine"
    )
    deploy = "onnx_fp32"
    # An FP16 engine is built from the FP32 graph with the builder's FP16 flag; the FP16
    # ONNX is for runtimes without TensorRT (and for engines where TensorRT is missing). An
    # OpenVINO IR from the FP32 graph stores FP16 weights itself.
    if (
        cfg.precision == "fp16"
        and not (wants_engine and tensorrt_available())
        and cfg.format != "openvino"
    ):
        steps.append(PlannedStep(OnnxToFp16(cfg.name), "onnx_fp32"))
        deploy = "onnx_fp16"
    if cfg.precision == "int8":
        step = OnnxToInt8(cfg.name, cfg.calib_method, _int8_target(cfg), cfg.calib_count)
        steps.append(PlannedStep(step, "onnx_fp32"))
        deploy = "onnx_int8_qdq"
    if wants_engine:
        engine_src = "onnx_int8_qdq" if cfg.precision == "int8" else "onnx_fp32"
        steps.append(
            PlannedStep(
                OnnxToEngine(cfg.precision, cfg.workspace_mb, cfg.batch, cfg.rebuild), engine_src
            )
        )
        deploy = "engine"
    if cfg.format == "openvino":
        from fundus_edge.convert.steps import OnnxToOpenVino

        source = "onnx_int8_qdq" if cfg.precision == "int8" else "onnx_fp32"
        steps.append(PlannedStep(OnnxToOpenVino(cfg.name), source))
        deploy = "openvino_ir"
    if cfg.format == "triton":
        triton = ToTriton(cfg.name, cfg.triton_max_batch, cfg.triton_instances, cfg.triton_kind)
        steps.append(PlannedStep(triton, "engine" if cfg.triton_backend == "engine" else deploy))
    return steps


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Export ``cfg.model`` (a checkpoint or an FP32 ``.onnx``) as ``cfg`` says.

    Returns:
        The report (also written as ``export_report.json`` in ``cfg.out``).

    Raises:
        UserError: bad inputs (before any work), a contract missing from an ONNX, a failed
            parity check or an unsupported operator, or ``format='engine'`` without
            TensorRT (after the ONNX and the report are in place).
        MissingDependencyError: a module the plan needs is missing (before any work).
    """
    source = Path(cfg.model)
    if not cfg.model or not source.is_file():
        raise UserError(f"--model {cfg.model or '(missing)'}: no such file")
    kind = source_kind(source)
    if cfg.precision == "int8" and not cfg.calib:
        if cfg.profile and "precision" in cfg.profile_keys:
            where = f"precision: int8 in --profile {cfg.profile}"
        else:
            where = "--int8"
        raise UserError(
            f"{where} needs --calib DIR: real preprocessed fundus images to calibrate on"
        )
    if cfg.calib and not Path(cfg.calib).exists():
        raise UserError(f"--calib {cfg.calib}: no such folder")
    steps = plan(cfg, kind)
    require_all([need for ps in steps for need in ps.step.needs()])
    # The device's starting point: a missing or damaged contract is one line, before any work.
    src_meta = read_export_source(source) if kind == "onnx" else {}
    out = Path(cfg.out)
    created = prepare_out(out)
    stage: Path | None = None
    committed = False
    # SIGTERM (a service manager, `timeout`) ends the export like Ctrl-C: cleaned up, exit 130.
    with sigterm_as_interrupt():
        try:
            stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
            mark_stage(stage)
            source_art = Artifact(f"{kind}_source", source, src_meta)
            report, error = _run(cfg, steps, source_art, stage, out)
            keep = {source.name} if source.parent.resolve() == out.resolve() else set()
            commit(stage, out, keep=keep)
            committed = True
        finally:
            # Also on KeyboardInterrupt: nothing half-built stays behind.
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            if not committed:
                for folder in created:  # deepest first; only the ones this call made, if empty
                    with contextlib.suppress(OSError):
                        folder.rmdir()
    if error is not None:
        raise error
    return report


def _source_record(src: Artifact, kind: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"kind": kind, "path": str(src.path), "sha256": sha256_file(src.path)}
    if kind == "onnx":
        # The workstation's report beside the graph holds the checks only it could run
        # (PyTorch parity, grad-cam): carry them, so the device's report loses nothing.
        beside = src.path.parent / REPORT
        try:
            import json

            old = json.loads(beside.read_text(encoding="utf-8"))
            fp32 = old["artifacts"]["onnx_fp32"]
            same = fp32.get("sha256") in (None, rec["sha256"]) and fp32["path"] == src.path.name
            if same:
                # What that report itself carried from further up (the workstation's checks
                # after several device exports), then its own: nothing is lost on the way.
                carried = (old.get("source") or {}).get("report") or {}
                checks = {**(carried.get("checks") or {}), **old.get("checks", {})}
                rec["report"] = {"file": str(beside), "checks": checks}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return rec


def _run(
    cfg: ExportConfig, steps: list[PlannedStep], source: Artifact, stage: Path, final: Path
) -> tuple[dict[str, Any], UserError | None]:
    """Run the steps into ``stage``; write the report there. Returns it and the error to raise
    once everything is in place (TensorRT missing, a failed parity check)."""
    kind = source.role.removesuffix("_source")
    report: dict[str, Any] = {
        "config": cfg.to_dict(),
        "source": _source_record(source, kind),
        "steps": [],
        "artifacts": {},
        "checks": {},
        "passed": True,
    }
    if kind == "checkpoint":
        report["checkpoint"] = str(source.path)
    ctx = StepContext(
        out=stage, final=final, verify=cfg.verify, verify_images=cfg.verify_images, calib=cfg.calib
    )
    have: dict[str, Artifact] = {"source": source}
    error: UserError | None = None
    deploy: Artifact | None = None
    for ps in steps:
        t0 = time.perf_counter()
        try:
            res = ps.step.run(have[ps.input], ctx)
        except EngineUnavailable as exc:
            error = exc
            report["steps"].append({"step": ps.step.name, "input": ps.input, "skipped": str(exc)})
            break
        have[res.artifact.role] = res.artifact
        if res.artifact.role == "onnx_fp32":
            ctx.fp32 = res.artifact  # the reference of the later steps' checks
        if res.artifact.role != "triton":
            deploy = res.artifact
        report["artifacts"][res.artifact.role] = res.artifact.record(stage)
        report["checks"].update(res.checks)
        report.update(res.record)
        report["steps"].append(
            {
                "step": ps.step.name,
                "input": ps.input,
                "output": res.artifact.role,
                "seconds": round(time.perf_counter() - t0, 2),
                "checks": sorted(res.checks),
            }
        )
    failed = [k for k, v in report["checks"].items() if v.get("passed") is False]
    report["passed"] = not failed
    if deploy is not None:
        report["deploy"] = deploy.path.name
    atomic_write_json(stage / REPORT, report)
    if error is None and failed:
        error = UserError(f"{final / REPORT}: parity check(s) failed: {', '.join(failed)}")
    return report, error
