"""The suite's ``pipelined`` scenario: ``fundus-edge run`` against the model alone.

Does ``run`` keep up with its model? Variants, interleaved in rounds (``suite.interleave``):

* ``run`` on an mp4 video (``runtime.run``: its capture, prepare, inference and log threads);
* with ``before: true``, the same run with the field of view fitted in every frame
  (``RunConfig(track_fov=False)``: the optimisation switched off, measured in the same rounds);
* a plain loop, read -> predict -> (render ->) write, one frame at a time;
* the model alone: ``backend.infer`` on one preprocessed image, ``frames`` times;
* with ``camera: true``, ``run`` on a simulated live camera
  (:class:`fundus_edge.runtime.sources.SimCameraSource`, ``sim://WxH@FPS``) for
  ``camera_seconds`` a round, tracked and (``before``) fitted per frame.

Ratios: FPS of ``run`` / FPS of the model alone, for the file and for the camera (target
``>= 0.9``). A camera cannot deliver more than its rate, so the simulated camera runs at
``camera_rate`` times the model-only FPS measured before the rounds (default 1.5: the pipeline,
not the camera, is then the bottleneck) and its FPS is frames processed / seconds run. Each
camera variant's notes also say where its CPU went: ms a frame by ``run``'s threads
(inference, prepare workers, capture, logs, and the rest of the process: the runtime's and
OpenCV's pools), against the cores' time a frame (:attr:`RunSummary.cpu_ms
<fundus_edge.runtime.RunSummary.cpu_ms>`: each thread's own clock, over the timed rounds);
when the cores are ~100 % busy, no arrangement of the stages makes ``run`` faster there.

Options (:class:`PipelinedOptions`, resolved from the suite file by the one layered loader: an
unknown key or a wrong type is refused before anything runs; beside ``rounds``, ``warmup``,
``frames`` and ``target``):

* ``frame``: ``WxH`` of the video's frames (a synthetic fundus photograph, the frame's height
  across, on black), or the older ``frame_size: N`` for N x N photographs;
* ``model``: the model to run, as :class:`~fundus_edge.models.EnsembleConfig` keys (e.g. a
  one-member student: ``members``, ``member_head``, ``views``, ``image_size``,
  ``num_classes``), exported here with random weights; default the suite's model;
* ``sink``: ``video`` (every frame rendered and written to an mp4, in ``run`` and in the plain
  loop) or ``jsonl`` (the per-frame records only: nothing is rendered, as ``run --jsonl``);
* ``backend: auto``: ``--backend auto``'s choice instead of ONNX Runtime FP32 (suite model only);
* ``threads``: ONNX Runtime intra-op threads of the model in ``run`` (``RunConfig.threads``;
  0: the runtime's default, every core; default: the suite's ``threads`` setting);
* ``streams``: frames in flight in ``run`` (``run --streams N``: N prepare workers and N
  inference threads sharing the one ONNX Runtime session, results in frame order). With N > 1
  the model alone is measured on N concurrent calls too, and its ratio is reported beside the
  target's (whose baseline stays the model alone one frame at a time, the usual model-only
  figure);
* ``accelerator_ms``: with ``camera: true``, also ``run`` on the simulated camera with the
  model on a simulated accelerator: each call waits this many milliseconds without the CPU
  (as a call on a GPU's queue does) and returns the real model's outputs for one input
  (:class:`Accelerated`; one call at a time, as one TensorRT context takes them), on 1 and on
  ``streams`` streams. What it shows: how fast ``run``'s CPU side (capture, N prepare
  workers, logs) feeds a model that leaves the cores free, as on a Jetson, whose model runs on
  the GPU while 6 CPU cores prepare frames. The rows are a simulation and say so;
* ``model_threads``: the thread counts the model alone is measured with (default
  ``[threads]``), each a row; the ratios use the fastest of them, so the baseline is the
  model's best throughput here whatever ``run`` is given. On the 2-core VM the student at 128 px
  is no faster on two threads than on one (``model_threads: [1, 0]`` shows it), and ``run``
  with one leaves the other core to decoding and preparing the next frame.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from suite import (  # bench/suite.py, beside this file
    ScenarioResult,
    Workspace,
    _write_video,
    check_counts,
    interleave,
)

from fundus_edge.backends import Backend
from fundus_edge.convert.calibration import synthetic_frames
from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = ["Accelerated", "PipelinedOptions", "cpu_note", "run_pipelined"]

log = get_logger("bench.pipelined")


_SINKS = ("video", "jsonl")
_BACKENDS = ("onnxruntime", "auto")


@dataclass
class PipelinedOptions:
    """The ``pipelined`` scenario's options (the module docstring says what each one does).

    Attributes:
        rounds: timed rounds; each runs every variant once, in alternating order.
        warmup: untimed calls of each variant first.
        frames: frames of the video (and model-only calls) per round.
        frame: ``WxH`` of the frames; None: ``frame_size`` x ``frame_size``.
        frame_size: the older option, N x N photographs (when ``frame`` is not given).
        sink: ``video`` or ``jsonl``.
        before: also the runs with the field of view fitted in every frame.
        camera: also ``run`` on a simulated camera, ``camera_seconds`` a round, at
            ``camera_rate`` times the model-only FPS.
        model: :class:`~fundus_edge.models.EnsembleConfig` keys of the model to run; None: the
            suite's model.
        backend: ``onnxruntime`` (FP32) or ``auto`` (``--backend auto``'s choice; the suite's
            model only).
        threads: ONNX Runtime intra-op threads of ``run``'s model (0: the runtime's default);
            None: the suite's ``threads``.
        streams: frames in flight in ``run`` (``run --streams``: prepare workers and
            inference threads); with more than one, the model alone is also measured on that
            many concurrent calls.
        model_threads: thread counts the model alone is measured with; None: ``[threads]``.
        accelerator_ms: the simulated accelerator's milliseconds a call (``camera`` runs
            only); None: no accelerator rows.
        target: the FPS ratio's target.
    """

    rounds: int = 3
    warmup: int = 1
    frames: int = 12
    frame: str | None = None
    frame_size: int = 512
    sink: str = "video"
    before: bool = False
    camera: bool = False
    camera_seconds: float = 3.0
    camera_rate: float = 1.5
    model: dict[str, Any] | None = None
    backend: str = "onnxruntime"
    threads: int | None = None
    streams: int = 1
    model_threads: list[int] | None = None
    accelerator_ms: float | None = None
    target: str = ">= 0.9"

    def __post_init__(self) -> None:
        check_counts(self, "rounds", "frames", "streams")
        if self.sink not in _SINKS:
            raise UserError(f"sink: video or jsonl, got {self.sink!r}")
        if self.backend not in _BACKENDS:
            raise UserError(f"backend: {' or '.join(_BACKENDS)}, got {self.backend!r}")
        for key in ("camera_seconds", "camera_rate"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.accelerator_ms is not None:
            if not 0 < self.accelerator_ms <= 1000:
                raise UserError(f"accelerator_ms: must be in (0, 1000], got {self.accelerator_ms}")
            if not self.camera:
                raise UserError("accelerator_ms: needs camera: true (its rows are camera runs)")
        if self.model_threads is not None and not self.model_threads:
            raise UserError("model_threads: at least one thread count (0: the default)")
        if (
            self.backend == "auto"
            and not self.model
            and (self.threads is not None or self.model_threads is not None)
        ):
            raise UserError(
                "threads and model_threads apply to ONNX Runtime FP32, not to backend: auto"
            )
        self.frame_shape()  # a bad frame is refused with the suite, not after the export

    def frame_shape(self) -> tuple[int, int]:
        """(width, height) of the video's frames."""
        if self.frame is None:
            return self.frame_size, self.frame_size
        try:
            w, h = (int(v) for v in self.frame.lower().split("x"))
        except ValueError:
            raise UserError(f"frame: WIDTHxHEIGHT, e.g. 1920x1080; got {self.frame!r}") from None
        if min(w, h) < 64:
            raise UserError(f"frame: at least 64x64 pixels, got {self.frame!r}")
        return w, h


