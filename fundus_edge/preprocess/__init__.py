"""Decode, find the fundus field of view, crop, resize, mask and normalise one image.

The same code runs in training and on the edge device, so the two cannot drift. It needs
numpy and OpenCV only (never torch).

Coordinates: frame pixel ``(i, j)`` (column, row) has its centre at ``x = i, y = j``; a
:class:`Circle` is in these frame coordinates. The crop is a square of ``side`` frame pixels
whose first column/row is ``x0, y0`` (negative or past the frame where the circle leaves it;
those pixels are black padding). It is resized to ``size`` pixels with OpenCV's half-pixel
convention, so output pixel ``u`` has its centre at frame ``x0 - 0.5 + (u + 0.5) * side / size``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import DataError, UserError
from fundus_edge.options import options_from_dict

__all__ = [
    "CONTRASTS",
    "INTERPOLATIONS",
    "Circle",
    "Geometry",
    "PreprocessConfig",
    "Preprocessed",
    "as_rgb_uint8",
    "crop_geometry",
    "crop_square",
    "find_fov",
    "preprocess",
    "read_image",
    "read_mask",
    "square_around",
]

#: Largest output side: fundus cameras top out near 6,000 px; 8,192 px RGB is 200 MB an image.
MAX_SIZE = 8192

CONTRASTS = ("none", "clahe", "local_mean")
INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "nearest": cv2.INTER_NEAREST,
}

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


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8.

    PNG, JPEG, TIFF, BMP and WebP in any letter case; 16-bit images are scaled to 8 bits, grey
    images are replicated to three channels and alpha is dropped. DICOM files (by suffix or
    preamble, :mod:`fundus_edge.media`) are read with pydicom: the first frame
    (:mod:`fundus_edge.data.readers.dicom`).

    Args:
        path: the image file.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        DataError: the file is missing, unreadable, not an image or an unsupported kind.
    """
    path = Path(path)
    from fundus_edge.media import is_dicom_file

    if is_dicom_file(path):
        from fundus_edge.data.readers.dicom import read_dicom

        return read_dicom(path)[0]  # a multi-frame object: its first frame
    try:
        # np.fromfile + imdecode instead of cv2.imread: imread cannot open non-ASCII paths on
        # Windows and says nothing about why it failed.
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: cannot read image (file not found)") from None
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    if data.size == 0:
        raise DataError(f"{path}: cannot read image (empty file)")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # some decoders raise instead of returning None
        raise DataError(f"{path}: cannot read image (corrupt: {str(exc).strip()[:80]})") from None
    if image is None:
        raise DataError(f"{path}: cannot read image (not a supported image or corrupt)")
    try:
        return as_rgb_uint8(image, bgr=True)
    except UserError as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def read_mask(path: str | os.PathLike, frame: tuple[int, int]) -> np.ndarray:
    """A lesion mask (uint8 0/255 PNG) as ``(H, W)`` bool on its image's frame.

    A mask saved at another resolution than its image is resampled (nearest: it stays binary).

    Raises:
        DataError: the file cannot be read (one line naming it).
    """
    m = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"{path}: cannot read lesion mask")
    if m.shape != tuple(frame):
        m = cv2.resize(m, (frame[1], frame[0]), interpolation=cv2.INTER_NEAREST)
    return m > 127


