"""Prepare a dataset once: FOV-crop, resize and quality-score every image, in parallel, resumably.

``prepare_dataset(SRC, DST, cfg)`` reads SRC with :func:`~fundus_edge.data.open_dataset`
and writes to DST:

* every image at the same relative path and with the same extension (a DICOM image stays a
  DICOM file: its header with the prepared pixels), run through
  :func:`~fundus_edge.preprocess.preprocess` (so the label files, copied byte for byte, still
  match and DST opens with the same reader);
* every lesion mask cropped with its image's geometry and resized nearest-neighbour (it stays
  0/255);
* ``manifest.jsonl``: one JSON record per image, sorted by source path: ``id``, ``split``,
  ``source``/``output`` (relative paths), ``status`` (``ok`` or ``unreadable``), ``fov``
  (``cx, cy, r, found`` in source frame pixels), ``geometry`` (the crop square, to map results
  back onto the source frame), ``quality`` (``score, passed, reason``), ``masks``, ``error``;
* ``prepare.json``: the :class:`~fundus_edge.preprocess.PreprocessConfig` and quality
  thresholds used, the source, the counts, and ``complete``.

Resuming: records are appended to a hidden journal as images finish, so an interrupted run
(Ctrl-C, a killed process) continues where it stopped: an image whose record says ``ok`` and
whose outputs exist is not processed again (nor rewritten). Every file is written atomically;
temporary files an interrupted write left behind are removed. Two runs on one DST at the same
time are not supported. Source ``Meta/*.json`` records are not copied (their coordinates are in
the source frame; the manifest's geometry maps them).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fundus_edge.errors import DataError, UserError
from fundus_edge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from fundus_edge.log import get_logger, progress

__all__ = ["MANIFEST", "SETTINGS", "PrepareResult", "prepare_dataset"]

log = get_logger("prepare")

MANIFEST = "manifest.jsonl"
SETTINGS = "prepare.json"
_JOURNAL = ".prepare-journal.jsonl"
# fileio.atomic_open's temporaries: ".{name}.{random}.tmp" beside the target.
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
_JPEG_QUALITY = 95


@dataclass
class PrepareResult:
    """What a prepare run did.

    Attributes:
        dst: output folder.
        total: images in the dataset.
        processed: images processed by this run.
        resumed: images already done by an earlier run (left untouched).
        failures: ``(file, message)`` for unreadable images and unusable masks (skipped).
        quality_failed: images whose quality check failed (still written; see the manifest).
        masks: masks written or kept.
        problems: dataset problems (rows skipped by the reader).
    """

    dst: Path
    total: int
    processed: int
    resumed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    quality_failed: int = 0
    masks: int = 0
    problems: int = 0

    def describe(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"{self.dst}: {self.total} images ({self.processed} processed, "
            f"{self.resumed} already done), {self.masks} masks, "
            f"{self.quality_failed} failed the quality check, "
            f"{len(self.failures)} skipped, {self.problems} dataset problems",
            f"manifest: {self.dst / MANIFEST}",
        ]
        lines += [f"  skipped {f}: {m}" for f, m in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see the manifest)")
        return "\n".join(lines)


def prepare_dataset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cfg=None,
    *,
    workers: int | None = None,
    strict: bool = False,
    format: str = "auto",
    quality=None,
    show_progress: bool | None = None,
) -> PrepareResult:
    """FOV-crop, resize and quality-score a whole dataset into ``dst`` (see module docstring).

    Args:
        src: dataset folder (any layout :func:`open_dataset` reads).
        dst: output folder; created; must not overlap ``src``.
        cfg: :class:`~fundus_edge.preprocess.PreprocessConfig` (default: its defaults).
        workers: worker processes (default ``os.cpu_count()``; 1 runs in this process).
            More than one start with ``forkserver`` (``spawn`` where missing), so a calling
            script needs the usual ``if __name__ == "__main__":`` guard.
        strict: dataset problems stop the run before it starts, and any unreadable image or
            unusable mask raises :class:`DataError` after the others are written.
        format: dataset format for :func:`open_dataset`.
        quality: :class:`~fundus_edge.quality.QualityConfig` (default: its defaults).
        show_progress: progress bar on/off (default: on for a terminal).

    Returns:
        Counts and skipped files.

    Raises:
        UserError: bad paths, or ``dst`` prepared earlier with other settings.
        DataError: under ``strict``, the first problem.
    """
    from fundus_edge.data import open_dataset
    from fundus_edge.preprocess import PreprocessConfig
    from fundus_edge.quality import QualityConfig

    cfg = cfg or PreprocessConfig()
    quality = quality or QualityConfig()
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    ds = open_dataset(src, strict=strict, format=format)
    root, dst = Path(os.path.abspath(ds.root)), Path(os.path.abspath(dst))
    rd, rr = dst.resolve(), root.resolve()
    if rd.is_relative_to(rr) or rr.is_relative_to(rd):
        raise UserError(f"{dst}: the output folder must not overlap the source folder {root}")
    settings = {"preprocess": cfg.to_dict(), "quality": quality.to_dict()}
    _check_settings(dst, settings)
    dst.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dst)
    atomic_write_json(dst / SETTINGS, _settings_record(ds, root, settings, None))

    done = _load_records(dst)
    jobs, kept = [], {}
    for s in ds.samples():
        rel = _relative(s.path, root)
        masks = [
            (label, str(p), (dst / _relative(p, root)).as_posix())
            for label, p in sorted(s.masks.items())
        ]
        rec = done.get(rel)
        if rec is not None and _outputs_exist(dst, rec):
            kept[rel] = rec
            continue
        jobs.append(
            {
                "id": s.id,
                "split": s.split,
                "source": str(s.path),
                "rel": rel,
                "out": str(dst / rel),
                "dst": str(dst),
                "masks": masks,
                "cfg": settings["preprocess"],
                "quality": settings["quality"],
            }
        )

    new = _run(jobs, dst, workers, show_progress)
    records = {**kept, **{r["source"]: r for r in new}}
    ordered = [records[k] for k in sorted(records)]
    atomic_write_text(
        dst / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered)
    )
    with contextlib.suppress(FileNotFoundError):
        (dst / _JOURNAL).unlink()
    for f in ds.label_files:
        target = dst / _relative(f, root)
        data = f.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)

    failures = [(r["source"], r["error"]) for r in ordered if r["status"] != "ok"]
    failures += [(m["source"], m["error"]) for r in ordered for m in r.get("mask_errors", [])]
    result = PrepareResult(
        dst=dst,
        total=len(ordered),
        processed=len(new),
        resumed=len(kept),
        failures=failures,
        quality_failed=sum(
            1 for r in ordered if r["status"] == "ok" and not r["quality"]["passed"]
        ),
        masks=sum(len(r.get("masks", {})) for r in ordered),
        problems=len(ds.problems),
    )
    atomic_write_json(dst / SETTINGS, _settings_record(ds, root, settings, result))
    if failures and strict:
        f, m = failures[0]
        raise DataError(f"{root / f}: {m} ({len(failures)} file(s) skipped; see {dst / MANIFEST})")
    if failures:
        log.warning("%d file(s) skipped; first: %s: %s", len(failures), *failures[0])
    return result


# --------------------------------------------------------------------------------------------
# Run bookkeeping


def _settings_record(ds, root: Path, settings: dict, result: PrepareResult | None) -> dict:
    from fundus_edge import __version__

    rec = {
        "fundus_edge": __version__,
        "source": str(root),
        "format": ds.format,
        "label_names": ds.label_names,
        **settings,
        "complete": result is not None,
    }
    if result is not None:
        rec["counts"] = {
            "images": result.total,
            "skipped": len(result.failures),
            "quality_failed": result.quality_failed,
            "masks": result.masks,
            "dataset_problems": result.problems,
        }
    return rec


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root: DST mirrors the root, so it must lie under it."""
    absolute = Path(os.path.abspath(path))
    if not absolute.is_relative_to(root):
        absolute = path.resolve()
    if not absolute.is_relative_to(root):
        raise UserError(
            f"{path}: lies outside the dataset folder {root}; prepare mirrors that folder"
        )
    return absolute.relative_to(root).as_posix()


