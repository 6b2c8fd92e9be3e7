"""``fundus-edge report``: per-visit screening reports for a folder of photographs."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


@app.command()
def report(
    model: Path = typer.Argument(
        ..., help="Exported model: .onnx, .xml, .engine/.plan (+ .json sidecar), or a checkpoint."
    ),
    source: str = typer.Argument(
        ...,
        help="Image or DICOM file, folder (subfolders too: patient/study/series archives) or glob.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The report folder (see README 'Reports')."),
    send: str | None = typer.Option(
        None, "--send", help="C-STORE the DICOM report objects to a PACS: AE@HOST:PORT."
    ),
    anonymise: bool = typer.Option(
        False,
        "--anonymise",
        help="Replace file names and DICOM identifiers by salted hashes in every output; "
        "write no names.",
    ),
    backend: str | None = typer.Option(
        None, "--backend", help="auto | onnxruntime | openvino | tensorrt | torch."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 2 when any file had to be skipped (reports are written)."
    ),
) -> int:
    """Screen photographs and write one report per visit (patient + study).

    Each report lists every photograph with its overlay, quality verdict, findings over
    threshold with probabilities, the result per eye and for the patient ("refer" when either
    eye is screening-positive; "ungradable, retake" when no photograph of an eye passed the
    quality gate), the model (name, SHA-256, version, thresholds) and the intended-use note.
    Written as HTML and PDF, and for DICOM input also as a DICOM Encapsulated PDF and a
    Secondary Capture of each overlay under the patient's study. Same as
    ``run MODEL SOURCE --report DIR --headless``.
    """
    from fundus_edge.errors import DataError
    from fundus_edge.runtime.pipeline import RunConfig
    from fundus_edge.runtime.pipeline import run as run_pipeline

    cfg = RunConfig(
        model=model,
        source=source,
        backend=backend,
        headless=True,
        report=out,
        send=send,
        anonymise=anonymise,
        strict=strict,
        map="auto",
    )
    summary = run_pipeline(cfg)
    for line in summary.lines():
        typer.echo(line)
    if summary.interrupted:
        from fundus_edge.errors import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED
    if summary.frames_read == 0:
        raise DataError(f"{summary.source}: nothing could be read")
    if strict and summary.skipped:
        first = summary.skipped[0]
        raise DataError(
            f"{len(summary.skipped)} item(s) skipped under --strict, first {first.item}: {first.reason}"
        )
    return 0
