"""export: one fused graph, proven parity, reduced precision, hygiene, TensorRT code paths, Triton."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs torch (pip install 'fundus-edge[train]')")
onnx = pytest.importorskip("onnx", reason="export needs onnx")
pytest.importorskip("pytorch_grad_cam", reason="parity checks need grad-cam")

from _models import settle_batchnorm  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fundus_edge.artifact import read_metadata  # noqa: E402
from fundus_edge.cli import app  # noqa: E402
from fundus_edge.convert import hygiene, tensorrt  # noqa: E402
from fundus_edge.convert.chain import export_model  # noqa: E402
from fundus_edge.convert.export_config import ExportConfig, load_profile  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint  # noqa: E402

LABELS = ("Disease_Risk", "DR", "ARMD", "MH")
runner = CliRunner()


def _checkpoint(
    path: Path, members=("resnet18", "vgg11_bn"), member_head="gap", size=64, head="average"
) -> Path:
    torch.manual_seed(0)
    cfg = EnsembleConfig(
        members=members,
        member_head=member_head,
        head=head,
        num_classes=len(LABELS),
        label_names=LABELS,
        image_size=size,
    )
    # Real batch statistics: random-init BN running stats make every map constant.
    ens = settle_batchnorm(build_ensemble(cfg), size)
    return save_checkpoint(path, ens, thresholds=[0.4, 0.5, 0.5, 0.6])


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(tmp / "small.safetensors")
    out = tmp / "out"
    report = export_model(ExportConfig(model=str(ckpt), out=str(out), verify_images=2))
    return ckpt, out, report


def test_fp32_parity_and_contract(small_export):
    _ckpt, out, report = small_export
    assert report["passed"]
    ovt = report["checks"]["onnxruntime_vs_pytorch"]
    assert ovt["probs_max_abs"] <= 1e-4 and ovt["logits_max_abs"] <= 1e-3
    gc = report["checks"]["cams_vs_gradcam"]
    assert gc["max_abs"] <= 1e-2 and gc["min_correlation"] >= 0.999
    assert gc["maps_compared"] > 0
    meta = read_metadata(out / "model.onnx")
    assert meta["label_names"] == list(LABELS)
    assert meta["thresholds"] == [0.4, 0.5, 0.5, 0.6]
    assert meta["input_size"] == 64 and meta["screening_label"] == "Disease_Risk"
    assert meta["members"] == ["resnet18", "vgg11_bn"]
    assert len(meta["source_checkpoint_sha256"]) == 64
    m = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in m.graph.input] == ["image"]
    assert [o.name for o in m.graph.output] == ["probs", "logits", "cams", "attention"]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert json.loads((out / "export_report.json").read_text())["passed"] is True


def test_dynamic_batch_runs(small_export):
    import onnxruntime as ort

    _, out, _ = small_export
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        probs, logits, cams, att = sess.run(None, {"image": np.zeros((n, 64, 64, 3), np.uint8)})
        assert probs.shape == (n, 4) and logits.shape == (n, 2, 4)
        assert cams.shape[:3] == (n, 2, 4) and att.shape[:2] == (n, 1)


def test_hygiene_passes_and_rejects_unsupported(small_export, tmp_path):
    _, out, _ = small_export
    rep = hygiene.check_graph(out / "model.onnx")
    assert rep.errors == [] and "Conv" in rep.ops
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    g = helper.make_graph([helper.make_node("Unique", ["x"], ["y"], name="dedupe")], "g", [x], [y])
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    with pytest.raises(UserError, match=r"dedupe.*Unique"):
        hygiene.check_graph(bad)
    # MaxPool with its Indices output.
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    yo = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])
    io = helper.make_tensor_value_info("i", TensorProto.INT64, [1, 1, 3, 3])
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], name="pool_idx", kernel_shape=[2, 2])
    g2 = helper.make_graph([node], "g2", [xi], [yo, io])
    bad2 = tmp_path / "bad2.onnx"
    onnx.save(helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)]), str(bad2))
    with pytest.raises(UserError, match=r"pool_idx.*Indices"):
        hygiene.check_graph(bad2)
    # Opset outside TensorRT 10's range.
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    m.opset_import[0].version = 21
    errs, _ = hygiene.tensorrt_compatibility(m)
    assert any("opset 21" in e for e in errs)


def test_fp16_onnx_within_tolerance(small_export, tmp_path):
    ckpt, _, _ = small_export
    rep = export_model(
        ExportConfig(
            model=str(ckpt), out=str(tmp_path), precision="fp16", verify_images=2, simplify=False
        )
    )
    chk = rep["checks"]["fp16_vs_fp32"]
    assert chk["passed"] and chk["probs_max_abs"] <= 1e-2
    assert chk["cams_correlation"]["overall"] >= 0.99
    m = onnx.load(str(tmp_path / "model.fp16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert read_metadata(tmp_path / "model.fp16.onnx")["precision"] == "fp16"


def test_int8_qdq_with_calibration(small_export, tmp_path):
    from fundus_edge.synth import generate_dataset

    ckpt, _, _ = small_export
    data = tmp_path / "data"
    generate_dataset(data, n=16, size=96, seed=3)
    with pytest.raises(UserError, match="--calib"):
        export_model(ExportConfig(model=str(ckpt), out=str(tmp_path / "x"), precision="int8"))
    rep = export_model(
        ExportConfig(
            model=str(ckpt),
            out=str(tmp_path / "q"),
            precision="int8",
            calib=str(data),
            calib_count=8,
            verify_images=2,
            simplify=False,
        )
    )
    q8 = tmp_path / "q" / "model.int8.onnx"
    ops = {n.op_type for n in onnx.load(str(q8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # --format onnx -> the CPU variant: u8 activations, which TensorRT would refuse.
    assert rep["quantization"]["target"] == "cpu" and rep["quantization"]["quantize_nodes"] > 0
    chk = rep["checks"]["int8_vs_fp32"]
    assert "auroc" in chk and "images" in chk["auroc"]
    assert chk["probs_max_abs"] < 0.5  # sanity: quantisation did not break the graph
    hygiene.check_graph(q8, tensorrt=False)
    with pytest.raises(UserError, match="zero point must be 0"):
        hygiene.check_graph(q8)
    # The TensorRT variant: symmetric s8 Q/DQ that passes the TensorRT check.
    from fundus_edge.convert.quantize import onnx_to_int8
    from fundus_edge.convert.verify import ort_outputs

    calib = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    trt8 = tmp_path / "trt8.onnx"
    rec = onnx_to_int8(_fp32_of(ckpt, tmp_path), trt8, calib, "minmax", target="tensorrt")
    assert rec["activations"] == "int8 symmetric"
    hygiene.check_graph(trt8)
    assert ort_outputs(trt8, calib[:1])["probs"].shape == (1, 4)


def _fp32_of(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "fp32"
    export_model(ExportConfig(model=str(ckpt), out=str(out), verify=False, simplify=False))
    return out / "model.onnx"


def test_engine_without_tensorrt_exits_2_but_writes_onnx(small_export, tmp_path):
    if tensorrt_available():
        pytest.skip("TensorRT is installed here: the no-TensorRT path cannot be exercised")
    ckpt, _, _ = small_export
    res = runner.invoke(
        app,
        [
            "export",
            "--model",
            str(ckpt),
            "--out",
            str(tmp_path),
            "--format",
            "engine",
            "--no-verify",
            "--no-simplify",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "JetPack" in res.output and "target device" in res.output
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "export_report.json").is_file()


def tensorrt_available() -> bool:
    try:
        import tensorrt as _  # noqa: F401
    except ImportError:
        return False
    return True


def test_triton_repository_parses_with_tritons_protobuf(small_export, tmp_path):
    pb = pytest.importorskip(
        "tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]"
    )
    from google.protobuf import text_format

    ckpt, _, _ = small_export
    rep = export_model(
        ExportConfig(
            model=str(ckpt),
            out=str(tmp_path),
            format="triton",
            verify=False,
            simplify=False,
            triton_max_batch=8,
            name="fundus",
        )
    )
    repo = tmp_path / rep["artifacts"]["triton"]["path"]
    assert (repo / "1" / "model.onnx").is_file()
    cfg = text_format.Parse((repo / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.name == "fundus" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert [i.name for i in cfg.input] == ["image"] and cfg.input[0].data_type == pb.TYPE_UINT8
    assert list(cfg.input[0].dims) == [64, 64, 3]
    assert [o.name for o in cfg.output] == ["probs", "logits", "cams", "attention"]
    assert list(cfg.output[0].dims) == [4]
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    contract = json.loads(cfg.parameters["fundus_edge"].string_value)
    assert contract["label_names"] == list(LABELS)


def test_profiles_load_and_cli_overrides(tmp_path):
    root = Path(__file__).resolve().parents[1] / "export"
    names = sorted(p.stem for p in root.glob("*.yaml"))
    assert {"jetson-orin-nano-fp16", "agx-orin-int8", "x86-cpu-int8", "triton-gpu"} <= set(names)
    for n in names:
        ExportConfig(**{**load_profile(n), "model": "x"})
    assert load_profile("jetson-orin-nano-fp16")["precision"] == "fp16"
    bad = tmp_path / "bad.yaml"
    bad.write_text("precison: fp16\n")
    with pytest.raises(UserError, match="precison"):
        load_profile(bad)
    res = runner.invoke(
        app, ["export", "--model", str(tmp_path / "nope.safetensors"), "--profile", str(bad)]
    )
    assert res.exit_code == 2 and "precison" in res.output
    res = runner.invoke(app, ["export", "--model", str(tmp_path / "nope.safetensors")])
    assert res.exit_code == 2 and "nope.safetensors" in res.output


# --- TensorRT builder, exercised against a fake `tensorrt` module (no GPU here) -------------


class _FakeTRT(types.ModuleType):
    """Just enough of the TensorRT 10 Python API to drive onnx_to_engine's control flow."""

    def __init__(self, parse_ok=True, build_ok=True):
        super().__init__("tensorrt")
        self.__version__ = "10.3.0.26"
        self.float32, self.float16 = "float32", "float16"
        self.calls: list = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class BuilderFlag:
            FP16, INT8, OBEY_PRECISION_CONSTRAINTS = "FP16", "INT8", "OBEY"

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 5

        class Tensor:
            def __init__(self, name, shape, dtype="float32"):
                self.name, self.shape, self.dtype = name, shape, dtype

        class Layer:
            def __init__(self, name):
                self.name, self.precision, self.num_outputs = name, None, 1
                self.out_types = {}

            def get_output(self, j):
                return Tensor("o", (), "float32")

            def set_output_type(self, j, t):
                self.out_types[j] = t

        class Network:
            def __init__(self):
                self.layers = [
                    Layer("/ensemble/members.0/features/Conv"),
                    Layer("/ensemble/attention_from/ReduceMax"),
                    Layer("/ensemble/Sigmoid"),
                ]
                self.num_layers = len(self.layers)

            def get_layer(self, i):
                return self.layers[i]

            def get_input(self, i):
                return Tensor("image", (-1, 64, 64, 3), "uint8")

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, net, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return parse_ok

            def get_error(self, i):
                return "In node 3 (importFoo): UNSUPPORTED_NODE"

        class Cache:
            def serialize(self):
                return b"CACHE"

        class Config:
            def __init__(self):
                self.flags = set()

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def set_flag(self, f):
                self.flags.add(f)
                fake.calls.append(("flag", f))

            def add_optimization_profile(self, p):
                fake.calls.append(("profile", p.shapes))

            def create_timing_cache(self, data):
                fake.calls.append(("cache_in", data))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def __init__(self):
                self.shapes = None

            def set_shape(self, name, lo, opt, hi):
                self.shapes = (name, lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, net, config):
                return b"PLAN" if build_ok else None

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.BuilderFlag, self.MemoryPoolType = BuilderFlag, MemoryPoolType
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag


