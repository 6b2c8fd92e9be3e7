"""export from an exported FP32 model.onnx: the device's half of the chain, without PyTorch.

The workstation exports a checkpoint; the device starts from its ``model.onnx``. These tests
make the ONNX with PyTorch, then drive every later step from the ONNX alone and compare with
what the checkpoint path makes (the edge install itself is tested in test_edge_install.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the workstation half needs torch")
onnx = pytest.importorskip("onnx", reason="export needs onnx")
pytest.importorskip("pytorch_grad_cam", reason="the workstation's checks need grad-cam")

from typer.testing import CliRunner  # noqa: E402

from fundus_edge.artifact import METADATA_KEY, read_metadata  # noqa: E402
from fundus_edge.cli import app  # noqa: E402
from fundus_edge.convert import tensorrt  # noqa: E402
from fundus_edge.convert.chain import export_model  # noqa: E402
from fundus_edge.convert.export_config import ExportConfig  # noqa: E402
from fundus_edge.convert.steps import tensorrt_available  # noqa: E402
from fundus_edge.convert.verify import TOLERANCES, map_correlation, ort_outputs  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint  # noqa: E402

LABELS = ("Disease_Risk", "DR", "ARMD", "MH")
runner = CliRunner()


def _checkpoint(path: Path, size: int = 64) -> Path:
    torch.manual_seed(1)
    cfg = EnsembleConfig(
        members=("resnet18",),
        member_head="gap",
        num_classes=len(LABELS),
        label_names=LABELS,
        image_size=size,
    )
    ens = build_ensemble(cfg)
    for m in ens.modules():  # real batch statistics: random running stats flatten the maps
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        ens.train()(torch.randn(4, 3, size, size))
    return save_checkpoint(path, ens.eval(), thresholds=[0.4, 0.5, 0.5, 0.6])


@pytest.fixture(scope="module")
def workstation(tmp_path_factory, tiny_synth):
    """The workstation's export: checkpoint -> model.onnx + INT8, with every check."""
    tmp = tmp_path_factory.mktemp("ws")
    ckpt = _checkpoint(tmp / "small.safetensors")
    out = tmp / "export"
    report = export_model(
        ExportConfig(
            model=str(ckpt),
            out=str(out),
            precision="int8",
            calib=str(tiny_synth),
            calib_count=8,
            verify_images=2,
            simplify=False,
        )
    )
    return ckpt, out, report


def test_int8_from_the_onnx_agrees_with_int8_from_the_checkpoint(workstation, tiny_synth, tmp_path):
    _, ws, ws_report = workstation
    dev = tmp_path / "device"
    rep = export_model(
        ExportConfig(
            model=str(ws / "model.onnx"),
            out=str(dev),
            name="model",
            precision="int8",
            calib=str(tiny_synth),
            calib_count=8,
            verify_images=2,
        )
    )
    # The same calibration images, preprocessed by the contract the ONNX carries.
    assert rep["quantization"]["calibration"] == ws_report["quantization"]["calibration"]
    images = np.stack(
        [np.asarray(v) for v in _preprocessed(tiny_synth, read_metadata(ws / "model.onnx"))]
    )
    a = ort_outputs(ws / "model.int8.onnx", images)
    b = ort_outputs(dev / "model.int8.onnx", images)
    assert float(np.abs(a["probs"] - b["probs"]).max()) <= TOLERANCES.int8_probs
    assert map_correlation(a["cams"], b["cams"])["overall"] >= 0.99
    # The chain started later: read_onnx instead of torch_to_onnx, then the same INT8 step.
    assert [s["step"] for s in rep["steps"]] == ["read_onnx", "onnx_to_int8"]
    assert rep["source"]["kind"] == "onnx" and len(rep["source"]["sha256"]) == 64
    assert rep["checks"]["onnx_contract"]["passed"] is True
    assert rep["checks"]["int8_vs_fp32"]["passed"] is None  # reported, not gated
    assert "auroc" in rep["checks"]["int8_vs_fp32"]
    assert "cams_vs_gradcam" not in rep["checks"]  # the device has no grad-cam ...
    # ... but carries the workstation's figures from the report beside the graph.
    carried = rep["source"]["report"]["checks"]
    assert carried["cams_vs_gradcam"]["passed"] is True
    meta = read_metadata(dev / "model.int8.onnx")
    assert meta["precision"] == "int8" and meta["label_names"] == list(LABELS)
    assert meta["derived_from"]["step"] == "onnx_to_int8"
    assert meta["derived_from"]["sha256"] == rep["source"]["sha256"]
    # The FP32 graph is copied unchanged beside it.
    assert (dev / "model.onnx").read_bytes() == (ws / "model.onnx").read_bytes()


