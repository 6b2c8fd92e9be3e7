"""The per-visit screening report: HTML (self-contained, escaped) and PDF (reproducible)."""

from __future__ import annotations

import html
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest

from fundus_edge.errors import MissingDependencyError
from fundus_edge.report.html import render_html
from fundus_edge.report.pdf import render_pdf
from fundus_edge.report.visits import (
    INTENDED_USE,
    NO_FINDING,
    REFER,
    UNGRADABLE,
    ModelInfo,
    Photo,
    Visit,
)

GENERATED = "2026-12-01T10:00:00"
SHA = "ab" * 32


@pytest.fixture(scope="module")
def overlay() -> tuple[bytes, tuple[int, int]]:
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    rgb = skdata.retina()
    small = cv2.resize(rgb, (160, 160), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes(), (160, 160)


@pytest.fixture(scope="module")
def model() -> ModelInfo:
    return ModelInfo(
        name="retina-b0",
        sha256=SHA,
        version="9.9.9",
        labels=["DR", "ARMD", "MH"],
        thresholds={"DR": 0.5, "ARMD": 0.35, "MH": 0.6},
        screening_label="DR",
        created="2026-11-01T08:00:00Z",
    )


def _photo(overlay, rel, eye, *, probs=None, positive=(), passed=True, reason=None, acquired=None):
    jpeg, size = overlay
    record = {
        "image": rel,
        "timestamp": "2026-11-30T09:41:12",
        "quality": {"score": 0.9 if passed else 0.1, "passed": passed, "reason": reason},
        "probabilities": probs,
        "positive": list(positive),
        "screening": None if probs is None else ("DR" in positive),
    }
    dicom = SimpleNamespace(acquired=acquired, eye=eye) if acquired else None
    return Photo(rel=rel, record=record, overlay_jpeg=jpeg, overlay_size=size, eye=eye, dicom=dicom)


@pytest.fixture
def visit(overlay) -> Visit:
    photos = [
        _photo(
            overlay,
            "ann/right.jpg",
            "R",
            probs={"DR": 0.873, "ARMD": 0.42, "MH": 0.01},
            positive=["DR", "ARMD"],
            acquired="2026-11-30T09:41:12",
        ),
        _photo(
            overlay,
            "ann/left.jpg",
            "L",
            probs={"DR": 0.05, "ARMD": 0.02, "MH": 0.01},
        ),
        _photo(overlay, "ann/left-2.jpg", "L", passed=False, reason="blurry"),
        _photo(
            overlay,
            "ann/extra.dcm#2",
            None,
            probs={"DR": 0.1, "ARMD": 0.1, "MH": 0.7},
            positive=["MH"],
        ),
    ]
    return Visit(
        patient_id="P-0042",
        study_uid="1.2.826.0.1.3680043.8.498.12345",
        photos=photos,
        patient_name="Doe^Jane",
        patient_birth_date="1960-02-29",
        patient_sex="F",
        study_date="2026-11-30",
        study_description="Diabetic eye screening",
        accession_number="ACC-77",
    )


def test_visit_fixture_results(visit):
    assert [(e.eye, e.result) for e in visit.eyes()] == [
        ("R", REFER),
        ("L", NO_FINDING),
        (None, NO_FINDING),  # MH over threshold, but DR is the screening label
    ]
    assert visit.result == REFER


def test_html_content(visit, model):
    doc = render_html(visit, model, generated=GENERATED)
    assert doc.startswith("<!DOCTYPE html>")
    assert "Fundus screening report" in doc
    assert f"Patient result: {REFER}" in doc
    for eye in ("right eye (OD)", "left eye (OS)", "eye unknown"):
        assert eye in doc
    assert NO_FINDING in doc  # the left eye's result
    assert "DR: 87.3% (threshold 50.0%)" in doc
    assert "ARMD: 42.0% (threshold 35.0%)" in doc
    assert "MH: 70.0% (threshold 60.0%)" in doc
    assert "no finding over threshold" in doc
    assert "not graded (quality gate)" in doc
    assert "blurry" in doc
    assert "2026-11-30T09:41:12" in doc
    assert "ann/extra.dcm#2" in doc
    assert SHA in doc
    assert "9.9.9" in doc and "2026-11-01T08:00:00Z" in doc
    assert html.escape(INTENDED_USE) in doc
    assert f"Generated {GENERATED}" in doc
    assert doc.count("data:image/jpeg;base64,") == 4
    for external in ("http://", "https://", 'src="//', "<script"):
        assert external not in doc
    assert "@media print" in doc and "page-break-inside: avoid" in doc
    assert "Doe, Jane" in doc and "ACC-77" in doc and "1.2.826.0.1.3680043.8.498.12345" in doc
    # Order: header, banner, eyes (R, L, unknown), model, intended use, footer.
    keys = [
        "P-0042",
        "Patient result",
        "right eye (OD)",
        "left eye (OS)",
        "eye unknown",
        SHA,
        html.escape(INTENDED_USE),
        f"Generated {GENERATED}",
    ]
    positions = [doc.index(k, doc.index("<body>")) for k in keys]
    assert positions == sorted(positions)


def test_html_banner_colours_follow_result(visit, model, overlay):
    assert 'class="banner r-refer"' in render_html(visit, model, generated=GENERATED)
    gated = replace(visit, photos=[visit.photos[2]])
    doc = render_html(gated, model, generated=GENERATED)
    assert gated.result == UNGRADABLE
    assert 'class="banner r-ungradable"' in doc and f"Patient result: {UNGRADABLE}" in doc
    clear = replace(visit, photos=[visit.photos[1]])
    doc = render_html(clear, model, generated=GENERATED)
    assert 'class="banner r-nofinding"' in doc and f"Patient result: {NO_FINDING}" in doc


def test_html_escapes_text(visit, model):
    hostile = replace(visit, patient_name="<script>alert(1)</script>")
    hostile.photos[0].rel = 'a"<b>.jpg'
    doc = render_html(hostile, model, generated=GENERATED)
    assert "<script>" not in doc
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert 'a"<b>' not in doc and "a&quot;&lt;b&gt;.jpg" in doc


def test_html_anonymised_has_no_name_row(visit, model):
    anon = replace(visit, patient_name=None, patient_birth_date=None, patient_sex=None)
    doc = render_html(anon, model, generated=GENERATED)
    assert "<th>Name</th>" not in doc and "<th>Birth date</th>" not in doc
    assert "<th>Sex</th>" not in doc
    assert "<th>Patient ID</th><td>P-0042</td>" in doc
    assert "<th>Name</th><td>Doe, Jane</td>" in render_html(visit, model, generated=GENERATED)


def _pdftotext(pdf: bytes, tmp_path) -> str:
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext not installed (Debian package poppler-utils)")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    out = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True
    )
    return out.stdout


