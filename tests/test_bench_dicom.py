"""``bench/dicom_throughput.py``: `run` over JPEG DICOM vs PNG, run small with a tiny model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydicom", reason="the dicom extra is needed to write JPEG DICOM")
pytest.importorskip("skimage", reason="the photographs are skimage.data.retina()")
dicom_throughput = pytest.importorskip(
    "dicom_throughput", reason="bench/dicom_throughput.py is missing"
)


def test_quick_run_writes_both_formats_and_ratios(tmp_path):
    from test_backends import make_onnx_model

    model = make_onnx_model(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    rc = dicom_throughput.main(
        ["--model", str(model), "--quick", "--n", "2", "--repeats", "1", "--out", str(out)]
    )
    assert rc == 0
    rec = json.loads((out / "result.json").read_text())
    assert set(rec["formats"]) == {"png", "dicom"}
    for f in ("png", "dicom"):
        row = rec["formats"][f]
        assert row["frames_processed"] == 2 and row["frames_read_decode_only"] == 2
        assert row["file_mb"] > 0 and row["decode_ms_per_frame"] > 0 and row["fps"] > 0
        assert {"preprocess", "infer", "postprocess"} <= set(row["stage_ms"])
    ra = rec["ratios"]
    png, dcm = rec["formats"]["png"], rec["formats"]["dicom"]
    assert ra["fps_dicom_over_png"] == pytest.approx(dcm["fps"] / png["fps"], rel=1e-2)
    assert ra["decode_ms_dicom_over_png"] == pytest.approx(
        dcm["decode_ms_per_frame"] / png["decode_ms_per_frame"], rel=1e-2
    )
    assert rec["pass"] == (ra["fps_png_over_dicom"] <= 1.2)
    assert rec["config"]["size"] == list(dicom_throughput.QUICK_SIZE)
    assert rec["device"]["cores"] >= 1 and "pydicom" in rec["device"]["packages"]
    assert rec["decoders"]["ms"]
    text = (out / "README.md").read_text()
    assert "JPEG DICOM" in text and "Verdict" in text and "--quick" in text

    # Against an earlier result: kept beside the new one, compared in the README.
    out2 = tmp_path / "out2"
    args = ["--model", str(model), "--quick", "--n", "1", "--repeats", "1", "--out", str(out2)]
    assert dicom_throughput.main([*args, "--baseline", str(out / "result.json")]) == 0
    rec2 = json.loads((out2 / "result.json").read_text())
    assert rec2["baseline"]["ratios"] == ra
    assert json.loads((out2 / "baseline.json").read_text()) == rec
    assert "Against an earlier result" in (out2 / "README.md").read_text()


def test_missing_default_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dicom_throughput, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    with pytest.raises(SystemExit) as exc:
        dicom_throughput.main(["--quick", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "make demo" in capsys.readouterr().err
