"""Roofline counting on graphs whose FLOPs and bytes are computed by hand here."""

from __future__ import annotations

import io
import json

import pytest

from fundus_edge.errors import DataError, UserError
from fundus_edge.perf.roofline import (
    JETSON_PEAKS,
    DevicePeak,
    count_graph,
    estimate,
    peaks_from_dict,
    roofline,
)

onnx = pytest.importorskip("onnx", reason="onnx is not installed (a base dependency)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

np = pytest.importorskip("numpy")


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _by_op(cost):
    return {layer.op_type: layer for layer in cost.layers}


F = TensorProto.FLOAT


def test_conv_relu_pool_by_hand():
    m = _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["p"], ["g"]),
            helper.make_node("Flatten", ["g"], ["y"]),
        ],
        [("x", F, ["N", 3, 8, 8])],
        ["y"],
        [("w", [4, 3, 3, 3]), ("b", [4])],
    )
    cost = count_graph(m, batch=2)
    ops = _by_op(cost)
    # Conv: out [2,4,8,8] = 512 elements, each 3 * 3*3 = 27 MACs.
    assert ops["Conv"].macs == 512 * 27 == 13824
    assert ops["Conv"].flops == 2 * 13824
    assert ops["Conv"].weight_elems == 108 + 4
    assert ops["Conv"].float_act_elems == 2 * 3 * 64 + 512
    assert ops["Conv"].bytes_at("fp16") == (112 + 384 + 512) * 2
    assert ops["Conv"].bytes_at("int8") == 112 + 384 + 512
    assert ops["Relu"].flops == 512
    assert ops["MaxPool"].flops == 2 * 4 * 4 * 4 * 4  # 128 outputs x 2x2 kernel
    assert ops["GlobalAveragePool"].flops == 128  # one per input element
    assert ops["Flatten"].bytes_at("fp32") == 0 and ops["Flatten"].flops == 0  # free view
    assert cost.macs == 13824
    assert cost.flops == 2 * 13824 + 512 + 512 + 128
    assert cost.params == 112
    assert cost.uncounted_ops == {}
    assert cost.input_shapes == {"x": [2, 3, 8, 8]}


def test_gemm_matmul_grouped_and_transposed_conv():
    m = _model(
        [
            helper.make_node("Gemm", ["a", "wg", "bg"], ["g"], transB=1),
            helper.make_node("MatMul", ["m", "wm"], ["mm"]),
            helper.make_node("Conv", ["d", "wd"], ["dc"], group=8, pads=[1, 1, 1, 1]),
            helper.make_node("ConvTranspose", ["t", "wt"], ["tc"], strides=[2, 2]),
        ],
        [
            ("a", F, ["N", 16]),
            ("m", F, ["N", 3, 4, 5]),
            ("d", F, ["N", 8, 6, 6]),
            ("t", F, ["N", 4, 5, 5]),
        ],
        ["g", "mm", "dc", "tc"],
        [
            ("wg", [10, 16]),
            ("bg", [10]),
            ("wm", [5, 6]),
            ("wd", [8, 1, 3, 3]),
            ("wt", [4, 2, 3, 3]),
        ],
    )
    ops = _by_op(count_graph(m, batch=3))
    assert ops["Gemm"].macs == 3 * 10 * 16  # [3,16] x [16,10]
    assert ops["MatMul"].macs == 3 * 3 * 4 * 6 * 5  # [3,3,4,5] x [5,6]
    assert ops["Conv"].macs == 3 * 8 * 36 * 9  # depthwise: 1 input channel per output
    # ConvTranspose: 3*100 input elements each scatter into Cout 2 x 3x3 outputs.
    assert ops["ConvTranspose"].macs == 3 * 4 * 25 * 2 * 9


