"""The report's DICOM outputs (Encapsulated PDF, Secondary Capture overlays) and C-STORE.

Every written file is checked with dciodvfy (Debian's dicom3tools) when it is installed.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
cv2 = pytest.importorskip("cv2")

from fundus_edge.data.anonymise import Pseudonymiser  # noqa: E402
from fundus_edge.data.readers.dicom import read_info  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.report import dicom_out  # noqa: E402
from fundus_edge.report.visits import ModelInfo, Photo, group_visits  # noqa: E402

OP_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
WHEN = datetime(2026, 11, 30, 9, 41, 12, tzinfo=timezone.utc)
# A minimal, well-formed PDF (one empty page) with an odd byte count, to exercise the padding.
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)
if len(PDF) % 2 == 0:
    PDF += b" "


def _model() -> ModelInfo:
    return ModelInfo(
        name="fundus-ensemble-v1",
        sha256="ab" * 32,
        version="0.9.0",
        labels=["DR", "AMD"],
        thresholds={"DR": 0.5, "AMD": 0.5},
        screening_label="DR",
    )


def _source(path: Path, eye: str, sop_uid: str) -> Path:
    """A small Ophthalmic Photography source file (only what the reader needs)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OP_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = OP_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "PAT-0042"
    ds.PatientBirthDate = "19580214"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.100"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.101"
    ds.StudyDate = "20261130"
    ds.StudyTime = "093000"
    ds.AccessionNumber = "ACC778"
    ds.Modality = "OP"
    ds.ImageLaterality = eye
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((8, 8, 3), 90, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _overlay(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((96, 130, 3), np.uint8)
    cv2.circle(img, (65, 48), 40, (40, 80, 160), -1)
    img[rng.integers(0, 96, 50), rng.integers(0, 130, 50)] = (0, 255, 255)
    cv2.putText(img, "DR 0.91", (5, 90), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _photos(tmp_path: Path, anonymise: bool = False) -> list[Photo]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    photos = []
    for i, eye in enumerate(("R", "L")):
        info = read_info(_source(src / f"{eye}.dcm", eye, f"1.2.826.0.1.3680043.8.498.10{i + 2}"))
        rel = f"{eye}.dcm"
        if anonymise:
            anon = Pseudonymiser(salt=b"test-salt")
            info, rel = anon.info(info), anon.path(rel)
        record = {
            "quality": {"passed": True},
            "probabilities": {"DR": 0.91 - 0.5 * i, "AMD": 0.1},
            "positive": ["DR"] if i == 0 else [],
        }
        jpeg = _overlay(i)
        photos.append(Photo(rel, record, jpeg, (130, 96), eye=info.eye, dicom=info))
    return photos


def _dciodvfy(path: Path) -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if "Error" in line]
    assert not errors, f"{path.name}:\n{text}"
    return text


def _write_all(visit, out: Path) -> tuple[Path, list[Path]]:
    model = _model()
    report = dicom_out.write_dataset(
        dicom_out.encapsulated_pdf(visit, PDF, model, series_uid=dicom_out._new_uid(), when=WHEN),
        out / "report.dcm",
    )
    series = dicom_out._new_uid()
    scs = [
        dicom_out.write_dataset(
            dicom_out.secondary_capture(visit, p, model, series_uid=series, instance=i + 1),
            out / f"overlay_{i + 1}.dcm",
        )
        for i, p in enumerate(visit.photos)
    ]
    return report, scs


def test_encapsulated_pdf_and_overlays_are_valid_and_filed_under_the_patient(tmp_path):
    (visit,) = group_visits(_photos(tmp_path))
    out = tmp_path / "out"
    report, scs = _write_all(visit, out)
    assert sorted(p.name for p in out.iterdir()) == ["overlay_1.dcm", "overlay_2.dcm", "report.dcm"]

    for path in (report, *scs):
        _dciodvfy(path)

    ds = pydicom.dcmread(report)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == dicom_out.ENCAPSULATED_PDF_STORAGE
    assert ds.PatientID == visit.patient_id == "PAT-0042"
    assert str(ds.PatientName) == "Müller^Anna"
    assert ds.StudyInstanceUID == visit.study_uid
    assert ds.AccessionNumber == "ACC778"
    assert ds.StudyDate == "20261130"
    assert ds.Modality == "DOC"
    assert ds.SoftwareVersions == "0.9.0"
    assert ds.ManufacturerModelName == "fundus-ensemble-v1"
    assert ds.ContentDate == "20261130" and ds.ContentTime == "094112"
    assert ds.EncapsulatedDocumentLength == len(PDF)
    assert bytes(ds.EncapsulatedDocument)[: len(PDF)] == PDF
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    refs = {r.ReferencedSOPInstanceUID for r in ds.SourceInstanceSequence}
    assert refs == {p.dicom.sop_uid for p in visit.photos}

    uids = {ds.SOPInstanceUID}
    for photo, path in zip(visit.photos, scs, strict=True):
        sc = pydicom.dcmread(path)
        uids.add(sc.SOPInstanceUID)
        assert sc.SOPClassUID == dicom_out.SECONDARY_CAPTURE_STORAGE
        assert sc.PatientID == visit.patient_id
        assert sc.StudyInstanceUID == visit.study_uid
        assert sc.SeriesDescription == "fundus-edge overlays"
        assert sc.ConversionType == "WSD" and sc.BurnedInAnnotation == "YES"
        assert sc.ImageLaterality == photo.eye
        assert "fundus-ensemble-v1" in sc.DerivationDescription
        src = sc.SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == photo.dicom.sop_uid
        assert src.ReferencedSOPClassUID == OP_STORAGE
        assert (sc.PhotometricInterpretation, sc.PlanarConfiguration) == ("RGB", 0)
        overlay = cv2.imdecode(np.frombuffer(photo.overlay_jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(sc.pixel_array, overlay[:, :, ::-1])
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in scs}) == 1
    assert len(uids) == 3


def test_anonymised_visit_is_still_valid(tmp_path):
    (visit,) = group_visits(_photos(tmp_path, anonymise=True))
    assert visit.patient_name is None and visit.patient_id.startswith("anon-")
    assert visit.study_uid.startswith("2.25.")
    report, scs = _write_all(visit, tmp_path / "out")
    for path in (report, *scs):
        _dciodvfy(path)
        ds = pydicom.dcmread(path)
        assert ds.PatientID == visit.patient_id
        assert ds.PatientName == ""
        assert "PatientName" in ds  # type 2: present, empty
        assert ds.StudyInstanceUID == visit.study_uid
        assert "Müller" not in path.read_bytes().decode("latin-1")


def test_stills_visit_gets_one_new_study_and_unknown_eye(tmp_path):
    photo = Photo("clinic/a.jpg", {}, _overlay(5), (130, 96))
    (visit,) = group_visits([photo])
    assert visit.study_uid is None
    report, (sc,) = _write_all(visit, tmp_path / "out")
    for path in (report, sc):
        _dciodvfy(path)
    a, b = pydicom.dcmread(report), pydicom.dcmread(sc)
    assert a.StudyInstanceUID == b.StudyInstanceUID == dicom_out.study_uid(visit)
    assert a.StudyInstanceUID.startswith("2.25.")
    assert "SourceInstanceSequence" not in a and "SourceImageSequence" not in b
    assert "ImageLaterality" not in b and b.Laterality == ""
    other = dataclasses.replace(visit, photos=[Photo("clinic/a.jpg", {}, _overlay(6), (130, 96))])
    assert dicom_out.study_uid(other) != dicom_out.study_uid(visit)


def test_not_a_pdf_is_refused(tmp_path):
    (visit,) = group_visits(_photos(tmp_path))
    with pytest.raises(UserError, match="not a PDF"):
        dicom_out.encapsulated_pdf(visit, b"<html>", _model(), series_uid="1.2.3")


def test_write_is_atomic(tmp_path, monkeypatch):
    (visit,) = group_visits(_photos(tmp_path))
    ds = dicom_out.encapsulated_pdf(visit, PDF, _model(), series_uid="1.2.3.4")
    target = tmp_path / "out" / "report.dcm"
    dicom_out.write_dataset(ds, target)
    before = target.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pydicom.Dataset, "save_as", boom)
    with pytest.raises(RuntimeError):
        dicom_out.write_dataset(ds, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["report.dcm"]


# --------------------------------------------------------------------------------------------
# C-STORE


@pytest.fixture
def scp():
    """A storage SCP on 127.0.0.1 (a free port): yields (port, received, status box)."""
    pynetdicom = pytest.importorskip("pynetdicom")
    from pynetdicom import evt
    from pynetdicom.sop_class import EncapsulatedPDFStorage, SecondaryCaptureImageStorage

    received: list[str] = []
    reply = {"status": 0x0000}

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return reply["status"]

    ae = pynetdicom.AE(ae_title="TEST_PACS")
    ae.require_called_aet = True
    for sop_class in (EncapsulatedPDFStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield server.server_address[1], received, reply
    finally:
        server.shutdown()


def test_send_stores_each_file_once(tmp_path, scp):
    port, received, _ = scp
    (visit,) = group_visits(_photos(tmp_path))
    report, scs = _write_all(visit, tmp_path / "out")
    files = [report, *scs, report]  # a path given twice is sent once
    results = dicom_out.send(files, f"TEST_PACS@127.0.0.1:{port}", timeout=10)
    assert [p for p, _ in results] == [report, *scs]
    assert all(status == 0 for _, status in results)
    sent = [pydicom.dcmread(p).SOPInstanceUID for p in (report, *scs)]
    assert sorted(received) == sorted(sent)
    assert len(received) == len(set(received)) == 3


def test_send_failure_status_names_file_and_status(tmp_path, scp):
    port, _, reply = scp
    reply["status"] = 0xA700  # out of resources
    (visit,) = group_visits(_photos(tmp_path))
    report, _ = _write_all(visit, tmp_path / "out")
    with pytest.raises(UserError) as err:
        dicom_out.send([report], f"TEST_PACS@127.0.0.1:{port}", timeout=10)
    assert "report.dcm" in str(err.value) and "0xA700" in str(err.value)


def test_send_rejected_names_target(tmp_path, scp):
    port, received, _ = scp
    (visit,) = group_visits(_photos(tmp_path))
    report, _ = _write_all(visit, tmp_path / "out")
    target = f"WRONG_AE@127.0.0.1:{port}"
    with pytest.raises(UserError) as err:
        dicom_out.send([report], target, timeout=10)
    msg = str(err.value)
    assert target in msg and "rejected" in msg and "\n" not in msg
    assert received == []


def test_send_connection_refused_is_quick_and_names_target(tmp_path):
    pytest.importorskip("pynetdicom")
    (visit,) = group_visits(_photos(tmp_path))
    report, _ = _write_all(visit, tmp_path / "out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"PACS@127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        dicom_out.send([report], target, timeout=5)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert target in msg and "connect" in msg and "\n" not in msg


def test_send_silent_peer_times_out(tmp_path):
    pytest.importorskip("pynetdicom")
    (visit,) = group_visits(_photos(tmp_path))
    report, _ = _write_all(visit, tmp_path / "out")
    with socket.socket() as s:  # listens, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        target = f"PACS@127.0.0.1:{s.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(UserError) as err:
            dicom_out.send([report], target, timeout=1)
        assert time.monotonic() - start < 10
    assert target in str(err.value) and "timeout" in str(err.value)


def test_send_unsupported_sop_class_sends_nothing(tmp_path):
    pynetdicom = pytest.importorskip("pynetdicom")
    from pynetdicom import evt
    from pynetdicom.sop_class import EncapsulatedPDFStorage

    received = []
    ae = pynetdicom.AE(ae_title="PDF_ONLY")
    ae.add_supported_context(EncapsulatedPDFStorage)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(1) or 0x0000)],
    )
    try:
        (visit,) = group_visits(_photos(tmp_path))
        report, scs = _write_all(visit, tmp_path / "out")
        target = f"PDF_ONLY@127.0.0.1:{server.server_address[1]}"
        with pytest.raises(UserError) as err:
            dicom_out.send([report, *scs], target, timeout=10)
        assert "overlay_1.dcm" in str(err.value) and "1.2.840.10008.5.1.4.1.1.7" in str(err.value)
        with pytest.raises(UserError, match="accepted none"):
            dicom_out.send(scs, target, timeout=10)
        assert received == []
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "text", ["nohost", "AE@host", "AE@host:0", "AE@host:65536", "A" * 17 + "@host:104", "@host:104"]
)
def test_bad_targets(text):
    with pytest.raises(UserError) as err:
        dicom_out.parse_target(text)
    assert "--send" in str(err.value) and "AE@HOST:PORT" in str(err.value)


def test_good_targets():
    assert dicom_out.parse_target("PACS@10.0.0.5:104") == ("PACS", "10.0.0.5", 104)
    assert dicom_out.parse_target("ORTHANC@pacs.example.org:4242") == (
        "ORTHANC",
        "pacs.example.org",
        4242,
    )
    assert dicom_out.parse_target("P@[fd00::5]:11112") == ("P", "fd00::5", 11112)
    assert dicom_out.parse_target("A" * 16 + "@h:1")[0] == "A" * 16
