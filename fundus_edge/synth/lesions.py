"""The lesions of the synthetic generator, one registered drawer per label.

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

Four labels also change the healthy anatomy before any lesion is drawn: MYA, ODE and ODC the
disc (:mod:`fundus_edge.synth.scene`), CRVO and BRVO the veins
(:mod:`fundus_edge.synth.vessels`); ODE also reddens the disc and CSR hides the foveal reflex
(:mod:`fundus_edge.synth.image`).

Prevalences: RFMiD's training counts out of 1,920 (DR 376, MH 317, ODC 282, TSLN 186, DN 138,
MYA 101, ARMD 100, BRVO 73, ODE 58, LS 47, CSR 37, CRVO 28) rounded, with a 3 % floor so that a
demo set of a hundred images has positives of each.

The stages and orders below fix the order in which the generator's random numbers are used:
changing one changes every image drawn with that label (``tests/test_synth.py`` pins them).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from fundus_edge.synth.paint import (
    ONE,
    SHIFT,
    alpha,
    darken,
    disk,
    ellipse,
    layer_darken,
    layer_paint,
    rec,
)
from fundus_edge.synth.registry import Canvas, register_lesion
from fundus_edge.synth.scene import Scene
from fundus_edge.synth.vessels import vein_points

__all__: list[str] = []  # everything here is reached through the registry

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
        ellipse(layer, x2, y2, a, b, math.degrees(ang), rng.uniform(180, 255))
        recs.append(rec(label, "flame_haemorrhage", x2, y2, a, angle=math.degrees(ang)))


def _blots(rng, sc, layer, pts: np.ndarray, rmin, rmax, label, kind, recs) -> None:
    """Blot haemorrhages: a disk with a few overlapping smaller ones for an irregular outline."""
    for x, y in pts:
        r = rng.uniform(rmin, rmax) * sc.R
        disk(layer, x, y, r)
        for _ in range(int(rng.integers(1, 3))):  # irregular outline: a few overlapping disks
            disk(
                layer,
                x + rng.normal(0, 0.4 * r),
                y + rng.normal(0, 0.4 * r),
                r * rng.uniform(0.5, 0.8),
            )
        recs.append(rec(label, kind, x, y, r))


def _spots(rng, sc, layer, pts, rmin, rmax, label, kind, recs, vmin=200) -> None:
    """Round spots (microaneurysms, exudates, drusen, ...) of radius ``rmin..rmax`` x R."""
    for x, y in pts:
        r = rng.uniform(rmin, rmax) * sc.R
        disk(layer, x, y, r, rng.uniform(vmin, 255))
        recs.append(rec(label, kind, x, y, r))


def _tessellate(rng, sc: Scene, img, strength: float) -> np.ndarray:
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
        poly = np.round(np.stack([xs, ys], 1) * ONE).astype(np.int32)
        th = max(1, round(rng.uniform(0.018, 0.035) * R))
        cv2.polylines(vessels, [poly], False, 255, th, cv2.LINE_AA, SHIFT)
    v = alpha(vessels, 0.006 * R)
    # Region: a smooth blob over the posterior pole, larger or smaller per image.
    reach = rng.uniform(0.45, 0.8) * R
    region = np.exp(-sc.dist2(pcx, pcy) / np.float32(2 * reach * reach))
    a = np.float32(strength) * region * (np.float32(1) - v)
    darken(img, a, (0.55, 0.45, 0.55))
    return np.where(region > 0.5, 255, 0).astype(np.uint8)


# --- choroid: under the disc and the vessels ------------------------------------------------------


@register_lesion("TSLN", stage="choroid", order=10, prevalence=0.09)
def _tsln(cv: Canvas) -> np.ndarray:
    """Tessellation over the posterior pole."""
    strength = cv.rng.uniform(0.55, 0.8)
    mask = _tessellate(cv.rng, cv.scene, cv.img, strength)
    cv.recs.append(rec("TSLN", "tessellation", cv.scene.fx, cv.scene.fy, 0.0))
    return mask


@register_lesion("MYA", stage="choroid", order=20, prevalence=0.05)
def _mya(cv: Canvas) -> np.ndarray:
    """Peripapillary atrophy; usually a milder tessellation of its own, or TSLN's."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
    # A myopic fundus is usually tessellated: its own, milder one unless TSLN drew one.
    tessellated = "TSLN" not in cv.labels and rng.random() < 0.7
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    # Peripapillary atrophy: a pale crescent on the disc's temporal side (toward the fovea).
    shift = -sc.side * sc.drx * rng.uniform(0.3, 0.5)
    grow = rng.uniform(1.35, 1.8)
    px, py = sc.dx + shift, sc.dy
    ellipse(layer, px, py, sc.drx * grow, sc.dry * rng.uniform(1.05, 1.3), 0)
    ellipse(layer, sc.dx, sc.dy, sc.drx * 0.98, sc.dry * 0.98, 0, 0)  # the disc itself is not PPA
    layer_paint(img, layer, 0.01 * R, (0.95, 0.85, 0.68), 0.85)
    recs.append(rec("MYA", "peripapillary_atrophy", px, py, sc.drx * grow))
    mask = layer
    if tessellated:
        mask = mask | _tessellate(rng, sc, img, rng.uniform(0.3, 0.5))
        recs.append(rec("MYA", "tessellation", sc.fx, sc.fy, 0.0))
    if "TSLN" in cv.masks:  # the myopic fundus shares the tessellation TSLN drew
        mask |= cv.masks["TSLN"]
    return mask


