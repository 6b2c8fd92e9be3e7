"""The fundus field of view: a circle fitted to the bright field, or a frame-filling field.

See :func:`find_fov`; :class:`FovTracker` finds it once in a video and then only checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.preprocess.read import as_rgb_uint8

__all__ = ["CIRCLE", "RECT", "Circle", "FovTracker", "find_fov"]

#: :attr:`Circle.kind` of a circular field of view (the usual camera image: a disc on black).
CIRCLE = "circle"
#: :attr:`Circle.kind` of a field that fills the frame (no black surround: the circle runs
#: past every edge, as some cameras and cropped archives deliver). The frame is the field.
RECT = "rect"

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

# Frame-filling fields (see _rect_field). A working pixel is "lit" above
# max(_RECT_DARK, _RECT_REL * median): a camera's black surround is below ~15 even after JPEG,
# and the dimmest corner of a vignetted field is above a quarter of its median.
_RECT_DARK = 12.0
_RECT_REL = 0.25
_RECT_STRIP = 0.02  # edge strip width, fraction of the shorter side
_RECT_SIDE_LIT = 0.6  # a side is reached when this share of its strip is lit ...
_RECT_SIDES = 3  # ... and at least this many of the four sides are
_RECT_COVER = 0.85  # share of the whole frame lit
# Structure: the std/mean of the frame smoothed at 3 % of its shorter side. Fundus crops measure
# 0.05-0.07 (illumination, disc, vessel arcades); a blank, uniform or pure-noise frame < 0.01.
_RECT_STRUCT_SIGMA = 0.03
_RECT_MIN_STRUCT = 0.02


@dataclass(frozen=True)
class Circle:
    """The field of view in frame pixels; ``found`` False means a fallback guess.

    Attributes:
        cx: centre column.
        cy: centre row.
        r: radius. For a ``"rect"`` field: half the frame's shorter side (the circle inscribed
            in the centred square that :func:`~fundus_edge.preprocess.preprocess` crops).
        found: a field of view was recognised (a circle or a frame-filling field).
        kind: :data:`CIRCLE` (a disc; masked outside) or :data:`RECT` (the field fills the
            frame: the frame is cropped and nothing is masked). Older dicts without it load as
            ``"circle"``.
    """

    cx: float
    cy: float
    r: float
    found: bool
    kind: str = CIRCLE

    @property
    def is_rect(self) -> bool:
        """The field fills the frame (no circle to mask)."""
        return self.found and self.kind == RECT

    def to_dict(self) -> dict[str, Any]:
        return {"cx": self.cx, "cy": self.cy, "r": self.r, "found": self.found, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Circle:
        kind = str(d.get("kind", CIRCLE))
        return cls(float(d["cx"]), float(d["cy"]), float(d["r"]), bool(d["found"]), kind)


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
    """Find the field of view of a fundus photograph: a circle, or a frame-filling field.

    Works on a copy whose longest side is 512 px. **Circle**: the channel maximum is smoothed
    and thresholded between the background and a robust bright level; the boundary of the
    largest bright component, less the points where the frame cuts the circle, gets a RANSAC
    circle fit with trimmed least-squares refits. The result is accepted only when the circle
    (clipped to the frame) and the component agree closely.

    **Frame-filling field** (``kind="rect"``), tried when no circle is found: the content
    reaches the frame's edges (at least 3 of the 4 edge strips, 2 % of the shorter side wide,
    are 60 % lit; 85 % of the frame lit, "lit" meaning above ``max(12, median / 4)``) and the
    frame has structure (the std/mean of the frame smoothed at 3 % of its shorter side is at
    least 0.02: blank, uniform and pure-noise frames are below 0.01, fundus crops 0.05-0.07).
    Whether such a frame is a fundus at all is the quality gate's question
    (:func:`fundus_edge.quality.assess_quality`, reason ``"not_fundus"``).

    Args:
        image: any uint8 image (grey, RGB, RGBA; any size).

    Returns:
        The circle in frame pixels; a frame-filling field as ``Circle(centre of the frame,
        half the shorter side, found=True, kind="rect")``; when neither is found, the circle
        inscribed in the frame with ``found=False``.
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

    fit = _circle_fit(lum)
    if fit is not None:
        cx_s, cy_s, r_s = fit
        # Back to frame pixels: working pixel i covers frame pixels [i·k, (i+1)·k).
        cx = (cx_s + 0.5) * k - 0.5
        cy = (cy_s + 0.5) * k - 0.5
        return Circle(float(cx), float(cy), float(r_s * k), True)
    if min(sh, sw) >= 16 and _rect_field(lum):
        return Circle(fallback.cx, fallback.cy, fallback.r, True, RECT)
    return fallback


