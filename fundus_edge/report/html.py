"""One visit's screening report as a single self-contained HTML file.

The document needs nothing but itself: CSS is inline, every photograph is embedded as a
``data:image/jpeg;base64`` URL, there is no script and no external URL of any kind (a screening
device may be offline, and a report is archived as one file). It prints on A4 (``@media
print``: a photograph and its caption never split across pages; the result colours print).

Layout, top to bottom (the PDF report, :mod:`fundus_edge.report.pdf`, follows the same order
and draws its text from the same helpers here, :func:`header_fields`, :func:`photo_fields`,
:func:`model_fields`, :func:`result_note`):

1. the title, "Fundus screening report";
2. the header: patient ID, then name, birth date and sex when present (an anonymised visit or
   stills have none), study date, accession number, study description, study UID when known;
3. the patient result banner: *refer* red, *ungradable, retake* amber, *no referable finding*
   green; the result is written out, never shown by colour alone;
4. per eye (right, left, then "eye unknown"; see :meth:`Visit.eyes`): the eye's name and
   result, then each photograph: the annotated overlay, its source path, acquisition time
   (DICOM), quality verdict and reason, and its findings over threshold with probability and
   threshold, or "no finding over threshold", or "not graded (quality gate)";
5. the model: name, SHA-256, fundus-edge version, export date, screening label, thresholds;
6. the intended-use note (:data:`INTENDED_USE`), in a box;
7. the footer: "Generated <time>".

Every text from the data (patient name, paths, labels) goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html

from fundus_edge.report.visits import (
    INTENDED_USE,
    NO_FINDING,
    REFER,
    UNGRADABLE,
    ModelInfo,
    Photo,
    Visit,
)

__all__ = [
    "RESULT_NOTES",
    "TITLE",
    "header_fields",
    "model_fields",
    "photo_fields",
    "render_html",
    "result_note",
]

TITLE = "Fundus screening report"

# What each result means, printed under it in the banner.
RESULT_NOTES = {
    REFER: "a gradable photograph is screening-positive: refer to an eye-care specialist",
    UNGRADABLE: "an eye has no gradable photograph: retake the photographs of that eye",
    NO_FINDING: "every eye photographed has a gradable photograph and none is screening-positive",
}

NOT_GRADED = "not graded (quality gate)"
NO_FINDING_TEXT = "no finding over threshold"

# Banner colours (background, text): red, amber, green.
RESULT_COLOURS = {
    REFER: ("#b71c1c", "#ffffff"),
    UNGRADABLE: ("#ffb300", "#2b1d00"),
    NO_FINDING: ("#2e7d32", "#ffffff"),
}


def result_note(result: str) -> str:
    """The one-line explanation printed under a result."""
    return RESULT_NOTES.get(result, "")


def _person_name(name: str) -> str:
    """A DICOM person name (``Family^Given^Middle``) as ``Family, Given Middle``."""
    parts = [p.strip() for p in name.split("=", 1)[0].split("^")]
    family, given = parts[0], " ".join(p for p in parts[1:] if p)
    if family and given:
        return f"{family}, {given}"
    return family or given or name


def header_fields(visit: Visit) -> list[tuple[str, str]]:
    """The header's (label, value) rows: patient ID, then every known identifier.

    Name, birth date and sex are left out when absent (anonymised visits, stills), as are
    study fields a visit does not have.
    """
    rows = [("Patient ID", visit.patient_id)]
    optional = (
        ("Name", _person_name(visit.patient_name) if visit.patient_name else None),
        ("Birth date", visit.patient_birth_date),
        ("Sex", visit.patient_sex),
        ("Study date", visit.study_date),
        ("Accession number", visit.accession_number),
        ("Study description", visit.study_description),
        ("Study UID", visit.study_uid),
    )
    rows += [(label, str(value)) for label, value in optional if value]
    return rows


def _acquired(photo: Photo) -> str | None:
    acquired = getattr(photo.dicom, "acquired", None)
    if acquired is None:
        acquired = (photo.record.get("dicom") or {}).get("acquired")
    return str(acquired) if acquired else None


def _quality(photo: Photo) -> str:
    q = photo.record.get("quality") or {}
    text = "gradable" if photo.passed else f"not gradable: {photo.quality_reason}"
    score = q.get("score")
    if isinstance(score, int | float):
        text += f" (score {float(score):.2f})"
    return text


def _findings(photo: Photo, model: ModelInfo) -> list[str]:
    if photo.record.get("probabilities") is None:
        return [NOT_GRADED]
    lines = []
    for label, p in photo.findings():
        line = f"{label}: {p:.1%}"
        threshold = model.thresholds.get(label)
        if threshold is not None:
            line += f" (threshold {float(threshold):.1%})"
        if label == model.screening_label:
            line += ", screening label"
        lines.append(line)
    if not lines:
        lines.append(NO_FINDING_TEXT)
    if not photo.passed:
        lines.append("not counted in the result: failed the quality gate")
    return lines


def photo_fields(photo: Photo, model: ModelInfo) -> list[tuple[str, list[str]]]:
    """A photograph's caption rows: (label, lines).

    Source path, acquisition time (DICOM only), quality verdict, and findings: each label over
    its threshold as ``label: 87.3% (threshold 50.0%)``, else "no finding over threshold", or
    "not graded (quality gate)" when the model did not run on it.
    """
    rows = [("Source", [photo.rel])]
    acquired = _acquired(photo)
    if acquired:
        rows.append(("Acquired", [acquired]))
    rows.append(("Quality", [_quality(photo)]))
    rows.append(("Findings", _findings(photo, model)))
    return rows


def model_fields(model: ModelInfo) -> list[tuple[str, str]]:
    """The model section's (label, value) rows (the thresholds table is apart)."""
    return [
        ("Model", model.name),
        ("SHA-256", model.sha256),
        ("fundus-edge version", model.version),
        ("Exported", model.created or "unknown"),
        (
            "Screening label",
            model.screening_label or "none (any finding over its threshold refers)",
        ),
    ]


