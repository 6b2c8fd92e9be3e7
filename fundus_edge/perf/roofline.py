"""Roofline latency estimates for Jetson Orin modules, from an ONNX graph alone.

For every node the graph's shapes (after ONNX shape inference at a chosen batch and
input size) give the arithmetic work and the bytes it moves. Its estimated time on a
device is ``max(flops / peak_ops, bytes / peak_bandwidth)``: bound by compute or by
memory, whichever is slower. The model's estimate is the sum over nodes. This is a
*lower bound* by construction (perfect overlap inside a layer, no launch overhead, no
cache reuse across layers, every kernel at datasheet peak): the output says
``kind: "roofline-estimate"`` and must never be reported as a measurement.

Counting conventions (stated in every result under ``"conventions"``):

* FLOPs = 2 x MACs for Conv, ConvTranspose, Gemm and MatMul (a multiply and an add);
  their bias additions are not counted (under 0.1% of a CNN's work). With this,
  torchvision's resnet18 at 224x224 is 1.814 GMACs = 3.63 GFLOPs.
* Element-wise ops: one FLOP per output element per op (Relu, Add, Mul, ...);
  transcendental ops (Sigmoid, Exp, Tanh, Erf, ...) count 4. BatchNormalization: 2 per element.
* Pooling: kernel-size FLOPs per output element; global pooling and reductions: one
  per input element; Softmax: 5 per element; Resize: 4 per output element for
  linear/cubic modes, 0 for nearest (a copy).
* Bytes: every input (weights included) and output of a node, floating-point tensors
  at the chosen precision (fp32 = 4, fp16 = 2, int8 = 1 byte), other tensors at their
  own element size (the uint8 image stays 1 byte, int64 shape tensors 8).
* Shape-only ops (Reshape, Flatten, Squeeze, Unsqueeze, Shape, Constant, Identity,
  Dropout) are free: TensorRT turns them into views or removes them.
* Ops not listed move bytes but count 0 FLOPs; their types are listed under
  ``uncounted_ops`` so a reader knows what the estimate leaves out.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fundus_edge.errors import DataError, UserError, require

__all__ = [
    "BYTES_PER_ELEMENT",
    "CONVENTIONS",
    "JETSON_PEAKS",
    "DevicePeak",
    "GraphCost",
    "LayerCost",
    "RooflineEstimate",
    "count_graph",
    "estimate",
    "peaks_from_dict",
    "roofline",
]

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}

CONVENTIONS = (
    "FLOPs = 2 x MACs for Conv/ConvTranspose/Gemm/MatMul (bias adds not counted); "
    "element-wise ops 1 FLOP per output element (transcendentals 4); pooling kernel-size "
    "FLOPs per output; reductions 1 per input element; Resize linear 4 per output. "
    "Bytes = all node inputs (weights included) + outputs, float tensors at the chosen "
    "precision. Latency = sum over nodes of max(FLOPs / peak ops, bytes / peak bandwidth): "
    "a lower bound, not a measurement."
)


@dataclass(frozen=True)
class DevicePeak:
    """Datasheet peaks of one device.

    Only the sparse INT8 figure and the memory bandwidth are taken from the datasheet;
    the rest is derived, because NVIDIA's Orin datasheets quote sparse INT8 TOPS:

    * dense INT8 ops/s = sparse INT8 / 2 (2:4 structured sparsity doubles the quoted figure,
      and our exported graphs are dense);
    * dense FP16 ops/s = dense INT8 / 2 (Ampere tensor cores: half the INT8 rate).
    """

    key: str
    name: str
    sparse_int8_tops: float
    bandwidth_gbs: float
    source: str = ""

    @property
    def dense_int8_tops(self) -> float:
        return self.sparse_int8_tops / 2

    @property
    def dense_fp16_tflops(self) -> float:
        return self.dense_int8_tops / 2

    def peak_ops(self, precision: str) -> float:
        """Peak operations per second at ``"fp16"`` or ``"int8"`` (dense)."""
        if precision == "int8":
            return self.dense_int8_tops * 1e12
        if precision == "fp16":
            return self.dense_fp16_tflops * 1e12
        raise UserError(
            f"no roofline peak for precision '{precision}' on {self.name}: use fp16 or int8"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense_int8_tops"] = self.dense_int8_tops
        d["dense_fp16_tflops"] = self.dense_fp16_tflops
        d["derivation"] = "dense INT8 = sparse INT8 / 2; dense FP16 = dense INT8 / 2"
        return d


# NVIDIA Jetson Orin datasheets (module totals). On Orin NX and
# AGX Orin the quoted TOPS include the DLAs, so a GPU-only estimate from them is optimistic
# (the Orin Nano has no DLA). Override with peaks_from_dict() for other figures.
JETSON_PEAKS: dict[str, DevicePeak] = {
    p.key: p
    for p in (
        DevicePeak(
            "orin-nano-8gb-super",
            "Jetson Orin Nano 8GB (Super mode)",
            67.0,
            102.0,
            "NVIDIA Jetson Orin Nano Super datasheet",
        ),
        DevicePeak(
            "orin-nx-16gb", "Jetson Orin NX 16GB", 100.0, 102.4, "NVIDIA Jetson Orin NX datasheet"
        ),
        DevicePeak(
            "agx-orin-64gb",
            "Jetson AGX Orin 64GB",
            275.0,
            204.8,
            "NVIDIA Jetson AGX Orin datasheet",
        ),
    )
}


def peaks_from_dict(data: Mapping[str, Mapping[str, Any]]) -> dict[str, DevicePeak]:
    """Peaks from data, e.g. a YAML/JSON file: ``{key: {name, sparse_int8_tops, bandwidth_gbs}}``.

    Raises:
        DataError: a device entry lacks a field or has a non-positive value.
    """
    out = {}
    for key, entry in data.items():
        try:
            tops, bw = float(entry["sparse_int8_tops"]), float(entry["bandwidth_gbs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"peak table entry '{key}': needs numeric sparse_int8_tops and bandwidth_gbs"
            ) from exc
        if tops <= 0 or bw <= 0:
            raise DataError(f"peak table entry '{key}': peaks must be > 0")
        out[key] = DevicePeak(
            key, str(entry.get("name", key)), tops, bw, str(entry.get("source", "user"))
        )
    return out


# ---------------------------------------------------------------------------- counting

_FREE_OPS = frozenset(
    {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Constant", "Identity", "Dropout",
     "Size", "ConstantOfShape"}
)  # fmt: skip
_ELEMENTWISE_1 = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean",
     "Clip", "Neg", "Abs", "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Where",
     "Not", "And", "Or", "Floor", "Ceil", "Round", "Sign", "Reciprocal", "Sqrt", "Pow",
     "Cast", "QuantizeLinear", "DequantizeLinear", "HardSigmoid", "HardSwish"}
)  # fmt: skip
_ELEMENTWISE_4 = frozenset({"Sigmoid", "Exp", "Log", "Tanh", "Erf", "Gelu", "Softplus", "Elu"})
_REDUCE = frozenset(
    {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL2", "ReduceL1",
     "ReduceSumSquare", "ReduceLogSumExp", "GlobalAveragePool", "GlobalMaxPool", "ArgMax",
     "ArgMin"}
)  # fmt: skip
_DATA_MOVEMENT = frozenset(
    {"Transpose", "Concat", "Split", "Slice", "Gather", "Pad", "Expand", "Tile"}
)  # moves bytes, no arithmetic: counted, not "uncounted"


@dataclass(frozen=True)
class LayerCost:
    """Work of one ONNX node. Bytes are element counts so that precision is chosen later."""

    name: str
    op_type: str
    macs: int
    flops: int
    weight_elems: int  # float initializer elements read
    float_act_elems: int  # float activation elements read + written
    other_bytes: int  # non-float tensors (uint8 image, int64 indices), at their own size
    counted: bool  # False: FLOPs unknown for this op type (or missing shapes)

    def bytes_at(self, precision: str) -> int:
        b = BYTES_PER_ELEMENT[precision]
        return (self.weight_elems + self.float_act_elems) * b + self.other_bytes


@dataclass
class GraphCost:
    """Per-node costs of a graph at fixed input shapes."""

    model: str
    batch: int
    input_shapes: dict[str, list[int]]
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.weight_elems for layer in self.layers)

    @property
    def uncounted_ops(self) -> dict[str, int]:
        return dict(Counter(layer.op_type for layer in self.layers if not layer.counted))

    def bytes_at(self, precision: str) -> int:
        return sum(layer.bytes_at(precision) for layer in self.layers)


_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto)
_ITEMSIZE = {2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 12: 4, 13: 8}  # uint8, int8, ..., uint64


def _fix_inputs(
    graph: Any, batch: int, input_size: int | None, input_shapes: Mapping[str, Sequence[int]]
) -> dict[str, list[int]]:
    """Give every graph input a fully static shape; return them."""
    inits = {t.name for t in graph.initializer}
    fixed: dict[str, list[int]] = {}
    for inp in graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name in input_shapes:
            want = [int(v) for v in input_shapes[inp.name]]
            if len(want) != len(dims):
                raise UserError(
                    f"input_shapes['{inp.name}'] has rank {len(want)}, the model input has rank "
                    f"{len(dims)}"
                )
        else:
            want = []
            for i, d in enumerate(dims):
                if d.HasField("dim_value"):
                    if i == 0 and d.dim_value != batch:
                        raise UserError(
                            f"model input '{inp.name}' has a fixed batch of {d.dim_value}; "
                            f"cannot estimate --batch {batch}"
                        )
                    want.append(d.dim_value)
                elif i == 0:
                    want.append(batch)
                elif input_size is not None:
                    want.append(input_size)
                else:
                    raise UserError(
                        f"model input '{inp.name}' dimension {i} is dynamic "
                        f"('{d.dim_param}'): give an input size"
                    )
        for d, v in zip(dims, want, strict=True):
            d.ClearField("dim_param")
            d.dim_value = v
        fixed[inp.name] = want
    return fixed


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _node_work(node: Any, shape: Any, out_elems: int, in_elems: list[int]) -> tuple[int, int, bool]:
    """(MACs, FLOPs, counted) of one node; ``shape(name)`` gives a static shape or None."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w = shape(node.input[1])
        if w is None:
            return 0, 0, False
        kernel = math.prod(w[2:])
        if op == "Conv":
            # W: [Cout, Cin/group, k...]; each output element sums Cin/group * k products
            # (grouped and depthwise convolutions included: W already holds Cin/group).
            macs = out_elems * w[1] * kernel
        else:
            # W: [Cin, Cout/group, k...]; each input element scatters into Cout/group * k outputs.
            macs = in_elems[0] * w[1] * kernel
        return macs, 2 * macs, True
    if op in ("Gemm", "MatMul"):
        a = shape(node.input[0])
        if a is None:
            return 0, 0, False
        if op == "Gemm":
            k = a[0] if _attr(node, "transA", 0) else a[-1]
        else:
            k = a[-1]  # A: [..., M, K] (a 1-D A is [K])
        macs = out_elems * k
        return macs, 2 * macs, True
    if op in _FREE_OPS or op in _DATA_MOVEMENT:
        return 0, 0, True
    if op in _ELEMENTWISE_1:
        return 0, out_elems, True
    if op in _ELEMENTWISE_4:
        return 0, 4 * out_elems, True
    if op == "BatchNormalization":
        return 0, 2 * out_elems, True
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return 0, out_elems * math.prod(_attr(node, "kernel_shape", [1])), True
    if op in _REDUCE:
        return 0, in_elems[0] if in_elems else 0, True
    if op in ("Softmax", "LogSoftmax"):
        return 0, 5 * out_elems, True
    if op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        return 0, (0 if mode == "nearest" else 4 * out_elems), True
    return 0, 0, False


