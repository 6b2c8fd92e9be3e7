"""Labels tables: a CSV (or an XLSX sheet) as a header and numbered rows, and 0/1 cells.

Every dataset reader reads its labels file here, so all of them number lines the same way
(1-based, the header is line 1, blank lines are skipped but counted) and accept the same
spellings of a 0/1 label (``0``/``1``, ``0.0``/``1.0``, numbers from an XLSX sheet).
"""

from __future__ import annotations

import csv
from pathlib import Path

from fundus_edge.errors import DataError, UserError

__all__ = ["Rows", "header_of", "parse01", "read_table"]

#: ``(line, values)`` of every non-blank row after the header.
Rows = list[tuple[int, list]]


def parse01(value) -> float | None:
    """0/1 (also 0.0/1.0, ints from XLSX) -> float; anything else -> None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if value in (0, 1) else None
    s = str(value).strip() if value is not None else ""
    if s in ("0", "1"):
        return float(s)
    if s in ("0.0", "1.0"):
        return float(s[0])
    return None


def read_table(path: Path) -> tuple[list[str], Rows]:
    """Header and ``(line, values)`` rows of a CSV (or XLSX when openpyxl is installed).

    Raises:
        DataError: the file is not a readable CSV, or it has no header.
        UserError: an XLSX file without openpyxl installed.
    """
    if path.suffix.lower() == ".xlsx":
        return _read_xlsx(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header, rows = _read_csv_rows(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc
    if header is None:
        raise DataError(f"{path}:1: empty labels file (no header)")
    return header, rows


def _read_csv_rows(reader) -> tuple[list[str] | None, Rows]:
    header: list[str] | None = None
    rows: Rows = []
    for values in reader:
        if not values or all(not v.strip() for v in values):
            continue  # blank line
        if header is None:
            header = [v.strip() for v in values]
            continue
        rows.append((reader.line_num, values))
    return header, rows


def _read_xlsx(path: Path) -> tuple[list[str], Rows]:
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
        rows: Rows = []
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


def header_of(path: Path) -> list[str]:
    """A CSV's header without reading the rest ([] for XLSX or an unreadable file)."""
    if path.suffix.lower() == ".xlsx":
        return []  # only looked into when openpyxl is there; see readers.odir.find_sheet
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [v.strip() for v in next(csv.reader(fh), [])]
    except (UnicodeDecodeError, csv.Error, OSError):
        return []
