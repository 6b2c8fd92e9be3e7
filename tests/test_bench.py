"""``fundus-edge bench`` and the ``bench/`` suite (bench/suite.py): outputs, skipped rows, parity,
scenario plumbing.

Speed is never asserted here: targets are met (or not) in the committed benchmark results.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the bench tests build a model with torch")
pytest.importorskip("onnxruntime", reason="the bench tests run ONNX Runtime")
pytest.importorskip("pytorch_grad_cam", reason="the suite's baselines use the grad-cam package")

from suite import (  # noqa: E402  (bench/suite.py: a repository tool, on pytest's pythonpath)
    SCENARIOS,
    SuiteConfig,
    interleave,
    load_suite,
    run_suite,
)
from typer.testing import CliRunner  # noqa: E402

import fundus_edge.cli.cmd_bench  # noqa: E402, F401  (registers `bench` before the lead does)
from fundus_edge.cli.app import app  # noqa: E402
from fundus_edge.convert.steps import Artifact, CheckpointToOnnx, StepContext  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.perf import BenchResult, read_result  # noqa: E402
from fundus_edge.perf.bench import (  # noqa: E402
    BenchConfig,
    device_slug,
    parity_record,
    render_bench_markdown,
    run_bench,
)

runner = CliRunner()
SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A resnet18-sized ensemble at 64 px, saved as a checkpoint."""
    from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint
    from fundus_edge.preprocess import PreprocessConfig

    torch.manual_seed(0)
    cfg = EnsembleConfig(members=("resnet18",), num_classes=5, member_head="gap", image_size=SIZE)
    ens = build_ensemble(cfg).eval()
    pre = PreprocessConfig(size=SIZE).to_dict()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(path, ens, extra={"preprocess": pre})


@pytest.fixture(scope="module")
def onnx_model(checkpoint, tmp_path_factory) -> Path:
    ctx = StepContext(out=tmp_path_factory.mktemp("onnx"), verify=False)
    step = CheckpointToOnnx("tiny", simplify=False)
    return step.run(Artifact("checkpoint", checkpoint), ctx).artifact.path


