"""RFMiD (Retinal Fundus Multi-disease Image Dataset), in every published folder layout.

Files:

* ``RFMiD_{Training,Validation,Testing}_Labels.csv`` anywhere under the root (any case, any
  prefix such as ``a. ``): one labels file per split (train, val, test). When a split's file
  is found twice, the shallowest copy wins; two at the same depth are refused.
* Images ``{ID}.<suffix>`` for every still of the media table
  (:data:`fundus_edge.media.STILL_SUFFIXES`, any case: PNG, JPEG, TIFF, BMP, WebP, DICOM), or
  a DICOM file named exactly ``{ID}`` with no suffix. They are searched in every folder under
  the root: folders named like another split are never used, folders named like the split
  come first, then the folder nearest the CSV (:func:`fundus_edge.data.files.pick`).
* Optional ``Masks/{ID}_{LABEL}.png`` and ``Meta/{ID}.json`` beside the CSV (the layout
  :mod:`fundus_edge.synth` writes) fill :attr:`Sample.masks` and :attr:`Sample.meta`.

Columns: ``ID, Disease_Risk, <conditions>``: the 46-column release
(:data:`RFMID_LABELS_46`) or the 30-column challenge release with ``OTHER``
(:data:`RFMID_LABELS_30`); every split's file must have the same label columns. Labels are 0/1.

Splits: the split of each labels file, as published; nothing is carved out.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from fundus_edge.data.dataset import (
    SPLITS,
    FundusDataset,
    ReadOptions,
    Reporter,
    Sample,
    order_labels,
    row_labels,
    table_id,
)
from fundus_edge.data.files import MASK_DIR, META_DIR, FileIndex, pick
from fundus_edge.data.tables import Rows, read_table
from fundus_edge.errors import DataError, UserError
from fundus_edge.media import IMAGE_SUFFIXES

__all__ = ["RFMID_LABELS_30", "RFMID_LABELS_46", "is_labels_file", "read"]

#: The full RFMiD release's label columns (after ``ID``), in header order.
RFMID_LABELS_46 = (
    "Disease_Risk",
    "DR",
    "ARMD",
    "MH",
    "DN",
    "MYA",
    "BRVO",
    "TSLN",
    "ERM",
    "LS",
    "MS",
    "CSR",
    "ODC",
    "CRVO",
    "TV",
    "AH",
    "ODP",
    "ODE",
    "ST",
    "AION",
    "PT",
    "RT",
    "RS",
    "CRS",
    "EDN",
    "RPEC",
    "MHL",
    "RP",
    "CWS",
    "CB",
    "ODPM",
    "PRH",
    "MNF",
    "HR",
    "CRAO",
    "TD",
    "CME",
    "PTCR",
    "CF",
    "VH",
    "MCA",
    "VS",
    "BRAO",
    "PLQ",
    "HPED",
    "CL",
)
#: The 2021 challenge (RIADD) release: the first 27 conditions and ``OTHER``.
RFMID_LABELS_30 = (*RFMID_LABELS_46[:28], "OTHER")

_LABELS_FILE = re.compile(r"rfmid_(training|validation|testing)_labels\.csv$")
_SPLIT_OF = {"training": "train", "validation": "val", "testing": "test"}


def is_labels_file(path: Path) -> bool:
    """An ``RFMiD_{Training,Validation,Testing}_Labels.csv`` (any case, any prefix)."""
    return _LABELS_FILE.search(path.name.lower()) is not None


def read(
    index: FileIndex, report: Reporter, labels_file: Path | None, options: ReadOptions
) -> FundusDataset:
    """Read the RFMiD labels files under ``index.root`` (only ``labels_file`` when given)."""
    files = _label_files(index, labels_file)
    label_names: list[str] | None = None
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        if split not in files:
            continue
        path = files[split]
        header, rows = read_table(path)
        if not header or header[0].strip().lower() != "id":
            raise DataError(
                f"{path}:1 column {header[0] if header else ''!r}: first column must be ID"
            )
        labels = header[1:]
        if label_names is None:
            label_names = order_labels(labels)
        elif set(labels) != set(label_names) or len(labels) != len(label_names):
            first = files["train" if "train" in files else split]
            raise DataError(f"{path}:1: label columns differ from {first}")
        splits[split] = _read_split(index, report, path, split, header, rows, label_names)
    assert label_names is not None
    return FundusDataset(
        root=index.root,
        format="rfmid",
        label_names=label_names,
        splits=splits,
        label_files=[files[s] for s in SPLITS if s in files],
    )


def _label_files(index: FileIndex, labels_file: Path | None) -> dict[str, Path]:
    """Split -> its labels file."""
    by_split: dict[str, list[Path]] = defaultdict(list)
    for t in [labels_file] if labels_file is not None else index.tables:
        m = _LABELS_FILE.search(t.name.lower())
        if m:
            by_split[_SPLIT_OF[m.group(1)]].append(t)
    files: dict[str, Path] = {}
    for split, found in by_split.items():
        # Several copies (e.g. a backup below the root): the shallowest wins; a tie is ambiguous.
        found.sort(key=lambda p: (len(p.parts), str(p)))
        if len(found) > 1 and len(found[0].parts) == len(found[1].parts):
            raise UserError(
                f"{index.root}: two {split} label files, {found[0]} and {found[1]}; "
                "point at one dataset folder"
            )
        files[split] = found[0]
    return files


def _read_split(
    index: FileIndex,
    report: Reporter,
    path: Path,
    split: str,
    header: list[str],
    rows: Rows,
    label_names: list[str],
) -> list[Sample]:
    """The samples of one split's labels file."""
    col_of = {name: i for i, name in enumerate(header)}
    order = [col_of[name] for name in label_names]
    masks_dir = _child_dir(path.parent, MASK_DIR)
    meta_dir = _child_dir(path.parent, META_DIR)
    masks = _index_masks(masks_dir, label_names, report) if masks_dir else {}
    seen: dict[str, int] = {}
    samples: list[Sample] = []
    for line, values in rows:
        report.claim(split, str(values[0]).strip())
        if not report.fields_ok(path, line, values, header):
            continue
        sid = table_id(values[0])
        if not report.id_ok(path, line, header[0], sid, seen):
            continue
        labels = row_labels(report, path, line, header, values, order)
        if labels is None:
            continue
        image = _find_image(index, sid, split, path.parent)
        if image is None:
            report.add(path, line, header[0], f"no image found for ID {sid}", "missing_image")
            continue
        meta = _load_meta(meta_dir / f"{sid}.json", report) if meta_dir else {}
        samples.append(Sample(sid, image, labels, split, masks.get(sid, {}), meta or {}, line))
    return samples


