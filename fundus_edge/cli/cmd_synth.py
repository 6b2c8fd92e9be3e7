"""``fundus-edge synth``: write a synthetic fundus data set in RFMiD's layout."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


@app.command()
def synth(
    out: Path = typer.Argument(
        ..., help="Output folder; created, and it must be empty unless --overwrite."
    ),
    n: int = typer.Option(200, "--n", help="Number of images over all splits."),
    size: int = typer.Option(512, "--size", help="Image side in pixels (>= 64)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed writes the same bytes."),
    prevalence_scale: float = typer.Option(
        1.0, "--prevalence-scale", help="Multiply every label's prevalence (0: healthy eyes only)."
    ),
    workers: int = typer.Option(
        1, "--workers", help="Processes to use; any count writes the same bytes."
    ),
    splits: str = typer.Option(
        "0.6,0.2,0.2", "--splits", help="Train,validation,test fractions (sum 1)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the split folders and synth.json of a non-empty OUT."
    ),
) -> None:
    """Generate synthetic fundus photographs with labels, lesion masks and per-image records."""
    from fundus_edge.synth import generate_dataset, parse_splits

    summary = generate_dataset(
        out,
        n,
        size=size,
        seed=seed,
        splits=parse_splits(splits),
        workers=workers,
        prevalence_scale=prevalence_scale,
        overwrite=overwrite,
    )
    counts = ", ".join(f"{k} {v['count']}" for k, v in summary["splits"].items())
    typer.echo(
        f"wrote {summary['n']} images ({counts}) to {summary['out']} "
        f"in {summary['elapsed_s']:.1f} s ({summary['images_per_s']:.1f} images/s)"
    )