class Accelerated(Backend):
    """A model on a simulated accelerator: each call waits ``ms`` milliseconds without the
    CPU (``time.sleep``, as a thread waiting on a GPU's queue does) and returns ``inner``'s
    real outputs for ``batch``, computed once, for every frame it is given. One call at a
    time (:attr:`concurrent` False, as one TensorRT execution context): ``run --streams N``
    then prepares N frames at once and the model takes them in turn.

    Args:
        inner: the loaded model (its metadata and outputs are this backend's).
        batch: one preprocessed input ``(1, S, S, 3)`` uint8.
        ms: milliseconds a call.
    """

    name = "simulated-accelerator"

    def __init__(self, inner: Backend, batch: np.ndarray, ms: float) -> None:
        self.path, self.metadata = inner.path, inner.metadata
        self.device = f"simulated accelerator, {ms:g} ms a call"
        self._ms = ms
        self._outputs = {k: np.asarray(v[:1]) for k, v in inner.infer(batch).items()}

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self._ms / 1e3)
        return {k: np.repeat(v, len(batch), axis=0) for k, v in self._outputs.items()}


def cpu_note(what: str, taken: list[tuple[dict[str, float], int, float, int]]) -> str:
    """One line: CPU ms a frame by ``run``'s thread groups over ``taken`` (per call: its
    :attr:`RunSummary.cpu_ms <fundus_edge.runtime.RunSummary.cpu_ms>`, frames processed,
    seconds elapsed, cores), against the cores' time a frame."""
    frames = sum(f for _, f, _, _ in taken)
    elapsed = sum(e for _, _, e, _ in taken)
    cores = max(c for _, _, _, c in taken)
    groups: dict[str, float] = {}
    for per_frame, f, _, _ in taken:  # (ms a frame over that call's frames)
        for g, v in per_frame.items():
            groups[g] = groups.get(g, 0.0) + v * f
    order = ("inference", "prepare", "capture", "logs", "draw", "other")
    parts = ", ".join(f"{g} {groups[g] / frames:.2f}" for g in order if g in groups)
    total = groups.get("all", 0.0) / frames
    wall = 1e3 * elapsed / frames
    return (
        f"pipelined: CPU ms a frame by thread, {what}: {parts} (other: the process's threads "
        f"run does not start, e.g. OpenCV's and the runtime's pools); {total:.2f} in all, "
        f"against {cores} cores x {wall:.2f} ms a frame = {cores * wall:.2f} "
        f"({100 * total / (cores * wall):.0f} % busy; run's thread clocks, {frames} frames)"
    )


