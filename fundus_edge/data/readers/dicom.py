"""DICOM fundus photographs: pixels as RGB uint8 and the identifiers a clinic files them by.

Fundus cameras deliver Ophthalmic Photography (OP), VL Photographic and Secondary Capture
objects, often JPEG-compressed. This reader uses pydicom and its pixel-data plugins (the
``dicom`` extra: pylibjpeg with its libjpeg, OpenJPEG and RLE plugins, pyjpegls; Pillow
decodes baseline JPEG and JPEG 2000 too):

===================================  ==========================================
transfer syntax                      decoded by
===================================  ==========================================
uncompressed (implicit/explicit VR)  pydicom
RLE Lossless                         pydicom, pylibjpeg-rle
JPEG Baseline / Extended / Lossless  Pillow (baseline, extended), pylibjpeg-libjpeg
JPEG-LS (lossless, near-lossless)    pyjpegls, pylibjpeg-libjpeg
JPEG 2000 (lossless, lossy)          Pillow, pylibjpeg-openjpeg
===================================  ==========================================

**Pixels.** Every frame of a single- or multi-frame object becomes ``(H, W, 3)`` uint8 RGB:
YBR_FULL, YBR_FULL_422, YBR_ICT/RCT are converted to RGB by pydicom; PALETTE COLOR through its
lookup table; MONOCHROME2 (a red-free photograph) is replicated to three channels and
MONOCHROME1 inverted first; more than 8 bits stored are scaled linearly to 8 bits
(``v * 255 / (2**BitsStored - 1)``). Signed or floating-point pixels are refused: they are
not photographs.

**Identifiers** (:class:`DicomInfo`): patient ID and name, study, series and SOP instance
UIDs, laterality (ImageLaterality (0020,0062), else Laterality (0020,0060), else unknown),
acquisition date/time (AcquisitionDateTime, else AcquisitionDate + Time, else ContentDate +
Time, else StudyDate + Time), modality, manufacturer and model.

Every failure is one line naming the file: not DICOM, no pixel data, an unsupported transfer
syntax, a truncated file (:class:`~fundus_edge.errors.DataError`); a compressed object whose
decoder is not installed is :class:`~fundus_edge.errors.MissingDependencyError` (exit 3,
naming the ``dicom`` extra).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import DataError, MissingDependencyError, require

__all__ = [
    "DicomInfo",
    "decode_frame",
    "iter_frames",
    "open_dicom",
    "read_dicom",
    "read_info",
    "write_derived",
    "write_photo",
]

_PURPOSE = "reading DICOM files"
# (0020,0062) ImageLaterality / (0020,0060) Laterality values -> eye. "B" (both) is unknown.
_EYES = {"R": "R", "L": "L", "OD": "R", "OS": "L"}


def _pydicom():
    module = require("pydicom", extra="dicom", purpose=_PURPOSE)
    # pydicom logs each oddity of a damaged header as a warning as well as raising it; a file
    # that cannot be read gets our one line, so keep its logger to errors.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    return module


@dataclass(frozen=True)
class DicomInfo:
    """What a DICOM object says about itself (header only; no pixels).

    ``eye`` is ``"R"``, ``"L"`` or None (unknown). ``acquired`` is ISO 8601 local time
    (``2026-11-30T09:41:12``) or None. Names and birth dates are kept for a report's header and
    never written to records (:meth:`record`).
    """

    path: str
    patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    sop_class_uid: str | None
    study_date: str | None
    study_description: str | None
    accession_number: str | None
    eye: str | None
    acquired: str | None
    modality: str | None
    manufacturer: str | None
    model_name: str | None
    frames: int
    rows: int | None
    columns: int | None
    transfer_syntax: str | None

    def record(self) -> dict[str, Any]:
        """The JSON-safe fields a result record carries (no names, no birth date)."""
        d = asdict(self)
        for k in ("path", "patient_name", "patient_birth_date", "patient_sex"):
            d.pop(k)
        return d


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    if value is None:
        return None
    if hasattr(value, "value"):  # a DataElement
        value = value.value
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _date_time(date: str | None, time: str | None) -> str | None:
    """DICOM DA (YYYYMMDD) + TM (HHMMSS.frac) -> ISO 8601; None when the date is malformed."""
    if not date or len(date) < 8 or not date[:8].isdigit():
        return None
    iso = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    if time:
        t = time.replace(":", "").split(".")[0]
        if len(t) >= 2 and t.isdigit():
            t = (t + "0000")[:6]
            iso += f"T{t[:2]}:{t[2:4]}:{t[4:6]}"
    return iso


def _acquired(ds: Any) -> str | None:
    dt = _text(ds, "AcquisitionDateTime")
    if dt and len(dt) >= 8:
        return _date_time(dt[:8], dt[8:] or None)
    for d, t in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("StudyDate", "StudyTime"),
    ):
        iso = _date_time(_text(ds, d), _text(ds, t))
        if iso:
            return iso
    return None


def _eye(ds: Any) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = (_text(ds, keyword) or "").upper()
        if value in _EYES:
            return _EYES[value]
    return None


def _info(ds: Any, path: Path) -> DicomInfo:
    meta = getattr(ds, "file_meta", None)
    ts = None
    if meta is not None and "TransferSyntaxUID" in meta:
        ts = str(meta.TransferSyntaxUID)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return DicomInfo(
        path=str(path),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        study_date=_date_time(_text(ds, "StudyDate"), None),
        study_description=_text(ds, "StudyDescription"),
        accession_number=_text(ds, "AccessionNumber"),
        eye=_eye(ds),
        acquired=_acquired(ds),
        modality=_text(ds, "Modality"),
        manufacturer=_text(ds, "Manufacturer"),
        model_name=_text(ds, "ManufacturerModelName"),
        frames=max(frames, 1),
        rows=int(ds.Rows) if "Rows" in ds else None,
        columns=int(ds.Columns) if "Columns" in ds else None,
        transfer_syntax=ts,
    )


def _read(path: Path, pixels: bool) -> Any:
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: cannot read DICOM (file not found)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read DICOM ({exc.strerror or exc})") from None
    if size == 0:
        raise DataError(f"{path}: cannot read DICOM (empty file)")
    try:
        with warnings.catch_warnings():
            # pydicom warns about every oddity of a damaged header; what matters is whether
            # the pixels decode, and that gets one line naming the file.
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise DataError(f"{path}: not a DICOM file (no DICM preamble)") from None
    except (EOFError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "truncated file"
        raise DataError(f"{path}: cannot read DICOM ({why})") from None
    except Exception as exc:  # pydicom raises many kinds on damaged headers
        raise DataError(f"{path}: cannot read DICOM (damaged: {_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def read_info(path: str | os.PathLike) -> DicomInfo:
    """The identifiers of a DICOM file, read without its pixel data."""
    path = Path(path)
    return _info(_read(path, pixels=False), path)


def open_dicom(path: str | os.PathLike) -> tuple[Any, DicomInfo]:
    """The dataset (pixel data included, not yet decoded) and its :class:`DicomInfo`.

    Raises:
        DataError: not DICOM, no pixel data, truncated, unsupported transfer syntax.
        MissingDependencyError: the decoder for its compression is not installed.
    """
    path = Path(path)
    ds = _read(path, pixels=True)
    info = _info(ds, path)
    if "PixelData" not in ds:
        what = "a DICOM object without pixel data"
        if info.modality:
            what += f" (modality {info.modality})"
        raise DataError(f"{path}: {what}; not a photograph")
    _check_decoder(ds, path)
    return ds, info


def _check_decoder(ds: Any, path: Path) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        return  # pydicom assumes implicit VR little endian: uncompressed
    from pydicom.pixels import get_decoder

    uid = meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        name = getattr(uid, "name", str(uid))
        raise DataError(f"{path}: unsupported transfer syntax {name} ({uid})") from None
    if not decoder.is_available:
        name = getattr(uid, "name", str(uid))
        raise MissingDependencyError(
            f"{path}: decoding {name} needs a pixel-data plugin that is not installed; "
            "install it with: pip install 'fundus-edge[dicom]'"
        )


def decode_frame(ds: Any, index: int, path: str | os.PathLike) -> np.ndarray:
    """Frame ``index`` of an opened dataset as ``(H, W, 3)`` uint8 RGB (see the module doc).

    Speed (``bench/dicom_throughput.py``, ``bench/results/cpu-amd-epyc-2c/dicom-throughput``;
    one 4288x2848 JPEG baseline YBR_FULL_422 frame, quality 95, 2-core AMD EPYC): pydicom's
    default plugin (pylibjpeg) plus its numpy YBR->RGB conversion took 355-485 ms, the PNG of
    the same photo 150-180 ms in OpenCV, and ``run`` over DICOM reached half PNG's FPS (the
    numpy conversion also holds the GIL from the inference thread). Pillow (libjpeg-turbo)
    with pydicom's conversion: 225-290 ms. Pillow returning YCbCr and OpenCV converting
    (``cv2.transform``, pydicom's matrix, within 1 grey level of it): 72-117 ms, and ``run``
    over DICOM at 1.4-1.7x PNG's FPS. So 8-bit JPEG baseline/extended goes to Pillow where it
    is installed (the other plugins if it fails), and 8-bit YBR_FULL/YBR_FULL_422 becomes
    RGB in OpenCV.
    """
    from pydicom.pixels import apply_color_lut, as_pixel_options, get_decoder, pixel_array
    from pydicom.pixels.processing import convert_color_space
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

    path = Path(path)
    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        raise DataError(f"{path}: signed pixel data is not a photograph; not supported")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise DataError(f"{path}: floating-point pixel data is not a photograph; not supported")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID", None) if meta is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not syntax:
                arr = pixel_array(ds, index=index)  # pydicom's own error: no transfer syntax
            else:
                decoder = get_decoder(syntax)
                opts = as_pixel_options(ds, as_rgb=False)  # YBR -> RGB below, in OpenCV
                plugins = [""]
                if (
                    syntax in (JPEGBaseline8Bit, JPEGExtended12Bit)
                    and int(ds.get("BitsStored", 8) or 8) == 8
                    and "pillow" in decoder.available_plugins
                ):
                    plugins.insert(0, "pillow")
                for n, plugin in enumerate(plugins):
                    try:
                        arr, out = decoder.as_array(
                            ds, index=index, validate=True, decoding_plugin=plugin, **opts
                        )
                        break
                    except Exception:
                        if n + 1 == len(plugins):
                            raise  # every plugin's reason, as pydicom words it
                decoded_as = str(out.get("photometric_interpretation", photometric)).upper()
                if decoded_as in ("YBR_FULL", "YBR_FULL_422") and arr.ndim == 3:
                    if arr.dtype == np.uint8 and arr.shape[2] == 3:
                        import cv2

                        # DICOM PS3.3 C.7.6.3.1.2 (pydicom's matrix), rounded and clipped.
                        ybr_to_rgb = np.float32(
                            [
                                [1.0, 0.0, 1.402, -1.402 * 128],
                                [1.0, -0.114 * 1.772 / 0.587, -0.299 * 1.402 / 0.587, 0.0],
                                [1.0, 1.772, 0.0, -1.772 * 128],
                            ]
                        )
                        ybr_to_rgb[1, 3] = -128 * (ybr_to_rgb[1, 1] + ybr_to_rgb[1, 2])
                        arr = cv2.transform(np.ascontiguousarray(arr), ybr_to_rgb)
                    else:
                        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    except MissingDependencyError:
        raise
    except (ValueError, RuntimeError, EOFError, OSError, KeyError, AttributeError) as exc:
        raise DataError(f"{path}: cannot decode frame {index} ({_short(exc)})") from None
    except Exception as exc:  # plugins raise their own kinds on damaged streams
        raise DataError(f"{path}: cannot decode frame {index} ({_short(exc)})") from None
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    bits = int(ds.get("BitsStored", 8) or 8)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: {arr.dtype} pixels are not a photograph; not supported")
        top = (1 << min(max(bits, 1), 16)) - 1 if photometric != "PALETTE COLOR" else 65535
        arr = np.clip(arr.astype(np.float32) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        arr = 255 - arr
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{path}: unexpected pixel layout {arr.shape}; not a photograph")
    return np.ascontiguousarray(arr)


def read_dicom(path: str | os.PathLike, frame: int = 0) -> tuple[np.ndarray, DicomInfo]:
    """One frame of a DICOM file as RGB uint8, and its :class:`DicomInfo`."""
    ds, info = open_dicom(path)
    if not 0 <= frame < info.frames:
        raise DataError(f"{path}: no frame {frame} (it has {info.frames})")
    return decode_frame(ds, frame, path), info


def iter_frames(path: str | os.PathLike) -> tuple[DicomInfo, Iterator[np.ndarray]]:
    """The :class:`DicomInfo` and an iterator over every frame (decoded one at a time)."""
    ds, info = open_dicom(path)

    def frames() -> Iterator[np.ndarray]:
        for i in range(info.frames):
            yield decode_frame(ds, i, path)

    return info, frames()


# ----------------------------------------------------------------------------------------------
# Writing photographs as DICOM (tests, benchmarks, and users who convert an archive)
# ----------------------------------------------------------------------------------------------

#: Transfer syntaxes :func:`write_photo` writes, by short name.
WRITE_SYNTAXES = ("explicit", "implicit", "jpeg", "jpeg-ls", "jpeg2000", "rle", "ybr")
_OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage


def write_photo(
    path: str | os.PathLike,
    frames: np.ndarray | list[np.ndarray],
    *,
    syntax: str = "explicit",
    patient_id: str = "PAT001",
    patient_name: str = "Doe^Jane",
    study_uid: str | None = None,
    series_uid: str | None = None,
    eye: str | None = None,
    laterality_attribute: str = "ImageLaterality",
    acquired: str = "20261130094112",
    jpeg_quality: int = 92,
) -> Path:
    """Write RGB photograph(s) as an Ophthalmic Photography object (8-bit, RGB input).

    ``frames``: one ``(H, W, 3)`` uint8 RGB image or a list of them (a multi-frame object).
    ``syntax``: ``explicit``/``implicit`` (uncompressed little endian), ``ybr`` (uncompressed
    YBR_FULL), ``jpeg`` (baseline, encoded by OpenCV and encapsulated), ``jpeg-ls``
    (lossless, pyjpegls), ``jpeg2000`` (lossless, pylibjpeg-openjpeg), ``rle``. ``eye``:
    ``"R"``/``"L"``/None, written into ``laterality_attribute`` (ImageLaterality or
    Laterality). Returns the path.
    """
    pydicom = _pydicom()
    import cv2
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLSLossless,
        RLELossless,
        generate_uid,
    )

    if syntax not in WRITE_SYNTAXES:
        raise ValueError(f"syntax {syntax!r}: one of {', '.join(WRITE_SYNTAXES)}")
    images = [frames] if isinstance(frames, np.ndarray) and frames.ndim == 3 else list(frames)
    images = [np.ascontiguousarray(f, dtype=np.uint8) for f in images]
    h, w = images[0].shape[:2]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _OP_SOP_CLASS
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = _OP_SOP_CLASS, sop
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.PatientBirthDate, ds.PatientSex = "19600101", "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate, ds.StudyTime = acquired[:8], acquired[8:] or "000000"
    ds.AcquisitionDateTime = acquired
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "OP", "fundus-edge", "synthetic"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.AccessionNumber = "ACC" + patient_id[-4:]
    if eye is not None:
        setattr(ds, laterality_attribute, eye)
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation, ds.PlanarConfiguration = 0, 0
    ds.PhotometricInterpretation = "RGB"
    if len(images) > 1:
        ds.NumberOfFrames = len(images)
    stack = np.stack(images)
    if syntax == "jpeg":
        ok_all = []
        for img in images:
            ok, buf = cv2.imencode(
                ".jpg",
                cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality],
            )
            assert ok
            ok_all.append(buf.tobytes())
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate(ok_all)
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    elif syntax == "ybr":
        ycc = [cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)[:, :, [0, 2, 1]] for img in images]
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.PixelData = np.stack(ycc).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.PixelData = stack.tobytes()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if syntax == "implicit" else ExplicitVRLittleEndian
        )
        target = {"jpeg-ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless, "rle": RLELossless}
        if syntax in target:
            ds.compress(target[syntax], stack if len(images) > 1 else images[0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_derived(
    source: str | os.PathLike, path: str | os.PathLike, image: np.ndarray, how: str
) -> Path:
    """Write ``image`` (RGB uint8) as a DICOM file derived from ``source``: its header (patient,
    study, series, laterality) with new pixels, uncompressed explicit VR little endian, a new
    SOP instance UID and ``how`` as the derivation description. Atomic.
    """
    pydicom = _pydicom()
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from fundus_edge.fileio import atomic_open

    source = Path(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    for keyword in ("NumberOfFrames", "FrameIncrementPointer", "LossyImageCompressionRatio"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = image.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = image.tobytes()
    ds["PixelData"].VR = "OB"
    ds.SOPInstanceUID = generate_uid()
    ds.DerivationDescription = how[:1024]
    meta = ds.file_meta
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        pydicom.dcmwrite(fh, ds, enforce_file_format=True)
    return path
