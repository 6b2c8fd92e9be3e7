"""Reduced precision ONNX: ``onnx_to_fp16`` and ``onnx_to_int8`` (static Q/DQ).

* FP16: weights and activations in half precision with float32 I/O; the class maps, the
  attention map, the enhancement arithmetic and the sigmoid stay in float32 (their ranges
  and min-max divisions are where half precision loses accuracy).
* INT8: ONNX Runtime static quantisation in the QDQ format, per-channel symmetric int8
  weights, calibrated on real preprocessed fundus images; the map and attention arithmetic
  stays float. Two targets, because their fast paths differ:

  - ``tensorrt``: symmetric int8 activations (TensorRT requires zero points of 0). The Q/DQ
    ONNX is what TensorRT 10/11 consumes for INT8.
  - ``cpu``: asymmetric uint8 activations, ONNX Runtime's fast u8s8 path on x86 (VNNI); on
    our 2-core AVX-512 machine 1.4x faster than s8s8 for the fused graph. TensorRT rejects
    its non-zero zero points, so it is not a TensorRT artifact.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_bytes
from fundus_edge.log import get_logger

__all__ = [
    "CALIB_METHODS",
    "FLOAT_NODE_PATTERNS",
    "float_nodes",
    "onnx_to_fp16",
    "onnx_to_int8",
    "toposort",
]

#: INT8 calibration methods (ONNX Runtime's MinMax, Entropy and Percentile calibrators).
CALIB_METHODS = ("minmax", "entropy", "percentile")

log = get_logger("convert.quantize")

# Node-name patterns (the exporter names nodes after the module path) kept in float32.
FLOAT_NODE_PATTERNS = (
    r"/cam",
    r"attention",
    r"enhance",
    r"[Ss]igmoid",
    r"minmax",
    r"/fusion/.*cam",
)
# Ops quantised: the convolutions and matrix products, plus what sits between them in a CNN
# (residual Add, pooling, ReLU, Concat) so that ONNX Runtime keeps whole chains in int8
# instead of converting at every boundary. Elementwise map arithmetic (Mul/Div/Sub) stays
# float; histogram calibration also fails on its constant tensors.
QUANT_OPS = (
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Relu",
    "Concat",
)
# Where int8 pays: the backbones (the exporter names their nodes ``.../features/...``).
_QUANT_SCOPE = re.compile(r"/features/")
# Ops kept in float32 wherever they appear: reductions and divisions of the map arithmetic.
FLOAT_OPS = ("Sigmoid", "ReduceMax", "ReduceMin", "Div", "Resize", "GridSample", "Clip")


def float_nodes(model, patterns: Iterable[str] = FLOAT_NODE_PATTERNS) -> list[str]:
    """Names of nodes whose name matches one of ``patterns``."""
    pats = [re.compile(p) for p in patterns]
    return [n.name for n in model.graph.node if n.name and any(p.search(n.name) for p in pats)]


def toposort(graph) -> None:
    """Sort ``graph.node`` topologically in place (the fp16 converter appends its Casts last)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})
            raise UserError(f"ONNX graph has a cycle or dangling inputs: {missing[:3]}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def onnx_to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Convert an FP32 ONNX to FP16 weights/activations with float32 I/O (atomic write)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = float_nodes(model)
    fp16 = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(FLOAT_OPS),
        node_block_list=keep,
        disable_shape_infer=False,
    )
    toposort(fp16.graph)
    # The converter drops nothing from metadata_props, but be explicit: the contract travels.
    meta = {p.key: p.value for p in model.metadata_props}
    del fp16.metadata_props[:]
    for k, v in meta.items():
        e = fp16.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(fp16)
    atomic_write_bytes(dst, fp16.SerializeToString())
    log.info("fp16: %d nodes kept in float32", len(keep))
    return Path(dst)