def _thresholds(model: ModelInfo) -> list[tuple[str, float]]:
    labels = list(model.labels) + [n for n in model.thresholds if n not in model.labels]
    return [(n, float(model.thresholds[n])) for n in labels if n in model.thresholds]


_CSS = """
* { box-sizing: border-box; }
body { font-family: "Helvetica Neue", Arial, "Liberation Sans", sans-serif; color: #1a1a1a;
  max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; line-height: 1.4; }
h1 { font-size: 1.6rem; margin: 0 0 .8rem; }
h2 { font-size: 1.25rem; margin: 1.6rem 0 .6rem; border-bottom: 1px solid #bbb;
  padding-bottom: .2rem; }
table.fields { border-collapse: collapse; margin: .3rem 0; }
table.fields th { text-align: left; font-weight: 600; padding: .15rem 1rem .15rem 0;
  vertical-align: top; white-space: nowrap; }
table.fields td { padding: .15rem 0; vertical-align: top; overflow-wrap: anywhere; }
table.fields ul { margin: 0; padding-left: 1.1rem; }
.banner { border-radius: .4rem; padding: .8rem 1rem; margin: 1rem 0;
  font-size: 1.4rem; font-weight: 700; }
.banner .note { display: block; font-size: .95rem; font-weight: 400; }
.badge { display: inline-block; border-radius: .3rem; padding: .05rem .5rem;
  font-weight: 700; font-size: 1rem; }
.r-refer { background: #b71c1c; color: #fff; }
.r-ungradable { background: #ffb300; color: #2b1d00; }
.r-nofinding { background: #2e7d32; color: #fff; }
.photo { border: 1px solid #ccc; border-radius: .3rem; padding: .6rem; margin: .8rem 0;
  page-break-inside: avoid; break-inside: avoid; }
.photo img { display: block; max-width: 100%; height: auto; margin-bottom: .4rem; }
table.thresholds { border-collapse: collapse; margin: .5rem 0; }
table.thresholds th, table.thresholds td { border: 1px solid #bbb; padding: .2rem .6rem;
  text-align: left; }
table.thresholds td.num { text-align: right; font-variant-numeric: tabular-nums; }
.intended { border: 2px solid #555; background: #f4f4f4; padding: .7rem 1rem;
  margin: 1.2rem 0; }
footer { color: #555; font-size: .85rem; margin-top: 1.5rem; border-top: 1px solid #ccc;
  padding-top: .4rem; }
@page { size: A4; margin: 15mm; }
@media print {
  body { max-width: none; margin: 0; padding: 0; font-size: 10pt; }
  .banner, .badge { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  .photo, .intended, table.thresholds { page-break-inside: avoid; break-inside: avoid; }
  .photo img { max-height: 160mm; width: auto; }
  h2 { page-break-after: avoid; break-after: avoid; }
}
"""

