"""A screening report as DICOM objects a PACS files under the patient, and C-STORE to send them.

Two IODs are written, both into the visit's own study (its StudyInstanceUID, PatientID and
name, birth date, sex and accession number, copied from the source photographs), so a PACS
files them beside the photographs they were made from, and a viewer shows them in the same
study:

* **Encapsulated PDF** (:func:`encapsulated_pdf`, SOP class 1.2.840.10008.5.1.4.1.1.104.1):
  the PDF report. Modules: Patient, General Study, Encapsulated Document Series (modality
  ``DOC``), General Equipment (manufacturer ``fundus-edge``, the model's name and the
  software's version), SC Equipment, Encapsulated Document (the PDF, its title and LOINC
  18748-4 "Diagnostic imaging report" as its concept name, the source photographs as Source
  Instance Sequence) and SOP Common.
* **Secondary Capture Image** (:func:`secondary_capture`, SOP class
  1.2.840.10008.5.1.4.1.1.7): one per photograph, the annotated frame (the report's overlay)
  as uncompressed 8-bit RGB. Modules: Patient, General Study, General Series (series
  "fundus-edge overlays", body part ``EYE``), General Equipment, SC Equipment (conversion
  type ``WSD``, workstation), General Image (burned-in annotation ``YES``, the quality and
  findings as image comments, lossy compression ``01`` since the overlay was JPEG), General
  Reference (the source photograph as Source Image Sequence, with its frame of a multi-frame
  object, and a derivation description naming the model), Image Pixel, SC Image and SOP
  Common. The eye goes into ImageLaterality (General Image), per image, since one overlays
  series holds both eyes; when the eye is not known the series' Laterality is present and
  empty instead (type 2C for a paired body part: dciodvfy warns that it is empty, which is
  the truth).

Both carry ``SpecificCharacterSet`` ``ISO_IR 192`` (UTF-8) and are written as Part 10 files
in Explicit VR Little Endian (:func:`write_dataset`, atomically). A visit without a
StudyInstanceUID (stills) gets one derived from its patient ID and its photographs' content
(:func:`study_uid`), the same for the report and the overlays, so they form one study.
Identifiers are written as the visit has them: when the run anonymised, they are already
pseudonyms and names are empty (PatientName is type 2: present, empty).

:func:`send` stores files on a PACS (pynetdicom, the ``dicom`` extra) through one association
to ``AE@HOST:PORT`` (:func:`parse_target`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fundus_edge.errors import DataError, UserError, require
from fundus_edge.report.visits import INTENDED_USE, ModelInfo, Photo, Visit

__all__ = [
    "ENCAPSULATED_PDF_STORAGE",
    "MANUFACTURER",
    "OVERLAY_SERIES_DESCRIPTION",
    "REPORT_TITLE",
    "SECONDARY_CAPTURE_STORAGE",
    "encapsulated_pdf",
    "parse_target",
    "secondary_capture",
    "send",
    "study_uid",
    "write_dataset",
]

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
MANUFACTURER = "fundus-edge"
REPORT_TITLE = "Fundus screening report"
REPORT_SERIES_DESCRIPTION = "fundus-edge screening report"
OVERLAY_SERIES_DESCRIPTION = "fundus-edge overlays"
# Series numbers high enough not to be mistaken for the camera's own series.
REPORT_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902
# LOINC 18748-4: the concept name of an imaging report (CID 7000-compatible).
_REPORT_CONCEPT = ("18748-4", "LN", "Diagnostic imaging report")
# DCM 121322: "Source image for image processing operation" (CID 7202).
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")

_DICOM_PURPOSE = "to write DICOM reports"
_SEND_PURPOSE = "to send DICOM files to a PACS (--send)"
_EYES = {"R", "L"}


def _pydicom():
    return require("pydicom", extra="dicom", purpose=_DICOM_PURPOSE)


# ---------------------------------------------------------------------------------------------
# Value helpers: the VRs' limits (a value over them fails validation at the PACS).


def _clean(value: Any, limit: int) -> str:
    """A string value: no backslash (it separates values), no control characters, ``limit``
    characters at most."""
    if value is None:
        return ""
    text = re.sub(r"[\x00-\x1f\x7f\\]+", " ", str(value)).strip()
    return text[:limit].rstrip()


def _lo(value: Any) -> str:
    return _clean(value, 64)


def _sh(value: Any) -> str:
    return _clean(value, 16)


def _da(value: str | None) -> str:
    """ISO ``YYYY-MM-DD`` or DICOM ``YYYYMMDD`` -> DA; empty when it is neither."""
    text = (value or "").replace("-", "").strip()
    return text if len(text) == 8 and text.isdigit() else ""


def _pn(value: str | None) -> str:
    """A person name as the source had it (``Family^Given``), or empty."""
    if not value:
        return ""
    text = re.sub(r"[\x00-\x1f\x7f\\]+", " ", str(value)).strip()
    # PN: at most 64 characters per component group.
    return "=".join(group[:64] for group in text.split("="))


def _sex(value: str | None) -> str:
    text = (value or "").strip().upper()
    return text if text in ("M", "F", "O") else ""


def _uid_ok(value: str | None) -> bool:
    return (
        bool(value) and len(value) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) is not None
    )


def _new_uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None))  # 2.25.<UUID4 as an integer>


def study_uid(visit: Visit) -> str:
    """The StudyInstanceUID the visit's DICOM outputs carry.

    The visit's own when it has a valid one; else (stills) a ``2.25`` UID derived from the
    patient ID and the photographs' overlays, so the report and the overlays written for one
    visit share one study, and another visit (another clinic's ``stills`` folder) does not.

    Args:
        visit: the visit.

    Returns:
        A DICOM UID.
    """
    if _uid_ok(visit.study_uid):
        return str(visit.study_uid)
    h = hashlib.sha256(b"fundus-edge study\0")
    h.update(str(visit.patient_id).encode("utf-8") + b"\0")
    h.update((visit.study_date or "").encode("utf-8") + b"\0")
    for photo in visit.photos:
        h.update(photo.rel.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(photo.overlay_jpeg).digest())
    return "2.25." + str(int.from_bytes(h.digest()[:16], "big"))


def _when(when: datetime | None) -> datetime:
    return when if when is not None else datetime.now().astimezone()


def _dt_parts(when: datetime) -> tuple[str, str, str]:
    """(DA, TM, DT) of a datetime; DT carries the UTC offset when the datetime has one."""
    date = when.strftime("%Y%m%d")
    time = when.strftime("%H%M%S")
    dt = date + time
    if when.utcoffset() is not None:
        dt += when.strftime("%z")
    return date, time, dt


def _code(value: str, scheme: str, meaning: str) -> Any:
    pydicom = _pydicom()
    item = pydicom.Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


# ---------------------------------------------------------------------------------------------
# Modules shared by both IODs.


def _base(sop_class: str, sop_uid: str, model: ModelInfo) -> Any:
    """An empty dataset with its file meta (Explicit VR Little Endian)."""
    pydicom = _pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _sh("FUNDUSEDGE_" + str(model.version))
    meta.SourceApplicationEntityTitle = "FUNDUS_EDGE"
    ds = pydicom.Dataset()
    ds.file_meta = meta
    return ds


def _sop_common(ds: Any, sop_class: str, sop_uid: str, when: datetime) -> None:
    date, time, _ = _dt_parts(when)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    if when.utcoffset() is not None:
        ds.TimezoneOffsetFromUTC = when.strftime("%z")


def _patient_study(ds: Any, visit: Visit, when: datetime) -> None:
    """Patient and General Study modules: the visit's identifiers, so the PACS files the object
    under the patient and in the study of the photographs."""
    ds.PatientName = _pn(visit.patient_name)
    ds.PatientID = _lo(visit.patient_id)
    ds.PatientBirthDate = _da(visit.patient_birth_date)
    ds.PatientSex = _sex(visit.patient_sex)

    ds.StudyInstanceUID = study_uid(visit)
    if _uid_ok(visit.study_uid):
        # The camera's study: its date; its time and ID are not known here (type 2: empty).
        ds.StudyDate = _da(visit.study_date)
        ds.StudyTime = ""
        ds.StudyID = ""
    else:
        # A study of ours (stills): dated by the photographs when known, else by now.
        date, time, _ = _dt_parts(when)
        ds.StudyDate = _da(visit.study_date) or date
        ds.StudyTime = "" if visit.study_date else time
        ds.StudyID = _sh("FE" + (ds.StudyDate or date))
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = _sh(visit.accession_number)
    if visit.study_description:
        ds.StudyDescription = _lo(visit.study_description)


def _equipment(ds: Any, model: ModelInfo) -> None:
    """General Equipment and SC Equipment modules: fundus-edge, the model, the version."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _lo(model.name)
    ds.SoftwareVersions = _lo(model.version)
    ds.ConversionType = "WSD"  # workstation
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = _lo(model.name)
    ds.SecondaryCaptureDeviceSoftwareVersions = _lo(model.version)


def _frame_number(photo: Photo) -> int | None:
    """The 1-based frame of a multi-frame source (``rel`` ends ``#N``, N from 0), else None."""
    info = photo.dicom
    if info is None or int(getattr(info, "frames", 1) or 1) <= 1:
        return None
    _, sep, n = photo.rel.rpartition("#")
    return int(n) + 1 if sep and n.isdigit() else None


def _reference(photo: Photo) -> Any | None:
    """A Referenced SOP item for the photograph's source object, or None (not DICOM)."""
    info = photo.dicom
    if info is None or not _uid_ok(info.sop_class_uid) or not _uid_ok(info.sop_uid):
        return None
    pydicom = _pydicom()
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = info.sop_class_uid
    item.ReferencedSOPInstanceUID = info.sop_uid
    frame = _frame_number(photo)
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item


# ---------------------------------------------------------------------------------------------
# Encapsulated PDF.


def encapsulated_pdf(
    visit: Visit,
    pdf: bytes,
    model: ModelInfo,
    *,
    series_uid: str,
    instance: int = 1,
    when: datetime | None = None,
) -> Any:
    """The visit's PDF report as an Encapsulated PDF Storage object.

    Args:
        visit: the visit the report is about (its identifiers are copied).
        pdf: the PDF document.
        model: the model that made the report (General Equipment names it).
        series_uid: the report series' SeriesInstanceUID (a new UID from the caller).
        instance: InstanceNumber.
        when: when the report was made (ContentDate/Time); now when None.

    Returns:
        A ``pydicom.Dataset`` with file meta, ready for :func:`write_dataset`.

    Raises:
        UserError: ``pdf`` is not a PDF.
    """
    if bytes(pdf[:5]) != b"%PDF-":
        raise UserError("the report to encapsulate is not a PDF (it does not start with %PDF-)")
    when = _when(when)
    date, time, dt = _dt_parts(when)
    sop_uid = _new_uid()
    ds = _base(ENCAPSULATED_PDF_STORAGE, sop_uid, model)
    _sop_common(ds, ENCAPSULATED_PDF_STORAGE, sop_uid, when)
    _patient_study(ds, visit, when)

    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = REPORT_SERIES_NUMBER
    ds.SeriesDescription = REPORT_SERIES_DESCRIPTION
    ds.SeriesDate = date
    ds.SeriesTime = time

    _equipment(ds, model)

    # Encapsulated Document
    ds.InstanceNumber = instance
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = dt
    ds.BurnedInAnnotation = "YES"  # the report names the patient
    ds.DocumentTitle = REPORT_TITLE
    ds.ConceptNameCodeSequence = [_code(*_REPORT_CONCEPT)]
    refs, seen = [], set()
    for photo in visit.photos:
        item = _reference(photo)
        if item is not None and item.ReferencedSOPInstanceUID not in seen:
            seen.add(item.ReferencedSOPInstanceUID)
            if "ReferencedFrameNumber" in item:
                del item.ReferencedFrameNumber  # the whole object was a source
            refs.append(item)
    if refs:
        ds.SourceInstanceSequence = refs
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = bytes(pdf)
    ds.EncapsulatedDocumentLength = len(data)
    if len(data) % 2:
        data += b"\x00"  # OB values have even length; the length above is the PDF's own
    ds.EncapsulatedDocument = data
    return ds


# ---------------------------------------------------------------------------------------------
# Secondary Capture of an overlay.


def _overlay_rgb(photo: Photo) -> Any:
    cv2 = require("cv2", purpose=_DICOM_PURPOSE)
    import numpy as np

    bgr = cv2.imdecode(np.frombuffer(photo.overlay_jpeg, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3:
        raise DataError(f"{photo.rel}: the overlay cannot be decoded as JPEG")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _overlay_modality(visit: Visit) -> str:
    """The sources' modality when they share one (OP, XC), else OT."""
    found = {
        str(p.dicom.modality).strip().upper()
        for p in visit.photos
        if p.dicom is not None and getattr(p.dicom, "modality", None)
    }
    one = found.pop() if len(found) == 1 else ""
    return one if re.fullmatch(r"[A-Z]{2,16}", one) else "OT"


def _comments(photo: Photo, model: ModelInfo) -> str:
    findings = ", ".join(f"{n} {p:.2f}" for n, p in photo.findings()) or "none over threshold"
    return (
        f"Quality: {photo.quality_reason}. Findings: {findings}. Model {model.name} "
        f"(fundus-edge {model.version}). {INTENDED_USE}"
    )[:10240]


def secondary_capture(
    visit: Visit,
    photo: Photo,
    model: ModelInfo,
    *,
    series_uid: str,
    instance: int,
    when: datetime | None = None,
) -> Any:
    """A photograph's overlay (the annotated frame) as a Secondary Capture Image object.

    The eye goes into ImageLaterality (General Image) from ``photo.eye``, never into the
    series' Laterality (an overlays series holds both eyes); an unknown eye leaves the series'
    Laterality present and empty (type 2C).

    Args:
        visit: the visit the photograph belongs to (its identifiers are copied).
        photo: the photograph; its ``overlay_jpeg`` becomes the pixels.
        model: the model whose findings the overlay shows.
        series_uid: the overlays series' SeriesInstanceUID (one for all of a visit's overlays).
        instance: InstanceNumber.
        when: when the overlay was made; now when None.

    Returns:
        A ``pydicom.Dataset`` with file meta, ready for :func:`write_dataset`.

    Raises:
        DataError: the overlay is not a decodable JPEG.
    """
    rgb = _overlay_rgb(photo)
    when = _when(when)
    date, time, _ = _dt_parts(when)
    sop_uid = _new_uid()
    ds = _base(SECONDARY_CAPTURE_STORAGE, sop_uid, model)
    _sop_common(ds, SECONDARY_CAPTURE_STORAGE, sop_uid, when)
    _patient_study(ds, visit, when)

    # General Series
    ds.Modality = _overlay_modality(visit)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = OVERLAY_SERIES_NUMBER
    ds.SeriesDescription = OVERLAY_SERIES_DESCRIPTION
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.BodyPartExamined = "EYE"
    if photo.eye not in _EYES:
        ds.Laterality = ""  # type 2C: a paired body part whose side is not known

    _equipment(ds, model)

    # General Image
    ds.InstanceNumber = instance
    ds.PatientOrientation = ""
    ds.ContentDate = date
    ds.ContentTime = time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "YES"  # a fundus photograph
    ds.ImageComments = _comments(photo, model)
    if photo.eye in _EYES:
        ds.ImageLaterality = photo.eye
    rows, cols = int(rgb.shape[0]), int(rgb.shape[1])
    ratio = rows * cols * 3 / max(len(photo.overlay_jpeg), 1)
    ds.LossyImageCompression = "01"  # the overlay was JPEG-compressed
    ds.LossyImageCompressionRatio = f"{ratio:.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"

    # General Reference
    digest = str(model.sha256)[:16]
    ds.DerivationDescription = (
        f"fundus-edge {model.version} overlay of model {model.name} (sha256 {digest}...) "
        "findings on the source photograph; research tool, not a medical device"
    )[:1024]
    source = _reference(photo)
    if source is not None:
        source.PurposeOfReferenceCodeSequence = [_code(*_SOURCE_PURPOSE)]
        ds.SourceImageSequence = [source]

    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = rgb.tobytes()
    if len(pixels) % 2:
        pixels += b"\x00"
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB"

    # SC Image
    ds.DateOfSecondaryCapture = date
    ds.TimeOfSecondaryCapture = time
    return ds


# ---------------------------------------------------------------------------------------------
# Writing.


def write_dataset(ds: Any, path: str | os.PathLike) -> Path:
    """Write ``ds`` as a DICOM Part 10 file, atomically.

    A temporary file beside ``path`` is written, fsynced and renamed over ``path``: a reader
    (or a PACS watching the folder) never sees half a file. The file meta is checked and
    completed by pydicom (``enforce_file_format=True``).

    Args:
        ds: a dataset from :func:`encapsulated_pdf` or :func:`secondary_capture`.
        path: the file to write.

    Returns:
        ``path`` as a Path.
    """
    _pydicom()
    from fundus_edge.fileio import atomic_open

    path = Path(path)
    with atomic_open(path, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------
# C-STORE.

_TARGET_FORM = "AE@HOST:PORT (e.g. PACS@10.0.0.5:104 or PACS@[fd00::5]:11112)"
_TARGET_RE = re.compile(r"^(?P<ae>[^@]*)@(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$")


def parse_target(text: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> ``(ae_title, host, port)``.

    The AE title is 1-16 characters of printable ASCII without a backslash (leading and
    trailing spaces are not significant); the host is a name, an IPv4 address or an IPv6
    address in brackets; the port is 1-65535.

    Raises:
        UserError: naming ``--send`` and the expected form.
    """
    raw = str(text).strip()
    m = _TARGET_RE.match(raw)

    def bad(why: str) -> UserError:
        return UserError(f"--send {raw!r}: {why}; expected {_TARGET_FORM}")

    if m is None:
        return_why = "not of the form AE@HOST:PORT"
        if "@" in raw and not re.search(r":\d+$", raw):
            return_why = "no port"
        raise bad(return_why)
    ae = m.group("ae").strip()
    if not 1 <= len(ae) <= 16:
        raise bad(f"the AE title must be 1-16 characters (it has {len(ae)})")
    if not all(0x20 <= ord(c) < 0x7F for c in ae) or "\\" in ae:
        raise bad("the AE title must be printable ASCII without a backslash")
    host = m.group("v6") or m.group("host") or ""
    host = host.strip()
    if not host or any(c.isspace() for c in host):
        raise bad("no host")
    if m.group("v6") is not None:
        import ipaddress

        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise bad(f"{host!r} in brackets is not an IPv6 address") from None
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise bad(f"port {port} is out of range 1-65535")
    return ae, host, port


class _Capture:
    """Collects pynetdicom's error log lines while an association is made (its only report of
    why a connection failed)."""

    def __init__(self) -> None:
        import logging

        self.lines: list[str] = []
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                with contextlib.suppress(Exception):  # a bad log record: ignore it
                    outer.lines.append(record.getMessage())

        self.handler = Handler(level=logging.ERROR)
        self.logger = logging.getLogger("pynetdicom")

    def __enter__(self) -> _Capture:
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)

    def reason(self) -> str | None:
        for line in self.lines:
            if line.startswith("TCP Initialisation Error:"):
                text = re.sub(r"^\[Errno -?\d+\]\s*", "", line.split(":", 1)[1].strip())
                return f"cannot connect: {text or 'connection failed'}"
        for line in self.lines:
            if line.startswith("ACSE timeout"):
                return "no answer to the association request (timeout)"
            if line.startswith("Unknown PDU type"):
                return "the peer does not speak DICOM (it answered with something else)"
            if line.startswith("No accepted presentation contexts"):
                return "the PACS accepted none of the files' SOP classes (association aborted)"
        return None


def _files(paths: Iterable[str | os.PathLike]) -> list[tuple[Any, Any, str, str]]:
    """Read each file once: (given path, dataset, SOP class UID, transfer syntax UID)."""
    pydicom = require("pydicom", extra="dicom", purpose=_SEND_PURPOSE)
    from pydicom.errors import InvalidDicomError

    out, seen = [], set()
    for given in paths:
        key = os.path.realpath(os.fspath(given))
        if key in seen:
            continue
        seen.add(key)
        try:
            ds = pydicom.dcmread(os.fspath(given))
        except FileNotFoundError:
            raise DataError(f"{given}: cannot send (file not found)") from None
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise DataError(f"{given}: cannot send (not a DICOM file: {exc})") from None
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ""
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if not sop_class or "SOPInstanceUID" not in ds or not ts:
            raise DataError(
                f"{given}: cannot send (no SOPClassUID, SOPInstanceUID or transfer syntax)"
            )
        out.append((given, ds, sop_class, ts))
    return out


def _contexts(files: Sequence[tuple[Any, Any, str, str]]) -> dict[str, list[str]]:
    """SOP class -> the transfer syntaxes to propose: the files' own, and for uncompressed files
    also Explicit and Implicit VR Little Endian (pynetdicom re-encodes between those)."""
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    wanted: dict[str, list[str]] = {}
    for _, _, sop_class, ts in files:
        options = wanted.setdefault(sop_class, [])
        extra = [ts]
        if not UID(ts).is_compressed and UID(ts).is_little_endian:
            extra += [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for uid in extra:
            if str(uid) not in options:
                options.append(str(uid))
    return wanted


def send(
    paths: Iterable[str | os.PathLike],
    target: str,
    *,
    calling_ae: str = "FUNDUS_EDGE",
    timeout: float = 30,
) -> list[tuple[Any, int]]:
    """C-STORE ``paths`` to ``target`` (``AE@HOST:PORT``) through one association.

    Presentation contexts are requested for the files' SOP classes with their transfer
    syntaxes. Each file is sent once (a path given twice is sent once). A warning status
    (``0x0001``, ``0xBxxx``: stored, with coercion or elements discarded) counts as stored and
    is returned; any other non-success status stops the transfer.

    Args:
        paths: the DICOM files.
        target: ``AE@HOST:PORT`` (see :func:`parse_target`).
        calling_ae: our AE title.
        timeout: seconds for connecting, the association and each response.

    Returns:
        ``[(path, status), ...]`` in the order sent.

    Raises:
        UserError: a bad target; the association was rejected, aborted, refused or timed out
            (one line naming the target and the reason); a file's C-STORE failed (naming the
            file and the status in hex); a file's SOP class was not accepted.
        DataError: a file is not DICOM.
    """
    ae_title, host, port = parse_target(target)
    if not 1 <= len(calling_ae.strip()) <= 16:
        raise UserError(f"calling AE title {calling_ae!r} must be 1-16 characters")
    files = _files(paths)
    if not files:
        return []
    pynetdicom = require("pynetdicom", extra="dicom", purpose=_SEND_PURPOSE)
    wanted = _contexts(files)
    if len(wanted) > 128:
        raise UserError(
            f"--send {target}: {len(wanted)} SOP classes in one association; at most 128"
        )
    where = f"--send {target}"

    ae = pynetdicom.AE(ae_title=calling_ae.strip())
    for sop_class, syntaxes in wanted.items():
        ae.add_requested_context(sop_class, syntaxes)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout

    rejected: list[Any] = []

    def on_acse_recv(event: Any) -> None:
        primitive = getattr(event, "primitive", None)
        if getattr(primitive, "result", None) in (0x01, 0x02):
            rejected.append(primitive)

    handlers = [(pynetdicom.evt.EVT_ACSE_RECV, on_acse_recv)]
    with _Capture() as capture:
        try:
            assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=handlers)
        except OSError as exc:  # the host name does not resolve (socket.gaierror)
            why = exc.strerror or str(exc) or type(exc).__name__
            raise UserError(f"{where}: cannot connect to {host}: {why}") from None
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "association rejected"
            if rejected:
                p = rejected[0]
                why += f" ({p.result_str}, {p.source_str}: {p.reason_str})"
        elif capture.reason():
            why = str(capture.reason())
        elif assoc.is_aborted:
            why = "association aborted"
        else:
            why = "association failed"
        raise UserError(f"{where}: {why}")

    results: list[tuple[Any, int]] = []
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for given, _, sop_class, _ in files:
            if sop_class not in accepted:
                raise UserError(
                    f"{given}: {where} accepts no presentation context for SOP class "
                    f"{sop_class}; nothing was sent"
                )
        for given, ds, _, _ in files:
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError) as exc:
                raise UserError(f"{given}: {where}: cannot send ({exc})") from None
            code = int(status.get("Status", -1)) if status else -1
            done = f"{len(results)} of {len(files)} files stored before it"
            if code == -1:
                why = "association aborted" if assoc.is_aborted else "no response (timeout)"
                raise UserError(f"{given}: {where}: C-STORE failed ({why}; {done})")
            if code not in (0x0000, 0x0001) and code >> 12 != 0xB:
                raise UserError(
                    f"{given}: {where}: C-STORE failed with status 0x{code:04X} ({done})"
                )
            results.append((given, code))
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    assoc.release()
    return results
