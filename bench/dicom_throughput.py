"""``run`` over full-size JPEG DICOM photographs vs the same photos as PNG, per stage.

``python bench/dicom_throughput.py [--model M] [--n 12] [--repeats 3] [--out DIR] [--quick]``

Makes ``--n`` distinct 4288x2848 fundus photographs (``skimage.data.retina()``, a real fundus
photo, upscaled to 2848 px high on a black 4288-wide frame, each shifted a little, with its own
brightness and a little sensor noise so that neither format compresses an unnaturally smooth
image), writes them once as PNG (OpenCV's default compression) and once as Ophthalmic
Photography DICOM objects with JPEG baseline pixel data (quality 95, ``write_photo``), then
measures, with the formats interleaved (PNG, DICOM in even repeats, DICOM, PNG in odd ones, so
drift hits both alike):

* decoding alone: every frame read through ``open_source(folder)`` (ms per frame, file
  read + parse + decode + colour conversion, the capture thread's whole work);
* the whole ``run`` (headless, no sinks, one :class:`~fundus_edge.runtime.Predictor` built once
  and reused): per-stage ms from ``RunSummary.stage_ms`` and end-to-end FPS.

Medians over the repeats go to ``result.json`` and ``README.md`` in ``--out`` (default
``bench/results/<device>/dicom-throughput``), with the DICOM/PNG ratios and the verdict of the
acceptance target: PNG FPS / DICOM FPS <= 1.2 (decoding must not become the bottleneck). A
decoder probe times one DICOM frame through each pydicom JPEG plugin, the reader's
``decode_frame`` and OpenCV on the same codestream, to show where decoding time goes.

``--quick`` makes 536x356 photographs (an eighth of the size; what the test runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import machine  # bench/machine.py: what the results record about the machine
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "demo" / "export" / "model.onnx"
FULL_SIZE = (4288, 2848)  # width, height: a 12-megapixel fundus camera's frame
QUICK_SIZE = (536, 356)
FORMATS = ("png", "dicom")
LABEL = {"png": "PNG", "dicom": "JPEG DICOM"}
TARGET = 1.2  # PNG FPS / DICOM FPS must not exceed this
JPEG_QUALITY = 95
PACKAGES = (
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pillow",
    "opencv-python-headless",
    "opencv-python",
    "onnxruntime",
    "numpy",
    "fundus-edge",
)

__all__ = ["main", "make_photo", "measure", "write_photos"]


# ---------------------------------------------------------------------------- the photographs


def make_photo(
    base: np.ndarray, size: tuple[int, int], index: int, noise: float = 2.0
) -> np.ndarray:
    """Photo ``index``: ``base`` (a square RGB fundus photo) scaled to the frame's height,
    centred on a black ``size`` (width, height) frame, shifted by a few pixels, with its own
    brightness and Gaussian noise of ``noise`` grey levels (0: none). RGB uint8."""
    import cv2

    w, h = size
    rng = np.random.default_rng(index)
    s = h / base.shape[0]
    dx, dy = rng.uniform(-0.01, 0.01, 2) * h  # up to 1 % of the height: 28 px at full size
    m = np.float32([[s, 0, (w - base.shape[1] * s) / 2 + dx], [0, s, dy]])
    img = cv2.warpAffine(base, m, (w, h), flags=cv2.INTER_CUBIC, borderValue=(0, 0, 0))
    gain = 0.9 + 0.2 * rng.random()
    if noise > 0:
        n = np.empty(img.shape, np.int16)
        cv2.setRNGSeed(index)
        cv2.randn(n, 0, noise)
        out = img.astype(np.float32) * gain + n
        out[img.max(axis=2) == 0] = 0  # the frame outside the field of view stays black
    else:
        out = img.astype(np.float32) * gain
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_photos(
    root: Path, n: int, size: tuple[int, int], noise: float = 2.0
) -> dict[str, dict[str, Any]]:
    """Write ``n`` photos as PNG into ``root/png`` and as JPEG DICOM into ``root/dicom``."""
    import cv2
    from skimage import data as skdata

    from fundus_edge.data.readers.dicom import write_photo

    base = skdata.retina()
    folders = {f: root / f for f in FORMATS}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, list[int]] = {f: [] for f in FORMATS}
    for i in range(n):
        rgb = make_photo(base, size, i, noise)
        png = folders["png"] / f"photo_{i:03d}.png"
        if not cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise RuntimeError(f"{png}: OpenCV could not write it")
        dcm = write_photo(
            folders["dicom"] / f"photo_{i:03d}.dcm",
            rgb,
            syntax="jpeg",
            jpeg_quality=JPEG_QUALITY,
            patient_id=f"BENCH{i:03d}",
        )
        sizes["png"].append(png.stat().st_size)
        sizes["dicom"].append(dcm.stat().st_size)
    return {
        f: {
            "folder": folders[f],
            "files": n,
            "file_mb": round(statistics.mean(sizes[f]) / 1e6, 3),
            "total_mb": round(sum(sizes[f]) / 1e6, 2),
        }
        for f in FORMATS
    }


# ---------------------------------------------------------------------------- measuring


def time_decode(folder: Path) -> tuple[float, int]:
    """Read every frame of ``folder`` through ``open_source``: (ms per frame, frames)."""
    from fundus_edge.runtime.sources import open_source

    source = open_source(str(folder))
    source.open()
    frames = 0
    try:
        t0 = time.perf_counter()
        while source.read() is not None:
            frames += 1
        elapsed = time.perf_counter() - t0
    finally:
        source.close()
    if source.skipped or not frames:
        why = "; ".join(f"{s.item}: {s.reason}" for s in source.skipped)
        raise RuntimeError(f"{folder}: {frames} frames read, skipped {why or 'nothing'}")
    return elapsed * 1e3 / frames, frames


def time_run(folder: Path, predictor: Any, model: Path, max_frames: int | None = None) -> Any:
    """The whole ``run`` over ``folder`` (headless, no sinks), the predictor reused."""
    from fundus_edge.runtime.pipeline import RunConfig, run

    cfg = RunConfig(model=model, source=str(folder), headless=True, max_frames=max_frames)
    summary = run(cfg, predictor=predictor, handle_signals=False)
    if summary.skipped:
        raise RuntimeError(f"{folder}: run skipped {summary.skipped}")
    return summary


def _median(values: list[float], nd: int = 3) -> float:
    return round(statistics.median(values), nd)


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median ms of ``fn()`` over ``repeats`` calls after one untimed call; and its result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def probe_decoders(dicom_file: Path, png_file: Path, repeats: int) -> dict[str, Any]:
    """One frame decoded every way there is here: ms (median), and which plugin pydicom's
    default picks (the one whose pixels it returns)."""
    import cv2
    from pydicom.encaps import generate_frames
    from pydicom.pixels import get_decoder, pixel_array

    from fundus_edge.data.readers.dicom import decode_frame, open_dicom

    ds, _info = open_dicom(dicom_file)
    uid = ds.file_meta.TransferSyntaxUID
    rows: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for plugin in ("", *get_decoder(uid).available_plugins):
            ms, arr = _timed(lambda p=plugin: pixel_array(ds, index=0, decoding_plugin=p), repeats)
            name = f"pydicom pixel_array, plugin {plugin}" if plugin else "pydicom pixel_array"
            rows[name] = {"ms": round(ms, 1)}
            arrays[plugin or "default"] = arr
        ms, _ = _timed(lambda: decode_frame(ds, 0, dicom_file), repeats)
        rows["fundus_edge decode_frame (what run uses)"] = {"ms": round(ms, 1)}
    code = np.frombuffer(next(generate_frames(ds.PixelData, number_of_frames=1)), np.uint8)
    ms, _ = _timed(lambda: cv2.imdecode(code, cv2.IMREAD_COLOR), repeats)
    rows["OpenCV imdecode of the same JPEG codestream (reference)"] = {"ms": round(ms, 1)}
    png = np.fromfile(png_file, np.uint8)
    ms, _ = _timed(lambda: cv2.imdecode(png, cv2.IMREAD_UNCHANGED), repeats)
    rows["OpenCV imdecode of the PNG (what run uses for PNG)"] = {"ms": round(ms, 1)}
    default = arrays.pop("default")
    same = [p for p, a in arrays.items() if a.shape == default.shape and np.array_equal(a, default)]
    return {
        "transfer_syntax": f"{getattr(uid, 'name', uid)} ({uid})",
        "default_plugin": same[0] if len(same) == 1 else (same or None),
        "repeats": repeats,
        "ms": rows,
    }


def device_info() -> dict[str, Any]:
    return machine.device_info(PACKAGES)


def measure(
    model: Path,
    n: int,
    repeats: int,
    size: tuple[int, int],
    noise: float = 2.0,
    work: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Write the photos, warm up, measure interleaved; the result record (no verdict text)."""
    from fundus_edge.runtime import Predictor

    load_before = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="fe-dicom-bench-", dir=work) as tmp:
        t0 = time.perf_counter()
        files = write_photos(Path(tmp), n, size, noise)
        log(
            f"wrote {n} photos {size[0]}x{size[1]} in {time.perf_counter() - t0:.1f} s: "
            + ", ".join(f"{LABEL[f]} {files[f]['file_mb']} MB each" for f in FORMATS)
        )
        predictor = Predictor(model)
        try:
            for f in FORMATS:  # warm-up: the session's first calls, the file cache
                time_decode(files[f]["folder"])
                time_run(files[f]["folder"], predictor, model, max_frames=2)
            samples: dict[str, dict[str, list]] = {
                f: {"decode_ms": [], "fps": [], "elapsed_s": [], "stage_ms": []} for f in FORMATS
            }
            counts: dict[str, dict[str, int]] = {}
            for r in range(repeats):
                for f in FORMATS if r % 2 == 0 else FORMATS[::-1]:
                    folder = files[f]["folder"]
                    dec_ms, frames = time_decode(folder)
                    s = time_run(folder, predictor, model)
                    samples[f]["decode_ms"].append(dec_ms)
                    samples[f]["fps"].append(s.fps)
                    samples[f]["elapsed_s"].append(s.elapsed_s)
                    samples[f]["stage_ms"].append(dict(s.stage_ms))
                    counts[f] = {
                        "frames_read_decode_only": frames,
                        "frames_processed": s.frames_processed,
                        "frames_inferred": s.frames_inferred,
                        "frames_gated": s.frames_gated,
                    }
                    log(
                        f"repeat {r + 1}/{repeats} {LABEL[f]:>10}: decode {dec_ms:7.1f} ms/frame, "
                        f"run {s.fps:6.3f} FPS ("
                        + ", ".join(f"{k} {v:.1f}" for k, v in s.stage_ms.items())
                        + " ms)"
                    )
            backend = {"name": predictor.backend.name, "device": predictor.backend.device}
        finally:
            predictor.close()
        probe = probe_decoders(
            next(files["dicom"]["folder"].iterdir()),
            next(files["png"]["folder"].iterdir()),
            max(repeats, 3),
        )
    formats: dict[str, Any] = {}
    for f in FORMATS:
        sm = samples[f]
        stages = {k: _median([d[k] for d in sm["stage_ms"] if k in d]) for k in sm["stage_ms"][0]}
        decode = _median(sm["decode_ms"], 1)
        per_frame = {"decode (capture thread)": decode, **stages}
        dominant = max(per_frame, key=per_frame.get)
        formats[f] = {
            "file_mb": files[f]["file_mb"],
            "total_mb": files[f]["total_mb"],
            "decode_ms_per_frame": decode,
            "stage_ms": stages,
            "inference_thread_ms": round(sum(stages.values()), 3),
            "fps": _median(sm["fps"], 4),
            "elapsed_s": _median(sm["elapsed_s"]),
            "dominant_stage": dominant,
            "dominant_ms": per_frame[dominant],
            "samples": {
                "decode_ms_per_frame": [round(v, 1) for v in sm["decode_ms"]],
                "fps": [round(v, 4) for v in sm["fps"]],
                "elapsed_s": [round(v, 3) for v in sm["elapsed_s"]],
            },
            **counts[f],
        }
    png, dcm = formats["png"], formats["dicom"]
    ratios = {
        "decode_ms_dicom_over_png": round(
            dcm["decode_ms_per_frame"] / png["decode_ms_per_frame"], 3
        ),
        "fps_dicom_over_png": round(dcm["fps"] / png["fps"], 3),
        "fps_png_over_dicom": round(png["fps"] / dcm["fps"], 3),
    }
    device = device_info()
    # Other processes on the machine (a shared CI or workstation) change absolute figures; the
    # interleaved ratios are what the result is about.
    device["load_average_1min"] = {"before": load_before, "after": machine.load_average()}
    return {
        "benchmark": "dicom-throughput",
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "config": {
            "model": _shown(model),
            "model_mb": round(model.stat().st_size / 1e6, 1),
            "backend": backend,
            "photos": n,
            "repeats": repeats,
            "size": list(size),
            "noise_sigma": noise,
            "png": "cv2.imwrite, default compression (level 3)",
            "dicom": f"Ophthalmic Photography, JPEG Baseline 8-bit, quality {JPEG_QUALITY}, "
            "YBR_FULL_422 (write_photo)",
            "order": "interleaved: PNG, DICOM in even repeats, DICOM, PNG in odd ones",
            "run": "headless, no sinks, one Predictor reused; one warm-up run per format",
        },
        "formats": formats,
        "ratios": ratios,
        "target": {"fps_png_over_dicom_max": TARGET},
        "pass": ratios["fps_png_over_dicom"] <= TARGET,
        "decoders": probe,
    }


