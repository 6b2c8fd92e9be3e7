"""Datasets of DICOM photographs: a labels CSV (and RFMiD) naming ``.dcm`` and unsuffixed files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fundus_edge.cli.cmd_data  # noqa: F401  (registers dataset/prepare on app)
from fundus_edge.cli.app import app
from fundus_edge.data import open_dataset
from fundus_edge.errors import DataError
from fundus_edge.preprocess import read_image
from fundus_edge.synth import generate_image

pydicom = pytest.importorskip("pydicom")

runner = CliRunner()

SIZE = 96
# path (relative to the CSV), DR, MH; the last two are named by their SOP instance UID (no
# suffix; as IDs they differ only after the last dot).
ROWS = [
    ("images/p1_right.dcm", 1, 0),
    ("images/p1_left.dcm", 0, 0),
    ("images/p2_right.dcm", 0, 1),
    ("images/p2_left.dcm", 1, 1),
    ("images/p3_right.DCM", 0, 0),
    ("images/p3_left.dicom", 1, 0),
    ("images/1.2.826.0.1.3680043.8.498.7", 0, 1),
    ("images/1.2.826.0.1.3680043.8.498.8", 1, 1),
]


def write_dicom(path: Path, image: np.ndarray, uid: str) -> None:
    """An uncompressed RGB Secondary Capture object holding ``image`` (H, W, 3) uint8."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = uid + ".1"
    ds.SeriesInstanceUID = uid + ".2"
    ds.Modality = "OP"
    ds.PatientID = "P" + uid[-1]
    ds.Rows, ds.Columns = image.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def fundus(seed: int) -> np.ndarray:
    image, _, _ = generate_image(np.random.default_rng(seed), SIZE, set())
    return image