def as_rgb_uint8(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Return ``image`` as a contiguous ``(H, W, 3)`` uint8 RGB array.

    Accepts 2-D grey, ``(H, W, 1)``, RGB and RGBA arrays of uint8 or uint16 (scaled by 1/257);
    float arrays are taken as 0..1. RGB uint8 input is returned as is (no copy).

    Args:
        image: the array.
        bgr: the channels are in OpenCV's BGR(A) order.

    Raises:
        UserError: empty arrays, other shapes or dtypes.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise UserError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError(f"empty image of shape {image.shape}")
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) * 255 + 32767) // 65535
        image = image.astype(np.uint8)
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        image = np.clip(np.nan_to_num(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise UserError(f"unsupported image dtype {image.dtype} (expected uint8 or uint16)")
    if image.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if bgr:
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


# --------------------------------------------------------------------------------------------
# Field of view
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Configuration and geometry
# --------------------------------------------------------------------------------------------


@dataclass
class PreprocessConfig:
    """How an image becomes a model input; stored in model metadata via :meth:`to_dict`.

    Attributes:
        size: output side in pixels.
        crop_fov: crop the square around the field of view (else the centred square).
        mask: black out everything outside the field of view.
        margin: fraction of the radius added around the circle when cropping.
        contrast: ``"none"``, ``"clahe"`` (on LAB lightness) or ``"local_mean"`` (Graham's
            ``4·img − 4·gauss(img) + 128``, averaging inside the field of view only).
        clahe_clip: CLAHE clip limit.
        clahe_grid: CLAHE tiles per side.
        local_mean_sigma: Gaussian sigma for ``local_mean`` as a fraction of ``size``
            (Graham's radius/30 is 1/60 of the diameter).
        interpolation: ``"area"``, ``"linear"``, ``"cubic"``, ``"lanczos"`` or ``"nearest"``.
    """

    size: int = 224
    crop_fov: bool = True
    mask: bool = True
    margin: float = 0.0
    contrast: str = "none"
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    local_mean_sigma: float = 1.0 / 60.0
    interpolation: str = "area"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)):
            raise UserError(f"preprocess option 'size' must be an integer, got {self.size!r}")
        if not 1 <= self.size <= MAX_SIZE:  # beyond any fundus camera; and RAM per image
            raise UserError(f"preprocess option 'size' must be in [1, {MAX_SIZE}], got {self.size}")
        if not (-0.5 < self.margin <= 1.0):
            raise UserError(f"preprocess option 'margin' must be in (-0.5, 1], got {self.margin}")
        if self.contrast not in CONTRASTS:
            raise UserError(
                f"preprocess option 'contrast' must be one of {', '.join(CONTRASTS)}, "
                f"got {self.contrast!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(
                f"preprocess option 'interpolation' must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if not self.clahe_clip > 0:
            raise UserError(f"preprocess option 'clahe_clip' must be > 0, got {self.clahe_clip}")
        if not 1 <= self.clahe_grid <= 64:
            raise UserError(
                f"preprocess option 'clahe_grid' must be in 1..64, got {self.clahe_grid}"
            )
        if not self.local_mean_sigma > 0:
            raise UserError(
                f"preprocess option 'local_mean_sigma' must be > 0, got {self.local_mean_sigma}"
            )
        self.size = int(self.size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every option."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Build from a dict (missing keys take defaults).

        Raises:
            UserError: a key that is not an option, or a bad value.
        """
        return options_from_dict(cls, d, "preprocess")


@dataclass
class Geometry:
    """Where the model input came from in the original frame.

    Attributes:
        x0: frame column of the crop's first pixel (negative where padded).
        y0: frame row of the crop's first pixel.
        side: crop side in frame pixels.
        size: output side in pixels.
        frame: ``(H, W)`` of the original frame.
        circle: the field of view in frame pixels.
    """

    x0: int
    y0: int
    side: int
    size: int
    frame: tuple[int, int]
    circle: Circle

    @property
    def scale(self) -> float:
        """Output pixels per frame pixel."""
        return self.size / self.side

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        """Map output-pixel coordinates ``(..., 2)`` (x, y) to frame coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        k = self.side / self.size
        return np.stack(
            [self.x0 - 0.5 + (xy[..., 0] + 0.5) * k, self.y0 - 0.5 + (xy[..., 1] + 0.5) * k],
            axis=-1,
        )

    def to_output(self, xy: np.ndarray) -> np.ndarray:
        """Map frame coordinates ``(..., 2)`` (x, y) to output-pixel coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        k = self.size / self.side
        return np.stack(
            [(xy[..., 0] - self.x0 + 0.5) * k - 0.5, (xy[..., 1] - self.y0 + 0.5) * k - 0.5],
            axis=-1,
        )

    def output_circle(self) -> tuple[float, float, float]:
        """The field of view ``(cx, cy, r)`` in output pixels."""
        (cx, cy) = self.to_output(np.array([self.circle.cx, self.circle.cy]))
        return float(cx), float(cy), self.circle.r * self.scale

    def crop(self, a: np.ndarray, interpolation: int = cv2.INTER_NEAREST) -> np.ndarray:
        """Cut a frame-aligned array (a lesion mask) to the model input exactly as the image.

        Args:
            a: ``(H, W)`` or ``(H, W, C)`` array on the original frame.
            interpolation: an OpenCV ``INTER_*`` flag (nearest keeps a mask binary; area
                gives each output pixel the fraction of its footprint inside).

        Returns:
            ``(size, size[, C])`` array of ``a``'s dtype.
        """
        return crop_square(a, self.x0, self.y0, self.side, self.size, interpolation)

    def map_to_frame(self, m: np.ndarray) -> np.ndarray:
        """Resize a map computed on the model input back onto the original frame.

        The map covers the crop square whatever its resolution (a 7x7 CAM or a 224x224
        heat map); it is resized bilinearly (OpenCV's half-pixel convention, as the
        ``grad-cam`` package does) and pasted into the frame, zeros outside the crop.

        Args:
            m: ``(h, w)`` float map.

        Returns:
            ``(H, W)`` float32 map on the frame.
        """
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 2 or m.size == 0:
            raise UserError(f"map_to_frame expects a non-empty 2-D map, got shape {m.shape}")
        fh, fw = self.frame
        out = np.zeros((fh, fw), dtype=np.float32)
        # The part of the crop square that lies inside the frame.
        cx0, cy0 = max(self.x0, 0), max(self.y0, 0)
        cx1, cy1 = min(self.x0 + self.side, fw), min(self.y0 + self.side, fh)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        full = cv2.resize(m, (self.side, self.side), interpolation=cv2.INTER_LINEAR)
        out[cy0:cy1, cx0:cx1] = full[cy0 - self.y0 : cy1 - self.y0, cx0 - self.x0 : cx1 - self.x0]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "x0": self.x0,
            "y0": self.y0,
            "side": self.side,
            "size": self.size,
            "frame": [self.frame[0], self.frame[1]],
            "circle": self.circle.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(
            int(d["x0"]),
            int(d["y0"]),
            int(d["side"]),
            int(d["size"]),
            (int(d["frame"][0]), int(d["frame"][1])),
            Circle.from_dict(d["circle"]),
        )


@dataclass
class Preprocessed:
    """A model input and where it came from."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    geometry: Geometry
    circle: Circle


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def crop_square(
    img: np.ndarray, x0: int, y0: int, side: int, size: int, interpolation: int
) -> np.ndarray:
    """Crop ``side`` frame pixels from ``(x0, y0)`` (zero padding outside) and resize.

    Args:
        img: ``(H, W)`` or ``(H, W, C)`` array (an image, or a mask to crop alike).
        x0: frame column of the crop's first pixel.
        y0: frame row of the crop's first pixel.
        side: crop side in frame pixels.
        size: output side.
        interpolation: an OpenCV ``INTER_*`` flag.

    Returns:
        ``(size, size)`` or ``(size, size, C)`` array of ``img``'s dtype.
    """
    h, w = img.shape[:2]
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + side, w), min(y0 + side, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return np.zeros((size, size, *img.shape[2:]), dtype=img.dtype)
    crop = img[cy0:cy1, cx0:cx1]
    pads = (cy0 - y0, y0 + side - cy1, cx0 - x0, x0 + side - cx1)  # top, bottom, left, right
    if any(pads):
        crop = cv2.copyMakeBorder(crop, *pads, cv2.BORDER_CONSTANT, value=(0, 0, 0, 0))
    if side == size:
        return np.ascontiguousarray(crop)
    k = side // size
    if interpolation == cv2.INTER_AREA and k >= 2 and side % k == 0:
        # Integer-factor area reduction first: 4x faster than one fractional area resize and
        # the same box filter up to the last, mild (< 2x) step.
        crop = cv2.resize(crop, (side // k, side // k), interpolation=cv2.INTER_AREA)
        if side // k == size:
            return crop
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def square_around(
    cx: float, cy: float, half: float, size: int, area: bool = True
) -> tuple[int, int, int]:
    """The integer crop square ``(x0, y0, side)`` centred on ``(cx, cy)``, ``2·half`` wide.

    With ``area`` interpolation the side is rounded up to a multiple of ``side // size`` (at
    most ``1/size`` wider) so :func:`crop_square` can first reduce by that integer factor on
    OpenCV's fast path.
    """
    side = max(1, round(2.0 * half))
    k = side // size
    if area and k >= 2:
        side = -(-side // k) * k
    # Centre the integer square on the circle: its centre sits at x0 - 0.5 + side / 2.
    return round(cx + 0.5 - side / 2.0), round(cy + 0.5 - side / 2.0), side


def crop_geometry(
    h: int, w: int, circle: Circle, size: int, margin: float, crop_fov: bool, area: bool
) -> tuple[int, int, int]:
    """The crop square ``(x0, y0, side)`` of a frame, as :func:`preprocess` chooses it."""
    if crop_fov and circle.found:
        return square_around(circle.cx, circle.cy, circle.r * (1.0 + margin), size, area)
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def _disc_mask(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """(size, size) bool: output pixel centres inside the circle."""
    yy, xx = np.ogrid[:size, :size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _local_mean(img: np.ndarray, fov: np.ndarray, sigma: float) -> np.ndarray:
    """Graham's ``4·img − 4·gauss(img) + 128`` with the Gaussian averaged inside ``fov`` only.

    Normalised convolution (blur of masked image / blur of mask) keeps the black outside the
    field of view from darkening the local mean near the rim, which otherwise leaves a bright
    ring there.
    """
    f = img.astype(np.float32)
    m = fov.astype(np.float32)
    num = cv2.GaussianBlur(f * m[:, :, None], (0, 0), sigma)
    den = cv2.GaussianBlur(m, (0, 0), sigma)
    mean = num / np.maximum(den, 1e-3)[:, :, None]
    out = 4.0 * f - 4.0 * mean + 128.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _clahe(img: np.ndarray, clip: float, grid: int) -> np.ndarray:
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid))
    lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def preprocess(image: np.ndarray, cfg: PreprocessConfig | None = None) -> Preprocessed:
    """Turn a fundus photograph into a model input.

    Finds the field of view, crops the square around it (black padding where the circle
    leaves the frame), resizes to ``cfg.size``, blacks out everything outside the circle and
    applies the contrast normalisation. Without a field of view (``circle.found`` False) the
    centred square of the frame is used and nothing is masked.

    Args:
        image: any uint8 image (grey, RGB, RGBA; any size; RGB order).
        cfg: options; defaults to :class:`PreprocessConfig()`.

    Returns:
        The ``(size, size, 3)`` uint8 image, its :class:`Geometry` and the circle.
    """
    cfg = cfg or PreprocessConfig()
    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    circle = find_fov(img)
    x0, y0, side = crop_geometry(
        h, w, circle, cfg.size, cfg.margin, cfg.crop_fov, cfg.interpolation == "area"
    )
    geom = Geometry(x0, y0, side, cfg.size, (h, w), circle)
    out = crop_square(img, x0, y0, side, cfg.size, INTERPOLATIONS[cfg.interpolation])

    if circle.found:
        ocx, ocy, orr = geom.output_circle()
        fov = _disc_mask(cfg.size, ocx, ocy, orr)
    else:
        fov = np.ones((cfg.size, cfg.size), dtype=bool)
    masking = cfg.mask and circle.found
    if masking:
        out[~fov] = 0
    if cfg.contrast == "clahe":
        out = _clahe(out, cfg.clahe_clip, cfg.clahe_grid)
    elif cfg.contrast == "local_mean":
        out = _local_mean(out, fov, max(0.5, cfg.local_mean_sigma * cfg.size))
    if masking and cfg.contrast != "none":
        out[~fov] = 0  # normalisation turns the black surround grey; keep it black
    return Preprocessed(image=out, geometry=geom, circle=circle)