def test_onnx_to_engine_with_fake_tensorrt(small_export, tmp_path, monkeypatch):
    _, out, _ = small_export
    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt, "gpu_compute_capability", lambda: "8.7")
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes((out / "model.onnx").read_bytes())
    eng = tensorrt.onnx_to_engine(
        onnx_path, precision="fp16", workspace_mb=256, batch=(1, 2, 4), meta={"x": 1}
    )
    assert eng.name == "m.fp16.trt10.3.0.sm87.engine"
    assert eng.read_bytes() == b"PLAN"  # the plan alone, nothing glued in front
    side = json.loads(Path(str(eng) + ".json").read_text())
    assert side["x"] == 1 and side["tensorrt"]["compute_capability"] == "8.7"
    assert side["tensorrt"]["fp32_pinned_layers"] == 2  # attention ReduceMax + Sigmoid
    assert ("workspace", 256 << 20) in fake.calls and ("flag", "FP16") in fake.calls
    assert ("profile", ("image", (1, 64, 64, 3), (2, 64, 64, 3), (4, 64, 64, 3))) in fake.calls
    assert (tmp_path / "tensorrt.timing.cache").read_bytes() == b"CACHE"
    # Up to date: reused without building.
    fake.calls.clear()
    assert tensorrt.onnx_to_engine(onnx_path, precision="fp16") == eng
    assert not any(c[0] == "parse" for c in fake.calls)
    # Another GPU: stale -> refused under rebuild="never", rebuilt under "stale".
    monkeypatch.setattr(tensorrt, "gpu_compute_capability", lambda: "8.6")
    reasons = tensorrt.engine_staleness(eng, fake.__version__, "8.6")
    assert any("compute capability 8.7" in r for r in reasons)
    with pytest.raises(UserError, match="stale engine"):
        tensorrt.onnx_to_engine(onnx_path, engine_path=eng, precision="fp16", rebuild="never")
    # The timing cache persisted before is fed back to the builder.
    fake.calls.clear()
    tensorrt.onnx_to_engine(onnx_path, engine_path=eng, precision="fp16")
    assert ("cache_in", b"CACHE") in fake.calls