def _check_settings(dst: Path, settings: dict) -> None:
    """A DST prepared with other settings would mix two preprocessings: refuse."""
    path = dst / SETTINGS
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{path}: unreadable ({exc}); delete it or use another output folder"
        ) from exc
    for key in ("preprocess", "quality"):
        if old.get(key) != settings[key]:
            diff = sorted(
                k for k in settings[key] if (old.get(key) or {}).get(k) != settings[key][k]
            )
            raise UserError(
                f"{dst}: prepared earlier with other {key} settings ({', '.join(diff)}); "
                "use another output folder or delete this one"
            )


def _remove_stale_temporaries(dst: Path) -> None:
    for dirpath, _, filenames in os.walk(dst):
        for name in filenames:
            if _TEMP.match(name):
                os.unlink(os.path.join(dirpath, name))


def _load_records(dst: Path) -> dict[str, dict]:
    """Records of earlier runs: the last manifest, then the journal of an interrupted run."""
    records: dict[str, dict] = {}
    for name in (MANIFEST, _JOURNAL):
        path = dst / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption: that image is redone
            if isinstance(rec, dict) and "source" in rec:
                records[rec["source"]] = rec
    return records


def _outputs_exist(dst: Path, rec: dict) -> bool:
    if rec.get("status") != "ok" or rec.get("mask_errors"):
        return False  # unreadable images and bad masks are retried: the source may be fixed
    outs = [rec["output"], *rec.get("masks", {}).values()]
    return all((dst / o).is_file() for o in outs)


