"""Pictures beside the fundus: frame-filling crops of one, and frames that are not a fundus.

Both feed the quality gate's tests: a field that runs past every edge of the frame must still
pass, a blank frame, a wall, a test target or a page of text must not.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError

__all__ = ["NON_FUNDUS_KINDS", "frame_filling", "non_fundus_frame"]

#: Kinds of :func:`non_fundus_frame`.
NON_FUNDUS_KINDS = ("black", "white", "grey", "wall", "checkerboard", "text")


def frame_filling(
    image: np.ndarray,
    meta: dict[str, Any],
    fraction: float = 0.7,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Crop a generated fundus so that its field fills the frame (no black surround).

    Some cameras and cropped archives deliver the field running past every edge; this is
    that picture: the square of ``fraction`` of the FOV's diameter centred on the FOV
    (``fraction`` <= 0.7 keeps the corners inside the circle), resized to ``shape``.

    Args:
        image: an image from :func:`generate_image`.
        meta: its meta dict (the FOV circle).
        fraction: the crop's side over the FOV's diameter (0.1..0.7).
        shape: ``(H, W)`` of the result (the crop is widened or narrowed to that aspect,
            staying inside the circle when ``fraction`` is small enough); default the square.
    """
    if not 0.1 <= fraction <= 0.7:
        raise UserError(f"frame_filling: fraction must be in 0.1..0.7 (got {fraction})")
    cx, cy, r = meta["fov"]["cx"], meta["fov"]["cy"], meta["fov"]["r"]
    half = fraction * r
    hh, hw = (half, half)
    if shape is not None:
        aspect = shape[1] / shape[0]
        hh, hw = (half / aspect**0.5, half * aspect**0.5)
    h, w = image.shape[:2]
    x0, x1 = max(0, round(cx - hw)), min(w, round(cx + hw))
    y0, y1 = max(0, round(cy - hh)), min(h, round(cy + hh))
    crop = image[y0:y1, x0:x1]
    out_hw = shape if shape is not None else (crop.shape[0], crop.shape[0])
    return np.ascontiguousarray(
        cv2.resize(crop, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_AREA)
    )


def non_fundus_frame(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A camera frame that is not a fundus photograph, as ``(H, W, 3)`` uint8 RGB.

    Kinds (:data:`NON_FUNDUS_KINDS`): ``black``, ``white``, ``grey`` (blank frames: lens cap,
    flash into the lens, a grey card); ``wall`` (a flat coloured wall, its colour random,
    with a little shading and sensor noise); ``checkerboard`` (a printed test target) and
    ``text`` (printed text on white paper).
    """
    h, w = shape
    if kind == "black":
        return np.zeros((h, w, 3), np.uint8)
    if kind == "white":
        return np.full((h, w, 3), 255, np.uint8)
    if kind == "grey":
        return np.full((h, w, 3), int(rng.integers(60, 200)), np.uint8)
    if kind == "wall":
        colour = rng.uniform(60, 220, 3).astype(np.float32)
        ramp = np.linspace(0.9, 1.1, w, dtype=np.float32)[None, :, None]
        img = colour * ramp + rng.normal(0.0, 4.0, (h, w, 3)).astype(np.float32)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if kind == "checkerboard":
        cell = max(2, min(h, w) // int(rng.integers(6, 12)))
        yy, xx = np.mgrid[:h, :w]
        board = ((yy // cell + xx // cell) % 2).astype(np.uint8) * 255
        return np.ascontiguousarray(np.dstack([board] * 3))
    if kind == "text":
        img = np.full((h, w, 3), 250, np.uint8)
        scale = max(0.3, min(h, w) / 300)
        step = max(8, round(30 * scale))
        for i, y in enumerate(range(step, h - 4, step)):
            words = " ".join("".join(rng.choice(list("abcdefghij"), 5)) for _ in range(8))
            cv2.putText(img, f"{i} {words}", (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 2)
        return img
    raise UserError(f"non_fundus_frame: unknown kind {kind!r} (known: {NON_FUNDUS_KINDS})")
