"""Make a test clip from still images: what a fundus camera's video would look like.

Used by ``make demo`` (held-out synthetic images plus the real retina photo) and handy to
try ``fundus-edge run`` without a camera. Each image is fitted into a fixed camera-sized
canvas (letterboxed on black, as fundus cameras frame the circular field of view) and held
for ``hold`` frames.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.fileio import ensure_writable_file
from fundus_edge.media import VIDEO_CODECS
from fundus_edge.preprocess import read_image
from fundus_edge.runtime.sources import list_image_files

__all__ = ["expand_inputs", "letterbox", "make_clip"]


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, folders (their images, sorted) and globs, in the order given.

    A folder lists its image files by extension, as ``run`` does
    (:func:`~fundus_edge.runtime.sources.list_image_files`); other files are ignored.
    """
    out: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        if not text.strip():
            # Path("") is the current folder: an empty input must not quietly mean "here".
            raise UserError("empty input: give image files, folders or globs")
        p = Path(text)
        if p.is_dir():
            out.extend(list_image_files(p))
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise UserError(f"{text}: the pattern matches no file")
            out.extend(Path(m) for m in matches)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{text}: no such file or folder")
    return out


def letterbox(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fit ``image`` (RGB) inside a black ``height`` x ``width`` canvas, aspect kept."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - nh) // 2, (width - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = resized
    return canvas


def make_clip(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    fps: float = 5.0,
    hold: int = 3,
    width: int = 960,
    height: int = 720,
) -> dict:
    """Write the images as a video (atomic: a partial file renamed at the end).

    Args:
        inputs: image files, folders or globs.
        out: a container of :data:`fundus_edge.media.VIDEO_CODECS` (``.mp4``, ``.m4v``,
            ``.mov``, ``.mkv``: MPEG-4 Part 2; ``.avi``: Motion JPEG).
        fps: frame rate.
        hold: frames per image.
        width, height: frame size (even numbers; a 4:3 camera by default).

    Returns:
        ``{"path", "frames", "images"}``.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in VIDEO_CODECS:
        raise UserError(f"--out {out}: use one of {', '.join(VIDEO_CODECS)}")
    if width % 2 or height % 2 or width < 16 or height < 16:
        raise UserError(f"--size {width}x{height}: need even numbers >= 16")
    if hold < 1:
        raise UserError(f"--hold must be >= 1, got {hold}")
    if not fps > 0:  # also NaN
        raise UserError(f"--fps must be > 0, got {fps:g}")
    paths = expand_inputs(inputs)
    if not paths:
        raise UserError("no images given")
    # Permissions first: OpenCV only says it "cannot write" whatever the cause.
    ensure_writable_file(out, "--out")
    partial = out.with_name(f".{out.stem}.partial{suffix}")
    writer = cv2.VideoWriter(
        str(partial), cv2.VideoWriter_fourcc(*VIDEO_CODECS[suffix]), fps, (width, height)
    )
    if not writer.isOpened():
        raise UserError(f"--out {out}: OpenCV cannot write {suffix} video here")
    frames = 0
    try:
        for p in paths:
            frame = letterbox(read_image(p), width, height)[:, :, ::-1]  # RGB -> BGR for OpenCV
            for _ in range(hold):
                writer.write(np.ascontiguousarray(frame))
                frames += 1
        writer.release()
        os.replace(partial, out)
    except BaseException:
        writer.release()
        partial.unlink(missing_ok=True)
        raise
    return {"path": str(out), "frames": frames, "images": len(paths)}