def _preprocessed(data: Path, meta: dict) -> list[np.ndarray]:
    from fundus_edge.convert.calibration import load_images
    from fundus_edge.preprocess import PreprocessConfig

    pre = PreprocessConfig.from_dict(meta["preprocess"])
    return list(load_images(data, pre, 6, ("test",), meta["label_names"]).images)


def test_fp16_and_triton_from_the_onnx(workstation, tmp_path):
    _, ws, _ = workstation
    rep = export_model(
        ExportConfig(model=str(ws / "model.onnx"), out=str(tmp_path / "f16"), precision="fp16")
    )
    chk = rep["checks"]["fp16_vs_fp32"]
    assert chk["passed"] and chk["probs_max_abs"] <= TOLERANCES.fp16_probs
    assert read_metadata(tmp_path / "f16" / "model.fp16.onnx")["precision"] == "fp16"
    assert rep["deploy"] == "model.fp16.onnx"

    rep = export_model(
        ExportConfig(
            model=str(ws / "model.onnx"),
            out=str(tmp_path / "tr"),
            format="triton",
            triton_max_batch=4,
        )
    )
    repo = tmp_path / "tr" / "triton" / "model"
    assert rep["artifacts"]["triton"]["path"] == "triton/model"
    text = (repo / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 4\n" in text
    assert read_metadata(repo / "1" / "model.onnx")["label_names"] == list(LABELS)


def test_engine_from_the_onnx_without_tensorrt_is_exit_2_and_keeps_the_onnx(workstation, tmp_path):
    if tensorrt_available():
        pytest.skip("TensorRT is installed here: the no-TensorRT path cannot be exercised")
    _, ws, _ = workstation
    out = tmp_path / "eng"
    res = runner.invoke(
        app, ["export", "--model", str(ws / "model.onnx"), "--out", str(out), "--format", "engine"]
    )
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("fundus-edge: error")]
    assert len(lines) == 1 and "TensorRT is not installed here" in lines[0]
    assert (out / "model.onnx").is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert report["steps"][-1]["step"] == "onnx_to_engine" and "skipped" in report["steps"][-1]


def test_engine_from_the_onnx_with_fake_tensorrt(workstation, tmp_path, monkeypatch):
    from test_export import _FakeTRT

    _, ws, _ = workstation
    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt, "gpu_compute_capability", lambda: "8.7")
    out = tmp_path / "eng"
    rep = export_model(
        ExportConfig(model=str(ws / "model.onnx"), out=str(out), format="engine", precision="fp16")
    )
    eng = "model.fp16.trt10.3.0.sm87.engine"
    assert rep["deploy"] == eng and (out / eng).read_bytes() == b"PLAN"
    side = json.loads((out / (eng + ".json")).read_text())
    assert side["precision"] == "fp16" and side["label_names"] == list(LABELS)
    assert side["tensorrt"]["onnx"] == "model.onnx"
    # FP16 engines come from the FP32 graph with the builder flag: no FP16 ONNX was made.
    assert [s["step"] for s in rep["steps"]] == ["read_onnx", "onnx_to_engine"]
    # Run again: the engine matches this TensorRT, GPU and ONNX, so it is reused as it is.
    before = (out / eng).stat().st_mtime_ns
    export_model(
        ExportConfig(model=str(out / "model.onnx"), out=str(out), format="engine", precision="fp16")
    )
    assert (out / eng).stat().st_mtime_ns == before


