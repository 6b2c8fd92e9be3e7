"""Labels, their prevalence and co-occurrence, the splits and the per-image generators.

Everything here changes the bytes written for a seed: :class:`SynthConfig` is the whole
configuration of a data set, :func:`sample_labels` draws an image's labels and
:func:`image_rng` gives every image a generator of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fundus_edge.data import RFMID_LABELS_46
from fundus_edge.errors import UserError
from fundus_edge.synth import lesions as _lesions  # noqa: F401  (registers the lesions)
from fundus_edge.synth.registry import LESIONS

__all__ = [
    "COOCCURRENCE",
    "DEFAULT_PREVALENCE",
    "GLOBAL_LABELS",
    "LABELS",
    "MIN_SIZE",
    "SPLIT_KEYS",
    "SPLIT_LAYOUT",
    "SynthConfig",
    "image_rng",
    "parse_splits",
    "sample_labels",
    "split_counts",
]

#: Label columns in RFMiD's header order (``Disease_Risk`` is written before them): the
#: registered lesions (:mod:`fundus_edge.synth.lesions`), ordered by RFMiD's own header so the
#: two cannot drift.
LABELS: tuple[str, ...] = tuple(n for n in RFMID_LABELS_46 if n in LESIONS)

#: Labels without a place: their mask is the whole visible FOV.
GLOBAL_LABELS: frozenset[str] = frozenset(n for n in LABELS if LESIONS[n].whole_fov)

#: Per-image probability of each label, as registered with its lesion (RFMiD-like skew; see
#: :mod:`fundus_edge.synth.lesions`).
DEFAULT_PREVALENCE: dict[str, float] = {n: LESIONS[n].prevalence for n in LABELS}

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
SPLIT_KEYS = tuple(SPLIT_LAYOUT)
MIN_SIZE = 64


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
        if int(self.size) != self.size or self.size < MIN_SIZE:
            raise UserError(f"--size must be an integer >= {MIN_SIZE} (got {self.size})")
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
        """The configuration as JSON-ready values (``splits`` as a list)."""
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
    ss = np.random.SeedSequence(int(seed), spawn_key=(SPLIT_KEYS.index(split), int(index)))
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


def split_counts(n: int, splits: Sequence[float]) -> dict[str, int]:
    """Images per split for ``n`` images (the cumulative bounds are rounded: they sum to n)."""
    # Round the cumulative boundaries so the counts always add up to n.
    b1 = round(n * splits[0])
    b2 = max(b1, round(n * (splits[0] + splits[1])))
    return {"train": b1, "val": b2 - b1, "test": n - b2}
