"""Synthetic colour fundus photographs with per-label lesion masks, written in RFMiD's layout.

Each image is drawn from scratch with numpy and OpenCV: an orange-red fundus with camera colour
variation and illumination fall-off inside a circular field of view (FOV) of varying size and
offset on black, an optic disc with a cup, a darker macula and fovea, an artery/vein tree that
branches from the disc and arches around the macula (arteries lighter and thinner than veins),
then the lesions of the image's labels, and finally optics blur, sensor noise and, usually, a
JPEG round trip. A CNN has to look at the lesions to tell the labels apart, and every lesion is
also drawn into a mask so that attribution maps can be scored against it.

Labels are drawn independently with per-label prevalences skewed like RFMiD's training set
(:data:`DEFAULT_PREVALENCE`), then a few clinical co-occurrences are added
(:data:`COOCCURRENCE`), so the marginal rate of TSLN, LS, DN and ODE ends slightly above its
table value. ``Disease_Risk`` is 1 when any label is.

The package is split along its jobs; every public name is re-exported here:

* :mod:`~fundus_edge.synth.config`: labels, prevalence, :class:`SynthConfig`, label sampling,
  splits and the per-image generators;
* :mod:`~fundus_edge.synth.registry`: the lesion registry (``register_lesion``, the stages of
  a picture, the :class:`~fundus_edge.synth.registry.Canvas` a drawer works on);
* :mod:`~fundus_edge.synth.lesions`: one registered drawer per label, with the table of what
  each draws and masks; adding a lesion is one decorated function there;
* :mod:`~fundus_edge.synth.image`: :func:`generate_image`, the picture stage by stage;
* :mod:`~fundus_edge.synth.scene`, :mod:`~fundus_edge.synth.vessels`,
  :mod:`~fundus_edge.synth.paint`: geometry, the vessel tree, drawing primitives;
* :mod:`~fundus_edge.synth.frames`: frame-filling crops and frames that are not a fundus;
* :mod:`~fundus_edge.synth.dataset`: :func:`generate_dataset`, the files on disk (layout in
  its docstring) with one generator per image, byte-identical for a seed whatever the number
  of workers.
"""

from __future__ import annotations

from fundus_edge.synth.config import (
    COOCCURRENCE,
    DEFAULT_PREVALENCE,
    GLOBAL_LABELS,
    LABELS,
    SPLIT_LAYOUT,
    SynthConfig,
    image_rng,
    parse_splits,
    sample_labels,
)
from fundus_edge.synth.dataset import generate_dataset
from fundus_edge.synth.frames import NON_FUNDUS_KINDS, frame_filling, non_fundus_frame
from fundus_edge.synth.image import generate_image
from fundus_edge.synth.registry import LESIONS, LesionSpec, lesion_names, register_lesion

__all__ = [
    "COOCCURRENCE",
    "DEFAULT_PREVALENCE",
    "GLOBAL_LABELS",
    "LABELS",
    "LESIONS",
    "NON_FUNDUS_KINDS",
    "SPLIT_LAYOUT",
    "LesionSpec",
    "SynthConfig",
    "frame_filling",
    "generate_dataset",
    "generate_image",
    "image_rng",
    "lesion_names",
    "non_fundus_frame",
    "parse_splits",
    "register_lesion",
    "sample_labels",
]
