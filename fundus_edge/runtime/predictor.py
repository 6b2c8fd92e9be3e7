"""One frame in, one typed result out: the Python API that ``fundus-edge run`` is built on.

Example:
    >>> from fundus_edge.runtime.predictor import Predictor
    >>> with Predictor("model.onnx") as predictor:          # doctest: +SKIP
    ...     result = predictor.predict(rgb_frame)
    ...     print(result.positive, result.quality.reason)
    ...     heat = result.map_on_frame(result.top_label)      # (H, W) on the camera frame

Stages, each timed: preprocess (FOV crop and resize, from the artifact's metadata) ->
quality gate -> inference (any :class:`~fundus_edge.backends.Backend`) -> postprocess
(thresholds from the metadata, optional exponential smoothing over a live stream).
The pipeline calls :meth:`Predictor.prepare`, :meth:`Predictor.infer` and
:meth:`Predictor.finish` in separate steps, :meth:`Predictor.predict` chains them: both
paths share every line of code, so the CLI and the API cannot disagree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.backends import Backend, load_backend
from fundus_edge.errors import UserError
from fundus_edge.log import get_logger
from fundus_edge.maps import map_on_frame, normalise_member_maps
from fundus_edge.preprocess import (
    Circle,
    FovTracker,
    Geometry,
    PreprocessConfig,
    Preprocessed,
    Reductions,
    as_rgb_uint8,
    preprocess,
)
from fundus_edge.quality import Quality, QualityConfig, assess_quality

log = get_logger("runtime")

__all__ = ["Prediction", "Predictor", "Prepared", "check_threads"]

_EPS = 1e-7
# Predictor.prepare's default: locate the field of view itself (None is "fit it").
_LOCATE = object()


@dataclass
class Prepared:
    """A frame after preprocessing and the quality gate, ready for inference."""

    frame: np.ndarray  # (H, W, 3) uint8 RGB, the original
    pre: Preprocessed  # .image (S, S, 3) uint8, .geometry
    quality: Quality
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage


@dataclass
class Prediction:
    """What the model says about one frame.

    Attributes:
        label_names: the artifact's labels, in output order.
        thresholds: (C,) decision thresholds from the artifact.
        quality: the quality verdict on the frame.
        geometry: where the model input came from in the frame (FOV circle, crop square).
        inferred: False when the quality gate stopped the frame before inference; then the
            probabilities and maps are None and ``positive`` is empty.
        probabilities: (C,) float32 in [0, 1] (smoothed over time when smoothing is on).
        raw_probabilities: (C,) the model's output for this frame alone.
        positive: labels whose probability reaches their threshold.
        screening_label: the artifact's "any disease" label, if it has one.
        maps: (C, h, w) class maps combined over members by
            :func:`fundus_edge.maps.normalise_member_maps` (each member resampled onto the
            first member's grid, scaled to its peak, averaged); on the model input (use
            :meth:`map_on_frame` for the camera frame).
        cams: (M, C, h, w) per-member raw class maps as the model gave them.
        attention: (h, w) the map that drove the model's enhancement step.
        timings: milliseconds per stage (``preprocess``, ``quality``, ``infer``,
            ``postprocess``).
    """

    label_names: list[str]
    thresholds: np.ndarray
    quality: Quality
    geometry: Geometry
    inferred: bool = False
    probabilities: np.ndarray | None = None
    raw_probabilities: np.ndarray | None = None
    positive: list[str] = field(default_factory=list)
    screening_label: str | None = None
    maps: np.ndarray | None = None
    cams: np.ndarray | None = None
    attention: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def probability(self, label: str) -> float | None:
        """The probability of ``label`` (None when the frame was not inferred)."""
        if self.probabilities is None:
            return None
        return float(self.probabilities[self._index(label)])

    @property
    def screening_positive(self) -> bool | None:
        """The screening label's verdict; None without one or without inference."""
        if self.screening_label is None or not self.inferred:
            return None
        return self.screening_label in self.positive

    @property
    def top_label(self) -> str | None:
        """The most probable positive finding, leaving out the screening label; else None."""
        if self.probabilities is None:
            return None
        best, best_p = None, -1.0
        for name, p in zip(self.label_names, self.probabilities, strict=True):
            if name in self.positive and name != self.screening_label and p > best_p:
                best, best_p = name, float(p)
        return best

    def map_on_frame(self, which: str) -> np.ndarray | None:
        """A map on the original camera frame, peak-scaled to [0, 1] (``maps.map_on_frame``).

        Args:
            which: a label name, or ``"attention"``.

        Returns:
            (H, W) float32, zeros outside the crop square; None without maps.
        """
        if which == "attention":
            m = self.attention
        else:
            m = None if self.maps is None else self.maps[self._index(which)]
        if m is None:
            return None
        return map_on_frame(m, self.geometry)

    def _index(self, label: str) -> int:
        try:
            return self.label_names.index(label)
        except ValueError:
            raise UserError(
                f"unknown label {label!r} (labels: {', '.join(self.label_names)})"
            ) from None

    def to_record(self) -> dict[str, Any]:
        """The JSON-able summary written per frame by ``run --jsonl``."""
        probs = None
        if self.probabilities is not None:
            probs = {
                n: round(float(p), 6)
                for n, p in zip(self.label_names, self.probabilities, strict=True)
            }
        c = self.geometry.circle
        return {
            "quality": {
                k: (round(v, 6) if isinstance(v, float) else v)
                for k, v in self.quality.to_dict().items()
            },
            "inferred": self.inferred,
            "probabilities": probs,
            "positive": list(self.positive),
            "screening": self.screening_positive,
            "fov": {
                "cx": round(c.cx, 2),
                "cy": round(c.cy, 2),
                "r": round(c.r, 2),
                "found": c.found,
                "kind": c.kind,
            },
            "ms": {k: round(v, 3) for k, v in self.timings.items()},
        }