def test_onnx_to_engine_reports_parser_and_build_failures(small_export, tmp_path, monkeypatch):
    _, out, _ = small_export
    monkeypatch.setattr(tensorrt, "gpu_compute_capability", lambda: "8.7")
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes((out / "model.onnx").read_bytes())
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT(parse_ok=False))
    with pytest.raises(UserError, match=r"could not parse.*UNSUPPORTED_NODE"):
        tensorrt.onnx_to_engine(onnx_path)
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT(build_ok=False))
    with pytest.raises(UserError, match="raise --workspace"):
        tensorrt.onnx_to_engine(onnx_path, workspace_mb=128)
    monkeypatch.delitem(sys.modules, "tensorrt")
    monkeypatch.setattr("builtins.__import__", _block("tensorrt"))
    with pytest.raises(Exception, match="fundus-edge\\[trt\\]"):
        tensorrt.onnx_to_engine(onnx_path)


def _block(name):
    import builtins

    real = builtins.__import__

    def fake_import(mod, *a, **k):
        if mod == name or mod.startswith(name + "."):
            raise ImportError(f"No module named '{name}'")
        return real(mod, *a, **k)

    return fake_import


@pytest.mark.slow
def test_vgg19_resnet50_paper_ensemble_parity_tiny(tmp_path):
    """The paper's ensemble (VGG19 MLP head + ResNet50) at 64 px: VGG's 2x2 map pools to 7x7
    through the exported pooling matrix; maps match grad-cam and ORT matches PyTorch."""
    ckpt = _checkpoint(
        tmp_path / "paper.safetensors", members=("vgg19", "resnet50"), member_head="native"
    )
    rep = export_model(
        ExportConfig(model=str(ckpt), out=str(tmp_path / "out"), verify_images=2, simplify=False)
    )
    assert rep["passed"]
    ovt = rep["checks"]["onnxruntime_vs_pytorch"]
    assert ovt["probs_max_abs"] <= 1e-4 and ovt["logits_max_abs"] <= 1e-3
    gc = rep["checks"]["cams_vs_gradcam"]
    assert gc["members"] == ["vgg19", "resnet50"]
    assert gc["max_abs"] <= 1e-2 and gc["min_correlation"] >= 0.999 and gc["maps_compared"] >= 4


