"""One synthetic fundus photograph: the healthy eye, the lesions of its labels, the camera.

The picture is made in this order, every random number from the image's one generator:

1. the scene (:mod:`fundus_edge.synth.scene`): field of view, fovea, optic disc and cup;
2. the albedo: orange-red with pigment mottling; the darker macula and fovea;
3. lesions of the ``choroid`` stage;
4. the optic disc and cup; lesions of the ``disc`` stage;
5. the vessel tree (:mod:`fundus_edge.synth.vessels`); lesions of the ``retina`` stage;
6. illumination: radial fall-off, tilt, exposure, the camera's colour balance;
7. lesions of the ``media`` stage;
8. optics blur, sensor noise, black outside the field of view, usually a JPEG round trip.

At each stage the drawers registered for the image's labels
(:mod:`fundus_edge.synth.registry`, :mod:`fundus_edge.synth.lesions`) run in their order.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.synth.config import LABELS, MIN_SIZE
from fundus_edge.synth.paint import disk, ellipse, layer_paint, smooth_noise
from fundus_edge.synth.registry import Canvas, stage_lesions
from fundus_edge.synth.scene import make_scene
from fundus_edge.synth.vessels import draw_vessels

__all__ = ["generate_image"]


def _draw_stage(cv: Canvas, stage: str) -> None:
    """Run the drawers of ``stage`` registered for the canvas's labels, in their order."""
    size = cv.scene.size
    for spec in stage_lesions(stage, cv.labels):
        mask = spec.draw(cv)
        if mask.shape != (size, size) or mask.dtype != np.uint8:
            raise RuntimeError(
                f"synth: the {spec.label} drawer returned a {mask.dtype} {mask.shape} mask, "
                f"not uint8 {(size, size)} (a generator bug)"
            )
        cv.masks[spec.label] = mask


def generate_image(
    rng: np.random.Generator, size: int, labels: set[str]
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Draw one synthetic fundus photograph with the given labels.

    Args:
        rng: the image's generator (see :func:`~fundus_edge.synth.image_rng`); it fully
            determines the result.
        size: side of the square image in pixels (>= 64).
        labels: positive labels, a subset of :data:`~fundus_edge.synth.LABELS`.

    Returns:
        ``(image, masks, meta)``: the RGB uint8 image (size, size, 3); for every positive label a
        uint8 0/255 mask (size, size), non-empty and inside the visible FOV (MH: the whole FOV);
        and a JSON-ready dict with the geometry (FOV circle, disc, fovea, eye), camera settings
        and every lesion drawn (label, kind, centre, radius in pixels).
    """
    unknown = set(labels) - set(LABELS)
    if unknown:
        raise UserError(f"generate_image: unknown labels {sorted(unknown)} (known: {LABELS})")
    if size < MIN_SIZE:
        raise UserError(f"generate_image: size must be >= {MIN_SIZE} (got {size})")
    sc = make_scene(rng, size, labels)
    R = sc.R

    # Albedo (before illumination): orange-red with pigment mottling, made at a quarter of the
    # resolution (it is smooth) and upsampled: (size, size, 3) float32.
    base = np.array([0.78, 0.37, 0.16], np.float32) * rng.uniform(0.85, 1.12, 3).astype(np.float32)
    q = max(16, size // 4)
    tex = 1.0 + 0.07 * smooth_noise(rng, q, 6, 3) + 0.025 * smooth_noise(rng, q, 40, 1)
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
        disk(reflex, sc.fx, sc.fy, max(0.6, 0.008 * R))
        layer_paint(img, reflex, 0.004 * R, (0.95, 0.8, 0.65), 0.45)

    cv = Canvas(rng, sc, frozenset(labels), img)
    _draw_stage(cv, "choroid")

    # Optic disc and cup (a swollen disc is hyperaemic).
    disc = np.zeros((size, size), np.uint8)
    ellipse(disc, sc.dx, sc.dy, sc.drx, sc.dry, 0)
    disc_col = (0.97, 0.58, 0.42) if "ODE" in labels else (0.96, 0.7, 0.46)
    layer_paint(cv.img, disc, 0.1 * sc.drx, disc_col, 0.92)
    cup = np.zeros_like(disc)
    cx = sc.dx - sc.side * 0.12 * sc.drx * (1 - sc.cup)
    ellipse(cup, cx, sc.dy, sc.cup * sc.drx, sc.cup * sc.dry, 0)
    layer_paint(cv.img, cup, 0.2 * sc.cup * sc.drx, (1.0, 0.9, 0.74), 0.85)
    cv.disc = disc
    _draw_stage(cv, "disc")

    # Vessels: veins darker and wider, arteries lighter with a central light reflex.
    cv.branches, cv.occluded = draw_vessels(rng, sc, cv.img, labels)
    _draw_stage(cv, "retina")

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
    cv.img *= np.maximum(light, np.float32(0.15))[..., None] * gain.astype(np.float32)

    fov_u8 = np.zeros((size, size), np.uint8)
    disk(fov_u8, sc.cx, sc.cy, R)
    fov_hard = fov_u8 >= 128
    cv.fov = fov_hard
    _draw_stage(cv, "media")
    img = cv.img

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

    masks = cv.masks
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
        "media_haze": cv.haze,
        "lesions": cv.recs,
    }
    return out, masks, meta
