"""``run --report`` / ``fundus-edge report``: a DICOM archive and stills in, one report per
visit out (HTML, PDF, DICOM Encapsulated PDF + Secondary Captures), checked by dciodvfy and
pdftotext, stored to a PACS over C-STORE, and nothing identifying under ``--anonymise``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_backends import make_metadata, make_onnx_model
from test_dicom_input import make_archive
from test_report_dicom import _dciodvfy, scp  # noqa: F401  (a fixture)
from test_runtime import FakeBackend
from typer.testing import CliRunner

import fundus_edge.cli.cmd_report  # noqa: F401  (registers `report`)
from fundus_edge.cli.app import app
from fundus_edge.report.visits import (
    NO_FINDING,
    REFER,
    UNGRADABLE,
    Photo,
    eye_from_name,
    group_visits,
)
from fundus_edge.runtime import Predictor, RunConfig, run

pydicom = pytest.importorskip("pydicom", reason="the dicom extra provides pydicom")
pytest.importorskip("reportlab", reason="the report extra provides reportlab")
runner = CliRunner()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test fundus")
    return cv2.resize(skdata.retina(), (160, 160), interpolation=cv2.INTER_AREA)


def pdftotext(path: Path) -> str:
    exe = shutil.which("pdftotext")
    if exe is None:
        pytest.skip("pdftotext not installed (Debian package poppler-utils)")
    return subprocess.run([exe, str(path), "-"], capture_output=True, text=True, check=True).stdout


def _photo(rel, eye, passed=True, positive=("DR",), screening=None) -> Photo:
    record = {
        "quality": {"passed": passed, "reason": "ok" if passed else "blurry"},
        "probabilities": {"DR": 0.9} if passed else None,
        "positive": list(positive) if passed else [],
        "screening": screening,
    }
    return Photo(rel, record, b"", (1, 1), eye=eye)


def test_decision_per_eye_and_patient():
    # Refer when either eye is screening-positive, even with the other ungradable.
    (v,) = group_visits([_photo("p/a.jpg", "R"), _photo("p/b.jpg", "L", passed=False)])
    assert [(e.eye, e.result) for e in v.eyes()] == [("R", REFER), ("L", UNGRADABLE)]
    assert v.result == REFER
    # Ungradable when an eye has no gradable photograph and nothing is positive.
    (v,) = group_visits([_photo("q/a.jpg", "R", positive=()), _photo("q/b.jpg", "L", passed=False)])
    assert v.result == UNGRADABLE
    # A second, gradable photograph of the same eye makes it gradable.
    (v,) = group_visits(
        [
            _photo("r/a.jpg", "R", positive=()),
            _photo("r/b.jpg", "L", passed=False),
            _photo("r/c.jpg", "L", positive=()),
        ]
    )
    assert v.result == NO_FINDING
    # The screening label decides when the model has one (a finding alone does not refer).
    (v,) = group_visits([_photo("s/a.jpg", "R", screening=False)])
    assert v.result == NO_FINDING
    # Stills: one visit per folder.
    assert len(group_visits([_photo("a/1.jpg", "R"), _photo("b/1.jpg", "R")])) == 2


@pytest.mark.parametrize(
    ("name", "eye"),
    [("p12_left.jpg", "L"), ("scan-OD.png", "R"), ("x/os.png", "L"), ("right left.png", None),
     ("leftover.png", None), ("1.png", None)],
)  # fmt: skip
def test_eye_from_name(name, eye):
    assert eye_from_name(name) == eye


def run_report(root: Path, out: Path, **kw):
    cfg = RunConfig(model="x", source=str(root), headless=True, report=out, **kw)
    return run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)


def test_report_folder_from_a_dicom_archive(tmp_path, photo):
    root = tmp_path / "archive"
    make_archive(root, photo)
    out = tmp_path / "rep"
    summary = run_report(root, out)
    assert any("3 visit report(s), 7 photograph(s)" in o for o in summary.outputs)
    visits = sorted(p.name for p in (out / "visits").iterdir())
    assert visits[0].startswith("PAT001_20261130_") and visits[2] == "stills"
    p1 = out / "visits" / visits[0]
    html = (p1 / "report.html").read_text()
    assert "Patient result: refer" in html and "ungradable, retake" in html
    assert "Doe" in html and "https://" not in html and "http://" not in html
    text = pdftotext(p1 / "report.pdf")
    assert "refer" in text and "right eye" in text and "Research tool, not a medical device" in text
    # DICOM outputs for DICOM visits, filed under the patient's study; none for stills.
    src = pydicom.dcmread(root / "PAT001/st1/se1/right.dcm")
    files = [p1 / "report.dcm", *sorted((p1 / "overlays").glob("*.dcm"))]
    assert len(files) == 3
    for f in files:
        _dciodvfy(f)
        ds = pydicom.dcmread(f)
        assert ds.PatientID == "PAT001" and ds.StudyInstanceUID == src.StudyInstanceUID
    assert pydicom.dcmread(files[0]).EncapsulatedDocument[:5] == b"%PDF-"
    assert not list((out / "visits" / "stills").glob("*.dcm"))
    # The report folder keeps the run's records: JSONL, CSV, photographs.
    assert len((out / "results.jsonl").read_text().splitlines()) == 7
    assert len((out / "results.csv").read_text().splitlines()) == 8
    assert json.loads((out / "model.json").read_text())["labels"] == make_metadata()["label_names"]


def test_report_anonymised_has_no_identifier(tmp_path, photo, monkeypatch):
    monkeypatch.setenv("FUNDUS_EDGE_SALT", "another-salt")
    root = tmp_path / "archive"
    make_archive(root, photo)
    out = tmp_path / "rep"
    run_report(root, out, anonymise=True)
    # Long enough not to turn up by chance in compressed PDF streams.
    secrets = [b"PAT001", b"PAT002", b"Doe^Jane", b"Roe^Richard", b"Richard", b"right.dcm"]
    secrets += [b"p9_left", b"19600101"]
    src = pydicom.dcmread(root / "PAT001/st1/se1/right.dcm")
    secrets += [src.StudyInstanceUID.encode(), src.SOPInstanceUID.encode()]
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for s in secrets:
                assert s not in data and s.decode() not in f.as_posix(), (f, s)
    for pdf in out.rglob("*.pdf"):
        text = pdftotext(pdf)
        assert "Doe" not in text and "Roe" not in text and "PAT00" not in text
    for dcm in out.rglob("*.dcm"):
        _dciodvfy(dcm)


def test_report_command_sends_to_a_pacs(tmp_path, photo, scp):  # noqa: F811
    port, received, _ = scp
    root = tmp_path / "archive"
    make_archive(root, photo)
    shutil.rmtree(root / "stills")
    model = make_onnx_model(tmp_path / "m.onnx")
    out = tmp_path / "rep"
    res = runner.invoke(
        app,
        [
            "report",
            str(model),
            str(root),
            "--out",
            str(out),
            "--send",
            f"TEST_PACS@127.0.0.1:{port}",
        ],
    )
    assert res.exit_code == 0, res.output
    sent = json.loads((out / "sent.json").read_text())
    files = [f["file"] for f in sent[0]["files"]]
    assert len(files) == len(received) == 2 + 2 + 4  # per visit: report + one SC per photograph
    assert sorted(received) == sorted(str(pydicom.dcmread(out / f).SOPInstanceUID) for f in files)
    assert "sent to TEST_PACS@127.0.0.1" in res.output


def test_report_bad_options_before_any_work(tmp_path, photo):
    model = make_onnx_model(tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), photo[:, :, ::-1])
    res = runner.invoke(
        app, ["report", str(model), str(tmp_path / "imgs"), "--out", str(tmp_path / "r"),
              "--send", "nohost"],
    )  # fmt: skip
    assert (
        res.exit_code == 2 and "--send" in res.output and not (tmp_path / "r" / "visits").exists()
    )
    res = runner.invoke(
        app, ["run", str(model), str(tmp_path / "imgs"), "--headless", "--send", "A@h:1"]
    )
    assert res.exit_code == 2 and "give --report DIR too" in res.output


def test_report_folder_is_never_mixed_with_an_earlier_run(tmp_path, photo):
    root = tmp_path / "archive"
    make_archive(root, photo)
    out = tmp_path / "rep"
    run_report(root, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(Exception, match="holds an earlier run's report"):
        run_report(root, out)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
