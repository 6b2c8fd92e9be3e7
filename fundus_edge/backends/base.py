"""The one interface every inference backend implements.

A backend owns a loaded model and turns a batch of preprocessed frames into the
artifact's outputs. It knows nothing of cameras, preprocessing or thresholds: those
live in :mod:`fundus_edge.runtime` and read the backend's :attr:`Backend.metadata`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fundus_edge.artifact import CONTRACT_OUTPUTS
from fundus_edge.errors import UserError

__all__ = ["CONTRACT_OUTPUTS", "INPUT_NAME", "Backend"]

INPUT_NAME = "image"
# CONTRACT_OUTPUTS (fundus_edge.artifact): output names of the exported graph; `probs` is the
# only one the runtime cannot do without, the maps are drawn when present.


class Backend(ABC):
    """A loaded model: ``infer(uint8 NHWC batch) -> {output name: array}``.

    Subclasses set :attr:`name` and :attr:`suffixes`, accept their own keyword options in
    ``__init__`` (listed in :attr:`options`) and implement :meth:`_infer`.

    Attributes:
        name: short backend name shown to users (``"onnxruntime"``, ``"tensorrt"``, ``"torch"``).
        suffixes: model file suffixes this backend is chosen for by default.
        loads: every suffix it can load when asked by name (``--backend``); default
            :attr:`suffixes`.
        options: keyword options ``load`` accepts besides the path.
        path: the model file.
        metadata: the artifact's contract dict (labels, thresholds, preprocessing, ...).
        device: where it runs, in words (e.g. ``"CUDAExecutionProvider"``, ``"cuda:0"``).
        concurrent: :meth:`infer` may be called from several threads at once (``run
            --streams``); False where the runtime's request or execution context is one.
    """

    name: ClassVar[str] = ""
    concurrent: ClassVar[bool] = False
    suffixes: ClassVar[tuple[str, ...]] = ()
    loads: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()

    path: Path
    metadata: dict[str, Any]
    device: str = "cpu"

    @classmethod
    def load(cls, path: str | os.PathLike, **options: Any) -> Backend:
        """Load ``path``; unknown options are a :class:`UserError` naming the backend."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise UserError(
                f"{path}: option(s) {', '.join(unknown)} do not apply to the {cls.name} backend "
                f"(it takes: {', '.join(cls.options) or 'none'})"
            )
        return cls(Path(path), **options)

    @property
    def input_size(self) -> int:
        """Side of the square model input, from the metadata."""
        return int(self.metadata["input_size"])

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata["label_names"])

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on a batch of preprocessed frames.

        Args:
            batch: uint8 (N, S, S, 3) RGB, S = :attr:`input_size`.

        Returns:
            ``{"probs": (N, C), "logits": (N, M, C), "cams": (N, M, C, h, w),
            "attention": (N, 1, h, w)}`` float32 (the outputs the artifact has).
        """
        s = self.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise UserError(
                f"{self.path}: input must be uint8 (N, {s}, {s}, 3), "
                f"got {batch.dtype} {tuple(batch.shape)}"
            )
        return self._infer(np.ascontiguousarray(batch))

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Backend-specific inference on a checked, contiguous batch."""

    def close(self) -> None:  # noqa: B027  (most backends have nothing to release)
        """Release sessions, device memory and streams. Safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, device={self.device!r})"

    def _check_outputs(self, names: list[str]) -> None:
        """The graph must produce ``probs``; unknown outputs are ignored."""
        if "probs" not in names:
            raise UserError(
                f"{self.path}: model has no 'probs' output (outputs: {', '.join(names)}); "
                "it was not exported by fundus-edge export"
            )
