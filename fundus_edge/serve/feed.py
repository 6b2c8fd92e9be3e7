"""The run's side of the live view: what the pipeline hands to the server process.

The web server runs in a process of its own (:mod:`~fundus_edge.serve.worker`), so that its
Python never takes the run's GIL: inference never waits for the network. :class:`Feed` is all
the run holds of it. The pipeline's threads call :meth:`Feed.publish_frame` (draw thread) and
:meth:`Feed.publish_record` (log thread); both return at once, whatever the viewers do: they
only put the newest item in a one-item mailbox (a newer one replaces it: dropped when the
server is behind). One sender thread writes the mailbox to the server process's socket; its
writes release the GIL while the kernel copies, and nothing else waits on them.

The annotated frame is JPEG-encoded here, once per streamed frame, only while someone
watches, downscaled to :data:`STREAM_MAX_SIDE` and at most ``fps`` frames a second
(``--serve-fps``, default :data:`STREAM_FPS`): :meth:`Feed.frame_due` tells the draw thread
whether the next frame will be sent at all, so frames nobody will see are not even rendered.
Records (the JSONL's, one per processed frame) go at the same rate at most, the newest (once a
second while nobody listens, so that a new listener starts on a recent one; the run's last
one when it stops): a fast model's 30+ records a second cost the run one hand-over per tenth
of a second, not one per frame per viewer (the JSONL and CSV sinks keep every record). The
run's status goes over every second, and whenever ``GET /status`` asks for it.

Messages, run to server (pickled tuples on one socket pair): ``("frame", jpeg, index,
timestamp)``, ``("record", record)``, ``("status", status)``, ``("captures", listing)``,
``("stop",)``. Server to run: ``("started", port)`` or ``("error", text)`` first, then
``("viewers", streams, listeners, drops, cut)``, ``("capture", n)``, ``("map", choice)``,
``("status?",)``. The receiver thread applies them: a capture request lands in
:attr:`Feed.capture_requests`, which the log sink serves, a map choice in :attr:`Feed.map`,
which the draw thread reads.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from fundus_edge.log import get_logger

__all__ = ["STREAM_FPS", "STREAM_MAX_SIDE", "Feed"]

log = get_logger("serve")

STREAM_MAX_SIDE = 1280  # px, the long side of streamed frames
STREAM_FPS = 10.0  # streamed frames a second, by default (an operator's preview)
STATUS_EVERY_S = 1.0  # the run's status to the server, this often
IDLE_RECORD_EVERY_S = 1.0  # the newest record while nobody listens, this often


class Feed:
    """The live view as the run sees it (see module doc): publishers that never block, and
    what the server process reports (viewers, drops, captures asked for, the map chosen).

    Args:
        max_viewers: viewers at most (streams, and event listeners, each).
        jpeg_quality: of the streamed frames.
        fps: streamed frames (and records) a second at most.
    """

    def __init__(
        self, max_viewers: int = 8, jpeg_quality: int = 80, fps: float = STREAM_FPS
    ) -> None:
        self.max_viewers = max_viewers
        self.jpeg_quality = jpeg_quality
        self.fps = fps
        self.map: str | None = None  # the page's choice; the draw thread reads it
        self.map_choices: list[str] = []
        self.captures: list[dict[str, Any]] = []
        self.capture_requests: collections.deque[int] = collections.deque()
        self.status_fn: Callable[[], dict[str, Any]] = dict
        # What the server process reports.
        self.stream_viewers = 0
        self.event_viewers = 0
        self.server_drops = 0
        self.viewers_cut = 0
        # Here.
        self.frames_encoded = 0
        self.frames_dropped = 0  # encoded, then replaced by a newer one before it was sent
        self.frames_sent = 0
        self.records_sent = 0
        self._last_frame = 0.0
        self._last_record = 0.0  # when the sender last sent one
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._frame: tuple[bytes, int, float] | None = None
        self._record: dict[str, Any] | None = None
        self._outbox: collections.deque[tuple] = collections.deque()
        self._conn: Any = None
        self._threads: list[threading.Thread] = []
        self._closing = False

    # -- what the pipeline reads ------------------------------------------------------------------

    @property
    def viewers(self) -> int:
        return self.stream_viewers + self.event_viewers

    @property
    def viewer_drops(self) -> int:
        """Frames and records a viewer missed: replaced here, or in a viewer's queue."""
        return self.frames_dropped + self.server_drops

    # -- publishing (pipeline threads) ------------------------------------------------------------

    def frame_due(self) -> bool:
        """Whether a frame published now would be streamed (a viewer, and the rate allows)."""
        return self.stream_viewers > 0 and time.monotonic() - self._last_frame >= 1.0 / self.fps

    def publish_frame(self, rendered: np.ndarray, index: int, timestamp: float) -> None:
        """The draw thread's newest annotated frame (RGB): encoded once if due; never blocks."""
        now = time.monotonic()
        if self.stream_viewers <= 0 or now - self._last_frame < 1.0 / self.fps:
            return
        self._last_frame = now
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
        self.frames_encoded += 1
        with self._lock:
            if self._frame is not None:
                self.frames_dropped += 1
            self._frame = (buf.tobytes(), int(index), float(timestamp))
        self._wake.set()

    def publish_record(self, record: dict[str, Any]) -> None:
        """The log thread's record of each processed frame; never blocks (the sender thread
        takes the newest when its turn comes)."""
        self._record = record
        if self.event_viewers > 0:
            self._wake.set()  # the sender sends it now, or times the newest for its turn

    def add_capture(self, entry: dict[str, Any]) -> None:
        """A capture the log sink saved: listed on the page."""
        with self._lock:
            self.captures.append(entry)
            self._outbox.append(("captures", list(self.captures)))
        self._wake.set()

    # -- the pipe ---------------------------------------------------------------------------------

    def connect(self, conn: Any, early: list[tuple] | None = None) -> None:
        """Start the sender and receiver threads on ``conn`` (a duplex
        :class:`multiprocessing.connection.Connection` to the server process, started);
        ``early``: what the server said before it said it had started (a viewer can connect
        at once)."""
        for msg in early or []:
            self._apply(msg)
        self._conn = conn
        self._threads = [
            threading.Thread(target=self._send_loop, name="fe-serve-send", daemon=True),
            threading.Thread(target=self._receive_loop, name="fe-serve-recv", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        """Stop the sender (it sends ``("stop",)`` last); the receiver ends with the pipe."""
        self._closing = True
        self._wake.set()
        for t in self._threads[:1]:
            t.join(5.0)

    def _send(self, msg: tuple) -> bool:
        try:
            self._conn.send(msg)
            return True
        except (OSError, ValueError):  # the server process is gone (its error is logged)
            return False

    def _send_loop(self) -> None:
        next_status = 0.0
        sent_record: dict[str, Any] | None = None
        while True:
            now = time.monotonic()
            timeout = max(0.0, next_status - now)
            if self._record is not sent_record:
                every = 1.0 / self.fps if self.event_viewers > 0 else IDLE_RECORD_EVERY_S
                timeout = min(timeout, max(0.0, self._last_record + every - now))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._closing:  # the run's last record and status, then stop
                if self._record is not sent_record:
                    self._send(("record", self._record))
                self._send(("status", self._status()))
                self._send(("stop",))
                return
            with self._lock:
                frame, self._frame = self._frame, None
                outbox = list(self._outbox)
                self._outbox.clear()
            ok = True
            if frame is not None:
                self.frames_sent += 1  # taken from the mailbox: not dropped
                ok = self._send(("frame", *frame))
            for msg in outbox:
                ok = ok and self._send(msg)
            now = time.monotonic()
            record = self._record
            every = 1.0 / self.fps if self.event_viewers > 0 else IDLE_RECORD_EVERY_S
            if record is not sent_record and now - self._last_record >= every:
                sent_record, self._last_record = record, now
                ok = ok and self._send(("record", record))
                self.records_sent += 1
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                ok = ok and self._send(("status", self._status()))
            if not ok:
                return

    def _status(self) -> dict[str, Any]:
        try:
            return self.status_fn()
        except Exception as exc:  # a status must never end the live view
            log.debug("serve: status: %s", exc)
            return {}

    def _receive_loop(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                if not self._closing:
                    log.warning("serve: the web server process ended; the run goes on without it")
                self.stream_viewers = self.event_viewers = 0  # nothing more to render for it
                return
            self._apply(msg)

    def _apply(self, msg: tuple) -> None:
        """One message of the server process (see module doc)."""
        kind = msg[0]
        if kind == "viewers":
            _, self.stream_viewers, self.event_viewers, self.server_drops, self.viewers_cut = msg
            self._wake.set()  # a new listener gets the newest record at once
        elif kind == "capture":
            self.capture_requests.append(int(msg[1]))
        elif kind == "map":
            self.map = str(msg[1])
        elif kind == "status?":
            with self._lock:
                self._outbox.append(("status", self._status()))
            self._wake.set()
