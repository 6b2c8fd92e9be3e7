"""``fundus-edge clip``: a video from still images, to try ``run`` without a camera."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


@app.command()
def clip(
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders or globs ('data/Test/*.png'), in order."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output video: .mp4, .m4v, .mov, .mkv or .avi."
    ),
    fps: float = typer.Option(5.0, "--fps", help="Frames per second."),
    hold: int = typer.Option(3, "--hold", help="Frames each image is shown."),
    size: str = typer.Option(
        "960x720", "--size", help="Frame size WIDTHxHEIGHT (images are letterboxed)."
    ),
) -> None:
    """Make a test video from fundus images, letterboxed into a camera-sized frame."""
    from fundus_edge.errors import UserError
    from fundus_edge.runtime.clip import make_clip

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 960x720") from None
    info = make_clip(inputs, out, fps=fps, hold=hold, width=width, height=height)
    typer.echo(f"wrote {info['path']}: {info['frames']} frames from {info['images']} images")
