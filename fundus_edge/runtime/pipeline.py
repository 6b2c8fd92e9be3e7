"""``fundus-edge run``: capture -> preprocess + quality gate -> infer -> postprocess -> render -> sinks.

Threads and bounded queues let the stages overlap, so a slow window or disk never stalls
inference and memory stays flat however long the run:

    capture --inbox--> prepare workers --prepared--> inference threads --records--> log thread
    thread             (FOV, crop,                   (model, thresholds,            (JSONL, CSV,
    (decode)            quality gate)                 maps)                          --capture)
                                                            \\--visual--> main thread
                                                     (render, window, video, folder)

Decoding, preprocessing and inference run in threads of their own, so frame N+1 is decoded
and preprocessed while the model runs on frame N (OpenCV, NumPy's large array operations and
the inference runtimes release the GIL). A video's field of view is found once and then
tracked (:class:`~fundus_edge.preprocess.FovTracker`; stills are fitted one by one), and a
frame is rendered only when a visual sink will show it: no visual sink, no rendering; a
live view without viewers, none; a video of a live source at its own frame rate.

What a frame costs outside the model matters once the model is fast (the one-member student
at 128 px: 3-7 ms on one core of the 2-core EPYC VMs): OpenCV's BGR frames become RGB by
OpenCV's channel shuffle (0.3 ms at 1920x1080, against 9 ms for a reversed NumPy view made
contiguous), ``sim://`` hands over its buffers without a copy, and the model input and the
quality gate's copy are made from one area reduction of the field's square
(:class:`~fundus_edge.preprocess.Reductions`): OpenCV's vectorised 2x2 area halvings read the
frame once (0.5 ms for a 944-px field), then each output takes its last, mild step (~0.6 ms
each). The gate's measures then cost ~1.2 ms: the prepare workers' ~3-6 ms of CPU a frame at
1920x1080, by VM (3.0-3.1 ms in the ``pipelined`` suite's CPU notes, 2026-12-02 08:57; 7-8 ms
before the shared reduction of 0ed8eb3, on that day's earlier VM), and for a video file
~3-5 ms more in the capture thread and FFmpeg's (mp4v decode).

With :attr:`RunConfig.threads` = 1 the model keeps one core and the rest of the pipeline has
the other (ONNX Runtime's default takes every core for itself, which a small model uses
poorly: see :class:`~fundus_edge.runtime.predictor.Predictor`'s ``threads``), and
:attr:`RunConfig.streams` = N keeps N frames in flight: N prepare workers and, where the
backend allows concurrent calls (ONNX Runtime), N inference threads on the one loaded model
(TensorRT's context and OpenVINO's request take the prepared frames in turn, on one thread).
The workers take frames in turn under one lock that gives out each frame's number and its
field of view (:meth:`Predictor.locate <fundus_edge.runtime.Predictor.locate>`: the tracker is
stateful, so it sees the frames in order, exactly as with one worker), then crop and grade
side by side. When the model is the slowest stage a second stream puts it on the core the
prepare stage leaves idle; when the model runs on a GPU and the CPU's prepare is the slowest,
N workers use N cores. With N > 1 the workers are the parallelism, and OpenCV's own thread
pool is set to one thread for the run (:func:`_opencv_threads`). Streams finish out of order;
their results wait in :meth:`_Run._emit` and leave in frame order, so smoothing, counts and
every sink see the frames as they came.

On two cores with the model on the CPU, the frame's CPU (model + prepare + decode) bounds
``run`` however well the stages overlap: 0.46-0.84 of the model alone for a live camera at
1920x1080 and 0.26-0.52 for an mp4 file on the 2-core VMs, lower the faster the model
(``bench/scenarios/pipelined-student.yaml``, 2026-12-02; the suite's CPU notes on a Zen 3 VM:
~5 ms of model and ~3 ms of prepare a camera frame, where 0.9 of the model alone leaves ~6 ms
on both cores; :attr:`RunSummary.cpu_ms` reports the same split for any run). With the model
on a (simulated) accelerator, two prepare workers give 1.15-1.4x one's rate there.

A live source's inbox keeps only the newest frame (a camera must show *now*); a file's
inbox blocks, so every frame is processed. The log gets every processed frame; visual
sinks drop frames only behind a live source. SIGINT/SIGTERM stop capture, let the
queued outputs drain, and close every sink, so the log ends on a whole line and the
video is playable.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError
from fundus_edge.fileio import ensure_writable_dir, ensure_writable_file
from fundus_edge.log import get_logger
from fundus_edge.runtime.predictor import Predictor, check_threads
from fundus_edge.runtime.render import render
from fundus_edge.runtime.sinks import (
    CaptureSink,
    CsvSink,
    DirSink,
    JsonlSink,
    Output,
    Sink,
    VideoSink,
    WindowSink,
    display_available,
)
from fundus_edge.runtime.sources import Frame, Skipped, Source, open_source

__all__ = ["RunConfig", "RunSummary", "make_record", "run"]

log = get_logger("run")

# Live video: each new frame counts 40 % (about 2 frames' memory); files are independent images.
LIVE_SMOOTHING = 0.6
STAGES = ("preprocess", "quality", "infer", "postprocess")
#: ``run``'s own threads, as :attr:`RunSummary.cpu_ms` groups their CPU time.
CPU_GROUPS = ("capture", "prepare", "inference", "logs", "draw")
# run --streams: more than a few inference threads only contend for the same cores.
MAX_STREAMS = 16


@dataclass
class RunConfig:
    """Everything ``fundus-edge run`` takes; see ``fundus-edge run --help``."""

    model: str | Path
    source: str | int | Source  # what open_source() takes, or a ready Source
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    loop: bool = False
    reconnect: float = 10.0
    backend: str | None = None
    precision: str | None = None
    provider: str | None = None
    device: str | None = None
    cuda_graph: bool = False
    # The inference runtime's intra-op threads when run() loads the model (None: its default).
    threads: int | None = None
    # Frames in flight: prepare workers, and inference threads sharing the loaded model where
    # its backend allows concurrent calls (ONNX Runtime; others take the frames in turn).
    # Results still come out in frame order.
    streams: int = 1
    headless: bool = False
    save_video: Path | None = None
    save_dir: Path | None = None
    jsonl: Path | None = None
    capture: Path | None = None
    capture_window: int = 10
    strict: bool = False
    gate: bool = True
    smoothing: float | None = None  # None: LIVE_SMOOTHING for live sources, 0 for files
    map: str = "auto"
    alpha: float = 0.5
    max_frames: int | None = None
    queue_size: int = 4
    anonymise: bool = False  # pseudonyms for paths and DICOM identifiers in every output
    report: Path | None = None  # per-visit screening reports into this folder
    send: str | None = None  # AE@HOST:PORT: C-STORE the reports' DICOM objects there
    append: bool = False  # add to existing logs and reports (a restarted watch)
    watch: Path | None = None  # a folder watched for new stills and DICOM files
    watch_settle: float = 1.0  # seconds a new file's size and mtime must stay unchanged
    serve: str | None = None  # [HOST:]PORT: the live browser view
    token: str | None = None  # required by every endpoint (generated beyond loopback)
    cert: Path | None = None  # HTTPS certificate (PEM) ...
    key: Path | None = None  # ... and its private key
    max_viewers: int = 8
    serve_fps: float = 10.0  # streamed (and so rendered) frames a second at most
    capture_dir: Path | None = None  # the live view's captures (default ./captures)
    track_fov: bool = True  # video sources: find the field of view once, then track it


@dataclass
class RunSummary:
    """What a run did, for the closing report and for callers of :func:`run`."""

    source: str
    model: str
    backend: str = ""
    device: str = ""
    live: bool = False
    frames_read: int = 0
    frames_processed: int = 0
    frames_inferred: int = 0
    frames_gated: int = 0
    frames_dropped: int = 0  # live frames replaced by a newer one before inference
    frames_not_drawn: int = 0  # outputs a lossy visual sink skipped to keep up
    skipped: list[Skipped] = field(default_factory=list)
    positives: dict[str, int] = field(default_factory=dict)
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean per processed frame
    # CPU ms per processed frame: run's thread groups (CPU_GROUPS; "draw", the main thread
    # rendering for the visual sinks, only with one), "other" (the rest of the process
    # meanwhile: the runtime's and OpenCV's pools, FFmpeg's decoders, the caller's threads)
    # and "all" (the process).
    cpu_ms: dict[str, float] = field(default_factory=dict)
    cores: int = 0  # the CPUs this process may run on
    elapsed_s: float = 0.0
    stop_reason: str = ""
    interrupted: bool = False
    reconnects: int = 0
    outputs: list[str] = field(default_factory=list)  # what was written
    not_written: list[str] = field(default_factory=list)  # outputs with nothing to write
    captured: bool | None = None  # None: no --capture

    @property
    def fps(self) -> float:
        return self.frames_processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        d = dataclasses.asdict(self)
        d["fps"] = round(self.fps, 3)
        return d

    def lines(self) -> list[str]:
        """The closing report, a few lines of plain text."""
        out = [
            f"source {self.source}: {self.stop_reason or 'done'}"
            + (f" after {self.reconnects} reconnect(s)" if self.reconnects else ""),
            f"model {self.model} on {self.backend} ({self.device})",
            f"frames: {self.frames_read} read, {self.frames_processed} processed, "
            f"{self.frames_inferred} inferred, {self.frames_gated} failed the quality gate"
            + (f", {self.frames_dropped} dropped to stay live" if self.frames_dropped else "")
            + (f", {self.frames_not_drawn} not drawn" if self.frames_not_drawn else ""),
            f"time: {self.elapsed_s:.1f} s, {self.fps:.1f} FPS; per frame "
            + ", ".join(f"{k} {v:.1f}" for k, v in self.stage_ms.items())
            + " ms",
        ]
        if self.cpu_ms and self.frames_processed:
            wall = 1e3 * self.elapsed_s / self.frames_processed
            busy = self.cpu_ms["all"] / max(self.cores * wall, 1e-9)
            out.append(
                "CPU per frame: "
                + ", ".join(f"{k} {v:.2f}" for k, v in self.cpu_ms.items() if k != "all")
                + f" ms; {self.cpu_ms['all']:.2f} ms in all, {busy:.0%} of {self.cores} "
                f"core{'s' if self.cores != 1 else ''}"
            )
        found = ", ".join(f"{k} {v}" for k, v in self.positives.items() if v)
        out.append(f"positive frames: {found or 'none'}")
        if self.skipped:
            out.append(f"skipped {len(self.skipped)}:")
            out.extend(f"  {s.item}: {s.reason}" for s in self.skipped)
        out.extend(f"wrote {o}" for o in self.outputs)
        out.extend(self.not_written)
        return out


def make_record(frame: Frame, source: str, prediction: Any) -> dict[str, Any]:
    """The JSONL record of one frame (schema in ``fundus-edge run --help``).

    ``rel`` is an image's path relative to the source root; ``eye`` its laterality (``R``,
    ``L``: DICOM ImageLaterality/Laterality, else a name token such as ``_left``; None when
    unknown and for video/cameras); ``dicom`` the object's identifiers (no names), else None.
    """
    eye = None
    if frame.dicom is not None:
        eye = frame.dicom.eye
    elif frame.rel is not None:
        from fundus_edge.report.visits import eye_from_name

        eye = eye_from_name(frame.rel)
    record: dict[str, Any] = {
        "source": source,
        "frame": frame.index,
        "timestamp": round(frame.timestamp, 6),
        "image": frame.path,
        "rel": frame.rel,
        "eye": eye,
        "dicom": None if frame.dicom is None else frame.dicom.record(),
        "position_s": None if frame.position_s is None else round(frame.position_s, 4),
    }
    record.update(prediction.to_record())
    return record


class _Channel:
    """A bounded queue between two threads.

    ``latest=True``: a full channel drops its oldest item (live video); otherwise ``put``
    waits for room. ``close`` ends the stream after the queued items; ``cancel`` ends it now
    (an error elsewhere) and releases a waiting producer.
    """

    def __init__(self, maxsize: int, latest: bool) -> None:
        self._items: collections.deque = collections.deque()
        self._max = max(1, maxsize)
        self._latest = latest
        self._cond = threading.Condition()
        self._closed = False
        self._cancelled = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        with self._cond:
            if self._latest:
                while len(self._items) >= self._max:
                    self._items.popleft()
                    self.dropped += 1
            else:
                while len(self._items) >= self._max and not self._cancelled:
                    self._cond.wait(0.1)
            if self._cancelled:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self) -> Any | None:
        with self._cond:
            while not self._items and not self._closed and not self._cancelled:
                # A timed wait keeps the main thread responsive to signals.
                self._cond.wait(0.1)
            if self._cancelled or not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._cond.notify_all()


class _Run:
    """One run's threads, channels and counters (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        source: Source,
        predictor: Predictor,
        sinks: list[Sink],
        on_output: Callable[[Output], None] | None,
    ) -> None:
        self.cfg, self.source, self.predictor, self.sinks = cfg, source, predictor, sinks
        self.on_output = on_output
        self.visual = [s for s in sinks if s.visual]
        self.logs = [s for s in sinks if not s.visual]
        live = source.live
        self.inbox = _Channel(1 if live else cfg.queue_size, latest=live)
        # One prepared frame waits per stream while the model runs: more would only age a
        # live frame. N streams are N prepare workers and, where the backend takes calls
        # from several threads at once (ONNX Runtime), N inference threads; else one.
        self.streams = max(1, cfg.streams)
        self.inferring = self.streams if predictor.backend.concurrent else 1
        self.prepared = _Channel(
            self.streams if live else max(cfg.queue_size, self.streams), latest=False
        )
        # Streams finish out of order: results wait here for their turn (frame order), so
        # smoothing, counts and every sink see the frames as they came.
        self._order = threading.Lock()
        self._waiting: dict[int, tuple[Frame, Any, Any]] = {}
        self._next_out = 0
        self._streams_left = self.inferring
        # Prepare workers take frames in turn: the frame's number and its field of view
        # (the tracker is stateful) are given out in frame order under this lock.
        self._take = threading.Lock()
        self._taken = 0
        self._preparers_left = self.streams
        self.records = _Channel(max(64, cfg.queue_size), latest=False)
        lossy = live and all(s.lossy for s in self.visual)
        self.drawings = _Channel(2 if lossy else cfg.queue_size, latest=lossy)
        self.stop = threading.Event()
        self.interrupted = False
        self.errors: list[BaseException] = []
        self.summary = RunSummary(
            source=source.description,
            model=str(predictor.backend.path),
            backend=predictor.backend.name,
            device=predictor.backend.device,
            live=live,
            positives=dict.fromkeys(predictor.label_names, 0),
        )
        self._ms: dict[str, float] = dict.fromkeys((*STAGES, "render"), 0.0)
        self._cpu: dict[str, float] = dict.fromkeys(CPU_GROUPS, 0.0)  # seconds
        self._cpu_lock = threading.Lock()
        self._rendered = 0
        self._slots: dict[int, float] = {}  # paced sinks' next frame time (see _due)
        self.feed: Any = None  # the live view's feed (run --serve): its map choice, its status
        self._t0 = time.time()
        self._recent: collections.deque[float] = collections.deque(maxlen=30)

    # -- control ------------------------------------------------------------------------------

    def request_stop(self, reason: str, interrupted: bool = False) -> None:
        if not self.stop.is_set():
            self.summary.stop_reason = reason
        self.interrupted = self.interrupted or interrupted
        self.stop.set()
        self.source.interrupt.set()

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()
        self.source.interrupt.set()
        for ch in (self.inbox, self.prepared, self.records, self.drawings):
            ch.cancel()

    # -- threads -------------------------------------------------------------------------------

    def capture(self) -> None:
        try:
            limit = self.cfg.max_frames
            while not self.stop.is_set():
                if limit is not None and self.summary.frames_read >= limit:
                    self.request_stop(f"stopped after {limit} frames")
                    break
                frame = self.source.read()
                if frame is None:
                    if not self.stop.is_set():
                        self.summary.stop_reason = self.source.end_reason
                    break
                self.summary.frames_read += 1
                if not self.inbox.put(frame):
                    break
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.inbox.close()

    def prepare(self) -> None:
        """One prepare worker: the next frame's number and field of view in frame order
        (under :attr:`_take`), then its model input and quality gate beside the others."""
        try:
            while True:
                with self._take:
                    frame = self.inbox.get()
                    if frame is None or self.interrupted:
                        break  # (interrupted: leave queued frames, the user wants out now)
                    seq = self._taken
                    self._taken += 1
                    t0 = time.perf_counter()
                    circle = self.predictor.locate(frame.image)
                    located_ms = (time.perf_counter() - t0) * 1e3
                prepared = self.predictor.prepare(frame.image, circle)
                prepared.timings["preprocess"] += located_ms  # the stage's time, as before
                if not self.prepared.put((seq, frame, prepared)):
                    break
        except BaseException as exc:
            self._fail(exc)
        finally:
            with self._take:
                self._preparers_left -= 1
                last = self._preparers_left == 0
            if last:
                self.prepared.close()

    def infer(self) -> None:
        """One stream: the model on the next prepared frame, then :meth:`_emit` (in order)."""
        try:
            while (item := self.prepared.get()) is not None:
                if self.interrupted:
                    break
                seq, frame, prepared = item
                (raw,) = self.predictor.infer([prepared])
                if not self._emit(seq, frame, prepared, raw):
                    break
        except BaseException as exc:
            self._fail(exc)
        finally:
            with self._order:
                self._streams_left -= 1
                last = self._streams_left == 0
            if last:
                self.records.close()
                self.drawings.close()

    def _emit(self, seq: int, frame: Frame, prepared: Any, raw: Any) -> bool:
        """Queue a result and pass on every one whose turn has come: thresholds, smoothing
        and maps (``Predictor.finish``, stateful: in frame order), counts, then the sinks'
        channels. False when a channel was cancelled."""
        with self._order:
            self._waiting[seq] = (frame, prepared, raw)
            while self._next_out in self._waiting:
                frame, prepared, raw = self._waiting.pop(self._next_out)
                self._next_out += 1
                pred = self.predictor.finish(prepared, raw)
                pred.timings["latency"] = (time.time() - frame.timestamp) * 1e3
                out = Output(frame, pred, make_record(frame, self.source.description, pred))
                self._count(out)
                if not self.records.put(out):
                    return False
                if self.visual and not self.drawings.put(out):
                    return False
        return True

    def status(self) -> dict[str, Any]:
        """The run now, for the live view's /status and its events."""
        s = self.summary
        n = max(s.frames_processed, 1)
        recent = list(self._recent)
        fps = (
            (len(recent) - 1) / (recent[-1] - recent[0])
            if len(recent) > 1 and recent[-1] > recent[0]
            else 0.0
        )
        stage = {k: round(self._ms[k] / n, 2) for k in STAGES}
        if self._rendered:
            stage["render"] = round(self._ms["render"] / self._rendered, 2)
        feed = self.feed
        return {
            "source": self.source.description,
            "model": Path(str(self.predictor.backend.path)).name,
            "backend": self.predictor.backend.name,
            "running": not self.stop.is_set(),
            "frames": s.frames_processed,
            "inferred": s.frames_inferred,
            "gated": s.frames_gated,
            "drops": self.inbox.dropped
            + self.drawings.dropped
            + (feed.viewer_drops if feed else 0),
            "fps": round(fps, 2),
            "stage_ms": stage,
            "uptime_s": round(time.time() - self._t0, 1),
            "viewers": feed.viewers if feed else 0,
            "max_viewers": feed.max_viewers if feed else 0,
            "map": self._map(),
            "maps": list(feed.map_choices) if feed else [],
            "labels": list(self.predictor.label_names),
            "thresholds": {
                n_: round(float(t), 4)
                for n_, t in zip(self.predictor.label_names, self.predictor.thresholds, strict=True)
            },
            "captures": len(feed.captures) if feed else 0,
        }

    def _map(self) -> str:
        """The map drawn: the live view's choice when a viewer made one, else ``--map``."""
        feed = self.feed
        return feed.map if feed is not None and feed.map else self.cfg.map

    def _count(self, out: Output) -> None:
        s, pred = self.summary, out.prediction
        self._recent.append(time.monotonic())
        s.frames_processed += 1
        if pred.inferred:
            s.frames_inferred += 1
            for name in pred.positive:
                s.positives[name] += 1
        else:
            s.frames_gated += 1
        for k in STAGES:
            self._ms[k] += pred.timings.get(k, 0.0)

    def write_logs(self) -> None:
        try:
            while (out := self.records.get()) is not None:
                for sink in self.logs:
                    sink.write(out)
                    if sink.done:
                        self.request_stop("captured")
                if self.on_output is not None:
                    self.on_output(out)
        except BaseException as exc:
            self._fail(exc)

    def draw(self) -> None:
        """Main thread: render and feed the visual sinks (GUI toolkits want the main thread)."""
        last = None
        fps = None
        try:
            while (out := self.drawings.get()) is not None:
                now = time.perf_counter()
                if last is not None:
                    inst = 1.0 / max(now - last, 1e-6)
                    fps = inst if fps is None else 0.9 * fps + 0.1 * inst
                last = now
                wanting = [sink for sink in self.visual if sink.wants_frame and self._due(sink)]
                if not wanting:
                    continue  # nobody would see it (a live view without viewers)
                t0 = time.perf_counter()
                which = self._map()
                out.rendered = render(
                    out.frame.image,
                    out.prediction,
                    which=which,
                    alpha=self.cfg.alpha,
                    fps=fps,
                )
                self._ms["render"] += (time.perf_counter() - t0) * 1e3
                self._rendered += 1
                for sink in wanting:
                    sink.write(out)
                    if sink.done:
                        self.request_stop("closed by the user")
        except BaseException as exc:
            self._fail(exc)

    def _due(self, sink: Sink) -> bool:
        """A lossy sink with a frame rate (a live source's ``--save-video``) takes frames at
        that rate, not at the model's: a frame is due within half a period of its slot, so a
        source at or below the rate loses nothing and a faster one is thinned evenly."""
        rate = getattr(sink, "fps", None)
        if not sink.lossy or not rate:
            return True
        now, period = time.monotonic(), 1.0 / rate
        slot = self._slots.get(id(sink), now)
        if now < slot - 0.5 * period:
            return False
        self._slots[id(sink)] = max(slot + period, now - 0.5 * period)
        return True

    # -- the run ---------------------------------------------------------------------------------

    def execute(self) -> RunSummary:
        with _opencv_threads(1 if self.streams > 1 else None):
            return self._execute()

    def _counted(self, body: Callable[[], None], group: str) -> Callable[[], None]:
        """``body`` as a thread's target that adds the thread's CPU time to ``group`` as it
        ends (``time.thread_time``: the kernel's per-thread clock, exact and portable)."""

        def target() -> None:
            try:
                body()
            finally:
                used = time.thread_time()
                with self._cpu_lock:
                    self._cpu[group] += used

        return target

    def _execute(self) -> RunSummary:
        t0, cpu0 = time.perf_counter(), time.process_time()

        def thread(body: Callable[[], None], group: str, name: str) -> threading.Thread:
            return threading.Thread(target=self._counted(body, group), name=name, daemon=True)

        threads = [
            thread(self.capture, "capture", "fe-capture"),
            *(thread(self.prepare, "prepare", f"fe-prepare-{i}") for i in range(self.streams)),
            *(thread(self.infer, "inference", f"fe-infer-{i}") for i in range(self.inferring)),
            thread(self.write_logs, "logs", "fe-log"),
        ]
        for t in threads:
            t.start()
        try:
            if self.visual:
                c0 = time.thread_time()
                try:
                    self.draw()
                finally:
                    with self._cpu_lock:
                        self._cpu["draw"] += time.thread_time() - c0
            for t in threads:
                while t.is_alive():
                    t.join(0.1)  # timed: signals reach the main thread meanwhile
        finally:
            self.source.close()
            for sink in self.sinks:
                try:
                    sink.close()
                except BaseException as exc:
                    self.errors.append(exc)
        s = self.summary
        s.elapsed_s = time.perf_counter() - t0
        s.cpu_ms, s.cores = self._cpu_report(time.process_time() - cpu0), _cores()
        s.interrupted = self.interrupted
        s.frames_dropped = self.inbox.dropped
        s.frames_not_drawn = self.drawings.dropped
        s.skipped = list(self.source.skipped)
        s.reconnects = getattr(self.source, "reconnects", 0)
        n = max(s.frames_processed, 1)
        s.stage_ms = {k: round(self._ms[k] / n, 3) for k in STAGES}
        if self._rendered:
            s.stage_ms["render"] = round(self._ms["render"] / self._rendered, 3)
        files = [s for s in self.sinks if s.is_file and not isinstance(s, WindowSink)]
        s.outputs = [sink.describe() for sink in files if sink.written]
        s.not_written = [sink.describe() for sink in files if not sink.written]
        captures = [sink for sink in self.sinks if isinstance(sink, CaptureSink)]
        if captures:
            s.captured = captures[0].saved
        if self.errors:
            raise self.errors[0]
        return s

    def _cpu_report(self, process_s: float) -> dict[str, float]:
        """CPU ms per processed frame: each group of run's threads, the rest, the process."""
        n = max(self.summary.frames_processed, 1)
        with self._cpu_lock:
            groups = {k: v for k, v in self._cpu.items() if k != "draw" or self.visual}
        # Each thread's clock and the process's are read apart: the rest is never negative.
        other = max(process_s - sum(groups.values()), 0.0)
        seconds = {**groups, "other": other, "all": max(process_s, sum(groups.values()))}
        return {k: round(1e3 * v / n, 3) for k, v in seconds.items()}