class _LogWriter(io.StringIO):
    """A stdout stand-in that sends each line to the debug log."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.debug("onnxruntime: %s", line.strip())
        return len(text)


class _Reader:
    """ONNX Runtime CalibrationDataReader over uint8 (N,H,W,3) batches.

    One image per batch: the histogram calibrators (percentile, entropy) stack the batches'
    outputs, and a shorter last batch made them fail and fall back to minmax.
    """

    def __init__(self, images: np.ndarray, batch: int = 1) -> None:
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"image": self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def onnx_to_int8(
    src: str | Path,
    dst: str | Path,
    calib_images: np.ndarray,
    method: str = "percentile",
    per_channel: bool = True,
    target: str = "tensorrt",
) -> dict[str, Any]:
    """Static Q/DQ INT8 quantisation calibrated on ``calib_images`` (uint8 N,H,W,3).

    Args:
        src: FP32 fused ONNX.
        dst: output Q/DQ ONNX.
        calib_images: preprocessed fundus images, as the camera loop will feed them.
        method: calibration: ``minmax``, ``entropy`` or ``percentile`` (99.999th).
        per_channel: per-output-channel weight scales.
        target: ``tensorrt`` (s8 symmetric activations) or ``cpu`` (u8 asymmetric).

    Returns:
        A record of what was quantised.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib_images.ndim != 4 or calib_images.dtype != np.uint8 or len(calib_images) == 0:
        raise UserError("INT8 calibration needs at least one preprocessed uint8 image")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if target not in ("tensorrt", "cpu"):
        raise UserError(f"--int8-target {target!r}: choose tensorrt or cpu")
    if method not in methods:
        raise UserError(f"--calib-method {method!r}: choose {', '.join(methods)}")
    src, dst = Path(src), Path(dst)
    pre = dst.with_name(f".{dst.stem}.pre.onnx")
    tmp = dst.with_name(f".{dst.stem}.q.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        # Quantise the members' convolutional bodies and the classifier layers only. The map,
        # attention and enhancement arithmetic between them (min-max divisions with an
        # epsilon, weighted sums) stays float: an int8 `max + 1e-7` is 0 for a flat map.
        quantize = [
            n.name for n in model.graph.node if _QUANT_SCOPE.search(n.name) or n.op_type == "Gemm"
        ]
        exclude = [n.name for n in model.graph.node if n.name and n.name not in set(quantize)]
        used = method

        def run(calibration: str) -> None:
            # ONNX Runtime prints its calibration progress on stdout: keep it in the log.
            with contextlib.redirect_stdout(_LogWriter()):
                _quantize(calibration)

        def _quantize(calibration: str) -> None:
            quantize_static(
                str(pre),
                str(tmp),
                _Reader(calib_images),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8 if target == "tensorrt" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANT_OPS),
                nodes_to_quantize=quantize,
                calibrate_method=methods[calibration],
                extra_options={
                    "ActivationSymmetric": target == "tensorrt",  # TensorRT: zero point 0
                    "WeightSymmetric": True,
                    "CalibPercentile": 99.999,
                },
            )

        fallback = None
        try:
            run(method)
        except ValueError as exc:
            # Histogram calibrators cannot bin a tensor that is constant over the calibration
            # set (a dead ReLU layer, a tiny or untrained model). MinMax handles it; say so.
            if method == "minmax":
                raise
            fallback = f"{method} calibration failed ({exc}); used minmax"
            log.warning("INT8: %s", fallback)
            used = "minmax"
            run("minmax")
        q = onnx.load(str(tmp))
        meta = {
            p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props
        }
        del q.metadata_props[:]
        for k, v in meta.items():
            e = q.metadata_props.add()
            e.key, e.value = k, v
        atomic_write_bytes(dst, q.SerializeToString())
        n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    finally:
        for p in (pre, tmp):
            p.unlink(missing_ok=True)
    return {
        "method": used,
        "fallback": fallback,
        "target": target,
        "activations": "int8 symmetric" if target == "tensorrt" else "uint8 asymmetric",
        "per_channel": per_channel,
        "calib_images": len(calib_images),
        "quantize_nodes": n_q,
        "float_nodes": len(exclude),
    }