# --- disc: just after the optic disc and cup ------------------------------------------------------


@register_lesion("ODC", stage="disc", order=10, prevalence=0.15)
def _odc(cv: Canvas) -> np.ndarray:
    """The large cup is the scene's (:mod:`fundus_edge.synth.scene`); the mask is the disc."""
    assert cv.disc is not None
    sc = cv.scene
    cv.recs.append(rec("ODC", "large_cup", sc.dx, sc.dy, sc.drx, cup_to_disc=sc.cup))
    return cv.disc.copy()


# --- retina: over the vessels ---------------------------------------------------------------------


@register_lesion("ODE", stage="retina", order=10, prevalence=0.03)
def _ode(cv: Canvas) -> np.ndarray:
    """Swollen disc: a hyperaemic, blurred halo over the margin that hides the vessels."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    grow = rng.uniform(1.45, 1.75)
    ellipse(layer, sc.dx, sc.dy, sc.drx * grow, sc.dry * grow, 0)
    layer_paint(img, layer, 0.3 * sc.drx, (0.95, 0.62, 0.45), 0.8)
    recs.append(rec("ODE", "swollen_disc", sc.dx, sc.dy, sc.drx * grow))
    if rng.random() < 0.5:  # splinter haemorrhages at the disc margin
        haem = np.zeros_like(layer)
        n = int(rng.integers(3, 9))
        ang = rng.uniform(0, 2 * np.pi, n)
        rr = sc.drx * grow * rng.uniform(0.9, 1.2, n)
        x, y = sc.dx + rr * np.cos(ang), sc.dy + rr * np.sin(ang)
        ok = sc.inside(x, y, 3.0)
        _flames(rng, sc, haem, np.column_stack([x, y, ang])[ok], "ODE", recs, 0.0)
        layer_darken(img, haem, 0.003 * R, _HAEM_TINT)
        layer |= haem
    return layer


@register_lesion("DN", stage="retina", order=20, prevalence=0.07)
def _dn(cv: Canvas) -> np.ndarray:
    """Small drusen scattered over the posterior pole."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = sc.sample(rng, int(rng.integers(20, 90)), (sc.fx, sc.fy), 0.08 * sc.R, 0.85 * sc.R)
    _spots(rng, sc, layer, pts, 0.005, 0.014, "DN", "druse", recs, vmin=190)
    layer_paint(img, layer, 0.0025 * sc.R, _DRUSEN, 0.85)
    return layer


@register_lesion("ARMD", stage="retina", order=30, prevalence=0.05)
def _armd(cv: Canvas) -> np.ndarray:
    """Soft macular drusen, sometimes geographic atrophy and pigment clumps."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
    R, fov = sc.R, (sc.fx, sc.fy)
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = sc.sample(rng, int(rng.integers(10, 40)), fov, 0.0, 0.24 * R)
    _spots(rng, sc, layer, pts, 0.012, 0.035, "ARMD", "soft_druse", recs, vmin=170)
    mask = layer.copy()
    if rng.random() < 0.3:  # geographic atrophy: a pale patch over the fovea
        atrophy = np.zeros_like(layer)
        a, b = rng.uniform(0.06, 0.12) * R, rng.uniform(0.05, 0.1) * R
        ellipse(atrophy, sc.fx, sc.fy, a, b, rng.uniform(0, 180))
        layer_paint(img, atrophy, 0.01 * R, (0.93, 0.7, 0.5), 0.75)
        recs.append(rec("ARMD", "geographic_atrophy", sc.fx, sc.fy, a))
        mask |= atrophy
    layer_paint(img, layer, 0.004 * R, _DRUSEN, 0.8)
    if rng.random() < 0.5:  # pigment clumps
        pig = np.zeros_like(layer)
        pts = sc.sample(rng, int(rng.integers(2, 8)), fov, 0.0, 0.2 * R)
        _spots(rng, sc, pig, pts, 0.005, 0.012, "ARMD", "pigment_clump", recs)
        layer_darken(img, pig, 0.002 * R, (0.3, 0.25, 0.3))
        mask |= pig
    return mask


@register_lesion("CSR", stage="retina", order=40, prevalence=0.03)
def _csr(cv: Canvas) -> np.ndarray:
    """Serous detachment at the macula: a dull, darker oval with a bright rim reflex."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    x = sc.fx + rng.normal(0, 0.03 * R)
    y = sc.fy + rng.normal(0, 0.03 * R)
    a = rng.uniform(0.1, 0.2) * R
    b = a * rng.uniform(0.7, 1.0)
    ang = rng.uniform(0, 180)
    ellipse(layer, x, y, a, b, ang)
    layer_darken(img, layer, 0.015 * R, (0.8, 0.72, 0.75))
    layer_paint(img, layer, 0.015 * R, (0.85, 0.6, 0.35), 0.35)  # dull, yellowish
    rim = np.zeros_like(layer)
    ellipse(rim, x, y, a, b, ang, 255, max(1, round(0.007 * R)))
    layer_paint(img, rim, 0.003 * R, (1.0, 0.9, 0.75), 0.35)  # light reflex at the edge
    recs.append(rec("CSR", "serous_detachment", x, y, a, b=b, angle=ang))
    return layer


