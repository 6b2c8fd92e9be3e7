"""The export chain's steps: each takes one artifact and returns the next, with its own checks.

::

    checkpoint ──CheckpointToOnnx──┐                     ┌─OnnxToFp16──> onnx_fp16
                                   ├──> onnx_fp32 ───────┤
    FP32 model.onnx ──ReadOnnx─────┘      (the contract) └─OnnxToInt8──> onnx_int8_qdq
                                   onnx_* ──OnnxToEngine──> engine (TensorRT, on the device)
                                   onnx_* ──OnnxToOpenVino> openvino_ir (.xml + .bin + .xml.json)
                          onnx_* / engine ──ToTriton────> triton repository

Starting from an exported FP32 ``model.onnx`` is starting later in the same chain: every step
after the first is the same code, fed the same artifact, whether the workstation or the
device runs it. Only :class:`CheckpointToOnnx` needs PyTorch (and its checks, PyTorch
parity and the ``grad-cam`` comparison); the rest needs ONNX, ONNX Runtime and, for engines,
TensorRT, for IRs, OpenVINO.

A step is a small object: its options in ``__init__``, :meth:`Step.needs` (the optional
modules it imports, checked before any work), and :meth:`Step.run`, which writes its
artifact into the context's folder and returns a :class:`StepResult`: the new
:class:`Artifact`, the step's checks (each a record with ``passed`` True, False or None for
"reported, not gated") and any report sections of its own (``simplify``, ``hygiene``,
``quantization``). :mod:`fundus_edge.convert.chain` plans and runs them for ``export``;
``fundus-edge bench`` and the benchmark suite call the same steps to derive what they time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fundus_edge import __version__
from fundus_edge.convert.calibration import ImageSet, load_images, synthetic_images
from fundus_edge.errors import UserError, require
from fundus_edge.fileio import sha256_file
from fundus_edge.log import get_logger

__all__ = [
    "Artifact",
    "CheckpointToOnnx",
    "EngineUnavailable",
    "OnnxToEngine",
    "OnnxToFp16",
    "OnnxToInt8",
    "OnnxToOpenVino",
    "ReadOnnx",
    "Step",
    "StepContext",
    "StepResult",
    "ToTriton",
    "build_metadata",
    "read_export_source",
    "tensorrt_available",
]

log = get_logger("convert")

# What export needs in a contract beyond what the runtime needs (artifact._REQUIRED).
_EXPORT_FIELDS = ("members", "map_size", "precision", "mean", "std")


@dataclass(frozen=True)
class Artifact:
    """One thing the chain holds: a file (or a folder) and the contract it carries.

    Attributes:
        role: ``checkpoint``, ``onnx_source``, ``onnx_fp32``, ``onnx_fp16``,
            ``onnx_int8_qdq``, ``engine`` or ``triton``.
        path: the file (the folder, for ``triton``).
        meta: the artifact contract (labels, thresholds, preprocessing, ...); empty for a
            checkpoint, whose contract the first step builds.
    """

    role: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return str(self.meta.get("precision") or "fp32")

    def record(self, root: Path) -> dict[str, Any]:
        """The report's entry: path relative to ``root``, size and (files) SHA-256."""
        rec: dict[str, Any] = {"path": self.path.relative_to(root).as_posix()}
        if self.path.is_file():
            rec["size_mb"] = round(self.path.stat().st_size / 1e6, 2)
            rec["sha256"] = sha256_file(self.path)
        weights = self.path.with_suffix(".bin")
        if self.path.suffix == ".xml" and weights.is_file():  # an OpenVINO IR's weights
            rec["weights"] = {
                "path": weights.name,
                "size_mb": round(weights.stat().st_size / 1e6, 2),
            }
        return rec


@dataclass
class StepResult:
    """What a step made: the next artifact, its checks, and report sections of its own."""

    artifact: Artifact
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


class EngineUnavailable(UserError):
    """TensorRT is not installed here: the chain stops after the ONNX, which it keeps."""


