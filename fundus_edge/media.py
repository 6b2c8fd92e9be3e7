"""One table of the file kinds fundus-edge reads and writes: stills, DICOM, videos, codecs.

Every reader and writer in the package asks this module, so ``run``, ``clip``, ``dataset``,
the calibration reader and the sinks agree on what a file is (they used to keep five suffix
lists and two codec tables that disagreed on ``.mkv``).

* **Stills** (:data:`IMAGE_SUFFIXES`): what OpenCV decodes everywhere it is built (PNG, JPEG,
  TIFF, BMP, WebP). Suffixes are matched in any letter case.
* **DICOM** (:data:`DICOM_SUFFIXES`): ``.dcm``/``.dicom``, and files without a suffix whose
  bytes 128-131 read ``DICM`` (archives name files by their SOP instance UID, with no suffix).
  Read with pydicom (the ``dicom`` extra); see :mod:`fundus_edge.data.readers.dicom`.
* **Videos** (:data:`VIDEO_CODECS`): the containers OpenCV's ``VideoWriter`` writes with a
  codec that every OpenCV build carries (MPEG-4 Part 2 or Motion JPEG), and the FOURCC used
  for each. Reading accepts anything OpenCV's ``VideoCapture`` opens.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "STILL_SUFFIXES",
    "STILL_WRITE_SUFFIXES",
    "VIDEO_CODECS",
    "has_dicom_magic",
    "is_dicom_file",
    "is_image_file",
    "is_still_file",
    "media_kind",
]

#: Raster stills decoded by OpenCV.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
#: DICOM files by name (files without a suffix are recognised by their preamble).
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
#: Every still a source, dataset or calibration set reads: rasters and DICOM.
STILL_SUFFIXES: tuple[str, ...] = IMAGE_SUFFIXES + DICOM_SUFFIXES
#: Stills OpenCV writes losslessly or at a known quality (``--capture``, ``--save-dir``).
STILL_WRITE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Video container -> FOURCC written there (``run --save-video``, ``clip``).
VIDEO_CODECS: dict[str, str] = {
    ".mp4": "mp4v",
    ".m4v": "mp4v",
    ".mov": "mp4v",
    ".mkv": "mp4v",
    ".avi": "MJPG",
}


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """True when the file starts with the DICOM preamble (128 bytes, then ``DICM``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM file: by suffix, or (no suffix) by its preamble."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    # UIDs contain dots ("1.2.840.113619.2.55.3"): a numeric "suffix" is not a file type.
    if suffix and not suffix[1:].isdigit():
        return False
    return has_dicom_magic(p)


def is_image_file(path: str | os.PathLike) -> bool:
    """A raster still by its suffix (any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_still_file(path: str | os.PathLike) -> bool:
    """A still fundus-edge reads: a raster image or a DICOM file."""
    return is_image_file(path) or is_dicom_file(path)


def media_kind(path: str | os.PathLike) -> str:
    """``"image"``, ``"dicom"`` or ``"video"`` (anything else: OpenCV may open it as a video)."""
    if is_image_file(path):
        return "image"
    if is_dicom_file(path):
        return "dicom"
    return "video"
