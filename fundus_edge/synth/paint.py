"""Drawing primitives of the synthetic fundus: sub-pixel shapes, alpha blends, smooth noise.

Shapes are drawn into uint8 *layers* (0..255, anti-aliased, with OpenCV's fractional-bit
coordinates so centres and radii need not be whole pixels); a layer, optionally blurred,
becomes the alpha of a blend onto the float32 RGB picture (values 0..1, albedo before the
illumination is applied). Dark lesions multiply toward a tint (they keep the local
illumination); bright ones blend toward an albedo colour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel centres and radii
ONE = 1 << SHIFT


def pt(x: float, y: float) -> tuple[int, int]:
    """A point in OpenCV's fixed-point coordinates (``SHIFT`` fractional bits)."""
    return round(x * ONE), round(y * ONE)


def disk(layer: np.ndarray, x: float, y: float, r: float, value: float = 255) -> None:
    """Fill an anti-aliased disk of radius ``r`` (at least half a pixel) into ``layer``."""
    cv2.circle(layer, pt(x, y), max(ONE // 2, round(r * ONE)), int(value), -1, cv2.LINE_AA, SHIFT)


def ellipse(
    layer: np.ndarray,
    x: float,
    y: float,
    a: float,
    b: float,
    angle_deg: float,
    value: float = 255,
    thickness: int = -1,
) -> None:
    """Draw an anti-aliased ellipse (filled unless ``thickness`` > 0) into ``layer``."""
    axes = (max(ONE // 2, round(a * ONE)), max(ONE // 2, round(b * ONE)))
    cv2.ellipse(
        layer, pt(x, y), axes, float(angle_deg), 0, 360, int(value), thickness, cv2.LINE_AA, SHIFT
    )


def alpha(layer: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """A uint8 layer as float32 alpha 0..1, Gaussian-blurred by ``sigma`` when >= 0.3 px."""
    a = layer.astype(np.float32) * np.float32(1 / 255)
    if sigma >= 0.3:
        a = cv2.GaussianBlur(a, (0, 0), sigma)
    return a


def roi(layer: np.ndarray, pad: float) -> tuple[slice, slice] | None:
    """Bounding box of the non-zero pixels of ``layer`` grown by ``pad``; None if empty."""
    x, y, w, h = cv2.boundingRect(layer)
    if w == 0 or h == 0:
        return None
    p = math.ceil(pad)
    rows, cols = layer.shape[:2]
    return slice(max(0, y - p), min(rows, y + h + p)), slice(max(0, x - p), min(cols, x + w + p))


def layer_darken(img, layer, sigma: float, tint, strength: float = 1.0) -> None:
    """:func:`darken` by a drawn uint8 layer, blurred by ``sigma``, on its bounding box only."""
    box = roi(layer, 3 * sigma + 1)
    if box is not None:
        darken(img[box], np.float32(strength) * alpha(layer[box], sigma), tint)


def layer_paint(img, layer, sigma: float, colour, strength: float = 1.0) -> None:
    """:func:`paint` by a drawn uint8 layer, blurred by ``sigma``, on its bounding box only."""
    box = roi(layer, 3 * sigma + 1)
    if box is not None:
        paint(img[box], np.float32(strength) * alpha(layer[box], sigma), colour)


def darken(img: np.ndarray, a: np.ndarray, tint: Sequence[float]) -> None:
    """Multiply toward ``tint`` by alpha ``a`` (dark lesions keep the local illumination)."""
    k = np.float32(1.0) - np.asarray(tint, np.float32)
    img *= np.float32(1.0) - a[..., None] * k


def paint(img: np.ndarray, a: np.ndarray, colour: Sequence[float]) -> None:
    """Blend toward the albedo ``colour`` by alpha ``a``."""
    img += a[..., None] * (np.asarray(colour, np.float32) - img)


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Roughly unit-variance noise with about ``cells`` blobs across: (size, size, channels)."""
    g = rng.standard_normal((cells, cells, channels), dtype=np.float32)
    out = cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC)
    return out.reshape(size, size, channels)


def rec(label: str, kind: str, x: float, y: float, r: float, **extra: Any) -> dict[str, Any]:
    """One lesion record of an image's meta: label, kind, centre and radius in pixels, extras."""
    d = {"label": label, "kind": kind, "x": round(float(x), 1), "y": round(float(y), 1)}
    d["r"] = round(float(r), 2)
    d.update({k: round(float(v), 3) if isinstance(v, float) else v for k, v in extra.items()})
    return d