def _shown(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------- the report


def _load_text(dev: dict[str, Any]) -> str:
    load = dev.get("load_average_1min") or {}
    if load.get("before") is None:
        return ""
    return (
        f"1-minute load average {load['before']} before, {load['after']} after (on "
        f"{dev['cores']} cores: other processes' share of the machine changes absolute "
        "figures between runs, not the interleaved ratios)."
    )


def report(rec: dict[str, Any]) -> str:
    cfg, dev, fm, ra = rec["config"], rec["device"], rec["formats"], rec["ratios"]
    png, dcm = fm["png"], fm["dicom"]
    w, h = cfg["size"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    rows = [
        ("file size (MB per photo)", png["file_mb"], dcm["file_mb"]),
        (
            "decode, decoding alone (ms/frame)",
            png["decode_ms_per_frame"],
            dcm["decode_ms_per_frame"],
        ),
    ]
    rows += [
        (f"`run` stage: {k} (ms/frame)", png["stage_ms"][k], dcm["stage_ms"].get(k, 0.0))
        for k in png["stage_ms"]
    ]
    rows += [
        (
            "`run` inference thread, all stages (ms/frame)",
            png["inference_thread_ms"],
            dcm["inference_thread_ms"],
        ),
        ("`run` end to end (FPS)", png["fps"], dcm["fps"]),
        ("`run` wall time (s)", png["elapsed_s"], dcm["elapsed_s"]),
    ]
    verdict = "met" if rec["pass"] else "NOT met"
    lines = [
        f"# `run` over JPEG DICOM vs PNG, {w}x{h} photographs",
        "",
        f"Measured {rec['recorded']} on {dev['cpu']} ({dev['cores']} cores), Python "
        f"{dev['python']}; "
        + ", ".join(f"{k} {v}" for k, v in dev["packages"].items())
        + ". "
        + _load_text(dev),
        "",
        f"Command: `{rec['command']}`",
        "",
        f"{cfg['photos']} distinct photographs (`skimage.data.retina()` upscaled onto a black "
        f"{w}x{h} frame, shifted, own brightness, noise sigma {cfg['noise_sigma']}), once as PNG "
        f"({cfg['png']}) and once as DICOM ({cfg['dicom']}). Model `{cfg['model']}` "
        f"({cfg['model_mb']} MB) on {cfg['backend']['name']} ({cfg['backend']['device']}); "
        f"{cfg['run']}. Medians of {cfg['repeats']} repeats, {cfg['order']}.",
        "",
        "| per frame | PNG | JPEG DICOM | DICOM / PNG |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {a} | {b} | {ratio(b, a)} |" for name, a, b in rows]
    lines += [
        "",
        f"**Verdict: {verdict}.** PNG FPS / DICOM FPS = {ra['fps_png_over_dicom']} "
        f"(target <= {rec['target']['fps_png_over_dicom_max']}); DICOM decoding alone takes "
        f"{ra['decode_ms_dicom_over_png']}x PNG's time.",
        "",
        "**What dominates.** "
        + " ".join(
            f"{LABEL[f]}: {fm[f]['dominant_stage']}, {fm[f]['dominant_ms']} ms/frame."
            for f in ("png", "dicom")
        )
        + " Decoding runs in the capture thread, beside inference (the `run` stages are the "
        "inference thread's), so it costs throughput only when it is slower than the inference "
        "thread's work per frame or when the two compete for the same cores. "
        + " ".join(
            f"{LABEL[f]}: {1e3 / (fm[f]['decode_ms_per_frame'] + fm[f]['inference_thread_ms']):.2f} "
            f"FPS if the two threads took turns, "
            f"{1e3 / max(fm[f]['decode_ms_per_frame'], fm[f]['inference_thread_ms']):.2f} if they "
            f"overlapped fully; measured {fm[f]['fps']:.2f}."
            for f in ("png", "dicom")
        ),
        "",
        "Decoding is the capture thread's whole work per file: file read, parsing, decoding and "
        "colour conversion (`open_source(folder)` read to the end, nothing else running).",
        "",
        f"## One DICOM frame, every decoder here (median of {rec['decoders']['repeats']})",
        "",
        f"Transfer syntax {rec['decoders']['transfer_syntax']}; pydicom's default plugin: "
        f"{rec['decoders']['default_plugin']}.",
        "",
        "| decoder | ms |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v['ms']} |" for k, v in rec["decoders"]["ms"].items()]
    base = rec.get("baseline")
    if base:
        lines += [
            "",
            f"## Against an earlier result: {base['label']}",
            "",
            f"`{base['file']}`, measured {base['recorded']} (`{base['command']}`).",
            "",
            "| | earlier | this result |",
            "| --- | ---: | ---: |",
        ]
        for f in FORMATS:
            b, n = base["formats"][f], fm[f]
            lines.append(
                f"| {LABEL[f]} decode (ms/frame) | {b['decode_ms_per_frame']} | "
                f"{n['decode_ms_per_frame']} |"
            )
            lines.append(f"| {LABEL[f]} `run` (FPS) | {b['fps']} | {n['fps']} |")
        lines += [
            f"| PNG FPS / DICOM FPS | {base['ratios']['fps_png_over_dicom']} | "
            f"{ra['fps_png_over_dicom']} |",
            f"| verdict | {'met' if base['pass'] else 'NOT met'} | {verdict} |",
        ]
    lines += [
        "",
        "Per-repeat samples, frame counts and the gate's decisions are in `result.json`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Throughput of `run` over full-size JPEG DICOM photographs vs the same as PNG."
    )
    ap.add_argument("--model", type=Path, help=f"an exported model [{_shown(DEFAULT_MODEL)}]")
    ap.add_argument("--n", type=int, default=12, help="photographs [12]")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each format [3]")
    ap.add_argument(
        "--out", type=Path, help="result folder [bench/results/<device>/dicom-throughput]"
    )
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE[0]}x{QUICK_SIZE[1]} photos")
    ap.add_argument("--noise", type=float, default=2.0, help="sensor noise sigma, grey levels [2]")
    ap.add_argument("--work", type=Path, help="where the photos are written [the temp folder]")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="an earlier result.json to compare with (kept beside the result as baseline.json)",
    )
    ap.add_argument(
        "--baseline-label", default="earlier run", help="what the earlier result was [earlier run]"
    )
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        ap.error("--n and --repeats must be >= 1")
    model = args.model
    if model is None:
        if not DEFAULT_MODEL.is_file():
            ap.error(
                f"no model: {_shown(DEFAULT_MODEL)} does not exist; run `make demo` to export "
                "the demo's model, or give --model PATH"
            )
        model = DEFAULT_MODEL
    elif not model.is_file():
        ap.error(f"--model {model}: no such file")
    baseline = None
    if args.baseline is not None:
        try:
            baseline = json.loads(args.baseline.read_text())
            baseline["formats"]["png"], baseline["formats"]["dicom"], baseline["ratios"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ap.error(f"--baseline {args.baseline}: not a result.json of this script ({exc})")
    out = args.out if args.out is not None else machine.default_out("dicom-throughput")

    from fundus_edge.fileio import atomic_write_json

    size = QUICK_SIZE if args.quick else FULL_SIZE
    rec = measure(model, args.n, args.repeats, size, args.noise, args.work)
    rec["command"] = machine.command("dicom_throughput.py", argv)
    out.mkdir(parents=True, exist_ok=True)
    if baseline is not None:
        if args.baseline.resolve() != (out / "baseline.json").resolve():
            atomic_write_json(out / "baseline.json", baseline)
        rec["baseline"] = {
            "label": args.baseline_label,
            "file": "baseline.json",
            "recorded": baseline.get("recorded"),
            "command": baseline.get("command"),
            "formats": {
                f: {k: baseline["formats"][f][k] for k in ("decode_ms_per_frame", "fps")}
                for f in FORMATS
            },
            "ratios": baseline["ratios"],
            "pass": baseline.get("pass"),
        }
    machine.write_result(out, rec, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
