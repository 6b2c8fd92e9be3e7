"""Crop squares and the mapping between the model input and the original frame.

Coordinates: frame pixel ``(i, j)`` (column, row) has its centre at ``x = i, y = j``. The crop
is a square of ``side`` frame pixels whose first column/row is ``x0, y0`` (negative or past the
frame where the circle leaves it; those pixels are black padding), resized to ``size`` pixels
with OpenCV's half-pixel convention: output pixel ``u`` has its centre at frame
``x0 - 0.5 + (u + 0.5) * side / size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.preprocess.fov import Circle

__all__ = [
    "Geometry",
    "Reductions",
    "crop_geometry",
    "crop_square",
    "disc_mask",
    "square_around",
]


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


def crop_square(
    img: np.ndarray,
    x0: int,
    y0: int,
    side: int,
    size: int,
    interpolation: int,
    *,
    reductions: Reductions | None = None,
) -> np.ndarray:
    """Crop ``side`` frame pixels from ``(x0, y0)`` (zero padding outside) and resize.

    Area reduction by more than 2x first halves the square with OpenCV's 2x2 area filter (its
    vectorised path: 0.34 ms for a 944-px field of a 1920x1080 frame, against 1.3-1.9 ms for
    one integer-factor reduction by 3-8 and 4-25 ms for one fractional one on the 2-core
    EPYC) as often as the result stays at least ``size`` wide, then resizes the last, mild
    (< 2x) step. Each halving averages exact 2x2 blocks, so the chain is the box filter of
    the whole factor up to uint8 rounding (at most one level per halving). :func:`square_around`
    makes the side a multiple of the halvings' factor; any other side is reduced by its
    largest integer factor instead, or by one fractional resize.

    Args:
        img: ``(H, W)`` or ``(H, W, C)`` array (an image, or a mask to crop alike).
        x0: frame column of the crop's first pixel.
        y0: frame row of the crop's first pixel.
        side: crop side in frame pixels.
        size: output side.
        interpolation: an OpenCV ``INTER_*`` flag.
        reductions: the frame's :class:`Reductions`, where the halvings of a square already
            reduced for another output (the model input, then the quality gate's copy) are
            kept and reused (only when it is this very ``img``); None: nothing kept.

    Returns:
        ``(size, size)`` or ``(size, size, C)`` array of ``img``'s dtype.
    """
    h, w = img.shape[:2]
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + side, w), min(y0 + side, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return np.zeros((size, size, *img.shape[2:]), dtype=img.dtype)
    if interpolation == cv2.INTER_AREA:
        levels = _halvings(side, size)
        if levels:
            if reductions is None or reductions.image is not img:
                reductions = Reductions(img)  # (as_rgb_uint8 made another array, say)
            crop = reductions.halved(x0, y0, side, levels)
            if side >> levels == size:
                return crop
            return _keep_channels(cv2.resize(crop, (size, size), interpolation=interpolation), img)
        k = side // size
        if k >= 2 and side % k == 0:
            # An odd side: one integer-factor area reduction (OpenCV's scalar path), then the
            # mild step.
            crop = _area_reduce(img, x0, y0, side, k)
            if side // k == size:
                return crop
            return cv2.resize(crop, (size, size), interpolation=interpolation)
    crop = _padded(img, x0, y0, side, side)
    if side == size:
        # A copy even when no padding made one: callers mask the result in place, and the
        # frame (a camera's read-only buffer, the caller's image) must stay as it came.
        return np.array(crop, order="C", copy=crop.base is not None or crop is img)
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def _halvings(side: int, size: int) -> int:
    """How many 2x area halvings :func:`crop_square` takes first: the most that divide ``side``
    exactly and leave at least ``size`` pixels."""
    n = 0
    while side % (2 << n) == 0 and side // (2 << n) >= size:
        n += 1
    return n


def _keep_channels(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``cv2.resize`` drops a single channel's axis: put it back as ``like`` has it."""
    if like.ndim == 3 and out.ndim == 2:
        return out[:, :, None]
    return out


class Reductions:
    """One frame's area-halved crop squares, kept while its outputs are made.

    :meth:`Predictor.prepare <fundus_edge.runtime.Predictor.prepare>` makes the model input
    and the quality gate's copy of the field from the same square of a frame (without a
    margin, :func:`square_around` gives both the same square): with one :class:`Reductions`
    the frame's pixels are read once, by the first halving, and each output takes the level
    it needs. Results are those of :func:`crop_square` without it, byte for byte.

    Args:
        image: the frame; :func:`crop_square` uses the kept levels only for this very array.
    """

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self._levels: dict[tuple[int, int, int], list[np.ndarray]] = {}

    def halved(self, x0: int, y0: int, side: int, levels: int) -> np.ndarray:
        """The padded square ``(x0, y0, side)`` area-halved ``levels`` (>= 1) times (``side``
        divisible by ``2**levels``); the first halving reads the frame, the others its result."""
        kept = self._levels.setdefault((x0, y0, side), [])
        if not kept:
            kept.append(_area_reduce(self.image, x0, y0, side, 2))
        while len(kept) < levels:
            n = kept[-1].shape[0] // 2
            kept.append(
                _keep_channels(
                    cv2.resize(kept[-1], (n, n), interpolation=cv2.INTER_AREA), self.image
                )
            )
        return kept[levels - 1]


def _padded(img: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """The ``width`` x ``height`` rectangle from frame pixel ``(x0, y0)``, zeros outside the
    frame: a view of ``img`` when it lies inside, else a padded copy."""
    h, w = img.shape[:2]
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + width, w), min(y0 + height, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return np.zeros((height, width, *img.shape[2:]), dtype=img.dtype)
    crop = img[cy0:cy1, cx0:cx1]
    pads = (cy0 - y0, y0 + height - cy1, cx0 - x0, x0 + width - cx1)  # top, bottom, left, right
    if any(pads):
        crop = cv2.copyMakeBorder(crop, *pads, cv2.BORDER_CONSTANT, value=(0, 0, 0, 0))
    return crop


def _area_reduce(img: np.ndarray, x0: int, y0: int, side: int, k: int) -> np.ndarray:
    """The padded square reduced by the integer factor ``k`` (``side % k == 0``) with OpenCV's
    area filter, without copying the square into a padded frame first.

    OpenCV's integer-factor area path computes each output pixel from its own ``k x k``
    block alone, so the blocks wholly inside the frame are reduced straight from a view of
    it and only the thin bands of blocks that reach past its edge from padded copies: the
    same bytes as reducing the padded square (uint8 images; other types are reduced from the
    padded square itself). A 1088-px field of a 1920x1080 frame, 25 rows past the top and the
    bottom, saves copying 3.5 MB per call.
    """
    h, w = img.shape[:2]
    n = side // k
    # Blocks [i0, i1) x [j0, j1) lie inside the frame.
    i0, j0 = max(0, -(y0 // k)), max(0, -(x0 // k))
    i1, j1 = min(n, (h - y0) // k), min(n, (w - x0) // k)
    # uint8 only: OpenCV's float path vectorises rows by their alignment, so a band can differ
    # from the whole in the last bit; and cv2.resize drops a single channel's axis.
    plain = img.dtype == np.uint8 and not (img.ndim == 3 and img.shape[2] == 1)
    if not plain or i1 - i0 < 1 or j1 - j0 < 1 or (i0, j0, i1, j1) == (0, 0, n, n):
        return cv2.resize(_padded(img, x0, y0, side, side), (n, n), interpolation=cv2.INTER_AREA)
    out = np.empty((n, n, *img.shape[2:]), dtype=img.dtype)

    def reduce(r0: int, r1: int, c0: int, c1: int) -> None:  # blocks [r0, r1) x [c0, c1)
        if r1 > r0 and c1 > c0:
            part = _padded(img, x0 + c0 * k, y0 + r0 * k, (c1 - c0) * k, (r1 - r0) * k)
            out[r0:r1, c0:c1] = cv2.resize(part, (c1 - c0, r1 - r0), interpolation=cv2.INTER_AREA)

    reduce(i0, i1, j0, j1)  # the inside: a view, no copy
    reduce(0, i0, 0, n)  # the bands past the top and the bottom, full width
    reduce(i1, n, 0, n)
    reduce(i0, i1, 0, j0)  # past the left and the right, between them
    reduce(i0, i1, j1, n)
    return out


def square_around(
    cx: float, cy: float, half: float, size: int, area: bool = True
) -> tuple[int, int, int]:
    """The integer crop square ``(x0, y0, side)`` centred on ``(cx, cy)``, ``2·half`` wide.

    With ``area`` interpolation the side is rounded up to a multiple of the largest power of
    two ``2**n <= side / size`` (at most ``1/size`` wider) so :func:`crop_square` can first
    halve it ``n`` times on OpenCV's fast 2x2 area path.
    """
    side = max(1, round(2.0 * half))
    k = 1 << max(0, (side // size).bit_length() - 1) if size > 0 else 1
    if area and k >= 2:
        side = -(-side // k) * k
    # Centre the integer square on the circle: its centre sits at x0 - 0.5 + side / 2.
    return round(cx + 0.5 - side / 2.0), round(cy + 0.5 - side / 2.0), side


def crop_geometry(
    h: int, w: int, circle: Circle, size: int, margin: float, crop_fov: bool, area: bool
) -> tuple[int, int, int]:
    """The crop square ``(x0, y0, side)`` of a frame, as :func:`preprocess` chooses it.

    The square around the circle (``margin`` added to its radius) when ``crop_fov`` and a
    circle was found; else, and always for a frame-filling (``"rect"``) field, the centred
    square of the frame.
    """
    if crop_fov and circle.found and not circle.is_rect:
        return square_around(circle.cx, circle.cy, circle.r * (1.0 + margin), size, area)
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def disc_mask(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """(size, size) bool: output pixel centres inside the circle."""
    yy, xx = np.ogrid[:size, :size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
