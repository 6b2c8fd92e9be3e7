"""``fundus-edge export``: checkpoint or FP32 ONNX -> fused ONNX (FP16 / INT8) -> engine / Triton."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


@app.command()
def export(
    model: Path = typer.Option(
        ...,
        "--model",
        "-m",
        help="Checkpoint (.safetensors) written by train, or the FP32 model.onnx written by "
        "export (on the device: no PyTorch needed).",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder [default: exports/<model file stem>]."
    ),
    fmt: str | None = typer.Option(
        None,
        "--format",
        "-f",
        help="onnx | engine | triton | openvino (IR) [default: engine where TensorRT imports, "
        "else onnx].",
    ),
    fp16: bool = typer.Option(
        False, "--fp16", help="FP16 engine (TensorRT) or FP16 ONNX with float32 I/O."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="INT8 through static Q/DQ quantisation (needs --calib)."
    ),
    calib: Path | None = typer.Option(
        None, "--calib", help="Fundus images or a dataset for calibration and checks."
    ),
    calib_count: int | None = typer.Option(
        None, "--calib-count", help="Images used for INT8 calibration [64]."
    ),
    calib_method: str | None = typer.Option(
        None, "--calib-method", help="percentile | minmax | entropy."
    ),
    int8_target: str | None = typer.Option(
        None,
        "--int8-target",
        help="auto | tensorrt (symmetric s8 Q/DQ) | cpu (u8s8 for ONNX Runtime) [auto: by --format].",
    ),
    profile: str | None = typer.Option(
        None,
        "--profile",
        "-p",
        help="An export profile: a YAML file or a name in export/ (e.g. jetson-orin-nano-fp16).",
    ),
    verify: bool | None = typer.Option(
        None, "--verify/--no-verify", help="Parity checks (default on)."
    ),
    workspace: int | None = typer.Option(
        None, "--workspace", help="TensorRT workspace in MB [1024]."
    ),
    batch: str | None = typer.Option(
        None, "--batch", help="TensorRT batch profile min,opt,max [1,1,4]."
    ),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset [17]."),
    simplify: bool | None = typer.Option(
        None, "--simplify/--no-simplify", help="Try onnxslim / ORT basic."
    ),
    rebuild: str | None = typer.Option(
        None, "--rebuild", help="Existing engine: stale | always | never."
    ),
    triton_backend: str | None = typer.Option(
        None, "--triton-backend", help="Triton: onnx | engine."
    ),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Triton max_batch_size [8]."),
    name: str | None = typer.Option(
        None,
        "--name",
        help="Artifact / Triton model name [model; from an ONNX: its file stem].",
    ),
    thresholds: Path | None = typer.Option(
        None,
        "--thresholds",
        help='Re-stamp an exported .onnx (no re-export): {"thresholds": {label: t}} or '
        '{"policy": "sens@0.90", "data": DIR}.',
    ),
    threshold_policy: str | None = typer.Option(
        None,
        "--threshold-policy",
        help="Re-stamp an exported .onnx with thresholds tuned on --data's validation split: "
        "f1 | youden | sens@0.90 | spec@0.95.",
    ),
    calibrate: bool = typer.Option(
        False,
        "--calibrate",
        help="Re-stamp an exported .onnx with a temperature per label fitted on --data's "
        "validation split.",
    ),
    data: Path | None = typer.Option(
        None, "--data", "-d", help="Dataset for --threshold-policy / --calibrate."
    ),
    reason: str | None = typer.Option(
        None, "--reason", help="Why the thresholds change (required to re-stamp; recorded)."
    ),
    logger: str = typer.Option(
        "none",
        "--logger",
        help="Log export_report.json into the tracked training run the checkpoint came from "
        "(its tracking.json): none | tensorboard | mlflow.",
    ),
) -> None:
    """Fuse both backbones, their CAM kernels and the enhancement into one ONNX graph; verify parity.

    From a checkpoint (workstation, needs the train extra) or from the FP32 model.onnx that
    export wrote (the device: the same chain from its second step, without PyTorch).
    Writes OUT/<name>.onnx (FP32), OUT/<name>.fp16.onnx or OUT/<name>.int8.onnx when asked,
    a TensorRT engine with a sidecar JSON (--format engine, on the device), a Triton
    repository (--format triton), an OpenVINO IR (--format openvino: <name>.xml + .bin +
    .xml.json), and OUT/export_report.json with every step's checks.
    All are built in a staging folder inside OUT and moved in at the end, the report last:
    a failed or interrupted export leaves OUT as it was.
    """
    from fundus_edge.convert.chain import export_model, source_kind
    from fundus_edge.convert.export_config import resolve_export
    from fundus_edge.convert.steps import tensorrt_available
    from fundus_edge.errors import UserError
    from fundus_edge.tracking import RECORD_FILE, checkpoint_run, log_files

    if thresholds is not None or threshold_policy is not None or calibrate:
        if logger != "none":
            raise UserError("--logger logs an export's report into its run; drop it to re-stamp")
        _restamp(model, out, thresholds, threshold_policy, calibrate, data, reason, fp16, int8, fmt)
        return
    if fp16 and int8:
        raise UserError("--fp16 and --int8 exclude each other; pick one precision")
    tracked = checkpoint_run(model, logger)  # before any work: package, run, record
    given: dict = {
        "out": str(out) if out else None,
        "format": fmt,
        "calib": str(calib) if calib else None,
        "calib_count": calib_count,
        "calib_method": calib_method,
        "int8_target": int8_target,
        "verify": verify,
        "workspace_mb": workspace,
        "opset": opset,
        "simplify": simplify,
        "rebuild": rebuild,
        "triton_backend": triton_backend,
        "triton_max_batch": max_batch,
        "name": name,
    }
    if fp16 or int8:
        given["precision"] = "fp16" if fp16 else "int8"
    if batch:
        try:
            given["batch"] = tuple(int(b) for b in batch.split(","))
        except ValueError:
            raise UserError(f"--batch {batch!r}: expected three integers like 1,1,4") from None
    implied = {
        "out": str(Path("exports") / model.stem),
        "format": "engine" if tensorrt_available() else "onnx",
    }
    if source_kind(model) == "onnx":
        implied["name"] = model.stem
    cfg = resolve_export(model, profile, given, implied)
    report = export_model(cfg)
    _summary(report, Path(cfg.out))
    if tracked is not None:
        log_files(tracked, [Path(cfg.out) / "export_report.json"], model.parent / RECORD_FILE)
        typer.echo(f"export report logged to the {logger} run of {model.parent}")


def _restamp(model, out, thresholds, policy, calibrate, data, reason, fp16, int8, fmt) -> None:
    """The re-stamp path (:mod:`fundus_edge.convert.restamp`): metadata only, chain untouched."""
    from fundus_edge.convert.restamp import restamp_model
    from fundus_edge.errors import UserError
    from fundus_edge.operating import parse_policy

    if fp16 or int8 or fmt:
        raise UserError(
            "--thresholds / --threshold-policy / --calibrate re-stamp the .onnx as it is; "
            "drop --fp16, --int8 and --format (export first, then re-stamp)"
        )
    if policy is not None:
        parse_policy(policy)
    if out is None:
        raise UserError("--out DIR is required when re-stamping (the model is copied there)")
    res = restamp_model(
        model,
        out,
        reason=reason or "",
        thresholds_file=thresholds,
        policy=policy,
        data=data,
        calibrate=calibrate,
    )
    h = res["history"]
    typer.echo(f"re-stamped {res['path']} ({h['policy']}) by {h['user']} at {h['time']}")
    for name, new in h["new"].items():
        old = h["old"][name]
        typer.echo(f"  {name:<14} {old:.4f} -> {new:.4f}" + ("" if old != new else " (same)"))
    if h["temperature_new"] is not None and h["temperature_new"] != h["temperature_old"]:
        temps = ", ".join(f"{t:.3f}" for t in h["temperature_new"])
        typer.echo(f"  temperature per label: {temps}")


def _summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False)  # paths and messages print as written ("[trt]")
    t = Table(title=f"export -> {out}")
    t.add_column("check")
    t.add_column("result")
    t.add_column("figures")
    for name, rec in report["checks"].items():
        status = {True: "pass", False: "FAIL", None: "reported"}[rec.get("passed")]
        figs = []
        for key in ("probs_max_abs", "logits_max_abs", "max_abs", "min_correlation"):
            if rec.get(key) is not None:
                figs.append(f"{key}={rec[key]:.3g}")
        if "cams_correlation" in rec and rec["cams_correlation"].get("overall") is not None:
            figs.append(f"map corr={rec['cams_correlation']['overall']:.5f}")
        if isinstance(rec.get("auroc"), dict) and rec["auroc"].get("change") is not None:
            figs.append(f"AUROC change={rec['auroc']['change']:+.4f}")
        for prec, sub in (rec.get("precisions") or {}).items():
            if "skipped" in sub:
                figs.append(f"{prec}: skipped ({sub['skipped']})")
            else:
                corr = (sub.get("cams_correlation") or {}).get("overall")
                figs.append(
                    f"{prec}: probs_max_abs={sub['probs_max_abs']:.3g}"
                    + (f" map corr={corr:.5f}" if corr is not None else "")
                )
        if rec.get("problems"):
            figs.append("; ".join(rec["problems"]))
        elif "problems" in rec:
            figs.append(f"outputs match the contract on {rec['images']} images")
        t.add_row(name, status, ", ".join(figs))
    console.print(t)
    chain = " -> ".join(
        f"{s['step']} ({s['seconds']:.1f} s)" if "seconds" in s else f"{s['step']} (not run)"
        for s in report.get("steps", [])
    )
    console.print(f"chain: {chain}")
    carried = (report.get("source") or {}).get("report")
    if carried:
        console.print(
            f"source checks carried from {carried['file']}: {', '.join(carried['checks'])}"
        )
    for kind, art in report["artifacts"].items():
        size = f" ({art['size_mb']} MB)" if "size_mb" in art else ""
        console.print(f"{kind}: {out / art['path']}{size}")
    console.print(f"report: {out / 'export_report.json'}")
