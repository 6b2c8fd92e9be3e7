"""ODIR-5K (Ocular Disease Intelligent Recognition): one sheet of patients, two eyes each.

Files:

* the sheet: a CSV with ``Left-Fundus``/``Right-Fundus`` columns anywhere under the root (the
  shallowest wins), or the one XLSX file (``data.xlsx`` as ODIR-5K ships it; reading it needs
  ``openpyxl``, else the error says to export it to CSV);
* the images the sheet names (``0_left.jpg``): a path relative to the sheet's folder is tried
  first, then any image of that name, then of that stem, under the root (a folder named like
  the training split first: ODIR ships ``Training Images`` and ``Testing Images``, and the
  sheet is the training sheet), then an unsuffixed DICOM file of exactly that name.

Columns: ``ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus`` and the labels
``N, D, G, C, A, H, M, O`` (:data:`ODIR_LABELS`, 0/1, any column case);
``Left-/Right-Diagnostic Keywords`` are kept in the meta record when present.

Splits: ODIR labels are per *patient*: each row gives one label vector for both eyes, so the
left and the right image become two samples ``{ID}_left`` / ``{ID}_right`` with the same labels
(an eye-level label does not exist in ODIR). ODIR has only a training sheet: a deterministic
*patient-level* validation split (``val_fraction`` of the patients, chosen by a seeded hash) is
carved from it, so no patient is in two splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fundus_edge.data.dataset import (
    FundusDataset,
    ReadOptions,
    Reporter,
    Sample,
    held_out,
    row_labels,
    table_id,
)
from fundus_edge.data.files import FileIndex, pick
from fundus_edge.data.tables import Rows, header_of, read_table
from fundus_edge.errors import DataError, UserError

__all__ = ["ODIR_LABELS", "find_sheet", "is_sheet_header", "read"]

ODIR_LABELS = ("N", "D", "G", "C", "A", "H", "M", "O")
_COLUMNS = (
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
)
_SIDES = (("left", "Left"), ("right", "Right"))
# A patient row that passed its checks: (line, patient ID, values, labels).
_Patient = tuple[int, str, list, np.ndarray]


def is_sheet_header(header: list[str]) -> bool:
    """A header with ``Left-Fundus`` and ``Right-Fundus`` columns (any case)."""
    return {"left-fundus", "right-fundus"} <= {h.lower() for h in header}


def find_sheet(index: FileIndex) -> Path | None:
    """The ODIR sheet under the root: the shallowest ODIR CSV, else the only XLSX file."""
    csvs = [t for t in index.tables if t.suffix.lower() == ".csv" and is_sheet_header(header_of(t))]
    if csvs:
        return min(csvs, key=lambda p: (len(p.parts), str(p)))
    xlsx = [t for t in index.tables if t.suffix.lower() == ".xlsx"]
    if len(xlsx) == 1:
        return xlsx[0]  # ODIR-5K ships data.xlsx; read_table explains how to proceed without it
    return None


def read(
    index: FileIndex, report: Reporter, labels_file: Path | None, options: ReadOptions
) -> FundusDataset:
    """Read the ODIR sheet (``labels_file``, else the one found under ``index.root``)."""
    sheet = labels_file or find_sheet(index)
    if sheet is None:
        raise UserError(f"{index.root}: no ODIR sheet found (a CSV with Left-Fundus/Right-Fundus)")
    header, rows = read_table(sheet)
    col = _columns(sheet, header)
    patients = _patients(report, sheet, header, rows, col)
    val_patients = held_out((pid for _, pid, _, _ in patients), options.val_fraction, options.seed)
    splits: dict[str, list[Sample]] = {"train": [], "val": []}
    for patient in patients:
        split = "val" if patient[1] in val_patients else "train"
        splits[split] += _eyes(index, report, sheet, header, col, patient, split)
    return FundusDataset(
        root=index.root,
        format="odir",
        label_names=list(ODIR_LABELS),
        splits=splits,
        label_files=[sheet],
    )


def _columns(sheet: Path, header: list[str]) -> dict[str, int]:
    """Column name (as in :data:`_COLUMNS`/:data:`ODIR_LABELS`) -> index in the sheet."""
    lower = {h.lower(): i for i, h in enumerate(header)}
    missing = [c for c in (*_COLUMNS[:5], *ODIR_LABELS) if c.lower() not in lower]
    if missing:
        raise DataError(f"{sheet}:1: ODIR sheet lacks column(s) {', '.join(missing)}")
    return {c: lower[c.lower()] for c in (*_COLUMNS, *ODIR_LABELS) if c.lower() in lower}


def _patients(
    report: Reporter, sheet: Path, header: list[str], rows: Rows, col: dict[str, int]
) -> list[_Patient]:
    """The rows with a complete record, a new patient ID and 0/1 labels."""
    order = [col[c] for c in ODIR_LABELS]
    out: list[_Patient] = []
    seen: dict[str, int] = {}
    for line, values in rows:
        for _, side in _SIDES:
            if col[f"{side}-Fundus"] < len(values):
                for split in ("train", "val"):
                    report.claim(split, str(values[col[f"{side}-Fundus"]]).strip())
        if len(values) < len(header):
            report.add(
                sheet, line, None, f"{len(values)} fields, header has {len(header)}", "bad_row"
            )
            continue
        pid = table_id(values[col["ID"]])
        if not report.id_ok(sheet, line, header[col["ID"]], pid, seen):
            continue
        labels = row_labels(report, sheet, line, header, values, order)
        if labels is not None:
            out.append((line, pid, values, labels))
    return out


def _eyes(
    index: FileIndex,
    report: Reporter,
    sheet: Path,
    header: list[str],
    col: dict[str, int],
    patient: _Patient,
    split: str,
) -> list[Sample]:
    """The patient's left and right samples (an eye whose image is missing is a problem)."""
    line, pid, values, labels = patient
    out: list[Sample] = []
    for eye, side in _SIDES:
        c = col[f"{side}-Fundus"]
        name = str(values[c]).strip()
        image = _find_named(index, name, sheet.parent)
        if image is None:
            report.add(sheet, line, header[c], f"no image found for {name!r}", "missing_image")
            continue
        kw = col.get(f"{side}-Diagnostic Keywords")
        meta = {
            "patient_id": pid,
            "eye": eye,
            "age": values[col["Patient Age"]],
            "sex": values[col["Patient Sex"]],
            "keywords": values[kw] if kw is not None else "",
            "labels_are_per_patient": True,
        }
        out.append(Sample(f"{pid}_{eye}", image, labels.copy(), split, {}, meta, line))
    return out


def _find_named(index: FileIndex, name: str, anchor: Path) -> Path | None:
    """Image by file name (a relative path in the sheet is tried first), else by stem, else an
    unsuffixed DICOM file of exactly that name."""
    if not name:
        return None
    direct = Path(name) if Path(name).is_absolute() else anchor / name
    if direct.is_file():
        return direct
    cands = index.with_stem(Path(name).stem)
    exact = [p for p in cands if p.name.lower() == Path(name).name.lower()]
    # ODIR ships "Training Images" and "Testing Images": the sheet is the training sheet.
    return pick(exact or cands or index.dicom_named(name), index.root, "train", anchor)
