"""Graph hygiene: checker, shape inference, opset range and a TensorRT operator check.

TensorRT 10 parses ONNX opsets 9-20. The operator lists below follow onnx-tensorrt's
``docs/operators.md`` for TensorRT 10: ``TRT_UNSUPPORTED`` fails the export naming the node;
operators in neither list pass with a warning (they may work, but we have not seen them parse).
Per-operator restrictions that bite CNN graphs are checked too: MaxPool's ``Indices`` output,
Resize modes, Conv weights that are not initializers (or Q/DQ of initializers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = [
    "TRT_OPSET_RANGE",
    "TRT_SUPPORTED",
    "TRT_UNSUPPORTED",
    "HygieneReport",
    "check_graph",
    "tensorrt_compatibility",
]

log = get_logger("convert")

TRT_OPSET_RANGE = (9, 20)

# Operators our graphs use and TensorRT 10 parses (subset of the support matrix).
TRT_SUPPORTED = frozenset(
    """Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization
    HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
    Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mish Mod Mul Neg Not Or Pad Pow
    PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round
    ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze Where Xor""".split()
)

# Operators TensorRT 10 does not parse.
TRT_UNSUPPORTED = frozenset(
    """Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor ConcatFromSequence ConvInteger
    DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool Multinomial
    NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase
    SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
    StringNormalizer StringSplit TfIdfVectorizer Unique""".split()
)

_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_COORD = {
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
}


@dataclass
class HygieneReport:
    """What :func:`check_graph` found. ``errors`` fail an export; ``warnings`` are logged."""

    opset: int
    ops: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "ops": self.ops,
            "errors": self.errors,
            "warnings": self.warnings,
        }


def _attr(node, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def tensorrt_compatibility(model) -> tuple[list[str], list[str]]:
    """Errors and warnings for TensorRT 10 on an ``onnx.ModelProto``; each names the node."""
    errors: list[str] = []
    warnings: list[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    lo, hi = TRT_OPSET_RANGE
    if not lo <= opset <= hi:
        errors.append(f"opset {opset} is outside TensorRT 10's range {lo}-{hi}")
    from onnx import numpy_helper

    inits_by_name = {i.name: i for i in model.graph.initializer}
    inits = set(inits_by_name)
    # Outputs of Constant / DequantizeLinear-of-initializer count as constant weights.
    const_like = set(inits)
    for node in model.graph.node:
        if node.op_type == "Constant" or (
            node.op_type == "DequantizeLinear" and node.input[0] in const_like
        ):
            const_like.update(node.output)
    for node in model.graph.node:
        where = f"node '{node.name or '?'}' ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            errors.append(f"{where}: custom domain '{node.domain}' needs a TensorRT plugin")
            continue
        if node.op_type in TRT_UNSUPPORTED:
            errors.append(f"{where}: operator not supported by TensorRT 10")
        elif node.op_type not in TRT_SUPPORTED:
            warnings.append(f"{where}: operator not in our verified TensorRT list")
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            errors.append(f"{where}: MaxPool 'Indices' output is unsupported by TensorRT")
        if node.op_type == "Resize":
            mode = _attr(node, "mode", "nearest")
            coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
            if mode not in _RESIZE_MODES:
                errors.append(f"{where}: Resize mode '{mode}' unsupported (nearest/linear only)")
            if coord not in _RESIZE_COORD:
                errors.append(f"{where}: Resize coordinate mode '{coord}' unsupported")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits_by_name.get(node.input[2])
            if zp is not None and numpy_helper.to_array(zp).any():
                errors.append(f"{where}: zero point must be 0 for TensorRT (symmetric Q/DQ)")
        if (
            node.op_type in ("Conv", "ConvTranspose")
            and len(node.input) > 1
            and node.input[1] not in const_like
        ):
            errors.append(f"{where}: weights '{node.input[1]}' must be an initializer")
    return errors, warnings


def check_graph(path: str | Path, tensorrt: bool = True) -> HygieneReport:
    """Run the ONNX checker and strict shape inference, then the TensorRT check.

    Raises:
        UserError: the checker or shape inference fails, or (``tensorrt``) an unsupported
            operator appears; the message names the model and the first offending node.
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise UserError(f"{path}: ONNX checker failed: {str(exc).splitlines()[0]}") from exc
    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    report = HygieneReport(opset=opset, ops=dict(sorted(ops.items())))
    if tensorrt:
        report.errors, report.warnings = tensorrt_compatibility(model)
    for w in report.warnings:
        log.warning("%s: %s", path.name, w)
    if report.errors:
        more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise UserError(f"{path}: not TensorRT-compatible: {report.errors[0]}{more}")
    return report
