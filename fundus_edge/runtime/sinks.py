"""Where results go: a window, a video file, a folder of images, a JSONL log and its CSV
table, a captured still.

Every sink takes :class:`Output` items in frame order and is closed exactly once, also
after SIGINT/SIGTERM, so a JSONL log ends on a complete line and a video has its index.
"""

from __future__ import annotations

import json
import os
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    ensure_writable_dir,
    ensure_writable_file,
)
from fundus_edge.media import STILL_WRITE_SUFFIXES, VIDEO_CODECS
from fundus_edge.runtime.predictor import Prediction
from fundus_edge.runtime.sources import Frame

__all__ = [
    "CSV_FIXED_COLUMNS",
    "CaptureSink",
    "CsvSink",
    "DirSink",
    "JsonlSink",
    "Output",
    "Sink",
    "VideoSink",
    "WindowSink",
    "display_available",
]


@dataclass
class Output:
    """One processed frame on its way to the sinks."""

    frame: Frame
    prediction: Prediction
    record: dict[str, Any]  # the JSONL record
    rendered: np.ndarray | None = None  # (H, W, 3) uint8 RGB, for visual sinks


class Sink(ABC):
    """A consumer of :class:`Output` items.

    Attributes:
        visual: needs :attr:`Output.rendered`.
        lossy: may skip frames when it falls behind a live source (a window, a preview
            video); a lossless sink (the log) gets every frame.
        done: the sink has what it wanted (``--capture``); the run can stop.
    """

    visual: bool = False
    lossy: bool = False
    done: bool = False

    #: writes a file or folder (listed in the run's summary); False for a window, a live view
    is_file: bool = True

    @property
    def wants_frame(self) -> bool:
        """A visual sink that shows nothing now (a live view nobody watches) says False: the
        frame is then not rendered for it."""
        return True

    @property
    def written(self) -> bool:
        """Its file or folder exists now; :meth:`describe` then names what was written
        (otherwise it says what was not, and why)."""
        return True

    @abstractmethod
    def write(self, out: Output) -> None: ...

    def close(self) -> None:  # noqa: B027  (stateless sinks)
        """Flush and close. Safe to call twice."""

    def describe(self) -> str:
        return type(self).__name__


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