def _frames(n: int, w: int, h: int, seed: int) -> list[np.ndarray]:
    """``n`` frames of one simulated exam: a synthetic photograph ``min(w, h)`` across, centred
    on black, its content drifting a few pixels from frame to frame behind the camera's fixed
    aperture (the photograph's field of view), with fresh sensor noise in every frame."""
    import cv2

    from fundus_edge.preprocess import find_fov

    side = min(w, h)
    photo = synthetic_frames(1, side, seed)[0]
    c = find_fov(photo)
    aperture = np.zeros((side, side), np.uint8)
    cv2.circle(aperture, (round(c.cx), round(c.cy)), round(c.r), 1, cv2.FILLED)
    rng = np.random.default_rng(seed)
    y0, x0 = (h - side) // 2, (w - side) // 2
    out = []
    for i in range(n):
        dx, dy = round(4 * np.sin(i / 3)), round(3 * np.cos(i / 4))
        moved = np.roll(photo, (dy, dx), axis=(0, 1)) * aperture[:, :, None]
        noisy = np.clip(moved + rng.normal(0, 2, moved.shape), 0, 255).astype(np.uint8)
        f = np.zeros((h, w, 3), np.uint8)
        f[y0 : y0 + side, x0 : x0 + side] = noisy * aperture[:, :, None]
        out.append(f)
    return out


def _model(ws: Workspace, spec: Mapping[str, Any] | None) -> tuple[Path, str]:
    """The ONNX to run and its description: the suite's fused graph, or ``spec`` exported."""
    if not spec:
        return ws.fused_onnx, "the suite's model"
    from fundus_edge.convert.steps import Artifact, CheckpointToOnnx
    from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint
    from fundus_edge.preprocess import PreprocessConfig

    keys = dict(spec)
    keys["members"] = tuple(keys.get("members", ()))
    try:
        mc = EnsembleConfig(**keys)
    except TypeError as exc:
        raise UserError(f"pipelined.model: {exc}") from None
    ens = build_ensemble(mc).eval()
    ckpt = save_checkpoint(
        ws.root / "pipelined.safetensors",
        ens,
        extra={"preprocess": PreprocessConfig(size=mc.image_size).to_dict()},
    )
    art = CheckpointToOnnx("pipelined", simplify=False).run(Artifact("checkpoint", ckpt), ws.steps)
    desc = (
        f"{' + '.join(mc.members)} (member head {mc.member_head}, views {mc.views}), "
        f"{mc.num_classes} classes, {mc.image_size}x{mc.image_size}, random weights"
    )
    return art.artifact.path, desc