def _run(jobs: list[dict], dst: Path, workers: int, show_progress: bool | None) -> list[dict]:
    """Process ``jobs``; each record is journaled as it arrives so a crash loses nothing done."""
    if not jobs:
        return []
    disable = None if show_progress is None else not show_progress
    out: list[dict] = []
    with open(dst / _JOURNAL, "a", encoding="utf-8") as journal:

        def keep(rec: dict) -> None:
            journal.write(json.dumps(rec, sort_keys=True) + "\n")
            journal.flush()
            out.append(rec)

        if workers == 1 or len(jobs) == 1:
            for job in progress(jobs, total=len(jobs), description="prepare", disable=disable):
                keep(_process(job))
            return out
        # Not fork: a child forked after OpenCV ran its thread pool in this process can hang in
        # its first parallel call. forkserver (spawn where missing) starts workers clean.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)),
            mp_context=mp.get_context(method),
            initializer=_init_worker,
        )
        try:
            futures: list[Future] = [pool.submit(_process, job) for job in jobs]
            done = as_completed(futures)
            for fut in progress(done, total=len(jobs), description="prepare", disable=disable):
                keep(fut.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
    return out


# --------------------------------------------------------------------------------------------
# One image (runs in a worker process)


def _init_worker() -> None:
    # The pool already uses every core; OpenCV's own threads would oversubscribe them.
    cv2.setNumThreads(1)


def _process(job: dict) -> dict:
    """Preprocess one image and its masks; returns its manifest record."""
    from fundus_edge.preprocess import (
        PreprocessConfig,
        preprocess,
        read_image,
    )
    from fundus_edge.quality import QualityConfig, assess_quality

    dst = Path(job["dst"])
    rec: dict = {"id": job["id"], "split": job["split"], "source": job["rel"]}
    try:
        image = read_image(job["source"])
    except DataError as exc:
        return rec | {"status": "unreadable", "output": None, "error": str(exc)}
    cfg = PreprocessConfig.from_dict(job["cfg"])
    pre = preprocess(image, cfg)
    q = assess_quality(image, pre.circle, QualityConfig.from_dict(job["quality"]))
    _write_image(Path(job["out"]), pre.image, source=Path(job["source"]))
    g = pre.geometry
    masks, mask_errors = {}, []
    for label, src, out in job["masks"]:
        try:
            m = read_image(src)[:, :, 0]
        except DataError as exc:
            mask_errors.append({"source": src, "error": str(exc)})
            continue
        if m.shape != g.frame:
            mask_errors.append(
                {
                    "source": src,
                    "error": f"mask is {m.shape[1]}x{m.shape[0]}, image is "
                    f"{g.frame[1]}x{g.frame[0]}",
                }
            )
            continue
        _write_image(Path(out), g.crop(m))
        masks[label] = Path(out).relative_to(dst).as_posix()
    c = pre.circle
    rec |= {
        "status": "ok",
        "output": job["rel"],
        "fov": {"cx": c.cx, "cy": c.cy, "r": c.r, "found": c.found, "kind": c.kind},
        "geometry": g.to_dict(),
        "quality": {"score": q.score, "passed": q.passed, "reason": q.reason},
        "masks": masks,
    }
    if mask_errors:
        rec["mask_errors"] = mask_errors
    return rec


def _write_image(path: Path, image: np.ndarray, source: Path | None = None) -> None:
    """Encode by the file's extension (RGB in, OpenCV's BGR on disk) and write atomically.

    A DICOM source gives a DICOM output at the same path: its header (patient, study, eye)
    with the prepared pixels, uncompressed RGB
    (:func:`~fundus_edge.data.readers.dicom.write_derived`).
    """
    from fundus_edge.media import is_dicom_file

    if source is not None and is_dicom_file(source):
        from fundus_edge.data.readers.dicom import write_derived

        write_derived(source, path, image, "fundus-edge prepare: FOV crop and resize")
        return
    ext = path.suffix.lower()
    params: list[int] = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
    data = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, data, params)
    if not ok:
        raise DataError(f"{path}: OpenCV cannot encode {ext} images")
    atomic_write_bytes(path, buf.tobytes())
