"""OpenVINO: the backend at explicit precisions, export to IR with gated parity, --backend auto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip(
    "openvino", reason="OpenVINO is not installed (pip install 'fundus-edge[openvino]')"
)
pytest.importorskip("torch", reason="the test model is exported with torch (the train extra)")

from typer.testing import CliRunner  # noqa: E402

from fundus_edge.backends import load_backend  # noqa: E402
from fundus_edge.backends import openvino as ovb  # noqa: E402
from fundus_edge.cli import app  # noqa: E402
from fundus_edge.convert.calibration import synthetic_images  # noqa: E402
from fundus_edge.convert.chain import export_model  # noqa: E402
from fundus_edge.convert.export_config import ExportConfig  # noqa: E402
from fundus_edge.convert.verify import compare_outputs, ort_outputs  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.preprocess import PreprocessConfig  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_synth):
    """model.onnx + model.int8.onnx (CPU Q/DQ) + model.xml (IR), from one small checkpoint."""
    from test_export_from_onnx import _checkpoint

    tmp = tmp_path_factory.mktemp("ov")
    ckpt = _checkpoint(tmp / "small.safetensors")
    out = tmp / "export"
    export_model(ExportConfig(model=str(ckpt), out=str(out), verify=False, simplify=False))
    rep8 = export_model(
        ExportConfig(
            model=str(out / "model.onnx"),
            out=str(out),
            precision="int8",
            calib=str(tiny_synth),
            calib_count=8,
            format="openvino",
            verify_images=2,
        )
    )
    rep = export_model(
        ExportConfig(model=str(out / "model.onnx"), out=str(tmp / "ir"), format="openvino")
    )
    return out, tmp / "ir", rep, rep8


def _images(meta, n=3):
    return synthetic_images(PreprocessConfig.from_dict(meta["preprocess"]), n, seed=5).images


def test_backend_precisions_agree_with_onnxruntime(exported):
    out, _, _, _ = exported
    b = load_backend(out / "model.onnx", backend="openvino")
    assert b.precision == "fp32" and "CPU fp32" in b.device
    imgs = _images(b.metadata)
    ref = ort_outputs(out / "model.onnx", imgs)
    cmp = compare_outputs(ref, b.infer(imgs))
    assert cmp["probs_max_abs"] <= 1e-4 and cmp["cams_correlation"]["overall"] >= 0.9999
    b.close()
    if ovb.cpu_supports_bf16():
        b16 = load_backend(out / "model.onnx", backend="openvino", precision="bf16")
        cmp = compare_outputs(ref, b16.infer(imgs))
        assert cmp["probs_max_abs"] <= 5e-2 and cmp["cams_correlation"]["overall"] >= 0.98
        b16.close()
    b8 = load_backend(out / "model.int8.onnx", backend="openvino")
    assert b8.precision == "int8"  # the Q/DQ graph's own precision
    assert b8.infer(imgs)["probs"].shape == ref["probs"].shape
    b8.close()


def test_precision_is_explicit_never_a_silent_downgrade(exported, monkeypatch):
    out, _, _, _ = exported
    with pytest.raises(UserError, match="cannot run as int8"):
        load_backend(out / "model.onnx", backend="openvino", precision="int8")
    with pytest.raises(UserError, match="cannot run as fp32"):
        load_backend(out / "model.int8.onnx", backend="openvino", precision="fp32")
    with pytest.raises(UserError, match="--precision 'fp16'"):
        load_backend(out / "model.onnx", backend="openvino", precision="fp16")
    monkeypatch.setattr(ovb, "supports_bf16", lambda core, device="CPU": False)
    with pytest.raises(UserError, match=r"has no BF16 compute \(AMX or AVX-512-BF16\)"):
        load_backend(out / "model.onnx", backend="openvino", precision="bf16")
    with pytest.raises(UserError, match=r"--backend openvino: cannot load a '\.engine' file"):
        load_backend(out / "model.engine", backend="openvino")
    with pytest.raises(UserError, match=r"option.*provider.*do not apply to the openvino"):
        load_backend(out / "model.onnx", backend="openvino", provider="cpu")


def test_export_to_ir_is_gated_against_fp32(exported):
    out, ir, rep, rep8 = exported
    assert sorted(p.name for p in ir.iterdir()) == [
        "export_report.json", "model.bin", "model.onnx", "model.xml", "model.xml.json"
    ]  # fmt: skip
    chk = rep["checks"]["openvino_vs_fp32"]
    assert chk["passed"] is True
    fp32 = chk["precisions"]["fp32"]
    assert fp32["passed"] and fp32["tolerance"] == {"probs": 1e-2, "map_corr": 0.99}
    if ovb.cpu_supports_bf16():
        assert chk["precisions"]["bf16"]["tolerance"]["map_corr"] == 0.98
    else:
        assert "skipped" in chk["precisions"]["bf16"]
    side = json.loads((ir / "model.xml.json").read_text())
    assert side["openvino"]["weights"] == "fp16" and side["precision"] == "fp32"
    # FP16-stored weights: the IR is about half the FP32 graph.
    assert (ir / "model.bin").stat().st_size < 0.6 * (ir / "model.onnx").stat().st_size
    int8 = rep8["checks"]["openvino_vs_fp32"]["precisions"]["int8"]
    assert int8["passed"] and int8["tolerance"] == {"probs": 0.1, "map_corr": 0.98}
    assert (out / "model.int8.xml").is_file() and (out / "model.int8.bin").is_file()
    # The IR loads by its suffix, with its contract from the sidecar.
    b = load_backend(ir / "model.xml")
    assert b.name == "openvino" and b.label_names == side["label_names"]
    assert "fp16 weights" in b.device
    b.close()


def test_bad_irs_are_one_line(exported, tmp_path):
    _, ir, _, _ = exported
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.xml", "model.bin"):
        (bare / name).write_bytes((ir / name).read_bytes())
    with pytest.raises(UserError, match=r"OpenVINO IR has no metadata sidecar model\.xml\.json"):
        load_backend(bare / "model.xml")
    nobin = tmp_path / "nobin"
    nobin.mkdir()
    for name in ("model.xml", "model.xml.json"):
        (nobin / name).write_bytes((ir / name).read_bytes())
    with pytest.raises(UserError, match=r"weights model.bin are missing"):
        load_backend(nobin / "model.xml")
    future = tmp_path / "future"
    future.mkdir()
    for name in ("model.xml", "model.bin"):
        (future / name).write_bytes((ir / name).read_bytes())
    side = json.loads((ir / "model.xml.json").read_text())
    side["openvino"]["version"] = "2099.1.0"
    (future / "model.xml.json").write_text(json.dumps(side))
    with pytest.raises(UserError, match=r"written by OpenVINO 2099\.1\.0, this is"):
        load_backend(future / "model.xml")


def test_run_and_eval_on_openvino(exported, tiny_synth, tmp_path):
    out, _, _, _ = exported
    jsonl = tmp_path / "r.jsonl"
    res = runner.invoke(
        app,
        ["run", str(out / "model.onnx"), str(tiny_synth / "Test_Set" / "Test"), "--headless",
         "--backend", "openvino", "--jsonl", str(jsonl)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "on openvino (OpenVINO" in res.output and "CPU fp32" in res.output
    assert len(jsonl.read_text().splitlines()) == 5
    res = runner.invoke(
        app,
        ["eval", "--model", str(out / "model.int8.onnx"), "--data", str(tiny_synth),
         "--backend", "openvino", "--precision", "int8", "--json", str(tmp_path / "e.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["backend"]["name"] == "openvino" and "int8" in rep["backend"]["device"]


def test_backend_auto_measures_once_and_never_loses_to_onnxruntime_fp32(
    exported, tiny_synth, tmp_path
):
    from fundus_edge.backends.auto import choose

    out, _, _, _ = exported
    folder = tmp_path / "m"
    folder.mkdir()
    for name in (
        "model.onnx",
        "model.int8.onnx",
        "model.int8.xml",
        "model.int8.bin",
        "model.int8.xml.json",
    ):
        (folder / name).write_bytes((out / name).read_bytes())
    choice = choose(folder / "model.onnx", frames=3, rounds=2, iters=1)
    assert not choice.cached
    rows = {(r["backend"], r["precision"], r["file"]): r for r in choice.record["candidates"]}
    assert ("onnxruntime", "fp32", "model.onnx") in rows
    assert ("openvino", "int8", "model.int8.xml") in rows
    ort32 = rows["onnxruntime", "fp32", "model.onnx"]["median_ms"]
    assert choice.record["median_ms"] <= ort32  # the reference is a candidate
    assert all(r["passed"] == r.get("parity", {}).get("passed", False) for r in rows.values())
    cache = folder / "model.onnx.backend.json"
    assert json.loads(cache.read_text())["chosen"] == choice.record["chosen"]
    again = choose(folder / "model.onnx")
    assert again.cached and again.candidate == choice.candidate
    # Any candidate file that changes invalidates the choice.
    (folder / "model.int8.onnx").unlink()
    third = choose(folder / "model.onnx", frames=2, rounds=1, iters=1)
    assert not third.cached and third.candidate.path.name != "model.int8.onnx"
    # run --backend auto uses the (now cached) choice.
    images = str(tiny_synth / "Test_Set" / "Test")
    res = runner.invoke(
        app, ["run", str(folder / "model.onnx"), images, "--headless", "--backend", "auto"]
    )
    assert res.exit_code == 0, res.output
    chosen = third.candidate
    assert f"on {chosen.backend} (" in res.output


def test_bench_rows_for_every_cpu_runtime(exported, tmp_path):
    out, _, _, _ = exported
    from fundus_edge.perf.bench import BenchConfig, run_bench

    result = run_bench(
        BenchConfig(
            model=str(out / "model.onnx"),
            backends=("onnxruntime", "openvino"),
            precisions=("fp32", "bf16", "int8"),
            iters=3,
            warmup_iters=1,
            pipeline=False,
            roofline=False,
            calib_count=4,
            parity_images=2,
        )
    )
    ok = {(r.backend, r.precision) for r in result.rows if r.status == "ok"}
    assert {("onnxruntime-cpu", "fp32"), ("openvino-cpu", "fp32"), ("openvino-cpu", "int8")} <= ok
    ov32 = result.row("openvino-cpu fp32 b1")
    assert ov32.parity["ok"] is True and ov32.parity["max_abs_diff"] <= 1e-4
    bf = [r for r in result.rows if r.precision == "bf16"]
    ort_bf16 = next(r for r in bf if r.backend == "onnxruntime")
    assert ort_bf16.status == "skipped" and "no BF16 compute" in ort_bf16.error
    if ovb.cpu_supports_bf16():
        assert result.row("openvino-cpu bf16 b1").parity["tolerance"] == 5e-2


def test_doctor_reports_openvino_and_cpu_features():
    from fundus_edge import doctor

    report = doctor.collect(probe_cameras=False)
    ovr = report["backends"]["openvino"]
    assert ovr["available"] and "CPU" in ovr["devices"]
    assert "FP32" in ovr["devices"]["CPU"]["capabilities"]
    res = runner.invoke(app, ["doctor", "--no-camera-probe"])
    assert "OpenVINO" in res.output and "CPU int8/bf16" in res.output
    assert isinstance(np.zeros(1), np.ndarray)


def test_fixture_paths_exist(exported):
    out, ir, _, _ = exported
    assert Path(out / "model.int8.onnx").is_file() and (ir / "model.xml").is_file()


def test_bench_backend_auto_records_the_choice(exported, tmp_path):
    from fundus_edge.perf.bench import BenchConfig, run_bench

    out, _, _, _ = exported
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    cfg = BenchConfig(
        model=str(folder / "model.onnx"),
        backends=("auto",),
        precisions=("fp32",),
        iters=2,
        warmup_iters=1,
        pipeline=False,
        roofline=False,
        parity_images=2,
    )
    assert cfg.auto and set(cfg.backends) == {"onnxruntime", "openvino", "tensorrt"}
    result = run_bench(cfg)
    chosen = result.config["auto"]["chosen"]
    assert chosen["file"] == "model.onnx" and chosen["backend"] in ("onnxruntime", "openvino")
    assert (folder / "model.onnx.backend.json").is_file()
