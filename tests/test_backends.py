"""Backends: suffix dispatch, ONNX Runtime on a real tiny graph with the artifact's exact I/O
contract, TensorRT's logic against fake ``tensorrt`` and CUDA modules, PyTorch checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fundus_edge.artifact import read_metadata, sidecar_path
from fundus_edge.backends import (
    OnnxRuntimeBackend,
    TensorRTBackend,
    TorchBackend,
    backend_for,
    load_backend,
)
from fundus_edge.backends.onnxruntime import choose_providers
from fundus_edge.errors import MissingDependencyError, UserError

LABELS = ["Disease_Risk", "DR", "ARMD"]


def make_metadata(size: int = 64, labels: list[str] | None = None, **extra) -> dict:
    """The artifact contract's metadata for a test model."""
    from fundus_edge.preprocess import PreprocessConfig
    from fundus_edge.quality import QualityConfig

    labels = labels or LABELS
    meta = {
        "format": 1,
        "label_names": labels,
        "screening_label": labels[0] if labels[0] == "Disease_Risk" else None,
        "thresholds": [0.5] * len(labels),
        "input_size": size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "preprocess": PreprocessConfig(size=size).to_dict(),
        "quality": QualityConfig().to_dict(),
        "members": ["tiny"],
        "head": "average",
        "precision": "fp32",
        "outputs": ["probs", "logits", "cams", "attention"],
        "versions": {},
    }
    meta.update(extra)
    return meta


def make_onnx_model(
    path: Path,
    size: int = 64,
    stride: int = 8,
    meta: dict | None = None,
    input_dtype: int | None = None,
) -> Path:
    """A tiny real ONNX graph with the exported model's I/O: uint8 NHWC ``image`` ->
    normalise -> conv (class c sees colour channel c) -> ReLU class maps -> GAP -> logits ->
    sigmoid; outputs probs (N,C), logits (N,1,C), cams (N,1,C,h,w), attention (N,1,h,w)."""
    onnx = pytest.importorskip("onnx", reason="onnx is needed to build the test model")
    from onnx import TensorProto, helper, numpy_helper

    meta = meta or make_metadata(size)
    c = len(meta["label_names"])
    h = size // stride
    w = np.zeros((c, 3, stride, stride), np.float32)
    for k in range(c):
        w[k, k % 3] = 1.0 / (stride * stride)  # class k = mean of colour channel k % 3
    mean = np.array(meta["mean"], np.float32).reshape(1, 3, 1, 1) * 255.0
    std = np.array(meta["std"], np.float32).reshape(1, 3, 1, 1) * 255.0
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(mean, "mean"),
        numpy_helper.from_array(std, "std"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["xf"], ["xc"], perm=[0, 3, 1, 2]),  # (N, 3, S, S)
        helper.make_node("Sub", ["xc", "mean"], ["xs"]),
        helper.make_node("Div", ["xs", "std"], ["xn"]),
        helper.make_node("Conv", ["xn", "W"], ["z"], strides=[stride, stride]),  # (N, C, h, h)
        helper.make_node("Relu", ["z"], ["maps"]),
        helper.make_node("ReduceMean", ["z"], ["gap"], axes=[2, 3], keepdims=0),  # (N, C)
        helper.make_node("Sub", ["gap", "one"], ["lg"]),
        helper.make_node("Sigmoid", ["lg"], ["probs"]),
        helper.make_node("Unsqueeze", ["lg", "ax1"], ["logits"]),  # (N, 1, C)
        helper.make_node("Unsqueeze", ["maps", "ax1"], ["cams"]),  # (N, 1, C, h, h)
        helper.make_node("ReduceMean", ["maps"], ["attention"], axes=[1], keepdims=1),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info(
                "image", input_dtype or TensorProto.UINT8, ["N", size, size, 3]
            )
        ],
        [
            helper.make_tensor_value_info("probs", f, ["N", c]),
            helper.make_tensor_value_info("logits", f, ["N", 1, c]),
            helper.make_tensor_value_info("cams", f, ["N", 1, c, h, h]),
            helper.make_tensor_value_info("attention", f, ["N", 1, h, h]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"fundus_edge": json.dumps(meta)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    return make_onnx_model(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


# ------------------------------------------------------------------------------------------------
# Dispatch and metadata
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("m.onnx", OnnxRuntimeBackend),
        ("m.ONNX", OnnxRuntimeBackend),
        ("m.engine", TensorRTBackend),
        ("m.plan", TensorRTBackend),
        ("m.safetensors", TorchBackend),
        ("m.pt", TorchBackend),
    ],
)
def test_backend_chosen_by_suffix(name, cls):
    assert backend_for(name) is cls


def test_unknown_suffix_and_foreign_option_are_user_errors(onnx_model):
    with pytest.raises(UserError, match=r"unknown model type '\.h5'"):
        backend_for("model.h5")
    with pytest.raises(UserError, match="cuda_graph do not apply to the onnxruntime backend"):
        load_backend(onnx_model, cuda_graph=True)
    # None / False options are "not given": a CLI passes all it has.
    b = load_backend(onnx_model, provider=None, device=None, cuda_graph=False)
    assert isinstance(b, OnnxRuntimeBackend)


def test_read_metadata_onnx_and_sidecar(onnx_model, tmp_path):
    meta = read_metadata(onnx_model)
    assert meta["label_names"] == LABELS and meta["input_size"] == 64
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(
        UserError, match=r"m\.engine: TensorRT engine has no metadata sidecar m\.engine\.json"
    ):
        read_metadata(engine)
    sidecar_path(engine).write_text(json.dumps(make_metadata()))
    assert read_metadata(engine)["thresholds"] == [0.5] * 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_names": None}, "lacks label_names"),
        ({"thresholds": [0.5]}, "1 thresholds for 3 labels"),
        ({"format": 99}, "format 99 is not supported"),
        ({"input_size": "big"}, "input_size must be a positive integer"),
        ({"screening_label": "Other"}, "screening_label 'Other' is not one of label_names"),
    ],
)
def test_bad_metadata_names_artifact_and_field(tmp_path, change, message):
    meta = make_metadata()
    for k, v in change.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    side = tmp_path / "bad.json"
    side.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message) as info:
        read_metadata(side)
    assert "bad.json" in str(info.value)