class JsonlSink(Sink):
    """One JSON object per line, flushed per line.

    Written in place rather than through a temporary file: a live log must be readable
    (``tail -f``) while the run goes on, and a line is only written whole.
    """

    def __init__(
        self, path: str | os.PathLike, append: bool = False, option: str = "--jsonl"
    ) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append:
                end_on_newline(self.path)
            mode = "a" if append else "w"
            self._fh: TextIO | None = open(self.path, mode, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UserError(f"{option} {self.path}: cannot write ({exc.strerror or exc})") from None
        self.lines = 0

    def write(self, out: Output) -> None:
        assert self._fh is not None
        self._fh.write(json.dumps(out.record, allow_nan=False) + "\n")
        self._fh.flush()
        self.lines += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def describe(self) -> str:
        return f"{self.path} ({self.lines} records)"


def end_on_newline(path: Path) -> None:
    """A log or journal cut mid-line by a power loss: drop the partial line before appending."""
    try:
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


#: The CSV's first columns; one ``p_<label>`` column per label follows, then ``positive``.
CSV_FIXED_COLUMNS = (
    "source",
    "frame",
    "patient",
    "study",
    "eye",
    "acquired",
    "quality",
    "quality_reason",
    "quality_score",
    "inferred",
    "screening",
)


class CsvSink(Sink):
    """The JSONL's table twin: one row per processed image or frame, flushed per row.

    Columns: :data:`CSV_FIXED_COLUMNS`, then ``p_<label>`` for each of the model's labels
    (empty when the quality gate stopped the frame), then ``positive`` (labels over threshold,
    ``;``-separated). ``source`` is the image's path relative to the source root (``#N`` for
    frame N of a multi-frame DICOM object), else the frame's source; ``patient``/``study``
    are the DICOM PatientID and StudyInstanceUID (pseudonyms under ``--anonymise``); ``eye``
    is ``R``, ``L`` or empty. Appending (watch mode) keeps the header of the existing file,
    which must have the same columns.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        labels: list[str],
        append: bool = False,
        option: str = "--jsonl",
    ) -> None:
        import csv

        self.path = Path(path)
        self.labels = list(labels)
        self.columns = [*CSV_FIXED_COLUMNS, *(f"p_{n}" for n in self.labels), "positive"]
        self.rows = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = None
            if append and self.path.is_file() and self.path.stat().st_size:
                end_on_newline(self.path)
                with open(self.path, encoding="utf-8", newline="") as fh:
                    header = next(csv.reader(fh), None)
                if header != self.columns:
                    raise UserError(
                        f"{option} {self.path}: its columns are another model's; "
                        "give another output folder"
                    )
            self._fh: TextIO | None = open(  # noqa: SIM115
                self.path, "a" if header else "w", encoding="utf-8", newline=""
            )
        except OSError as exc:
            raise UserError(f"{option} {self.path}: cannot write ({exc.strerror or exc})") from None
        self._writer = csv.writer(self._fh, lineterminator="\n")
        if header is None:
            self._writer.writerow(self.columns)
            self._fh.flush()

    def write(self, out: Output) -> None:
        assert self._fh is not None
        r = out.record
        dicom = r.get("dicom") or {}
        q = r.get("quality") or {}
        probs = r.get("probabilities")
        screening = r.get("screening")
        row = [
            r.get("rel") or r.get("image") or r.get("source"),
            r.get("frame"),
            dicom.get("patient_id") or "",
            dicom.get("study_uid") or "",
            r.get("eye") or "",
            dicom.get("acquired") or "",
            "pass" if q.get("passed") else "fail",
            q.get("reason") or "",
            q.get("score", ""),
            int(bool(r.get("inferred"))),
            "" if screening is None else int(bool(screening)),
            *("" if probs is None else probs.get(n, "") for n in self.labels),
            ";".join(r.get("positive") or []),
        ]
        self._writer.writerow(row)
        self._fh.flush()
        self.rows += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def describe(self) -> str:
        return f"{self.path} ({self.rows} rows)"


_FOURCC = VIDEO_CODECS


class VideoSink(Sink):
    """The rendered frames as a video. Written to a hidden partial file, renamed on close."""

    visual = True

    def __init__(self, path: str | os.PathLike, fps: float = 25.0, lossy: bool = False) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in _FOURCC:
            raise UserError(
                f"--save-video {self.path}: unknown video type '{suffix}' "
                f"(use one of {', '.join(_FOURCC)})"
            )
        self.fps = fps if fps and fps > 0 else 25.0
        self.lossy = lossy
        self._partial = self.path.with_name(f".{self.path.stem}.partial{suffix}")
        self._writer: Any = None
        self._size: tuple[int, int] | None = None
        self.frames = 0
        # Permissions now, not at the first frame: OpenCV only says it "cannot write".
        ensure_writable_file(self.path, "--save-video")

    def write(self, out: Output) -> None:
        img = out.rendered if out.rendered is not None else out.frame.image
        h, w = img.shape[:2]
        if self._writer is None:
            # Codecs want even sizes; the first frame fixes the video's size.
            self._size = (w - w % 2, h - h % 2)
            fourcc = cv2.VideoWriter_fourcc(*_FOURCC[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self._partial), fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise UserError(
                    f"--save-video {self.path}: OpenCV cannot write this video type here"
                )
        if (w, h) != self._size:
            img = cv2.resize(img, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(_bgr(img))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            os.replace(self._partial, self.path)

    @property
    def written(self) -> bool:
        return self.frames > 0

    def describe(self) -> str:
        if not self.frames:
            return f"no frames; {self.path} not written"
        return f"{self.path} ({self.frames} frames)"


class DirSink(Sink):
    """Each rendered frame as an image, for image sources named after the file's path relative
    to the source's root (``a/1.png`` -> ``a/1.png``, ``a/1.jpg`` -> ``a/1.jpg.png``: two files
    never share an output), else ``frame_000123.jpg``. A name written twice in one run (the
    same file read again with ``--loop``) is overwritten, never another file's."""

    visual = True

    def __init__(self, folder: str | os.PathLike, lossy: bool = False) -> None:
        self.folder = Path(folder)
        self.lossy = lossy
        self.files = 0
        self._written: set[Path] = set()
        ensure_writable_dir(self.folder, "--save-dir")

    def _target(self, out: Output) -> Path:
        frame = out.frame
        if frame.path is None:
            return self.folder / f"frame_{frame.index:06d}.jpg"
        name = frame.rel or Path(frame.path).name
        base, _, n = name.partition("#")  # frame N of a multi-frame DICOM object
        rel = Path(f"{base}.frame{int(n):03d}" if n else base)
        if rel.suffix.lower() != ".png":
            rel = rel.with_name(rel.name + ".png")  # 1.jpg -> 1.jpg.png: beside 1.png, not over it
        return self.folder / rel

    def write(self, out: Output) -> None:
        img = out.rendered if out.rendered is not None else out.frame.image
        target = self._target(out)
        ok, data = cv2.imencode(target.suffix, _bgr(img))
        if not ok:
            raise UserError(f"--save-dir {target}: OpenCV cannot encode the image")
        atomic_write_bytes(target, data.tobytes())
        self._written.add(target)
        self.files = len(self._written)  # files kept, not writes: a looped file counts once

    def describe(self) -> str:
        return f"{self.folder} ({self.files} images)"