def run_pipelined(ws: Workspace, opts: PipelinedOptions) -> ScenarioResult:
    """The ``pipelined`` scenario (see the module docstring)."""
    from fundus_edge.backends import load_backend
    from fundus_edge.preprocess import preprocess
    from fundus_edge.runtime import Predictor, RunConfig, run
    from fundus_edge.runtime.pipeline import make_record
    from fundus_edge.runtime.render import render
    from fundus_edge.runtime.sinks import Output, VideoSink
    from fundus_edge.runtime.sources import SimCameraSource, VideoFileSource

    res = ScenarioResult("pipelined")
    n = opts.frames
    w, h = opts.frame_shape()
    sink, before, camera = opts.sink, opts.before, opts.camera
    rounds, warmup = opts.rounds, opts.warmup
    model, model_desc = _model(ws, opts.model)
    video = _write_video(ws.root / f"frames_{w}x{h}.mp4", _frames(n, w, h, ws.cfg.seed + 3))

    threads = ws.cfg.threads if opts.threads is None else opts.threads
    if opts.backend == "auto" and not opts.model:  # (threads refused with it: PipelinedOptions)
        ws.int8()
        predictor = Predictor(model, backend="auto", gate=False)
        label = f"{predictor.backend.name}-cpu"
        precision = getattr(predictor.backend, "precision", "fp32")
        res.notes.append(f"pipelined: --backend auto chose {predictor.backend.device}")
    else:
        backend = load_backend(model, provider="cpu", threads=threads or None)
        predictor = Predictor(backend, gate=False)
        label, precision = "onnxruntime-cpu", "fp32"
    # The model alone, with each thread count asked for (the run's own backend among them).
    counts = list(opts.model_threads if opts.model_threads is not None else [threads])
    alone_backends = {
        t: predictor.backend
        if t == threads
        else load_backend(model, provider="cpu", threads=t or None)
        for t in counts
    }
    size = predictor.preprocess_config.size
    img = preprocess(
        synthetic_frames(1, max(256, size), ws.cfg.seed)[0], predictor.preprocess_config
    )
    batch = img.image[None]  # (1, S, S, 3) uint8

    def run_config(source: Any, track: bool, tag: str, streams: int = opts.streams) -> Any:
        """``run``'s config: headless, the scenario's sink (``tag`` names its file)."""
        out = (
            {"save_video": ws.root / f"{tag}.mp4"}
            if sink == "video"
            else {"jsonl": ws.root / f"{tag}.jsonl"}
        )
        return RunConfig(
            model=model, source=source, headless=True, track_fov=track, streams=streams, **out
        )

    def file_run(track: bool) -> None:
        cfg = run_config(str(video), track, "p")
        s = run(cfg, predictor=predictor, handle_signals=False)
        if s.frames_processed != n:
            raise UserError(f"pipelined run processed {s.frames_processed} of {n} frames")

    def sequential() -> None:
        src = VideoFileSource(video)
        src.open()
        out_video = VideoSink(ws.root / "s.mp4", fps=10.0) if sink == "video" else None
        log_file = open(ws.root / "s.jsonl", "w") if sink == "jsonl" else None  # noqa: SIM115
        try:
            while (frame := src.read()) is not None:
                pred = predictor.predict(frame.image)
                if out_video is not None:
                    out = Output(frame, pred, {})
                    out.rendered = render(frame.image, pred)
                    out_video.write(out)
                if log_file is not None:
                    log_file.write(json.dumps(make_record(frame, str(video), pred)) + "\n")
        finally:
            src.close()
            if out_video is not None:
                out_video.close()
            if log_file is not None:
                log_file.close()

    def calls(b: Any, k: int = n) -> None:
        """``k`` calls of backend ``b`` on the preprocessed image, one after another."""
        for _ in range(k):
            b.infer(batch)

    def model_only(t: int = threads) -> None:
        calls(alone_backends.get(t, predictor.backend))

    def model_streams() -> None:
        """The run's backend on ``opts.streams`` concurrent calls, ``n`` frames in all."""
        share = [n // opts.streams + (i < n % opts.streams) for i in range(opts.streams)]
        workers = [threading.Thread(target=calls, args=(predictor.backend, k)) for k in share]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def threads_label(t: int) -> str:
        return f"{t} thread{'s' if t > 1 else ''}" if t else "the runtime's default threads"

    def streams_label(k: int) -> str:
        return f"{k} stream{'s' if k > 1 else ''}"

    variants: dict[str, Any] = {"pipelined": lambda: file_run(True)}
    if before:
        variants["fitted"] = lambda: file_run(False)
    variants["sequential"] = sequential
    for t in counts:
        variants[f"model_t{t}"] = lambda t=t: model_only(t)
    if opts.streams > 1:
        variants["model_streams"] = model_streams

    per_frame: dict[str, list[float]] = {}  # camera variants: ms per processed frame, per call
    cpu_of: dict[str, list[Any]] = {}  # camera variants: (cpu_ms, frames, s, cores) a run
    cam_desc = acc_desc = ""
    if camera:
        seconds = opts.camera_seconds
        probe = [0.0] * 3
        for i in range(3):  # the camera's rate: above what the model alone does here
            fastest = min(
                interleave({"m": lambda t=t: model_only(t)}, 1, 1, 1 if i == 0 else 0)["m"][0]
                for t in counts
            )
            probe[i] = fastest / n
        model_fps = 1e3 / float(np.median(probe))
        cam_fps = round(opts.camera_rate * model_fps)
        cam_desc = f"sim://{w}x{h}@{cam_fps}"

        def camera_run(
            track: bool,
            key: str,
            streams: int = opts.streams,
            on: Predictor = predictor,
            desc: str = cam_desc,
            rate: float = cam_fps,
        ) -> None:
            src = SimCameraSource(desc, w, h, rate, seed=ws.cfg.seed)
            cfg = run_config(src, track, "c", streams)
            stopper = threading.Timer(seconds, src.interrupt.set)
            src.open()  # (generating the frames is not timed: run() times from the first read)
            stopper.start()
            try:
                s = run(cfg, predictor=on, handle_signals=False)
            finally:
                stopper.cancel()
            if s.frames_processed < 2:
                raise UserError(f"{desc}: only {s.frames_processed} frames processed")
            per_frame.setdefault(key, []).append(1e3 * s.elapsed_s / s.frames_processed)
            cpu_of.setdefault(key, []).append((s.cpu_ms, s.frames_processed, s.elapsed_s, s.cores))

        variants["camera"] = lambda: camera_run(True, "camera")
        if opts.streams > 1:
            variants["camera_one_stream"] = lambda: camera_run(True, "camera_one_stream", 1)
        if before:
            variants["camera_fitted"] = lambda: camera_run(False, "camera_fitted")
        if opts.accelerator_ms is not None:
            accelerated = Predictor(
                Accelerated(predictor.backend, batch, opts.accelerator_ms), gate=False
            )
            acc_fps = round(opts.camera_rate * 1e3 / opts.accelerator_ms)
            acc_desc = f"sim://{w}x{h}@{acc_fps}"

            variants["accel_alone"] = lambda: calls(accelerated.backend)
            for k in sorted({1, opts.streams}):
                variants[f"accel_{k}"] = lambda k=k: camera_run(
                    True, f"accel_{k}", k, accelerated, acc_desc, acc_fps
                )

    try:
        samples = interleave(variants, rounds, 1, warmup)
    finally:
        for b in alone_backends.values():
            if b is not predictor.backend:
                b.close()
        predictor.close()
    # File variants: one sample per round, ms per frame over the whole video.
    per = {k: [v / n for v in vs] for k, vs in samples.items() if not k.startswith("camera")}
    for k, vs in per_frame.items():
        per[k] = vs[-rounds:]  # the timed rounds (warm-up calls come first)

    def row(variant: str, key: str) -> Any:
        return res.row(variant, label, per[key], precision=precision)

    tracked = row("runtime.run (threads)", "pipelined")
    fitted = row("runtime.run (threads), FOV fitted per frame", "fitted") if before else None
    plain = row(
        f"plain loop read-predict-{'render-' if sink == 'video' else ''}write", "sequential"
    )
    alone_rows = {t: row(f"model only (infer), {threads_label(t)}", f"model_t{t}") for t in counts}
    # The baseline: the model's best throughput here, whichever thread count gave it.
    best = min(counts, key=lambda t: float(np.median(per[f"model_t{t}"])))
    alone = alone_rows[best]
    target = opts.target
    res.compare(plain, tracked, "pipelined speed-up over the sequential loop")
    res.compare(alone, tracked, "pipelined FPS / model-only FPS", target)
    streams_row = None
    if opts.streams > 1:
        streams_row = row(
            f"model only (infer), {opts.streams} concurrent calls on {threads_label(threads)} each",
            "model_streams",
        )
        res.compare(
            streams_row, tracked, f"pipelined FPS / model-only FPS on {opts.streams} streams"
        )
    if fitted is not None:
        res.compare(alone, fitted, "pipelined FPS / model-only FPS, FOV fitted per frame")
    if camera:
        cam = row(f"runtime.run on {cam_desc}", "camera")
        res.compare(alone, cam, "pipelined FPS / model-only FPS, simulated camera", target)
        if opts.streams > 1:
            one = row(f"runtime.run on {cam_desc}, 1 stream", "camera_one_stream")
            res.compare(alone, one, "pipelined FPS / model-only FPS, simulated camera, 1 stream")
        if streams_row is not None:
            res.compare(
                streams_row,
                cam,
                f"pipelined FPS / model-only FPS on {opts.streams} streams, simulated camera",
            )
        if before:
            cam_fitted = row(f"runtime.run on {cam_desc}, FOV fitted per frame", "camera_fitted")
            res.compare(
                alone,
                cam_fitted,
                "pipelined FPS / model-only FPS, simulated camera, FOV fitted per frame",
            )
    if camera and opts.accelerator_ms is not None:
        acc = f"a simulated accelerator ({opts.accelerator_ms:g} ms a call, the CPU left idle)"
        acc_alone = row(f"model only on {acc}", "accel_alone")
        acc_rows = {
            k: row(
                f"runtime.run on {acc_desc}, the model on {acc}, {streams_label(k)}",
                f"accel_{k}",
            )
            for k in sorted({1, opts.streams})
        }
        for k, r in acc_rows.items():
            res.compare(acc_alone, r, f"pipelined FPS / model-only FPS, {acc}, {streams_label(k)}")
        if opts.streams > 1:
            res.compare(
                acc_rows[1],
                acc_rows[opts.streams],
                f"{opts.streams} streams (prepare workers) over 1, {acc}",
            )
        res.notes.append(
            f"pipelined: the accelerator rows are a simulation: each model call waits "
            f"{opts.accelerator_ms:g} ms in time.sleep and returns the real model's outputs "
            "for one input; they time run's CPU side (capture, prepare workers, logs) feeding "
            "a model that leaves the cores free, not any accelerator."
        )
    # Where each camera variant's CPU went, in the order of its rows.
    cpu_what = {
        "camera": f"run on {cam_desc}, {streams_label(opts.streams)}",
        "camera_one_stream": f"run on {cam_desc}, 1 stream",
    }
    for k in sorted({1, opts.streams}):
        cpu_what[f"accel_{k}"] = (
            f"run on {acc_desc}, the model on the simulated accelerator, {streams_label(k)}"
        )
    for key, what_run in cpu_what.items():
        if cpu_of.get(key):
            res.notes.append(cpu_note(what_run, cpu_of[key][-rounds:]))
    what = (
        "every frame rendered and written to an mp4"
        if sink == "video"
        else "every frame's record written to a JSONL log (no visual sink: nothing rendered)"
    )
    res.notes.append(
        f"pipelined: run's model on {threads_label(threads)}"
        + (f", {opts.streams} streams (run --streams)" if opts.streams > 1 else "")
        + "; the model alone on "
        + ", ".join(threads_label(t) for t in counts)
        + f"; ratios against the fastest ({threads_label(best)})."
    )
    res.notes.append(
        f"pipelined: model {model_desc}; {n} synthetic {w}x{h} frames per round from an mp4 "
        f"video, {what}, in run and in the plain loop; samples are ms per frame of one whole "
        "pass."
        + (
            f" Simulated camera {cam_desc} (rate {opts.camera_rate:g}x the model-only "
            f"FPS measured first), {opts.camera_seconds:g} s a round; samples are "
            "run's elapsed time / frames processed."
            if camera
            else ""
        )
    )
    return res
