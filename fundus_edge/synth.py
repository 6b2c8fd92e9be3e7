"""Synthetic colour fundus photographs with per-label lesion masks, written in RFMiD's layout.

Each image is drawn from scratch with numpy and OpenCV: an orange-red fundus with camera colour
variation and illumination fall-off inside a circular field of view (FOV) of varying size and
offset on black, an optic disc with a cup, a darker macula and fovea, an artery/vein tree that
branches from the disc and arches around the macula (arteries lighter and thinner than veins),
then the lesions of the image's labels, and finally optics blur, sensor noise and, usually, a
JPEG round trip. A CNN has to look at the lesions to tell the labels apart, and every lesion is
also drawn into a mask so that attribution maps can be scored against it.

What each label draws and what its mask marks (uint8 0/255 at image size, always inside the
visible FOV):

========  ==================================================  ===============================
label     appearance                                          mask
========  ==================================================  ===============================
DR        microaneurysms, blot haemorrhages, hard exudates,   every DR lesion
          sometimes cotton-wool spots
ARMD      soft drusen clustered at the macula, sometimes      the macular lesions
          pigment clumps or a patch of atrophy
MH        media haze: the whole picture blurred, low          the whole visible FOV (a global
          contrast, veiled                                    finding has no smaller place)
DN        small drusen scattered over the posterior pole      the drusen
MYA       peripapillary atrophy crescent, tilted disc,        the crescent, plus the
          usually mild tessellation                           tessellated area when drawn
BRVO      flame haemorrhages along one temporal vein          the haemorrhages
          downstream of an occlusion; that vein dilated
          and tortuous
TSLN      tessellation (choroidal vessels visible through     the tessellated area
          a thin, darker pigment epithelium)
LS        laser scars: pale spots with pigmented centres      the scars
          (panretinal pattern, sometimes macular grid)
CSR       serous detachment at the macula: a dull, darker     the detachment
          oval with a bright rim reflex
ODC       cup-to-disc ratio 0.65-0.88 (normal 0.15-0.45)      the optic disc
CRVO      flame and blot haemorrhages in all four             the haemorrhages
          quadrants, all veins dilated and tortuous
ODE       swollen, hyperaemic disc with blurred margins       the swollen disc area
          hiding the vessels, sometimes peripapillary
          haemorrhages
========  ==================================================  ===============================

Labels are drawn independently with per-label prevalences skewed like RFMiD's training set
(:data:`DEFAULT_PREVALENCE`), then a few clinical co-occurrences are added
(:data:`COOCCURRENCE`), so the marginal rate of TSLN, LS, DN and ODE ends slightly above its
table value. ``Disease_Risk`` is 1 when any label is.

Output layout::

    OUT/Training_Set/Training/{ID}.png      OUT/Training_Set/RFMiD_Training_Labels.csv
    OUT/Evaluation_Set/Validation/{ID}.png  OUT/Evaluation_Set/RFMiD_Validation_Labels.csv
    OUT/Test_Set/Test/{ID}.png              OUT/Test_Set/RFMiD_Testing_Labels.csv
    OUT/<Split_Set>/Masks/{ID}_{LABEL}.png  OUT/<Split_Set>/Meta/{ID}.json
    OUT/synth.json

Every image draws from its own generator seeded by ``SeedSequence(seed, spawn_key=(split,
index))``, so the files are byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fundus_edge.data import RFMID_LABELS_46
from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from fundus_edge.log import get_logger, progress

__all__ = [
    "COOCCURRENCE",
    "DEFAULT_PREVALENCE",
    "GLOBAL_LABELS",
    "LABELS",
    "NON_FUNDUS_KINDS",
    "SPLIT_LAYOUT",
    "SynthConfig",
    "frame_filling",
    "generate_dataset",
    "generate_image",
    "image_rng",
    "non_fundus_frame",
    "parse_splits",
    "sample_labels",
]

log = get_logger("synth")

#: Label columns in RFMiD's header order (``Disease_Risk`` is written before them): the
#: conditions this generator draws, ordered by RFMiD's own header so the two cannot drift.
_DRAWN = {"DR", "ARMD", "MH", "DN", "MYA", "BRVO", "TSLN", "LS", "CSR", "ODC", "CRVO", "ODE"}
LABELS: tuple[str, ...] = tuple(n for n in RFMID_LABELS_46 if n in _DRAWN)

#: Labels without a place: their mask is the whole visible FOV.
GLOBAL_LABELS: frozenset[str] = frozenset({"MH"})

#: Per-image probability of each label. RFMiD's training counts out of 1,920 (DR 376, MH 317,
#: ODC 282, TSLN 186, DN 138, MYA 101, ARMD 100, BRVO 73, ODE 58, LS 47, CSR 37, CRVO 28)
#: rounded, with a 3 % floor so that a demo set of a hundred images has positives of each.
DEFAULT_PREVALENCE: dict[str, float] = {
    "DR": 0.20,
    "ARMD": 0.05,
    "MH": 0.16,
    "DN": 0.07,
    "MYA": 0.05,
    "BRVO": 0.04,
    "TSLN": 0.09,
    "LS": 0.03,
    "CSR": 0.03,
    "ODC": 0.15,
    "CRVO": 0.03,
    "ODE": 0.03,
}

#: (given, then, probability): clinical co-occurrences applied after the independent draws.
#: Myopic fundi are often tessellated, diabetic eyes are lasered, drusen come in both forms,
#: a central vein occlusion swells the disc.
COOCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("MYA", "TSLN", 0.5),
    ("DR", "LS", 0.1),
    ("ARMD", "DN", 0.2),
    ("CRVO", "ODE", 0.25),
)

#: split key -> (set folder, image folder, labels CSV), as RFMiD ships them.
SPLIT_LAYOUT: dict[str, tuple[str, str, str]] = {
    "train": ("Training_Set", "Training", "RFMiD_Training_Labels.csv"),
    "val": ("Evaluation_Set", "Validation", "RFMiD_Validation_Labels.csv"),
    "test": ("Test_Set", "Test", "RFMiD_Testing_Labels.csv"),
}
_SPLIT_KEYS = tuple(SPLIT_LAYOUT)
_MIN_SIZE = 64


# --------------------------------------------------------------------------------------------
# Configuration and label sampling
# --------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """Parameters of a synthetic data set; everything that changes the bytes written.

    Attributes:
        size: image side in pixels (square images).
        seed: non-negative integer; each image's generator derives from it.
        prevalence: per-label probabilities overriding :data:`DEFAULT_PREVALENCE` (a subset of
            :data:`LABELS` may be given).
        prevalence_scale: multiplies every prevalence (clipped to 1); 0 gives healthy eyes only.
        splits: fractions of train, validation and test images (sum 1).
    """

    size: int = 512
    seed: int = 0
    prevalence: dict[str, float] | None = None
    prevalence_scale: float = 1.0
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first bad field."""
        if int(self.size) != self.size or self.size < _MIN_SIZE:
            raise UserError(f"--size must be an integer >= {_MIN_SIZE} (got {self.size})")
        if int(self.seed) != self.seed or self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer (got {self.seed})")
        if not (math.isfinite(self.prevalence_scale) and self.prevalence_scale >= 0):
            raise UserError(
                f"--prevalence-scale must be a finite number >= 0 (got {self.prevalence_scale})"
            )
        for name, p in (self.prevalence or {}).items():
            if name not in LABELS:
                raise UserError(f"prevalence: unknown label {name!r} (known: {', '.join(LABELS)})")
            if not (0.0 <= float(p) <= 1.0):
                raise UserError(f"prevalence[{name}] must be in [0, 1] (got {p})")
        _check_splits(self.splits)

    def resolved_prevalence(self) -> dict[str, float]:
        """Per-label probabilities after overrides and ``prevalence_scale``, in LABELS order."""
        base = {**DEFAULT_PREVALENCE, **(self.prevalence or {})}
        return {k: min(1.0, float(base[k]) * float(self.prevalence_scale)) for k in LABELS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["splits"] = list(self.splits)
        return d


def sample_labels(rng: np.random.Generator, prevalence: dict[str, float]) -> set[str]:
    """Draw one image's labels: independent Bernoulli draws, then :data:`COOCCURRENCE`.

    Args:
        rng: the image's generator (always advanced by the same amount).
        prevalence: probability per label; labels missing from it are never drawn.

    Returns:
        The set of positive labels (empty for a healthy eye).
    """
    u = rng.random(len(LABELS))
    labels = {k for k, ui in zip(LABELS, u, strict=True) if ui < prevalence.get(k, 0.0)}
    v = rng.random(len(COOCCURRENCE))
    for (given, then, p), vi in zip(COOCCURRENCE, v, strict=True):
        if given in labels and vi < p:
            labels.add(then)
    return labels


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` (1-based ID) of ``split``; independent of worker count."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(_SPLIT_KEYS.index(split), int(index)))
    return np.random.Generator(np.random.PCG64(ss))


def parse_splits(text: str) -> tuple[float, float, float]:
    """Parse ``"0.6,0.2,0.2"`` into train/validation/test fractions (:class:`UserError` if bad)."""
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise UserError(
            f"--splits: expected three numbers like 0.6,0.2,0.2 (got {text!r})"
        ) from None
    _check_splits(parts)
    return parts  # type: ignore[return-value]


def _check_splits(splits: Sequence[float]) -> None:
    if len(splits) != 3 or any(not math.isfinite(f) or f < 0 for f in splits):
        raise UserError(f"--splits: expected three fractions >= 0 (got {tuple(splits)})")
    if abs(sum(splits) - 1.0) > 1e-6:
        raise UserError(
            f"--splits: fractions must sum to 1 (got {tuple(splits)}, sum {sum(splits)})"
        )


def _split_counts(n: int, splits: Sequence[float]) -> dict[str, int]:
    # Round the cumulative boundaries so the counts always add up to n.
    b1 = round(n * splits[0])
    b2 = max(b1, round(n * (splits[0] + splits[1])))
    return {"train": b1, "val": b2 - b1, "test": n - b2}


# --------------------------------------------------------------------------------------------
# Drawing primitives
# --------------------------------------------------------------------------------------------

_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel centres and radii
_ONE = 1 << _SHIFT


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(x * _ONE), round(y * _ONE)


def _disk(layer: np.ndarray, x: float, y: float, r: float, value: float = 255) -> None:
    cv2.circle(
        layer, _pt(x, y), max(_ONE // 2, round(r * _ONE)), int(value), -1, cv2.LINE_AA, _SHIFT
    )


def _ellipse(layer, x, y, a, b, angle_deg, value=255, thickness=-1) -> None:
    axes = (max(_ONE // 2, round(a * _ONE)), max(_ONE // 2, round(b * _ONE)))
    cv2.ellipse(
        layer, _pt(x, y), axes, float(angle_deg), 0, 360, int(value), thickness, cv2.LINE_AA, _SHIFT
    )


def _alpha(layer: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    a = layer.astype(np.float32) * np.float32(1 / 255)
    if sigma >= 0.3:
        a = cv2.GaussianBlur(a, (0, 0), sigma)
    return a


def _roi(layer: np.ndarray, pad: float) -> tuple[slice, slice] | None:
    """Bounding box of the non-zero pixels of ``layer`` grown by ``pad``; None if empty."""
    x, y, w, h = cv2.boundingRect(layer)
    if w == 0 or h == 0:
        return None
    p = math.ceil(pad)
    rows, cols = layer.shape[:2]
    return slice(max(0, y - p), min(rows, y + h + p)), slice(max(0, x - p), min(cols, x + w + p))


def _layer_darken(img, layer, sigma: float, tint, strength: float = 1.0) -> None:
    """:func:`_darken` by a drawn uint8 layer, blurred by ``sigma``, on its bounding box only."""
    roi = _roi(layer, 3 * sigma + 1)
    if roi is not None:
        _darken(img[roi], np.float32(strength) * _alpha(layer[roi], sigma), tint)


def _layer_paint(img, layer, sigma: float, colour, strength: float = 1.0) -> None:
    """:func:`_paint` by a drawn uint8 layer, blurred by ``sigma``, on its bounding box only."""
    roi = _roi(layer, 3 * sigma + 1)
    if roi is not None:
        _paint(img[roi], np.float32(strength) * _alpha(layer[roi], sigma), colour)


def _darken(img: np.ndarray, a: np.ndarray, tint: Sequence[float]) -> None:
    """Multiply toward ``tint`` by alpha ``a`` (dark lesions keep the local illumination)."""
    k = np.float32(1.0) - np.asarray(tint, np.float32)
    img *= np.float32(1.0) - a[..., None] * k


def _paint(img: np.ndarray, a: np.ndarray, colour: Sequence[float]) -> None:
    """Blend toward the albedo ``colour`` by alpha ``a``."""
    img += a[..., None] * (np.asarray(colour, np.float32) - img)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Roughly unit-variance noise with about ``cells`` blobs across: (size, size, channels)."""
    g = rng.standard_normal((cells, cells, channels), dtype=np.float32)
    out = cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC)
    return out.reshape(size, size, channels)


@dataclass
class _Scene:
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


def _rec(label: str, kind: str, x: float, y: float, r: float, **extra: Any) -> dict[str, Any]:
    d = {"label": label, "kind": kind, "x": round(float(x), 1), "y": round(float(y), 1)}
    d["r"] = round(float(r), 2)
    d.update({k: round(float(v), 3) if isinstance(v, float) else v for k, v in extra.items()})
    return d


# --------------------------------------------------------------------------------------------
# Vessels
# --------------------------------------------------------------------------------------------


#: Vessel trunks leaving the disc: superotemporal, inferotemporal, superonasal, inferonasal and
#: the small macular branch.
_ROOTS = ("ST", "IT", "SN", "IN", "M")


@dataclass
class _Branch:
    """One grown vessel segment."""

    vein: bool
    root: str  # one of _ROOTS: the trunk it belongs to
    pts: np.ndarray  # (m, 2) float x, y
    w: np.ndarray  # (m,) width in px
    theta: np.ndarray  # (m,) local direction in radians (image coordinates, y down)


def _grow_vessels(
    rng: np.random.Generator, sc: _Scene, sprouts: dict[str, np.ndarray]
) -> list[_Branch]:
    """Grow the vessel tree one generation at a time.

    ``sprouts`` holds one array per field (vein, root, x, y, angle, width, curl, decay, length,
    wiggle, spacing), one entry per sprout. A whole generation grows at once as noisy curves in
    (k sprouts, m steps) arrays; the side branches it forks become the next generation.
    """
    step = max(1.0, 0.018 * sc.R)
    taper = 0.5 ** (step / (1.4 * sc.R))  # width halves over 1.4 R without forks
    faz2 = (0.06 * sc.R) ** 2  # foveal avascular zone
    w_min = 0.45
    out: list[_Branch] = []
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
                _Branch(
                    vein=bool(gen["vein"][r]),
                    root=_ROOTS[int(gen["root"][r])],
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


def _trunks(
    rng: np.random.Generator, sc: _Scene, rd: float, labels: set[str], brvo_root: str | None
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
            if vein and ("CRVO" in labels or _ROOTS[root] == brvo_root):
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


def _draw_branches(
    layer: np.ndarray, branches: Iterable[_Branch], scale: float = 1.0, chunk: int = 5
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
        ipts = np.round(b.pts * _ONE).astype(np.int32)
        for s, th, v in zip(starts.tolist(), thick, value, strict=True):
            groups.setdefault((th, v), []).append(ipts[s : s + chunk + 1])
    for (th, v), polys in sorted(groups.items()):
        cv2.polylines(layer, polys, False, v, th, cv2.LINE_AA, _SHIFT)


def _vein_points(branches: list[_Branch], roots: Iterable[str] | None = None) -> np.ndarray:
    """Points of veins (of ``roots``, default all) with their local direction: (k, 3) x, y, angle."""
    keep = set(_ROOTS if roots is None else roots)
    rows = [np.column_stack([b.pts, b.theta]) for b in branches if b.vein and b.root in keep]
    return np.concatenate(rows) if rows else np.zeros((0, 3))


# --------------------------------------------------------------------------------------------
# Lesions: each returns its label's mask (uint8 0/255) and lesion records
# --------------------------------------------------------------------------------------------

_HAEM_TINT = (0.5, 0.16, 0.2)
_EXUDATE = (1.0, 0.93, 0.55)
_DRUSEN = (0.97, 0.84, 0.5)


def _flames(rng, sc, layer, pts: np.ndarray, label: str, recs: list, spread: float) -> None:
    """Flame haemorrhages: streaks along the nerve fibres, here along the local vein direction."""
    R = sc.R
    for x, y, ang in pts:
        off = rng.normal(0, spread)
        x2, y2 = x - off * math.sin(ang), y + off * math.cos(ang)
        if not sc.inside(x2, y2, 3.0):
            x2, y2 = x, y
        a = rng.uniform(0.018, 0.045) * R
        b = a * rng.uniform(0.2, 0.4)
        _ellipse(layer, x2, y2, a, b, math.degrees(ang), rng.uniform(180, 255))
        recs.append(_rec(label, "flame_haemorrhage", x2, y2, a, angle=math.degrees(ang)))


def _blots(rng, sc, layer, pts: np.ndarray, rmin, rmax, label, kind, recs) -> None:
    for x, y in pts:
        r = rng.uniform(rmin, rmax) * sc.R
        _disk(layer, x, y, r)
        for _ in range(int(rng.integers(1, 3))):  # irregular outline: a few overlapping disks
            _disk(
                layer,
                x + rng.normal(0, 0.4 * r),
                y + rng.normal(0, 0.4 * r),
                r * rng.uniform(0.5, 0.8),
            )
        recs.append(_rec(label, kind, x, y, r))


def _spots(rng, sc, layer, pts, rmin, rmax, label, kind, recs, vmin=200) -> None:
    for x, y in pts:
        r = rng.uniform(rmin, rmax) * sc.R
        _disk(layer, x, y, r, rng.uniform(vmin, 255))
        recs.append(_rec(label, kind, x, y, r))


def _draw_dr(rng, sc: _Scene, img, recs) -> np.ndarray:
    size, R, fov = sc.size, sc.R, (sc.fx, sc.fy)
    red = np.zeros((size, size), np.uint8)
    bright = np.zeros_like(red)
    ma = sc.sample(rng, int(rng.integers(4, 26)), fov, 0.06 * R, 0.75 * R)
    _spots(rng, sc, red, ma, 0.005, 0.009, "DR", "microaneurysm", recs, vmin=230)
    blots = sc.sample(rng, int(rng.integers(1, 9)), fov, 0.1 * R, 0.85 * R)
    _blots(rng, sc, red, blots, 0.014, 0.032, "DR", "blot_haemorrhage", recs)
    if rng.random() < 0.75:  # hard exudates, in clusters (often a ring) near the macula
        for c in sc.sample(rng, int(rng.integers(1, 4)), fov, 0.12 * R, 0.5 * R):
            pts = sc.sample(rng, int(rng.integers(4, 18)), (c[0], c[1]), 0.0, 0.08 * R)
            _spots(rng, sc, bright, pts, 0.004, 0.011, "DR", "hard_exudate", recs)
    soft = np.zeros_like(red)
    if rng.random() < 0.3:  # cotton-wool spots: soft, fluffy, near the arcades
        pts = sc.sample(rng, int(rng.integers(1, 4)), (sc.dx, sc.dy), 0.25 * R, 0.6 * R)
        _spots(rng, sc, soft, pts, 0.025, 0.04, "DR", "cotton_wool_spot", recs, vmin=170)
    _layer_darken(img, red, 0.0025 * R, _HAEM_TINT)
    _layer_paint(img, bright, 0.002 * R, _EXUDATE)
    if soft.any():
        _layer_paint(img, soft, 0.012 * R, (0.95, 0.88, 0.78), 0.7)
    return red | bright | soft


def _draw_armd(rng, sc: _Scene, img, recs) -> np.ndarray:
    R, fov = sc.R, (sc.fx, sc.fy)
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = sc.sample(rng, int(rng.integers(10, 40)), fov, 0.0, 0.24 * R)
    _spots(rng, sc, layer, pts, 0.012, 0.035, "ARMD", "soft_druse", recs, vmin=170)
    mask = layer.copy()
    if rng.random() < 0.3:  # geographic atrophy: a pale patch over the fovea
        atrophy = np.zeros_like(layer)
        a, b = rng.uniform(0.06, 0.12) * R, rng.uniform(0.05, 0.1) * R
        _ellipse(atrophy, sc.fx, sc.fy, a, b, rng.uniform(0, 180))
        _layer_paint(img, atrophy, 0.01 * R, (0.93, 0.7, 0.5), 0.75)
        recs.append(_rec("ARMD", "geographic_atrophy", sc.fx, sc.fy, a))
        mask |= atrophy
    _layer_paint(img, layer, 0.004 * R, _DRUSEN, 0.8)
    if rng.random() < 0.5:  # pigment clumps
        pig = np.zeros_like(layer)
        pts = sc.sample(rng, int(rng.integers(2, 8)), fov, 0.0, 0.2 * R)
        _spots(rng, sc, pig, pts, 0.005, 0.012, "ARMD", "pigment_clump", recs)
        _layer_darken(img, pig, 0.002 * R, (0.3, 0.25, 0.3))
        mask |= pig
    return mask


def _draw_dn(rng, sc: _Scene, img, recs) -> np.ndarray:
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = sc.sample(rng, int(rng.integers(20, 90)), (sc.fx, sc.fy), 0.08 * sc.R, 0.85 * sc.R)
    _spots(rng, sc, layer, pts, 0.005, 0.014, "DN", "druse", recs, vmin=190)
    _layer_paint(img, layer, 0.0025 * sc.R, _DRUSEN, 0.85)
    return layer


def _tessellate(rng, sc: _Scene, img, strength: float) -> np.ndarray:
    """Dark pigment between orange choroidal vessels over a region; returns the region mask."""
    R, size = sc.R, sc.size
    vessels = np.zeros((size, size), np.uint8)
    # Choroidal vessels run roughly radially from the posterior pole toward the vortex veins.
    pcx, pcy = (sc.fx + sc.dx) / 2, (sc.fy + sc.dy) / 2
    starts = sc.sample(rng, int(rng.integers(45, 75)), (pcx, pcy), 0.0, 0.9 * R)
    n_steps = 24
    for x0, y0 in starts:
        ang = math.atan2(y0 - pcy, x0 - pcx) + rng.normal(0, 0.5)
        step = rng.uniform(0.015, 0.025) * R
        theta = ang + np.cumsum(rng.normal(0, 0.18, n_steps))
        xs = x0 + np.cumsum(step * np.cos(theta))
        ys = y0 + np.cumsum(step * np.sin(theta))
        poly = np.round(np.stack([xs, ys], 1) * _ONE).astype(np.int32)
        th = max(1, round(rng.uniform(0.018, 0.035) * R))
        cv2.polylines(vessels, [poly], False, 255, th, cv2.LINE_AA, _SHIFT)
    v = _alpha(vessels, 0.006 * R)
    # Region: a smooth blob over the posterior pole, larger or smaller per image.
    reach = rng.uniform(0.45, 0.8) * R
    region = np.exp(-sc.dist2(pcx, pcy) / np.float32(2 * reach * reach))
    a = np.float32(strength) * region * (np.float32(1) - v)
    _darken(img, a, (0.55, 0.45, 0.55))
    return np.where(region > 0.5, 255, 0).astype(np.uint8)


def _draw_mya(rng, sc: _Scene, img, recs, tessellated: bool) -> np.ndarray:
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    # Peripapillary atrophy: a pale crescent on the disc's temporal side (toward the fovea).
    shift = -sc.side * sc.drx * rng.uniform(0.3, 0.5)
    grow = rng.uniform(1.35, 1.8)
    px, py = sc.dx + shift, sc.dy
    _ellipse(layer, px, py, sc.drx * grow, sc.dry * rng.uniform(1.05, 1.3), 0)
    _ellipse(layer, sc.dx, sc.dy, sc.drx * 0.98, sc.dry * 0.98, 0, 0)  # the disc itself is not PPA
    _layer_paint(img, layer, 0.01 * R, (0.95, 0.85, 0.68), 0.85)
    recs.append(_rec("MYA", "peripapillary_atrophy", px, py, sc.drx * grow))
    mask = layer
    if tessellated:
        mask = mask | _tessellate(rng, sc, img, rng.uniform(0.3, 0.5))
        recs.append(_rec("MYA", "tessellation", sc.fx, sc.fy, 0.0))
    return mask


def _draw_csr(rng, sc: _Scene, img, recs) -> np.ndarray:
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    x = sc.fx + rng.normal(0, 0.03 * R)
    y = sc.fy + rng.normal(0, 0.03 * R)
    a = rng.uniform(0.1, 0.2) * R
    b = a * rng.uniform(0.7, 1.0)
    ang = rng.uniform(0, 180)
    _ellipse(layer, x, y, a, b, ang)
    _layer_darken(img, layer, 0.015 * R, (0.8, 0.72, 0.75))
    _layer_paint(img, layer, 0.015 * R, (0.85, 0.6, 0.35), 0.35)  # dull, yellowish
    rim = np.zeros_like(layer)
    _ellipse(rim, x, y, a, b, ang, 255, max(1, round(0.007 * R)))
    _layer_paint(img, rim, 0.003 * R, (1.0, 0.9, 0.75), 0.35)  # light reflex at the edge
    recs.append(_rec("CSR", "serous_detachment", x, y, a, b=b, angle=ang))
    return layer


def _draw_ls(rng, sc: _Scene, img, recs) -> np.ndarray:
    R, size = sc.R, sc.size
    pale = np.zeros((size, size), np.uint8)
    dark = np.zeros_like(pale)
    # Panretinal scars: a jittered hexagonal grid over the mid-periphery.
    d = rng.uniform(0.07, 0.1) * R
    gy, gx = np.mgrid[-1.2 * R : 1.2 * R : d * 0.866, -1.2 * R : 1.2 * R : d]
    gx = gx + (np.round(gy / (d * 0.866)) % 2) * d / 2
    x = sc.fx + gx.ravel() + rng.normal(0, 0.12 * d, gx.size)
    y = sc.fy + gy.ravel() + rng.normal(0, 0.12 * d, gx.size)
    rf = np.hypot(x - sc.fx, y - sc.fy)
    inner = rng.uniform(0.4, 0.55) * R
    keep = (rf > inner) & (np.hypot(x - sc.dx, y - sc.dy) > 2.0 * sc.drx)
    keep &= sc.inside(x, y, 0.04 * R) & (rng.random(x.size) < rng.uniform(0.4, 0.8))
    pts = np.stack([x[keep], y[keep]], 1)
    if rng.random() < 0.25 or len(pts) == 0:  # a focal/grid treatment around the macula
        grid = sc.sample(rng, int(rng.integers(6, 20)), (sc.fx, sc.fy), 0.1 * R, 0.3 * R)
        pts = np.concatenate([pts, grid])
    for px, py in pts:
        r = rng.uniform(0.016, 0.028) * R
        _disk(pale, px, py, r, rng.uniform(180, 255))
        _disk(dark, px, py, r * rng.uniform(0.4, 0.7), rng.uniform(120, 230))
        recs.append(_rec("LS", "laser_scar", px, py, r))
    _layer_paint(img, pale, 0.003 * R, (0.95, 0.83, 0.62), 0.85)
    _layer_darken(img, dark, 0.003 * R, (0.25, 0.2, 0.22))
    return pale


def _draw_brvo(rng, sc: _Scene, img, recs, branches, root: str) -> np.ndarray:
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = _vein_points(branches, [root])
    occl = rng.uniform(0.25, 0.45) * R  # occlusion (at an artery-vein crossing) from the disc
    down = pts[np.hypot(pts[:, 0] - sc.dx, pts[:, 1] - sc.dy) > occl]
    if len(down) == 0:
        down = pts
    if len(down) == 0:  # no vein of that trunk survived inside the FOV: use its direction
        ang = -math.pi / 2 if root == "ST" else math.pi / 2
        down = np.array([[sc.dx - sc.side * 0.2 * R, sc.dy + 0.2 * R * math.sin(ang), ang]])
    pick = down[rng.integers(0, len(down), int(rng.integers(12, 40)))]
    _flames(rng, sc, layer, pick, "BRVO", recs, 0.02 * R)
    blots = pick[: int(rng.integers(1, 6)), :2]
    _blots(rng, sc, layer, blots, 0.012, 0.025, "BRVO", "blot_haemorrhage", recs)
    _layer_darken(img, layer, 0.004 * R, _HAEM_TINT)
    recs.append(_rec("BRVO", "occluded_trunk", sc.dx, sc.dy, occl, trunk=root))
    return layer


def _draw_crvo(rng, sc: _Scene, img, recs, branches) -> np.ndarray:
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = _vein_points(branches)
    pts = pts[np.hypot(pts[:, 0] - sc.dx, pts[:, 1] - sc.dy) > 0.1 * R]
    # Every quadrant around the disc bleeds.
    q = (pts[:, 0] > sc.dx).astype(int) + 2 * (pts[:, 1] > sc.dy).astype(int)
    for k in range(4):
        cand = pts[q == k]
        if len(cand):
            pick = cand[rng.integers(0, len(cand), int(rng.integers(6, 22)))]
            _flames(rng, sc, layer, pick, "CRVO", recs, 0.03 * R)
    blots = sc.sample(rng, int(rng.integers(6, 20)), (sc.dx, sc.dy), 0.15 * R, 1.4 * R)
    _blots(rng, sc, layer, blots, 0.012, 0.03, "CRVO", "blot_haemorrhage", recs)
    _layer_darken(img, layer, 0.004 * R, _HAEM_TINT)
    return layer


def _draw_ode(rng, sc: _Scene, img, recs) -> np.ndarray:
    """Swollen disc: a hyperaemic, blurred halo over the margin that hides the vessels."""
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    grow = rng.uniform(1.45, 1.75)
    _ellipse(layer, sc.dx, sc.dy, sc.drx * grow, sc.dry * grow, 0)
    _layer_paint(img, layer, 0.3 * sc.drx, (0.95, 0.62, 0.45), 0.8)
    recs.append(_rec("ODE", "swollen_disc", sc.dx, sc.dy, sc.drx * grow))
    if rng.random() < 0.5:  # splinter haemorrhages at the disc margin
        haem = np.zeros_like(layer)
        n = int(rng.integers(3, 9))
        ang = rng.uniform(0, 2 * np.pi, n)
        rr = sc.drx * grow * rng.uniform(0.9, 1.2, n)
        x, y = sc.dx + rr * np.cos(ang), sc.dy + rr * np.sin(ang)
        ok = sc.inside(x, y, 3.0)
        _flames(rng, sc, haem, np.column_stack([x, y, ang])[ok], "ODE", recs, 0.0)
        _layer_darken(img, haem, 0.003 * R, _HAEM_TINT)
        layer |= haem
    return layer


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def generate_image(
    rng: np.random.Generator, size: int, labels: set[str]
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Draw one synthetic fundus photograph with the given labels.

    Args:
        rng: the image's generator (see :func:`image_rng`); it fully determines the result.
        size: side of the square image in pixels (>= 64).
        labels: positive labels, a subset of :data:`LABELS`.

    Returns:
        ``(image, masks, meta)``: the RGB uint8 image (size, size, 3); for every positive label a
        uint8 0/255 mask (size, size), non-empty and inside the visible FOV (MH: the whole FOV);
        and a JSON-ready dict with the geometry (FOV circle, disc, fovea, eye), camera settings
        and every lesion drawn (label, kind, centre, radius in pixels).
    """
    unknown = set(labels) - set(LABELS)
    if unknown:
        raise UserError(f"generate_image: unknown labels {sorted(unknown)} (known: {LABELS})")
    if size < _MIN_SIZE:
        raise UserError(f"generate_image: size must be >= {_MIN_SIZE} (got {size})")
    sc = _scene(rng, size, labels)
    R = sc.R
    recs: list[dict[str, Any]] = []
    masks: dict[str, np.ndarray] = {}

    # Albedo (before illumination): orange-red with pigment mottling, made at a quarter of the
    # resolution (it is smooth) and upsampled: (size, size, 3) float32.
    base = np.array([0.78, 0.37, 0.16], np.float32) * rng.uniform(0.85, 1.12, 3).astype(np.float32)
    q = max(16, size // 4)
    tex = 1.0 + 0.07 * _smooth_noise(rng, q, 6, 3) + 0.025 * _smooth_noise(rng, q, 40, 1)
    img = cv2.resize(tex * base, (size, size), interpolation=cv2.INTER_LINEAR)

    # Macula: darker, with a small darker fovea and (unless detached) a foveal reflex. Drawn on
    # the square of +-3 sigma around the fovea only.
    sig_m, depth = 0.22 * R, rng.uniform(0.7, 1.2)
    y0, y1 = max(0, int(sc.fy - 3 * sig_m)), min(size, int(sc.fy + 3 * sig_m) + 1)
    x0, x1 = max(0, int(sc.fx - 3 * sig_m)), min(size, int(sc.fx + 3 * sig_m) + 1)
    d2f = (sc.xx[:, x0:x1] - np.float32(sc.fx)) ** 2 + (sc.yy[y0:y1] - np.float32(sc.fy)) ** 2
    mac = np.exp(d2f * np.float32(-1 / (2 * sig_m**2)))  # (h, w) of the square
    dip = np.exp(d2f * np.float32(-1 / (2 * (0.045 * R) ** 2)))
    k = np.float32(depth) * np.array([0.22, 0.38, 0.3], np.float32)
    img[y0:y1, x0:x1] *= (
        1.0 - mac[..., None] * k - dip[..., None] * np.array([0.25, 0.4, 0.35], np.float32)
    )
    if "CSR" not in labels:
        reflex = np.zeros((size, size), np.uint8)
        _disk(reflex, sc.fx, sc.fy, max(0.6, 0.008 * R))
        _layer_paint(img, reflex, 0.004 * R, (0.95, 0.8, 0.65), 0.45)

    tessellated = "TSLN" in labels or ("MYA" in labels and rng.random() < 0.7)
    if "TSLN" in labels:
        masks["TSLN"] = _tessellate(rng, sc, img, rng.uniform(0.55, 0.8))
        recs.append(_rec("TSLN", "tessellation", sc.fx, sc.fy, 0.0))
    if "MYA" in labels:
        masks["MYA"] = _draw_mya(rng, sc, img, recs, tessellated and "TSLN" not in labels)
        if "TSLN" in labels:  # the myopic fundus shares the tessellation already drawn
            masks["MYA"] |= masks["TSLN"]

    # Optic disc and cup.
    disc = np.zeros((size, size), np.uint8)
    _ellipse(disc, sc.dx, sc.dy, sc.drx, sc.dry, 0)
    disc_col = (0.97, 0.58, 0.42) if "ODE" in labels else (0.96, 0.7, 0.46)
    _layer_paint(img, disc, 0.1 * sc.drx, disc_col, 0.92)
    cup = np.zeros_like(disc)
    cx = sc.dx - sc.side * 0.12 * sc.drx * (1 - sc.cup)
    _ellipse(cup, cx, sc.dy, sc.cup * sc.drx, sc.cup * sc.dry, 0)
    _layer_paint(img, cup, 0.2 * sc.cup * sc.drx, (1.0, 0.9, 0.74), 0.85)
    if "ODC" in labels:
        masks["ODC"] = disc.copy()
        recs.append(_rec("ODC", "large_cup", sc.dx, sc.dy, sc.drx, cup_to_disc=sc.cup))

    # Vessels: veins darker and wider, arteries lighter with a central light reflex.
    brvo_root = ("ST" if rng.random() < 0.5 else "IT") if "BRVO" in labels else None
    rd = 0.5 * (sc.drx + sc.dry)
    branches = _grow_vessels(rng, sc, _trunks(rng, sc, rd, labels, brvo_root))
    arteries = np.zeros((size, size), np.uint8)
    veins = np.zeros_like(arteries)
    _draw_branches(arteries, (b for b in branches if not b.vein))
    _draw_branches(veins, (b for b in branches if b.vein))
    vsig = 0.0025 * R
    _layer_darken(img, arteries, vsig, (0.8, 0.45, 0.6), 0.9)
    _layer_darken(img, veins, vsig, (0.58, 0.26, 0.42), 0.95)
    if R > 150:
        reflex = np.zeros_like(arteries)
        _draw_branches(reflex, (b for b in branches if not b.vein and b.w[0] > 3), 0.3)
        _layer_paint(img, reflex, vsig, (0.95, 0.6, 0.45), 0.25)

    if "ODE" in labels:
        masks["ODE"] = _draw_ode(rng, sc, img, recs)
    if "DN" in labels:
        masks["DN"] = _draw_dn(rng, sc, img, recs)
    if "ARMD" in labels:
        masks["ARMD"] = _draw_armd(rng, sc, img, recs)
    if "CSR" in labels:
        masks["CSR"] = _draw_csr(rng, sc, img, recs)
    if "DR" in labels:
        masks["DR"] = _draw_dr(rng, sc, img, recs)
    if "BRVO" in labels:
        masks["BRVO"] = _draw_brvo(rng, sc, img, recs, branches, brvo_root or "ST")
    if "CRVO" in labels:
        masks["CRVO"] = _draw_crvo(rng, sc, img, recs, branches)
    if "LS" in labels:
        masks["LS"] = _draw_ls(rng, sc, img, recs)

    # Illumination: radial fall-off, a tilt, exposure and the camera's colour balance.
    d2c = sc.dist2(sc.cx, sc.cy) * np.float32(1 / (R * R))
    fall, bend = rng.uniform(0.3, 0.55), rng.uniform(0.0, 0.6)  # bend: steeper at the rim
    tilt, tilt_dir = rng.uniform(0.0, 0.15), rng.uniform(0, 2 * np.pi)
    light = 1.0 - np.float32(fall) * d2c * (np.float32(1 - bend) + np.float32(bend) * d2c)
    light += np.float32(tilt / R) * (
        (sc.xx - sc.cx) * np.float32(math.cos(tilt_dir))
        + (sc.yy - sc.cy) * np.float32(math.sin(tilt_dir))
    )
    gain = rng.uniform(0.85, 1.15) * np.array(
        [rng.uniform(0.92, 1.08), rng.uniform(0.85, 1.15), rng.uniform(0.75, 1.3)], np.float32
    )
    img *= np.maximum(light, np.float32(0.15))[..., None] * gain.astype(np.float32)

    fov_u8 = np.zeros((size, size), np.uint8)
    _disk(fov_u8, sc.cx, sc.cy, R)
    fov_hard = fov_u8 >= 128
    haze = None
    if "MH" in labels:  # media haze: blur (at half resolution: it is wide), low contrast, a veil
        sig = rng.uniform(0.006, 0.012) * size
        half = (size + 1) // 2
        small = cv2.resize(img, (half, half), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sig / 2)
        img = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
        c, veil = rng.uniform(0.45, 0.7), rng.uniform(0.05, 0.15)
        mean = img[fov_hard].mean(0)
        img *= np.float32(c)
        img += (mean * (1 - c) + veil * np.array([0.85, 0.75, 0.6])).astype(np.float32)
        masks["MH"] = np.where(fov_hard, 255, 0).astype(np.uint8)
        haze = {"blur_sigma": round(sig, 2), "contrast": round(c, 3), "veil": round(veil, 3)}

    # Optics and sensor: blur, noise (luminance full-res, colour at half-res; uniform noise is
    # cheaper to draw than Gaussian and looks the same after JPEG), black outside the FOV.
    blur = rng.uniform(0.3, 0.8) * size / 512
    if blur >= 0.35:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    noise_sd = rng.uniform(1.0, 3.5) / 255
    lum = rng.random((size, size, 1), dtype=np.float32)
    h = (size + 1) // 2
    col = cv2.resize(
        rng.random((h, h, 3), dtype=np.float32), (size, size), interpolation=cv2.INTER_NEAREST
    )
    img += np.float32(noise_sd * math.sqrt(12)) * (lum + 0.5 * col - np.float32(0.75))
    img *= np.float32(255)
    img += np.float32(0.5)
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)
    edge = 0.6 * size / 512  # the FOV rim is soft, as in a camera's aperture image
    fov_soft = cv2.GaussianBlur(fov_u8, (0, 0), edge) if edge >= 0.3 else fov_u8
    out = cv2.multiply(out, cv2.merge([fov_soft] * 3), scale=1 / 255)
    quality = None
    if rng.random() < 0.8:  # JPEG artefacts: a round trip at a random quality
        quality = int(rng.integers(60, 96))
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("cv2.imencode('.jpg') failed")
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    out = np.ascontiguousarray(out)

    fov255 = np.where(fov_hard, np.uint8(255), np.uint8(0))
    for name, m in masks.items():
        np.bitwise_and(np.where(m > 0, np.uint8(255), np.uint8(0)), fov255, out=m)
        if not m.any():  # the drawers place at least one lesion inside the FOV
            raise RuntimeError(f"synth: empty {name} mask (a generator bug)")

    meta = {
        "labels": [k for k in LABELS if k in labels],
        "disease_risk": int(bool(labels)),
        "size": size,
        "eye": "right" if sc.side > 0 else "left",
        "fov": {"cx": round(sc.cx, 2), "cy": round(sc.cy, 2), "r": round(R, 2)},
        "disc": {
            "cx": round(sc.dx, 2),
            "cy": round(sc.dy, 2),
            "rx": round(sc.drx, 2),
            "ry": round(sc.dry, 2),
            "cup_to_disc": round(sc.cup, 3),
        },
        "fovea": {"x": round(sc.fx, 2), "y": round(sc.fy, 2)},
        "camera": {
            "gain": [round(float(g), 3) for g in gain],
            "falloff": round(fall, 3),
            "blur_sigma": round(blur, 3),
            "noise_sd": round(noise_sd * 255, 3),
            "jpeg_quality": quality,
        },
        "media_haze": haze,
        "lesions": recs,
    }
    return out, masks, meta


def _scene(rng: np.random.Generator, size: int, labels: set[str]) -> _Scene:
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
    return _Scene(
        size, cx, cy, R, fx, fy, dx, dy, drx, dry, cup, side, axis[:, None], axis[None, :]
    )


# --------------------------------------------------------------------------------------------
# Frame-filling fields and frames that are not a fundus (for the quality gate's tests)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    out: str
    split: str
    index: int  # the image ID (1-based)
    seed: int
    size: int
    prevalence: tuple[tuple[str, float], ...]


def _encode_png(img: np.ndarray) -> bytes:
    if img.ndim == 3:
        img = img[..., ::-1]  # RGB -> BGR for OpenCV
    # Level 1 with run-length matching: as small as level 3 on noisy photographs, twice as fast.
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
    ]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img), params)
    if not ok:
        raise RuntimeError("cv2.imencode('.png') failed")
    return buf.tobytes()


def _write_file_nosync(path: Path, data: bytes) -> None:
    # Atomic but not fsynced: an fsync per file costs more than drawing the image; one
    # os.sync() follows the last image, and the set is reproducible from its seed anyway.
    atomic_write_bytes(path, data, fsync=False)


def _write_one(task: _Task) -> tuple[str, int, list[int]]:
    """Generate and write one image, its masks and its record; return (split, ID, label row)."""
    rng = image_rng(task.seed, task.split, task.index)
    labels = sample_labels(rng, dict(task.prevalence))
    image, masks, meta = generate_image(rng, task.size, labels)
    set_dir, img_dir, _ = SPLIT_LAYOUT[task.split]
    root = Path(task.out) / set_dir
    iid = task.index
    _write_file_nosync(root / img_dir / f"{iid}.png", _encode_png(image))
    mask_paths = {}
    for name in LABELS:
        if name in masks:
            rel = f"Masks/{iid}_{name}.png"
            _write_file_nosync(root / rel, _encode_png(masks[name]))
            mask_paths[name] = f"{set_dir}/{rel}"
    record = {
        "id": iid,
        "split": task.split,
        "image": f"{set_dir}/{img_dir}/{iid}.png",
        "masks": mask_paths,
        "seed": {"seed": task.seed, "spawn_key": [_SPLIT_KEYS.index(task.split), iid]},
        **meta,
    }
    text = json.dumps(record, indent=2, default=_json_default) + "\n"
    _write_file_nosync(root / "Meta" / f"{iid}.json", text.encode("utf-8"))
    row = [int(bool(labels))] + [int(k in labels) for k in LABELS]
    return task.split, iid, row


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _init_worker() -> None:
    # One process per core already: keep OpenCV from starting threads of its own in each.
    cv2.setNumThreads(1)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: directory is not empty; pass --overwrite to replace its data set"
            )
        # Only what this generator writes is removed; other files in OUT are left alone.
        for set_dir, _, _ in SPLIT_LAYOUT.values():
            if (out / set_dir).is_dir():
                shutil.rmtree(out / set_dir)
        (out / "synth.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out: str | os.PathLike,
    n: int,
    size: int = 512,
    seed: int = 0,
    splits: Sequence[float] = (0.6, 0.2, 0.2),
    workers: int = 1,
    prevalence_scale: float = 1.0,
    overwrite: bool = False,
    *,
    prevalence: dict[str, float] | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Write ``n`` synthetic images with labels, masks and records in RFMiD's layout.

    Args:
        out: output folder; created, and must be empty unless ``overwrite``.
        n: number of images over all splits (>= 1).
        size: image side in pixels (>= 64).
        seed: non-negative integer; the same seed gives byte-identical files.
        splits: train, validation, test fractions (sum 1); counts round the cumulative bounds.
        workers: processes; any count gives the same bytes. More than one starts them with
            ``spawn`` (safe beside threads), so a calling script needs the usual
            ``if __name__ == "__main__":`` guard and cannot be read from stdin.
        prevalence_scale: multiplies every label's prevalence.
        overwrite: replace the split folders and ``synth.json`` of a non-empty ``out``.
        prevalence: per-label overrides of :data:`DEFAULT_PREVALENCE`.
        show_progress: progress bar on (True), off (False), or on a terminal only (None).

    Returns:
        The content of ``OUT/synth.json`` plus ``out``, ``elapsed_s`` and ``images_per_s``.

    Raises:
        UserError: a bad option, or a non-empty ``out`` without ``overwrite``.
    """
    cfg = SynthConfig(
        size=size,
        seed=seed,
        prevalence=dict(prevalence) if prevalence else None,
        prevalence_scale=prevalence_scale,
        splits=tuple(float(f) for f in splits),  # type: ignore[arg-type]
    )
    cfg.validate()
    if int(n) != n or n < 1:
        raise UserError(f"--n must be an integer >= 1 (got {n})")
    if int(workers) != workers or workers < 1:
        raise UserError(f"--workers must be an integer >= 1 (got {workers})")
    out = Path(out)
    _prepare_out(out, overwrite)

    prev = cfg.resolved_prevalence()
    counts = _split_counts(int(n), cfg.splits)
    tasks = [
        _Task(str(out), split, i, int(seed), int(size), tuple(prev.items()))
        for split in _SPLIT_KEYS
        for i in range(1, counts[split] + 1)
    ]
    for set_dir, img_dir, _ in SPLIT_LAYOUT.values():  # empty splits still get their folders
        for sub in (img_dir, "Masks", "Meta"):
            (out / set_dir / sub).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    rows: dict[str, dict[int, list[int]]] = {k: {} for k in _SPLIT_KEYS}
    if workers == 1:
        results: Iterable = map(_write_one, tasks)
        for split, iid, row in progress(results, len(tasks), "synth", disable=_off(show_progress)):
            rows[split][iid] = row
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        chunk = max(1, min(8, len(tasks) // (4 * workers)))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as ex:
            results = ex.map(_write_one, tasks, chunksize=chunk)
            for split, iid, row in progress(
                results, len(tasks), "synth", disable=_off(show_progress)
            ):
                rows[split][iid] = row
    if hasattr(os, "sync"):  # make the images durable before the CSVs and synth.json say done
        os.sync()
    elapsed = time.perf_counter() - t0

    header = ["ID", "Disease_Risk", *LABELS]
    label_counts: dict[str, dict[str, int]] = {}
    for split, (set_dir, _, csv_name) in SPLIT_LAYOUT.items():
        lines = [",".join(header)]
        lines += [",".join(map(str, [iid, *rows[split][iid]])) for iid in sorted(rows[split])]
        atomic_write_text(out / set_dir / csv_name, "\n".join(lines) + "\n")
        col = np.array([rows[split][i] for i in sorted(rows[split])], dtype=np.int64).reshape(
            -1, len(header) - 1
        )
        label_counts[split] = dict(zip(header[1:], col.sum(0).tolist(), strict=True))

    from fundus_edge import __version__

    summary: dict[str, Any] = {
        "generator": "fundus_edge.synth",
        "version": __version__,
        "format": "rfmid",
        "config": cfg.to_dict(),
        "n": int(n),
        "labels": ["Disease_Risk", *LABELS],
        "global_labels": sorted(GLOBAL_LABELS),
        "prevalence": prev,
        "cooccurrence": [list(r) for r in COOCCURRENCE],
        "splits": {
            k: {
                "images": f"{SPLIT_LAYOUT[k][0]}/{SPLIT_LAYOUT[k][1]}",
                "csv": f"{SPLIT_LAYOUT[k][0]}/{SPLIT_LAYOUT[k][2]}",
                "masks": f"{SPLIT_LAYOUT[k][0]}/Masks",
                "meta": f"{SPLIT_LAYOUT[k][0]}/Meta",
                "count": counts[k],
                "positives": label_counts[k],
            }
            for k in _SPLIT_KEYS
        },
        "seeding": "numpy SeedSequence(seed, spawn_key=(split index, image ID)), PCG64",
    }
    atomic_write_json(out / "synth.json", summary)
    log.info(
        "wrote %d images to %s in %.1f s (%.1f images/s)", n, out, elapsed, n / max(elapsed, 1e-9)
    )
    return {
        **summary,
        "out": str(out),
        "elapsed_s": elapsed,
        "images_per_s": n / max(elapsed, 1e-9),
    }


def _off(show: bool | None) -> bool | None:
    return None if show is None else not show