def test_gradcam_parity_of_members_on_different_grids(tmp_path):
    """An output-stride-16 member first (4x4 at 64 px), a stride-32 one resampled onto its grid:
    the resampled member is still checked against the package's own map, and a wrong map fails."""
    from fundus_edge.convert import verify
    from fundus_edge.models.checkpoint import load_checkpoint
    from fundus_edge.models.fused import FusedModel

    ckpt = _checkpoint(tmp_path / "mixed.safetensors", members=("resnet18_os16", "resnet18"))
    ens, _meta = load_checkpoint(ckpt)
    fused = FusedModel(ens.eval())
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        cams = fused.predict(torch.from_numpy(imgs))["cams"].numpy()
    assert cams.shape[-2:] == (4, 4)
    gc = verify.gradcam_parity(fused, imgs, cams)
    assert gc["resampled_members"] == ["resnet18"]
    assert gc["max_abs"] <= 1e-2 and gc["min_correlation"] >= 0.999 and gc["maps_compared"] > 0
    wrong = cams.copy()
    wrong[:, 1] = np.flip(wrong[:, 1], axis=-1)  # the resampled member's maps mirrored
    bad = verify.gradcam_parity(fused, imgs, wrong)
    assert bad["max_abs"] > 1e-2 or bad["min_correlation"] < 0.999


