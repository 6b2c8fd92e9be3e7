"""``run --serve``: the session (feed + server process) and the two sinks that feed it.

:class:`ServeSink` is a lossy visual sink: the draw thread hands it each annotated frame, and
it asks for frames only while a stream viewer is connected (no viewer, no rendering for it).
:class:`ServeLogSink` is a log sink: every record goes to the event listeners, and the page's
**Capture** requests are served from here, as ``--capture`` does: the best of the next
``--capture-window`` frames once the quality gate passes, saved as ``capture_NNNN.png`` and
its record as ``capture_NNNN.png.json`` in ``--capture-dir``.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError
from fundus_edge.fileio import ensure_writable_dir
from fundus_edge.log import get_logger
from fundus_edge.runtime.sinks import CaptureSink, Output, Sink
from fundus_edge.serve.feed import Feed

__all__ = ["TOKEN_ENV", "ServeLogSink", "ServeSession", "ServeSink"]

log = get_logger("serve")
TOKEN_ENV = "FUNDUS_EDGE_TOKEN"


class ServeSink(Sink):
    """The annotated frames, to the stream viewers (lossy: a slow network never holds the
    run)."""

    visual = True
    lossy = True
    is_file = False

    def __init__(self, feed: Feed) -> None:
        self.feed = feed

    @property
    def wants_frame(self) -> bool:
        return self.feed.frame_due()

    def write(self, out: Output) -> None:
        if out.rendered is not None:
            self.feed.publish_frame(out.rendered, out.frame.index, out.frame.timestamp)

    def describe(self) -> str:
        return f"live view ({self.feed.frames_encoded} frames streamed)"

    @property
    def written(self) -> bool:
        return False  # nothing on disk: not listed among the outputs


class ServeLogSink(Sink):
    """Records to the event listeners; the page's captures."""

    def __init__(self, feed: Feed, folder: Path, window: int) -> None:
        self.feed = feed
        self.folder = Path(folder)
        self.window = window
        self._active: tuple[int, CaptureSink] | None = None
        self.saved = 0

    def write(self, out: Output) -> None:
        self.feed.publish_record(out.record)
        if self._active is None and self.feed.capture_requests:
            n = self.feed.capture_requests.popleft()
            self._active = (n, CaptureSink(self.folder / f"capture_{n:04d}.png", self.window))
        if self._active is not None:
            n, sink = self._active
            sink.write(out)
            if sink.saved:
                self._done(n, sink)

    def _done(self, n: int, sink: CaptureSink) -> None:
        assert sink.best is not None
        rec = sink.best.record
        probs = rec.get("probabilities") or {}
        self.feed.add_capture(
            {
                "id": n,
                "name": sink.path.name,
                "url": f"captures/{sink.path.name}",
                "time": datetime.fromtimestamp(rec.get("timestamp", time.time()))
                .astimezone()
                .isoformat(timespec="seconds"),
                "frame": rec.get("frame"),
                "quality": {
                    "score": (rec.get("quality") or {}).get("score"),
                    "reason": (rec.get("quality") or {}).get("reason"),
                },
                "findings": [
                    {"label": k, "p": probs[k]} for k in rec.get("positive") or [] if k in probs
                ],
                "positive": list(rec.get("positive") or []),
            }
        )
        log.info("serve: capture %d saved as %s", n, sink.path)
        self.saved += 1
        self._active = None

    def close(self) -> None:
        if self._active is not None:
            n, sink = self._active
            sink.close()  # the source ended inside the window: the best so far
            if sink.saved:
                self._done(n, sink)
            self._active = None

    @property
    def written(self) -> bool:
        return self.saved > 0

    def describe(self) -> str:
        if not self.saved:
            return "no capture from the live view"
        return f"{self.folder} ({self.saved} capture(s) from the live view)"


class ServeSession:
    """Everything ``--serve`` adds to a run: the feed, the server process, the two sinks.

    Args:
        address: ``[HOST:]PORT``.
        labels: the model's labels (the map choices).
        capture_dir: where the page's captures go.
        token: required on every endpoint; generated (and printed once) when the address is
            not loopback and none is given (nor ``$FUNDUS_EDGE_TOKEN``).
        cert, key: HTTPS.
        max_viewers: viewers at most (streams, and event listeners, each).
        fps: streamed frames a second at most (only those are rendered for the stream).
        capture_window: frames watched for the best one after the gate passes.
    """

    def __init__(
        self,
        address: str,
        labels: list[str],
        *,
        capture_dir: Path,
        token: str | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        max_viewers: int = 8,
        capture_window: int = 10,
        fps: float = 10.0,
    ) -> None:
        from fundus_edge.serve.server import Server, is_loopback, new_token, parse_address

        addr = parse_address(address)
        if max_viewers < 1:
            raise UserError(f"--max-viewers must be >= 1, got {max_viewers}")
        if not 0 < fps <= 60:
            raise UserError(f"--serve-fps must be in (0, 60], got {fps:g}")
        token = token or os.environ.get(TOKEN_ENV) or None
        self.generated = False
        if token is None and not is_loopback(addr.host):
            token, self.generated = new_token(), True
        if token is not None and len(token) < 8:
            raise UserError("--token: use at least 8 characters")
        self.token = token
        self.capture_dir = ensure_writable_dir(capture_dir, "--capture-dir")
        self.feed = Feed(max_viewers=max_viewers, fps=fps)
        self.feed.map_choices = _map_choices(labels)
        self.capture_window = capture_window
        self.server = Server(
            addr, self.feed, capture_dir=self.capture_dir, token=token, cert=cert, key=key
        )

    @property
    def status_fn(self) -> Any:
        return self.feed.status_fn

    @status_fn.setter
    def status_fn(self, fn: Any) -> None:
        """The run's status (sent to the server every second and on each ``GET /status``)."""
        self.feed.status_fn = fn

    def set_labels(self, labels: list[str], initial: str) -> None:
        """The model's labels (known once it loaded) and the --map it starts with."""
        self.feed.map_choices = _map_choices(labels)
        self.feed.map = initial

    def sinks(self) -> list[Sink]:
        return [
            ServeSink(self.feed),
            ServeLogSink(self.feed, self.capture_dir, self.capture_window),
        ]

    def start(self) -> None:
        self.server.start()
        url = self.server.url
        if self.token is not None and self.generated:
            # Printed once, to the terminal only (never to a log file or a record).
            sys.stderr.write(f"fundus-edge: live view at {url}?token={self.token}\n")
        else:
            sys.stderr.write(f"fundus-edge: live view at {url}\n")
        sys.stderr.flush()

    def stop(self) -> None:
        self.server.stop()


def _map_choices(labels: list[str]) -> list[str]:
    """What the page's map menu offers: ``auto``, ``attention``, ``none``, then each label."""
    return ["auto", "attention", "none", *labels]