def _rect_field(lum: np.ndarray) -> bool:
    """Does the (smoothed, working-scale) channel maximum fill the frame with structure?"""
    sh, sw = lum.shape
    thr = max(_RECT_DARK, _RECT_REL * float(np.median(lum)))
    lit = lum > thr
    if lit.mean() < _RECT_COVER:
        return False
    e = max(2, round(_RECT_STRIP * min(sh, sw)))
    strips = (lit[:e], lit[-e:], lit[:, :e], lit[:, -e:])
    if sum(float(s.mean()) >= _RECT_SIDE_LIT for s in strips) < _RECT_SIDES:
        return False
    f = lum.astype(np.float32)
    mean = float(f.mean())
    if mean <= 0:
        return False
    smooth = cv2.GaussianBlur(f, (0, 0), _RECT_STRUCT_SIGMA * min(sh, sw))
    return float(smooth.std()) / mean >= _RECT_MIN_STRUCT


def _circle_fit(lum: np.ndarray) -> tuple[float, float, float] | None:
    """The circle ``(cx, cy, r)`` in working pixels, or None (see :func:`find_fov`)."""
    sh, sw = lum.shape
    cdf = np.cumsum(np.bincount(lum.ravel(), minlength=256)) / lum.size
    lo = float(np.searchsorted(cdf, 0.02))
    hi = float(np.searchsorted(cdf, 0.90))  # robust bright level: glare covers far less
    if hi - lo < 8:
        return None
    thr = lo + _FOV_LEVEL * (hi - lo)
    mask = (lum > thr).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, [contour], -1, 1, thickness=cv2.FILLED)

    pts = contour.reshape(-1, 2).astype(np.float64)  # (N, 2) x, y at the working scale
    on_border = (pts[:, 0] <= 1) | (pts[:, 0] >= sw - 2) | (pts[:, 1] <= 1) | (pts[:, 1] >= sh - 2)
    pts = pts[~on_border]
    if pts.shape[0] < 30:
        return None
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
        return None
    cx_s, cy_s, r_s, inl = fit
    if inl.mean() < 0.5 or not (0 <= cx_s < sw and 0 <= cy_s < sh):
        return None
    r_s -= _FOV_EDGE_BIAS
    if r_s < 2.0:
        return None

    disc = np.zeros_like(mask)
    cv2.circle(disc, (round(cx_s * 16), round(cy_s * 16)), round(r_s * 16), 1, cv2.FILLED, 8, 4)
    inter = np.count_nonzero(disc & filled)
    union = np.count_nonzero(disc | filled)
    if union == 0 or inter / union < 0.9:
        return None
    return cx_s, cy_s, r_s


# Tracking (FovTracker): the rim is checked on rings just inside and just outside the circle.
_TRACK_POINTS = 64  # per ring
_TRACK_INNER = 0.85  # inner ring radius, fraction of r: inside the field, clear of the rim
_TRACK_OUTER = 1.08  # outer ring: in the black surround, clear of the rim's blur
_TRACK_AGREE = 0.8  # share of each ring's points that must still be on its side of the level
_TRACK_MIN_POINTS = 8  # fewer outer points than this inside the frame: check the inner ring only


