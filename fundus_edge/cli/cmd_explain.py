"""``fundus-edge explain``: class maps per label and method, as overlays, arrays and a grid."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


@app.command()
def explain(
    model: Path = typer.Argument(
        ..., help="A checkpoint (.safetensors/.pt: every method) or an exported model (kernel)."
    ),
    source: str = typer.Argument(
        ..., help="An image or DICOM file, a folder (subfolders too) or a glob ('imgs/*.png')."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created)."),
    labels: str = typer.Option(
        "positive",
        "--labels",
        help="all | positive (the positive findings; with none, the most probable) | DR,MH,...",
    ),
    method: str = typer.Option(
        "kernel",
        "--method",
        help="Comma-separated: kernel (the model's own maps) and, from a checkpoint with the "
        "train extra, gradcam, gradcam++, layercam, eigencam, scorecam.",
    ),
    per_member: bool = typer.Option(
        False, "--per-member", help="Each member's map too (at its own grid from a checkpoint)."
    ),
    device: str | None = typer.Option(None, "--device", help="PyTorch device for checkpoints."),
    alpha: float = typer.Option(0.5, "--alpha", help="Overlay opacity at the map's peak."),
) -> None:
    """Write class maps: a PNG overlay on the original frame and an NPY array per (label,
    method[, member]), a grid PNG per image and index.csv."""
    from fundus_edge.explain import explain as run_explain

    summary = run_explain(
        model,
        source,
        out,
        labels=labels,
        methods=method,
        per_member=per_member,
        device=device,
        alpha=alpha,
    )
    for note in summary["notes"]:
        typer.echo(f"note: {note}", err=True)
    for item in summary["skipped"]:
        typer.echo(f"skipped {item}", err=True)
    typer.echo(
        f"wrote {summary['maps']} maps for {summary['images']} image(s) "
        f"({', '.join(summary['methods'])}) to {summary['out']}; index: {summary['index']}"
    )