@pytest.fixture(scope="module")
def bench_run(onnx_model, tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """One CLI run on the exported model, all precisions, batches 1 and 2 (and what it printed)."""
    d = tmp_path_factory.mktemp("bench")
    js, md, out = d / "r.json", d / "r.md", d / "out"
    res = runner.invoke(
        app,
        [
            "bench",
            "--model", str(onnx_model),
            "--backend", "onnxruntime,tensorrt,torch",
            "--precision", "fp32,fp16,int8",
            "--batch", "1,2",
            "--warmup-iters", "1",
            "--iters", "5",
            "--frames", "3",
            "--calib-count", "4",
            "--calib-method", "minmax",
            "--parity-images", "3",
            "--json", str(js),
            "--md", str(md),
            "--out", str(out),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return js, md, out, res.output


def test_bench_cli_json_and_markdown(bench_run):
    js, md, out, _ = bench_run
    result = read_result(js)  # schema-checked round trip
    data = json.loads(js.read_text())
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    model_rows = [r for r in ok if not r["backend"].endswith("end-to-end")]
    # ONNX Runtime at every precision x batch, each with a full set of statistics.
    got = {(r["precision"], r["batch"]) for r in model_rows if r["backend"] == "onnxruntime-cpu"}
    assert got == {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, 2)}
    for r in model_rows:
        st = r["stats"]
        assert st["count"] == 5 and len(r["samples_ms"]) == 5
        assert st["min"] <= st["median"] <= st["p90"] <= st["p95"] <= st["p99"] <= st["max"]
        assert st["throughput"] > 0 and st["std"] >= 0
        assert r["size_mb"] > 0
        assert r["memory"]["rss_peak_mb"] > 0
    # Derived models are smaller: FP16 about half, INT8 about a quarter of FP32.
    size = {r["precision"]: r["size_mb"] for r in model_rows if r["batch"] == 1}
    assert size["fp16"] < 0.6 * size["fp32"] and size["int8"] < 0.4 * size["fp32"]
    # End-to-end rows carry the five stages, and the frame latency is their sum.
    e2e = [r for r in ok if r["backend"].endswith("end-to-end")]
    assert len(e2e) == 3
    for r in e2e:
        assert list(r["stages"]) == ["decode", "preprocess", "infer", "postprocess", "render"]
        stage_sum = sum(v["mean"] for v in r["stages"].values())
        assert r["stats"]["mean"] == pytest.approx(stage_sum, rel=1e-6)
    # Device record and provenance of the derived precisions.
    assert result.device["cpu"]["cores"] >= 1
    assert "synthetic" in data["config"]["images"]
    assert data["config"]["derived"]["int8"]["calib_images"] == 4
    assert data["roofline"]["kind"] == "roofline-estimate" and data["roofline"]["macs"] > 0
    text = md.read_text()
    for heading in (
        "## Summary",
        "## Latency",
        "### Stages: e2e",
        "## Parity vs the FP32",
        "## Memory",
        "## Device",
    ):
        assert heading in text
    assert "| Format | Precision | Batch | Status | Size (MB) |" in text
    assert (out / "result.json").is_file() and (out / "latency.png").stat().st_size > 1000
    assert (out / "report.md").read_text() == text


def test_tensorrt_row_skipped_with_reason(bench_run):
    data = json.loads(bench_run[0].read_text())
    trt = [r for r in data["rows"] if r["backend"] == "tensorrt"]
    assert len(trt) == 6
    for r in trt:
        if "tensorrt" in sys.modules or data["device"]["tensorrt"]:
            pytest.skip("TensorRT is installed here; the skipped-row path is not taken")
        assert r["status"] == "skipped" and r["stats"] is None
        assert "TensorRT is not installed" in r["error"]
        # Printed as written: "[trt]" is not taken for a style tag and dropped.
        assert "pip install 'fundus-edge[trt]'" in r["error"]
        assert f"{r['backend']} {r['precision']} b{r['batch']}: skipped:" in bench_run[3]
    assert "pip install 'fundus-edge[trt]'" in " ".join(bench_run[3].split())
    # The PyTorch backend needs a checkpoint: skipped with its own reason for an ONNX model.
    torch_rows = [r for r in data["rows"] if r["backend"] == "torch"]
    assert torch_rows and all("needs a checkpoint" in r["error"] for r in torch_rows)
    assert "## Failed or skipped" in bench_run[1].read_text()


def test_parity_columns(bench_run):
    data = json.loads(bench_run[0].read_text())
    rows = {
        (r["precision"], r["batch"]): r
        for r in data["rows"]
        if r["backend"] == "onnxruntime-cpu" and r["status"] == "ok"
    }
    fp32, fp16, int8 = (
        rows["fp32", 1]["parity"],
        rows["fp16", 1]["parity"],
        rows["int8", 1]["parity"],
    )
    assert fp32["reference"] == "onnxruntime-cpu fp32" and fp32["max_abs_diff"] == 0.0
    assert fp32["label_agreement"] == 1.0 and fp32["ok"] is True
    assert 0.0 <= fp16["max_abs_diff"] <= 1e-2 and fp16["ok"] is True
    assert int8["ok"] is None and int8["tolerance"] is None  # reported, not gated
    for p in (fp16, int8):
        assert 0.0 <= p["label_agreement"] <= 1.0 and p["images"] == 3
    assert rows["int8", 1]["metric"]["value"] == int8["label_agreement"]


def test_parity_record_counts_disagreements():
    ref = {"probs": np.array([[0.9, 0.1, 0.6], [0.2, 0.7, 0.4]], np.float32)}
    got = {"probs": np.array([[0.9, 0.1, 0.4], [0.2, 0.7, 0.45]], np.float32)}
    rec = parity_record(ref, got, [0.5, 0.5, 0.5], reference_name="ref", tolerance=0.1)
    assert rec["max_abs_diff"] == pytest.approx(0.2, abs=1e-6)
    assert rec["label_agreement"] == pytest.approx(5 / 6)
    assert rec["positive_sets_equal"] == 0.5
    assert rec["ok"] is False


def test_checkpoint_torch_row_and_engine_precision_skips(checkpoint, tmp_path):
    cfg = BenchConfig(
        model=str(checkpoint),
        backends=("torch", "onnxruntime"),
        precisions=("fp32", "fp16"),
        iters=3,
        warmup_iters=1,
        pipeline=False,
        roofline=False,
        parity_images=2,
    )
    result = run_bench(cfg)
    torch32 = result.row("torch-cpu fp32 b1")
    assert torch32.status == "ok"
    # PyTorch and the exported graph agree to the export tolerance.
    assert torch32.parity["max_abs_diff"] <= 1e-4
    assert "FP32 only" in result.row("torch fp16 b1").error
    md = render_bench_markdown(result)
    assert "torch-cpu fp32 b1" in md


def test_bench_option_errors(onnx_model):
    with pytest.raises(UserError, match="--precision 'fp8'"):
        BenchConfig(model=str(onnx_model), precisions=("fp8",))
    with pytest.raises(UserError, match="--iters or --duration"):
        BenchConfig(model=str(onnx_model), iters=3, duration_s=1.0)
    res = runner.invoke(app, ["bench", "--model", "nope.onnx", "--iters", "1"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["bench", "--model", str(onnx_model), "--batch", "x"])
    assert res.exit_code == 2 and "--batch" in res.output
    for kwargs, message in (
        ({"warmup_iters": -1}, "--warmup-iters must be >= 0"),
        ({"warmup_s": -2.0}, "--warmup-s must be >= 0"),
        ({"duration_s": -1.0}, "--duration must be > 0"),
        ({"threads": -1}, "--threads must be >= 0"),
        ({"calib_method": "bad"}, "--calib-method 'bad': choose minmax, entropy, percentile"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            BenchConfig(model=str(onnx_model), **kwargs)


def test_bench_outputs_are_tried_before_measuring(onnx_model, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    base = ["bench", "--model", str(onnx_model), "--backend", "onnxruntime", "--iters", "1"]
    for extra, message in (
        (["--md", str(folder)], f"--md {folder}: is a folder"),
        (["--json", f"{afile}/r.json"], "--json"),
        (["--out", str(afile)], f"--out {afile}: is a file"),
    ):
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], res.output  # before any row ran


def test_bench_with_nothing_measured_is_not_success(onnx_model):
    res = runner.invoke(
        app,
        ["bench", "--model", str(onnx_model), "--backend", "torch", "--precision", "fp32",
         "--iters", "1"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output  # torch needs a checkpoint: every row skipped
    assert "no row was measured (0 failed, 1 skipped" in res.output


def test_device_slug():
    assert device_slug({"cpu": {"model": "AMD EPYC", "cores": 2}}) == "cpu-amd-epyc-2c"
    intel = {"cpu": {"model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "cores": 8}}
    assert device_slug(intel) == "cpu-intel-xeon-gold-6338-8c"
    jet = {"jetson": {"module": "NVIDIA Jetson Orin Nano Developer Kit"}, "cpu": {}}
    assert device_slug(jet) == "jetson-orin-nano-developer-kit"


def test_interleave_alternates_order():
    calls: list[str] = []
    s = interleave(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=3,
        iters=2,
        warmup=1,
    )
    warm, r0, r1, r2 = ["a", "b"], ["a", "a", "b", "b"], ["b", "b", "a", "a"], ["a", "a", "b", "b"]
    assert calls == [*warm, *r0, *r1, *r2]
    assert len(s["a"]) == len(s["b"]) == 6 and min(s["a"]) >= 0


def test_suite_yaml_files_load(repo_root):
    for name in ("quick", "full"):
        cfg = load_suite(repo_root / "bench" / "scenarios" / f"{name}.yaml")
        # The student scenario needs a teacher and its reports: it has its own suite file.
        assert list(cfg.scenarios) == [s for s in SCENARIOS if s != "student"]
    student = load_suite(repo_root / "bench" / "scenarios" / "student.yaml")
    assert list(student.scenarios) == ["student"] and student.members == ("vgg19", "resnet50")
    full = load_suite(repo_root / "bench" / "scenarios" / "full.yaml")
    assert full.members == ("vgg19", "resnet50") and full.image_size == 224


def test_suite_rejects_unknown_scenario(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nscenarios:\n  warp_drive: {rounds: 1}\n")
    with pytest.raises(UserError, match="warp_drive"):
        load_suite(p)


def _tiny_suite(scenarios: dict, name: str = "tiny") -> SuiteConfig:
    """A suite on a tiny one-member model (resnet18, pooled head, 4 labels, 32 px)."""
    return SuiteConfig(
        name=name,
        members=("resnet18",),
        member_head="gap",
        num_classes=4,
        image_size=32,
        scenarios=scenarios,
    )


def test_quick_suite_plumbing_on_tiny_model(tmp_path):
    """Every scenario runs end to end on a tiny model; rows, ratios, targets are all there."""
    from suite import _ratio_plot

    from fundus_edge.perf.bench import write_outputs

    cfg = _tiny_suite(
        {
            "fused_vs_user": {"rounds": 1, "iters": 1, "top_k": 2, "warmup": 0},
            "cam_overhead": {"rounds": 2, "iters": 2},
            "precision": {"rounds": 1, "iters": 2, "calib_images": 2, "calib_method": "minmax"},
            "pipelined": {"rounds": 1, "frames": 2, "frame_size": 128, "streams": 2},
            "training": {"rounds": 1, "iters": 1, "batch": 2, "warmup": 0},
        },
    )
    result = run_suite(cfg, work_dir=tmp_path, roofline=False)
    assert isinstance(result, BenchResult)
    targets = result.config["targets"]
    assert [t["scenario"] for t in targets] == [
        "fused_vs_user",
        "cam_overhead",
        "precision",
        "precision",
        "pipelined",
        "pipelined",
        "pipelined",  # against the model alone on 2 concurrent calls (streams: 2)
        "training",
        "training",
    ]
    for t in targets:
        assert t["value"] > 0 and t["ci_low"] <= t["value"] <= t["ci_high"]
        assert t["met"] in (True, False, None)
        assert (t["met"] is None) == (t["target"] is None)
    assert len(result.ratios) == len(targets)
    names = result.names()
    assert (
        "precision: fused graph int8" in names
        and "training: plain step on the doubled batch" in names
    )
    assert result.row("training: plain step on the doubled batch").batch == 4
    # run --streams 2, and the model alone on two concurrent calls beside the target's baseline
    assert any("2 concurrent calls" in n for n in names)
    assert any("2 concurrent calls" in r.baseline for r in result.ratios)
    assert result.row("precision: fused graph fp16").parity["images"] == 4
    paths = write_outputs(result, tmp_path / "out", extra_plots=_ratio_plot)
    assert paths["ratios_png"].stat().st_size > 1000
    text = paths["markdown"].read_text()
    assert "## Scenario ratios vs targets" in text and "INT8 speed-up over FP32" in text
    assert read_result(paths["json"]).config["targets"] == targets


def test_pipelined_camera_and_simulated_accelerator_rows(tmp_path):
    """The camera variants run end to end: run on sim://, 1 and 2 streams, and the model on
    the simulated accelerator, whose calls take their time without the CPU, one at a time."""
    import time

    from pipelined import Accelerated, PipelinedOptions

    from fundus_edge.backends import load_backend

    cfg = _tiny_suite(
        {
            "pipelined": {
                "rounds": 1,
                "warmup": 0,
                "frames": 2,
                "frame": "160x128",
                "sink": "jsonl",
                "camera": True,
                "camera_seconds": 0.4,
                "streams": 2,
                "threads": 1,
                "accelerator_ms": 5,
            }
        },
    )
    result = run_suite(cfg, work_dir=tmp_path, roofline=False)
    names = result.names()
    acc = "a simulated accelerator (5 ms a call, the CPU left idle)"
    for k, s in ((1, ""), (2, "s")):
        row = result.row(next(n for n in names if n.endswith(f"the model on {acc}, {k} stream{s}")))
        assert row.stats.median >= 5.0  # a frame cannot leave before its model call ends
    alone = result.row(f"pipelined: model only on {acc}")
    assert 5.0 <= alone.stats.median < 8.0
    assert any(
        r.baseline.endswith(", 1 stream") and r.candidate.endswith(", 2 streams")
        for r in result.ratios
    )
    assert any("accelerator rows are a simulation" in n for n in result.config["notes"])
    # Where the frames' CPU went, per camera variant (run's own thread clocks: every platform).
    cpu = [n for n in result.config["notes"] if "CPU ms a frame by thread" in n]
    assert len(cpu) == 4 and any(", 2 streams: inference" in n for n in cpu)
    # The backend itself: the real outputs for every frame, after the wait, the CPU idle.
    from test_backends import make_onnx_model

    inner = load_backend(make_onnx_model(tmp_path / "m.onnx"), provider="cpu", threads=1)
    batch = np.zeros((1, 64, 64, 3), np.uint8)
    fake = Accelerated(inner, batch, 20)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fake.infer(np.zeros((3, 64, 64, 3), np.uint8))
    assert time.perf_counter() - t0 >= 0.02 and time.process_time() - c0 < 0.015
    np.testing.assert_array_equal(out["probs"], np.repeat(inner.infer(batch)["probs"], 3, 0))
    assert not Accelerated.concurrent
    with pytest.raises(UserError, match="accelerator_ms: needs camera: true"):
        PipelinedOptions(accelerator_ms=1.0)
    with pytest.raises(UserError, match=r"accelerator_ms: must be in \(0, 1000\]"):
        PipelinedOptions(camera=True, accelerator_ms=0)


def test_cpu_note_weighs_each_run_by_its_frames():
    """Runs' per-frame CPU is summed over their frames; the share is of the cores' time."""
    from pipelined import cpu_note

    taken = [
        ({"capture": 0.1, "prepare": 2.0, "inference": 3.0, "logs": 0.2, "other": 0.7, "all": 6.0},
         100, 0.5, 2),
        ({"capture": 0.1, "prepare": 4.0, "inference": 3.0, "logs": 0.2, "other": 0.7, "all": 8.0},
         300, 1.5, 2),
    ]  # fmt: skip
    note = cpu_note("a test", taken)
    assert "a test: inference 3.00, prepare 3.50, capture 0.10, logs 0.20, other 0.70" in note
    assert "7.50 in all, against 2 cores x 5.00 ms a frame = 10.00 (75 % busy" in note
    assert "draw" not in note and "400 frames" in note


# ---------------------------------------------------------------------------- student scenario


def _tiny_ckpt(path: Path, label_names, **cfg) -> Path:
    from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint
    from fundus_edge.preprocess import PreprocessConfig

    torch.manual_seed(1)
    mc = EnsembleConfig(label_names=tuple(label_names), num_classes=len(label_names), **cfg)
    pre = PreprocessConfig(size=mc.image_size).to_dict()
    return save_checkpoint(path, build_ensemble(mc).eval(), extra={"preprocess": pre})


def test_student_scenario_on_tiny_models(tmp_path, tiny_synth):
    """Every target row of the student scenario, measured in one run at tiny size: accuracy from
    two evaluated checkpoints, FLOPs, interleaved INT8 latency, maps vs grad-cam, the roofline
    estimate and the pipelined run on the student's graph."""
    from suite import _plotted, _ratio_plot

    from fundus_edge.data import open_dataset
    from fundus_edge.perf.bench import write_outputs

    labels = open_dataset(tiny_synth).label_names
    teacher = _tiny_ckpt(
        tmp_path / "teacher.safetensors", labels, members=("resnet18",), member_head="gap",
        image_size=64,
    )  # fmt: skip
    student = _tiny_ckpt(
        tmp_path / "student.safetensors", labels, members=("resnet18_os16",),
        member_head="gap", views="original", image_size=32,
    )  # fmt: skip
    cfg = _tiny_suite(
        name="tiny-student",
        scenarios={
            "student": {
                "student": str(student),
                "teacher": str(teacher),
                "student_eval": str(student),
                "teacher_eval": str(teacher),
                "data": str(tiny_synth),
                "rounds": 2,
                "iters": 1,
                "warmup": 1,
                "calib_images": 2,
                "pipelined": {"rounds": 1, "frames": 2, "frame_size": 128},
            }
        },
    )
    result = run_suite(cfg, work_dir=tmp_path, roofline=False)
    targets = {t["ratio"]: t for t in result.config["targets"]}
    assert all(t["scenario"] == "student" for t in targets.values())
    auroc = targets["macro AUROC student / teacher (held-out split)"]
    assert auroc["value"] > 0 and auroc["met"] in (True, False) and auroc["target"] == ">= 0.98"
    drop = next(t for k, t in targets.items() if k.startswith("pointing game"))
    assert -1 <= drop["value"] <= 1 and drop["target"] == "<= 0.02"
    # FLOPs: the one-pass resnet18_os16 student at 32 px against the two-pass resnet18 at 64 px.
    vs_teacher = targets["FLOPs per frame student / teacher (each as it runs)"]
    assert vs_teacher["value"] > 0 and vs_teacher["met"] == (vs_teacher["value"] <= 0.25)
    vs_paper = targets["FLOPs per frame student / paper ensemble (32 px)"]
    assert vs_paper["value"] > 0 and "GFLOPs" in vs_paper["display"]
    int8 = targets["INT8 latency student / paper ensemble (ORT CPU, batch 1)"]
    assert int8["ci_low"] <= int8["value"] <= int8["ci_high"] and int8["samples"] == [2, 2]
    # The export step's check of the student's maps against grad-cam: exact up to float noise.
    max_abs = targets["student maps vs grad-cam on the student: max abs diff"]
    corr = targets["student maps vs grad-cam on the student: min correlation"]
    assert max_abs["met"] is True and corr["met"] is True
    orin = next(t for k, t in targets.items() if k.startswith("ESTIMATE"))
    assert orin["value"] > 0 and orin["display"].startswith("est.") and orin["plot"] is False
    piped = [t for k, t in targets.items() if k.startswith("student, pipelined")]
    assert any(t["target"] == ">= 0.9" for t in piped)
    names = result.names()
    assert (
        "student: student int8 (32 px)" in names and "student: paper ensemble int8 (32 px)" in names
    )
    assert any(n.startswith("student pipelined: ") for n in names)
    assert any("roofline ESTIMATE" in n for n in result.config["notes"])
    # Rendered: values that are not speed-ups print as themselves; only ratios are plotted.
    paths = write_outputs(result, tmp_path / "out", extra_plots=_ratio_plot)
    text = paths["markdown"].read_text()
    assert orin["display"] in text and max_abs["display"] in text
    plotted = {t["ratio"] for t in _plotted(result)}
    assert int8["ratio"] in plotted and orin["ratio"] not in plotted
    assert paths["ratios_png"].stat().st_size > 1000


def _report(auroc: float, pg: float, **kw) -> dict:
    loc = {"macro": {"pointing_game_tol": pg}, "tolerance": 0.04}
    return {"n": 10, "split": "test", "macro": {"auroc": auroc}, "localisation": loc, **kw}


def test_student_accuracy_rows_from_reports(tmp_path):
    """The accuracy rows read two eval reports; missing ones are 'not measured', never zero."""
    from student import StudentOptions, _accuracy_rows
    from suite import ScenarioResult

    from fundus_edge.fileio import atomic_write_json

    st, te = tmp_path / "s.json", tmp_path / "t.json"
    atomic_write_json(st, _report(0.88, 0.70))
    atomic_write_json(te, _report(0.90, 0.75))
    targets = {"auroc_ratio": ">= 0.98", "pointing_drop": "<= 0.02"}
    res = ScenarioResult("student")
    _accuracy_rows(res, None, StudentOptions(student_eval=str(st), teacher_eval=str(te)), targets)
    auroc, pg = res.targets
    assert auroc["value"] == pytest.approx(0.88 / 0.90) and auroc["met"] is False
    assert pg["value"] == pytest.approx(0.05) and pg["met"] is False
    assert "0.9778" in auroc["display"]

    res = ScenarioResult("student")
    _accuracy_rows(
        res,
        None,
        StudentOptions(student_eval=str(tmp_path / "none.json"), teacher_eval=str(te)),
        targets,
    )
    assert [t["value"] for t in res.targets] == [None, None]
    assert [t["met"] for t in res.targets] == [None, None]
    assert all(t["display"] == "not measured" for t in res.targets)
    assert any("does not exist" in n for n in res.notes)

    atomic_write_json(st, _report(0.88, 0.70, split="val"))
    with pytest.raises(UserError, match="differ in split"):
        _accuracy_rows(
            ScenarioResult("student"),
            None,
            StudentOptions(student_eval=str(st), teacher_eval=str(te)),
            targets,
        )
    atomic_write_json(st, {"n": 3})
    with pytest.raises(UserError, match="not an eval report"):
        _accuracy_rows(
            ScenarioResult("student"),
            None,
            StudentOptions(student_eval=str(st), teacher_eval=str(te)),
            targets,
        )


def test_student_options_are_checked():
    from student import StudentOptions

    from fundus_edge.perf.roofline import JETSON_PEAKS

    assert "orin-nano-8gb-super" in JETSON_PEAKS
    assert StudentOptions().roofline_device in JETSON_PEAKS
    opts = StudentOptions(targets={"pipelined": ">= 0.8"}, pipelined={"frames": 4})
    assert opts.all_targets()["pipelined"] == ">= 0.8" and opts.all_targets()["auroc_ratio"]
    # the student's target is the pipelined run's, unless its own options give one
    assert (opts.pipelined_options().target, opts.pipelined_options().frames) == (">= 0.8", 4)
    mine = StudentOptions(pipelined={"target": ">= 0.5"}).pipelined_options()
    assert mine.target == ">= 0.5"
    with pytest.raises(UserError, match=r"targets: unknown target 'speed'"):
        StudentOptions(targets={"speed": ">= 2"})
    with pytest.raises(UserError, match="must read"):
        StudentOptions(targets={"orin_nano_fps": "60"})
    with pytest.raises(UserError, match=r"pipelined\.model: the student's pipelined run uses"):
        StudentOptions(pipelined={"model": {"members": ["resnet18"]}})


@pytest.mark.parametrize(
    ("scenario", "body", "message"),
    [
        (
            "student",
            "{studnet: x.safetensors}",
            r"scenarios\.student: unknown key studnet \(known: ",
        ),
        ("student", "{rounds: many}", r"scenarios\.student: rounds: expected int, got 'many'"),
        (
            "student",
            "{pipelined: {fram: 640x480}}",
            r"scenarios\.student: pipelined: unknown key fram",
        ),
        ("student", "{targets: {speed: '>= 2'}}", r"scenarios\.student: targets: unknown target"),
        ("pipelined", "{frmaes: 90}", r"scenarios\.pipelined: unknown key frmaes \(known: "),
        ("pipelined", "{camera: maybe}", r"scenarios\.pipelined: camera: expected bool"),
        ("pipelined", "{frame: 1920by1080}", r"scenarios\.pipelined: frame: WIDTHxHEIGHT"),
        ("pipelined", "{sink: screen}", r"scenarios\.pipelined: sink: video or jsonl"),
        ("pipelined", "{model_threads: []}", r"scenarios\.pipelined: model_threads: at least one"),
        ("pipelined", "{streams: 0}", r"scenarios\.pipelined: streams: must be >= 1, got 0"),
        ("pipelined", "{backend: auto, threads: 1}", r"scenarios\.pipelined: threads and model_"),
    ],
)
def test_pipelined_and_student_options_refused_when_the_suite_is_read(
    tmp_path, scenario, body, message
):
    """A typo in a pipelined or student scenario is one line naming the file and the key,
    before anything is built or timed."""
    p = tmp_path / "s.yaml"
    p.write_text(f"name: x\nscenarios:\n  {scenario}: {body}\n")
    with pytest.raises(UserError, match=rf"^{p}: suite 'x': {message}") as exc:
        load_suite(p)
    assert "\n" not in str(exc.value)


def test_pipelined_and_student_options_resolve_as_the_suites_give_them(repo_root):
    """Every checked-in suite's pipelined and student options resolve to their dataclasses,
    with the values the files give (and the defaults the scenarios used before)."""
    from pipelined import PipelinedOptions
    from student import StudentOptions

    scen = repo_root / "bench" / "scenarios"
    piped = load_suite(scen / "pipelined-student.yaml").scenarios["pipelined"]
    assert isinstance(piped, PipelinedOptions)
    assert piped.frame_shape() == (1920, 1080) and piped.model_threads == [1, 0]
    assert (piped.frames, piped.sink, piped.camera_seconds, piped.camera_rate) == (
        90, "jsonl", 4.0, 1.5,
    )  # fmt: skip
    assert piped.model["members"] == ["mobilenet_v3_large_os16"] and piped.threads == 1
    full = load_suite(scen / "full.yaml").scenarios["pipelined"]
    assert full == PipelinedOptions(rounds=3, frames=12, frame_size=512, target=">= 0.9")
    assert full.frame_shape() == (512, 512) and full.threads is None
    assert load_suite(scen / "cpu-runtimes.yaml").scenarios["pipelined"].backend == "auto"
    student = load_suite(scen / "student.yaml").scenarios["student"]
    assert isinstance(student, StudentOptions) and student.split == "test"
    assert (student.rounds, student.iters, student.warmup, student.calib_images) == (6, 3, 2, 8)
    sp = student.pipelined_options()
    assert (sp.frames, sp.camera, sp.rounds, sp.target) == (90, True, 3, ">= 0.9")
