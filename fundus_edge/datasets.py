"""Dataset readers: RFMiD (every known folder layout), ODIR-5K, and a generic labels CSV.

A reader finds the label files, reads the labels from their header, finds each image by its ID,
and validates as it goes. Every sample it cannot use becomes a :class:`Problem` (file, 1-based
CSV line, column): by default the sample is skipped and one warning summarises them; with
``strict=True`` the first problem raises :class:`~fundus_edge.errors.DataError`. Nothing is
dropped silently.

Formats:

* ``rfmid``: ``RFMiD_{Training,Validation,Testing}_Labels.csv`` anywhere under the root (any
  case, any prefix such as ``a. ``), header ``ID, Disease_Risk, <conditions>`` (the 46-column
  release or the 30-column challenge release with ``OTHER``). Images ``{ID}.{png,jpg,jpeg,tif,
  tiff}`` (any case) are searched in every folder under the root: folders named like another
  split are never used, folders named like the split come first, then the folder nearest the
  CSV. Optional ``Masks/{ID}_{LABEL}.png`` and ``Meta/{ID}.json`` beside the CSV (the layout
  :mod:`fundus_edge.synth` writes) fill :attr:`Sample.masks` and :attr:`Sample.meta`.
* ``odir``: the ODIR-5K sheet (CSV, or XLSX when ``openpyxl`` is installed). ODIR labels are per
  *patient*: each row gives one label vector for both eyes, so the left and the right image
  become two samples ``{ID}_left`` / ``{ID}_right`` with the same labels (an eye-level label
  does not exist in ODIR). ODIR has only a training sheet: a deterministic *patient-level*
  validation split (``val_fraction``) is carved from it, so no patient is in two splits.
* ``csv``: one CSV with an image-path column (``path``/``image``/``file``/``filename`` or
  ``image_column``), 0/1 label columns, an optional ``split`` column (train/val/test) and
  optional meta columns (``id``, ``patient_id``, ``age``, ``sex``, ``eye``, or any ``meta_*``).
  Without a ``split`` column a deterministic validation split is made as for ODIR (grouped by
  ``patient_id`` when present).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fundus_edge.errors import DataError, UserError
from fundus_edge.log import get_logger

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "ODIR_LABELS",
    "RFMID_LABELS_30",
    "RFMID_LABELS_46",
    "SPLITS",
    "FundusDataset",
    "Problem",
    "Sample",
    "open_dataset",
]

log = get_logger("datasets")

SPLITS = ("train", "val", "test")
FORMATS = ("auto", "rfmid", "odir", "csv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SCREENING_LABEL = "Disease_Risk"

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
ODIR_LABELS = ("N", "D", "G", "C", "A", "H", "M", "O")

_RFMID_CSV = re.compile(r"rfmid_(training|validation|testing)_labels\.csv$")
_RFMID_SPLIT = {"training": "train", "validation": "val", "testing": "test"}
# A folder whose name contains one of these belongs to that split ("Evaluation_Set" is val).
_SPLIT_WORDS = {"train": ("train",), "val": ("val",), "test": ("test",)}
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
_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "filepath", "img")
_META_COLUMNS = ("id", "patient_id", "patient", "age", "sex", "gender", "eye", "laterality")
_ODIR_COLUMNS = (
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
)
_MASK_DIR = "masks"
_META_DIR = "meta"


@dataclass
class Sample:
    """One labelled image.

    Attributes:
        id: unique within its split (RFMiD ``ID``; ODIR ``{ID}_left``; CSV ``id`` or path).
        path: the image file.
        labels: ``(C,)`` float32 0/1 in :attr:`FundusDataset.label_names` order.
        split: ``"train"``, ``"val"`` or ``"test"``.
        masks: label -> lesion mask file (uint8 0/255, frame size), where the dataset has one.
        meta: per-image record (synth ``Meta/{ID}.json``; ODIR patient age/sex/eye/keywords).
        row: 1-based line of the labels file this sample came from (header is line 1).
    """

    id: str
    path: Path
    labels: np.ndarray
    split: str
    masks: dict[str, Path] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    row: int | None = None


@dataclass
class Problem:
    """Something wrong with the data; the sample it concerns was skipped.

    Attributes:
        file: the file at fault (labels file, image, mask or meta file).
        row: 1-based line in ``file`` (the header is line 1), when it is a table.
        column: the column at fault, when there is one.
        message: what is wrong.
        kind: ``bad_value``, ``bad_row``, ``duplicate_id``, ``missing_image``,
            ``unreadable_image``, ``orphan_image``, ``bad_split``, ``bad_mask``, ``bad_meta``.
    """

    file: str
    row: int | None
    column: str | None
    message: str
    kind: str

    def __str__(self) -> str:
        where = self.file + (f":{self.row}" if self.row is not None else "")
        col = f" column {self.column!r}" if self.column is not None else ""
        return f"{where}{col}: {self.message}"


@dataclass
class FundusDataset:
    """A dataset split into train/val/test samples, with the problems found while reading it.

    Attributes:
        root: the folder the dataset was opened from.
        format: ``"rfmid"``, ``"odir"`` or ``"csv"``.
        label_names: label columns in order; ``Disease_Risk`` first when present.
        splits: ``"train"``/``"val"``/``"test"`` -> samples (a split absent from the data is
            absent here).
        problems: every problem found; each skipped sample has one.
        label_files: the labels files read (prepare copies them).
    """

    root: Path
    format: str
    label_names: list[str]
    splits: dict[str, list[Sample]]
    problems: list[Problem] = field(default_factory=list)
    label_files: list[Path] = field(default_factory=list)

    @property
    def screening_label(self) -> str | None:
        """The "any disease" label (``Disease_Risk``) when the data has it, else None."""
        return SCREENING_LABEL if SCREENING_LABEL in self.label_names else None

    def samples(self, split: str | None = None) -> list[Sample]:
        """All samples of ``split`` (every split, in train/val/test order, when None)."""
        if split is not None:
            return list(self.splits.get(split, []))
        return [s for name in SPLITS for s in self.splits.get(name, [])]

    def prevalence(self) -> dict[str, dict[str, int]]:
        """Positive count per label for each split: ``{split: {label: count}}``."""
        out: dict[str, dict[str, int]] = {}
        for name, samples in self.splits.items():
            if samples:
                counts = np.stack([s.labels for s in samples]).sum(axis=0)
            else:
                counts = np.zeros(len(self.label_names))
            out[name] = {lab: int(c) for lab, c in zip(self.label_names, counts, strict=True)}
        return out

    def summary(self) -> dict:
        """Everything ``fundus-edge dataset`` reports, as JSON-ready data."""
        prev = self.prevalence()
        splits = {}
        for name, samples in self.splits.items():
            n = len(samples)
            splits[name] = {
                "images": n,
                "prevalence": {
                    lab: {"count": c, "percent": round(100.0 * c / n, 2) if n else 0.0}
                    for lab, c in prev[name].items()
                },
            }
        return {
            "root": str(self.root),
            "format": self.format,
            "label_names": list(self.label_names),
            "screening_label": self.screening_label,
            "label_files": [str(p) for p in self.label_files],
            "splits": splits,
            "problem_counts": dict(Counter(p.kind for p in self.problems)),
            "problems": [asdict(p) for p in self.problems],
        }


def open_dataset(
    root: str | os.PathLike,
    strict: bool = False,
    format: str = "auto",
    check_images: bool = False,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_column: str | None = None,
) -> FundusDataset:
    """Open a fundus dataset folder (or, for ``format="csv"``/``"odir"``, its labels file).

    Args:
        root: dataset folder, or a labels CSV/XLSX file.
        strict: raise :class:`DataError` on the first problem instead of skipping the sample.
        format: ``"auto"`` (RFMiD label files, else an ODIR sheet, else the one CSV in root),
            ``"rfmid"``, ``"odir"`` or ``"csv"``.
        check_images: decode every image (slow) and report unreadable ones.
        val_fraction: share of patients (ODIR) / samples (CSV without ``split``) held out as
            the deterministic validation split.
        seed: changes which patients land in the validation split.
        image_column: the CSV's image-path column, when not one of the usual names.

    Returns:
        The dataset; ``problems`` lists every skipped sample.

    Raises:
        UserError: root missing, no labels file found, or an unknown format.
        DataError: a problem under ``strict``, or a labels file that cannot be used at all.
    """
    if format not in FORMATS:
        raise UserError(f"unknown dataset format {format!r}: choose one of {', '.join(FORMATS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    given = Path(root)
    if not given.exists():
        raise UserError(f"{given}: dataset folder does not exist")
    labels_file = given if given.is_file() else None
    root_dir = given.parent if labels_file else given
    index = _FileIndex(root_dir)
    report = _Reporter(strict)

    if format == "auto":
        format, labels_file = _detect(index, labels_file)
    if format == "rfmid":
        ds = _read_rfmid(index, report, labels_file)
    elif format == "odir":
        sheet = labels_file or _find_odir(index)
        if sheet is None:
            raise UserError(
                f"{root_dir}: no ODIR sheet found (a CSV with Left-Fundus/Right-Fundus)"
            )
        ds = _read_odir(index, report, sheet, val_fraction, seed)
    else:
        table = labels_file or _single_csv(root_dir)
        ds = _read_csv(index, report, table, image_column, val_fraction, seed)

    if check_images:
        _check_images(ds, report)
    _report_orphans(index, ds, report)
    ds.problems = report.problems
    if report.problems:
        kinds = Counter(p.kind for p in report.problems)
        log.warning(
            "%s: %d problem(s) found, affected samples skipped (%s); first: %s",
            root_dir,
            len(report.problems),
            ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
            report.problems[0],
        )
    return ds


# --------------------------------------------------------------------------------------------
# Shared machinery


class _Reporter:
    """Collects problems; under ``strict`` the first one raises."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.problems: list[Problem] = []
        # (split, lower-case image stem) of every row that named an image, good or bad.
        self.claimed: set[tuple[str, str]] = set()

    def claim(self, split: str, name: str) -> None:
        self.claimed.add((split, Path(name).stem.lower()))

    def add(self, file, row: int | None, column: str | None, message: str, kind: str) -> None:
        p = Problem(str(file), row, column, message, kind)
        if self.strict:
            raise DataError(str(p))
        self.problems.append(p)


