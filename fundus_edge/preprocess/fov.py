"""The fundus field of view: a circle fitted to the bright field, or a frame-filling field.

See :func:`find_fov`.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np

from fundus_edge.preprocess.read import as_rgb_uint8

__all__ = ["Circle", "find_fov"]

# FOV search runs on a copy whose longest side is at most this: ~3 ms on a 4288x2848 frame,
# and 1 px there is < 0.1 % of a typical radius.
_FOV_WORK_SIDE = 512
# Threshold level between background and the robust bright level: low, because the rim of a
# vignetted or unevenly lit fundus can be a quarter of its centre's brightness.
_FOV_LEVEL = 0.15
_FOV_BLUR = 1.5  # Gaussian sigma (working pixels) against noise
# A sharp rim blurred by the Gaussian (and the area reduction, sigma ~ 1/sqrt(12)) crosses the
# threshold level -Phi^-1(level) sigma (1.04 sigma at 15 %) outside the rim; the contour's pixel
# centres lie ~0.5 px inside the crossing. Subtracting the difference makes the radius unbiased
# for a sharp rim (measured: within 0.1 working px on drawn discs).
_FOV_EDGE_BIAS = -NormalDist().inv_cdf(_FOV_LEVEL) * (_FOV_BLUR**2 + 1.0 / 12.0) ** 0.5 - 0.5


@dataclass(frozen=True)
class Circle:
    """The circular field of view in frame pixels; ``found`` False means a fallback guess."""

    cx: float
    cy: float
    r: float
    found: bool

    def to_dict(self) -> dict[str, Any]:
        return {"cx": self.cx, "cy": self.cy, "r": self.r, "found": self.found}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Circle:
        return cls(float(d["cx"]), float(d["cy"]), float(d["r"]), bool(d["found"]))


def _fallback_circle(h: int, w: int) -> Circle:
    # The circle inscribed in the frame: what a fundus camera frame most often holds.
    return Circle((w - 1) / 2.0, (h - 1) / 2.0, min(h, w) / 2.0, False)


def _kasa_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic least-squares circle ``x² + y² + D x + E y + F = 0`` through the points."""
    if x.size < 3:
        return None
    xm, ym = x.mean(), y.mean()  # centre the points: keeps the normal equations well scaled
    u, v = x - xm, y - ym
    a = np.stack([u, v, np.ones_like(u)], axis=1)
    b = -(u * u + v * v)
    sol, _, rank, _ = np.linalg.lstsq(a, b, rcond=None)
    if rank < 3:
        return None
    d, e, f = sol
    r2 = (d * d + e * e) / 4.0 - f
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(xm - d / 2.0), float(ym - e / 2.0), float(np.sqrt(r2))


def _ransac_circle(
    x: np.ndarray, y: np.ndarray, tol: float, r_min: float, r_max: float, rng: np.random.Generator
) -> tuple[float, float, float, np.ndarray] | None:
    """Robust circle through boundary points: 3-point RANSAC, then trimmed least-squares refits.

    Returns ``(cx, cy, r, inlier_mask)`` or None.
    """
    n = x.size
    if n < 3:
        return None
    trials = 256
    idx = rng.integers(0, n, size=(trials, 3))
    x1, x2, x3 = x[idx[:, 0]], x[idx[:, 1]], x[idx[:, 2]]
    y1, y2, y3 = y[idx[:, 0]], y[idx[:, 1]], y[idx[:, 2]]
    # Circumcentre of each triplet, all trials at once.
    d = 2.0 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    ok = np.abs(d) > 1e-6
    d = np.where(ok, d, 1.0)
    s1, s2, s3 = x1 * x1 + y1 * y1, x2 * x2 + y2 * y2, x3 * x3 + y3 * y3
    ux = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / d
    uy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / d
    ur = np.hypot(x1 - ux, y1 - uy)
    ok &= (ur >= r_min) & (ur <= r_max)
    if not ok.any():
        return None
    ux, uy, ur = ux[ok], uy[ok], ur[ok]
    # (T, N) residuals; T <= 256 and N is a few thousand boundary points at most.
    resid = np.abs(np.hypot(x[None, :] - ux[:, None], y[None, :] - uy[:, None]) - ur[:, None])
    best = int(np.argmax((resid < tol).sum(axis=1)))
    inl = resid[best] < tol
    fit = (float(ux[best]), float(uy[best]), float(ur[best]))
    for _ in range(3):
        refit = _kasa_fit(x[inl], y[inl])
        if refit is None:
            break
        fit = refit
        new = np.abs(np.hypot(x - fit[0], y - fit[1]) - fit[2]) < tol
        if new.sum() < 3 or np.array_equal(new, inl):
            break
        inl = new
    return fit[0], fit[1], fit[2], inl


