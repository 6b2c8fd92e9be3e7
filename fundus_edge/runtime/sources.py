"""Where frames come from: cameras, streams, video files, images. One interface for all.

``open_source(spec)`` reads what the user typed: a camera index (``0``), a V4L2 device
(``/dev/video0``), a Jetson CSI camera (``csi://0``), a stream (``rtsp://``, ``http://``), a
simulated camera (``sim://1920x1080@30``: synthetic fundus frames at a camera's rate), a
video file, an image or DICOM file, a folder of them (subfolders included: DICOM archives nest
patient/study/series folders) or a glob. Every frame is RGB uint8; a multi-frame DICOM object
gives one frame per frame, each carrying the object's identifiers (:attr:`Frame.dicom`).

Live sources (cameras, streams) reconnect with backoff when the device drops out; file
sources list what they could not read in :attr:`Source.skipped` and carry on.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import DataError, UserError
from fundus_edge.log import get_logger
from fundus_edge.media import STILL_SUFFIXES, has_dicom_magic, is_dicom_file, is_image_file
from fundus_edge.preprocess import as_rgb_uint8, read_image

__all__ = [
    "CameraSource",
    "CsiSource",
    "Frame",
    "ImageFilesSource",
    "SimCameraSource",
    "Skipped",
    "Source",
    "StillFilesSource",
    "StreamSource",
    "VideoFileSource",
    "csi_pipeline",
    "list_image_files",
    "open_source",
]

log = get_logger("sources")

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
OPEN_TIMEOUT_S = 5.0
# A video this many unreadable frames in a row is over, not damaged.
MAX_BAD_FRAMES_IN_A_ROW = 25


@dataclass
class Frame:
    """One captured frame.

    Attributes:
        image: (H, W, 3) uint8 RGB, the full camera frame.
        index: position in the source (0-based; counts on across loops and reconnects).
        timestamp: wall-clock capture time, UNIX seconds.
        name: the image file for image sources, else the source's description.
        position_s: the frame's time in a video file (None for live sources and images).
        path: the image file it was read from (image sources only).
        rel: that file's path relative to the source's root folder (POSIX), so per-image
            outputs of ``scans/a/1.png`` and ``scans/b/1.png`` never share a name; frame N of a
            multi-frame DICOM object is ``rel#N``.
        dicom: the DICOM object's identifiers (a
            :class:`~fundus_edge.data.readers.dicom.DicomInfo`), pseudonymised under
            ``--anonymise``; None for other sources.
        key: the file's identity (image and DICOM sources): its path relative to the root
            (POSIX, no ``#N``), the pseudonym of that path under ``--anonymise``. Unlike
            ``rel`` it is the same for every frame of a multi-frame object.
        frame_in_file: the frame's number within its file (0 for a still).
        last_in_file: no further frame of this file follows (always True for a still; for a
            multi-frame DICOM object, True on its last frame).
        stamp: the file's ``(size, mtime_ns)`` when it was read (watched folders only).
    """

    image: np.ndarray
    index: int
    timestamp: float
    name: str
    position_s: float | None = None
    path: str | None = None
    rel: str | None = None
    dicom: Any = None
    key: str | None = None
    frame_in_file: int = 0
    last_in_file: bool = True
    stamp: tuple[int, int] | None = None


@dataclass
class Skipped:
    """Something a source could not read: a file, or frame N of a video."""

    item: str
    reason: str


class Source(ABC):
    """A stream of :class:`Frame` objects.

    Attributes:
        live: a camera or stream (keep only the newest frame) rather than a file
            (process every frame).
        video: successive frames come from one camera, so its field of view stays put and
            can be tracked instead of found afresh in every frame (cameras, streams, video
            files); False for stills and folders, where each image differs.
        description: what the user gave, for records and messages.
        skipped: files or frames that could not be read.
        end_reason: why :meth:`read` returned None (``"end of source"``, ``"camera lost"``...).
        interrupt: set it to make a blocking read or a reconnect wait give up early.
    """

    live: bool = False
    video: bool = False

    def __init__(self, description: str) -> None:
        self.description = description
        self.nominal_fps: float | None = None  # what the device or file says, once open
        self.skipped: list[Skipped] = []
        self.end_reason = "end of source"
        self.interrupt = threading.Event()
        self._index = 0

    @abstractmethod
    def open(self) -> None:
        """Open the device or files; raise :class:`UserError` in one line when it cannot."""

    @abstractmethod
    def read(self) -> Frame | None:
        """The next frame, or None at the end (see :attr:`end_reason`)."""

    def close(self) -> None:  # noqa: B027  (file sources hold nothing open)
        """Release the device. Safe to call twice."""

    def _frame(
        self, image: np.ndarray, path: str | None = None, position_s: float | None = None
    ) -> Frame:
        frame = Frame(image, self._index, time.time(), path or self.description, position_s, path)
        self._index += 1
        return frame

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Live sources: one OpenCV VideoCapture, reopened with backoff when it drops out
# ----------------------------------------------------------------------------------------------


class _CaptureSource(Source):
    """Common code of cameras and streams: open, read, reconnect."""

    live = True
    video = True

    def __init__(
        self,
        description: str,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        reconnect: float = 10.0,
    ) -> None:
        super().__init__(description)
        self.width, self.height, self.fps = width, height, fps
        self.reconnect = reconnect
        self.reconnects = 0
        self._cap: Any = None

    @abstractmethod
    def _capture(self) -> Any:
        """A new ``cv2.VideoCapture`` (opened or not)."""

    def _check(self) -> None:
        """Fail fast, before OpenCV tries, when the device clearly cannot open."""

    def _configure(self, cap: Any) -> None:
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        # One buffered frame: a live view must show now, not what queued up during a slow step.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def open(self) -> None:
        self._check()
        cap = self._capture()
        if not cap.isOpened():
            cap.release()
            raise UserError(f"{self.description}: cannot open ({self._hint()})")
        self._configure(cap)
        self._cap = cap
        self.nominal_fps = cap.get(cv2.CAP_PROP_FPS) or self.fps
        w, h = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
        if self.width and self.height and (int(w), int(h)) != (self.width, self.height):
            log.warning(
                "%s: asked for %dx%d, the device gives %dx%d",
                self.description,
                self.width,
                self.height,
                int(w),
                int(h),
            )

    def _hint(self) -> str:
        return "check the address and that nothing else is using it"

    def read(self) -> Frame | None:
        while not self.interrupt.is_set():
            ok, image = (False, None) if self._cap is None else self._cap.read()
            if ok and image is not None and image.size:
                return self._frame(as_rgb_uint8(image, bgr=True))
            if not self._reconnect():
                return None
        self.end_reason = "interrupted"
        return None

    def _reconnect(self) -> bool:
        """Reopen with exponential backoff for up to :attr:`reconnect` seconds."""
        log.warning("%s: lost; reconnecting for up to %.0f s", self.description, self.reconnect)
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        deadline = time.monotonic() + self.reconnect
        delay = 0.2
        while time.monotonic() < deadline:
            if self.interrupt.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                self.end_reason = "interrupted"
                return False
            try:
                self._check()
                cap = self._capture()
            except UserError:
                cap = None
            if cap is not None and cap.isOpened():
                self._configure(cap)
                self._cap = cap
                self.reconnects += 1
                log.info("%s: reconnected", self.description)
                return True
            if cap is not None:
                cap.release()
            delay = min(delay * 2, 2.0)
        self.end_reason = f"camera lost (no frames for {self.reconnect:g} s)"
        return False

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class CameraSource(_CaptureSource):
    """A V4L2 camera by index (``0``) or device path (``/dev/video0``)."""

    def __init__(self, device: int | str, **kwargs: Any) -> None:
        self.device = f"/dev/video{device}" if isinstance(device, int) else str(device)
        super().__init__(f"camera {device}" if isinstance(device, int) else self.device, **kwargs)
        self._index_arg = (
            device if isinstance(device, int) else int(re.findall(r"\d+$", self.device)[0])
        )

    def _check(self) -> None:
        # Linux only: elsewhere OpenCV's own open is the only check there is.
        if not Path("/dev").is_dir() or os.name != "posix":
            return
        if not os.path.exists(self.device):
            found = sorted(globlib.glob("/dev/video*"))
            raise UserError(
                f"{self.description}: no such camera ({self.device} does not exist; "
                f"cameras here: {', '.join(found) or 'none'})"
            )
        if not os.access(self.device, os.R_OK | os.W_OK):
            raise UserError(
                f"{self.description}: no permission to open {self.device} "
                "(add the user to the 'video' group, then log in again)"
            )

    def _capture(self) -> Any:
        return cv2.VideoCapture(self._index_arg, cv2.CAP_V4L2)

    def _hint(self) -> str:
        return f"{self.device} exists but does not deliver video; is another program using it?"


def csi_pipeline(
    sensor_id: int,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (``nvarguscamerasrc``) into OpenCV (BGR).

    Args:
        sensor_id: the CSI port (``csi://0`` -> 0).
        width, height: capture size (default 1920x1080).
        fps: frame rate (default 30).
    """
    w, h, f = width or 1920, height or 1080, fps or 30
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width={w}, height={h}, framerate={round(f)}/1, format=NV12 ! "
        "nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


def _opencv_has_gstreamer() -> bool:
    info = cv2.getBuildInformation()
    m = re.search(r"GStreamer:\s*(\w+)", info)
    return bool(m and m.group(1).upper() == "YES")


class CsiSource(_CaptureSource):
    """A Jetson CSI camera (``csi://N``) through GStreamer's ``nvarguscamerasrc``."""

    def __init__(self, sensor_id: int, **kwargs: Any) -> None:
        super().__init__(f"csi://{sensor_id}", **kwargs)
        self.sensor_id = sensor_id

    def _check(self) -> None:
        if not _opencv_has_gstreamer():
            raise UserError(
                f"{self.description}: this OpenCV ({cv2.__version__}) has no GStreamer support; "
                "CSI cameras need JetPack's OpenCV (apt python3-opencv), not the PyPI wheel"
            )

    def _capture(self) -> Any:
        # The pipeline sets size and rate itself; CAP_PROP_* do nothing on appsink.
        return cv2.VideoCapture(
            csi_pipeline(self.sensor_id, self.width, self.height, self.fps), cv2.CAP_GSTREAMER
        )

    def _configure(self, cap: Any) -> None:
        """Size and rate are in the pipeline."""

    def _hint(self) -> str:
        return "is nvargus-daemon running and the camera seated? try: gst-launch-1.0 nvarguscamerasrc ! fakesink"


class StreamSource(_CaptureSource):
    """A network stream (``rtsp://``, ``http://`` MJPEG, ...) through FFmpeg."""

    def _capture(self) -> Any:
        ms = int(OPEN_TIMEOUT_S * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        return cv2.VideoCapture(self.description, cv2.CAP_FFMPEG, params)

    def _configure(self, cap: Any) -> None:
        # A stream's size and rate are the sender's; only keep the buffer short.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def _hint(self) -> str:
        return f"no stream answered within {OPEN_TIMEOUT_S:g} s; check the URL and the network"


class SimCameraSource(Source):
    """A simulated live camera, ``sim://WIDTHxHEIGHT@FPS`` (default ``sim://1920x1080@30``).

    It behaves like a real camera with a one-frame buffer: frame ``i`` is captured at
    ``open + i / fps`` whether or not anyone reads it, and :meth:`read` returns the newest
    captured frame not yet delivered (waiting for the next one when it is caught up), so a
    slow reader loses frames, counted in :attr:`missed`. The pictures are synthetic fundus
    photographs (:func:`fundus_edge.synth.generate_image`, the field's diameter the frame's
    height) on a black frame, a few variants with different sensor noise taken in turn; the
    field of view stays put, as a real fundus camera's does. A frame's image is the variant's
    own read-only buffer, handed over as a driver hands over the buffer its DMA filled: the
    camera costs the pipeline no per-frame copy. For benchmarks and for trying ``run`` without
    a camera: a rate above the model's makes the pipeline the bottleneck.
    """

    live = True
    video = True
    #: distinct frames (sensor-noise variants) delivered in turn
    VARIANTS = 4
    #: photographs drawn at most until one passes the default quality gate
    DRAWS = 6

    def __init__(self, description: str, width: int, height: int, fps: float, seed: int = 0):
        super().__init__(description)
        self.width, self.height, self.fps = width, height, fps
        self.seed = seed
        self.missed = 0  # frames captured but replaced by a newer one before a read
        self._frames: list[np.ndarray] = []
        self._start = 0.0  # time.monotonic() of frame 0
        self._wall = 0.0  # time.time() of frame 0
        self._next = 0  # the first capture number not yet delivered

    def open(self) -> None:
        side = min(self.width, self.height)
        if side < 64:
            raise UserError(f"{self.description}: a simulated camera needs at least 64x64 pixels")
        if not self._frames:
            # Drawing the pictures takes seconds at 1920x1080: once per source, so a reopen
            # (a caller that opened it before run() does) only restarts the clock.
            self._frames = self._pictures(side)
        self.nominal_fps = self.fps
        self._start, self._wall = time.monotonic(), time.time()
        self._next = 0

    def _pictures(self, side: int) -> list[np.ndarray]:
        """:attr:`VARIANTS` frames: one synthetic photograph (the first of the seed's draws that
        the default quality gate passes), fresh sensor noise in each."""
        from fundus_edge.preprocess import find_fov
        from fundus_edge.quality import assess_quality
        from fundus_edge.synth import DEFAULT_PREVALENCE, generate_image, sample_labels

        rng = np.random.default_rng(self.seed)
        # A photograph the default quality gate passes, so `run sim://` shows predictions:
        # some synthetic ones are graded blurry or not fundus-like (as some real ones are).
        for _ in range(self.DRAWS):
            photo = generate_image(rng, side, sample_labels(rng, DEFAULT_PREVALENCE))[0]
            if assess_quality(photo, find_fov(photo)).passed:
                break
        base = np.zeros((self.height, self.width, 3), np.uint8)
        y0, x0 = (self.height - side) // 2, (self.width - side) // 2
        base[y0 : y0 + side, x0 : x0 + side] = photo
        frames = []
        for _ in range(self.VARIANTS):
            noise = rng.normal(0.0, 2.0, base.shape).astype(np.float32)
            picture = np.clip(base + noise, 0, 255).astype(np.uint8)
            picture.flags.writeable = False
            frames.append(picture)
        return frames

    def read(self) -> Frame | None:
        if not self._frames:
            raise UserError(f"{self.description}: read before open")
        while True:
            if self.interrupt.is_set():
                self.end_reason = "interrupted"
                return None
            newest = int((time.monotonic() - self._start) * self.fps)
            if newest >= self._next:
                break
            self.interrupt.wait(max(self._start + self._next / self.fps - time.monotonic(), 0.0))
        self.missed += newest - self._next
        self._next = newest + 1
        # The buffer itself, as a capture driver hands over the one its DMA filled: no copy
        # (6 MB at 1920x1080: ~0.2-0.8 ms of the pipeline's CPU per frame the camera delivers,
        # read or not). The pictures are read-only, so nothing downstream can change one.
        frame = self._frame(self._frames[newest % self.VARIANTS])
        frame.timestamp = self._wall + newest / self.fps
        return frame

    def close(self) -> None:
        self._frames = []


# ----------------------------------------------------------------------------------------------
# File sources: every frame, in order
# ----------------------------------------------------------------------------------------------


class VideoFileSource(Source):
    """A video file; every decodable frame in order. Broken frames are skipped and listed."""

    video = True

    def __init__(self, path: str | os.PathLike, loop: bool = False) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        self.loop = loop
        self._cap: Any = None
        self._pos = 0  # frame number within the current pass
        self._count = 0

    def open(self) -> None:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise UserError(f"{self.path}: cannot open as a video or read as an image")
        self._cap = cap
        self.nominal_fps = cap.get(cv2.CAP_PROP_FPS) or None
        self._count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._pos = 0

    def read(self) -> Frame | None:
        bad = 0
        while not self.interrupt.is_set():
            ok, image = self._cap.read()
            if ok and image is not None and image.size:
                pos = self._pos
                self._pos += 1
                fps = self._cap.get(cv2.CAP_PROP_FPS) or 0.0
                return self._frame(
                    as_rgb_uint8(image, bgr=True), position_s=pos / fps if fps > 0 else None
                )
            # Past the container's frame count (or no count at all): the end, not damage.
            if self._count <= 0 or self._pos >= self._count - 1 or bad >= MAX_BAD_FRAMES_IN_A_ROW:
                if bad >= MAX_BAD_FRAMES_IN_A_ROW:
                    self.skipped.append(
                        Skipped(
                            f"{self.path}#{self._pos}", f"{bad} unreadable frames in a row; stopped"
                        )
                    )
                if self.loop and self._index > 0:
                    self._cap.release()
                    self.open()
                    bad = 0
                    continue
                return None
            self.skipped.append(Skipped(f"{self.path}#{self._pos}", "frame cannot be decoded"))
            self._pos += 1
            bad += 1
        self.end_reason = "interrupted"
        return None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class StillFilesSource(Source):
    """Common code of the sources that read image and DICOM files (a list of files,
    :class:`ImageFilesSource`; a watched folder,
    :class:`~fundus_edge.runtime.watch.WatchFolderSource`): one frame per still, every frame
    of a multi-frame DICOM object one at a time, names relative to :attr:`root`, pseudonyms
    under ``--anonymise``.

    Args:
        description: what the user gave.
        anonymiser: a :class:`~fundus_edge.data.anonymise.Pseudonymiser`: frames then carry
            pseudonyms for their path and identifiers (the source still reads the real file).
        root: the folder relative names start from.
    """

    def __init__(self, description: str, anonymiser: Any = None, root: Path | None = None) -> None:
        super().__init__(description)
        self.anonymiser = anonymiser
        self.root = root if root is not None else Path(".")
        self._good = 0
        self._frames: Any = None  # the open multi-frame object's iterator
        self._current: tuple[Path, Any, int] | None = None

    def _skip(self, item: str, reason: str) -> None:
        if not any(s.item == item for s in self.skipped):
            self.skipped.append(Skipped(item, reason))

    def _read_still(self, path: Path, start: int = 0) -> Frame | None:
        """The frame of an image file (None: skipped), or open a DICOM file for
        :meth:`_next_dicom_frame` (None) to read its frames from ``start`` on."""
        if is_dicom_file(path):
            self._open_dicom(path, start)
            return None
        try:
            image = read_image(path)
        except DataError as exc:
            self._skip(str(path), str(exc).split(": ", 1)[-1])
            return None
        self._good += 1
        return self._still(image, path, None, None)

    def _open_dicom(self, path: Path, start: int = 0) -> None:
        """Open a DICOM object; its frames from ``start`` on come from :meth:`_next_dicom_frame`."""
        from fundus_edge.data.readers.dicom import decode_frame, open_dicom

        try:
            ds, info = open_dicom(path)
        except DataError as exc:
            self._skip(str(path), _reason(exc, path))
            return
        self._frames = (decode_frame(ds, i, path) for i in range(start, info.frames))
        self._current = (path, info, start)

    def _next_dicom_frame(self) -> Frame | None:
        assert self._current is not None
        path, info, n = self._current
        try:
            image = next(self._frames)
        except StopIteration:
            self._frames = self._current = None
            return None
        except DataError as exc:
            self._skip(f"{path}#{n}" if info.frames > 1 else str(path), _reason(exc, path))
            self._frames = self._current = None  # a damaged stream: the rest of it too
            return None
        self._current = (path, info, n + 1)
        self._good += 1
        return self._still(
            image, path, info, n if info.frames > 1 else None, last=n + 1 >= info.frames
        )

    def _still(
        self, image: np.ndarray, path: Path, info: Any, n: int | None, last: bool = True
    ) -> Frame:
        rel = _relative(path, self.root)
        shown = str(path)
        if self.anonymiser is not None:
            rel = self.anonymiser.path(rel)
            shown = rel
            info = self.anonymiser.info(info) if info is not None else None
        key = rel
        if n is not None:
            rel = f"{rel}#{n}"
            shown = f"{shown}#{n}"
        frame = self._frame(image, path=shown)
        frame.rel = rel
        frame.dicom = info
        frame.key = key
        frame.frame_in_file = n or 0
        frame.last_in_file = last
        return frame


class ImageFilesSource(StillFilesSource):
    """Image and DICOM files (one, a folder's or a glob's), in sorted order.

    Files that cannot be decoded are skipped and listed in :attr:`skipped`. (Which files a
    folder holds is :func:`list_image_files`'s rule: non-images are never listed here.)
    Every frame of a multi-frame DICOM object is read, one at a time.

    Args:
        paths: the files.
        description: what the user gave.
        loop: start over at the end.
        anonymiser: a :class:`~fundus_edge.data.anonymise.Pseudonymiser`: frames then carry
            pseudonyms for their path and identifiers (the source still reads the real file).
        root: the folder relative names start from (default: the files' deepest common
            parent).
    """

    def __init__(
        self,
        paths: list[Path],
        description: str,
        loop: bool = False,
        anonymiser: Any = None,
        root: Path | None = None,
    ) -> None:
        # The folder every path is named relative to: the deepest common parent.
        root = root if root is not None else (_common_parent(paths) if paths else Path("."))
        super().__init__(description, anonymiser=anonymiser, root=root)
        self.paths = paths
        self.loop = loop
        self._next = 0

    def open(self) -> None:
        if not self.paths:
            raise UserError(f"{self.description}: no files found")

    def read(self) -> Frame | None:
        while not self.interrupt.is_set():
            if self._frames is not None:
                frame = self._next_dicom_frame()
                if frame is not None:
                    return frame
                continue
            if self._next >= len(self.paths):
                if not (self.loop and self._good):
                    return None
                self._next = 0
            path = self.paths[self._next]
            self._next += 1
            frame = self._read_still(path)
            if frame is not None:
                return frame
        self.end_reason = "interrupted"
        return None


def _reason(exc: Exception, path: Path) -> str:
    """The part of a reader's one-line message after the file's name."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text.split(": ", 1)[-1]


def _common_parent(paths: list[Path]) -> Path:
    parents = [Path(os.path.abspath(p)).parent for p in paths]
    return Path(os.path.commonpath([str(p) for p in parents]))


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:  # not below the root (cannot happen for a common parent)
        return Path(path).name


# ----------------------------------------------------------------------------------------------
# What the user typed -> a source
# ----------------------------------------------------------------------------------------------


def list_image_files(folder: str | os.PathLike, option: str = "") -> list[Path]:
    """The image and DICOM files of a folder and its subfolders, sorted by relative path:
    the one rule of ``run`` and ``clip``.

    A file counts by its extension (:data:`~fundus_edge.media.STILL_SUFFIXES`, any case) or,
    without an extension, by its DICOM preamble (archives name files by UID). Other files,
    hidden files and hidden folders are ignored, not skipped. A listed file that then cannot be
    decoded is the reader's to skip (and fails ``--strict``).

    Raises:
        UserError: the folder cannot be listed, or holds no image file.
    """
    folder = Path(folder)
    prefix = f"{option} " if option else ""
    try:
        next(os.scandir(folder), None)
    except OSError as exc:
        raise UserError(f"{prefix}{folder}: cannot list ({exc.strerror or exc})") from None
    found: list[tuple[str, Path]] = []
    seen_any = False

    def unreadable(exc: OSError) -> None:
        log.warning("%s: cannot list (%s); its files are not read", exc.filename, exc.strerror)

    for here, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        seen_any = seen_any or bool(files or dirs)
        for name in files:
            if name.startswith("."):
                continue
            p = Path(here) / name
            if is_image_file(p) or is_dicom_file(p):
                found.append((p.relative_to(folder).as_posix(), p))
    if not found:
        what = "no files found" if not seen_any else "no image files found"
        raise UserError(
            f"{prefix}{folder}: {what} (looks for {', '.join(STILL_SUFFIXES)} and DICOM files "
            "in it and its subfolders; other files are ignored)"
        )
    return [p for _, p in sorted(found)]


def case_collisions(paths: list[Path], root: Path) -> tuple[list[Path], list[Skipped]]:
    """Keep the first of files whose paths relative to ``root`` differ only in letter case.

    Their per-image outputs would share a name on a case-insensitive disk (macOS, Windows, a
    USB stick): the later ones are skipped and listed, never silently overwritten.
    """
    kept: list[Path] = []
    skipped: list[Skipped] = []
    first: dict[str, Path] = {}
    for p in paths:
        key = _relative(p, root).casefold()
        if key in first:
            skipped.append(
                Skipped(
                    str(p),
                    f"same name as {first[key]} but for letter case; its outputs would "
                    "overwrite that file's on a case-insensitive disk",
                )
            )
            continue
        first[key] = p
        kept.append(p)
    return kept, skipped


def open_source(
    spec: str | int,
    *,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    loop: bool = False,
    reconnect: float = 10.0,
    anonymiser: Any = None,
) -> Source:
    """Build the :class:`Source` that ``spec`` names (not yet opened).

    Args:
        spec: camera index (int or ``"0"``), ``/dev/videoN``, ``csi://N``, ``rtsp://...``,
            ``http(s)://...``, ``sim://WxH@FPS`` (:class:`SimCameraSource`), a video file, an
            image file, a folder or a glob pattern.
        width, height, fps: requested capture size and rate (cameras; CSI pipelines).
        loop: start files over at the end.
        reconnect: seconds a live source keeps trying to reconnect after losing the device.
        anonymiser: pseudonymise file names and DICOM identifiers (image and DICOM sources).

    Raises:
        UserError: the spec names nothing that exists, or options that do not apply.
    """
    live_opts = {"width": width, "height": height, "fps": fps, "reconnect": reconnect}
    text = str(spec).strip()
    if not text:
        # Path("") is the current folder: an empty SOURCE must not quietly mean "here".
        raise UserError(
            "empty SOURCE: give a camera index, /dev/videoN, csi://N, a URL, a file, a folder or a glob"
        )
    if isinstance(spec, int) or text.isdigit():
        return CameraSource(int(text), **live_opts)
    if re.fullmatch(r"/dev/video\d+", text):
        return CameraSource(text, **live_opts)
    m = re.fullmatch(r"csi://(\d+)", text)
    if m:
        return CsiSource(int(m.group(1)), **live_opts)
    if text.startswith("csi://"):
        raise UserError(f"{text}: a CSI camera is csi://N with N the sensor id, e.g. csi://0")
    if text.lower().startswith(STREAM_SCHEMES):
        return StreamSource(text, **live_opts)
    if text.lower().startswith("sim://"):
        return _sim_camera(text, width, height, fps)
    if any(ch in text for ch in "*?["):
        paths = sorted(Path(p) for p in globlib.glob(text, recursive=True) if Path(p).is_file())
        if not paths:
            raise UserError(f"{text}: the pattern matches no files")
        return _files_source(paths, text, loop, anonymiser, None)
    path = Path(text).expanduser()
    if path.is_dir():
        root = Path(os.path.abspath(path))
        return _files_source(list_image_files(path), str(path), loop, anonymiser, root)
    if not path.exists():
        raise UserError(f"{text}: no such file, folder or camera")
    if is_image_file(path) or path.suffix.lower() in (".dcm", ".dicom") or has_dicom_magic(path):
        return ImageFilesSource([path], str(path), loop=loop, anonymiser=anonymiser)
    return VideoFileSource(path, loop=loop)


SIM_DEFAULT = "sim://1920x1080@30"


def _sim_camera(
    text: str, width: int | None, height: int | None, fps: float | None
) -> SimCameraSource:
    """``sim://[WxH][@FPS]``; --width/--height/--fps given on the command line take precedence."""
    m = re.fullmatch(r"sim://(?:(\d+)x(\d+))?(?:@(\d+(?:\.\d+)?))?", text.strip().lower())
    if m is None:
        raise UserError(f"{text}: a simulated camera is sim://WIDTHxHEIGHT@FPS, e.g. {SIM_DEFAULT}")
    w = width or (int(m.group(1)) if m.group(1) else 1920)
    h = height or (int(m.group(2)) if m.group(2) else 1080)
    rate = fps or (float(m.group(3)) if m.group(3) else 30.0)
    if not rate > 0:
        raise UserError(f"{text}: the frame rate must be > 0")
    if min(w, h) < 64 or max(w, h) > 8192:
        raise UserError(f"{text}: a simulated camera's frame must be 64 to 8192 pixels a side")
    return SimCameraSource(text, w, h, rate)


def _files_source(
    paths: list[Path], text: str, loop: bool, anonymiser: Any, root: Path | None
) -> ImageFilesSource:
    root = root if root is not None else _common_parent(paths)
    kept, collisions = case_collisions(paths, root)
    src = ImageFilesSource(kept, text, loop=loop, anonymiser=anonymiser, root=root)
    src.skipped.extend(collisions)
    return src
