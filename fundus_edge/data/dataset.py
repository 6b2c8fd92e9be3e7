"""A fundus dataset: samples per split, label names, and every problem found reading them.

:func:`open_dataset` walks the folder once (:class:`~fundus_edge.data.files.FileIndex`),
detects the format, and hands the folder to that format's reader in
:mod:`fundus_edge.data.readers` (``rfmid``, ``odir``, ``csv``: each module documents its files,
columns and splits). Detection (``format="auto"``), first match wins:

1. a labels file given as ``root``: an ``RFMiD_*_Labels.csv`` name is RFMiD; an XLSX sheet or
   a CSV with ``Left-Fundus``/``Right-Fundus`` columns is ODIR; any other CSV is a generic CSV;
2. an ``RFMiD_{Training,Validation,Testing}_Labels.csv`` anywhere under the folder: RFMiD;
3. an ODIR sheet anywhere under the folder: ODIR;
4. exactly one CSV directly in the folder: a generic CSV.

A reader finds the label files, reads the labels from their header, finds each image by its ID
or path, and validates as it goes. Every sample it cannot use becomes a :class:`Problem` (file,
1-based CSV line, column): by default the sample is skipped and one warning summarises them;
with ``strict=True`` the first problem raises :class:`~fundus_edge.errors.DataError`. Nothing
is dropped silently. After reading, ``check_images`` decodes every image (DICOM included,
:func:`fundus_edge.preprocess.read_image`) and images without a labels row in folders of
labelled images are reported as orphans.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from fundus_edge.data.files import FileIndex
from fundus_edge.data.tables import header_of, parse01
from fundus_edge.errors import DataError, UserError
from fundus_edge.log import get_logger

__all__ = [
    "FORMATS",
    "SCREENING_LABEL",
    "SPLITS",
    "FundusDataset",
    "Problem",
    "Sample",
    "open_dataset",
]

log = get_logger("datasets")

SPLITS = ("train", "val", "test")
FORMATS = ("auto", "rfmid", "odir", "csv")
SCREENING_LABEL = "Disease_Risk"


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


@dataclass(frozen=True)
class ReadOptions:
    """What :func:`open_dataset` passes every reader besides the folder and the labels file."""

    val_fraction: float = 0.1
    seed: int = 0
    image_column: str | None = None


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
    index = FileIndex(given.parent if labels_file else given)
    report = Reporter(strict)
    if format == "auto":
        format, labels_file = _detect(index, labels_file)
    options = ReadOptions(val_fraction, seed, image_column)
    ds = _reader(format).read(index, report, labels_file, options)
    if check_images:
        _check_images(ds, report)
    _report_orphans(index, ds, report)
    ds.problems = report.problems
    _warn(index.root, report.problems)
    return ds


def _warn(root: Path, problems: list[Problem]) -> None:
    if not problems:
        return
    kinds = Counter(p.kind for p in problems)
    log.warning(
        "%s: %d problem(s) found, affected samples skipped (%s); first: %s",
        root,
        len(problems),
        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        problems[0],
    )


# --------------------------------------------------------------------------------------------
# Detection


def _reader(format: str) -> ModuleType:
    """The reader module of ``format`` (imported here: every reader imports this module)."""
    from fundus_edge.data.readers import csv, odir, rfmid

    return {"rfmid": rfmid, "odir": odir, "csv": csv}[format]


def _detect(index: FileIndex, labels_file: Path | None) -> tuple[str, Path | None]:
    """The format of the folder (or of the labels file given), and its labels file if known."""
    from fundus_edge.data.readers import odir, rfmid

    if labels_file is not None:
        if rfmid.is_labels_file(labels_file):
            return "rfmid", labels_file
        if labels_file.suffix.lower() == ".xlsx" or odir.is_sheet_header(header_of(labels_file)):
            return "odir", labels_file
        return "csv", labels_file
    if any(rfmid.is_labels_file(t) for t in index.tables):
        return "rfmid", None
    sheet = odir.find_sheet(index)
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


# --------------------------------------------------------------------------------------------
# Shared by the readers


class Reporter:
    """Collects problems; under ``strict`` the first one raises."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.problems: list[Problem] = []
        # (split, lower-case image stem) of every row that named an image, good or bad.
        self.claimed: set[tuple[str, str]] = set()

    def claim(self, split: str, name: str) -> None:
        """A row of ``split`` named image ``name``: never report that file as an orphan."""
        self.claimed.add((split, Path(name).stem.lower()))

    def add(self, file, row: int | None, column: str | None, message: str, kind: str) -> None:
        """Record a problem (raise it under ``strict``)."""
        p = Problem(str(file), row, column, message, kind)
        if self.strict:
            raise DataError(str(p))
        self.problems.append(p)

    def fields_ok(self, path: Path, line: int, values: list, header: list[str]) -> bool:
        """False (and a ``bad_row``) when the row's field count differs from the header's."""
        if len(values) == len(header):
            return True
        self.add(path, line, None, f"{len(values)} fields, header has {len(header)}", "bad_row")
        return False

    def id_ok(self, path: Path, line: int, column: str, sid: str, seen: dict[str, int]) -> bool:
        """False (and a problem) for an empty or repeated ID; else ``sid`` joins ``seen``."""
        if not sid:
            self.add(path, line, column, "empty ID", "bad_value")
            return False
        if sid in seen:
            message = f"duplicate ID {sid} (first at line {seen[sid]})"
            self.add(path, line, column, message, "duplicate_id")
            return False
        seen[sid] = line
        return True


