"""The one class-map normalisation: ``eval``, ``run``, ``explain`` and the export checks use it.

The model gives raw per-member maps: ``cams`` (N, M, C, h, w), ReLU applied, not normalised,
each member's map resampled (bilinear) onto the first member's grid inside the graph. A map a
person looks at, or a localisation metric scores, is made from them in three steps:

1. **Onto one grid**: a member on a coarser (or finer) grid is resampled bilinearly
   (half-pixel centres: OpenCV's ``INTER_LINEAR`` = torch's ``align_corners=False``) onto the
   first member's grid, raw, before any scaling - what the exported graph does, so maps taken
   at each member's own grid (``explain --per-member``, the grad-cam methods) combine to
   exactly the graph's map (a peak can fall between grid points, so the order matters).
2. **Per member, peak scaling**: ``m = clip(cam, 0) / (max_hw clip(cam, 0) + eps)``, so each
   member's map lies in [0, 1] with its own peak at 1 and "no evidence" still at 0. Members
   produce maps on different scales (VGG's and ResNet's activations differ by orders of
   magnitude); without this the largest-scale member would decide the picture alone. The
   clip only guards against reduced-precision (FP16/INT8) undershoot: the maps are ReLU'd.
3. **Mean over members** -> (N, C, h, w) in [0, 1]. Where members agree on a place the mean
   reaches 1; where only one member sees something it stays at 1/M: the picture keeps the
   members' disagreement instead of hiding it.

For display (:func:`display`, :func:`map_on_frame`) the combined map is scaled once more by its
own peak, ``m / (max m + eps)``, so the strongest place is 1 on the colour scale; zero stays
zero.

Why peak scaling and not min-max (``(m - min) / (max - min)``, what ``eval`` did before): a
CAM's zero has a meaning - no evidence for the class there - and min-max moves it. A map that
is nearly flat (evidence everywhere, 0.8 - 1.0 of its peak) would be stretched by min-max into
a sharp, confident-looking blob that the model never produced; peak scaling shows it as the
diffuse map it is. For the localisation metrics the choice is also the honest one: the pointing
game (the position of the maximum) is the same under either scaling of the combined map, and
energy-inside-mask (sum inside / sum overall) is invariant to the final scale, so it measures
the map as shown rather than a contrast-stretched one that subtracts the floor away.

The single exception is :func:`fundus_edge.convert.verify.gradcam_parity`, which compares each
member's raw map with the ``grad-cam`` package *on the package's terms* (min-max, resize,
min-max): that check is about the kernels being exact, not about what is displayed.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from fundus_edge.errors import UserError

__all__ = [
    "EPS",
    "display",
    "map_on_frame",
    "normalise_member_maps",
    "peak_normalise",
    "resample",
]

#: Added to every peak before dividing: an all-zero map stays all zeros.
EPS = 1e-7


def peak_normalise(m: np.ndarray) -> np.ndarray:
    """Step 1: ``clip(m, 0) / (max over the last two axes + EPS)``, float32 in [0, 1]."""
    m = np.clip(np.asarray(m, dtype=np.float32), 0.0, None)
    return m / (m.max(axis=(-2, -1), keepdims=True) + EPS)


def resample(m: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Step 2: bilinear (half-pixel centres) resize of (..., h, w) maps onto ``grid`` (H, W).

    An exact copy when the grid is already ``grid``.
    """
    m = np.asarray(m, dtype=np.float32)
    gh, gw = int(grid[0]), int(grid[1])
    if m.shape[-2:] == (gh, gw):
        return m
    lead = m.shape[:-2]
    flat = m.reshape(-1, *m.shape[-2:])
    out = np.stack([cv2.resize(x, (gw, gh), interpolation=cv2.INTER_LINEAR) for x in flat])
    return out.reshape(*lead, gh, gw)


def normalise_member_maps(
    cams: np.ndarray | Sequence[np.ndarray], grid: tuple[int, int] | None = None
) -> np.ndarray:
    """Raw per-member maps -> the combined class maps (steps 1-3 of the module docstring).

    Args:
        cams: an array (..., M, C, h, w) (the model's ``cams``: N first, or one image's
            (M, C, h, w)), or a sequence of M per-member arrays (..., C, h_m, w_m) whose grids
            may differ.
        grid: the output grid; default the first member's.

    Returns:
        (..., C, H, W) float32 in [0, 1]: per member resampled, peak-scaled, averaged.
    """
    if isinstance(cams, np.ndarray):
        if cams.ndim < 4:
            raise UserError(f"member maps must be (..., M, C, h, w), got shape {cams.shape}")
        members = [cams[..., k, :, :, :] for k in range(cams.shape[-4])]
    else:
        members = [np.asarray(c) for c in cams]
    if not members:
        raise UserError("no member maps to combine")
    grid = tuple(grid) if grid is not None else tuple(members[0].shape[-2:])
    total = None
    for m in members:
        m = peak_normalise(resample(m, grid))
        total = m if total is None else total + m
    return (total / len(members)).astype(np.float32)


def display(m: np.ndarray) -> np.ndarray:
    """A combined map scaled for display: ``clip(m, 0) / (max + EPS)``, the peak at 1."""
    return peak_normalise(m)


def map_on_frame(m: np.ndarray, geometry, frame_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A (h, w) map on the model input -> (H, W) on the original frame, in [0, 1].

    Display scaling (:func:`display`), then
    :meth:`~fundus_edge.preprocess.Geometry.map_to_frame` (bilinear onto the crop square,
    zeros outside it).

    Args:
        m: (h, w) map on the model input (any grid: a 4x4 CAM or a full-size map).
        geometry: the :class:`~fundus_edge.preprocess.Geometry` the input came from.
        frame_shape: the frame's shape (H, W[, 3]); checked against the geometry when given.
    """
    if frame_shape is not None and tuple(frame_shape[:2]) != tuple(geometry.frame):
        raise UserError(
            f"map_on_frame: frame {tuple(frame_shape[:2])} is not the geometry's {geometry.frame}"
        )
    return geometry.map_to_frame(display(m))