def display_available() -> tuple[bool, str]:
    """Can a window open here? ``(yes, why not)``."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return False, "no DISPLAY or WAYLAND_DISPLAY"
    m = re.search(r"GUI:\s*(\S+)", cv2.getBuildInformation())
    if m and m.group(1).upper() == "NONE":
        return False, "this OpenCV has no GUI support (opencv-python-headless)"
    return True, ""


class WindowSink(Sink):
    """A window showing the rendered frames; ``q`` or Esc asks the run to stop."""

    visual = True
    lossy = True

    def __init__(self, title: str = "fundus-edge") -> None:
        self.title = title
        self._open = False

    def write(self, out: Output) -> None:
        img = out.rendered if out.rendered is not None else out.frame.image
        if not self._open:
            cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
            self._open = True
        cv2.imshow(self.title, _bgr(img))
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            self.done = True

    def close(self) -> None:
        if self._open:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
            self._open = False

    def describe(self) -> str:
        return "window"


class CaptureSink(Sink):
    """Save the best frame once the quality gate passes, as an operator's shutter would.

    After the first frame that passes the gate, ``window`` more frames are watched and the
    one with the highest quality score is kept: the original full frame as ``path`` (an
    image) and its record as ``<path>.json``. Then :attr:`done` is set.
    """

    def __init__(self, path: str | os.PathLike, window: int = 10) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in STILL_WRITE_SUFFIXES:
            raise UserError(f"--capture {self.path}: give an image file name (.png, .jpg, .tif)")
        # The still (and its .json) is written at the end of a watch that can take hours:
        # prove the folder is writable now.
        ensure_writable_file(self.path, "--capture")
        self.window = max(0, window)
        self.best: Output | None = None
        self.best_score = -1.0  # of any frame, to explain a run that never passed
        self.best_reason = ""
        self._left: int | None = None
        self.saved = False

    def write(self, out: Output) -> None:
        q = out.prediction.quality
        if q.score > self.best_score and not q.passed:
            self.best_score, self.best_reason = q.score, q.reason
        if self.done:
            return
        if q.passed and (self.best is None or q.score > self.best.prediction.quality.score):
            self.best = out
        if self.best is not None:
            self._left = self.window if self._left is None else self._left - 1
            if self._left <= 0:
                self._save()

    def _save(self) -> None:
        assert self.best is not None
        ok, data = cv2.imencode(self.path.suffix, _bgr(self.best.frame.image))
        if not ok:
            raise UserError(f"--capture {self.path}: OpenCV cannot encode the image")
        atomic_write_bytes(self.path, data.tobytes())
        atomic_write_json(self.path.with_name(self.path.name + ".json"), self.best.record)
        self.saved = True
        self.done = True

    def close(self) -> None:
        # The source ended inside the watch window: the best so far is still the best.
        if self.best is not None and not self.saved:
            self._save()

    @property
    def written(self) -> bool:
        return self.saved

    def describe(self) -> str:
        if self.saved and self.best is not None:
            return f"{self.path} (frame {self.best.frame.index}, quality {self.best.prediction.quality.score:.2f})"
        return f"nothing captured; {self.path} not written"