# --- staged export: OUT holds the old complete export or the new one, never a mix ------------


def _fast(ckpt: Path, out: Path, **kw) -> ExportConfig:
    return ExportConfig(model=str(ckpt), out=str(out), verify=False, simplify=False, **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_interrupt_keeps_previous_export_and_leaves_no_staging(small_export, tmp_path, monkeypatch):
    from fundus_edge.convert import chain, onnx_export

    ckpt, done, _ = small_export
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.onnx", "export_report.json"):
        (out / name).write_bytes((done / name).read_bytes())
    # An artifact the old report lists that the new export will not make (an FP16 ONNX).
    old_report = json.loads((out / "export_report.json").read_text())
    old_report["artifacts"]["onnx_fp16"] = {"path": "model.fp16.onnx"}
    (out / "export_report.json").write_text(json.dumps(old_report))
    (out / "model.fp16.onnx").write_bytes(b"old fp16")
    before = _snapshot(out)

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    # Ctrl-C at the last step before the swap: every artifact is built, none may land.
    with monkeypatch.context() as m:
        m.setattr(chain, "atomic_write_json", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_model(_fast(ckpt, out, format="triton"))
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)

    # Ctrl-C in the middle of the build, in a folder the export had to create.
    fresh = tmp_path / "new" / "deeper"
    with monkeypatch.context() as m:
        m.setattr(onnx_export, "simplify", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_model(ExportConfig(model=str(ckpt), out=str(fresh), verify=False))
    assert not (tmp_path / "new").exists()

    # Then a complete export: the new report is in place, the old report's extra is gone.
    rep = export_model(_fast(ckpt, out, format="triton"))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["export_report.json", "model.onnx", "triton"]
    assert json.loads((out / "export_report.json").read_text())["deploy"] == rep["deploy"]
    assert (out / "model.onnx").read_bytes() != before["model.onnx"]
    assert read_metadata(out / "triton" / "model" / "1" / "model.onnx")["input_size"] == 64
    assert "max_batch_size: 8\n" in (out / "triton" / "model" / "config.pbtxt").read_text()


def test_sigint_waits_until_the_swap_is_done():
    import os
    import signal

    from fundus_edge.convert.staging import _sigint_deferred

    # The handler in force before is put back (Python's default, or SIG_IGN where the test
    # process was started in the background by a non-interactive shell).
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt), _sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("renames finished")
    assert done == ["renames finished"]
    assert signal.getsignal(signal.SIGINT) is before


def test_engine_build_is_staged_and_a_refused_rebuild_keeps_the_old(
    small_export, tmp_path, monkeypatch
):
    ckpt, _, _ = small_export
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT())
    monkeypatch.setattr(tensorrt, "gpu_compute_capability", lambda: "8.7")
    out = tmp_path / "eng"
    rep = export_model(_fast(ckpt, out, format="engine", precision="fp16", batch=(1, 2, 4)))
    eng = "model.fp16.trt10.3.0.sm87.engine"
    assert rep["deploy"] == eng and rep["artifacts"]["engine"]["path"] == eng
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["export_report.json", "model.onnx", eng, eng + ".json", "tensorrt.timing.cache"]
    )
    assert (out / eng).read_bytes() == b"PLAN"
    # The engine on disk is for another GPU; --rebuild never refuses it and changes nothing.
    side = json.loads((out / (eng + ".json")).read_text())
    side["tensorrt"]["compute_capability"] = "7.2"
    (out / (eng + ".json")).write_text(json.dumps(side))
    before = _snapshot(out)
    with pytest.raises(UserError, match="stale engine"):
        export_model(_fast(ckpt, out, format="engine", precision="fp16", rebuild="never"))
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"calib_method": "foo"}, r"--calib-method 'foo': choose minmax, entropy, percentile"),
        ({"format": "triton", "triton_max_batch": 0}, r"--max-batch 0: must be at least 1"),
        ({"batch": (4, 2, 1)}, r"--batch '4,2,1': need 1 <= min <= opt <= max"),
        ({"batch": (0, 1, 4)}, r"--batch '0,1,4'"),
        ({"batch": (1, 4)}, r"three numbers"),
        ({"calib_count": 0}, r"--calib-count 0"),
        ({"verify_images": 0}, r"verify_images 0"),
        ({"triton_kind": "GPU"}, r"triton_kind 'GPU': choose KIND_GPU, KIND_CPU"),
        ({"name": "a/b"}, r"--name 'a/b'"),
        (
            {"format": "triton", "triton_backend": "engine", "triton_max_batch": 8},
            r"--max-batch 8: above the engine's max batch 4",
        ),
        (
            {"calib_method": "foo", "profile": "p.yaml", "profile_keys": ("calib_method",)},
            r"calib_method: 'foo' in --profile p.yaml",
        ),
    ],
)
def test_config_rejects_bad_options_before_any_work(kw, match):
    with pytest.raises(UserError, match=match):
        ExportConfig(model="m.safetensors", **kw)


