"""The hub between the run's threads and the web server's event loop.

The pipeline's threads call :meth:`Hub.publish_frame` (draw thread) and
:meth:`Hub.publish_record` (log thread); both return at once, whatever the viewers do. Each
viewer owns a small bounded queue on the server's event loop: a new item pushed into a full
queue replaces the oldest, so a slow viewer sees fewer frames and never holds anything up; a
viewer whose queue stayed full for :data:`STALL_S` seconds (it stopped reading) is cut off.
The annotated frame is JPEG-encoded once per published frame, only while someone watches,
downscaled to :data:`STREAM_MAX_SIDE` and at most ``fps`` frames a second (``--serve-fps``,
default :data:`STREAM_FPS`): :meth:`Hub.frame_due` tells the draw thread whether the next frame
will be sent at all, so frames nobody will see are not even rendered. Records (the JSONL's,
one per processed frame) go to the event listeners at the same rate at most, newest first: a
record that arrives sooner than ``1/fps`` after the last one sent waits, and a newer one
replaces it, so the listeners always end on the run's latest record while a fast model's 30+
records a second cost the run one serialisation and one wake-up of the server per tenth of a
second, not one per frame per viewer (the JSONL and CSV sinks keep every record).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

__all__ = ["STALL_S", "STREAM_FPS", "STREAM_MAX_SIDE", "Hub", "Viewer"]

STREAM_MAX_SIDE = 1280  # px, the long side of streamed frames
STREAM_FPS = 10.0  # streamed frames a second, by default (an operator's preview)
STALL_S = 10.0  # a viewer that took nothing for this long is cut off
QUEUE = 2  # items per viewer


@dataclass
class Viewer:
    """One connected stream or event listener."""

    kind: str  # "stream" | "events"
    queue: asyncio.Queue
    since: float = field(default_factory=time.monotonic)
    last_take: float = field(default_factory=time.monotonic)
    dropped: int = 0
    closed: bool = False


class Hub:
    """Thread-safe fan-out of frames, records and status to web viewers (see module doc).

    Args:
        max_viewers: viewers at most: streams, and event listeners, each (more get HTTP 503).
        jpeg_quality: of the streamed frames.
    """

    def __init__(
        self, max_viewers: int = 8, jpeg_quality: int = 80, fps: float = STREAM_FPS
    ) -> None:
        self.max_viewers = max_viewers
        self.fps = fps
        self.jpeg_quality = jpeg_quality
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._viewers: list[Viewer] = []
        self.started = time.time()
        self.status: dict[str, Any] = {}
        self.last_record: dict[str, Any] | None = None
        self.last_jpeg: tuple[bytes, int, float] | None = None  # data, frame index, timestamp
        self.frames_encoded = 0
        self.viewer_drops = 0
        self.viewers_cut = 0
        self._last_sent = 0.0
        self._last_record_sent = 0.0
        self._pending_record: dict[str, Any] | None = None
        self._record_flush = False  # a flush of the pending record is scheduled
        self.records_sent = 0
        self.captures: list[dict[str, Any]] = []
        self.capture_requests: collections.deque[int] = collections.deque()
        self._next_capture = 1
        self.map: str | None = None  # set by POST /map; the draw thread reads it
        self.map_choices: list[str] = []

    # -- viewers (event loop) ---------------------------------------------------------------------

    def attach(self, kind: str) -> Viewer | None:
        """A new viewer, or None when :attr:`max_viewers` of its kind are connected (a browser
        tab opens one stream and one event listener)."""
        with self._lock:
            if sum(v.kind == kind for v in self._viewers) >= self.max_viewers:
                return None
            viewer = Viewer(kind, asyncio.Queue(maxsize=QUEUE))
            self._viewers.append(viewer)
            return viewer

    def detach(self, viewer: Viewer) -> None:
        with self._lock:
            if viewer in self._viewers:
                self._viewers.remove(viewer)
            viewer.closed = True

    @property
    def viewers(self) -> int:
        with self._lock:
            return len(self._viewers)

    def _watching(self, kind: str) -> list[Viewer]:
        with self._lock:
            return [v for v in self._viewers if v.kind == kind]

    # -- publishing (pipeline threads) -----------------------------------------------------------

    def frame_due(self) -> bool:
        """Whether a frame published now would be streamed (a viewer, and the rate allows)."""
        return bool(self._watching("stream")) and (
            time.monotonic() - self._last_sent >= 1.0 / self.fps
        )

    def publish_frame(self, rendered: np.ndarray, index: int, timestamp: float) -> None:
        """The draw thread's newest annotated frame (RGB). Encodes only while someone
        watches; never blocks."""
        viewers = self._watching("stream")
        now = time.monotonic()
        if not viewers or now - self._last_sent < 1.0 / self.fps or self.loop is None:
            return
        self._last_sent = now
        h, w = rendered.shape[:2]
        scale = min(1.0, STREAM_MAX_SIDE / max(h, w))
        img = rendered
        if scale < 1.0:
            img = cv2.resize(
                rendered, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
            )
        ok, buf = cv2.imencode(
            ".jpg",
            cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality],
        )
        if not ok:
            return
        item = (buf.tobytes(), int(index), float(timestamp))
        self.last_jpeg = item
        self.frames_encoded += 1
        self._push(viewers, item)

    def publish_record(self, record: dict[str, Any]) -> None:
        """The log thread's record of each processed frame; never blocks. Sent at most
        ``fps`` times a second, the newest (see module doc)."""
        self.last_record = record
        loop = self.loop
        if loop is None or not self._watching("events"):
            return
        now = time.monotonic()
        with self._lock:
            self._pending_record = record
            if self._record_flush:
                return  # the scheduled flush sends the newest
            wait = self._last_record_sent + 1.0 / self.fps - now
            if wait > 0:
                self._record_flush = True
            else:
                self._last_record_sent = now
                self._pending_record = None
        if wait > 0:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                loop.call_soon_threadsafe(loop.call_later, wait, self._flush_record)
            return
        self.records_sent += 1
        self._push(self._watching("events"), ("record", json.dumps(record, allow_nan=False)))

    def _flush_record(self) -> None:
        """On the event loop: send the newest record that waited for its turn."""
        with self._lock:
            record, self._pending_record = self._pending_record, None
            self._record_flush = False
            self._last_record_sent = time.monotonic()
        if record is not None:
            self.records_sent += 1
            self._deliver(self._watching("events"), ("record", json.dumps(record, allow_nan=False)))

    def publish_event(self, name: str, data: Any) -> None:
        """Another server-sent event (``status``, ``captures``) to every event listener."""
        viewers = self._watching("events")
        if viewers and self.loop is not None:
            self._push(viewers, (name, json.dumps(data, allow_nan=False)))

    def _push(self, viewers: list[Viewer], item: Any) -> None:
        loop = self.loop
        if loop is None:
            return
        # RuntimeError: the loop closed (the server is stopping).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._deliver, viewers, item)

    def _deliver(self, viewers: list[Viewer], item: Any) -> None:
        """On the event loop: newest item in, oldest out when a queue is full."""
        now = time.monotonic()
        for v in viewers:
            if v.closed:
                continue
            q = v.queue
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                v.dropped += 1
                self.viewer_drops += 1
                if now - v.last_take > STALL_S:
                    v.closed = True  # its handler sees it at its next wake-up
                    self.viewers_cut += 1
                    q.put_nowait(None)
                    continue
            q.put_nowait(item)

    # -- captures ---------------------------------------------------------------------------------

    def request_capture(self) -> int:
        with self._lock:
            n = self._next_capture
            self._next_capture += 1
            self.capture_requests.append(n)
            return n

    def add_capture(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.captures.append(entry)
            listing = list(self.captures)
        self.publish_event("captures", listing)
