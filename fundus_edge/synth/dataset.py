"""Writing a synthetic data set in RFMiD's layout, in one process or several.

Output layout::

    OUT/Training_Set/Training/{ID}.png      OUT/Training_Set/RFMiD_Training_Labels.csv
    OUT/Evaluation_Set/Validation/{ID}.png  OUT/Evaluation_Set/RFMiD_Validation_Labels.csv
    OUT/Test_Set/Test/{ID}.png              OUT/Test_Set/RFMiD_Testing_Labels.csv
    OUT/<Split_Set>/Masks/{ID}_{LABEL}.png  OUT/<Split_Set>/Meta/{ID}.json
    OUT/synth.json

Every image draws from its own generator seeded by ``SeedSequence(seed, spawn_key=(split,
index))``, so the files are byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from fundus_edge.log import get_logger, progress
from fundus_edge.synth.config import (
    COOCCURRENCE,
    GLOBAL_LABELS,
    LABELS,
    SPLIT_KEYS,
    SPLIT_LAYOUT,
    SynthConfig,
    image_rng,
    sample_labels,
    split_counts,
)
from fundus_edge.synth.image import generate_image

__all__ = ["generate_dataset"]

log = get_logger("synth")


@dataclass(frozen=True)
class _Task:
    out: str
    split: str
    index: int  # the image ID (1-based)
    seed: int
    size: int
    prevalence: tuple[tuple[str, float], ...]


def _encode_png(img: np.ndarray) -> bytes:
    if img.ndim == 3:
        img = img[..., ::-1]  # RGB -> BGR for OpenCV
    # Level 1 with run-length matching: as small as level 3 on noisy photographs, twice as fast.
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
    ]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img), params)
    if not ok:
        raise RuntimeError("cv2.imencode('.png') failed")
    return buf.tobytes()


def _write_file_nosync(path: Path, data: bytes) -> None:
    # Atomic but not fsynced: an fsync per file costs more than drawing the image; one
    # os.sync() follows the last image, and the set is reproducible from its seed anyway.
    atomic_write_bytes(path, data, fsync=False)


def _write_one(task: _Task) -> tuple[str, int, list[int]]:
    """Generate and write one image, its masks and its record; return (split, ID, label row)."""
    rng = image_rng(task.seed, task.split, task.index)
    labels = sample_labels(rng, dict(task.prevalence))
    image, masks, meta = generate_image(rng, task.size, labels)
    set_dir, img_dir, _ = SPLIT_LAYOUT[task.split]
    root = Path(task.out) / set_dir
    iid = task.index
    _write_file_nosync(root / img_dir / f"{iid}.png", _encode_png(image))
    mask_paths = {}
    for name in LABELS:
        if name in masks:
            rel = f"Masks/{iid}_{name}.png"
            _write_file_nosync(root / rel, _encode_png(masks[name]))
            mask_paths[name] = f"{set_dir}/{rel}"
    record = {
        "id": iid,
        "split": task.split,
        "image": f"{set_dir}/{img_dir}/{iid}.png",
        "masks": mask_paths,
        "seed": {"seed": task.seed, "spawn_key": [SPLIT_KEYS.index(task.split), iid]},
        **meta,
    }
    text = json.dumps(record, indent=2, default=_json_default) + "\n"
    _write_file_nosync(root / "Meta" / f"{iid}.json", text.encode("utf-8"))
    row = [int(bool(labels))] + [int(k in labels) for k in LABELS]
    return task.split, iid, row


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _init_worker() -> None:
    # One process per core already: keep OpenCV from starting threads of its own in each.
    cv2.setNumThreads(1)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: directory is not empty; pass --overwrite to replace its data set"
            )
        # Only what this generator writes is removed; other files in OUT are left alone.
        for set_dir, _, _ in SPLIT_LAYOUT.values():
            if (out / set_dir).is_dir():
                shutil.rmtree(out / set_dir)
        (out / "synth.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out: str | os.PathLike,
    n: int,
    size: int = 512,
    seed: int = 0,
    splits: Sequence[float] = (0.6, 0.2, 0.2),
    workers: int = 1,
    prevalence_scale: float = 1.0,
    overwrite: bool = False,
    *,
    prevalence: dict[str, float] | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Write ``n`` synthetic images with labels, masks and records in RFMiD's layout.

    Args:
        out: output folder; created, and must be empty unless ``overwrite``.
        n: number of images over all splits (>= 1).
        size: image side in pixels (>= 64).
        seed: non-negative integer; the same seed gives byte-identical files.
        splits: train, validation, test fractions (sum 1); counts round the cumulative bounds.
        workers: processes; any count gives the same bytes. More than one starts them with
            ``spawn`` (safe beside threads), so a calling script needs the usual
            ``if __name__ == "__main__":`` guard and cannot be read from stdin.
        prevalence_scale: multiplies every label's prevalence.
        overwrite: replace the split folders and ``synth.json`` of a non-empty ``out``.
        prevalence: per-label overrides of :data:`DEFAULT_PREVALENCE`.
        show_progress: progress bar on (True), off (False), or on a terminal only (None).

    Returns:
        The content of ``OUT/synth.json`` plus ``out``, ``elapsed_s`` and ``images_per_s``.

    Raises:
        UserError: a bad option, or a non-empty ``out`` without ``overwrite``.
    """
    cfg = SynthConfig(
        size=size,
        seed=seed,
        prevalence=dict(prevalence) if prevalence else None,
        prevalence_scale=prevalence_scale,
        splits=tuple(float(f) for f in splits),  # type: ignore[arg-type]
    )
    cfg.validate()
    if int(n) != n or n < 1:
        raise UserError(f"--n must be an integer >= 1 (got {n})")
    if int(workers) != workers or workers < 1:
        raise UserError(f"--workers must be an integer >= 1 (got {workers})")
    out = Path(out)
    _prepare_out(out, overwrite)

    prev = cfg.resolved_prevalence()
    counts = split_counts(int(n), cfg.splits)
    tasks = [
        _Task(str(out), split, i, int(seed), int(size), tuple(prev.items()))
        for split in SPLIT_KEYS
        for i in range(1, counts[split] + 1)
    ]
    for set_dir, img_dir, _ in SPLIT_LAYOUT.values():  # empty splits still get their folders
        for sub in (img_dir, "Masks", "Meta"):
            (out / set_dir / sub).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    rows: dict[str, dict[int, list[int]]] = {k: {} for k in SPLIT_KEYS}
    if workers == 1:
        results: Iterable = map(_write_one, tasks)
        for split, iid, row in progress(results, len(tasks), "synth", disable=_off(show_progress)):
            rows[split][iid] = row
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        chunk = max(1, min(8, len(tasks) // (4 * workers)))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as ex:
            results = ex.map(_write_one, tasks, chunksize=chunk)
            for split, iid, row in progress(
                results, len(tasks), "synth", disable=_off(show_progress)
            ):
                rows[split][iid] = row
    if hasattr(os, "sync"):  # make the images durable before the CSVs and synth.json say done
        os.sync()
    elapsed = time.perf_counter() - t0

    header = ["ID", "Disease_Risk", *LABELS]
    label_counts: dict[str, dict[str, int]] = {}
    for split, (set_dir, _, csv_name) in SPLIT_LAYOUT.items():
        lines = [",".join(header)]
        lines += [",".join(map(str, [iid, *rows[split][iid]])) for iid in sorted(rows[split])]
        atomic_write_text(out / set_dir / csv_name, "\n".join(lines) + "\n")
        col = np.array([rows[split][i] for i in sorted(rows[split])], dtype=np.int64).reshape(
            -1, len(header) - 1
        )
        label_counts[split] = dict(zip(header[1:], col.sum(0).tolist(), strict=True))

    from fundus_edge import __version__

    summary: dict[str, Any] = {
        "generator": "fundus_edge.synth",
        "version": __version__,
        "format": "rfmid",
        "config": cfg.to_dict(),
        "n": int(n),
        "labels": ["Disease_Risk", *LABELS],
        "global_labels": sorted(GLOBAL_LABELS),
        "prevalence": prev,
        "cooccurrence": [list(r) for r in COOCCURRENCE],
        "splits": {
            k: {
                "images": f"{SPLIT_LAYOUT[k][0]}/{SPLIT_LAYOUT[k][1]}",
                "csv": f"{SPLIT_LAYOUT[k][0]}/{SPLIT_LAYOUT[k][2]}",
                "masks": f"{SPLIT_LAYOUT[k][0]}/Masks",
                "meta": f"{SPLIT_LAYOUT[k][0]}/Meta",
                "count": counts[k],
                "positives": label_counts[k],
            }
            for k in SPLIT_KEYS
        },
        "seeding": "numpy SeedSequence(seed, spawn_key=(split index, image ID)), PCG64",
    }
    atomic_write_json(out / "synth.json", summary)
    log.info(
        "wrote %d images to %s in %.1f s (%.1f images/s)", n, out, elapsed, n / max(elapsed, 1e-9)
    )
    return {
        **summary,
        "out": str(out),
        "elapsed_s": elapsed,
        "images_per_s": n / max(elapsed, 1e-9),
    }


def _off(show: bool | None) -> bool | None:
    return None if show is None else not show
