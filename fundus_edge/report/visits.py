"""Photographs grouped into visits, and the screening decision per eye and per patient.

A **visit** is one patient's study: for DICOM input, (PatientID, StudyInstanceUID); for
stills, the folder holding them relative to the source root (``scans/ann-1234/left.jpg`` is
patient ``ann-1234``; stills directly in the root form one visit named after the root), one
study per folder. The **eye** of a photograph is its DICOM laterality; for stills, a name
token: ``right``/``od``/``r`` or ``left``/``os``/``l`` separated by ``_``, ``-``, ``.`` or a
space (``p12_left.jpg``, ``scan-OD.png``); otherwise unknown.

The decision, for each eye (and the "eye unknown" group):

* **refer**: a photograph of it passed the quality gate and is screening-positive (the model's
  screening label when it has one, else any finding over its threshold);
* **ungradable, retake**: no photograph of it passed the gate;
* **no referable finding**: otherwise.

For the patient: *refer* when either eye (or an unknown-eye photograph) is *refer*; else
*ungradable, retake* when an eye is; else *no referable finding*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

__all__ = [
    "EYE_NAMES",
    "INTENDED_USE",
    "NO_FINDING",
    "REFER",
    "UNGRADABLE",
    "EyeResult",
    "ModelInfo",
    "Photo",
    "Visit",
    "eye_from_name",
    "group_visits",
]

REFER = "refer"
UNGRADABLE = "ungradable, retake"
NO_FINDING = "no referable finding"
_RANK = {REFER: 2, UNGRADABLE: 1, NO_FINDING: 0}
EYE_NAMES = {"R": "right eye (OD)", "L": "left eye (OS)", None: "eye unknown"}

INTENDED_USE = (
    "Research tool, not a medical device. fundus-edge is not cleared or approved for clinical "
    "diagnosis; its findings are a research model's output and must be read by a qualified "
    "clinician before any decision about a patient."
)

_EYE_TOKENS = {"right": "R", "od": "R", "r": "R", "left": "L", "os": "L", "l": "L"}


def eye_from_name(rel: str) -> str | None:
    """``"R"``/``"L"`` from a still's file name tokens (see the module doc), else None."""
    stem = PurePosixPath(rel).name.rsplit(".", 1)[0].lower()
    found = {_EYE_TOKENS[t] for t in re.split(r"[_\-.\s]+", stem) if t in _EYE_TOKENS}
    return found.pop() if len(found) == 1 else None


@dataclass
class ModelInfo:
    """What the report says about the model that made it."""

    name: str
    sha256: str
    version: str  # fundus-edge's version that ran it
    labels: list[str]
    thresholds: dict[str, float]
    screening_label: str | None = None
    created: str | None = None  # when the model was exported

    @classmethod
    def from_predictor(cls, predictor: Any, path: str) -> ModelInfo:
        from fundus_edge import __version__
        from fundus_edge.fileio import sha256_file

        meta = predictor.metadata
        try:
            sha = sha256_file(path)
        except OSError:  # a model given as an object (tests, the bench): no file to hash
            sha = "unavailable"
        return cls(
            name=str(meta.get("name") or path.rsplit("/", 1)[-1]),
            sha256=sha,
            version=__version__,
            labels=list(predictor.label_names),
            thresholds={
                n: round(float(t), 4)
                for n, t in zip(predictor.label_names, predictor.thresholds, strict=True)
            },
            screening_label=predictor.screening_label,
            created=meta.get("created"),
        )


@dataclass
class Photo:
    """One photograph (or one frame of a multi-frame object) in a report.

    ``record`` is the run's JSONL record; ``overlay_jpeg`` the annotated frame, JPEG-encoded,
    at most :data:`OVERLAY_MAX_SIDE` px on its long side.
    """

    rel: str
    record: dict[str, Any]
    overlay_jpeg: bytes
    overlay_size: tuple[int, int]  # (width, height)
    eye: str | None = None
    dicom: Any = None  # DicomInfo for DICOM input (identifiers already pseudonymised)

    @property
    def passed(self) -> bool:
        return bool((self.record.get("quality") or {}).get("passed"))

    @property
    def quality_reason(self) -> str:
        q = self.record.get("quality") or {}
        return "gradable" if q.get("passed") else str(q.get("reason") or "failed")

    @property
    def positive(self) -> list[str]:
        return list(self.record.get("positive") or [])

    @property
    def screening_positive(self) -> bool:
        s = self.record.get("screening")
        if s is None:
            return bool(self.positive)
        return bool(s)

    def findings(self) -> list[tuple[str, float]]:
        """Labels over threshold with their probabilities, most probable first."""
        probs = self.record.get("probabilities") or {}
        return sorted(((n, float(probs.get(n, 0.0))) for n in self.positive), key=lambda t: -t[1])


OVERLAY_MAX_SIDE = 1024


@dataclass
class EyeResult:
    eye: str | None
    photos: list[Photo]
    result: str

    @property
    def name(self) -> str:
        return EYE_NAMES[self.eye]


@dataclass
class Visit:
    """One patient's study: photographs, per-eye results, the patient's result."""

    patient_id: str
    study_uid: str | None
    photos: list[Photo] = field(default_factory=list)
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    accession_number: str | None = None
    dicom: bool = False  # every photograph came from DICOM (write DICOM outputs)

    @property
    def key(self) -> str:
        """A file-safe name: patient, then study date or UID tail."""
        parts = [self.patient_id]
        if self.study_date:
            parts.append(self.study_date.replace("-", ""))
        if self.study_uid:
            parts.append(self.study_uid.rsplit(".", 1)[-1][-8:])
        text = "_".join(parts)
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-") or "visit"

    def eyes(self) -> list[EyeResult]:
        """Right, left, then unknown: each eye that has photographs."""
        out = []
        for eye in ("R", "L", None):
            photos = [p for p in self.photos if p.eye == eye]
            if photos:
                out.append(EyeResult(eye, photos, _eye_result(photos)))
        return out

    @property
    def result(self) -> str:
        results = [e.result for e in self.eyes()]
        return max(results, key=lambda r: _RANK[r]) if results else UNGRADABLE


def _eye_result(photos: list[Photo]) -> str:
    gradable = [p for p in photos if p.passed and p.record.get("probabilities") is not None]
    if not gradable:
        return UNGRADABLE
    if any(p.screening_positive for p in gradable):
        return REFER
    return NO_FINDING


def group_visits(photos: list[Photo]) -> list[Visit]:
    """Group photographs into visits (see the module doc), in order of first appearance."""
    visits: dict[tuple[str, str | None], Visit] = {}
    for photo in photos:
        info = photo.dicom
        if info is not None:
            key = (info.patient_id or "unknown-patient", info.study_uid)
        else:
            parent = str(PurePosixPath(photo.rel.split("#", 1)[0]).parent)
            key = (parent if parent not in ("", ".") else "stills", None)
        visit = visits.get(key)
        if visit is None:
            visit = Visit(patient_id=key[0], study_uid=key[1], dicom=info is not None)
            if info is not None:
                visit.patient_name = info.patient_name
                visit.patient_birth_date = info.patient_birth_date
                visit.patient_sex = info.patient_sex
                visit.study_date = info.study_date
                visit.study_description = info.study_description
                visit.accession_number = info.accession_number
            visits[key] = visit
        visit.dicom = visit.dicom and info is not None
        visit.photos.append(photo)
    return list(visits.values())