def test_resize_sigmoid_softmax_and_uncounted():
    m = _model(
        [
            helper.make_node("Sigmoid", ["x"], ["s"]),
            helper.make_node("Resize", ["s", "", "scales"], ["r"], mode="linear"),
            helper.make_node("Softmax", ["r"], ["sm"], axis=1),
            helper.make_node("ReduceMax", ["sm"], ["mx"], keepdims=1),
            helper.make_node("Einsum", ["mx", "mx"], ["e"], equation="nchw,nchw->nchw"),
        ],
        [("x", F, ["N", 2, 4, 4])],
        ["e"],
        [("scales", [4])],
    )
    # scales must hold values for shape inference: give them real numbers.
    m.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    )
    cost = count_graph(m, batch=1)
    ops = _by_op(cost)
    assert ops["Sigmoid"].flops == 4 * 32
    assert ops["Resize"].flops == 4 * 128  # 2x upsampled [1,2,8,8]
    assert ops["Softmax"].flops == 5 * 128
    assert ops["ReduceMax"].flops == 128
    assert cost.uncounted_ops == {"Einsum": 1}
    assert ops["Einsum"].flops == 0 and ops["Einsum"].bytes_at("fp32") > 0


def test_uint8_input_keeps_its_size():
    m = _model(
        [helper.make_node("Cast", ["img"], ["f"], to=F)],
        [("img", TensorProto.UINT8, ["N", 4, 4, 3])],
        ["f"],
    )
    (cast,) = count_graph(m, batch=1).layers
    assert cast.other_bytes == 48  # uint8 image at 1 byte
    assert cast.bytes_at("fp16") == 48 + 48 * 2


def test_estimate_by_hand_and_bounds():
    m = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        [("x", F, [1, 16, 32, 32])],
        ["y"],
        [("w", [32, 16, 3, 3])],
    )
    cost = count_graph(m)
    conv, relu = cost.layers
    dev = DevicePeak("toy", "Toy", sparse_int8_tops=8.0, bandwidth_gbs=1.0)
    assert dev.dense_int8_tops == 4.0 and dev.dense_fp16_tflops == 2.0
    (fp16,) = estimate(cost, [dev], precisions=["fp16"])
    want = max(conv.flops / 2e12, conv.bytes_at("fp16") / 1e9) + max(
        relu.flops / 2e12, relu.bytes_at("fp16") / 1e9
    )
    assert fp16.latency_ms == pytest.approx(want * 1e3)
    assert fp16.memory_bound_layers == 2  # 1 GB/s: everything waits on memory
    assert fp16.kind == "roofline-estimate"
    # A compute-starved device flips the bound.
    slow = DevicePeak("slow", "Slow", sparse_int8_tops=4e-6, bandwidth_gbs=1e6)
    (e,) = estimate(cost, [slow], precisions=["int8"])
    assert e.compute_bound_layers == 2
    assert e.latency_ms == pytest.approx(cost.flops / 2e6 * 1e3)  # dense INT8 = 2e6 ops/s
    with pytest.raises(UserError, match="fp32"):
        estimate(cost, [dev], precisions=["fp32"])


def test_jetson_peak_table_and_override():
    nano = JETSON_PEAKS["orin-nano-8gb-super"]
    assert nano.peak_ops("int8") == 33.5e12  # 67 sparse TOPS / 2
    assert nano.peak_ops("fp16") == 16.75e12  # dense INT8 / 2
    assert JETSON_PEAKS["agx-orin-64gb"].peak_ops("fp16") == 68.75e12
    assert set(JETSON_PEAKS) == {"orin-nano-8gb-super", "orin-nx-16gb", "agx-orin-64gb"}
    assert "sparse INT8 / 2" in nano.to_dict()["derivation"]
    custom = peaks_from_dict(
        {"thor": {"name": "Thor", "sparse_int8_tops": 2000, "bandwidth_gbs": 273}}
    )
    assert custom["thor"].dense_fp16_tflops == 500.0
    with pytest.raises(DataError, match="'bad'"):
        peaks_from_dict({"bad": {"sparse_int8_tops": 1}})
    with pytest.raises(DataError, match="'neg'"):
        peaks_from_dict({"neg": {"sparse_int8_tops": -1, "bandwidth_gbs": 1}})