_RESULT_CLASS = {REFER: "r-refer", UNGRADABLE: "r-ungradable", NO_FINDING: "r-nofinding"}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fields_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="fields">{body}</table>'


def _photo_html(photo: Photo, model: ModelInfo) -> str:
    w, h = photo.overlay_size
    data = base64.b64encode(photo.overlay_jpeg).decode("ascii")
    img = (
        f'<img src="data:image/jpeg;base64,{data}" width="{int(w)}" height="{int(h)}" '
        f'alt="{_e("annotated photograph " + photo.rel)}">'
    )
    rows = []
    for label, lines in photo_fields(photo, model):
        if len(lines) == 1:
            value = _e(lines[0])
        else:
            value = "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"
        rows.append(f"<tr><th>{_e(label)}</th><td>{value}</td></tr>")
    return f'<div class="photo">{img}<table class="fields">{"".join(rows)}</table></div>'


def render_html(visit: Visit, model: ModelInfo, *, generated: str) -> str:
    """The visit's report as one self-contained HTML5 document (see the module doc).

    Args:
        visit: the patient's study, its photographs with their records and overlays.
        model: the model that graded them.
        generated: when the report was made, as printed in the footer (ISO 8601, say).

    Returns:
        The document's text (write it as UTF-8).
    """
    result = visit.result
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(TITLE)}: {_e(visit.patient_id)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(TITLE)}</h1>",
        f'<section class="header">{_fields_table(header_fields(visit))}</section>',
        f'<div class="banner {_RESULT_CLASS.get(result, "")}" role="status">'
        f"Patient result: {_e(result)}"
        f'<span class="note">{_e(result_note(result))}</span></div>',
    ]
    for eye in visit.eyes():
        n = len(eye.photos)
        parts.append(
            f'<section class="eye"><h2>{_e(eye.name)}: '
            f'<span class="badge {_RESULT_CLASS.get(eye.result, "")}">{_e(eye.result)}</span>'
            f"</h2><p>{n} photograph{'s' if n != 1 else ''}</p>"
        )
        parts += [_photo_html(photo, model) for photo in eye.photos]
        parts.append("</section>")
    if not visit.photos:
        parts.append("<p>No photographs.</p>")
    thresholds = "".join(
        f"<tr><td>{_e(label)}{' (screening)' if label == model.screening_label else ''}</td>"
        f'<td class="num">{t:.1%}</td></tr>'
        for label, t in _thresholds(model)
    )
    parts += [
        '<section class="model"><h2>Model</h2>',
        _fields_table(model_fields(model)),
        '<table class="thresholds"><thead><tr><th>Label</th><th>Threshold</th></tr></thead>'
        f"<tbody>{thresholds}</tbody></table>",
        "</section>",
        f'<div class="intended"><strong>Intended use.</strong> {_e(INTENDED_USE)}</div>',
        f"<footer>Generated {_e(generated)}</footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"