def count_graph(
    model: str | os.PathLike | Any,
    batch: int = 1,
    input_size: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> GraphCost:
    """Per-node MACs, FLOPs and tensor sizes of an ONNX model at fixed input shapes.

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto`` (not modified).
        batch: value for each input's first dimension when it is dynamic.
        input_size: value for every other dynamic input dimension (H and W).
        input_shapes: explicit static shapes per input name, overriding the above.

    Raises:
        UserError: the file is missing, a dynamic dimension has no value, or a fixed
            batch dimension conflicts with ``batch``.
        DataError: the file is not a readable ONNX model.
    """
    onnx = require("onnx", purpose="roofline estimates")
    from onnx import shape_inference

    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    if isinstance(model, (str, os.PathLike)):
        label = os.fspath(model)
        if not os.path.isfile(label):
            raise UserError(f"ONNX model not found: {label}")
        try:
            # Weights stay on disk: only their dims matter, and those live in the protobuf.
            proto = onnx.load(label, load_external_data=False)
        except Exception as exc:
            raise DataError(f"{label}: not a readable ONNX model ({exc})") from exc
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        label = proto.graph.name or "<ModelProto>"

    fixed = _fix_inputs(proto.graph, batch, input_size, input_shapes or {})
    try:
        inferred = shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise DataError(f"{label}: ONNX shape inference failed ({exc})") from exc
    g = inferred.graph

    shapes: dict[str, list[int] | None] = {}
    dtypes: dict[str, int] = {}
    init_names = set()
    for t in g.initializer:
        shapes[t.name], dtypes[t.name] = list(t.dims), t.data_type
        init_names.add(t.name)
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        dtypes[vi.name] = tt.elem_type
        dims = tt.shape.dim if tt.HasField("shape") else None
        if dims is not None and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
        else:
            shapes.setdefault(vi.name, None)
    for node in g.node:
        if node.op_type == "Constant":
            for o in node.output:
                init_names.add(o)  # constants are weights-like: read from memory once

    def shape(name: str) -> list[int] | None:
        return shapes.get(name)

    cost = GraphCost(model=label, batch=batch, input_shapes=fixed)
    for i, node in enumerate(g.node):
        ins = [n for n in node.input if n]
        outs = [n for n in node.output if n]
        in_shapes = [shape(n) for n in ins]
        out_shapes = [shape(n) for n in outs]
        known = all(s is not None for s in in_shapes + out_shapes)
        in_elems = [math.prod(s) if s is not None else 0 for s in in_shapes]
        out_elems = math.prod(out_shapes[0]) if out_shapes and out_shapes[0] is not None else 0
        if node.op_type in _FREE_OPS:
            macs, flops, counted = 0, 0, True
            weight = act = other = 0
        else:
            macs, flops, counted = _node_work(node, shape, out_elems, in_elems)
            counted = counted and known
            weight = act = other = 0
            for name, n in [
                *zip(ins, in_elems, strict=True),
                *zip(outs, [math.prod(s) if s else 0 for s in out_shapes], strict=True),
            ]:
                dt = dtypes.get(name, 1)
                if dt in _FLOAT_TYPES:
                    if name in init_names:
                        weight += n
                    else:
                        act += n
                else:
                    other += n * _ITEMSIZE.get(dt, 4)
        cost.layers.append(
            LayerCost(
                name=node.name or f"{node.op_type}_{i}",
                op_type=node.op_type,
                macs=int(macs),
                flops=int(flops),
                weight_elems=int(weight),
                float_act_elems=int(act),
                other_bytes=int(other),
                counted=counted,
            )
        )
    return cost


# ---------------------------------------------------------------------------- estimating


@dataclass(frozen=True)
class RooflineEstimate:
    """Estimated latency of one graph on one device at one precision (a lower bound)."""

    device: str
    device_name: str
    precision: str
    batch: int
    peak_tops: float
    bandwidth_gbs: float
    flops: int
    bytes: int
    latency_ms: float
    throughput: float  # images/s = batch / latency
    compute_bound_layers: int
    memory_bound_layers: int
    kind: str = "roofline-estimate"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    cost: GraphCost,
    peaks: Mapping[str, DevicePeak] | Iterable[DevicePeak] | None = None,
    precisions: Sequence[str] = ("fp16", "int8"),
) -> list[RooflineEstimate]:
    """Sum of per-node ``max(flops / peak_ops, bytes / bandwidth)`` per device and precision."""
    table = JETSON_PEAKS if peaks is None else peaks
    devices = list(table.values()) if isinstance(table, Mapping) else list(table)
    out = []
    for dev in devices:
        bw = dev.bandwidth_gbs * 1e9
        for prec in precisions:
            if prec not in BYTES_PER_ELEMENT:
                raise UserError(f"unknown precision '{prec}': use one of fp16, int8")
            ops = dev.peak_ops(prec)
            total_s, n_compute, n_memory = 0.0, 0, 0
            for layer in cost.layers:
                t_c, t_m = layer.flops / ops, layer.bytes_at(prec) / bw
                if t_c == 0 and t_m == 0:
                    continue
                n_compute += t_c >= t_m
                n_memory += t_m > t_c
                total_s += max(t_c, t_m)
            out.append(
                RooflineEstimate(
                    device=dev.key,
                    device_name=dev.name,
                    precision=prec,
                    batch=cost.batch,
                    peak_tops=ops / 1e12,
                    bandwidth_gbs=dev.bandwidth_gbs,
                    flops=cost.flops,
                    bytes=cost.bytes_at(prec),
                    latency_ms=total_s * 1e3,
                    throughput=cost.batch / total_s if total_s > 0 else math.inf,
                    compute_bound_layers=int(n_compute),
                    memory_bound_layers=int(n_memory),
                )
            )
    return out