def test_input_shape_errors(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, ["N", 3, "H", "W"])], ["y"])
    with pytest.raises(UserError, match="'x' dimension 2 is dynamic"):
        count_graph(m)
    assert count_graph(m, input_size=5).input_shapes == {"x": [1, 3, 5, 5]}
    assert count_graph(m, input_shapes={"x": [1, 3, 4, 6]}).layers[0].flops == 72
    with pytest.raises(UserError, match="rank"):
        count_graph(m, input_shapes={"x": [1, 3]})
    fixed = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [1, 3])], ["y"])
    with pytest.raises(UserError, match="fixed batch of 1"):
        count_graph(fixed, batch=4)
    with pytest.raises(UserError, match="not found"):
        count_graph(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(DataError, match=r"junk\.onnx"):
        count_graph(junk)


def test_roofline_section_from_file(tmp_path):
    m = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [("x", F, ["N", 3, "H", "W"])],
        ["y"],
        [("w", [8, 3, 3, 3])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    r = roofline(path, batch=2, input_size=16)
    json.dumps(r)
    assert r["kind"] == "roofline-estimate"
    assert r["macs"] == 2 * 8 * 16 * 16 * 27
    assert r["flops"] == 2 * r["macs"]
    assert len(r["estimates"]) == 6  # 3 devices x (fp16, int8)
    assert {e["kind"] for e in r["estimates"]} == {"roofline-estimate"}
    assert r["bytes"]["fp16"] == 2 * r["bytes"]["int8"]
    by = {(e["device"], e["precision"]): e for e in r["estimates"]}
    # INT8 halves both bytes and compute time on the same device.
    assert by[("orin-nx-16gb", "int8")]["latency_ms"] == pytest.approx(
        by[("orin-nx-16gb", "fp16")]["latency_ms"] / 2
    )
    assert "not a measurement" in r["note"] and "2 x MACs" in r["conventions"]


def _export(model, x, **kw):
    torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model.eval(), x, buf, dynamo=False, **kw)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
def test_tiny_torch_net_by_hand():
    torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),  # folded into the conv at export
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    m = _export(
        net,
        torch.zeros(1, 3, 32, 32),
        input_names=["x"],
        dynamic_axes={"x": {0: "N"}},
    )
    cost = count_graph(m, batch=4)
    conv_macs = 4 * 8 * 32 * 32 * 3 * 9
    fc_macs = 4 * 5 * 8
    assert cost.macs == conv_macs + fc_macs
    relu = 4 * 8 * 32 * 32
    gap = relu
    assert cost.flops == 2 * (conv_macs + fc_macs) + relu + gap
    assert cost.params == 8 * 27 + 8 + 5 * 8 + 5


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
def test_resnet18_matches_published_macs():
    tv = pytest.importorskip("torchvision", reason="torchvision is not installed (extra: train)")
    torch = pytest.importorskip("torch")
    m = _export(
        tv.models.resnet18(weights=None),
        torch.zeros(1, 3, 224, 224),
        input_names=["x"],
        dynamic_axes={"x": {0: "N"}},
    )
    r = roofline(m, batch=1)
    assert r["macs"] == pytest.approx(1.814e9, rel=0.05)
    assert r["flops"] == pytest.approx(2 * 1.814e9, rel=0.05)
    assert r["params"] == pytest.approx(11.69e6, rel=0.01)  # BN folded into the convs
    assert r["uncounted_ops"] == {}
    assert count_graph(m, batch=2).macs == 2 * r["macs"]
    by = {(e["device"], e["precision"]): e["latency_ms"] for e in r["estimates"]}
    # Bigger module, faster estimate; all well under the MLPerf ResNet-50 measurements.
    assert by[("agx-orin-64gb", "fp16")] < by[("orin-nx-16gb", "fp16")]
    assert by[("orin-nx-16gb", "fp16")] < by[("orin-nano-8gb-super", "fp16")]
    assert 0.01 < by[("agx-orin-64gb", "int8")] < 0.64
