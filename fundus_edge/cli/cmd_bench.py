"""``fundus-edge bench``: latency, throughput, parity and memory of a model on every backend."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


def _split(text: str, option: str) -> tuple[str, ...]:
    from fundus_edge.errors import UserError

    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise UserError(f"{option}: give a comma-separated list, got {text!r}")
    return items


@app.command()
def bench(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model: .onnx, .engine/.plan or checkpoint (.safetensors)."
    ),
    backends: str = typer.Option(
        "onnxruntime,openvino,tensorrt,torch",
        "--backend",
        "-b",
        help="Comma list of onnxruntime, openvino, tensorrt, torch, or auto (every runtime here "
        "plus what run --backend auto picks). Rows that cannot run here are skipped with the "
        "reason.",
    ),
    precisions: str = typer.Option(
        "fp32,fp16,bf16,int8",
        "--precision",
        "-p",
        help="Comma list of fp32, fp16, bf16 (OpenVINO, where the CPU has it), int8; files other "
        "than the model's are derived from its FP32 graph by the export steps.",
    ),
    batches: str = typer.Option("1", "--batch", help="Comma list of batch sizes."),
    warmup_iters: int | None = typer.Option(
        None, "--warmup-iters", help="Untimed calls before each row [3]."
    ),
    warmup_s: float | None = typer.Option(
        None, "--warmup-s", help="Or: seconds of untimed calls before each row."
    ),
    iters: int | None = typer.Option(None, "--iters", help="Timed calls per row."),
    duration: float | None = typer.Option(
        None, "--duration", help="Or: seconds of timed calls per row [3]."
    ),
    calib: Path | None = typer.Option(
        None,
        "--calib",
        help="Fundus images for INT8 calibration and parity [generated synthetic images].",
    ),
    calib_count: int = typer.Option(16, "--calib-count", help="INT8 calibration images."),
    calib_method: str = typer.Option(
        "percentile", "--calib-method", help="percentile | minmax | entropy."
    ),
    parity_images: int = typer.Option(4, "--parity-images", help="Images for parity checks."),
    pipeline: bool = typer.Option(
        True, "--pipeline/--no-pipeline", help="End-to-end rows: decode ... render, per stage."
    ),
    frames: int = typer.Option(20, "--frames", help="Frames per end-to-end row."),
    provider: str | None = typer.Option(
        None, "--provider", help="ONNX Runtime provider: cpu, cuda, tensorrt."
    ),
    threads: int = typer.Option(
        0, "--threads", help="ONNX Runtime / OpenVINO inference threads (0: their own default)."
    ),
    device: str | None = typer.Option(None, "--device", help="PyTorch device for checkpoints."),
    roofline: bool = typer.Option(
        True, "--roofline/--no-roofline", help="Jetson roofline projection (an estimate)."
    ),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Keep derived FP16/INT8 models here [a temporary folder]."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for result.json, report.md and PNG plots."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the result JSON here."),
    md_path: Path | None = typer.Option(None, "--md", help="Write the Markdown report here."),
    plots: bool = typer.Option(
        True,
        "--plots/--no-plots",
        help="PNG plots in --out (needs matplotlib: the plots extra).",
    ),
) -> None:
    """Measure a model per backend x precision x batch: latency percentiles, FPS, parity with FP32,
    end-to-end stage times, memory and the device record (Ultralytics/trtexec-style tables).

    Columns: see bench/README.md. The side-by-side suite (the fused graph against its
    alternatives) is a repository tool: python bench/run_suite.py.
    """
    from fundus_edge.errors import UserError, require
    from fundus_edge.fileio import ensure_writable_dir, ensure_writable_file

    if model is None:
        raise UserError(
            "--model is required (the side-by-side suite runs from a source checkout: "
            "python bench/run_suite.py)"
        )
    # Where the results go, and what writes them, are tried before measuring.
    if out is not None:
        if plots:  # before --out is created: a refused run leaves nothing behind
            require("matplotlib", purpose="the PNG plots in --out (or pass --no-plots)")
        ensure_writable_dir(out, "--out")
    for option, path in (("--json", json_path), ("--md", md_path)):
        if path is not None:
            ensure_writable_file(path, option)

    from fundus_edge.perf.bench import BenchConfig, run_bench, write_outputs

    try:
        batch_sizes = tuple(int(b) for b in _split(batches, "--batch"))
    except ValueError:
        raise UserError(f"--batch {batches!r}: expected integers like 1,4,8") from None
    cfg = BenchConfig(
        model=str(model),
        backends=_split(backends, "--backend"),
        precisions=_split(precisions, "--precision"),
        batches=batch_sizes,
        warmup_iters=warmup_iters,
        warmup_s=warmup_s,
        iters=iters,
        duration_s=duration,
        calib=str(calib) if calib else None,
        calib_count=calib_count,
        calib_method=calib_method,
        parity_images=parity_images,
        pipeline=pipeline,
        pipeline_frames=frames,
        provider=provider,
        threads=threads,
        device=device,
        roofline=roofline,
        work_dir=str(work_dir) if work_dir else None,
    )
    result = run_bench(cfg)
    paths = write_outputs(result, out, json_path=json_path, md_path=md_path, plots=plots)
    _print_summary(result)
    for kind, p in paths.items():
        typer.echo(f"wrote {kind}: {p}")
    statuses = [r.status for r in result.rows]
    if "ok" not in statuses:
        # Nothing was measured: a script must not take this for success. Broken rows are
        # exit 1; rows that cannot run here (no TensorRT, no checkpoint) are the user's pick.
        typer.echo(
            f"fundus-edge: error: no row was measured ({statuses.count('failed')} failed, "
            f"{statuses.count('skipped')} skipped; reasons above)",
            err=True,
        )
        raise typer.Exit(1 if "failed" in statuses else 2)


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fundus-edge bench")
    for col in (
        "Format",
        "Precision",
        "Batch",
        "Status",
        "Size (MB)",
        "Agreement",
        "ms/img",
        "FPS",
    ):
        table.add_column(col, justify="left" if col in ("Format", "Status") else "right")
    for r in result.rows:
        st = r.stats
        status = r.status
        table.add_row(
            r.backend,
            r.precision,
            str(r.batch),
            status,
            "-" if r.size_mb is None else f"{r.size_mb:.1f}",
            "-" if not r.metric else f"{r.metric['value']:.3f}",
            "-" if st is None else f"{st.ms_per_image:.2f}",
            "-" if st is None else f"{st.throughput:.1f}",
        )
    console = Console(markup=False)  # paths and messages print as written ("[trt]")
    console.print(table)
    auto = result.config.get("auto") or {}
    if auto.get("chosen"):
        c = auto["chosen"]
        cached = " (cached)" if auto.get("cached") else ""
        console.print(
            f"--backend auto picks {c['backend']} {c['precision']} ({c['file']}), "
            f"{auto['median_ms']:.2f} ms batch 1{cached}"
        )
    elif auto.get("note"):
        console.print(f"--backend auto: {auto['note']}")
    for r in result.rows:
        if r.status != "ok" and r.error:
            console.print(f"{r.name}: {r.status}: {r.error}", highlight=False, soft_wrap=True)
