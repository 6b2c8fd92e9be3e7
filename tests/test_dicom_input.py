"""DICOM in: every transfer syntax the suite can write, pydicom's own test files, bad objects,
and ``run`` over a nested DICOM archive (records, CSV, names, ``--anonymise``, collisions)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_backends import make_metadata, make_onnx_model
from test_runtime import FakeBackend
from typer.testing import CliRunner

import fundus_edge.cli.cmd_run  # noqa: F401  (registers `run`)
from fundus_edge.cli.app import app
from fundus_edge.errors import DataError, MissingDependencyError
from fundus_edge.runtime import Predictor, RunConfig, open_source, run

pydicom = pytest.importorskip("pydicom", reason="the dicom extra provides pydicom")
from fundus_edge.data.readers.dicom import (  # noqa: E402
    WRITE_SYNTAXES,
    iter_frames,
    read_dicom,
    read_info,
    write_photo,
)

runner = CliRunner()
TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    return make_onnx_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test fundus")
    return cv2.resize(skdata.retina(), (160, 160), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("syntax", WRITE_SYNTAXES)
def test_every_transfer_syntax_reads_back(tmp_path, photo, syntax):
    path = write_photo(tmp_path / f"{syntax}.dcm", photo, syntax=syntax, eye="L")
    image, info = read_dicom(path)
    assert image.shape == photo.shape and image.dtype == np.uint8
    err = np.abs(image.astype(int) - photo)
    if syntax == "jpeg":
        assert err.mean() < 4  # lossy, YBR_FULL_422 in the file, RGB out
    elif syntax == "ybr":
        assert err.max() <= 2  # YCbCr rounding
    else:
        assert err.max() == 0
    assert info.eye == "L" and info.modality == "OP" and info.patient_id == "PAT001"
    assert info.acquired == "2026-11-30T09:41:12"
    assert "patient_name" not in info.record()  # names never reach a record


@pytest.mark.parametrize("syntax", ["rle", "jpeg", "explicit"])
def test_multi_frame_every_frame(tmp_path, photo, syntax):
    frames = [photo, photo[::-1].copy(), photo[:, ::-1].copy()]
    info, it = iter_frames(write_photo(tmp_path / "m.dcm", frames, syntax=syntax))
    got = list(it)
    assert info.frames == 3 and len(got) == 3
    for g, f in zip(got, frames, strict=True):
        assert np.abs(g.astype(int) - f).mean() < 4


@pytest.mark.parametrize(
    ("name", "frames", "shape"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", 1, (100, 100, 3)),
        ("SC_rgb_jpeg_gdcm.dcm", 1, (100, 100, 3)),
        ("SC_rgb_rle_2frame.dcm", 2, (100, 100, 3)),
        ("SC_rgb_rle_16bit.dcm", 1, (100, 100, 3)),  # 16 bits stored: scaled to 8
        ("SC_ybr_full_422_uncompressed.dcm", 1, (100, 100, 3)),
        ("SC_rgb_jls_lossy_line.dcm", 1, (100, 100, 3)),
        ("examples_jpeg2k.dcm", 1, (480, 640, 3)),
        ("examples_rgb_color.dcm", 1, (240, 320, 3)),
    ],
)
def test_pydicom_test_files(name, frames, shape):
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    info, it = iter_frames(path)
    got = list(it)
    assert info.frames == frames == len(got)
    assert all(g.shape == shape and g.dtype == np.uint8 for g in got)
    if name.startswith("SC_rgb"):
        # pydicom's SC_rgb set: red, green, blue, ... bands from top to bottom.
        top = got[0][5, 50]
        assert top[0] > 200 and top[1] < 60 and top[2] < 60, top


def test_colour_conversions_agree(tmp_path):
    """The same picture stored as RGB, YBR_FULL_422 JPEG and uncompressed YBR reads alike."""
    ref = np.asarray(iter_frames(TEST_FILES / "SC_rgb_dcmtk_+eb+cr.dcm")[1].__next__(), int)
    for other in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        got = np.asarray(next(iter_frames(TEST_FILES / other)[1]), int)
        assert np.abs(got - ref).mean() < 6, other


def test_bad_objects_one_line_each(tmp_path, photo, monkeypatch):
    not_dicom = tmp_path / "not.dcm"
    not_dicom.write_bytes(b"hello, I am a text file" * 20)
    with pytest.raises(DataError, match=r"not\.dcm: not a DICOM file"):
        read_dicom(not_dicom)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_dicom(empty)
    good = write_photo(tmp_path / "good.dcm", photo, syntax="explicit")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated\.dcm: "):
        read_dicom(truncated)
    with pytest.raises(DataError, match="without pixel data"):
        read_dicom(TEST_FILES / "rtplan.dcm")
    with pytest.raises(DataError, match="signed pixel data"):
        read_dicom(TEST_FILES / "CT_small.dcm")
    # An unknown transfer syntax (MPEG-2 video has no pixel decoder).
    ds = pydicom.dcmread(good)
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    odd = tmp_path / "mpeg.dcm"
    ds.save_as(odd, enforce_file_format=False)
    with pytest.raises(DataError, match="unsupported transfer syntax"):
        read_dicom(odd)
    # A compressed object whose plugin is missing: exit 3 naming the extra.
    jpeg = write_photo(tmp_path / "j.dcm", photo, syntax="jpeg")

    class Unavailable:
        is_available = False

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Unavailable())
    with pytest.raises(MissingDependencyError, match=r"fundus-edge\[dicom\]") as exc:
        read_dicom(jpeg)
    assert exc.value.exit_code == 3


def test_sixteen_bit_monochrome_is_converted(tmp_path):
    ds = pydicom.dcmread(write_photo(tmp_path / "x.dcm", np.zeros((8, 8, 3), np.uint8)))
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64).astype(np.uint16)  # 12 bits
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    del ds.PlanarConfiguration
    ds.PixelData = grey.tobytes()
    ds.save_as(tmp_path / "mono.dcm", enforce_file_format=True)
    image, _ = read_dicom(tmp_path / "mono.dcm")
    assert image.shape == (8, 8, 3) and (image[..., 0] == image[..., 2]).all()
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == round(63 * 64 * 255 / 4095)


# ------------------------------------------------------------------------------------------------
# run over an archive
# ------------------------------------------------------------------------------------------------


def make_archive(root: Path, photo: np.ndarray) -> dict[str, Path]:
    """Two patients, both eyes, one photograph without laterality, a multi-frame object, a
    suffix-less file, stills beside them and a corrupt .dcm."""
    from pydicom.uid import generate_uid

    s1, s2 = generate_uid(), generate_uid()
    dark = (photo // 20).astype(np.uint8)
    files = {
        "p1r": write_photo(root / "PAT001/st1/se1/right.dcm", photo, syntax="jpeg", eye="R",
                           study_uid=s1),
        "p1l": write_photo(root / "PAT001/st1/se1/left.dcm", dark, syntax="rle", eye="L",
                           study_uid=s1, laterality_attribute="Laterality"),
        "p2r": write_photo(root / "PAT002/st/1.2.840.99.1", photo, syntax="jpeg-ls", eye="R",
                           patient_id="PAT002", patient_name="Roe^Richard", study_uid=s2),
        "p2m": write_photo(root / "PAT002/st/multi.dcm", [photo, photo[:, ::-1].copy()],
                           syntax="jpeg2000", eye="L", patient_id="PAT002",
                           patient_name="Roe^Richard", study_uid=s2),
        "p2u": write_photo(root / "PAT002/st/nolat.dcm", photo, syntax="explicit",
                           patient_id="PAT002", patient_name="Roe^Richard", study_uid=s2),
    }  # fmt: skip
    (root / "stills").mkdir(parents=True)
    cv2.imwrite(str(root / "stills" / "p9_left.png"), photo[:, :, ::-1])
    (root / "PAT002/st/broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    return files


def test_run_reads_a_nested_dicom_archive(tmp_path, photo):
    root = tmp_path / "archive"
    make_archive(root, photo)
    out = tmp_path / "out"
    cfg = RunConfig(
        model="x", source=str(root), headless=True, jsonl=out / "r.jsonl", save_dir=out / "vis"
    )
    summary = run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    recs = [json.loads(x) for x in (out / "r.jsonl").read_text().splitlines()]
    by_rel = {r["rel"]: r for r in recs}
    assert set(by_rel) == {
        "PAT001/st1/se1/left.dcm",
        "PAT001/st1/se1/right.dcm",
        "PAT002/st/1.2.840.99.1",
        "PAT002/st/multi.dcm#0",
        "PAT002/st/multi.dcm#1",
        "PAT002/st/nolat.dcm",
        "stills/p9_left.png",
    }
    assert [s.item.rsplit("/", 1)[-1] for s in summary.skipped] == ["broken.dcm"]
    right = by_rel["PAT001/st1/se1/right.dcm"]
    assert right["eye"] == "R" and right["dicom"]["patient_id"] == "PAT001"
    assert right["dicom"]["modality"] == "OP" and right["dicom"]["acquired"].startswith("2026")
    assert by_rel["PAT001/st1/se1/left.dcm"]["eye"] == "L"  # from (0020,0060) Laterality
    assert by_rel["PAT002/st/nolat.dcm"]["eye"] is None
    assert (
        by_rel["stills/p9_left.png"]["eye"] == "L" and by_rel["stills/p9_left.png"]["dicom"] is None
    )
    assert not by_rel["PAT001/st1/se1/left.dcm"]["quality"]["passed"]  # the dark one
    text = (out / "r.jsonl").read_text()
    assert "Doe" not in text and "Roe" not in text  # names never in records
    # The CSV: one row per record, patient/eye/probabilities columns.
    with open(out / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["source"] for r in rows] == [r["rel"] for r in recs]
    row = next(r for r in rows if r["source"] == "PAT001/st1/se1/right.dcm")
    assert row["patient"] == "PAT001" and row["eye"] == "R" and row["quality"] == "pass"
    assert float(row["p_DR"]) == pytest.approx(0.8) and "DR" in row["positive"].split(";")
    # One overlay per frame, named after the source path.
    names = sorted(p.relative_to(out / "vis").as_posix() for p in (out / "vis").rglob("*.png"))
    assert "PAT002/st/multi.dcm.frame001.png" in names and len(names) == 7


def test_anonymise_leaves_no_identifier(tmp_path, photo, monkeypatch):
    monkeypatch.setenv("FUNDUS_EDGE_SALT", "test-salt")
    root = tmp_path / "archive"
    make_archive(root, photo)
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        cfg = RunConfig(
            model="x",
            source=str(root),
            headless=True,
            jsonl=out / "r.jsonl",
            save_dir=out / "vis",
            anonymise=True,
        )
        run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
        outs.append(out)
    text = (outs[0] / "r.jsonl").read_text() + (outs[0] / "r.csv").read_text()
    names = " ".join(p.name for p in (outs[0] / "vis").rglob("*"))
    for secret in ("PAT001", "PAT002", "Doe", "Roe", "right.dcm", "multi", "p9_left", "st1"):
        assert secret not in text and secret not in names, secret
    info = read_info(root / "PAT001/st1/se1/right.dcm")
    assert info.study_uid not in text and info.sop_uid not in text
    recs = [json.loads(x) for x in (outs[0] / "r.jsonl").read_text().splitlines()]
    assert all(r["dicom"]["patient_id"].startswith("anon-") for r in recs if r["dicom"])
    assert all(r["dicom"]["study_uid"].startswith("2.25.") for r in recs if r["dicom"])
    # The same salt: the same pseudonyms in another run (visits stay linkable).
    assert (outs[1] / "r.jsonl").read_text().count(recs[0]["dicom"]["patient_id"]) >= 1


def test_case_collisions_are_skipped_not_overwritten(tmp_path, photo, onnx_model):
    root = tmp_path / "scans"
    for sub in ("A", "a"):
        (root / sub).mkdir(parents=True)
        cv2.imwrite(str(root / sub / "1.png"), photo[:, :, ::-1])
    if len(list(root.iterdir())) < 2:
        pytest.skip("this file system ignores letter case")
    src = open_source(str(root))
    assert [p.relative_to(root).as_posix() for p in src.paths] == ["A/1.png"]
    assert "but for letter case" in src.skipped[0].reason and src.skipped[0].item.endswith(
        "a/1.png"
    )
    res = runner.invoke(app, ["run", str(onnx_model), str(root), "--headless", "--strict"])
    assert res.exit_code == 2 and "letter case" in res.output, res.output
