"""A generic labels CSV: one row per image, any layout of the image files.

Files: the CSV given as the root (or, for ``format="csv"``, the one CSV directly in the root
folder; ``format="auto"`` takes it when no RFMiD or ODIR labels file is there), and the images
its rows name: a path relative to the CSV's folder, else to the root, or an absolute path.
Any still fundus-edge reads may be named (:data:`fundus_edge.media.STILL_SUFFIXES`: PNG, JPEG,
TIFF, BMP, WebP, DICOM ``.dcm``, or a DICOM file without suffix named exactly).

Columns (names in any case):

* the image path: the first of ``path``, ``image``, ``file``, ``filename``, ``image_path``,
  ``filepath``, ``img`` (or the column named by ``image_column``);
* ``split`` (optional): ``train``/``training``, ``val``/``valid``/``validation``/``eval``/
  ``evaluation``/``dev``, ``test``/``testing``;
* meta columns (optional, kept in :attr:`Sample.meta`): ``id``, ``patient_id``, ``patient``,
  ``age``, ``sex``, ``gender``, ``eye``, ``laterality``, and any ``meta_*``;
* every other named column is a 0/1 label (``Disease_Risk`` first when present).

The sample ID is the ``id`` column, else the image path without its suffix (a numeric suffix,
the end of a UID, is kept); IDs are unique.

Splits: the ``split`` column; without one, a deterministic validation split (``val_fraction``
of the groups, chosen by a seeded hash) is held out of the training split, grouped by
``patient_id`` (or ``patient``) when present so that no patient is in two splits, else by
sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fundus_edge.data.dataset import (
    SPLITS,
    FundusDataset,
    ReadOptions,
    Reporter,
    Sample,
    held_out,
    order_labels,
    row_labels,
)
from fundus_edge.data.files import FileIndex
from fundus_edge.data.tables import read_table
from fundus_edge.errors import DataError, UserError

__all__ = ["read", "single_csv"]

_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "filepath", "img")
_META_COLUMNS = ("id", "patient_id", "patient", "age", "sex", "gender", "eye", "laterality")
_SPLIT_VALUES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "eval": "val",
    "evaluation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class _Columns:
    """Where things are in the header (column indices)."""

    path: int
    split: int | None
    meta: list[int]
    order: list[int]  # label columns in label_names order
    label_names: list[str]
    id: int | None
    group: int | None


@dataclass
class _Row:
    """A row that passed its checks; ``split`` is None until the held-out split is made."""

    line: int
    sid: str
    split: str | None
    image: Path
    labels: np.ndarray
    meta: dict
    group: str


def single_csv(root: Path) -> Path:
    """The one CSV directly in ``root``."""
    top = sorted(p for p in root.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    if len(top) != 1:
        raise UserError(
            f"{root}: expected exactly one CSV for --format csv, found {len(top)}; "
            "pass the CSV file itself"
        )
    return top[0]


def read(
    index: FileIndex, report: Reporter, labels_file: Path | None, options: ReadOptions
) -> FundusDataset:
    """Read the labels CSV (``labels_file``, else the one CSV in ``index.root``)."""
    table = labels_file or single_csv(index.root)
    header, rows = read_table(table)
    cols = _columns(table, header, options.image_column)
    parsed: list[_Row] = []
    seen: dict[str, int] = {}
    for line, values in rows:
        row = _parse_row(index, report, table, header, cols, line, values, seen)
        if row is not None:
            parsed.append(row)
    return FundusDataset(
        root=index.root,
        format="csv",
        label_names=cols.label_names,
        splits=_split(parsed, cols.split is None, options),
        label_files=[table],
    )


def _columns(table: Path, header: list[str], image_column: str | None) -> _Columns:
    lower = {h.lower(): i for i, h in enumerate(header)}
    path_col = _path_column(table, header, lower, image_column)
    split_col = lower.get("split")
    meta_cols = [
        i
        for i, h in enumerate(header)
        if h.lower() in _META_COLUMNS or h.lower().startswith("meta_")
    ]
    label_cols = [
        i for i in range(len(header)) if i not in (path_col, split_col, *meta_cols) and header[i]
    ]
    if not label_cols:
        raise DataError(f"{table}:1: no label columns besides the image path")
    label_names = order_labels([header[i] for i in label_cols])
    return _Columns(
        path=path_col,
        split=split_col,
        meta=meta_cols,
        order=[header.index(n) for n in label_names],
        label_names=label_names,
        id=lower.get("id"),
        group=lower.get("patient_id", lower.get("patient")),
    )


def _path_column(
    table: Path, header: list[str], lower: dict[str, int], image_column: str | None
) -> int:
    if image_column is not None:
        if image_column not in header:
            raise UserError(f"{table}:1: no column {image_column!r} (image_column)")
        return header.index(image_column)
    found = [lower[c] for c in _PATH_COLUMNS if c in lower]
    if not found:
        raise DataError(
            f"{table}:1: no image-path column (one of {', '.join(_PATH_COLUMNS)}); "
            "rename the image-path column to one of these (or pass image_column= to "
            "fundus_edge.data.open_dataset)"
        )
    return found[0]


def _parse_row(
    index: FileIndex,
    report: Reporter,
    table: Path,
    header: list[str],
    cols: _Columns,
    line: int,
    values: list,
    seen: dict[str, int],
) -> _Row | None:
    """One row checked in order (fields, ID, split, labels, image); None when skipped."""
    if not report.fields_ok(table, line, values, header):
        return None
    rel = str(values[cols.path]).strip()
    for split in SPLITS:
        report.claim(split, rel)
    if cols.id is not None:
        sid, key_col = str(values[cols.id]).strip(), header[cols.id]
    else:
        sid, key_col = _path_id(rel), header[cols.path]
    if not report.id_ok(table, line, key_col, sid, seen):
        return None
    split = None
    if cols.split is not None:
        split = _SPLIT_VALUES.get(str(values[cols.split]).strip().lower())
        if split is None:
            message = f"split {values[cols.split]!r} is not train/val/test"
            report.add(table, line, header[cols.split], message, "bad_split")
            return None
    labels = row_labels(report, table, line, header, values, cols.order)
    if labels is None:
        return None
    image = _resolve_path(index, rel, table.parent)
    if image is None:
        report.add(table, line, header[cols.path], f"no image found at {rel!r}", "missing_image")
        return None
    meta = {header[i]: values[i] for i in cols.meta}
    group = str(values[cols.group]).strip() if cols.group is not None else sid
    return _Row(line, sid, split, image, labels, meta, group)


def _path_id(rel: str) -> str:
    """A sample ID from its path: the path without its suffix, but a numeric "suffix" (the last
    component of a UID-named DICOM file) is part of the name."""
    p = Path(rel)
    return (p if p.suffix[1:].isdigit() else p.with_suffix("")).as_posix()


def _split(parsed: list[_Row], held: bool, options: ReadOptions) -> dict[str, list[Sample]]:
    """Samples per split, in train/val/test order; ``held``: carve val out of the rows."""
    val = held_out((r.group for r in parsed), options.val_fraction, options.seed) if held else ()
    splits: dict[str, list[Sample]] = {}
    for r in parsed:
        split = r.split or ("val" if r.group in val else "train")
        splits.setdefault(split, []).append(
            Sample(r.sid, r.image, r.labels, split, {}, r.meta, r.line)
        )
    return {s: splits[s] for s in SPLITS if s in splits}


def _resolve_path(index: FileIndex, rel: str, anchor: Path) -> Path | None:
    """The file a row names: absolute, or relative to the CSV's folder, else to the root."""
    if not rel:
        return None
    p = Path(rel)
    for cand in [p] if p.is_absolute() else [anchor / p, index.root / p]:
        if cand.is_file():
            return cand
    return None