def table_id(value) -> str:
    """An ID cell as text: stripped, and ``12.0`` -> ``12`` (XLSX/pandas write integer IDs as
    floats)."""
    sid = str(value).strip()
    if sid.endswith(".0") and sid[:-2].isdigit():
        sid = sid[:-2]
    return sid


def row_labels(
    report: Reporter, path: Path, line: int, header: list[str], values: list, order: list[int]
) -> np.ndarray | None:
    """The row's 0/1 labels in ``order`` (column indices); None (and a problem) otherwise."""
    labels = np.zeros(len(order), dtype=np.float32)
    for k, i in enumerate(order):
        v = parse01(values[i])
        if v is None:
            report.add(path, line, header[i], f"value {values[i]!r} is not 0 or 1", "bad_value")
            return None
        labels[k] = v
    return labels


def order_labels(labels: list[str]) -> list[str]:
    """Label names with the screening label (``Disease_Risk``) first when present."""
    if SCREENING_LABEL in labels:
        return [SCREENING_LABEL] + [x for x in labels if x != SCREENING_LABEL]
    return list(labels)


def held_out(keys: Iterable[str], fraction: float, seed: int) -> set[str]:
    """Deterministic choice of ``round(n * fraction)`` keys, by a seeded hash (order-free)."""
    uniq = sorted(set(keys))
    n_val = round(len(uniq) * fraction)
    ranked = sorted(uniq, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return set(ranked[:n_val])


# --------------------------------------------------------------------------------------------
# Whole-dataset checks


def _check_images(ds: FundusDataset, report: Reporter) -> None:
    """Decode every image (threads: OpenCV releases the GIL); unreadable ones are dropped."""
    from concurrent.futures import ThreadPoolExecutor

    from fundus_edge.preprocess import read_image

    def ok(sample: Sample) -> str | None:
        try:
            read_image(sample.path)
        except DataError as exc:
            return str(exc)
        return None

    src = ds.label_files[0] if len(ds.label_files) == 1 else None
    for split, samples in ds.splits.items():
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            errors = list(pool.map(ok, samples))
        kept = []
        for s, err in zip(samples, errors, strict=True):
            if err is None:
                kept.append(s)
                continue
            where = f" (listed at line {s.row}{f' of {src.name}' if src else ''})" if s.row else ""
            report.add(s.path, None, None, f"cannot read image{where}: {err}", "unreadable_image")
        ds.splits[split] = kept


def _report_orphans(index: FileIndex, ds: FundusDataset, report: Reporter) -> None:
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