class FovTracker:
    """:func:`find_fov` for a video: fit the field of view once, then only check it.

    A camera's field of view is its aperture: it does not move between frames. The tracker
    fits the circle with :func:`find_fov` on the first frame, remembers the brightness of 64
    points on a ring just inside the rim (0.85 r) and 64 just outside (1.08 r, those inside
    the frame), and on every later frame reads the same 128 pixels (microseconds, against
    ~5 ms for a fit on a 1920x1080 frame). The circle is kept while at least 80 % of the inner
    points are still brighter, and 80 % of the outer points darker, than the level halfway
    between the two rings' medians at the fit. It is fitted afresh when that check fails (the
    camera moved, the exposure jumped, the scene is not the same kind), when the frame size
    changes, every ``refit_every`` frames, and on every frame while no circle is found (or the
    field fills the frame): those frames get exactly :func:`find_fov`'s answer.

    Args:
        refit_every: fit every this many frames even when the check passes (1: every frame).
    """

    def __init__(self, refit_every: int = 120) -> None:
        if refit_every < 1:
            raise UserError(f"FovTracker: refit_every must be >= 1, got {refit_every}")
        self.refit_every = refit_every
        self.fits = 0  # find_fov calls so far
        self.frames = 0  # frames seen so far
        self.reset()

    def reset(self) -> None:
        """Forget the circle: the next frame is fitted."""
        self._circle: Circle | None = None
        self._shape: tuple[int, int] | None = None
        self._since = 0
        self._inner: tuple[np.ndarray, np.ndarray] | None = None
        self._outer: tuple[np.ndarray, np.ndarray] | None = None
        self._level = 0.0

    def find(self, image: np.ndarray) -> Circle:
        """The field of view of this frame: the tracked circle, or a new fit."""
        img = as_rgb_uint8(image)
        self.frames += 1
        shape = img.shape[:2]
        due = self._since >= self.refit_every - 1
        tracked = self._circle is not None and shape == self._shape and not due
        if tracked and self._still_there(img):
            self._since += 1
            return self._circle  # type: ignore[return-value]
        return self._fit(img)

    def _fit(self, img: np.ndarray) -> Circle:
        self.fits += 1
        circle = find_fov(img)
        self._circle = None
        if circle.found and not circle.is_rect:
            h, w = img.shape[:2]
            self._inner = _ring(circle, _TRACK_INNER, h, w)
            self._outer = _ring(circle, _TRACK_OUTER, h, w)
            inner, outer = _levels(img, self._inner), _levels(img, self._outer)
            lo = float(np.median(outer)) if outer.size >= _TRACK_MIN_POINTS else 0.0
            hi = float(np.median(inner)) if inner.size else 0.0
            # Only a rim with contrast can be checked; otherwise every frame is fitted.
            if inner.size >= _TRACK_MIN_POINTS and hi - lo >= 16.0:
                self._level = 0.5 * (hi + lo)
                self._circle, self._shape, self._since = circle, (h, w), 0
        return circle

    def _still_there(self, img: np.ndarray) -> bool:
        assert self._inner is not None and self._outer is not None
        inner = _levels(img, self._inner)
        if np.count_nonzero(inner > self._level) < _TRACK_AGREE * inner.size:
            return False
        outer = _levels(img, self._outer)
        if outer.size >= _TRACK_MIN_POINTS:
            return np.count_nonzero(outer < self._level) >= _TRACK_AGREE * outer.size
        return True


def _ring(circle: Circle, fraction: float, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int arrays of the ring's points that lie inside the frame."""
    a = np.linspace(0.0, 2.0 * np.pi, _TRACK_POINTS, endpoint=False)
    x = np.rint(circle.cx + fraction * circle.r * np.cos(a)).astype(np.intp)
    y = np.rint(circle.cy + fraction * circle.r * np.sin(a)).astype(np.intp)
    keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    return y[keep], x[keep]


def _levels(img: np.ndarray, ring: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The channel maximum (as in :func:`find_fov`) at the ring's points."""
    return img[ring[0], ring[1]].max(axis=-1).astype(np.float32)