@pytest.fixture
def dicom_csv(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder: ``labels.csv`` (path, DR, MH) and the eight DICOM photographs it names."""
    root = tmp_path / "dicom_set"
    images = {}
    for k, (rel, _, _) in enumerate(ROWS):
        images[rel] = fundus(k)
        write_dicom(root / rel, images[rel], f"1.2.826.0.1.3680043.8.498.{k + 1}")
    lines = ["path,DR,MH"] + [f"{rel},{dr},{mh}" for rel, dr, mh in ROWS]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root, images


def test_csv_of_dicom_files_reads_every_row(dicom_csv):
    root, images = dicom_csv
    ds = open_dataset(root, check_images=True)
    assert ds.format == "csv" and ds.problems == []
    assert ds.label_names == ["DR", "MH"]
    samples = {s.path.relative_to(root).as_posix(): s for s in ds.samples()}
    assert sorted(samples) == sorted(rel for rel, _, _ in ROWS)
    for rel, dr, mh in ROWS:
        assert samples[rel].labels.tolist() == [dr, mh]
        np.testing.assert_array_equal(read_image(samples[rel].path), images[rel])
    assert samples[ROWS[-1][0]].id == ROWS[-1][0]  # a UID's last component is not a suffix
    assert samples["images/p1_right.dcm"].id == "images/p1_right"


def test_dataset_cli_on_dicom_folder(dicom_csv, tmp_path):
    root, _ = dicom_csv
    report = tmp_path / "report.json"
    res = runner.invoke(app, ["dataset", str(root), "--check-images", "--json", str(report)])
    assert res.exit_code == 0, res.output
    assert "no problems found" in res.output
    summary = json.loads(report.read_text())
    assert summary["format"] == "csv"
    assert sum(s["images"] for s in summary["splits"].values()) == len(ROWS)
    assert summary["problems"] == []


def test_dcm_that_is_not_dicom_is_an_unreadable_image(dicom_csv):
    root, _ = dicom_csv
    fake = root / "images" / "p4_right.dcm"
    fake.write_bytes(b"not a DICOM file, only a name\n" * 20)
    with open(root / "labels.csv", "a") as fh:
        fh.write("images/p4_right.dcm,1,0\n")
    ds = open_dataset(root, check_images=True)
    assert [p.kind for p in ds.problems] == ["unreadable_image"]
    problem = ds.problems[0]
    assert problem.file == str(fake)
    assert "listed at line 10 of labels.csv" in problem.message and "DICOM" in problem.message
    assert len(ds.samples()) == len(ROWS)

    res = runner.invoke(app, ["dataset", str(root), "--check-images"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # rich wraps lines at the terminal's width
    assert "1 unreadable_image" in out and "p4_right.dcm" in out
    with pytest.raises(DataError, match=r"p4_right\.dcm"):
        open_dataset(root, check_images=True, strict=True)


def test_rfmid_ids_find_dcm_and_unsuffixed_dicom(tmp_path):
    root = tmp_path / "rfmid"
    folder = root / "Training_Set" / "Training"
    write_dicom(folder / "1.dcm", fundus(1), "1.2.3.1")
    write_dicom(folder / "2", fundus(2), "1.2.3.2")  # named by the ID alone
    (folder / "3").write_text("an unsuffixed file that is not DICOM\n")
    labels = root / "Training_Set" / "RFMiD_Training_Labels.csv"
    labels.write_text("ID,Disease_Risk,DR\n1,1,1\n2,0,0\n3,1,0\n")
    ds = open_dataset(root, check_images=True)
    assert ds.format == "rfmid"
    assert {s.id: s.path.name for s in ds.samples()} == {"1": "1.dcm", "2": "2"}
    assert [(p.kind, p.row) for p in ds.problems] == [("missing_image", 4)]


def test_unlabelled_dcm_beside_labelled_ones_is_an_orphan(dicom_csv):
    root, _ = dicom_csv
    write_dicom(root / "images" / "p9_left.dcm", fundus(9), "1.2.826.0.1.3680043.8.498.99")
    ds = open_dataset(root)
    assert [(p.kind, Path(p.file).name) for p in ds.problems] == [("orphan_image", "p9_left.dcm")]


def test_calibration_folder_of_dicom_files(dicom_csv, tmp_path):
    from fundus_edge.convert.calibration import load_images
    from fundus_edge.preprocess import PreprocessConfig

    root, _ = dicom_csv
    pre = PreprocessConfig(size=64)
    labelled = load_images(root, pre, 8)  # a dataset: its images, with labels
    assert labelled.images.shape == (7, 64, 64, 3) and labelled.labels.shape == (7, 2)
    plain = tmp_path / "calib"
    plain.mkdir()
    for rel, _, _ in ROWS:  # no labels file: every still, DICOM without suffix included
        (plain / Path(rel).name).write_bytes((root / rel).read_bytes())
    (plain / "notes").write_text("not an image\n")
    found = load_images(plain, pre, 20)
    assert found.images.shape == (len(ROWS), 64, 64, 3) and found.labels is None


def test_prepare_keeps_dicom_as_dicom(dicom_csv, tmp_path):
    """prepare writes a DICOM image as DICOM at the same path (the labels still match): the
    source's header with the prepared pixels; the prepared folder opens as a dataset."""
    from fundus_edge.prepare import prepare_dataset
    from fundus_edge.preprocess import PreprocessConfig

    root, _ = dicom_csv
    dst = tmp_path / "prepared"
    result = prepare_dataset(root, dst, PreprocessConfig(size=64), workers=1, show_progress=False)
    assert result.failures == [] and result.processed == len(ROWS)
    out = dst / "images" / "p1_right.dcm"
    ds = pydicom.dcmread(out)
    assert ds.PatientID == "P1" and (ds.Rows, ds.Columns) == (64, 64)
    assert ds.DerivationDescription.startswith("fundus-edge prepare")
    assert read_image(dst / ROWS[-1][0]).shape == (64, 64, 3)  # the unsuffixed one too
    again = open_dataset(dst, check_images=True)
    assert again.problems == [] and len(list(again.samples())) == len(ROWS)
