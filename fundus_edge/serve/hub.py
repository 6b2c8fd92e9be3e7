"""The hub of the server process: what it knows of the run, and the fan-out to the viewers.

It lives on the server process's event loop (see :mod:`~fundus_edge.serve.worker`); the run
feeds it through a pipe (:mod:`~fundus_edge.serve.feed`). Each message becomes bytes once,
whatever the number of viewers: a JPEG frame becomes one prebuilt multipart part (boundary,
headers, JPEG), a record or an event one server-sent event, and every viewer gets that same
object, written in one send.

Each viewer owns a small bounded queue: a new item pushed into a full queue replaces the
oldest, so a slow viewer sees fewer frames and never holds anything up; a viewer whose queue
stayed full for :data:`STALL_S` seconds (it stopped reading) is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BOUNDARY", "QUEUE", "STALL_S", "Hub", "Viewer", "event_bytes", "part_bytes"]

STALL_S = 10.0  # a viewer that took nothing for this long is cut off
QUEUE = 2  # items per viewer
BOUNDARY = "frame"  # of the multipart stream
STATUS_WAIT_S = 0.5  # GET /status waits this long at most for the run's fresh status
DROPS_EVERY_S = 1.0  # viewers' drops reported to the run this often at most


def part_bytes(data: bytes, index: int, timestamp: float) -> bytes:
    """One part of the MJPEG stream: boundary, headers (frame index, capture time), JPEG."""
    head = (
        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n"
        f"X-Frame-Index: {index}\r\nX-Timestamp: {timestamp:.6f}\r\n\r\n"
    ).encode()
    return b"".join((head, data, b"\r\n"))


def event_bytes(name: str, data: Any) -> bytes:
    """One server-sent event; ``data`` as JSON (NaN refused: the page's JSON.parse would be)."""
    return f"event: {name}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode()


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
    """The server process's view of the run and its viewers (see module doc). Every method
    runs on the event loop, except :meth:`attach`/:meth:`detach`'s bookkeeping, which a lock
    guards.

    Args:
        max_viewers: viewers at most: streams, and event listeners, each (more get HTTP 503).
        map_choices: what ``POST /map`` accepts.
        initial_map: the ``--map`` the run starts with.
        tell: sends a message to the run (a capture request, a map choice, the viewer counts,
            a request for a fresh status); never blocks for long (the run reads it at once).
    """

    def __init__(
        self,
        max_viewers: int = 8,
        map_choices: list[str] | None = None,
        initial_map: str | None = None,
        tell: Callable[[tuple], None] | None = None,
    ) -> None:
        self.max_viewers = max_viewers
        self.map_choices = list(map_choices or [])
        self.map = initial_map
        self._tell = tell or (lambda msg: None)
        self._lock = threading.Lock()
        self._viewers: list[Viewer] = []
        self.status: dict[str, Any] = {}
        self.last_part: bytes | None = None  # the newest stream part
        self.last_record: bytes | None = None  # the newest record event
        self.captures: list[dict[str, Any]] = []
        self._next_capture = 1
        self.viewer_drops = 0
        self._drops_told = 0.0
        self.viewers_cut = 0
        self.parts_sent = 0
        self._status_waiters: list[asyncio.Future] = []

    # -- viewers ----------------------------------------------------------------------------------

    def attach(self, kind: str) -> Viewer | None:
        """A new viewer, or None when :attr:`max_viewers` of its kind are connected (a browser
        tab opens one stream and one event listener)."""
        with self._lock:
            if sum(v.kind == kind for v in self._viewers) >= self.max_viewers:
                return None
            viewer = Viewer(kind, asyncio.Queue(maxsize=QUEUE))
            self._viewers.append(viewer)
        self._tell_viewers()
        return viewer

    def detach(self, viewer: Viewer) -> None:
        with self._lock:
            if viewer in self._viewers:
                self._viewers.remove(viewer)
            viewer.closed = True
        self._tell_viewers()

    @property
    def viewers(self) -> int:
        with self._lock:
            return len(self._viewers)

    def _watching(self, kind: str) -> list[Viewer]:
        with self._lock:
            return [v for v in self._viewers if v.kind == kind]

    def close_all(self) -> None:
        """The run stops: every viewer's handler is woken and ends its response."""
        for v in self._watching("stream") + self._watching("events"):
            v.closed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                v.queue.get_nowait()
            v.queue.put_nowait(None)

    def _tell_viewers(self) -> None:
        """The run streams frames and records only while someone watches: it learns who does."""
        with self._lock:
            streams = sum(v.kind == "stream" for v in self._viewers)
            events = len(self._viewers) - streams
        self._tell(("viewers", streams, events, self.viewer_drops, self.viewers_cut))

    def deliver(self, kind: str, item: bytes) -> None:
        """Newest item in, oldest out when a queue is full; a viewer that took nothing for
        :data:`STALL_S` is closed and woken with None."""
        now = time.monotonic()
        dropped = self.viewer_drops
        for v in self._watching(kind):
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
        if self.viewer_drops != dropped and now - self._drops_told >= DROPS_EVERY_S:
            self._drops_told = now
            self._tell_viewers()  # the run's status counts them

    # -- what the run sends -----------------------------------------------------------------------

    def on_message(self, msg: tuple) -> None:
        """One message of the run (see :mod:`~fundus_edge.serve.feed` for the list)."""
        kind = msg[0]
        if kind == "frame":
            _, data, index, timestamp = msg
            self.last_part = part_bytes(data, index, timestamp)
            self.parts_sent += 1
            self.deliver("stream", self.last_part)
        elif kind == "record":
            try:
                self.last_record = event_bytes("record", msg[1])
            except ValueError:  # NaN: nothing the page could parse
                return
            self.deliver("events", self.last_record)
        elif kind == "status":
            self.status = msg[1]
            waiters, self._status_waiters = self._status_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        elif kind == "captures":
            self.captures = list(msg[1])
            self.deliver("events", event_bytes("captures", self.captures))

    # -- what the viewers ask ---------------------------------------------------------------------

    def status_now(self) -> dict[str, Any]:
        """The run's last status, with what only this process knows first-hand."""
        status = dict(self.status)
        status["viewers"] = self.viewers
        status["max_viewers"] = self.max_viewers
        if self.map is not None:
            status["map"] = self.map
        status["maps"] = list(self.map_choices)
        status["captures"] = len(self.captures)
        return status

    async def fresh_status(self) -> dict[str, Any]:
        """The run's status as of now: asks for it and waits up to :data:`STATUS_WAIT_S`
        (the last one otherwise; the run sends one every second anyway)."""
        fut = asyncio.get_running_loop().create_future()
        self._status_waiters.append(fut)
        self._tell(("status?",))
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(fut, STATUS_WAIT_S)
        return self.status_now()

    def request_capture(self) -> int:
        n = self._next_capture
        self._next_capture += 1
        self._tell(("capture", n))
        return n

    def set_map(self, choice: str) -> str:
        if choice not in self.map_choices:
            raise ValueError(f"unknown map {choice!r} (one of {', '.join(self.map_choices)})")
        self.map = choice
        self._tell(("map", choice))
        return choice