def _with_meta(src: Path, dst: Path, value: str | None) -> Path:
    m = onnx.load(str(src))
    keep = [p for p in m.metadata_props if p.key != METADATA_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    if value is not None:
        e = m.metadata_props.add()
        e.key, e.value = METADATA_KEY, value
    onnx.save(m, str(dst))
    return dst


def test_a_missing_or_damaged_contract_is_one_line_exit_2(workstation, tmp_path):
    _, ws, _ = workstation
    src = ws / "model.onnx"
    meta = read_metadata(src)
    no_map = {k: v for k, v in meta.items() if k != "map_size"}
    cases = {
        "none.onnx": (None, "has no 'fundus_edge' metadata"),
        "json.onnx": ("{not json", "model metadata is not valid JSON"),
        "labels.onnx": (json.dumps({**meta, "thresholds": [0.5]}), "1 thresholds for 4 labels"),
        "nomap.onnx": (json.dumps(no_map), "lacks map_size, which export needs"),
        "fp16.onnx": (json.dumps({**meta, "precision": "fp16"}), "an FP16 graph"),
    }
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"PLAN")
    paths = {name: _with_meta(src, tmp_path / name, v) for name, (v, _) in cases.items()}
    expect = {**{n: msg for n, (_, msg) in cases.items()}, "garbage.onnx": "cannot load this model"}
    paths["garbage.onnx"] = garbage
    paths["m.engine"] = engine
    expect["m.engine"] = "end of the chain"
    for name, path in paths.items():
        out = tmp_path / f"out-{name}"
        res = runner.invoke(app, ["export", "--model", str(path), "--out", str(out)])
        assert res.exit_code == 2, (name, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and expect[name] in lines[0], (name, res.output)
        assert str(path) in lines[0] or path.name in lines[0]
        assert not out.exists(), name  # refused before any work


def test_the_model_export_started_from_is_never_removed(workstation, tmp_path):
    _, ws, _ = workstation
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("model.onnx", "export_report.json"):
        (folder / name).write_bytes((ws / name).read_bytes())
    # A new name in the same folder: the old report listed model.onnx, the new one does not.
    export_model(ExportConfig(model=str(folder / "model.onnx"), out=str(folder), name="other"))
    assert (folder / "model.onnx").is_file() and (folder / "other.onnx").is_file()


def test_cli_names_the_artifacts_after_the_onnx_and_takes_shipped_profiles(
    workstation, tiny_synth, tmp_path, monkeypatch
):
    _, ws, _ = workstation
    src = tmp_path / "screening.onnx"
    src.write_bytes((ws / "model.onnx").read_bytes())
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        ["export", "--model", str(src), "--profile", "x86-cpu-int8", "--calib", str(tiny_synth),
         "--calib-count", "4"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "exports" / "screening"  # exports/<stem>, as for a checkpoint
    assert (out / "screening.onnx").is_file() and (out / "screening.int8.onnx").is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert report["config"]["profile"].endswith("x86-cpu-int8.yaml")
    assert report["quantization"]["target"] == "cpu"
    assert "chain: read_onnx" in res.output


def test_export_config_refuses_a_profile_that_is_not_shipped():
    from fundus_edge.convert.export_config import load_profile, profile_names

    assert {"jetson-orin-nano-fp16", "x86-cpu-int8"} <= set(profile_names())
    with pytest.raises(UserError, match="shipped: agx-orin-int8"):
        load_profile("no-such-profile")


def test_a_graph_that_breaks_its_contract_is_refused_and_the_previous_export_kept(
    workstation, tmp_path
):
    _, ws, _ = workstation
    meta = read_metadata(ws / "model.onnx")
    bad = _with_meta(
        ws / "model.onnx", tmp_path / "bad.onnx", json.dumps({**meta, "map_size": [7, 7]})
    )
    out = tmp_path / "prev"
    export_model(ExportConfig(model=str(ws / "model.onnx"), out=str(out), name="bad"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for verify in (True, False):
        with pytest.raises(UserError, match=r"does not match its own contract: cams .* != "):
            export_model(
                ExportConfig(model=str(bad), out=str(out), verify=verify, precision="fp16")
            )
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thresholds": [None, 0.5, 0.5, 0.5]}, "threshold of Disease_Risk is None"),
        ({"thresholds": ["abc", 0.5, 0.5, 0.5]}, "threshold of Disease_Risk is 'abc'"),
        ({"thresholds": [1.5, 0.5, 0.5, 0.5]}, "expected a number in [0, 1]"),
        ({"label_names": ["Disease_Risk", "DR", "DR", "MH"]}, "names label 'DR' twice"),
        ({"mean": "0.5"}, "mean must be three numbers"),
        ({"preprocess": [1, 2]}, "preprocess must be a mapping"),
        ({"input_size": True}, "input_size must be a positive integer"),
    ],
)
def test_contract_values_of_the_wrong_type_are_refused(workstation, tmp_path, change, message):
    _, ws, _ = workstation
    meta = {**read_metadata(ws / "model.onnx"), **change}
    bad = _with_meta(ws / "model.onnx", tmp_path / "bad.onnx", json.dumps(meta))
    with pytest.raises(UserError) as exc:
        export_model(ExportConfig(model=str(bad), out=str(tmp_path / "out")))
    assert message in str(exc.value) and "bad.onnx" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_a_linked_model_is_copied_never_shared(workstation, tmp_path):
    _, ws, _ = workstation
    (tmp_path / "in").mkdir()
    link = tmp_path / "in" / "link.onnx"
    link.symlink_to(Path("..") / ".." / ws.relative_to(ws.parents[1]) / "model.onnx")
    if not link.is_file():  # the relative link did not resolve in this layout: use an absolute one
        link.unlink()
        link.symlink_to(ws / "model.onnx")
    out = tmp_path / "out"
    export_model(ExportConfig(model=str(link), out=str(out), name="model"))
    made = out / "model.onnx"
    assert not made.is_symlink() and made.stat().st_nlink == 1
    assert made.read_bytes() == (ws / "model.onnx").read_bytes()


def test_checks_are_carried_through_several_device_exports(workstation, tmp_path):
    _, ws, _ = workstation
    dev1 = tmp_path / "dev1"
    export_model(ExportConfig(model=str(ws / "model.onnx"), out=str(dev1), precision="fp16"))
    rep = export_model(ExportConfig(model=str(dev1 / "model.onnx"), out=str(tmp_path / "dev2")))
    carried = rep["source"]["report"]["checks"]
    assert {"cams_vs_gradcam", "onnxruntime_vs_pytorch", "fp16_vs_fp32"} <= set(carried)


def test_histogram_calibration_does_not_fall_back_on_an_odd_image_count(
    workstation, tiny_synth, tmp_path
):
    _, ws, _ = workstation
    rep = export_model(
        ExportConfig(
            model=str(ws / "model.onnx"),
            out=str(tmp_path / "q"),
            precision="int8",
            calib=str(tiny_synth),
            calib_count=7,
            calib_method="entropy",
            verify=False,
        )
    )
    assert rep["quantization"]["method"] == "entropy" and rep["quantization"]["fallback"] is None


def test_names_that_would_break_triton_or_files_are_refused():
    with pytest.raises(UserError, match="letters, digits"):
        ExportConfig(model="m.onnx", name="my model")
    with pytest.raises(UserError, match="--calib-count 'lots': must be an integer"):
        ExportConfig(model="m.onnx", calib_count="lots")
    # Triton on an engine takes the engine's max batch unless told otherwise.
    assert (
        ExportConfig(model="m.onnx", format="triton", triton_backend="engine").triton_max_batch == 4
    )
    assert ExportConfig(model="m.onnx", format="triton").triton_max_batch == 8


def test_sigterm_cleans_up_and_an_abandoned_stage_is_removed(workstation, tiny_synth, tmp_path):
    import os
    import signal
    import subprocess
    import time

    _, ws, _ = workstation
    out = tmp_path / "out"
    export_model(ExportConfig(model=str(ws / "model.onnx"), out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    exe = Path(sys.executable).with_name("fundus-edge")
    cmd = [str(exe), "export", "--model", str(ws / "model.onnx"), "--out", str(out), "--int8",
           "--calib", str(tiny_synth), "--calib-count", "20"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob(".export-*/model.onnx")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A stage left by a killed process (its pid gone) is removed by the next export.
    stale = out / ".export-old"
    stale.mkdir()
    (stale / ".pid").write_text("999999999")
    (stale / "junk").write_bytes(b"x" * 10)
    export_model(ExportConfig(model=str(ws / "model.onnx"), out=str(out)))
    assert not stale.exists()
    assert os.path.isfile(out / "export_report.json")