def test_triton_config_refuses_max_batch_below_one():
    from fundus_edge.convert.triton import triton_config

    meta = {"input_size": 64, "label_names": ["a"], "members": ["r"], "map_size": [2, 2]}
    assert "max_batch_size: 1\n" in triton_config(meta, "m", "onnxruntime_onnx", max_batch_size=1)
    with pytest.raises(UserError, match="at least 1"):
        triton_config(meta, "m", "onnxruntime_onnx", max_batch_size=0)


def test_cli_fails_fast_naming_the_option_and_the_profile(small_export, tmp_path, monkeypatch):
    from fundus_edge import fileio

    ckpt, _, _ = small_export
    out = tmp_path / "never"

    def cli(*args):
        return runner.invoke(app, ["export", "--model", str(ckpt), "--out", str(out), *args])

    for args, needle in [
        (["--calib-method", "foo"], "--calib-method 'foo'"),
        (["--format", "triton", "--max-batch", "0"], "--max-batch 0"),
        (["--batch", "4,2,1"], "--batch '4,2,1'"),
        (["--calib", str(tmp_path / "nope")], "--calib"),
    ]:
        res = cli(*args)
        assert res.exit_code == 2 and needle in res.output, (args, res.output)
        assert not out.exists()
    res = cli("--profile", "x86-cpu-int8")
    assert res.exit_code == 2, res.output
    assert "x86-cpu-int8.yaml needs --calib" in res.output and "--int8" not in res.output
    assert "--int8 needs --calib" in cli("--int8").output
    # --out: a regular file, or a folder that cannot be written.
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = runner.invoke(app, ["export", "--model", str(ckpt), "--out", str(afile)])
    assert res.exit_code == 2 and f"--out {afile}: is a file" in res.output
    assert len(res.output.strip().splitlines()) == 1

    def denied(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fileio, "probe_writable", denied)
    res = cli()
    assert res.exit_code == 2 and f"--out {out}: cannot write there" in res.output
    assert not out.exists()