def test_pdf_reproducible(visit, model):
    pytest.importorskip("reportlab")
    first = render_pdf(visit, model, generated=GENERATED)
    assert first.startswith(b"%PDF")
    assert render_pdf(visit, model, generated=GENERATED) == first


def test_pdf_text(visit, model, tmp_path):
    pytest.importorskip("reportlab")
    text = _pdftotext(render_pdf(visit, model, generated=GENERATED), tmp_path)
    flat = " ".join(text.split())
    assert f"Patient result: {REFER}" in flat
    assert "right eye" in flat and "left eye" in flat and "eye unknown" in flat
    assert "DR: 87.3% (threshold 50.0%)" in flat
    assert "not graded (quality gate)" in flat
    assert SHA[:32] in flat.replace(" ", "")
    assert INTENDED_USE[:40] in flat
    assert "P-0042" in flat
    pages = flat.count("page ")
    assert pages >= 1 and "page 1 of " in flat


def test_pdf_unicode_name_never_crashes(visit, model, tmp_path):
    pytest.importorskip("reportlab")
    odd = replace(
        visit,
        patient_id="P-Ω-😀",
        patient_name="山田^太郎 😀 Zoë <b>&",
        study_description="ctrl\x00\x1b chars\tand\ttabs",
    )
    pdf = render_pdf(odd, model, generated=GENERATED)
    assert pdf.startswith(b"%PDF")
    text = _pdftotext(pdf, tmp_path)
    assert "Zoë <b>&" in text  # Vera draws Latin-1; markup characters are text
    assert "Ω" in text  # and Greek
    assert "山" not in text and "😀" not in text  # not in the font: written as "?"


def test_pdf_without_reportlab_names_the_extra(visit, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "reportlab", None)
    with pytest.raises(MissingDependencyError, match=r"fundus-edge\[report\]"):
        render_pdf(visit, model, generated=GENERATED)
