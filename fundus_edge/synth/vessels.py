"""The retinal vessel tree: artery/vein pairs leaving the disc, grown as noisy tapered curves.

Five trunks leave the optic disc, each as a vein and an artery: the superior and inferior
temporal arcades bend around the macula, two nasal trunks and a small macular branch. Each
generation of branches grows at once as (sprouts, steps) arrays and forks the next. Veins are
darker and wider, arteries lighter and thinner with a central light reflex on large pictures.

Two labels change the tree before it grows (their draws come before every lesion stage of
:mod:`fundus_edge.synth.registry`): CRVO dilates and twists every vein, BRVO one temporal
vein (superior or inferior, drawn here), whose haemorrhages its lesion then places.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from fundus_edge.synth.paint import ONE, SHIFT, layer_darken, layer_paint
from fundus_edge.synth.scene import Scene

__all__ = ["ROOTS", "Branch", "draw_vessels", "vein_points"]

#: Vessel trunks leaving the disc: superotemporal, inferotemporal, superonasal, inferonasal and
#: the small macular branch.
ROOTS = ("ST", "IT", "SN", "IN", "M")


@dataclass
class Branch:
    """One grown vessel segment."""

    vein: bool
    root: str  # one of ROOTS: the trunk it belongs to
    pts: np.ndarray  # (m, 2) float x, y
    w: np.ndarray  # (m,) width in px
    theta: np.ndarray  # (m,) local direction in radians (image coordinates, y down)


def grow_vessels(
    rng: np.random.Generator, sc: Scene, sprouts: dict[str, np.ndarray]
) -> list[Branch]:
    """Grow the vessel tree one generation at a time.

    ``sprouts`` holds one array per field (vein, root, x, y, angle, width, curl, decay, length,
    wiggle, spacing), one entry per sprout. A whole generation grows at once as noisy curves in
    (k sprouts, m steps) arrays; the side branches it forks become the next generation.
    """
    step = max(1.0, 0.018 * sc.R)
    taper = 0.5 ** (step / (1.4 * sc.R))  # width halves over 1.4 R without forks
    faz2 = (0.06 * sc.R) ** 2  # foveal avascular zone
    w_min = 0.45
    out: list[Branch] = []
    gen = sprouts
    for depth in range(4):
        k = len(gen["x"])
        if k == 0:
            break
        n_steps = np.maximum(2, (gen["length"] / step).astype(np.int64))  # (k,)
        m = int(n_steps.max())
        i = np.arange(m, dtype=np.float64)[None]  # (1, m)

        def col(name: str, g: dict[str, np.ndarray] = gen) -> np.ndarray:
            return g[name][:, None]  # (k, 1)

        turn = 0.04 + 0.5 * col("wiggle") / np.sqrt(n_steps[:, None])
        curl = col("curl") * step * np.exp(-i * step / col("decay"))
        theta = col("angle") + np.cumsum(curl + rng.standard_normal((k, m)) * turn, 1)
        freq, phase = rng.uniform(0.35, 0.6, (k, 1)), rng.uniform(0, 2 * np.pi, (k, 1))
        theta += col("wiggle") * np.sin(i * freq + phase)  # tortuosity, (k, m)
        xs = col("x") + np.cumsum(step * np.cos(theta), 1)
        ys = col("y") + np.cumsum(step * np.sin(theta), 1)
        fork = rng.random((k, m)) < step / col("spacing")
        fork[:, :2] = False
        w = col("width") * taper**i * 0.9 ** np.cumsum(fork, 1)
        ok = sc.inside(xs, ys, 1.0) & ((xs - sc.fx) ** 2 + (ys - sc.fy) ** 2 > faz2)
        ok &= (w >= w_min) & (i < n_steps[:, None])
        end = np.where(ok.all(1), m, np.argmin(ok, 1))  # (k,) steps kept: up to the first bad one
        for r in np.flatnonzero(end >= 2):
            e = int(end[r])
            pts = np.empty((e + 1, 2))
            pts[0] = gen["x"][r], gen["y"][r]
            pts[1:, 0], pts[1:, 1] = xs[r, :e], ys[r, :e]
            out.append(
                Branch(
                    vein=bool(gen["vein"][r]),
                    root=ROOTS[int(gen["root"][r])],
                    pts=pts,
                    w=np.concatenate([gen["width"][r : r + 1], w[r, :e]]),
                    theta=np.concatenate([theta[r, :1], theta[r, :e]]),
                )
            )
        if depth == 3:
            break
        rows, cols = np.nonzero(fork & (i < end[:, None]) & (end[:, None] >= 2))
        c = len(rows)
        side = np.where(rng.random(c) < 0.5, 1.0, -1.0)
        gen = {
            "vein": gen["vein"][rows],
            "root": gen["root"][rows],
            "x": xs[rows, cols],
            "y": ys[rows, cols],
            "angle": theta[rows, cols] + side * rng.uniform(0.45, 1.0, c),
            "width": w[rows, cols] * rng.uniform(0.5, 0.78, c),
            "curl": rng.normal(0.0, 0.6, c) / sc.R,
            "decay": np.full(c, sc.R),
            "length": gen["length"][rows] * rng.uniform(0.3, 0.55, c),
            "wiggle": gen["wiggle"][rows] * 0.7,
            "spacing": gen["spacing"][rows] * 0.85,
        }
    return out


def trunks(
    rng: np.random.Generator, sc: Scene, rd: float, labels: Collection[str], brvo_root: str | None
) -> dict[str, np.ndarray]:
    """Artery/vein pairs leaving the disc (angles for a right eye, mirrored for a left one)."""
    deg = math.pi / 180
    R = sc.R
    vein_w = rd * rng.uniform(0.15, 0.19)
    specs = [  # angle, curl (rad/px: the temporal arcades bend around the macula), length, width
        (-rng.uniform(100, 125) * deg, -1 / (rng.uniform(0.42, 0.55) * R), 1.9 * R, 1.0),
        (rng.uniform(100, 125) * deg, 1 / (rng.uniform(0.42, 0.55) * R), 1.9 * R, 1.0),
        (-rng.uniform(40, 75) * deg, rng.uniform(0, 0.6) / R, 1.2 * R, 0.75),
        (rng.uniform(40, 75) * deg, -rng.uniform(0, 0.6) / R, 1.2 * R, 0.75),
        (math.pi + rng.uniform(-0.2, 0.2), rng.normal(0, 0.5) / R, 0.55 * R, 0.35),
    ]
    rows: list[tuple[float, ...]] = []
    for root, (angle, curl, length, wf) in enumerate(specs):
        if sc.side < 0:  # mirror left-right
            angle, curl = math.pi - angle, -curl
        delta = rng.uniform(0.05, 0.16) * (1 if rng.random() < 0.5 else -1)
        for vein in (1, 0):
            width = vein_w * wf * (1.0 if vein else rng.uniform(0.65, 0.75))
            wiggle = rng.uniform(0.02, 0.06)
            if vein and ("CRVO" in labels or ROOTS[root] == brvo_root):
                width *= rng.uniform(1.3, 1.5)  # dilated
                wiggle = rng.uniform(0.2, 0.3)  # tortuous
            x = sc.dx + rng.uniform(-0.25, 0.25) * rd
            y = sc.dy + rng.uniform(-0.25, 0.25) * rd
            a = angle + (delta if vein else -delta)
            decay = rng.uniform(0.9, 1.3) * R
            rows.append((vein, root, x, y, a, width, curl, decay, length, wiggle, 0.24 * R))
    names = ("vein", "root", "x", "y", "angle", "width", "curl", "decay", "length", "wiggle")
    table = np.array(rows, dtype=np.float64)
    out = {name: table[:, j] for j, name in enumerate((*names, "spacing"))}
    out["vein"] = out["vein"].astype(bool)
    out["root"] = out["root"].astype(np.int64)
    return out


def draw_branches(
    layer: np.ndarray, branches: Iterable[Branch], scale: float = 1.0, chunk: int = 5
) -> None:
    """Draw tapered polylines: chunks of a few steps grouped by (thickness, value), one call each.

    Widths under a pixel are drawn one pixel wide with a proportionally lower value.
    """
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for b in branches:
        n = len(b.pts)
        starts = np.arange(0, n - 1, chunk)
        t = np.add.reduceat(b.w, starts) / np.diff(np.append(starts, n)) * scale  # mean width
        thick = np.where(t >= 1.0, np.round(t), 1).astype(np.int64).tolist()
        value = np.where(t >= 1.0, 255, 255 * t).astype(np.int64).tolist()
        ipts = np.round(b.pts * ONE).astype(np.int32)
        for s, th, v in zip(starts.tolist(), thick, value, strict=True):
            groups.setdefault((th, v), []).append(ipts[s : s + chunk + 1])
    for (th, v), polys in sorted(groups.items()):
        cv2.polylines(layer, polys, False, v, th, cv2.LINE_AA, SHIFT)


def vein_points(branches: list[Branch], roots: Iterable[str] | None = None) -> np.ndarray:
    """Points of veins (of ``roots``, default all) with their local direction: (k, 3) x, y, angle."""
    keep = set(ROOTS if roots is None else roots)
    rows = [np.column_stack([b.pts, b.theta]) for b in branches if b.vein and b.root in keep]
    return np.concatenate(rows) if rows else np.zeros((0, 3))


def draw_vessels(
    rng: np.random.Generator, sc: Scene, img: np.ndarray, labels: Collection[str]
) -> tuple[list[Branch], str | None]:
    """Grow the vessel tree and darken it into ``img`` (float32 RGB albedo, in place).

    Args:
        rng: the image's generator.
        sc: the picture's geometry.
        img: the picture so far.
        labels: the image's labels (CRVO and BRVO dilate veins).

    Returns:
        ``(branches, occluded)``: every grown branch, and the trunk whose vein BRVO occludes
        (``"ST"`` or ``"IT"``; None without BRVO).
    """
    occluded = ("ST" if rng.random() < 0.5 else "IT") if "BRVO" in labels else None
    size, R = sc.size, sc.R
    rd = 0.5 * (sc.drx + sc.dry)
    branches = grow_vessels(rng, sc, trunks(rng, sc, rd, labels, occluded))
    arteries = np.zeros((size, size), np.uint8)
    veins = np.zeros_like(arteries)
    draw_branches(arteries, (b for b in branches if not b.vein))
    draw_branches(veins, (b for b in branches if b.vein))
    vsig = 0.0025 * R
    layer_darken(img, arteries, vsig, (0.8, 0.45, 0.6), 0.9)
    layer_darken(img, veins, vsig, (0.58, 0.26, 0.42), 0.95)
    if R > 150:
        reflex = np.zeros_like(arteries)
        draw_branches(reflex, (b for b in branches if not b.vein and b.w[0] > 3), 0.3)
        layer_paint(img, reflex, vsig, (0.95, 0.6, 0.45), 0.25)
    return branches, occluded
