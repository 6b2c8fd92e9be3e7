"""``bench/serve_bench.py``: the live view's benchmark, run small with a tiny model."""

from __future__ import annotations

import json
import statistics

import pytest

pytest.importorskip("uvicorn", reason="the serve extra provides uvicorn")
pytest.importorskip("httpx", reason="httpx is the viewers' client")
pytest.importorskip("skimage", reason="the video is made of skimage.data.retina()")
serve_bench = pytest.importorskip("serve_bench", reason="bench/serve_bench.py is missing")


def test_parsers_take_whole_items_only():
    jpeg = b"\xff\xd8" + b"x" * 10 + b"\xff\xd9"
    part = (
        b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: 14\r\n"
        b"X-Frame-Index: 7\r\nX-Timestamp: 12.500000\r\n\r\n" + jpeg + b"\r\n"
    )
    buf = bytearray(part + part[:30])
    parts = serve_bench.parse_parts(buf)
    assert [(h["x-frame-index"], h["x-timestamp"], h["_jpeg_ok"], n) for h, n in parts] == [
        ("7", "12.500000", "1", 14)
    ]
    buf += part[30:]
    assert len(serve_bench.parse_parts(buf)) == 1
    ev = bytearray(b'event: record\ndata: {"frame": 3}\n\nevent: status\nda')
    assert serve_bench.parse_events(ev) == [("record", '{"frame": 3}')]
    assert ev == bytearray(b"event: status\nda")


def test_quick_run_has_every_scenario_ratio_and_latency(tmp_path):
    from test_backends import make_onnx_model

    model = make_onnx_model(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    args = ["--model", str(model), "--quick", "--seconds", "3", "--repeats", "1"]
    rc = serve_bench.main([*args, "--memory-minutes", "0", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "result.json").read_text())
    assert set(rec["scenarios"]) == set(serve_bench.SCENARIOS)
    for s in serve_bench.SCENARIOS:
        row = rec["scenarios"][s]
        assert row["fps"] > 0 and row["summary_fps"] > 0, s
        assert len(row["repeats"]) == 1
    ra = rec["ratios"]
    sc = rec["scenarios"]
    for key, (a, b) in {
        "fps_viewers4_over_none": ("viewers4", "none"),
        "fps_stalled_over_none": ("stalled", "none"),
        "fps_none_over_plain": ("none", "plain"),
    }.items():
        assert ra[key] == pytest.approx(sc[a]["fps"] / sc[b]["fps"], rel=1e-2)
    for k in ("stream", "events", "stream_after_inference", "events_after_inference"):
        lat = rec["latency"][k]
        assert lat["n"] > 0 and 0 <= lat["p50_ms"] <= lat["p95_ms"], k
    viewers = sc["viewers4"]["repeats"][0]["viewers"]
    assert len(viewers["stream"]) == 4 and len(viewers["events"]) == 4
    assert all(
        v["status"] == 200 and v["parts"] > 0 and not v["bad_jpeg"] for v in viewers["stream"]
    )
    assert all(v["status"] == 200 and v["records"] > 0 for v in viewers["events"])
    assert rec["stalled"][0]["connected_s"] is not None
    alt = rec["alternating"]
    (run,) = alt["runs"]
    assert [b["kind"] for b in run["blocks"]][:3] == ["none", "viewers4", "none"]
    assert all(b["fps"] > 0 for b in run["blocks"])
    assert alt["ratios"]
    assert alt["ratio_median"] == pytest.approx(statistics.median(alt["ratios"]), rel=1e-3)
    assert rec["memory"] is None and rec["verdicts"]["memory"]["met"] is None
    v = rec["verdicts"]
    assert v["viewers4"]["met"] == (ra["fps_viewers4_over_none"] >= 0.95)
    assert rec["probe"]["jpeg_kb"] > 0 and rec["device"]["cores"] >= 1
    text = (out / "README.md").read_text()
    assert "Verdicts" in text and "--quick" in text and "p95" in text

    # The report again from the recorded figures alone.
    (out / "README.md").unlink()
    assert serve_bench.main(["--report-from", str(out / "result.json")]) == 0
    again = (out / "README.md").read_text()
    assert "re-rendered" in again and "Verdicts" in again
    assert json.loads((out / "result.json").read_text())["scenarios"] == rec["scenarios"]


def test_missing_default_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve_bench, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    with pytest.raises(SystemExit) as exc:
        serve_bench.main(["--quick", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "make demo" in capsys.readouterr().err