@dataclass
class StepContext:
    """What the steps of one run share.

    Attributes:
        out: folder the steps write into (export's staging folder, bench's work folder).
        final: folder the artifacts end up in (a previous engine and timing cache there
            are reused); defaults to ``out``.
        verify: run the steps' parity checks.
        verify_images: images the parity checks use.
        calib: folder (dataset or images) for INT8 calibration; None: synthetic images.
        calib_set: INT8 calibration images given directly (bench); overrides ``calib``.
        seed: seed of generated images.
        fp32: the FP32 ONNX of this run (set by the chain): the reference of later checks.
    """

    out: Path
    final: Path | None = None
    verify: bool = True
    verify_images: int = 4
    calib: str | None = None
    calib_set: ImageSet | None = None
    seed: int = 0
    fp32: Artifact | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.final = Path(self.final) if self.final is not None else self.out

    def _pre(self, meta: dict[str, Any]) -> Any:
        from fundus_edge.preprocess import PreprocessConfig

        return PreprocessConfig.from_dict(meta["preprocess"])

    def images(self, meta: dict[str, Any]) -> np.ndarray:
        """The parity-check images, preprocessed by ``meta``'s contract (made once).

        The first ``verify_images`` calibration images when ``calib`` is given (real data,
        as the user's camera sees), else generated photographs.
        """
        key = ("verify", meta["input_size"])
        if key not in self._cache:
            if self.calib_set is not None:
                imgs = self.calib_set.images[: self.verify_images]
            elif self.calib is not None:
                imgs = self.calibration(meta, self.verify_images).images
            else:
                imgs = synthetic_images(self._pre(meta), self.verify_images, self.seed).images
            self._cache[key] = imgs
        return self._cache[key]

    def calibration(self, meta: dict[str, Any], count: int) -> ImageSet:
        """Up to ``count`` INT8 calibration images (training split first), preprocessed."""
        if self.calib_set is not None:
            s = self.calib_set
            return ImageSet(
                s.images[:count], None if s.labels is None else s.labels[:count], s.origin
            )
        key = ("calib", meta["input_size"], count)
        if key not in self._cache:
            self._cache[key] = load_images(
                self.calib, self._pre(meta), count, ("train", "val", "test"), meta["label_names"]
            )
        return self._cache[key]

    def labelled(self, meta: dict[str, Any]) -> ImageSet | None:
        """The labelled held-out images of ``calib`` (test, else val split), for AUROC."""
        if self.calib is None:
            return None
        key = ("labelled", meta["input_size"])
        if key not in self._cache:
            try:
                s = load_images(
                    self.calib, self._pre(meta), 10_000, ("test", "val"), meta["label_names"]
                )
            except UserError:
                s = None
            self._cache[key] = s if s is not None and s.labels is not None else None
        return self._cache[key]

    def outputs(self, art: Artifact, images: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """ONNX Runtime outputs of an ONNX artifact on the parity images (cached per file)."""
        from fundus_edge.convert.verify import ort_outputs

        if images is not None:
            return ort_outputs(art.path, images, batch=8)
        key = ("outputs", str(art.path))
        if key not in self._cache:
            self._cache[key] = ort_outputs(art.path, self.images(art.meta))
        return self._cache[key]


class Step(ABC):
    """One step of the chain. Subclasses set :attr:`name` and :attr:`makes`."""

    name: ClassVar[str] = ""
    makes: ClassVar[str] = ""

    def needs(self) -> list[tuple[str, str]]:
        """Optional modules the step imports, as ``(module, purpose)``: checked up front."""
        return [("onnx", "ONNX graphs"), ("onnxruntime", "running ONNX graphs")]

    @abstractmethod
    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        """Make the next artifact from ``src`` in ``ctx.out``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------- contract


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"fundus_edge": __version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def build_metadata(
    ckpt_meta: dict[str, Any], ensemble, checkpoint: Path, map_size, precision: str
) -> dict[str, Any]:
    """The artifact contract for a checkpoint: the runtime's contract plus provenance."""
    from fundus_edge.artifact import contract_from_checkpoint

    meta = contract_from_checkpoint(ckpt_meta, str(checkpoint))
    if not meta["thresholds"]:
        meta["thresholds"] = [0.5] * len(meta["label_names"])
    meta.update(
        name=checkpoint.stem,
        input={"name": "image", "dtype": "uint8", "layout": "NHWC", "color": "RGB"},
        num_heads=int(ensemble.num_heads),
        map_size=[int(map_size[0]), int(map_size[1])],
        precision=precision,
        source_checkpoint=checkpoint.name,
        source_checkpoint_sha256=sha256_file(checkpoint),
        metrics=ckpt_meta.get("metrics") or {},
        versions=_versions(),
        created=_now(),
    )
    return meta


def _derived(src: Artifact, precision: str, step: str) -> dict[str, Any]:
    """``src``'s contract for an artifact derived from it, with where and how it was made."""
    meta = {k: v for k, v in src.meta.items() if k != "derived_from"}
    meta["precision"] = precision
    meta["derived_from"] = {
        "file": src.path.name,
        "sha256": sha256_file(src.path),
        "step": step,
        "versions": _versions(),
        "created": _now(),
    }
    return meta


def _restamp(path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` into an ONNX file's ``metadata_props`` (atomic)."""
    import onnx

    from fundus_edge.convert.onnx_export import embed_metadata
    from fundus_edge.fileio import atomic_write_bytes

    model = onnx.load(str(path))
    embed_metadata(model, meta)
    atomic_write_bytes(path, model.SerializeToString())


def read_export_source(path: str | os.PathLike) -> dict[str, Any]:
    """The contract of an FP32 ``.onnx`` that export can start from, checked.

    Raises:
        UserError: no such file, not ONNX, no ``fundus_edge`` contract or a damaged one
            (one line naming what is missing), or a graph that is not the FP32 one export
            wrote (derived precisions are made from the FP32 graph).
    """
    from fundus_edge.artifact import read_metadata

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--model {path}: no such file")
    meta = read_metadata(path)  # one line for a missing or damaged contract
    missing = [k for k in _EXPORT_FIELDS if k not in meta or meta[k] in (None, [], "")]
    if missing:
        raise UserError(
            f"{path}: model metadata lacks {', '.join(missing)}, which export needs "
            "(re-export the graph from its checkpoint with fundus-edge export)"
        )
    if meta["precision"] != "fp32":
        raise UserError(
            f"--model {path}: an {str(meta['precision']).upper()} graph; export starts from the FP32 .onnx "
            "that export wrote (FP16, INT8 and engines are made from it)"
        )
    if "cams" not in (meta.get("outputs") or []):
        raise UserError(
            f"--model {path}: a graph without class maps (outputs {meta.get('outputs')}); "
            "export starts from the fused graph export wrote"
        )
    _check_graph_is_fp32(path)
    return meta


def _check_graph_is_fp32(path: Path) -> None:
    """The graph itself, not only its metadata, must be the FP32 one (no external data)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a protobuf that ONNX Runtime read but onnx cannot
        raise UserError(f"--model {path}: not a readable ONNX file ({exc})") from exc
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise UserError(
            f"--model {path}: weights stored as external data ({external[0]}, ...) are not "
            "supported; export writes one self-contained .onnx"
        )
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if fp16 or qdq:
        kind = "FP16 weights" if fp16 else "Q/DQ (INT8) nodes"
        raise UserError(
            f"--model {path}: its metadata says fp32 but the graph holds {kind}; export starts "
            "from the FP32 .onnx that export wrote"
        )


# ---------------------------------------------------------------------------- steps


class CheckpointToOnnx(Step):
    """checkpoint -> fused FP32 ONNX (trace, fold, simplify, hygiene).

    Checks: ONNX Runtime vs PyTorch (``probs``/``logits``) and the maps vs the ``grad-cam``
    package. Needs PyTorch (the ``train`` extra).

    Args:
        name: file stem of the ONNX.
        opset: ONNX opset.
        simplify: try onnxslim / ONNX Runtime basic optimisation, keep the faster graph.
        with_maps: ``False`` traces the benchmark's comparison graph without maps
            (:class:`~fundus_edge.models.fused.FusedModel` ``with_maps=False``).
        gradcam: compare the maps with the ``grad-cam`` package when the context verifies.
    """

    name = "torch_to_onnx"
    makes = "onnx_fp32"

    def __init__(
        self,
        name: str = "model",
        opset: int = 17,
        simplify: bool = True,
        with_maps: bool = True,
        gradcam: bool = True,
    ) -> None:
        self.file = name
        self.opset = opset
        self.simplify = simplify
        self.with_maps = with_maps
        self.gradcam = gradcam

    def needs(self) -> list[tuple[str, str]]:
        needs = [
            ("torch", "exporting a checkpoint"),
            ("torchvision", "exporting a checkpoint"),
            ("safetensors", "reading checkpoints"),
            *super().needs(),
        ]
        if self.gradcam and self.with_maps:
            needs.append(
                ("pytorch_grad_cam", "checking the maps against grad-cam (or --no-verify)")
            )
        return needs

    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        torch = require("torch", purpose="exporting a checkpoint")
        from fundus_edge.convert import hygiene, onnx_export, verify
        from fundus_edge.models import load_checkpoint
        from fundus_edge.models.fused import FusedModel

        ensemble, ckpt_meta = load_checkpoint(src.path)
        fused = FusedModel(ensemble, with_maps=self.with_maps).eval()
        size = ensemble.config.image_size
        with torch.no_grad():
            probe = fused.predict(torch.zeros((1, size, size, 3), dtype=torch.uint8))
        meta = build_metadata(ckpt_meta, ensemble, src.path, probe["cams"].shape[-2:], "fp32")
        if not self.with_maps:
            meta["outputs"] = ["probs", "logits"]
            meta["benchmark_variant"] = "no maps (FusedModel with_maps=False)"
        dst = ctx.out / f"{self.file}.onnx"
        log.info("exporting %s -> %s", src.path.name, ctx.final / dst.name)
        onnx_export.torch_to_onnx(fused, dst, size, meta, opset=self.opset)
        record: dict[str, Any] = {}
        if self.simplify:
            record["simplify"] = onnx_export.simplify(dst, size, meta)
        record["hygiene"] = hygiene.check_graph(dst).to_dict()
        art = Artifact(self.makes, dst, meta)
        checks: dict[str, dict[str, Any]] = {}
        if ctx.verify:
            imgs = ctx.images(meta)
            with torch.no_grad():
                ref = {k: v.numpy() for k, v in fused.predict(torch.from_numpy(imgs)).items()}
            got = ctx.outputs(art)
            rec = verify.compare_outputs(ref, got)
            tol = verify.TOLERANCES
            rec["passed"] = bool(
                rec["probs_max_abs"] <= tol.probs and rec["logits_max_abs"] <= tol.logits
            )
            rec["tolerance"] = {"probs": tol.probs, "logits": tol.logits}
            checks["onnxruntime_vs_pytorch"] = rec
            if self.with_maps and self.gradcam:
                gc = verify.gradcam_parity(fused, imgs, got["cams"])
                gc["passed"] = bool(
                    gc["max_abs"] <= tol.cam_abs
                    and (gc["min_correlation"] is None or gc["min_correlation"] >= tol.cam_corr)
                )
                gc["tolerance"] = {"max_abs": tol.cam_abs, "correlation": tol.cam_corr}
                checks["cams_vs_gradcam"] = gc
        return StepResult(art, checks, record)


class ReadOnnx(Step):
    """An exported FP32 ``.onnx`` -> the chain's ``onnx_fp32`` (the device's starting point).

    The contract is read from the graph's metadata and checked (:func:`read_export_source`);
    the graph is copied into the output folder under ``name`` (a copy, never a link: the
    export must not share an inode with the workstation's file). Its outputs must agree with
    its contract (labels, members, map size) on the parity images, with probabilities finite
    in [0, 1]: a graph that breaks its contract is refused (exit 2), whatever ``--verify``
    says, before anything replaces the previous export.
    """

    name = "read_onnx"
    makes = "onnx_fp32"

    def __init__(self, name: str = "model") -> None:
        self.file = name

    def needs(self) -> list[tuple[str, str]]:
        return [
            ("onnx", "checking ONNX graphs"),
            ("onnxruntime", "running ONNX graphs"),
        ]

    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        from fundus_edge.convert import hygiene

        meta = src.meta or read_export_source(src.path)
        dst = ctx.out / f"{self.file}.onnx"
        shutil.copyfile(src.path.resolve(), dst)
        record = {"hygiene": hygiene.check_graph(dst).to_dict()}
        art = Artifact(self.makes, dst, meta)
        check = _contract_check(art, ctx)
        if not check["passed"]:
            raise UserError(
                f"--model {src.path}: the graph does not match its own contract: "
                + "; ".join(check["problems"])
            )
        return StepResult(art, {"onnx_contract": check}, record)


def _contract_check(art: Artifact, ctx: StepContext) -> dict[str, Any]:
    """The graph's outputs, on the parity images, have the shapes its contract promises."""
    out = ctx.outputs(art)
    meta = art.meta
    n = len(ctx.images(meta))
    c, m = len(meta["label_names"]), len(meta["members"])
    h, w = meta["map_size"]
    heads = int(meta.get("num_heads") or m)
    expect = {
        "probs": (n, c),
        "logits": (n, heads, c),
        "cams": (n, m, c, h, w),
        "attention": (n, 1, h, w),
    }
    problems = [
        f"{k} {tuple(out[k].shape)} != {shape}"
        for k, shape in expect.items()
        if k in out and tuple(out[k].shape) != shape
    ]
    problems += [f"no '{k}' output" for k in expect if k not in out]
    probs = out.get("probs")
    if probs is not None and not (
        np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1
    ):
        problems.append("probs not finite in [0, 1]")
    return {"images": n, "problems": problems, "passed": not problems}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


class OnnxToFp16(Step):
    """FP32 ONNX -> FP16 ONNX (float32 I/O; maps, attention and sigmoid kept in FP32).

    Check: ``probs`` within 1e-2 of FP32 and maps correlating >= 0.99.
    """

    name = "onnx_to_fp16"
    makes = "onnx_fp16"

    def __init__(self, name: str = "model") -> None:
        self.file = name

    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        from fundus_edge.convert import hygiene, quantize, verify

        dst = ctx.out / f"{self.file}.fp16.onnx"
        quantize.onnx_to_fp16(src.path, dst)
        meta = _derived(src, "fp16", self.name)
        _restamp(dst, meta)
        hygiene.check_graph(dst)
        art = Artifact(self.makes, dst, meta)
        checks = {}
        if ctx.verify:
            rec = verify.compare_outputs(ctx.outputs(src), ctx.outputs(art))
            tol = verify.TOLERANCES
            corr = rec["cams_correlation"]["overall"]
            rec["passed"] = bool(
                rec["probs_max_abs"] <= tol.fp16_probs
                and (corr is None or corr >= tol.fp16_map_corr)
            )
            rec["tolerance"] = {"probs": tol.fp16_probs, "map_corr": tol.fp16_map_corr}
            checks["fp16_vs_fp32"] = rec
        return StepResult(art, checks)


class OnnxToInt8(Step):
    """FP32 ONNX -> static INT8 Q/DQ ONNX calibrated on the contract's preprocessed images.

    Check (reported, not gated: INT8 accuracy is judged on the user's data): ``probs``,
    logits and maps vs FP32 on the parity images; the AUROC change on the calibration
    folder's labelled held-out split when it has one.

    Args:
        name: file stem.
        method: calibration method (``percentile``, ``minmax``, ``entropy``).
        target: ``tensorrt`` (symmetric s8 activations) or ``cpu`` (u8s8 for ONNX Runtime).
        count: calibration images.
    """

    name = "onnx_to_int8"
    makes = "onnx_int8_qdq"

    def __init__(
        self, name: str = "model", method: str = "percentile", target: str = "cpu", count: int = 64
    ) -> None:
        self.file = name
        self.method = method
        self.target = target
        self.count = count

    def needs(self) -> list[tuple[str, str]]:
        return [*super().needs(), ("onnxruntime.quantization", "INT8 calibration")]

    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        from fundus_edge.convert import hygiene, quantize

        calib = ctx.calibration(src.meta, self.count)
        dst = ctx.out / f"{self.file}.int8.onnx"
        log.info("INT8 calibration on %d images (%s)", len(calib), self.method)
        rec = quantize.onnx_to_int8(src.path, dst, calib.images, self.method, target=self.target)
        rec["calibration"] = calib.origin
        meta = _derived(src, "int8", self.name)
        meta["int8"] = {"target": self.target, "method": rec["method"], "images": len(calib)}
        _restamp(dst, meta)
        # A CPU (u8s8) Q/DQ graph is for ONNX Runtime; only the TensorRT one must parse there.
        record = {
            "quantization": rec,
            "hygiene_int8": hygiene.check_graph(dst, tensorrt=self.target == "tensorrt").to_dict(),
        }
        art = Artifact(self.makes, dst, meta)
        checks = {"int8_vs_fp32": self._check(src, art, ctx)} if ctx.verify else {}
        return StepResult(art, checks, record)

    @staticmethod
    def _check(fp32: Artifact, int8: Artifact, ctx: StepContext) -> dict[str, Any]:
        from fundus_edge.convert import verify

        rec = verify.compare_outputs(ctx.outputs(fp32), ctx.outputs(int8))
        held_out = ctx.labelled(fp32.meta)
        if held_out is not None and len(held_out):
            a32 = _macro_auroc(held_out.labels, ctx.outputs(fp32, held_out.images)["probs"])
            a8 = _macro_auroc(held_out.labels, ctx.outputs(int8, held_out.images)["probs"])
            rec["auroc"] = {
                "fp32": a32,
                "int8": a8,
                "change": None if a32 is None or a8 is None else a8 - a32,
                "images": len(held_out),
            }
        else:
            rec["auroc"] = {"note": "calibration folder has no labels: AUROC change not measured"}
        rec["passed"] = None  # reported, not gated: INT8 accuracy is judged on the user's data
        return rec


def _macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean AUROC over labels with both classes and no missing value; None when none has."""
    from fundus_edge.metrics import roc_auc_score

    keep = [
        j
        for j in range(labels.shape[1])
        if not np.isnan(labels[:, j]).any() and 0 < labels[:, j].sum() < len(labels)
    ]
    if not keep:
        return None
    return float(np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in keep]))


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxToEngine(Step):
    """ONNX -> TensorRT engine (+ sidecar contract), built on this device.

    FP32 and FP16 engines are built from the FP32 ONNX (FP16 through the builder flag, maps
    pinned to FP32), INT8 from the Q/DQ ONNX. An engine already in the final folder that
    matches this TensorRT, GPU and ONNX is reused (``rebuild``). Without TensorRT the step
    raises :class:`EngineUnavailable` (exit 2): the chain keeps what it made before it.
    """

    name = "onnx_to_engine"
    makes = "engine"

    def __init__(
        self,
        precision: str = "fp16",
        workspace_mb: int = 1024,
        batch: tuple[int, int, int] = (1, 1, 4),
        rebuild: str = "stale",
    ) -> None:
        self.precision = precision
        self.workspace_mb = workspace_mb
        self.batch = tuple(batch)
        self.rebuild = rebuild

    def needs(self) -> list[tuple[str, str]]:
        return []  # TensorRT's absence is not exit 3 here: the ONNX is kept and exit 2 says why

    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        from fundus_edge.convert.tensorrt import (
            TRT_INSTALL_HINT,
            engine_path_for,
            gpu_compute_capability,
            onnx_to_engine,
        )

        if not tensorrt_available():
            raise EngineUnavailable(
                f"{TRT_INSTALL_HINT}. The ONNX and its report are in {ctx.final}"
            )
        import tensorrt as trt

        # model.fp16.trt10.3.0.sm87.engine in this step's folder (beside a staged ONNX).
        name = engine_path_for(src.path, self.precision, trt.__version__, gpu_compute_capability())
        engine_path = ctx.out / name.name
        self._seed_cache(engine_path, ctx)
        meta = {**src.meta, "precision": self.precision}
        engine = onnx_to_engine(
            src.path,
            engine_path,
            timing_cache=ctx.out / "tensorrt.timing.cache",
            precision=self.precision,
            workspace_mb=self.workspace_mb,
            batch=self.batch,  # type: ignore[arg-type]
            meta=meta,
            rebuild=self.rebuild,
        )
        return StepResult(Artifact(self.makes, engine, meta))

    def _seed_cache(self, engine: Path, ctx: StepContext) -> None:
        """Link the timing cache and a previous engine from the final folder into ``ctx.out``.

        ``onnx_to_engine`` then applies its reuse policy (stale / always / never) to the
        engine the folder already holds, exactly as if it were building in place.
        """
        if ctx.final is None or ctx.final == ctx.out:
            return
        names = ["tensorrt.timing.cache"]
        if self.rebuild != "always":
            names += [engine.name, engine.name + ".json"]
        for name in names:
            if (ctx.final / name).is_file():
                with contextlib.suppress(FileExistsError):
                    _link_or_copy(ctx.final / name, ctx.out / name)


class OnnxToOpenVino(Step):
    """ONNX -> OpenVINO IR (``.xml`` + ``.bin``) with the contract beside it (``.xml.json``).

    From the FP32 graph the IR stores its weights in FP16 (half the file; computed in FP32 or
    BF16 at load); from the Q/DQ graph it keeps the INT8 weights. Checks against the FP32 ONNX
    (ONNX Runtime) on the parity images, gated: FP32 compute from FP16 weights (``probs``
    within 1e-2, maps correlating >= 0.99), BF16 where the CPU has it and INT8 (``probs``
    within 0.05 and 0.1, maps correlating >= 0.98).

    Args:
        name: file stem (``<name>.xml``, or ``<name>.int8.xml`` from the Q/DQ graph).
    """

    name = "onnx_to_openvino"
    makes = "openvino_ir"

    def __init__(self, name: str = "model") -> None:
        self.file = name

    def needs(self) -> list[tuple[str, str]]:
        return [*super().needs(), ("openvino", "--format openvino")]

    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        import openvino as ov

        int8 = src.precision == "int8"
        dst = ctx.out / (f"{self.file}.int8.xml" if int8 else f"{self.file}.xml")
        model = ov.convert_model(str(src.path))
        ov.save_model(model, str(dst), compress_to_fp16=not int8)
        meta = _derived(src, src.precision, self.name)
        meta["openvino"] = {
            "version": ov.__version__,
            "weights": "int8" if int8 else "fp16",
            "precisions": ["int8"] if int8 else ["fp32", "bf16"],
        }
        from fundus_edge.artifact import sidecar_path
        from fundus_edge.fileio import atomic_write_json

        atomic_write_json(sidecar_path(dst), meta)
        art = Artifact(self.makes, dst, meta)
        checks = {"openvino_vs_fp32": self._check(src, art, ctx)} if ctx.verify else {}
        return StepResult(art, checks)

    @staticmethod
    def _check(src: Artifact, ir: Artifact, ctx: StepContext) -> dict[str, Any]:
        """Each precision the IR runs at, against the FP32 ONNX; gated by its tolerance."""
        from fundus_edge.backends.openvino import OpenVinoBackend
        from fundus_edge.convert import verify

        ref_art = src
        if src.precision != "fp32":  # compare with the FP32 graph this one came from
            ref_art = ctx.fp32 or src
        ref = ctx.outputs(ref_art)
        images = ctx.images(ir.meta)
        tol = verify.TOLERANCES
        limits = {
            "fp32": (tol.fp16_probs, tol.fp16_map_corr),
            "bf16": (tol.bf16_probs, tol.low_map_corr),
            "int8": (tol.ov_int8_probs, tol.low_map_corr),
        }
        rec: dict[str, Any] = {"reference": ref_art.path.name, "precisions": {}}
        passed = True
        from fundus_edge.backends.openvino import cpu_supports_bf16

        for precision in ir.meta["openvino"]["precisions"]:
            if precision == "bf16" and not cpu_supports_bf16():
                rec["precisions"][precision] = {"skipped": "this CPU has no BF16 compute"}
                continue  # reported, not a failure: the device decides at run time
            backend = OpenVinoBackend(ir.path, precision=precision)
            try:
                got = backend.infer(images)
            finally:
                backend.close()
            cmp = verify.compare_outputs(ref, got)
            max_probs, min_corr = limits[precision]
            corr = cmp["cams_correlation"]["overall"]
            ok = cmp["probs_max_abs"] <= max_probs and (corr is None or corr >= min_corr)
            cmp.update(passed=bool(ok), tolerance={"probs": max_probs, "map_corr": min_corr})
            rec["precisions"][precision] = cmp
            passed = passed and ok
        rec["passed"] = passed
        return rec


class ToTriton(Step):
    """ONNX or engine -> a Triton model repository (``config.pbtxt`` + ``1/model.*``)."""

    name = "to_triton"
    makes = "triton"

    def __init__(
        self,
        name: str = "model",
        max_batch_size: int = 8,
        instances: int = 1,
        kind: str = "KIND_GPU",
    ) -> None:
        self.model_name = name
        self.max_batch_size = max_batch_size
        self.instances = instances
        self.kind = kind

    def needs(self) -> list[tuple[str, str]]:
        return []

    def run(self, src: Artifact, ctx: StepContext) -> StepResult:
        from fundus_edge.convert.triton import write_triton_repository

        repo = write_triton_repository(
            src.path,
            ctx.out / "triton",
            src.meta,
            name=self.model_name,
            max_batch_size=self.max_batch_size,
            instances=self.instances,
            kind=self.kind,
        )
        return StepResult(Artifact(self.makes, repo, src.meta))