def check_threads(threads: int | None) -> None:
    """``--threads`` (inference threads): None or an integer >= 1, else one line."""
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise UserError(f"--threads must be >= 1 (inference threads), got {threads}")


class Predictor:
    """A model plus everything its artifact says about using it.

    Args:
        model: a model file (``.onnx``, ``.engine``/``.plan``, ``.safetensors``/``.pt``) or an
            already loaded :class:`~fundus_edge.backends.Backend`.
        backend: ``onnxruntime``, ``openvino``, ``tensorrt``, ``torch``, or ``auto`` (the
            fastest that passes parity here: :mod:`fundus_edge.backends.auto`); None: by the
            file's suffix.
        precision: OpenVINO compute precision (``fp32``, ``bf16``, ``int8``).
        provider: ONNX Runtime execution provider (``tensorrt``, ``cuda``, ``cpu``).
        device: PyTorch device for checkpoints; OpenVINO device (``CPU``, ``GPU``, ``NPU``).
        cuda_graph: replay CUDA graphs (TensorRT engines).
        gate: skip inference on frames that fail the quality gate.
        smoothing: exponential smoothing of probabilities over successive frames, in
            [0, 1): 0 = none, 0.6 = each new frame counts 40 %. For live video.
        track_fov: successive frames come from one camera (a video): find the field of view
            once and then only check it (:class:`~fundus_edge.preprocess.FovTracker`) instead
            of fitting it in every frame. Leave False for stills, where each image differs.
        threads: the inference runtime's intra-op threads (ONNX Runtime, OpenVINO); None: its
            own default (every core). A small model in ``run``'s pipeline gains from fewer:
            the student at 128 px is no faster on two ONNX Runtime threads than on one, and
            the second would take the core that decodes and prepares the next frame.
    """

    def __init__(
        self,
        model: str | os.PathLike | Backend,
        *,
        backend: str | None = None,
        precision: str | None = None,
        provider: str | None = None,
        device: str | None = None,
        cuda_graph: bool = False,
        gate: bool = True,
        smoothing: float = 0.0,
        track_fov: bool = False,
        threads: int | None = None,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
        check_threads(threads)
        self.auto: dict[str, Any] | None = None  # the measurement behind --backend auto
        if isinstance(model, Backend):
            if threads is not None:
                raise UserError(
                    "threads: a loaded backend has its threads; give them to load_backend"
                )
            self.backend = model
        else:
            if backend == "auto" and Path(model).suffix.lower() == ".onnx":
                from fundus_edge.backends.auto import choose

                choice = choose(model)
                self.auto = {**choice.record, "cached": choice.cached}
                c = choice.candidate
                model, backend = c.path, c.backend
                if backend == "openvino":
                    precision = c.precision
                log.info(
                    "--backend auto: %s%s", c.label, " (cached choice)" if choice.cached else ""
                )
            elif backend == "auto":
                backend = None  # an engine or a checkpoint has one backend: its suffix's
            self.backend = load_backend(
                model,
                backend=backend,
                precision=precision,
                provider=provider,
                device=device,
                cuda_graph=cuda_graph,
                threads=threads,
            )
        meta = self.backend.metadata
        source = str(self.backend.path)
        try:
            self.preprocess_config = PreprocessConfig.from_dict(meta["preprocess"])
            self.quality_config = QualityConfig.from_dict(meta.get("quality") or {})
        except UserError as exc:
            raise UserError(f"{source}: model metadata: {exc}") from None
        if self.preprocess_config.size != self.backend.input_size:
            raise UserError(
                f"{source}: metadata preprocess size {self.preprocess_config.size} differs from "
                f"input_size {self.backend.input_size}"
            )
        self.label_names: list[str] = list(meta["label_names"])
        self.thresholds = np.asarray(meta["thresholds"], dtype=np.float32)
        # Temperature scaling (the contract's optional ``temperature``, one per label or one for
        # all): p' = sigmoid(logit(p) / T) before smoothing and thresholds. Absent: unchanged.
        from fundus_edge.operating import apply_temperature, temperature_vector

        self.temperature = temperature_vector(
            meta.get("temperature"), len(self.label_names), f"{source}: model metadata"
        )
        self._apply_temperature = apply_temperature
        self.screening_label: str | None = meta.get("screening_label")
        self.gate = gate
        self.smoothing = smoothing
        self._ema: np.ndarray | None = None
        self.fov_tracker: FovTracker | None = FovTracker() if track_fov else None

    @property
    def metadata(self) -> dict[str, Any]:
        """The artifact's contract dict."""
        return self.backend.metadata

    @property
    def track_fov(self) -> bool:
        """Frames are a video's: the field of view is tracked (see the class docstring)."""
        return self.fov_tracker is not None

    @track_fov.setter
    def track_fov(self, on: bool) -> None:
        if not on:
            self.fov_tracker = None
        elif self.fov_tracker is None:
            self.fov_tracker = FovTracker()

    def reset(self) -> None:
        """Forget the smoothing state and the tracked field of view (a new patient, a new
        stream)."""
        self._ema = None
        if self.fov_tracker is not None:
            self.fov_tracker.reset()

    def locate(self, frame: np.ndarray) -> Circle | None:
        """The frame's field of view as :meth:`prepare` finds it: the tracked circle of a
        video (the tracker is stateful: call it in frame order), or None for a still, which
        :func:`~fundus_edge.preprocess.preprocess` fits itself."""
        if self.fov_tracker is None:
            return None
        return self.fov_tracker.find(as_rgb_uint8(frame))

    def prepare(self, frame: np.ndarray, circle: Circle | object | None = _LOCATE) -> Prepared:
        """Preprocess one full camera frame and grade its quality.

        Args:
            frame: (H, W, 3) uint8 RGB (grey and RGBA are accepted too).
            circle: the field of view from :meth:`locate` (``run``'s prepare workers take
                the frames' circles in frame order, then prepare them side by side); by
                default it is located here.
        """
        frame = as_rgb_uint8(frame)
        t0 = time.perf_counter()
        if circle is _LOCATE:
            circle = self.locate(frame)
        # The model input and the gate's copy come from the same square of the frame: its
        # area halvings are made once (the same bytes as each made alone).
        shared = Reductions(frame)
        pre = preprocess(frame, self.preprocess_config, circle, shared)
        t1 = time.perf_counter()
        quality = assess_quality(frame, pre.circle, self.quality_config, shared)
        t2 = time.perf_counter()
        return Prepared(
            frame, pre, quality, {"preprocess": (t1 - t0) * 1e3, "quality": (t2 - t1) * 1e3}
        )

    def infer(self, prepared: Sequence[Prepared]) -> list[dict[str, np.ndarray] | None]:
        """Run the model on the frames that pass the gate, in one batch.

        Returns:
            Per frame: its outputs with the batch axis removed, or None when gated out.
        """
        todo = [i for i, p in enumerate(prepared) if p.quality.passed or not self.gate]
        results: list[dict[str, np.ndarray] | None] = [None] * len(prepared)
        if not todo:
            return results
        batch = np.stack([prepared[i].pre.image for i in todo])  # (N, S, S, 3) uint8
        t0 = time.perf_counter()
        out = self.backend.infer(batch)
        ms = (time.perf_counter() - t0) * 1e3 / len(todo)
        for j, i in enumerate(todo):
            results[i] = {k: v[j] for k, v in out.items()}
            prepared[i].timings["infer"] = ms
        return results

    def finish(self, prepared: Prepared, raw: dict[str, np.ndarray] | None) -> Prediction:
        """Thresholds, smoothing and maps: the model's outputs as a :class:`Prediction`."""
        t0 = time.perf_counter()
        result = Prediction(
            label_names=self.label_names,
            thresholds=self.thresholds,
            quality=prepared.quality,
            geometry=prepared.pre.geometry,
            screening_label=self.screening_label,
            timings=prepared.timings,
        )
        if raw is not None:
            probs = np.asarray(raw["probs"], dtype=np.float32)  # (C,)
            if probs.shape != (len(self.label_names),):
                raise UserError(
                    f"{self.backend.path}: model gives {probs.shape} probabilities for "
                    f"{len(self.label_names)} labels in its metadata"
                )
            if self.temperature is not None:
                probs = self._apply_temperature(probs, self.temperature).astype(np.float32)
            smooth = probs
            if self.smoothing > 0.0:
                prev = self._ema if self._ema is not None else probs
                smooth = self.smoothing * prev + (1.0 - self.smoothing) * probs
                self._ema = smooth
            result.inferred = True
            result.raw_probabilities = probs
            result.probabilities = smooth
            result.positive = [
                n
                for n, p, t in zip(self.label_names, smooth, self.thresholds, strict=True)
                if p >= t
            ]
            if "cams" in raw:
                cams = np.asarray(raw["cams"], dtype=np.float32)  # (M, C, h, w)
                result.cams = cams
                result.maps = normalise_member_maps(cams)  # (C, h, w), fundus_edge.maps
            if "attention" in raw:
                result.attention = np.asarray(raw["attention"], dtype=np.float32)[0]  # (h, w)
        result.timings["postprocess"] = (time.perf_counter() - t0) * 1e3
        return result

    def predict(self, frame: np.ndarray) -> Prediction:
        """Everything for one full camera frame (RGB uint8)."""
        prepared = self.prepare(frame)
        (raw,) = self.infer([prepared])
        return self.finish(prepared, raw)

    def predict_batch(self, frames: Sequence[np.ndarray]) -> list[Prediction]:
        """Several frames in one inference batch (smoothing runs in the given order)."""
        prepared = [self.prepare(f) for f in frames]
        raws = self.infer(prepared)
        return [self.finish(p, r) for p, r in zip(prepared, raws, strict=True)]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