@register_lesion("DR", stage="retina", order=50, prevalence=0.2)
def _dr(cv: Canvas) -> np.ndarray:
    """Microaneurysms, blot haemorrhages, hard exudates, sometimes cotton-wool spots."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
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
    layer_darken(img, red, 0.0025 * R, _HAEM_TINT)
    layer_paint(img, bright, 0.002 * R, _EXUDATE)
    if soft.any():
        layer_paint(img, soft, 0.012 * R, (0.95, 0.88, 0.78), 0.7)
    return red | bright | soft


@register_lesion("BRVO", stage="retina", order=60, prevalence=0.04)
def _brvo(cv: Canvas) -> np.ndarray:
    """Flame and blot haemorrhages downstream of the occluded temporal vein."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
    branches, root = cv.branches, cv.occluded or "ST"
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = vein_points(branches, [root])
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
    layer_darken(img, layer, 0.004 * R, _HAEM_TINT)
    recs.append(rec("BRVO", "occluded_trunk", sc.dx, sc.dy, occl, trunk=root))
    return layer


@register_lesion("CRVO", stage="retina", order=70, prevalence=0.03)
def _crvo(cv: Canvas) -> np.ndarray:
    """Flame haemorrhages along the veins of all four quadrants, blots around the disc."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
    branches = cv.branches
    R = sc.R
    layer = np.zeros((sc.size, sc.size), np.uint8)
    pts = vein_points(branches)
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
    layer_darken(img, layer, 0.004 * R, _HAEM_TINT)
    return layer


@register_lesion("LS", stage="retina", order=80, prevalence=0.03)
def _ls(cv: Canvas) -> np.ndarray:
    """Laser scars: a panretinal pattern, sometimes a macular grid."""
    rng, sc, img, recs = cv.rng, cv.scene, cv.img, cv.recs
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
        disk(pale, px, py, r, rng.uniform(180, 255))
        disk(dark, px, py, r * rng.uniform(0.4, 0.7), rng.uniform(120, 230))
        recs.append(rec("LS", "laser_scar", px, py, r))
    layer_paint(img, pale, 0.003 * R, (0.95, 0.83, 0.62), 0.85)
    layer_darken(img, dark, 0.003 * R, (0.25, 0.2, 0.22))
    return pale


# --- media: in front of the lit picture -----------------------------------------------------------


@register_lesion("MH", stage="media", order=10, prevalence=0.16, whole_fov=True)
def _mh(cv: Canvas) -> np.ndarray:
    """Media haze: blur (at half resolution: it is wide), low contrast, a veil."""
    assert cv.fov is not None
    rng, size = cv.rng, cv.scene.size
    sig = rng.uniform(0.006, 0.012) * size
    half = (size + 1) // 2
    small = cv2.resize(cv.img, (half, half), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sig / 2)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    c, veil = rng.uniform(0.45, 0.7), rng.uniform(0.05, 0.15)
    mean = img[cv.fov].mean(0)
    img *= np.float32(c)
    img += (mean * (1 - c) + veil * np.array([0.85, 0.75, 0.6])).astype(np.float32)
    cv.img = img
    cv.haze = {"blur_sigma": round(sig, 2), "contrast": round(c, 3), "veil": round(veil, 3)}
    return np.where(cv.fov, 255, 0).astype(np.uint8)