def roofline(
    model: str | os.PathLike | Any,
    batch: int = 1,
    input_size: int | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    peaks: Mapping[str, DevicePeak] | None = None,
    precisions: Sequence[str] = ("fp16", "int8"),
    top_layers: int = 10,
) -> dict[str, Any]:
    """The ``roofline`` section of a benchmark result: counts, peaks and estimates as data.

    Args:
        model: ONNX path or ``ModelProto``.
        batch: batch size to estimate for.
        input_size: size of dynamic spatial input dimensions.
        input_shapes: explicit input shapes (see :func:`count_graph`).
        peaks: device peak table; default :data:`JETSON_PEAKS`.
        precisions: ``"fp16"`` and/or ``"int8"``.
        top_layers: how many of the most expensive nodes (by FLOPs) to list.
    """
    cost = count_graph(model, batch=batch, input_size=input_size, input_shapes=input_shapes)
    table = JETSON_PEAKS if peaks is None else peaks
    heavy = sorted(cost.layers, key=lambda layer: layer.flops, reverse=True)[:top_layers]
    return {
        "kind": "roofline-estimate",
        "note": (
            "Lower-bound estimate from datasheet peaks, not a measurement. On Orin NX and "
            "AGX Orin the datasheet TOPS include the DLAs, so GPU-only latency is higher."
        ),
        "model": cost.model,
        "batch": cost.batch,
        "input_shapes": cost.input_shapes,
        "conventions": CONVENTIONS,
        "macs": cost.macs,
        "flops": cost.flops,
        "params": cost.params,
        "bytes": {p: cost.bytes_at(p) for p in BYTES_PER_ELEMENT},
        "nodes": len(cost.layers),
        "uncounted_ops": cost.uncounted_ops,
        "top_layers": [asdict(layer) for layer in heavy],
        "peaks": {k: v.to_dict() for k, v in table.items()},
        "estimates": [e.to_dict() for e in estimate(cost, table, precisions)],
    }
