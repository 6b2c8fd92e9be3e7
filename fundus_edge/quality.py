"""Is a fundus photograph good enough to grade? Sharpness, exposure and field of view.

All measures are taken inside the field of view on a copy resized so the circle is
``analysis_size`` pixels across, which makes them independent of the camera's resolution.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.options import options_from_dict
from fundus_edge.preprocess import Circle, as_rgb_uint8, crop_square, square_around

__all__ = ["REASONS", "Quality", "QualityConfig", "assess_quality"]

# Checks in the order they are applied; the first that fails is the reason. Exposure comes
# first because a dark or washed-out image makes the other two measures meaningless.
REASONS = ("underexposed", "overexposed", "no_fov", "blurry")


@dataclass
class QualityConfig:
    """Thresholds of the quality gate; stored in model metadata via :meth:`to_dict`.

    Attributes:
        analysis_size: the field of view is resized to this many pixels across.
        dark_level: luminance (0..255) below which a pixel counts as underexposed.
        bright_level: luminance above which a pixel counts as overexposed.
        max_underexposed: largest passing fraction of underexposed pixels in the field.
        max_overexposed: largest passing fraction of overexposed pixels in the field.
        min_sharpness: smallest passing sharpness (see :class:`Quality`).
        require_fov: fail images whose field of view was not found.
        inner: fraction of the radius measured (the rim is dark and its edge is not detail).
    """

    analysis_size: int = 512
    dark_level: float = 15.0
    bright_level: float = 235.0
    max_underexposed: float = 0.5
    max_overexposed: float = 0.2
    min_sharpness: float = 0.08
    require_fov: bool = True
    inner: float = 0.9

    def __post_init__(self) -> None:
        if not 32 <= int(self.analysis_size) <= 4096:
            raise UserError(
                f"quality option 'analysis_size' must be in 32..4096, got {self.analysis_size}"
            )
        for name in ("max_underexposed", "max_overexposed"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise UserError(
                    f"quality option {name!r} must be in (0, 1], got {getattr(self, name)}"
                )
        if not 0.0 <= self.dark_level < self.bright_level <= 255.0:
            raise UserError(
                "quality options 'dark_level' < 'bright_level' must lie in 0..255, got "
                f"{self.dark_level} and {self.bright_level}"
            )
        if not self.min_sharpness > 0:
            raise UserError(f"quality option 'min_sharpness' must be > 0, got {self.min_sharpness}")
        if not 0.2 <= self.inner <= 1.0:
            raise UserError(f"quality option 'inner' must be in 0.2..1, got {self.inner}")
        self.analysis_size = int(self.analysis_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every threshold."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityConfig:
        """Build from a dict (missing keys take defaults).

        Raises:
            UserError: a key that is not an option, or a bad value.
        """
        return options_from_dict(cls, d, "quality")


@dataclass
class Quality:
    """The verdict on one image.

    Attributes:
        score: 0..1, the worst of the per-check scores; each is 0.5 at its threshold, so an
            image passes exactly when every check scores at least 0.5.
        passed: every check passed.
        reason: ``"ok"`` or the first failing check: ``"underexposed"``, ``"overexposed"``,
            ``"no_fov"`` or ``"blurry"``.
        sharpness: standard deviation of the Laplacian of the green channel divided by its
            mean, in the inner field at ``analysis_size`` (contrast- and resolution-free).
        underexposed: fraction of field pixels darker than ``dark_level``.
        overexposed: fraction of field pixels brighter than ``bright_level``.
        fov_found: the circular field of view was found.
    """

    score: float
    passed: bool
    reason: str
    sharpness: float
    underexposed: float
    overexposed: float
    fov_found: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def assess_quality(image: np.ndarray, circle: Circle, cfg: QualityConfig | None = None) -> Quality:
    """Grade the image quality inside the field of view.

    Args:
        image: any uint8 image (grey, RGB, RGBA; any size).
        circle: its field of view, from :func:`fundus_edge.preprocess.find_fov`; when
            ``found`` is False the circle given (the frame's inscribed circle) is measured.
        cfg: thresholds; defaults to :class:`QualityConfig()`.

    Returns:
        The :class:`Quality` verdict.
    """
    cfg = cfg or QualityConfig()
    img = as_rgb_uint8(image)
    n = cfg.analysis_size
    h, w = img.shape[:2]
    r = circle.r if circle.r > 0 and np.isfinite(circle.r) else min(h, w) / 2.0
    r = min(r, 2.0 * max(h, w))  # an absurd circle must not make a huge padded crop
    cx = circle.cx if np.isfinite(circle.cx) else (w - 1) / 2.0
    cy = circle.cy if np.isfinite(circle.cy) else (h - 1) / 2.0
    x0, y0, side = square_around(cx, cy, r, n)
    crop = crop_square(img, x0, y0, side, n, cv2.INTER_AREA)  # (n, n, 3)

    # Output pixel u has its centre at frame x0 - 0.5 + (u + 0.5)·k; padding is not fundus.
    k = side / n
    centres = np.arange(n) + 0.5
    fx = x0 - 0.5 + centres * k
    fy = y0 - 0.5 + centres * k
    in_frame = ((fy > -0.5) & (fy < h - 0.5))[:, None] & ((fx > -0.5) & (fx < w - 0.5))[None, :]
    ccx = (cx - x0 + 0.5) / k - 0.5
    ccy = (cy - y0 + 0.5) / k - 0.5
    rr = r / k
    yy, xx = np.ogrid[:n, :n]
    d2 = (xx - ccx) ** 2 + (yy - ccy) ** 2
    field = in_frame & (d2 <= rr * rr)
    inner = in_frame & (d2 <= (cfg.inner * rr) ** 2)

    lum = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    n_field = int(np.count_nonzero(field))
    if n_field:
        values = lum[field]
        underexposed = float(np.count_nonzero(values < cfg.dark_level)) / n_field
        overexposed = float(np.count_nonzero(values > cfg.bright_level)) / n_field
    else:
        underexposed, overexposed = 1.0, 0.0

    # Sharpness: Laplacian spread relative to brightness, on green (vessels are clearest
    # there). Only the inner field: the rim's step edge is not image detail.
    green = crop[:, :, 1].astype(np.float32)
    lap = cv2.Laplacian(green, cv2.CV_32F, ksize=3)
    if np.count_nonzero(inner) >= 16:
        mean = float(green[inner].mean())
        sharpness = float(lap[inner].std()) / max(mean, 1.0)
    else:
        sharpness = 0.0

    scores = {
        "underexposed": _below(underexposed, cfg.max_underexposed),
        "overexposed": _below(overexposed, cfg.max_overexposed),
        "no_fov": 1.0 if circle.found or not cfg.require_fov else 0.0,
        "blurry": min(1.0, 0.5 * sharpness / cfg.min_sharpness),
    }
    failed = [
        name
        for name, ok in (
            ("underexposed", underexposed <= cfg.max_underexposed),
            ("overexposed", overexposed <= cfg.max_overexposed),
            ("no_fov", circle.found or not cfg.require_fov),
            ("blurry", sharpness >= cfg.min_sharpness),
        )
        if not ok
    ]
    return Quality(
        score=float(min(scores.values())),
        passed=not failed,
        reason=failed[0] if failed else "ok",
        sharpness=sharpness,
        underexposed=underexposed,
        overexposed=overexposed,
        fov_found=bool(circle.found),
    )


def _below(value: float, limit: float) -> float:
    """1 at 0, 0.5 at ``limit``, 0 at twice the limit."""
    return float(np.clip(1.0 - 0.5 * value / limit, 0.0, 1.0))