def _find_image(index: FileIndex, sid: str, split: str, anchor: Path) -> Path | None:
    """``{ID}.<still suffix>``, else an unsuffixed DICOM file named ``{ID}``."""
    cands = index.with_stem(sid) or index.dicom_named(sid)
    return pick(cands, index.root, split, anchor)


def _child_dir(parent: Path, name: str) -> Path | None:
    for d in parent.iterdir():
        if d.is_dir() and d.name.lower() == name:
            return d
    return None


def _index_masks(
    masks_dir: Path, label_names: list[str], report: Reporter
) -> dict[str, dict[str, Path]]:
    """``{ID}_{LABEL}.png`` files -> ``{ID: {LABEL: path}}`` (label names may hold '_')."""
    by_len = sorted(label_names, key=len, reverse=True)
    out: dict[str, dict[str, Path]] = defaultdict(dict)
    for p in sorted(masks_dir.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        for lab in by_len:
            if p.stem.endswith("_" + lab) and len(p.stem) > len(lab) + 1:
                out[p.stem[: -len(lab) - 1]][lab] = p
                break
        else:
            report.add(
                p, None, None, "mask name is not {ID}_{LABEL} with a known label", "bad_mask"
            )
    return out


def _load_meta(path: Path, report: Reporter) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.add(path, getattr(exc, "lineno", None), None, f"bad JSON ({exc})", "bad_meta")
        return {}
    if not isinstance(meta, dict):
        report.add(path, None, None, "meta record is not a JSON object", "bad_meta")
        return {}
    return meta
