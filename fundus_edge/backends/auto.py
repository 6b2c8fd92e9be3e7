"""``--backend auto``: the fastest backend x precision that passes parity, measured here, once.

For an exported ``model.onnx`` the candidates are what this machine can run from the files
export wrote beside it:

* ONNX Runtime FP32 on ``model.onnx`` (the reference: always a candidate, so ``auto`` is never
  slower than it), and INT8 on ``model.int8.onnx`` when it is there;
* OpenVINO (when installed) FP32 and, where the CPU computes BF16 (AMX or AVX-512-BF16), BF16
  on ``model.onnx``; INT8 on ``model.int8.onnx``; and the IRs ``model.xml`` /
  ``model.int8.xml`` when export wrote them.

Each candidate runs the same preprocessed frames (generated fundus photographs, preprocessed by
the contract) and must agree with ONNX Runtime FP32 within its precision's tolerance:
``probs`` max |Δ| (FP32 1e-3, BF16 5e-2, INT8 1e-1), map correlation >= 0.98 and label
agreement >= 0.99 at the model's thresholds. The ones that pass are timed batch 1, interleaved
in rounds (A, B, ... then reversed), and the lowest median wins.

The choice is cached beside the model (``<model>.backend.json``) with what it depends on: the
SHA-256 of every candidate file, the fundus-edge, ONNX Runtime and OpenVINO versions, and the
CPU (model and flags). Any change measures again; an unwritable folder just measures each time.
A TensorRT engine or a checkpoint has one backend: ``auto`` loads it as its suffix says.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = ["CACHE_SUFFIX", "AutoChoice", "Candidate", "candidates", "choose"]

log = get_logger("backends.auto")

CACHE_SUFFIX = ".backend.json"
# Parity gates against ONNX Runtime FP32: probs max |d| per precision, maps and labels.
PROBS_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "int8": 1e-1}
MIN_MAP_CORRELATION = 0.98
MIN_LABEL_AGREEMENT = 0.99


@dataclass(frozen=True)
class Candidate:
    """One way to run the model here."""

    backend: str
    precision: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} ({self.path.name})"


@dataclass
class AutoChoice:
    """The winner and the whole measurement (also the cache file's content)."""

    candidate: Candidate
    record: dict[str, Any]
    cached: bool


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def candidates(model: Path) -> list[Candidate]:
    """Backend x precision x file combinations for ``model`` (an FP32 ``.onnx``)."""
    stem = model.name.removesuffix(".onnx")
    int8 = model.with_name(f"{stem}.int8.onnx")
    out = [Candidate("onnxruntime", "fp32", model)]
    if int8.is_file():
        out.append(Candidate("onnxruntime", "int8", int8))
    if _available("openvino"):
        from fundus_edge.backends.openvino import cpu_supports_bf16

        bf16 = cpu_supports_bf16()
        out.append(Candidate("openvino", "fp32", model))
        if bf16:
            out.append(Candidate("openvino", "bf16", model))
        if int8.is_file():
            out.append(Candidate("openvino", "int8", int8))
        ir, ir8 = model.with_name(f"{stem}.xml"), model.with_name(f"{stem}.int8.xml")
        if ir.is_file():
            out.append(Candidate("openvino", "fp32", ir))
            if bf16:
                out.append(Candidate("openvino", "bf16", ir))
        if ir8.is_file():
            out.append(Candidate("openvino", "int8", ir8))
    return out


def _key(cands: list[Candidate]) -> dict[str, Any]:
    """What the choice depends on: files, runtime versions, the CPU."""
    from importlib import metadata

    from fundus_edge import __version__
    from fundus_edge.doctor import cpu_info
    from fundus_edge.fileio import sha256_file

    versions: dict[str, str | None] = {"fundus_edge": __version__}
    for dist in ("onnxruntime", "onnxruntime-gpu", "openvino"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    cpu = cpu_info()
    files = sorted({str(c.path.name): c.path for c in cands}.items())
    return {
        "files": {name: sha256_file(path) for name, path in files},
        "versions": versions,
        "cpu": {
            "model": cpu.get("model"),
            "flags": cpu.get("flags"),
            "machine": platform.machine(),
        },
    }


def _frames(meta: dict[str, Any], n: int) -> np.ndarray:
    from fundus_edge.convert.calibration import synthetic_images
    from fundus_edge.preprocess import PreprocessConfig

    return synthetic_images(PreprocessConfig.from_dict(meta["preprocess"]), n, seed=11).images


def _parity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str, thr) -> dict:
    from fundus_edge.convert.verify import compare_outputs

    cmp = compare_outputs(ref, got)
    t = np.asarray(thr, dtype=np.float64)[None, :]
    agree = float(((ref["probs"] >= t) == (got["probs"] >= t)).mean())
    corr = (cmp.get("cams_correlation") or {}).get("overall")
    ok = (
        cmp["probs_max_abs"] <= PROBS_TOLERANCE[precision]
        and (corr is None or corr >= MIN_MAP_CORRELATION)
        and agree >= MIN_LABEL_AGREEMENT
    )
    return {
        "probs_max_abs": cmp["probs_max_abs"],
        "map_correlation": corr,
        "label_agreement": agree,
        "passed": bool(ok),
    }


def choose(
    model: str | Path,
    *,
    frames: int = 8,
    rounds: int = 5,
    iters: int = 3,
    threads: int = 0,
    use_cache: bool = True,
) -> AutoChoice:
    """Measure (or read from the cache) the fastest passing backend x precision for ``model``.

    Raises:
        UserError: ``model`` is not an FP32 ``.onnx`` export wrote.
    """
    from fundus_edge.artifact import read_metadata
    from fundus_edge.backends import load_backend
    from fundus_edge.fileio import atomic_write_json

    model = Path(model)
    meta = read_metadata(model)
    if model.suffix.lower() != ".onnx" or str(meta.get("precision") or "fp32") != "fp32":
        raise UserError(
            f"--backend auto {model}: give the FP32 model.onnx export wrote; auto then also "
            "tries the model.int8.onnx and OpenVINO IRs beside it"
        )
    cands = candidates(model)
    key = _key(cands)
    cache = model.with_name(model.name + CACHE_SUFFIX)
    if use_cache and cache.is_file():
        try:
            rec = json.loads(cache.read_text(encoding="utf-8"))
            if rec.get("key") == key:
                c = rec["chosen"]
                chosen = Candidate(c["backend"], c["precision"], model.with_name(c["file"]))
                return AutoChoice(chosen, rec, cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache: measure again
    images = _frames(meta, frames)
    one = images[:1]
    thr = meta["thresholds"]
    loaded: dict[Candidate, Any] = {}
    rows: dict[Candidate, dict[str, Any]] = {}
    ref = None
    try:
        for cand in cands:
            row: dict[str, Any] = {
                "backend": cand.backend,
                "precision": cand.precision,
                "file": cand.path.name,
            }
            rows[cand] = row
            try:
                opts: dict[str, Any] = {"threads": threads or None}
                if cand.backend == "openvino":
                    opts["precision"] = cand.precision
                b = load_backend(cand.path, backend=cand.backend, **opts)
                out = b.infer(images)
            except UserError as exc:
                row.update(passed=False, error=str(exc))
                continue
            if ref is None:  # ONNX Runtime FP32 comes first: the reference
                ref = out
            row["parity"] = _parity(ref, out, cand.precision, thr)
            row["passed"] = row["parity"]["passed"]
            if row["passed"]:
                loaded[cand] = b
            else:
                b.close()
        samples: dict[Candidate, list[float]] = {c: [] for c in loaded}
        order = list(loaded)
        for b in loaded.values():
            for _ in range(2):
                b.infer(one)  # warm-up
        for r in range(rounds):
            for cand in order if r % 2 == 0 else order[::-1]:
                for _ in range(iters):
                    t0 = time.perf_counter()
                    loaded[cand].infer(one)
                    samples[cand].append((time.perf_counter() - t0) * 1e3)
    finally:
        for b in loaded.values():
            b.close()
    for cand, times in samples.items():
        rows[cand]["median_ms"] = round(statistics.median(times), 3)
    if not samples:
        raise UserError(f"--backend auto {model}: no backend could run it here")
    chosen = min(samples, key=lambda c: rows[c]["median_ms"])
    best = rows[chosen]
    rec = {
        "chosen": {"backend": chosen.backend, "precision": chosen.precision, "file": best["file"]},
        "median_ms": best["median_ms"],
        "candidates": list(rows.values()),
        "key": key,
        "frames": frames,
        "timing": f"batch 1, {rounds} interleaved rounds x {iters} calls after 2 warm-up calls",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if use_cache:
        try:
            atomic_write_json(cache, rec)
        except (OSError, UserError) as exc:
            log.warning("--backend auto: cannot cache the choice beside the model (%s)", exc)
    return AutoChoice(chosen, rec, cached=False)
