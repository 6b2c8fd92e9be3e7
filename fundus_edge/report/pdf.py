"""One visit's screening report as a PDF (A4, ReportLab platypus).

Same content and order as the HTML report (:mod:`fundus_edge.report.html`, whose helpers give
the text of every row):

1. the title, "Fundus screening report";
2. the header table: patient ID, name / birth date / sex when present, study date, accession
   number, study description, study UID;
3. the patient result banner, a coloured cell with the result written in it (*refer* red,
   *ungradable, retake* amber, *no referable finding* green) and what it means;
4. per eye (right, left, eye unknown): the eye's name beside its result in a coloured cell,
   then each photograph, kept on one page with its caption: the annotated overlay (the JPEG
   itself, scaled to the frame width, aspect kept, at most :data:`MAX_IMAGE_HEIGHT_MM` high),
   source path, acquisition time, quality verdict, findings over threshold;
5. the model table and its thresholds table;
6. the intended-use note in a box, and "Generated <time>";

and on every page a footer with the patient ID and "page N of M".

The output is reproducible: ``invariant=1`` fixes the creation date and document ID, so the same
visit, model and ``generated`` give the same bytes.

Text is drawn with ReportLab's bundled Bitstream Vera TTF (embedded, subset), which covers far
more than the 14 standard PDF fonts; a character it cannot draw (CJK, emoji) is written as
``?`` rather than failing or drawing an empty box. ReportLab is the ``report`` extra: it is
imported when a PDF is rendered, never when this module is.
"""

from __future__ import annotations

import io
import os
import unicodedata
from typing import Any
from xml.sax.saxutils import escape

from fundus_edge.errors import require
from fundus_edge.report.html import (
    RESULT_COLOURS,
    TITLE,
    header_fields,
    model_fields,
    photo_fields,
    result_note,
)
from fundus_edge.report.visits import INTENDED_USE, ModelInfo, Visit

__all__ = ["MAX_IMAGE_HEIGHT_MM", "render_pdf"]

MAX_IMAGE_HEIGHT_MM = 100  # two square overlays and their captions fit on one A4 page

_FONT = "FundusEdgeVera"
_FONT_BOLD = "FundusEdgeVera-Bold"
_FALLBACK = ("Helvetica", "Helvetica-Bold")  # when reportlab's TTF files are missing

# (regular, bold, code points both draw), once per process.
_FONTS: list[tuple[str, str, frozenset[int]]] = []


def _cp1252() -> frozenset[int]:
    """The code points the standard PDF fonts draw (WinAnsi, printable)."""
    return frozenset(map(ord, bytes(range(0x20, 0x100)).decode("cp1252", "ignore")))


def _fonts() -> tuple[str, str, frozenset[int]]:
    """Register the bundled Vera fonts once; (regular, bold, code points both cover)."""
    if _FONTS:
        return _FONTS[0]
    import reportlab
    from reportlab.lib.fonts import addMapping
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    folder = os.path.join(os.path.dirname(reportlab.__file__), "fonts")
    try:
        fonts = []
        for name, file in ((_FONT, "Vera.ttf"), (_FONT_BOLD, "VeraBd.ttf")):
            if name not in pdfmetrics.getRegisteredFontNames():
                pdfmetrics.registerFont(TTFont(name, os.path.join(folder, file)))
            fonts.append(pdfmetrics.getFont(name))
        covered = frozenset(fonts[0].face.charToGlyph) & frozenset(fonts[1].face.charToGlyph)
    except Exception:  # no TTF in this reportlab build: the standard fonts, cp1252 only
        _FONTS.append((*_FALLBACK, _cp1252()))
        return _FONTS[0]
    for bold, italic in ((0, 0), (1, 0), (0, 1), (1, 1)):
        addMapping(_FONT, bold, italic, _FONT_BOLD if bold else _FONT)
    _FONTS.append((_FONT, _FONT_BOLD, covered))
    return _FONTS[0]


def _drawable(text: object, covered: frozenset[int]) -> str:
    """The text with each character the font cannot draw (or a control character) as ``?``."""
    text = unicodedata.normalize("NFC", str(text))
    out = []
    for ch in text:
        if ch in "\t\r\n":
            out.append(" ")
        elif ord(ch) in covered and (ch.isprintable() or ch == " "):
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


