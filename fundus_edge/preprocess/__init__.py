"""Decode, find the fundus field of view, crop, resize, mask and normalise one image.

The same code runs in training and on the edge device, so the two cannot drift. It needs
numpy and OpenCV only (never torch).

The package is split along its jobs; every public name is re-exported here, so
``fundus_edge.preprocess.X`` keeps working:

* :mod:`~fundus_edge.preprocess.read`: files to RGB uint8 (``read_image``, ``read_mask``,
  ``as_rgb_uint8``);
* :mod:`~fundus_edge.preprocess.fov`: the field of view (``Circle``, ``find_fov``, and
  ``FovTracker``, which finds it once in a video and then only checks it);
* :mod:`~fundus_edge.preprocess.geometry`: crop squares and the way back to the frame
  (``Geometry``, ``crop_square``, ``square_around``, ``crop_geometry``);
* :mod:`~fundus_edge.preprocess.contrast`: CLAHE and Graham's local mean;
* this module: :class:`PreprocessConfig` and the pipeline :func:`preprocess`.

Coordinates: frame pixel ``(i, j)`` (column, row) has its centre at ``x = i, y = j``; a
:class:`Circle` is in these frame coordinates. The crop is a square of ``side`` frame pixels
whose first column/row is ``x0, y0`` (negative or past the frame where the circle leaves it;
those pixels are black padding). It is resized to ``size`` pixels with OpenCV's half-pixel
convention, so output pixel ``u`` has its centre at frame ``x0 - 0.5 + (u + 0.5) * side / size``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.options import options_from_dict
from fundus_edge.preprocess.contrast import clahe, local_mean
from fundus_edge.preprocess.fov import CIRCLE, RECT, Circle, FovTracker, find_fov
from fundus_edge.preprocess.geometry import (
    Geometry,
    Reductions,
    crop_geometry,
    crop_square,
    disc_mask,
    square_around,
)
from fundus_edge.preprocess.read import as_rgb_uint8, read_image, read_mask

__all__ = [
    "CIRCLE",
    "CONTRASTS",
    "INTERPOLATIONS",
    "RECT",
    "Circle",
    "FovTracker",
    "Geometry",
    "PreprocessConfig",
    "Preprocessed",
    "Reductions",
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
class Preprocessed:
    """A model input and where it came from."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    geometry: Geometry
    circle: Circle


def preprocess(
    image: np.ndarray,
    cfg: PreprocessConfig | None = None,
    circle: Circle | None = None,
    reductions: Reductions | None = None,
) -> Preprocessed:
    """Turn a fundus photograph into a model input.

    Finds the field of view, crops the square around it (black padding where the circle
    leaves the frame), resizes to ``cfg.size``, blacks out everything outside the circle and
    applies the contrast normalisation. A frame-filling field (``circle.kind == "rect"``) and
    a frame without a field of view (``circle.found`` False) give the centred square of the
    frame, nothing masked.

    Args:
        image: any uint8 image (grey, RGB, RGBA; any size; RGB order).
        cfg: options; defaults to :class:`PreprocessConfig()`.
        circle: the field of view when the caller knows it already (a
            :class:`FovTracker`'s answer for a video frame); None: :func:`find_fov`.
        reductions: the frame's :class:`Reductions`, shared with the quality gate (the
            same bytes, the frame read once); None: nothing shared.

    Returns:
        The ``(size, size, 3)`` uint8 image, its :class:`Geometry` and the circle.
    """
    cfg = cfg or PreprocessConfig()
    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    if circle is None:
        circle = find_fov(img)
    x0, y0, side = crop_geometry(
        h, w, circle, cfg.size, cfg.margin, cfg.crop_fov, cfg.interpolation == "area"
    )
    geom = Geometry(x0, y0, side, cfg.size, (h, w), circle)
    out = crop_square(
        img, x0, y0, side, cfg.size, INTERPOLATIONS[cfg.interpolation], reductions=reductions
    )

    disc = circle.found and not circle.is_rect
    if disc:
        ocx, ocy, orr = geom.output_circle()
        fov = disc_mask(cfg.size, ocx, ocy, orr)
    else:
        fov = np.ones((cfg.size, cfg.size), dtype=bool)
    masking = cfg.mask and disc
    if masking:
        out *= fov[:, :, None]  # zero outside the field (in place: 10x boolean indexing's speed)
    if cfg.contrast == "clahe":
        out = clahe(out, cfg.clahe_clip, cfg.clahe_grid)
    elif cfg.contrast == "local_mean":
        out = local_mean(out, fov, max(0.5, cfg.local_mean_sigma * cfg.size))
    if masking and cfg.contrast != "none":
        out *= fov[:, :, None]  # normalisation turns the black surround grey; keep it black
    return Preprocessed(image=out, geometry=geom, circle=circle)
