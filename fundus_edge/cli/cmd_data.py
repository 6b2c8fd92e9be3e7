"""``fundus-edge dataset`` and ``fundus-edge prepare``."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from fundus_edge.cli.app import app

# How many problems the terminal report lists (the JSON report has all of them).
_SHOW_PROBLEMS = 20


@app.command()
def dataset(
    root: Path = typer.Argument(..., help="Dataset folder (or its labels CSV)."),
    json_file: Path | None = typer.Option(
        None, "--json", help="Also write the whole report (every problem) to this JSON file."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Stop at the first problem (exit 2) instead of skipping."
    ),
    format: str = typer.Option("auto", "--format", help="auto, rfmid, odir or csv."),
    check_images: bool = typer.Option(
        False, "--check-images", help="Decode every image and report unreadable ones (slow)."
    ),
) -> None:
    """Read a dataset and report splits, image counts, label prevalence and problems."""
    from fundus_edge.data import open_dataset
    from fundus_edge.fileio import atomic_write_json

    ds = open_dataset(root, strict=strict, format=format, check_images=check_images)
    summary = ds.summary()
    if json_file is not None:
        atomic_write_json(json_file, summary)
    _render_dataset(summary)


def _render_dataset(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False)  # paths and messages print as written ("[trt]")
    splits = summary["splits"]
    counts = ", ".join(f"{name} {s['images']}" for name, s in splits.items())
    console.print(
        f"{summary['root']}: format {summary['format']}, {len(summary['label_names'])} labels, "
        f"images: {counts or 'none'}",
        highlight=False,
    )
    t = Table(title="positives (% of split)", header_style="bold")
    t.add_column("label")
    for name in splits:
        t.add_column(name, justify="right")
    for label in summary["label_names"]:
        cells = []
        for s in splits.values():
            p = s["prevalence"][label]
            cells.append(f"{p['count']} ({p['percent']:.1f}%)")
        t.add_row(label, *cells)
    console.print(t)
    problems = summary["problems"]
    if not problems:
        console.print("no problems found", highlight=False)
        return
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["problem_counts"].items()))
    console.print(f"{len(problems)} problem(s), samples skipped: {kinds}", highlight=False)
    for p in problems[:_SHOW_PROBLEMS]:
        where = p["file"] + (f":{p['row']}" if p["row"] is not None else "")
        col = f" column {p['column']!r}" if p["column"] is not None else ""
        console.print(
            f"  {where}{col}: {p['message']}", highlight=False, markup=False, soft_wrap=True
        )
    if len(problems) > _SHOW_PROBLEMS:
        console.print(
            f"  ... and {len(problems) - _SHOW_PROBLEMS} more (write them all with --json)",
            highlight=False,
        )


@app.command()
def prepare(
    src: Path = typer.Argument(..., help="Source dataset folder."),
    dst: Path = typer.Argument(..., help="Output folder (same layout and label files)."),
    size: int = typer.Option(..., "--size", help="Output side in pixels."),
    workers: int | None = typer.Option(
        None, "--workers", help="Worker processes (default: one per CPU core)."
    ),
    contrast: str = typer.Option("none", "--contrast", help="none, clahe or local_mean."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 2 on any data problem or unreadable image."
    ),
    format: str = typer.Option("auto", "--format", help="auto, rfmid, odir or csv."),
) -> None:
    """FOV-crop and resize a whole dataset once (resumable; writes a manifest per image)."""
    from fundus_edge.errors import UserError
    from fundus_edge.prepare import prepare_dataset
    from fundus_edge.preprocess import PreprocessConfig

    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    cfg = PreprocessConfig(size=size, contrast=contrast)
    result = prepare_dataset(
        src, dst, cfg, workers=workers or os.cpu_count() or 1, strict=strict, format=format
    )
    typer.echo(result.describe())
