"""The class maps of a fixed set of validation images, rendered each epoch for the tracker.

The images are chosen once per run, deterministically, and each keeps one label for the whole
run, so a tag's images over the epochs show the same map of the same image growing (or not)
onto its lesion. Maps are made exactly as everywhere else: the model's ``cams`` combined by
:func:`fundus_edge.maps.normalise_member_maps`, scaled by :func:`fundus_edge.maps.display` and
blended by :func:`fundus_edge.runtime.render.overlay_map` over the model input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fundus_edge.errors import DataError

__all__ = ["MapSnapshots", "pick_samples"]

_NAME_BAD = re.compile(r"[^\w\-.]")


def pick_samples(
    samples: Sequence[Any], label_names: Sequence[str], count: int, skip: Sequence[str] = ()
) -> list[tuple[int, int]]:
    """``count`` (sample index, label index) pairs, the same for the same split every time.

    First one image per label, in label order, the first sample of the split positive for it
    (so the set shows as many different findings as it can; ``skip``: labels not chosen in
    this pass, e.g. the screening label, positive with any finding); then the remaining
    samples in split order, each with its first positive label not in ``skip`` (else its first
    positive label, else label 0).
    """
    skip_set = set(skip)
    chosen: list[tuple[int, int]] = []
    used: set[int] = set()
    for c, name in enumerate(label_names):
        if len(chosen) >= count:
            break
        if name in skip_set:
            continue
        for i, s in enumerate(samples):
            if i not in used and c < len(s.labels) and s.labels[c] > 0.5:
                chosen.append((i, c))
                used.add(i)
                break
    for i, s in enumerate(samples):
        if len(chosen) >= count:
            break
        if i in used:
            continue
        pos = [c for c in range(min(len(s.labels), len(label_names))) if s.labels[c] > 0.5]
        findings = [c for c in pos if label_names[c] not in skip_set]
        chosen.append((i, (findings or pos or [0])[0]))
        used.add(i)
    return chosen


@dataclass
class MapSnapshots:
    """Model inputs with the label whose map is shown for each.

    Attributes:
        names: one per image, ``<sample id>_<label>`` (file- and tag-safe).
        images: (N, S, S, 3) uint8 RGB model inputs (preprocessed as in training).
        labels: (N,) the label index whose map each image shows.
        mean: input normalisation mean (RGB, 0..1 scale).
        std: input normalisation std.
    """

    names: list[str]
    images: np.ndarray
    labels: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def pick(
        cls,
        samples: Sequence[Any],
        label_names: Sequence[str],
        preprocess_cfg: Any,
        mean: Sequence[float],
        std: Sequence[float],
        count: int = 4,
        skip: Sequence[str] = (),
    ) -> MapSnapshots:
        """Choose and preprocess ``count`` validation images (:func:`pick_samples`).

        An unreadable image is left out and the next one taken; with none readable the set is
        empty (nothing is logged).
        """
        from fundus_edge.preprocess import preprocess, read_image

        names, images, labels = [], [], []
        order = pick_samples(samples, label_names, len(samples), skip)
        for i, c in order:
            if len(images) >= count:
                break
            s = samples[i]
            try:
                img = preprocess(read_image(s.path), preprocess_cfg).image
            except DataError:
                continue
            names.append(_NAME_BAD.sub("_", f"{s.id}_{label_names[c]}"))
            images.append(img)
            labels.append(c)
        size = int(preprocess_cfg.size)
        arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        return cls(names, arr, labels, tuple(mean), tuple(std))

    def __len__(self) -> int:
        return len(self.names)

    def render(self, model: Any, alpha: float = 0.5) -> dict[str, np.ndarray]:
        """The current model's map of each image's label over the image: name -> (S, S, 3) uint8.

        Args:
            model: the ensemble (``model(x)["cams"]`` is (N, M, C, h, w)); its train/eval
                mode is restored afterwards.
            alpha: heat-map opacity at its peak.
        """
        import torch

        from fundus_edge.maps import display, normalise_member_maps, resample
        from fundus_edge.runtime.render import overlay_map
        from fundus_edge.torchdata import to_tensor

        if not len(self):
            return {}
        device = next(model.parameters()).device
        x = torch.stack([to_tensor(img, self.mean, self.std) for img in self.images])
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                cams = model(x.to(device))["cams"].float().cpu().numpy()  # (N,M,C,h,w)
        finally:
            model.train(was_training)
        maps = normalise_member_maps(cams)  # (N,C,h,w) in [0, 1]
        side = self.images.shape[1:3]
        out = {}
        for i, name in enumerate(self.names):
            heat = display(resample(maps[i, self.labels[i]], side))  # (S,S), peak 1
            out[name] = overlay_map(self.images[i], heat, alpha)
        return out
