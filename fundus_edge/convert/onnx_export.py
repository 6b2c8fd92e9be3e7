"""``torch_to_onnx``: trace the fused model into one ONNX graph, with its contract inside.

The legacy TorchScript exporter (``dynamo=False``) is used: it needs no onnxscript, traces
our forward-only graph (no data-dependent control flow) and emits plain opset-17 operators
that TensorRT 10 parses. Then :func:`simplify` tries onnxslim and ONNX Runtime's portable
(basic-level) offline optimisation, times each on ONNX Runtime, and keeps what helps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_bytes
from fundus_edge.log import get_logger

__all__ = ["DEFAULT_OPSET", "embed_metadata", "fold_constants", "simplify", "torch_to_onnx"]

log = get_logger("convert.onnx")

DEFAULT_OPSET = 17
INPUT_NAME = "image"


def embed_metadata(model, meta: dict[str, Any]) -> None:
    """Put the artifact contract into ``metadata_props['fundus_edge']`` (replacing any)."""
    from fundus_edge.artifact import METADATA_KEY

    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta, separators=(",", ":"))
    model.producer_name = "fundus-edge"


def fold_constants(model) -> int:
    """Replace every node computed from constants alone by an initializer (in place).

    The tracer leaves small constant subgraphs, e.g. the CAM kernels reshaped from the head
    weights (Unsqueeze of an initializer feeding a Conv). TensorRT wants Conv weights as
    initializers, and folding is exact, so it always runs. Evaluated with ONNX Runtime.

    Returns:
        The number of nodes folded.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = model.graph
    const = {i.name for i in graph.initializer}
    foldable = []
    for node in graph.node:
        if node.op_type in (
            "RandomNormal",
            "RandomUniform",
            "RandomNormalLike",
            "RandomUniformLike",
        ):
            continue
        if all((not i) or i in const for i in node.input):
            foldable.append(node)
            const.update(o for o in node.output if o)
    if not foldable:
        return 0
    needed = {i for n in foldable for i in n.input if i}
    inits = [t for t in graph.initializer if t.name in needed]
    outs = [o for n in foldable for o in n.output if o]
    sub = helper.make_graph(
        foldable, "fold", [], [helper.make_empty_tensor_value_info(o) for o in outs], inits
    )
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        sub_model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    values = sess.run(outs, {})
    folded_ids = {id(n) for n in foldable}
    keep = [n for n in graph.node if id(n) not in folded_ids]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    graph.initializer.extend(
        numpy_helper.from_array(v, name)
        for name, v in zip(outs, values, strict=True)
        if name in used
    )
    # Drop initializers nothing reads any more (the folded nodes' inputs).
    alive = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)
    onnx.checker.check_model(model)
    return len(foldable)


def torch_to_onnx(
    fused, path: str | Path, image_size: int, meta: dict[str, Any], opset: int = DEFAULT_OPSET
) -> Path:
    """Export a :class:`~fundus_edge.models.fused.FusedModel` to ``path`` (atomic).

    Args:
        fused: the fused model (eval mode).
        path: output ``.onnx``.
        image_size: input side; the batch dimension is dynamic (``N``).
        meta: the artifact contract embedded as metadata.
        opset: ONNX opset (TensorRT 10 parses 9-20).
    """
    import io
    import warnings

    import onnx
    import torch

    from fundus_edge.models.fused import OUTPUT_NAMES

    path = Path(path)
    dummy = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    dyn = {INPUT_NAME: {0: "N"}, **{name: {0: "N"} for name in OUTPUT_NAMES}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter warns that it is legacy; it is the one that needs no onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fused.eval(),
            (dummy,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dyn,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    folded = fold_constants(model)
    log.debug("folded %d constant nodes", folded)
    embed_metadata(model, meta)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def _ort_latency(path: Path, image_size: int, runs: int = 5) -> float:
    """Median ms of one batch-1 run in ONNX Runtime (CPU), after one warm-up."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.zeros((1, image_size, image_size, 3), np.uint8)
    sess.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def simplify(
    path: str | Path, image_size: int, meta: dict[str, Any], runs: int = 5
) -> dict[str, Any]:
    """Try onnxslim and ORT basic-level offline optimisation; keep the fastest valid graph.

    ORT's extended/all levels emit ORT-only fused operators (FusedConv, ...) that TensorRT
    cannot parse, so only the basic level (constant folding, redundant-node removal) is a
    candidate. Each candidate must pass the ONNX checker and keep the same outputs.

    Returns:
        A record: per-candidate median latency (ms, batch 1, ORT CPU), node counts, the kept one.
    """
    path = Path(path)
    slim_path = path.with_name(f".{path.stem}.slim.onnx")
    basic_path = path.with_name(f".{path.stem}.ortbasic.onnx")
    try:
        return _simplify(path, slim_path, basic_path, image_size, meta, runs)
    finally:
        # The candidates go on any exit, Ctrl-C included: each is as big as the model.
        slim_path.unlink(missing_ok=True)
        basic_path.unlink(missing_ok=True)


def _simplify(
    path: Path, slim_path: Path, basic_path: Path, image_size: int, meta: dict[str, Any], runs: int
) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    cands: dict[str, Path] = {"exported": path}
    notes: dict[str, str] = {}
    try:
        import onnxslim

        slim = onnxslim.slim(onnx.load(str(path)))
        embed_metadata(slim, meta)
        atomic_write_bytes(slim_path, slim.SerializeToString())
        cands["onnxslim"] = slim_path
    except Exception as exc:  # onnxslim is optional; record why it was not used
        notes["onnxslim"] = f"{type(exc).__name__}: {exc}"
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(basic_path)
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        m = onnx.load(str(basic_path))
        embed_metadata(m, meta)
        atomic_write_bytes(basic_path, m.SerializeToString())
        cands["ort-basic"] = basic_path
    except Exception as exc:
        notes["ort-basic"] = f"{type(exc).__name__}: {exc}"

    record: dict[str, Any] = {"candidates": {}, "notes": notes}
    x = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3), dtype=np.uint8)
    ref = None
    for name, p in cands.items():
        try:
            onnx.checker.check_model(str(p))
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            out = sess.run(["probs"], {INPUT_NAME: x})[0]
            if ref is None:
                ref = out
            elif not np.allclose(out, ref, atol=1e-5):
                notes[name] = "outputs changed; rejected"
                continue
            record["candidates"][name] = {
                "median_ms": round(_ort_latency(p, image_size, runs), 3),
                "nodes": len(onnx.load(str(p), load_external_data=False).graph.node),
            }
        except Exception as exc:
            notes[name] = f"{type(exc).__name__}: {exc}"
    if not record["candidates"]:
        raise UserError(f"{path}: the exported graph does not run in ONNX Runtime: {notes}")
    best = min(record["candidates"], key=lambda k: record["candidates"][k]["median_ms"])
    # Keep the exported graph unless a candidate is clearly (>2 %) faster: noise is not a gain.
    base = record["candidates"].get("exported", {}).get("median_ms")
    if base is not None and record["candidates"][best]["median_ms"] > 0.98 * base:
        best = "exported"
    record["kept"] = best
    if best != "exported":
        cands[best].replace(path)
    log.info("graph simplification: kept %s (%s)", best, record["candidates"])
    return record
