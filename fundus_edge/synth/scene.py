"""Geometry of one synthetic picture: field of view, fovea, optic disc and cup, eye side.

The healthy anatomy is drawn from the image's generator first, before any paint. Three labels
change it (their draws are part of the scene, so they come before every lesion stage of
:mod:`fundus_edge.synth.registry`): MYA tilts the disc, ODE swells it and fills its cup, ODC
enlarges the cup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Scene", "make_scene"]


@dataclass
class Scene:
    """Geometry of one picture (pixel coordinates, y down)."""

    size: int
    cx: float
    cy: float
    R: float  # FOV radius
    fx: float  # fovea
    fy: float
    dx: float  # optic disc centre and radii
    dy: float
    drx: float
    dry: float
    cup: float  # cup-to-disc ratio
    side: int  # +1: disc right of the fovea (a right eye), -1: left
    yy: np.ndarray = field(repr=False)  # (size, 1) row coordinates
    xx: np.ndarray = field(repr=False)  # (1, size) column coordinates

    def inside(self, x: np.ndarray, y: np.ndarray, margin: float = 2.0) -> np.ndarray:
        """Points inside the visible FOV (the circle within the frame), ``margin`` px in."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        r = self.R - margin
        ok = (x - self.cx) ** 2 + (y - self.cy) ** 2 < r * r
        lo, hi = margin, self.size - 1 - margin
        return ok & (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi)

    def dist2(self, x: float, y: float) -> np.ndarray:
        """Squared distance of every pixel to (x, y): (size, size) float32."""
        return (self.xx - np.float32(x)) ** 2 + (self.yy - np.float32(y)) ** 2

    def sample(
        self,
        rng: np.random.Generator,
        n: int,
        centre: tuple[float, float],
        rmin: float,
        rmax: float,
        margin: float = 3.0,
    ) -> np.ndarray:
        """Up to ``n`` (>= 1) points uniform over an annulus, kept inside the visible FOV: (k, 2)."""
        got: list[np.ndarray] = []
        count = 0
        for _ in range(12):
            m = max(8, 2 * n)
            rad = np.sqrt(rng.uniform(rmin * rmin, rmax * rmax, m))
            th = rng.uniform(0, 2 * np.pi, m)
            p = np.stack([centre[0] + rad * np.cos(th), centre[1] + rad * np.sin(th)], 1)
            p = p[self.inside(p[:, 0], p[:, 1], margin)]
            got.append(p)
            count += len(p)
            if count >= n:
                break
        pts = np.concatenate(got)[:n]
        if len(pts) == 0:  # the fovea is inside the FOV by construction
            pts = np.array([[self.fx, self.fy]])
        return pts


def make_scene(rng: np.random.Generator, size: int, labels: set[str]) -> Scene:
    """Draw the geometry of a ``size`` px picture with ``labels`` from ``rng``."""
    R = rng.uniform(0.40, 0.52) * size
    # Horizontally the circle stays in the frame; vertically it may be cut, as on wide sensors.
    cx = size / 2 + rng.uniform(-1, 1) * max(0.0, size / 2 - R - 0.01 * size)
    cy = size / 2 + rng.uniform(-0.05, 0.05) * size
    side = 1 if rng.random() < 0.5 else -1
    fx = cx - side * rng.uniform(-0.05, 0.15) * R
    fy = cy + rng.uniform(-0.06, 0.08) * R
    dx = fx + side * rng.uniform(0.62, 0.72) * R
    dy = fy - rng.uniform(0.0, 0.08) * R
    rd = rng.uniform(0.12, 0.15) * R
    drx, dry = rd, rd * rng.uniform(1.0, 1.12)
    if "MYA" in labels:
        drx *= rng.uniform(0.75, 0.9)  # tilted disc
    if "ODE" in labels:
        drx, dry = drx * 1.15, dry * 1.15
    cup = rng.uniform(0.65, 0.88) if "ODC" in labels else rng.uniform(0.15, 0.45)
    if "ODE" in labels and "ODC" not in labels:
        cup = rng.uniform(0.05, 0.15)  # the swollen disc fills its cup
    axis = np.arange(size, dtype=np.float32)
    return Scene(size, cx, cy, R, fx, fy, dx, dy, drx, dry, cup, side, axis[:, None], axis[None, :])