def _cores() -> int:
    """The CPUs this process may run on (its affinity where the OS has one)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _check_options(cfg: RunConfig) -> None:
    """Numbers out of range: one line naming the option, before anything opens."""
    if not cfg.watch_settle > 0:
        raise UserError(f"--watch-settle must be > 0 seconds, got {cfg.watch_settle:g}")
    check_threads(cfg.threads)
    if isinstance(cfg.streams, bool) or not 1 <= cfg.streams <= MAX_STREAMS:
        raise UserError(
            f"--streams must be in 1..{MAX_STREAMS} (frames on the model at once), got {cfg.streams}"
        )
    if cfg.max_frames is not None and cfg.max_frames < 1:
        raise UserError(f"--max-frames must be >= 1, got {cfg.max_frames}")
    # `not x > 0` rather than `x <= 0`: NaN is out of range too.
    if cfg.fps is not None and not cfg.fps > 0:
        raise UserError(f"--fps must be > 0 (frames per second), got {cfg.fps:g}")
    if not cfg.reconnect >= 0:
        raise UserError(
            f"--reconnect must be >= 0 seconds (0: do not reconnect), got {cfg.reconnect:g}"
        )
    for option, value in (("--width", cfg.width), ("--height", cfg.height)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be >= 1 pixel, got {value}")
    if cfg.capture_window < 0:
        raise UserError(
            f"--capture-window must be >= 0 frames (0: the first good frame), got {cfg.capture_window}"
        )


def _check_outputs(cfg: RunConfig) -> None:
    """Prove every output place writable before the model loads and the source runs: a
    --capture or a video is written at the end, maybe hours later."""
    for path, option in (
        (cfg.jsonl, "--jsonl"),
        (cfg.capture, "--capture"),
        (cfg.save_video, "--save-video"),
    ):
        if path is not None:
            ensure_writable_file(path, option)
    if cfg.save_dir is not None:
        ensure_writable_dir(cfg.save_dir, "--save-dir")
    if cfg.report is not None:
        ensure_writable_dir(cfg.report, "--report")
        earlier = Path(cfg.report) / "photos.jsonl"
        if not cfg.append and earlier.is_file():
            # Only a watch adds to a report folder; anything else would mix two runs' records.
            raise UserError(
                f"--report {cfg.report}: holds an earlier run's report ({earlier.name}); "
                "give a new folder (nothing was changed)"
            )
        if cfg.send is not None:
            from fundus_edge.errors import require
            from fundus_edge.report.dicom_out import parse_target

            parse_target(cfg.send)
            require("pydicom", extra="dicom", purpose="writing DICOM reports")
            require("pynetdicom", extra="dicom", purpose="sending to a PACS")
        from fundus_edge.report.sink import check_report_dependencies

        check_report_dependencies()
    elif cfg.send is not None:
        raise UserError("--send stores a report's DICOM objects: give --report DIR too")


def _check_readers(source: Source) -> None:
    """DICOM files among the inputs need pydicom (the dicom extra): say so before any work."""
    from fundus_edge.errors import require
    from fundus_edge.media import is_dicom_file
    from fundus_edge.runtime.sources import ImageFilesSource

    if isinstance(source, ImageFilesSource) and any(is_dicom_file(p) for p in source.paths):
        require("pydicom", extra="dicom", purpose="reading DICOM files")


def csv_beside(jsonl: Path) -> Path:
    """The results table written beside a JSONL log (``run.jsonl`` -> ``run.csv``)."""
    jsonl = Path(jsonl)
    return (
        jsonl.with_suffix(".csv")
        if jsonl.suffix.lower() != ".csv"
        else jsonl.with_name(jsonl.name + ".csv")
    )


def _make_sinks(cfg: RunConfig, source: Source, predictor: Predictor) -> list[Sink]:
    sinks: list[Sink] = []
    try:
        if cfg.jsonl is not None:
            sinks.append(JsonlSink(cfg.jsonl, append=cfg.append))
            sinks.append(CsvSink(csv_beside(cfg.jsonl), predictor.label_names, append=cfg.append))
        if cfg.capture is not None:
            sinks.append(CaptureSink(cfg.capture, cfg.capture_window))
        if cfg.save_video is not None:
            fps = cfg.fps or source.nominal_fps or (10.0 if not source.live else 25.0)
            sinks.append(VideoSink(cfg.save_video, fps=fps, lossy=source.live))
        if cfg.save_dir is not None:
            sinks.append(DirSink(cfg.save_dir, lossy=source.live))
        if cfg.report is not None:
            from fundus_edge.report.sink import ReportSink

            sinks.append(
                ReportSink(
                    cfg.report,
                    predictor,
                    model_path=str(cfg.model),
                    send=cfg.send,
                    anonymised=cfg.anonymise,
                    append=cfg.append,
                )
            )
        if not cfg.headless:
            ok, why = display_available()
            if ok:
                sinks.append(WindowSink(f"fundus-edge: {source.description}"))
            else:
                log.info("no window (%s); running headless", why)
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks


def run(
    cfg: RunConfig,
    *,
    predictor: Predictor | None = None,
    on_output: Callable[[Output], None] | None = None,
    handle_signals: bool = True,
) -> RunSummary:
    """Run a model over a source until it ends, is interrupted, or ``--capture`` is done.

    Args:
        cfg: the run's options.
        predictor: an already built predictor (default: one from ``cfg.model``).
        on_output: called with every processed frame's :class:`Output` (log thread).
        handle_signals: turn SIGINT/SIGTERM into a clean stop (main thread only).

    Returns:
        The :class:`RunSummary`; ``interrupted`` tells a signal stopped it.

    Raises:
        UserError: a bad source, model or option (one line).
    """
    _check_options(cfg)
    if predictor is None and not Path(cfg.model).is_file():
        raise UserError(f"{cfg.model}: no such model file")
    if cfg.report is not None and cfg.jsonl is None:
        # A report folder keeps the run's records too: results.jsonl and results.csv.
        import dataclasses

        cfg = dataclasses.replace(cfg, jsonl=Path(cfg.report) / "results.jsonl")
    anonymiser = None
    if cfg.anonymise:
        from fundus_edge.data.anonymise import Pseudonymiser

        anonymiser = Pseudonymiser()
    journal = None
    if cfg.watch is not None:
        from fundus_edge.runtime.watch import WatchFolderSource, journal_path

        if cfg.jsonl is None:
            raise UserError(
                "--watch keeps a journal of what it processed beside the results: "
                "give --jsonl FILE or --report DIR"
            )
        import dataclasses

        cfg = dataclasses.replace(cfg, append=True, source=str(cfg.watch))
        journal = journal_path(cfg.jsonl)
        # Outputs written inside the watched folder must not come back in as inputs.
        outputs = [p for p in (cfg.save_dir, cfg.report) if p is not None]
        source: Source = WatchFolderSource(
            cfg.watch, journal, settle_s=cfg.watch_settle, anonymiser=anonymiser, exclude=outputs
        )
    elif isinstance(cfg.source, Source):
        source = cfg.source
    else:
        source = open_source(
            cfg.source,
            width=cfg.width,
            height=cfg.height,
            fps=cfg.fps,
            loop=cfg.loop,
            reconnect=cfg.reconnect,
            anonymiser=anonymiser,
        )
    _check_readers(source)
    # The source first: a missing camera is reported in a second, before a model loads.
    source.open()
    own_predictor = predictor is None
    was_tracking = None if predictor is None else predictor.track_fov
    sinks: list[Sink] = []
    session = None
    try:
        _check_outputs(cfg)
        if cfg.serve is not None:
            # Bound now: a taken port is one line before the model loads.
            from fundus_edge.serve.sink import ServeSession

            session = ServeSession(
                cfg.serve,
                [],
                capture_dir=cfg.capture_dir or Path("captures"),
                token=cfg.token,
                cert=cfg.cert,
                key=cfg.key,
                max_viewers=cfg.max_viewers,
                capture_window=cfg.capture_window,
                fps=cfg.serve_fps,
            )
        if predictor is None:
            predictor = Predictor(
                cfg.model,
                backend=cfg.backend,
                precision=cfg.precision,
                provider=cfg.provider,
                device=cfg.device,
                cuda_graph=cfg.cuda_graph,
                gate=cfg.gate,
                threads=cfg.threads,
            )
        if cfg.streams > 1 and not predictor.backend.concurrent:
            log.info(
                "--streams %d: %d frames are prepared at once; the %s backend runs the model "
                "on one at a time",
                cfg.streams,
                cfg.streams,
                predictor.backend.name,
            )
        if cfg.map not in ("auto", "attention", "none") and cfg.map not in predictor.label_names:
            raise UserError(
                f"--map {cfg.map}: not a label of this model "
                f"(use auto, attention, none or one of {', '.join(predictor.label_names)})"
            )
        smoothing = cfg.smoothing
        if smoothing is None:
            smoothing = LIVE_SMOOTHING if source.live else 0.0
        if not 0.0 <= smoothing < 1.0:
            raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
        predictor.smoothing = smoothing
        # A video's frames share one field of view; stills and folders are fitted one by one.
        predictor.track_fov = cfg.track_fov and source.video
        predictor.reset()
        sinks = _make_sinks(cfg, source, predictor)
        if journal is not None:
            from fundus_edge.runtime.watch import JournalSink

            sinks.append(JournalSink(journal))  # after the JSONL and CSV: done once logged
        if session is not None:
            session.set_labels(predictor.label_names, cfg.map)
            sinks.extend(session.sinks())
        job = _Run(cfg, source, predictor, sinks, on_output)
        sinks = []  # the run closes them from here on
        if session is not None:
            job.feed = session.feed
            session.status_fn = job.status
            session.start()
        with _signals_stop(job, handle_signals):
            return job.execute()
    finally:
        if session is not None:
            session.stop()
        for s in sinks:
            s.close()
        source.close()
        if own_predictor and predictor is not None:
            predictor.close()
        elif predictor is not None and was_tracking is not None:
            predictor.track_fov = was_tracking  # the caller's predictor as it came


@contextlib.contextmanager
def _opencv_threads(n: int | None) -> Iterator[None]:
    """OpenCV's own thread pool set to ``n`` threads for a block, then as it was (None: left).

    ``run --streams N`` (N > 1) runs N prepare workers: they are the parallelism, and OpenCV
    splitting each worker's resizes and filters over its pool again only adds hand-offs and
    the pool's spin-waiting. On the 2-core VM (2026-12-02, the student at 1920x1080) threads
    ``run`` does not name (OpenCV's pool) took 0.75 ms of CPU a frame beside one prepare worker
    and 0.01 beside two with the pool at one thread, the workers' own time about the same
    (``bench/scenarios/pipelined-student.yaml``'s CPU notes). One worker keeps OpenCV's pool:
    there it is prepare's only parallelism (the model on a GPU leaves the other cores free).
    The setting is the process's: other threads using OpenCV during the run get one thread too.
    """
    if n is None:
        yield
        return
    import cv2

    was = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(was)


class _signals_stop:
    """SIGINT/SIGTERM -> a clean stop; a second SIGINT interrupts for real."""

    def __init__(self, job: _Run, enabled: bool) -> None:
        self.job = job
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.job.interrupted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.job.request_stop(f"interrupted ({signal.Signals(signum).name})", interrupted=True)

    def __enter__(self) -> _signals_stop:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
