"""``run --report DIR``: keep each photograph's overlay and record, write one report per visit.

The report folder::

    DIR/
      results.jsonl, results.csv     every processed photograph (as ``run --jsonl``)
      model.json                     the model the reports name (name, SHA-256, thresholds)
      photos.jsonl                   one line per photograph: its record, eye, DICOM identifiers
      overlays/<rel>.jpg             each photograph's overlay, named after its source path
      visits/<visit>/report.html     self-contained (images inline, no script, no network)
      visits/<visit>/report.pdf      the same report as a PDF
      visits/<visit>/report.dcm      DICOM Encapsulated PDF (DICOM input only)
      visits/<visit>/overlays/NNN.dcm  DICOM Secondary Capture of each overlay (DICOM input only)
      sent.json                      what ``--send`` stored, with the PACS's status

Photographs are written as they come, so a restarted watch (``append``) and an interrupted run
lose nothing; reports are (re)written at the end of the run for every visit that got a
photograph in it, from everything ``photos.jsonl`` holds for that visit. ``<visit>`` is
:attr:`~fundus_edge.report.visits.Visit.key`. Every file is written atomically. The overlay
is drawn for the report (the map of the top finding, the labels; no frame rate or timings),
so the sink is a log sink: it gets every photograph, also behind a live source.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2

from fundus_edge.errors import UserError, require
from fundus_edge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from fundus_edge.log import get_logger
from fundus_edge.report.visits import OVERLAY_MAX_SIDE, ModelInfo, Photo, Visit, group_visits
from fundus_edge.runtime.sinks import Output, Sink

__all__ = ["ReportSink", "check_report_dependencies", "load_photos", "write_visit"]

log = get_logger("report")


def check_report_dependencies() -> None:
    """The PDF needs ReportLab (the ``report`` extra): say so before any work."""
    require("reportlab", extra="report", purpose="writing PDF reports")


def _overlay_jpeg(rgb) -> tuple[bytes, tuple[int, int]]:
    h, w = rgb.shape[:2]
    scale = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88]
    )
    if not ok:
        raise UserError("--report: OpenCV cannot encode the overlay as JPEG")
    return buf.tobytes(), (rgb.shape[1], rgb.shape[0])


def _overlay_name(rel: str) -> str:
    base, _, n = rel.partition("#")
    return (f"{base}.frame{int(n):03d}" if n else base) + ".jpg"


class ReportSink(Sink):
    """Collect photographs during a run; write the visits' reports when it closes."""

    visual = False

    def __init__(
        self,
        folder: str | os.PathLike,
        predictor: Any,
        *,
        model_path: str,
        send: str | None = None,
        anonymised: bool = False,
        append: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.send = send
        self.anonymised = anonymised
        self.model = ModelInfo.from_predictor(predictor, model_path)
        self.folder.mkdir(parents=True, exist_ok=True)
        model_file = self.folder / "model.json"
        if append and model_file.is_file():
            try:
                old = json.loads(model_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = {}
            if old.get("sha256") not in (None, self.model.sha256):
                raise UserError(
                    f"--report {self.folder}: its reports were made by another model "
                    f"({old.get('name')}, SHA-256 {str(old.get('sha256'))[:12]}); "
                    "give another folder"
                )
        atomic_write_json(model_file, dataclasses.asdict(self.model))
        self._index = self.folder / "photos.jsonl"
        if not append:
            self._index.unlink(missing_ok=True)
        self._touched: list[tuple[str, str | None]] = []
        self.photos = 0
        self.reports: list[Path] = []
        self.sent = 0

    def write(self, out: Output) -> None:
        frame = out.frame
        rel = frame.rel or f"frame_{frame.index:06d}"
        from fundus_edge.runtime.render import render

        image = render(frame.image, out.prediction, which="auto", timings={})
        jpeg, size = _overlay_jpeg(image)
        name = _overlay_name(rel)
        atomic_write_bytes(self.folder / "overlays" / name, jpeg)
        info = frame.dicom
        line = {
            "rel": rel,
            "overlay": f"overlays/{name}",
            "size": list(size),
            "eye": out.record.get("eye"),
            "dicom": None if info is None else dataclasses.asdict(info),
            "record": out.record,
        }
        with open(self._index, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        key = _visit_key(line)
        if key not in self._touched:
            self._touched.append(key)
        self.photos += 1

    def close(self) -> None:
        if not self._touched:
            return
        touched, self._touched = self._touched, []
        visits = [
            v
            for v in group_visits(load_photos(self.folder))
            if (v.patient_id, v.study_uid) in touched
        ]
        when = datetime.now().astimezone()
        files: list[Path] = []
        for visit in visits:
            files.extend(write_visit(self.folder, visit, self.model, when=when))
        self.reports = [f for f in files if f.name == "report.html"]
        if self.send:
            from fundus_edge.report.dicom_out import send

            dicoms = [f for f in files if f.suffix == ".dcm"]
            if dicoms:
                results = send(dicoms, self.send)
                self.sent = len(results)
                _record_sent(self.folder, self.send, results, when)

    @property
    def written(self) -> bool:
        return bool(self.reports)

    def describe(self) -> str:
        if not self.reports:
            return f"no photographs; no report written in {self.folder}"
        sent = f", {self.sent} DICOM object(s) sent to {self.send}" if self.send else ""
        return f"{self.folder} ({len(self.reports)} visit report(s), {self.photos} photograph(s){sent})"


def _visit_key(line: dict[str, Any]) -> tuple[str, str | None]:
    """The key :func:`group_visits` gives this photograph's visit."""
    info = line.get("dicom")
    if info is not None:
        return (info.get("patient_id") or "unknown-patient", info.get("study_uid"))
    from pathlib import PurePosixPath

    parent = str(PurePosixPath(line["rel"].split("#", 1)[0]).parent)
    return (parent if parent not in ("", ".") else "stills", None)


def load_photos(folder: Path) -> list[Photo]:
    """Every photograph ``photos.jsonl`` lists (the last line of a rel wins)."""
    from fundus_edge.data.readers.dicom import DicomInfo

    index = folder / "photos.jsonl"
    by_rel: dict[str, Photo] = {}
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            jpeg = (folder / line["overlay"]).read_bytes()
        except (ValueError, KeyError, OSError) as exc:
            log.warning("%s line %d: skipped (%s)", index, n, exc)
            continue
        info = DicomInfo(**line["dicom"]) if line.get("dicom") else None
        by_rel[line["rel"]] = Photo(
            rel=line["rel"],
            record=line["record"],
            overlay_jpeg=jpeg,
            overlay_size=tuple(line["size"]),
            eye=line.get("eye"),
            dicom=info,
        )
    return list(by_rel.values())


def write_visit(folder: Path, visit: Visit, model: ModelInfo, *, when: datetime) -> list[Path]:
    """Write one visit's HTML, PDF and (DICOM input) DICOM objects; return their paths."""
    from fundus_edge.report.html import render_html
    from fundus_edge.report.pdf import render_pdf

    out = folder / "visits" / visit.key
    generated = when.isoformat(timespec="seconds")
    html_path, pdf_path = out / "report.html", out / "report.pdf"
    atomic_write_text(html_path, render_html(visit, model, generated=generated))
    pdf = render_pdf(visit, model, generated=generated)
    atomic_write_bytes(pdf_path, pdf)
    files = [html_path, pdf_path]
    if visit.dicom:
        from pydicom.uid import generate_uid

        from fundus_edge.report.dicom_out import encapsulated_pdf, secondary_capture, write_dataset

        series = generate_uid()
        files.append(out / "report.dcm")
        write_dataset(encapsulated_pdf(visit, pdf, model, series_uid=series, when=when), files[-1])
        sc_series = generate_uid()
        for i, photo in enumerate(visit.photos, 1):
            ds = secondary_capture(visit, photo, model, series_uid=sc_series, instance=i, when=when)
            files.append(out / "overlays" / f"{i:03d}.dcm")
            write_dataset(ds, files[-1])
    return files


def _record_sent(folder: Path, target: str, results: list, when: datetime) -> None:
    path = folder / "sent.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        history = []
    history.append(
        {
            "target": target,
            "at": when.isoformat(timespec="seconds"),
            "files": [{"file": str(Path(p).relative_to(folder)), "status": s} for p, s in results],
        }
    )
    atomic_write_json(path, history)
