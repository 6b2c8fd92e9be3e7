"""``export_model``: checkpoint -> fused ONNX (+ FP16 / INT8 Q/DQ) -> TensorRT engine / Triton.

Each step is a small function named by direction (``torch_to_onnx``, ``onnx_to_fp16``,
``onnx_to_int8``, ``onnx_to_engine``, ``write_triton_repository``) that checks its own output;
this module chains them, runs the parity checks and writes ``export_report.json``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge import __version__
from fundus_edge.convert.quantize import CALIB_METHODS
from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_json, ensure_writable_dir, sha256_file
from fundus_edge.log import get_logger
from fundus_edge.options import load_yaml_mapping

__all__ = ["FORMATS", "ExportConfig", "build_metadata", "export_model", "load_profile"]

log = get_logger("convert")

FORMATS = ("onnx", "engine", "triton")
PRECISIONS = ("fp32", "fp16", "int8")
REPORT = "export_report.json"

# Command-line spelling of ExportConfig fields (profile-only fields keep their key).
_FLAGS = {
    "model": "--model",
    "out": "--out",
    "format": "--format",
    "precision": "--precision",
    "calib": "--calib",
    "calib_count": "--calib-count",
    "calib_method": "--calib-method",
    "int8_target": "--int8-target",
    "opset": "--opset",
    "workspace_mb": "--workspace",
    "batch": "--batch",
    "rebuild": "--rebuild",
    "triton_backend": "--triton-backend",
    "triton_max_batch": "--max-batch",
    "name": "--name",
}


@dataclass
class ExportConfig:
    """Options of ``fundus-edge export``; a profile in ``export/`` supplies defaults.

    Attributes:
        model: the checkpoint (``.safetensors``) to export.
        out: output folder.
        format: ``onnx``, ``engine`` (TensorRT, built here: run it on the device) or ``triton``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        calib: folder of fundus images or a dataset, for INT8 calibration and parity checks.
        calib_count: images used for calibration.
        calib_method: ``percentile``, ``minmax`` or ``entropy``.
        int8_target: ``auto`` (``tensorrt`` for engine/Triton-engine formats, else ``cpu``),
            ``tensorrt`` (symmetric s8 Q/DQ) or ``cpu`` (u8s8, ONNX Runtime's fast x86 path).
        verify: run the parity checks (ORT vs PyTorch, maps vs grad-cam, precision vs FP32).
        verify_images: images used for parity checks.
        opset: ONNX opset.
        simplify: try onnxslim / ORT basic optimisation and keep what is faster.
        workspace_mb: TensorRT builder workspace.
        batch: TensorRT optimisation profile (min, opt, max).
        rebuild: TensorRT engine reuse policy: stale, always, never.
        triton_backend: for ``triton``: ``onnx`` (onnxruntime_onnx) or ``engine`` (tensorrt_plan).
        triton_max_batch: Triton ``max_batch_size``.
        triton_instances: model instances per GPU.
        triton_kind: ``KIND_GPU`` or ``KIND_CPU``.
        name: model name (file stem and Triton model name).
        profile: the profile file the defaults came from, if any.
        profile_keys: the fields whose value came from ``profile`` (so messages name it).
    """

    model: str = ""
    out: str = "exports/model"
    format: str = "onnx"
    precision: str = "fp32"
    calib: str | None = None
    calib_count: int = 64
    calib_method: str = "percentile"
    int8_target: str = "auto"
    verify: bool = True
    verify_images: int = 4
    opset: int = 17
    simplify: bool = True
    workspace_mb: int = 1024
    batch: tuple[int, int, int] = (1, 1, 4)
    rebuild: str = "stale"
    triton_backend: str = "onnx"
    triton_max_batch: int = 8
    triton_instances: int = 1
    triton_kind: str = "KIND_GPU"
    name: str = "model"
    profile: str | None = field(default=None)
    profile_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Every option is checked here, before any work: a bad value must not cost an export.
        try:
            self.batch = tuple(int(b) for b in self.batch)  # type: ignore[assignment]
        except (TypeError, ValueError):
            raise UserError(
                f"{self.where('batch')}: expected three integers min,opt,max like 1,1,4"
            ) from None
        self.profile_keys = tuple(self.profile_keys)
        choices = {
            "format": FORMATS,
            "precision": PRECISIONS,
            "calib_method": CALIB_METHODS,
            "rebuild": ("stale", "always", "never"),
            "int8_target": ("auto", "tensorrt", "cpu"),
            "triton_backend": ("onnx", "engine"),
            "triton_kind": ("KIND_GPU", "KIND_CPU"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{self.where(key)}: choose {', '.join(allowed)}")
        for key in (
            "calib_count",
            "verify_images",
            "workspace_mb",
            "triton_max_batch",
            "triton_instances",
        ):
            if int(getattr(self, key)) < 1:
                raise UserError(f"{self.where(key)}: must be at least 1")
        if len(self.batch) != 3:
            raise UserError(f"{self.where('batch')}: needs three numbers min,opt,max")
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"{self.where('batch')}: need 1 <= min <= opt <= max")
        if (
            self.format == "triton"
            and self.triton_backend == "engine"
            and self.triton_max_batch > hi
        ):
            raise UserError(
                f"{self.where('triton_max_batch')}: above the engine's max batch {hi} "
                f"({self.where('batch')}); Triton would refuse to load the plan"
            )
        if self.opset < 9 or self.opset > 20:
            raise UserError(f"{self.where('opset')}: TensorRT 10 parses opsets 9-20")
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise UserError(f"{self.where('name')}: a plain file name, without folders")

    def where(self, key: str) -> str:
        """Where the value of ``key`` came from, for messages: the option, or the profile file."""
        value = getattr(self, key)
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        if self.profile and key in self.profile_keys:
            return f"{key}: {value!r} in --profile {self.profile}"
        return f"{_FLAGS.get(key, key)} {value!r}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch"] = list(self.batch)
        return d


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read an export profile (YAML mapping of :class:`ExportConfig` fields)."""

    path = Path(path)
    if not path.is_file():
        # Allow a bare name: export/<name>.yaml in the source tree.
        cand = (
            Path(__file__).resolve().parents[2]
            / "export"
            / f"{path.name.removesuffix('.yaml')}.yaml"
        )
        if not cand.is_file():
            raise UserError(f"--profile {path}: no such file (profiles live in export/)")
        path = cand
    data = load_yaml_mapping(path, "--profile")
    data.pop("description", None)
    known = {f.name for f in fields(ExportConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown export option(s): {', '.join(unknown)}")
    data["profile"] = str(path)
    data["profile_keys"] = tuple(k for k in data if k != "profile")
    return data


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"fundus_edge": __version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


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
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return meta


def _images_from(
    path: Path, pre_cfg, limit: int, prefer: tuple[str, ...], label_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed uint8 images from a folder, and labels when ``path`` is a dataset.

    Labels come back in ``label_names`` order (the model's); a model label the data lacks
    is a column of NaN, so AUROC skips it.
    """
    from fundus_edge.preprocess import preprocess, read_image

    if not path.exists():
        raise UserError(f"--calib {path}: no such folder")
    samples, labels = [], None
    try:
        from fundus_edge.datasets import open_dataset

        ds = open_dataset(path)
        for split in prefer:
            if ds.splits.get(split):
                samples = ds.splits[split][:limit]
                break
        labels = np.stack([s.labels for s in samples]) if samples else None
        if labels is not None and label_names is not None:
            cols = [ds.label_names.index(n) if n in ds.label_names else -1 for n in label_names]
            aligned = np.full((len(labels), len(cols)), np.nan, np.float32)
            for j, c in enumerate(cols):
                if c >= 0:
                    aligned[:, j] = labels[:, c]
            labels = aligned
        paths = [s.path for s in samples]
    except UserError:
        exts = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
        paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in exts)[:limit]
    if not paths:
        raise UserError(f"--calib {path}: no fundus images found")
    imgs = [preprocess(read_image(p), pre_cfg).image for p in paths]
    return np.stack(imgs), labels


def _synthetic_images(pre_cfg, n: int, seed: int = 0) -> np.ndarray:
    """Verification images when no --calib folder is given: generated fundus photographs."""
    from fundus_edge.preprocess import preprocess
    from fundus_edge.synth import DEFAULT_PREVALENCE, generate_image, sample_labels

    out = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99, i)))
        img = generate_image(rng, max(256, pre_cfg.size), sample_labels(rng, DEFAULT_PREVALENCE))[0]
        out.append(preprocess(img, pre_cfg).image)
    return np.stack(out)


def _macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    keep = [
        j
        for j in range(labels.shape[1])
        if not np.isnan(labels[:, j]).any() and 0 < labels[:, j].sum() < len(labels)
    ]
    if not keep:
        return None
    return float(roc_auc_score(labels[:, keep], probs[:, keep], average="macro"))


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Export a checkpoint as ``cfg`` says; returns the report (also written as JSON).

    Every artifact is built in a staging folder inside ``cfg.out`` and moved into place only
    at the end, the report last: an interrupted or failed export leaves ``cfg.out`` as it was
    (the previous complete export, or no folder if it created it).

    Raises:
        UserError: bad inputs, a failed parity check, an unsupported operator, or
            ``format='engine'`` without TensorRT (after the ONNX and report are written).
    """
    checkpoint = Path(cfg.model)
    if not cfg.model or not checkpoint.is_file():
        raise UserError(f"--model {cfg.model or '(missing)'}: no such checkpoint")
    if cfg.precision == "int8" and not cfg.calib:
        if cfg.profile and "precision" in cfg.profile_keys:
            source = f"precision: int8 in --profile {cfg.profile}"
        else:
            source = "--int8"
        raise UserError(
            f"{source} needs --calib DIR: real preprocessed fundus images to calibrate on"
        )
    if cfg.calib and not Path(cfg.calib).exists():
        raise UserError(f"--calib {cfg.calib}: no such folder")
    out = Path(cfg.out)
    created = _prepare_out(out)
    stage: Path | None = None
    committed = False
    try:
        stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
        report, error = _build(cfg, checkpoint, stage, out)
        _commit(stage, out)
        committed = True
    finally:
        # Also on KeyboardInterrupt: nothing half-built stays behind.
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if not committed:
            for folder in created:  # deepest first; only the ones this call made, if empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
    if error is not None:
        raise error
    return report


def _prepare_out(out: Path) -> list[Path]:
    """Check ``--out`` before any work; create it. Returns the folders created, deepest first."""
    missing = []
    p = out.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        ensure_writable_dir(out, "--out")
    except UserError:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return missing


def _commit(stage: Path, out: Path) -> None:
    """Move the staged export into ``out``: artifacts first, the report last.

    The old report goes first, so a swap cut short (a full disk) leaves models without a
    report (unverified, visibly) rather than new models beside an old report. Artifacts the
    old report listed that this export did not make are removed: they belong to no report.
    """
    new_files = sorted(
        p.relative_to(stage) for p in stage.rglob("*") if p.is_file() and p.name != REPORT
    )
    stale = _old_artifacts(out) - {f.parts[0] for f in new_files}
    with _sigint_deferred():
        (out / REPORT).unlink(missing_ok=True)
        for rel in new_files:
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dest)
        os.replace(stage / REPORT, out / REPORT)
    for name in stale:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _old_artifacts(out: Path) -> set[str]:
    """Top-level names in ``out`` that its current report lists (files, sidecars, folders)."""
    try:
        old = json.loads((out / REPORT).read_text())
        arts = old.get("artifacts", {}).values()
        names = set()
        for art in arts:
            first = Path(str(art["path"])).parts[0]
            if first not in (".", "..", REPORT) and not Path(first).is_absolute():
                names.add(first)
                if first.endswith(".engine"):
                    names.add(first + ".json")
        return names
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return set()  # no report, or not one of ours: touch nothing


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C during the (fast) renames; raise KeyboardInterrupt after them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
    if caught:
        raise KeyboardInterrupt


def _build(
    cfg: ExportConfig, checkpoint: Path, out: Path, final: Path
) -> tuple[dict[str, Any], UserError | None]:
    """Write every artifact and the report into ``out`` (the staging folder).

    ``final`` is the folder they will be moved to: an engine and timing cache there are
    reused as before. Returns the report and the error to raise once it is in place.
    """
    import torch

    from fundus_edge.convert import hygiene, onnx_export, quantize, verify
    from fundus_edge.models import load_checkpoint
    from fundus_edge.models.fused import FusedModel
    from fundus_edge.preprocess import PreprocessConfig

    ensemble, ckpt_meta = load_checkpoint(checkpoint)
    fused = FusedModel(ensemble).eval()
    size = ensemble.config.image_size
    with torch.no_grad():
        probe = fused.predict(torch.zeros((1, size, size, 3), dtype=torch.uint8))
    map_size = tuple(probe["cams"].shape[-2:])
    meta = build_metadata(ckpt_meta, ensemble, checkpoint, map_size, "fp32")
    pre_cfg = PreprocessConfig.from_dict(meta["preprocess"])
    report: dict[str, Any] = {
        "config": cfg.to_dict(),
        "checkpoint": str(checkpoint),
        "artifacts": {},
        "checks": {},
        "passed": True,
    }

    # 1. FP32 fused graph, simplified, hygiene-checked.
    onnx_path = out / f"{cfg.name}.onnx"
    log.info("exporting %s -> %s", checkpoint.name, final / onnx_path.name)
    onnx_export.torch_to_onnx(fused, onnx_path, size, meta, opset=cfg.opset)
    if cfg.simplify:
        report["simplify"] = onnx_export.simplify(onnx_path, size, meta)
    report["hygiene"] = hygiene.check_graph(onnx_path).to_dict()
    report["artifacts"]["onnx_fp32"] = {
        "path": onnx_path.name,
        "size_mb": round(onnx_path.stat().st_size / 1e6, 2),
    }

    # Images for checks and calibration.
    calib_imgs = None
    if cfg.calib:
        calib_imgs, _ = _images_from(
            Path(cfg.calib), pre_cfg, cfg.calib_count, ("train", "val", "test")
        )
    if cfg.calib:
        vimgs = calib_imgs[: cfg.verify_images]
    else:
        vimgs = _synthetic_images(pre_cfg, cfg.verify_images)

    # 2. Parity: ORT vs PyTorch, maps vs grad-cam.
    ref_ort = None
    if cfg.verify:
        with torch.no_grad():
            ref_torch = {k: v.numpy() for k, v in fused.predict(torch.from_numpy(vimgs)).items()}
        ref_ort = verify.ort_outputs(onnx_path, vimgs)
        ort_vs_torch = verify.compare_outputs(ref_torch, ref_ort)
        tol = verify.TOLERANCES
        ok = (
            ort_vs_torch["probs_max_abs"] <= tol.probs
            and ort_vs_torch["logits_max_abs"] <= tol.logits
        )
        report["checks"]["onnxruntime_vs_pytorch"] = {
            **ort_vs_torch,
            "passed": ok,
            "tolerance": {"probs": tol.probs, "logits": tol.logits},
        }
        gc = verify.gradcam_parity(fused, vimgs, ref_ort["cams"])
        gc_ok = gc["max_abs"] <= tol.cam_abs and (
            gc["min_correlation"] is None or gc["min_correlation"] >= tol.cam_corr
        )
        report["checks"]["cams_vs_gradcam"] = {
            **gc,
            "passed": gc_ok,
            "tolerance": {"max_abs": tol.cam_abs, "correlation": tol.cam_corr},
        }
        report["passed"] = ok and gc_ok

    # 3. Reduced precision ONNX.
    deploy_onnx = onnx_path
    trt_available = _tensorrt_available()
    if cfg.precision == "fp16" and not (cfg.format == "engine" and trt_available):
        p16 = out / f"{cfg.name}.fp16.onnx"
        quantize.onnx_to_fp16(onnx_path, p16)
        _set_precision(p16, meta, "fp16")
        hygiene.check_graph(p16)
        report["artifacts"]["onnx_fp16"] = {
            "path": p16.name,
            "size_mb": round(p16.stat().st_size / 1e6, 2),
        }
        deploy_onnx = p16
        if cfg.verify:
            cmp16 = verify.compare_outputs(ref_ort, verify.ort_outputs(p16, vimgs))
            tol = verify.TOLERANCES
            corr = cmp16["cams_correlation"]["overall"]
            ok16 = cmp16["probs_max_abs"] <= tol.fp16_probs and (
                corr is None or corr >= tol.fp16_map_corr
            )
            report["checks"]["fp16_vs_fp32"] = {
                **cmp16,
                "passed": ok16,
                "tolerance": {"probs": tol.fp16_probs, "map_corr": tol.fp16_map_corr},
            }
            report["passed"] = report["passed"] and ok16
    if cfg.precision == "int8":
        p8 = out / f"{cfg.name}.int8.onnx"
        log.info("INT8 calibration on %d images (%s)", len(calib_imgs), cfg.calib_method)
        target = cfg.int8_target
        if target == "auto":
            wants_trt = cfg.format == "engine" or (
                cfg.format == "triton" and cfg.triton_backend == "engine"
            )
            target = "tensorrt" if wants_trt else "cpu"
        report["quantization"] = quantize.onnx_to_int8(
            onnx_path, p8, calib_imgs, cfg.calib_method, target=target
        )
        _set_precision(p8, meta, "int8")
        # A CPU (u8s8) Q/DQ graph is for ONNX Runtime; only the TensorRT one must parse there.
        report["hygiene_int8"] = hygiene.check_graph(p8, tensorrt=target == "tensorrt").to_dict()
        report["artifacts"]["onnx_int8_qdq"] = {
            "path": p8.name,
            "size_mb": round(p8.stat().st_size / 1e6, 2),
        }
        deploy_onnx = p8
        if cfg.verify:
            report["checks"]["int8_vs_fp32"] = _int8_check(
                onnx_path, p8, Path(cfg.calib), pre_cfg, meta["label_names"], vimgs
            )

    # 4. TensorRT engine / Triton repository.
    engine_path = None
    if cfg.format == "engine" or (cfg.format == "triton" and cfg.triton_backend == "engine"):
        if not trt_available:
            _write_report(out, report)
            from fundus_edge.convert.tensorrt import TRT_INSTALL_HINT

            return report, UserError(f"{TRT_INSTALL_HINT}. The ONNX and its report are in {final}")
        from fundus_edge.convert.tensorrt import onnx_to_engine

        src = onnx_path if cfg.precision in ("fp32", "fp16") else deploy_onnx
        _seed_engine_cache(src, cfg.precision, cfg.rebuild, final)
        engine_path = onnx_to_engine(
            src,
            timing_cache=out / "tensorrt.timing.cache",
            precision=cfg.precision,
            workspace_mb=cfg.workspace_mb,
            batch=cfg.batch,
            meta={**meta, "precision": cfg.precision},
            rebuild=cfg.rebuild,
        )
        report["artifacts"]["engine"] = {
            "path": engine_path.name,
            "size_mb": round(engine_path.stat().st_size / 1e6, 2),
        }
    if cfg.format == "triton":
        from fundus_edge.convert.triton import write_triton_repository

        src = engine_path if cfg.triton_backend == "engine" else deploy_onnx
        repo = write_triton_repository(
            src,
            out / "triton",
            {**meta, "precision": cfg.precision},
            name=cfg.name,
            max_batch_size=cfg.triton_max_batch,
            instances=cfg.triton_instances,
            kind=cfg.triton_kind,
        )
        report["artifacts"]["triton"] = {"path": repo.relative_to(out).as_posix()}
    report["deploy"] = (engine_path or deploy_onnx).name
    _write_report(out, report)
    if not report["passed"]:
        failed = [
            k
            for k, v in report["checks"].items()
            if isinstance(v, dict) and v.get("passed") is False
        ]
        return report, UserError(f"{final / REPORT}: parity check(s) failed: {', '.join(failed)}")
    return report, None


def _seed_engine_cache(src: Path, precision: str, rebuild: str, final: Path) -> None:
    """Link the timing cache and a previous engine from ``final`` into the staging folder.

    ``onnx_to_engine`` then applies its reuse policy (stale / always / never) to the engine
    the folder already holds, exactly as if it were building in place.
    """
    import tensorrt as trt

    from fundus_edge.convert.tensorrt import engine_path_for, gpu_compute_capability

    names = ["tensorrt.timing.cache"]
    if rebuild != "always":
        eng = engine_path_for(src, precision, trt.__version__, gpu_compute_capability()).name
        names += [eng, eng + ".json"]
    for name in names:
        if (final / name).is_file():
            try:
                os.link(final / name, src.parent / name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(final / name, src.parent / name)


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _set_precision(path: Path, meta: dict[str, Any], precision: str) -> None:
    import onnx

    from fundus_edge.convert.onnx_export import embed_metadata
    from fundus_edge.fileio import atomic_write_bytes

    m = onnx.load(str(path))
    embed_metadata(m, {**meta, "precision": precision})
    atomic_write_bytes(path, m.SerializeToString())


def _int8_check(
    fp32: Path, int8: Path, calib: Path, pre_cfg, label_names: list[str], vimgs: np.ndarray
) -> dict[str, Any]:
    """INT8 vs FP32: probs and maps on the check images; AUROC change on a labelled split."""
    from fundus_edge.convert import verify

    rec = verify.compare_outputs(verify.ort_outputs(fp32, vimgs), verify.ort_outputs(int8, vimgs))
    try:
        imgs, labels = _images_from(calib, pre_cfg, 10_000, ("test", "val"), label_names)
    except UserError:
        labels = None
    if labels is not None and len(labels):
        p32 = np.concatenate(
            [verify.ort_outputs(fp32, imgs[i : i + 8])["probs"] for i in range(0, len(imgs), 8)]
        )
        p8 = np.concatenate(
            [verify.ort_outputs(int8, imgs[i : i + 8])["probs"] for i in range(0, len(imgs), 8)]
        )
        a32, a8 = _macro_auroc(labels, p32), _macro_auroc(labels, p8)
        rec["auroc"] = {
            "fp32": a32,
            "int8": a8,
            "change": None if a32 is None or a8 is None else a8 - a32,
            "images": len(imgs),
        }
    else:
        rec["auroc"] = {"note": "calibration folder has no labels: AUROC change not measured"}
    rec["passed"] = None  # reported, not gated: INT8 accuracy is judged by the user on their data
    return rec


def _write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_json(out / REPORT, report)