def render_pdf(visit: Visit, model: ModelInfo, *, generated: str) -> bytes:
    """The visit's report as PDF bytes (see the module doc).

    Args:
        visit: the patient's study, its photographs with their records and overlays.
        model: the model that graded them.
        generated: when the report was made, as printed at its end (ISO 8601, say).

    Returns:
        The PDF file's bytes; the same inputs give the same bytes.

    Raises:
        MissingDependencyError: ReportLab is not installed (the ``report`` extra).
    """
    require("reportlab", extra="report", purpose="writing PDF reports")
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.pdfgen.canvas import Canvas
    from reportlab.platypus import (
        Image,
        KeepTogether,
        Paragraph,
        SimpleDocTemplate,
        Spacer,
        Table,
        TableStyle,
    )

    regular, bold, covered = _fonts()

    def text(value: object, font_covers: frozenset[int] = covered) -> str:
        """Paragraph markup for plain text: drawable characters, XML-escaped."""
        return escape(_drawable(value, font_covers))

    body = ParagraphStyle("body", fontName=regular, fontSize=9.5, leading=12)
    label_style = ParagraphStyle("label", parent=body, fontName=bold)
    title_style = ParagraphStyle(
        "title", parent=body, fontName=bold, fontSize=18, leading=22, spaceAfter=4 * mm
    )
    h2 = ParagraphStyle(
        "h2", parent=body, fontName=bold, fontSize=13, leading=16, spaceBefore=5 * mm
    )
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor="#555555")

    def coloured(result: str, size: float) -> tuple[ParagraphStyle, Any]:
        bg, fg = RESULT_COLOURS.get(result, ("#dddddd", "#000000"))
        style = ParagraphStyle(
            f"result{size}", parent=body, fontName=bold, fontSize=size, leading=size * 1.25
        )
        style.textColor = colors.HexColor(fg)
        return style, colors.HexColor(bg)

    doc = SimpleDocTemplate(
        io.BytesIO(),
        pagesize=A4,
        leftMargin=18 * mm,
        rightMargin=18 * mm,
        topMargin=16 * mm,
        bottomMargin=18 * mm,
        invariant=1,
        title=TITLE,
        author="fundus-edge",
        creator=f"fundus-edge {model.version}",
    )
    width = doc.width
    label_w = 42 * mm
    mono = ParagraphStyle("mono", parent=body, fontName="Courier", fontSize=8.5)
    mono_rows = {"SHA-256", "Study UID"}  # hex and digits: one line, fixed width
    mono_covers = _cp1252()  # Courier is a standard font

    def fields(rows: list[tuple[str, list[str]]], box: bool = False) -> Table:
        data = [
            [
                Paragraph(text(k), label_style),
                [
                    Paragraph(text(line, mono_covers), mono)
                    if k in mono_rows
                    else Paragraph(text(line), body)
                    for line in lines
                ],
            ]
            for k, lines in rows
        ]
        commands = [
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("LEFTPADDING", (0, 0), (-1, -1), 3),
            ("TOPPADDING", (0, 0), (-1, -1), 1.5),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
        ]
        if box:
            commands.append(("BOX", (0, 0), (-1, -1), 0.5, colors.HexColor("#bbbbbb")))
        return Table(
            data, colWidths=[label_w, width - label_w], style=TableStyle(commands), hAlign="LEFT"
        )

    story: list[Any] = [
        Paragraph(text(TITLE), title_style),
        fields([(k, [v]) for k, v in header_fields(visit)]),
        Spacer(1, 4 * mm),
    ]

    result = visit.result
    style, bg = coloured(result, 15)
    note = ParagraphStyle("note", parent=style, fontName=regular, fontSize=9.5, leading=12)
    story += [
        Table(
            [
                [
                    [
                        Paragraph(f"Patient result: {text(result)}", style),
                        Paragraph(text(result_note(result)), note),
                    ]
                ]
            ],
            colWidths=[width],
            style=TableStyle(
                [
                    ("BACKGROUND", (0, 0), (-1, -1), bg),
                    ("LEFTPADDING", (0, 0), (-1, -1), 8),
                    ("TOPPADDING", (0, 0), (-1, -1), 7),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 8),
                ]
            ),
        ),
    ]

    max_h = MAX_IMAGE_HEIGHT_MM * mm
    for eye in visit.eyes():
        style, bg = coloured(eye.result, 11)
        n = len(eye.photos)
        heading = Table(
            [
                [
                    Paragraph(text(eye.name), h2),
                    Paragraph(text(eye.result), style),
                    Paragraph(f"{n} photograph{'s' if n != 1 else ''}", body),
                ]
            ],
            colWidths=[45 * mm, 60 * mm, width - 105 * mm],
            style=TableStyle(
                [
                    ("VALIGN", (0, 0), (-1, -1), "BOTTOM"),
                    ("BACKGROUND", (1, 0), (1, 0), bg),
                    ("LEFTPADDING", (0, 0), (0, 0), 0),
                    ("LEFTPADDING", (1, 0), (1, 0), 6),
                ]
            ),
            hAlign="LEFT",
        )
        story.append(Spacer(1, 5 * mm))
        for i, photo in enumerate(eye.photos):
            w, h = photo.overlay_size
            scale = min(width / max(w, 1), max_h / max(h, 1))
            image = Image(io.BytesIO(photo.overlay_jpeg), width=w * scale, height=h * scale)
            image.hAlign = "LEFT"
            block = [image, Spacer(1, 1.5 * mm), fields(photo_fields(photo, model), box=True)]
            if i == 0:  # the eye's heading stays with its first photograph
                block = [heading, Spacer(1, 2 * mm), *block]
            story.append(KeepTogether(block))
            story.append(Spacer(1, 4 * mm))
    if not visit.photos:
        story.append(Paragraph("No photographs.", body))

    story += [
        Paragraph("Model", h2),
        Spacer(1, 1.5 * mm),
        fields([(k, [v]) for k, v in model_fields(model)]),
        Spacer(1, 2 * mm),
    ]
    labels = list(model.labels) + [n for n in model.thresholds if n not in model.labels]
    number = ParagraphStyle("number", parent=body, alignment=2)  # right-aligned
    rows = [
        [
            Paragraph("Label", label_style),
            Paragraph("Threshold", ParagraphStyle("numhead", parent=label_style, alignment=2)),
        ]
    ]
    for label in labels:
        if label not in model.thresholds:
            continue
        mark = " (screening)" if label == model.screening_label else ""
        rows.append(
            [
                Paragraph(text(label + mark), body),
                Paragraph(f"{float(model.thresholds[label]):.1%}", number),
            ]
        )
    story.append(
        Table(
            rows,
            colWidths=[70 * mm, 30 * mm],
            repeatRows=1,
            hAlign="LEFT",
            style=TableStyle(
                [
                    ("GRID", (0, 0), (-1, -1), 0.5, colors.HexColor("#bbbbbb")),
                    ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
                ]
            ),
        )
    )
    story += [
        Spacer(1, 6 * mm),
        KeepTogether(
            Table(
                [[Paragraph(f"<b>Intended use.</b> {text(INTENDED_USE)}", body)]],
                colWidths=[width],
                style=TableStyle(
                    [
                        ("BOX", (0, 0), (-1, -1), 1.5, colors.HexColor("#555555")),
                        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#f4f4f4")),
                        ("LEFTPADDING", (0, 0), (-1, -1), 8),
                        ("RIGHTPADDING", (0, 0), (-1, -1), 8),
                        ("TOPPADDING", (0, 0), (-1, -1), 6),
                        ("BOTTOMPADDING", (0, 0), (-1, -1), 7),
                    ]
                ),
            )
        ),
        Spacer(1, 4 * mm),
        Paragraph(f"Generated {text(generated)}", small),
    ]

    footer_left = _drawable(f"{TITLE}, patient {visit.patient_id}", covered)
    margin_l, margin_r, bottom = doc.leftMargin, doc.pagesize[0] - doc.rightMargin, 10 * mm

    class NumberedCanvas(Canvas):
        """Keeps each page until the end, then draws "page N of M" on all of them."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for number, state in enumerate(self._pages, 1):
                self.__dict__.update(state)
                self.setFont(regular, 8)
                self.setFillColor(colors.HexColor("#555555"))
                self.drawString(margin_l, bottom, footer_left)
                self.drawRightString(margin_r, bottom, f"page {number} of {total}")
                super().showPage()
            super().save()

    doc.build(story, canvasmaker=NumberedCanvas)
    return doc.filename.getvalue()
