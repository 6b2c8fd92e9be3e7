"""Registry of the lesions the synthetic generator can draw, one entry per label.

A lesion is one decorated function: it gets the :class:`Canvas` (the picture so far, its
geometry, generator and records) and returns its label's mask. The decorator says *when* it
is drawn (a stage of the picture and an order inside it), how common the label is, and
whether its mask is the whole field of view::

    @register_lesion("CSR", stage="retina", order=40, prevalence=0.03)
    def _csr(cv: Canvas) -> np.ndarray: ...

:func:`~fundus_edge.synth.image.generate_image` builds the healthy fundus and, at each stage,
calls the drawers of the image's labels in their order. Every drawer takes its numbers from
the image's one generator, so the stages and orders fix the bytes written for a seed: a new
lesion takes an order of its own and leaves the others' in place.

Stages, in the order the picture is made:

* ``choroid``: after the background and the macula, before the optic disc and the vessels
  (which therefore cover it);
* ``disc``: right after the optic disc and cup are painted (:attr:`Canvas.disc` is set);
* ``retina``: over the vessels (:attr:`Canvas.branches` and :attr:`Canvas.occluded` are set),
  before the illumination;
* ``media``: after the illumination, in front of the whole picture (:attr:`Canvas.fov` is set;
  a drawer may replace :attr:`Canvas.img`).

The image's label columns (``fundus_edge.synth.LABELS``) are the registered labels in RFMiD's
header order, so a label must be one of RFMiD's columns.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fundus_edge.data import RFMID_LABELS_46
from fundus_edge.synth.scene import Scene
from fundus_edge.synth.vessels import Branch

__all__ = [
    "LESIONS",
    "STAGES",
    "Canvas",
    "LesionSpec",
    "lesion_names",
    "register_lesion",
    "stage_lesions",
]

#: The stages of a picture at which lesions are drawn, in drawing order.
STAGES: tuple[str, ...] = ("choroid", "disc", "retina", "media")


@dataclass
class Canvas:
    """One picture being drawn: what a lesion drawer reads and adds to.

    Attributes:
        rng: the image's generator; every random number comes from it, in drawing order.
        scene: the geometry (field of view, fovea, disc, eye side).
        labels: the image's positive labels.
        img: the picture, float32 RGB (size, size, 3): albedo 0..1 before the ``media``
            stage, lit after it. Drawers change it in place; ``media`` ones may replace it.
        recs: lesion records for the image's meta (append with
            :func:`fundus_edge.synth.paint.rec`).
        masks: the masks drawn so far, by label (a drawer may combine an earlier one).
        disc: uint8 layer of the optic disc (from the ``disc`` stage on).
        branches: the vessel tree (from the ``retina`` stage on).
        occluded: the vessel trunk BRVO occludes, ``"ST"`` or ``"IT"`` (None without BRVO).
        fov: bool mask of the visible field of view (``media`` stage).
        haze: media haze parameters, written to the image's meta as ``media_haze``.
    """

    rng: np.random.Generator
    scene: Scene
    labels: frozenset[str]
    img: np.ndarray = field(repr=False)
    recs: list[dict[str, Any]] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    disc: np.ndarray | None = field(default=None, repr=False)
    branches: list[Branch] = field(default_factory=list, repr=False)
    occluded: str | None = None
    fov: np.ndarray | None = field(default=None, repr=False)
    haze: dict[str, float] | None = None


#: A lesion drawer: paints its lesions into ``Canvas.img`` and returns its label's mask, uint8
#: (size, size), non-zero where a lesion is (clipped to the visible FOV and made 0/255 later).
Drawer = Callable[[Canvas], np.ndarray]


@dataclass(frozen=True)
class LesionSpec:
    """One registry entry.

    Attributes:
        label: the RFMiD label column, e.g. ``"DR"``.
        stage: one of :data:`STAGES`.
        order: position within the stage (smaller first; unique per stage).
        prevalence: default per-image probability of the label.
        draw: the drawer.
        whole_fov: the finding has no place of its own: its mask is the whole visible FOV.
    """

    label: str
    stage: str
    order: int
    prevalence: float
    draw: Drawer = field(repr=False)
    whole_fov: bool = False


LESIONS: dict[str, LesionSpec] = {}


def register_lesion(
    label: str, stage: str, order: int, prevalence: float, *, whole_fov: bool = False
) -> Callable[[Drawer], Drawer]:
    """Decorator registering a drawer as the lesion of ``label``.

    Args:
        label: an RFMiD label column not registered yet.
        stage: the stage of the picture it is drawn at (:data:`STAGES`).
        order: its place within the stage; no other lesion of the stage may have it.
        prevalence: default probability of the label, in [0, 1].
        whole_fov: its mask is the whole visible field of view.

    Returns:
        The decorator; it returns the drawer unchanged.

    Raises:
        ValueError: any of the above does not hold (a programming error, not a user's).
    """

    def deco(draw: Drawer) -> Drawer:
        if label not in RFMID_LABELS_46 or label == "Disease_Risk":
            raise ValueError(f"lesion {label!r} is not an RFMiD label column")
        if label in LESIONS:
            raise ValueError(f"lesion {label!r} is already registered")
        if stage not in STAGES:
            raise ValueError(f"lesion {label!r}: unknown stage {stage!r} (known: {STAGES})")
        clash = [s.label for s in LESIONS.values() if s.stage == stage and s.order == order]
        if clash:
            raise ValueError(f"lesion {label!r}: order {order} of {stage!r} is {clash[0]}'s")
        if not 0.0 <= prevalence <= 1.0:
            raise ValueError(f"lesion {label!r}: prevalence must be in [0, 1] (got {prevalence})")
        LESIONS[label] = LesionSpec(label, stage, int(order), float(prevalence), draw, whole_fov)
        return draw

    return deco


def lesion_names() -> list[str]:
    """Registered lesion labels, sorted."""
    return sorted(LESIONS)


def stage_lesions(stage: str, labels: Collection[str]) -> list[LesionSpec]:
    """The registered lesions of ``stage`` among ``labels``, in drawing order."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {STAGES})")
    return sorted(
        (s for s in LESIONS.values() if s.stage == stage and s.label in labels),
        key=lambda s: s.order,
    )