def test_onnx_without_metadata_is_clear(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = make_onnx_model(tmp_path / "nometa.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(UserError, match=r"nometa\.onnx: ONNX model has no 'fundus_edge' metadata"):
        load_backend(path)


# ------------------------------------------------------------------------------------------------
# ONNX Runtime
# ------------------------------------------------------------------------------------------------


def test_onnxruntime_outputs_match_contract_and_reference(onnx_model):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with load_backend(onnx_model) as b:
        assert b.name == "onnxruntime" and b.device == "CPUExecutionProvider"
        out = b.infer(batch)
    assert out["probs"].shape == (3, 3) and out["probs"].dtype == np.float32
    assert out["logits"].shape == (3, 1, 3)
    assert out["cams"].shape == (3, 1, 3, 8, 8)
    assert out["attention"].shape == (3, 1, 8, 8)
    # Reference: class k is the normalised mean of colour channel k, minus 1, through a sigmoid.
    meta = make_metadata()
    xn = (batch / 255.0 - np.array(meta["mean"])) / np.array(meta["std"])
    ref = 1.0 / (1.0 + np.exp(-(xn.mean(axis=(1, 2)) - 1.0)))
    np.testing.assert_allclose(out["probs"], ref, atol=1e-5)


def test_onnxruntime_rejects_wrong_batch_shape(onnx_model):
    b = load_backend(onnx_model)
    with pytest.raises(
        UserError, match=r"input must be uint8 \(N, 64, 64, 3\), got uint8 \(1, 32, 32, 3\)"
    ):
        b.infer(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="got float32"):
        b.infer(np.zeros((1, 64, 64, 3), np.float32))


def test_onnx_input_size_mismatch_names_artifact(tmp_path):
    path = make_onnx_model(tmp_path / "m.onnx", size=64, meta=make_metadata(size=64))
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    model.metadata_props[0].value = json.dumps(make_metadata(size=96))
    onnx.save(model, str(path))
    with pytest.raises(
        UserError, match=r"m\.onnx: input 'image' has shape .*64, 64, 3.*input_size 96"
    ):
        load_backend(path)


def test_onnx_float_input_is_rejected(tmp_path):
    from onnx import TensorProto

    path = make_onnx_model(tmp_path / "f.onnx", input_dtype=TensorProto.FLOAT)
    with pytest.raises(UserError, match=r"f\.onnx: .*image"):
        load_backend(path)


def test_provider_choice():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(avail) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(avail[1:]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(avail, "cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(
        UserError, match="--provider tensorrt: TensorrtExecutionProvider is not available"
    ):
        choose_providers(["CPUExecutionProvider"], "tensorrt")


def test_backend_modules_do_not_import_torch():
    code = (
        "import sys, fundus_edge.backends, fundus_edge.runtime, fundus_edge.artifact;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'tensorrt' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# TensorRT: no TensorRT here, so its logic runs against fakes of the TensorRT 10 API
# ------------------------------------------------------------------------------------------------


def test_tensorrt_missing_is_clear(tmp_path, monkeypatch):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    sidecar_path(engine).write_text(json.dumps(make_metadata()))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(
        MissingDependencyError,
        match=r"needs 'tensorrt' for running TensorRT engines.*fundus-edge\[trt\]",
    ):
        load_backend(engine)


class FakeCuda:
    """Device memory as numbered byte buffers; a stream is just an int."""

    name = "fake"
    stream = 7

    def __init__(self):
        self.mem: dict[int, bytearray] = {}
        self.next = 0x1000
        self.graphs = 0
        self.closed = False

    def malloc(self, n):
        ptr = self.next
        self.next += n + 256
        self.mem[ptr] = bytearray(n)
        return ptr

    def free(self, ptr):
        del self.mem[ptr]

    def htod(self, ptr, host):
        self.mem[ptr][: host.nbytes] = host.tobytes()

    def dtoh(self, host, ptr):
        host.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.mem[ptr], np.uint8, host.nbytes)

    def synchronize(self):
        pass

    def capture_graph(self, launch):
        launch()
        self.graphs += 1
        return ("graph", launch)

    def launch_graph(self, graph):
        graph[1]()

    def destroy_graph(self, graph):
        pass

    def device_name(self):
        return "Fake GPU (sm 8.7)"

    def close(self):
        self.closed = True

    def scope(self):
        import contextlib

        return contextlib.nullcontext()


def fake_tensorrt(
    cuda: FakeCuda, size: int = 64, classes: int = 3, max_batch: int = 2, version="10.3.0"
):
    """A ``tensorrt`` module with the TensorRT 10 calls the backend makes; the "engine"
    computes probs = mean of colour channel k / 255 in numpy on the fake device memory."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class _Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        Severity = _Severity

        def __init__(self):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class DataType:
        UINT8, FLOAT, HALF = "u8", "f32", "f16"

    trt.ILogger, trt.TensorIOMode, trt.DataType = ILogger, TensorIOMode, DataType
    trt.nptype = {"u8": np.uint8, "f32": np.float32, "f16": np.float16}.__getitem__
    h = size // 8
    io = {
        "image": ("in", "u8", (-1, size, size, 3)),
        "probs": ("out", "f32", (-1, classes)),
        "cams": ("out", "f16", (-1, 1, classes, h, h)),
    }

    class Context:
        def __init__(self):
            self.shapes, self.addr, self.runs = {}, {}, 0

        def set_input_shape(self, name, shape):
            assert name == "image" and 1 <= shape[0] <= max_batch, shape
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            n = self.shapes["image"][0]
            return (n, *io[name][2][1:])

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream):
            assert stream == cuda.stream
            self.runs += 1
            n = self.shapes["image"][0]
            x = np.frombuffer(cuda.mem[self.addr["image"]], np.uint8, n * size * size * 3)
            x = x.reshape(n, size, size, 3).astype(np.float32) / 255.0
            probs = np.stack([x[..., k % 3].mean(axis=(1, 2)) for k in range(classes)], 1)
            cams = np.broadcast_to(probs[:, None, :, None, None], (n, 1, classes, h, h))
            for name, arr in (
                ("probs", probs.astype(np.float32)),
                ("cams", cams.astype(np.float16)),
            ):
                raw = np.ascontiguousarray(arr).tobytes()
                cuda.mem[self.addr[name]][: len(raw)] = raw
            return True

    class Engine:
        num_io_tensors = len(io)

        def get_tensor_name(self, i):
            return list(io)[i]

        def get_tensor_mode(self, name):
            return io[name][0]

        def get_tensor_dtype(self, name):
            return io[name][1]

        def get_tensor_shape(self, name):
            return io[name][2]

        def get_tensor_profile_shape(self, name, profile):
            return ((1, size, size, 3), (1, size, size, 3), (max_batch, size, size, 3))

        def create_execution_context(self):
            self.context = Context()
            return self.context

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if data != b"FAKE-PLAN":
                self.logger.log(
                    _Severity.ERROR, "Serialization assertion failed: version tag mismatch"
                )
                return None
            return Engine()

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    import fundus_edge.backends.tensorrt as trt_mod

    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_mod, "open_cuda", lambda: cuda)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"FAKE-PLAN")
    sidecar_path(engine).write_text(json.dumps(make_metadata(versions={"tensorrt": "10.3.0"})))
    return engine, cuda, trt


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_name_based_io_chunks_and_graphs(fake_trt, cuda_graph):
    engine, cuda, _ = fake_trt
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    b = load_backend(engine, cuda_graph=cuda_graph)
    assert b.name == "tensorrt" and b.max_batch == 2
    assert "Fake GPU" in b.device
    out = b.infer(batch)  # 5 frames through a max-batch-2 profile: chunks 2, 2, 1
    ref = np.stack([batch[..., k].mean(axis=(1, 2)) / 255.0 for k in range(3)], 1)
    np.testing.assert_allclose(out["probs"], ref, atol=1e-5)
    assert out["cams"].dtype == np.float32 and out["cams"].shape == (5, 1, 3, 8, 8)
    np.testing.assert_allclose(out["cams"][:, 0, :, 3, 3], ref, atol=2e-3)  # fp16 outputs
    out2 = b.infer(batch)
    np.testing.assert_allclose(out2["probs"], out["probs"])
    assert cuda.graphs == (2 if cuda_graph else 0)  # one graph per batch size (2 and 1)
    b.close()
    assert cuda.mem == {} and cuda.closed
    b.close()  # twice is fine


def test_tensorrt_engine_for_another_gpu_names_both_sides(fake_trt):
    engine, _, _ = fake_trt
    engine.write_bytes(b"OTHER-PLAN")
    with pytest.raises(UserError) as info:
        load_backend(engine)
    msg = str(info.value)
    assert "m.engine" in msg and "TensorRT 10.3.0 on Fake GPU (sm 8.7) cannot load" in msg
    assert "version tag mismatch" in msg and "rebuild it on this device" in msg


def test_tensorrt_input_size_mismatch(fake_trt):
    engine, cuda, _ = fake_trt
    sidecar_path(engine).write_text(json.dumps(make_metadata(size=96)))
    with pytest.raises(
        UserError,
        match=r"m\.engine: input 'image' has shape \[-1, 64, 64, 3\], metadata input_size 96",
    ):
        load_backend(engine)
    assert cuda.mem == {}  # nothing leaked on the failed load


def test_tensorrt_9_is_refused(fake_trt, monkeypatch):
    engine, _, trt = fake_trt
    trt.__version__ = "8.6.1"
    with pytest.raises(UserError, match=r"TensorRT 8\.6\.1 is too old"):
        load_backend(engine)


# ------------------------------------------------------------------------------------------------
# PyTorch checkpoints
# ------------------------------------------------------------------------------------------------


def test_torch_backend_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(UserError, match=r"nope\.safetensors: no such checkpoint"):
        load_backend(tmp_path / "nope.safetensors")


def test_torch_checkpoint_matches_onnx_contract(tmp_path):
    pytest.importorskip("torch", reason="torch runs checkpoints")
    pytest.importorskip("fundus_edge.models.fused", reason="the fused model is not written yet")
    from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint
    from fundus_edge.preprocess import PreprocessConfig

    cfg = EnsembleConfig(
        members=("resnet18",), num_classes=3, label_names=tuple(LABELS), member_head="gap",
        image_size=64,
    )  # fmt: skip
    path = save_checkpoint(
        tmp_path / "m.safetensors",
        build_ensemble(cfg),
        thresholds=[0.4, 0.5, 0.6],
        extra={"preprocess": PreprocessConfig(size=64).to_dict()},
    )
    batch = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with load_backend(path, device="cpu") as b:
        assert b.name == "torch" and b.label_names == LABELS and b.input_size == 64
        assert b.metadata["thresholds"] == [0.4, 0.5, 0.6]
        assert b.metadata["screening_label"] == "Disease_Risk"
        out = b.infer(batch)
    assert out["probs"].shape == (2, 3) and out["probs"].dtype == np.float32
    assert np.all((out["probs"] >= 0) & (out["probs"] <= 1))
    assert out["cams"].shape[:3] == (2, 1, 3) and out["attention"].shape[:2] == (2, 1)