class _FileIndex:
    """One walk of the root: images by lower-case stem, tables, mask and meta folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        self.tables: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            # Hidden folders hold no data (and prepare's temporary files live in them).
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            d = Path(dirpath)
            in_aux = d.name.lower() in (_MASK_DIR, _META_DIR)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = d / name
                ext = p.suffix.lower()
                if ext in IMAGE_EXTENSIONS and not in_aux:
                    self.by_stem[p.stem.lower()].append(p)
                elif ext in (".csv", ".xlsx"):
                    self.tables.append(p)

    def all_images(self) -> Iterable[Path]:
        for paths in self.by_stem.values():
            yield from paths


def _split_score(folder: Path, root: Path, split: str) -> int:
    """+1: folder (below root) is named like ``split``; -1: like another split only; 0: neither."""
    try:
        parts = [p.lower() for p in folder.relative_to(root).parts]
    except ValueError:
        parts = []
    own = any(w in p for p in parts for w in _SPLIT_WORDS[split])
    if own:
        return 1
    other = any(w in p for s, ws in _SPLIT_WORDS.items() if s != split for p in parts for w in ws)
    return -1 if other else 0


def _tree_distance(a: Path, b: Path) -> int:
    pa, pb = a.parts, b.parts
    common = 0
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        common += 1
    return (len(pa) - common) + (len(pb) - common)


def _pick(candidates: list[Path], root: Path, split: str | None, anchor: Path) -> Path | None:
    """The best image among files of the same stem (see module docstring for the order)."""
    best: tuple | None = None
    chosen = None
    for p in candidates:
        score = _split_score(p.parent, root, split) if split else 0
        if score < 0:
            continue
        key = (-score, _tree_distance(p.parent, anchor), str(p))
        if best is None or key < best:
            best, chosen = key, p
    return chosen


def _parse01(value) -> float | None:
    """0/1 (also 0.0/1.0, ints from XLSX) -> float; anything else -> None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if value in (0, 1) else None
    s = str(value).strip() if value is not None else ""
    if s in ("0", "1"):
        return float(s)
    if s in ("0.0", "1.0"):
        return float(s[0])
    return None


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list]]]:
    """Header and ``(line, values)`` rows of a CSV (or XLSX when openpyxl is installed)."""
    if path.suffix.lower() == ".xlsx":
        return _read_xlsx(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header: list[str] | None = None
            rows: list[tuple[int, list]] = []
            for values in reader:
                if not values or all(not v.strip() for v in values):
                    continue  # blank line
                if header is None:
                    header = [v.strip() for v in values]
                    continue
                rows.append((reader.line_num, values))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc
    if header is None:
        raise DataError(f"{path}:1: empty labels file (no header)")
    return header, rows


def _read_xlsx(path: Path) -> tuple[list[str], list[tuple[int, list]]]:
    try:
        import openpyxl
    except ImportError as exc:
        raise UserError(
            f"{path}: reading .xlsx needs the 'openpyxl' package, which is not installed; "
            "export the sheet to CSV (same columns) and point at the CSV"
        ) from exc
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        rows_iter = wb.worksheets[0].iter_rows(values_only=True)
        header: list[str] | None = None
        rows: list[tuple[int, list]] = []
        for line, values in enumerate(rows_iter, start=1):
            if all(v is None or str(v).strip() == "" for v in values):
                continue
            if header is None:
                header = [str(v).strip() if v is not None else "" for v in values]
                continue
            rows.append((line, ["" if v is None else v for v in values]))
    finally:
        wb.close()
    if header is None:
        raise DataError(f"{path}:1: empty sheet (no header)")
    return header, rows


def _header_of(path: Path) -> list[str]:
    if path.suffix.lower() == ".xlsx":
        return []  # only looked into when openpyxl is there; see _find_odir
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [v.strip() for v in next(csv.reader(fh), [])]
    except (UnicodeDecodeError, csv.Error, OSError):
        return []


def _is_odir_header(header: list[str]) -> bool:
    return {"left-fundus", "right-fundus"} <= {h.lower() for h in header}


def _order_labels(labels: list[str]) -> list[str]:
    if SCREENING_LABEL in labels:
        return [SCREENING_LABEL] + [x for x in labels if x != SCREENING_LABEL]
    return list(labels)


def _held_out(keys: Iterable[str], fraction: float, seed: int) -> set[str]:
    """Deterministic choice of ``round(n * fraction)`` keys, by a seeded hash (order-free)."""
    uniq = sorted(set(keys))
    n_val = round(len(uniq) * fraction)
    ranked = sorted(uniq, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return set(ranked[:n_val])


# --------------------------------------------------------------------------------------------
# Detection


def _detect(index: _FileIndex, labels_file: Path | None) -> tuple[str, Path | None]:
    if labels_file is not None:
        if _RFMID_CSV.search(labels_file.name.lower()):
            return "rfmid", labels_file
        if labels_file.suffix.lower() == ".xlsx" or _is_odir_header(_header_of(labels_file)):
            return "odir", labels_file
        return "csv", labels_file
    if any(_RFMID_CSV.search(t.name.lower()) for t in index.tables):
        return "rfmid", None
    sheet = _find_odir(index)
    if sheet is not None:
        return "odir", sheet
    top = [t for t in index.tables if t.parent == index.root and t.suffix.lower() == ".csv"]
    if len(top) == 1:
        return "csv", top[0]
    if not top:
        raise UserError(
            f"{index.root}: no labels file found (expected RFMiD_*_Labels.csv, an ODIR sheet, "
            "or one CSV in the folder)"
        )
    raise UserError(
        f"{index.root}: {len(top)} CSV files and none is an RFMiD/ODIR labels file; "
        "pass the labels CSV itself with --format csv"
    )


def _find_odir(index: _FileIndex) -> Path | None:
    csvs = [
        t for t in index.tables if t.suffix.lower() == ".csv" and _is_odir_header(_header_of(t))
    ]
    if csvs:
        return min(csvs, key=lambda p: (len(p.parts), str(p)))
    xlsx = [t for t in index.tables if t.suffix.lower() == ".xlsx"]
    if len(xlsx) == 1:
        return xlsx[0]  # ODIR-5K ships data.xlsx; _read_xlsx explains how to proceed without it
    return None


def _single_csv(root: Path) -> Path:
    top = sorted(p for p in root.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    if len(top) != 1:
        raise UserError(
            f"{root}: expected exactly one CSV for --format csv, found {len(top)}; "
            "pass the CSV file itself"
        )
    return top[0]


# --------------------------------------------------------------------------------------------
# RFMiD


def _read_rfmid(index: _FileIndex, report: _Reporter, labels_file: Path | None) -> FundusDataset:
    by_split: dict[str, list[Path]] = defaultdict(list)
    tables = [labels_file] if labels_file is not None else index.tables
    for t in tables:
        m = _RFMID_CSV.search(t.name.lower())
        if m:
            by_split[_RFMID_SPLIT[m.group(1)]].append(t)
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

    label_names: list[str] | None = None
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        if split not in files:
            continue
        path = files[split]
        header, rows = _read_table(path)
        if not header or header[0].strip().lower() != "id":
            raise DataError(
                f"{path}:1 column {header[0] if header else ''!r}: first column must be ID"
            )
        labels = header[1:]
        if label_names is None:
            label_names = _order_labels(labels)
        elif set(labels) != set(label_names) or len(labels) != len(label_names):
            raise DataError(
                f"{path}:1: label columns differ from {files['train' if 'train' in files else split]}"
            )
        masks_dir = _child_dir(path.parent, _MASK_DIR)
        meta_dir = _child_dir(path.parent, _META_DIR)
        splits[split] = _rfmid_split(
            index, report, path, split, header, rows, label_names, masks_dir, meta_dir
        )
    assert label_names is not None
    return FundusDataset(
        root=index.root,
        format="rfmid",
        label_names=label_names,
        splits=splits,
        label_files=[files[s] for s in SPLITS if s in files],
    )


def _child_dir(parent: Path, name: str) -> Path | None:
    for d in parent.iterdir():
        if d.is_dir() and d.name.lower() == name:
            return d
    return None


def _rfmid_split(
    index: _FileIndex,
    report: _Reporter,
    path: Path,
    split: str,
    header: list[str],
    rows: list[tuple[int, list]],
    label_names: list[str],
    masks_dir: Path | None,
    meta_dir: Path | None,
) -> list[Sample]:
    col_of = {name: i for i, name in enumerate(header)}
    order = [col_of[name] for name in label_names]
    masks = _index_masks(masks_dir, label_names, report) if masks_dir else {}
    seen: dict[str, int] = {}
    samples: list[Sample] = []
    for line, values in rows:
        report.claim(split, str(values[0]).strip())
        if len(values) != len(header):
            report.add(
                path, line, None, f"{len(values)} fields, header has {len(header)}", "bad_row"
            )
            continue
        sid = str(values[0]).strip()
        if sid.endswith(".0") and sid[:-2].isdigit():
            sid = sid[:-2]  # XLSX/pandas exports write integer IDs as floats
        if not sid:
            report.add(path, line, header[0], "empty ID", "bad_value")
            continue
        if sid in seen:
            report.add(
                path,
                line,
                header[0],
                f"duplicate ID {sid} (first at line {seen[sid]})",
                "duplicate_id",
            )
            continue
        seen[sid] = line
        labels = _row_labels(report, path, line, header, values, order)
        if labels is None:
            continue
        image = _pick(index.by_stem.get(sid.lower(), []), index.root, split, path.parent)
        if image is None:
            report.add(path, line, header[0], f"no image found for ID {sid}", "missing_image")
            continue
        meta = _load_meta(meta_dir / f"{sid}.json", report) if meta_dir else {}
        samples.append(Sample(sid, image, labels, split, masks.get(sid, {}), meta or {}, line))
    return samples


def _row_labels(
    report: _Reporter, path: Path, line: int, header: list[str], values: list, order: list[int]
) -> np.ndarray | None:
    labels = np.zeros(len(order), dtype=np.float32)
    for k, i in enumerate(order):
        v = _parse01(values[i])
        if v is None:
            report.add(path, line, header[i], f"value {values[i]!r} is not 0 or 1", "bad_value")
            return None
        labels[k] = v
    return labels


def _index_masks(
    masks_dir: Path, label_names: list[str], report: _Reporter
) -> dict[str, dict[str, Path]]:
    """``{ID}_{LABEL}.png`` files -> ``{ID: {LABEL: path}}`` (label names may hold '_')."""
    by_len = sorted(label_names, key=len, reverse=True)
    out: dict[str, dict[str, Path]] = defaultdict(dict)
    for p in sorted(masks_dir.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
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


def _load_meta(path: Path, report: _Reporter) -> dict:
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


# --------------------------------------------------------------------------------------------
# ODIR-5K


def _read_odir(
    index: _FileIndex, report: _Reporter, sheet: Path, val_fraction: float, seed: int
) -> FundusDataset:
    header, rows = _read_table(sheet)
    lower = {h.lower(): i for i, h in enumerate(header)}
    missing = [c for c in (*_ODIR_COLUMNS[:5], *ODIR_LABELS) if c.lower() not in lower]
    if missing:
        raise DataError(f"{sheet}:1: ODIR sheet lacks column(s) {', '.join(missing)}")
    col = {c: lower[c.lower()] for c in (*_ODIR_COLUMNS, *ODIR_LABELS) if c.lower() in lower}
    order = [col[c] for c in ODIR_LABELS]
    rows_ok: list[tuple[int, str, list, np.ndarray]] = []
    seen: dict[str, int] = {}
    for line, values in rows:
        for side in ("Left-Fundus", "Right-Fundus"):
            if col[side] < len(values):
                for split in ("train", "val"):
                    report.claim(split, str(values[col[side]]).strip())
        if len(values) < len(header):
            report.add(
                sheet, line, None, f"{len(values)} fields, header has {len(header)}", "bad_row"
            )
            continue
        pid = str(values[col["ID"]]).strip()
        if pid.endswith(".0") and pid[:-2].isdigit():
            pid = pid[:-2]
        if not pid:
            report.add(sheet, line, header[col["ID"]], "empty ID", "bad_value")
            continue
        if pid in seen:
            report.add(
                sheet,
                line,
                header[col["ID"]],
                f"duplicate ID {pid} (first at line {seen[pid]})",
                "duplicate_id",
            )
            continue
        seen[pid] = line
        labels = _row_labels(report, sheet, line, header, values, order)
        if labels is not None:
            rows_ok.append((line, pid, values, labels))

    val_patients = _held_out((pid for _, pid, _, _ in rows_ok), val_fraction, seed)
    splits: dict[str, list[Sample]] = {"train": [], "val": []}
    for line, pid, values, labels in rows_ok:
        split = "val" if pid in val_patients else "train"
        for eye, side in (("left", "Left"), ("right", "Right")):
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
            splits[split].append(
                Sample(f"{pid}_{eye}", image, labels.copy(), split, {}, meta, line)
            )
    return FundusDataset(
        root=index.root,
        format="odir",
        label_names=list(ODIR_LABELS),
        splits=splits,
        label_files=[sheet],
    )


def _find_named(index: _FileIndex, name: str, anchor: Path) -> Path | None:
    """Image by file name (a relative path in the sheet is tried first), else by stem."""
    if not name:
        return None
    direct = Path(name) if Path(name).is_absolute() else anchor / name
    if direct.is_file():
        return direct
    stem = Path(name).stem.lower()
    cands = index.by_stem.get(stem, [])
    exact = [p for p in cands if p.name.lower() == Path(name).name.lower()]
    # ODIR ships "Training Images" and "Testing Images": the sheet is the training sheet.
    return _pick(exact or cands, index.root, "train", anchor)


# --------------------------------------------------------------------------------------------
# Generic CSV


def _read_csv(
    index: _FileIndex,
    report: _Reporter,
    table: Path,
    image_column: str | None,
    val_fraction: float,
    seed: int,
) -> FundusDataset:
    header, rows = _read_table(table)
    lower = {h.lower(): i for i, h in enumerate(header)}
    if image_column is not None:
        if image_column not in header:
            raise UserError(f"{table}:1: no column {image_column!r} (image_column)")
        path_col = header.index(image_column)
    else:
        found = [lower[c] for c in _PATH_COLUMNS if c in lower]
        if not found:
            raise DataError(
                f"{table}:1: no image-path column (one of {', '.join(_PATH_COLUMNS)}); "
                "rename the image-path column to one of these (or pass image_column= to "
                "fundus_edge.datasets.open_dataset)"
            )
        path_col = found[0]
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
    label_names = _order_labels([header[i] for i in label_cols])
    order = [header.index(n) for n in label_names]
    id_col = lower.get("id")
    group_col = lower.get("patient_id", lower.get("patient"))

    parsed: list[tuple[int, str, str | None, Path, np.ndarray, dict]] = []
    seen: dict[str, int] = {}
    for line, values in rows:
        if len(values) != len(header):
            report.add(
                table, line, None, f"{len(values)} fields, header has {len(header)}", "bad_row"
            )
            continue
        rel = str(values[path_col]).strip()
        for split in SPLITS:
            report.claim(split, rel)
        sid = (
            str(values[id_col]).strip()
            if id_col is not None
            else Path(rel).with_suffix("").as_posix()
        )
        key_col = header[id_col] if id_col is not None else header[path_col]
        if not sid:
            report.add(table, line, key_col, "empty ID", "bad_value")
            continue
        if sid in seen:
            report.add(
                table,
                line,
                key_col,
                f"duplicate ID {sid} (first at line {seen[sid]})",
                "duplicate_id",
            )
            continue
        seen[sid] = line
        split = None
        if split_col is not None:
            split = _SPLIT_VALUES.get(str(values[split_col]).strip().lower())
            if split is None:
                report.add(
                    table,
                    line,
                    header[split_col],
                    f"split {values[split_col]!r} is not train/val/test",
                    "bad_split",
                )
                continue
        labels = _row_labels(report, table, line, header, values, order)
        if labels is None:
            continue
        image = _resolve_path(index, rel, table.parent)
        if image is None:
            report.add(table, line, header[path_col], f"no image found at {rel!r}", "missing_image")
            continue
        meta = {header[i]: values[i] for i in meta_cols}
        group = str(values[group_col]).strip() if group_col is not None else sid
        parsed.append((line, sid, split, image, labels, meta | {"_group": group}))

    if split_col is None:
        held = _held_out((m["_group"] for *_, m in parsed), val_fraction, seed)
    splits: dict[str, list[Sample]] = {}
    for line, sid, split, image, labels, meta in parsed:
        group = meta.pop("_group")
        if split is None:
            split = "val" if group in held else "train"
        splits.setdefault(split, []).append(Sample(sid, image, labels, split, {}, meta, line))
    splits = {s: splits[s] for s in SPLITS if s in splits}
    return FundusDataset(
        root=index.root,
        format="csv",
        label_names=label_names,
        splits=splits,
        label_files=[table],
    )


def _resolve_path(index: _FileIndex, rel: str, anchor: Path) -> Path | None:
    if not rel:
        return None
    p = Path(rel)
    for cand in [p] if p.is_absolute() else [anchor / p, index.root / p]:
        if cand.is_file():
            return cand
    return None


# --------------------------------------------------------------------------------------------
# Whole-dataset checks


def _check_images(ds: FundusDataset, report: _Reporter) -> None:
    """Decode every image (threads: OpenCV releases the GIL); unreadable ones are dropped."""
    from concurrent.futures import ThreadPoolExecutor

    from fundus_edge.preprocess import read_image

    def ok(sample: Sample) -> str | None:
        try:
            read_image(sample.path)
        except DataError as exc:
            return str(exc)
        return None

    for split, samples in ds.splits.items():
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            errors = list(pool.map(ok, samples))
        kept = []
        for s, err in zip(samples, errors, strict=True):
            if err is None:
                kept.append(s)
                continue
            src = ds.label_files[0] if len(ds.label_files) == 1 else None
            where = f" (listed at line {s.row}{f' of {src.name}' if src else ''})" if s.row else ""
            report.add(s.path, None, None, f"cannot read image{where}: {err}", "unreadable_image")
        ds.splits[split] = kept


def _report_orphans(index: _FileIndex, ds: FundusDataset, report: _Reporter) -> None:
    """Images with no labels row, in folders that hold labelled images of a split (other
    folders may hold anything: figures, an unlabelled test set)."""
    splits_of: dict[Path, set[str]] = defaultdict(set)
    for s in ds.samples():
        splits_of[s.path.parent.resolve()].add(s.split)
    for p in index.all_images():
        splits = splits_of.get(p.parent.resolve())
        if not splits:
            continue
        # A row that named this image but was skipped is reported at that row already.
        if any((split, p.stem.lower()) in report.claimed for split in splits):
            continue
        report.add(p, None, None, "image has no labels row", "orphan_image")