def find_fov(image: np.ndarray) -> Circle:
    """Find the circular field of view of a fundus photograph.

    Works on a copy whose longest side is 512 px: the channel maximum is smoothed and
    thresholded between the background and a robust bright level; the boundary of the largest
    bright component, less the points where the frame cuts the circle, gets a RANSAC circle
    fit with trimmed least-squares refits. The result is accepted only when the circle
    (clipped to the frame) and the component agree closely.

    Args:
        image: any uint8 image (grey, RGB, RGBA; any size).

    Returns:
        The circle in frame pixels; when no field of view is found, the circle inscribed in
        the frame with ``found=False``.
    """
    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    fallback = _fallback_circle(h, w)
    if min(h, w) < 16:
        return fallback

    # An integer reduction factor on a frame trimmed to a multiple of it: OpenCV's area
    # resize has a fast path for integer factors (4x faster on a 4288x2848 frame).
    k = -(-max(h, w) // _FOV_WORK_SIDE)
    sw, sh = w // k, h // k
    if k > 1:
        small = cv2.resize(img[: sh * k, : sw * k], (sw, sh), interpolation=cv2.INTER_AREA)
    else:
        small = img
    # Channel maximum: the background is dark in every channel, the fundus bright in at least
    # red, and the maximum keeps grey and odd-coloured cameras working too.
    lum = cv2.max(cv2.max(small[:, :, 0], small[:, :, 1]), small[:, :, 2])
    lum = cv2.GaussianBlur(lum, (0, 0), _FOV_BLUR)

    cdf = np.cumsum(np.bincount(lum.ravel(), minlength=256)) / lum.size
    lo = float(np.searchsorted(cdf, 0.02))
    hi = float(np.searchsorted(cdf, 0.90))  # robust bright level: glare covers far less
    if hi - lo < 8:
        return fallback
    thr = lo + _FOV_LEVEL * (hi - lo)
    mask = (lum > thr).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return fallback
    contour = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, [contour], -1, 1, thickness=cv2.FILLED)

    pts = contour.reshape(-1, 2).astype(np.float64)  # (N, 2) x, y at the working scale
    on_border = (pts[:, 0] <= 1) | (pts[:, 0] >= sw - 2) | (pts[:, 1] <= 1) | (pts[:, 1] >= sh - 2)
    pts = pts[~on_border]
    if pts.shape[0] < 30:
        return fallback
    if pts.shape[0] > 4000:  # the fit needs shape, not every pixel
        pts = pts[:: pts.shape[0] // 2000 + 1]

    side = max(sw, sh)
    # Fixed seed: the same image always gives the same circle.
    fit = _ransac_circle(
        pts[:, 0],
        pts[:, 1],
        tol=max(1.5, 0.006 * side),
        r_min=0.05 * side,
        r_max=1.5 * side,
        rng=np.random.default_rng(0),
    )
    if fit is None:
        return fallback
    cx_s, cy_s, r_s, inl = fit
    if inl.mean() < 0.5 or not (0 <= cx_s < sw and 0 <= cy_s < sh):
        return fallback
    r_s -= _FOV_EDGE_BIAS
    if r_s < 2.0:
        return fallback

    disc = np.zeros_like(mask)
    cv2.circle(disc, (round(cx_s * 16), round(cy_s * 16)), round(r_s * 16), 1, cv2.FILLED, 8, 4)
    inter = np.count_nonzero(disc & filled)
    union = np.count_nonzero(disc | filled)
    if union == 0 or inter / union < 0.9:
        return fallback

    # Back to frame pixels: working pixel i covers frame pixels [i·k, (i+1)·k).
    cx = (cx_s + 0.5) * k - 0.5
    cy = (cy_s + 0.5) * k - 0.5
    r = r_s * k
    return Circle(float(cx), float(cy), float(r), True)
