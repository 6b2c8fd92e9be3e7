"""The file index of a dataset folder: one walk, images by stem, labels tables, and the rule
that picks one image among files of the same name.

An image is any still of the media table (:data:`fundus_edge.media.STILL_SUFFIXES`: PNG, JPEG,
TIFF, BMP, WebP and DICOM ``.dcm``/``.dicom``, in any letter case) outside ``Masks``/``Meta``
folders. Archives name DICOM files by their SOP instance UID with no suffix (or a numeric
"suffix": ``1.2.840.10008.7``): such a file is never listed as an image, but a labels row
that names it exactly (the RFMiD ID, the ODIR file name) finds it when its bytes say DICOM.

Among files of the same stem, :func:`pick` keeps the one in a folder named like the split
(``Training``, ``Validation``/``Evaluation``, ``Test``), never one in a folder named like
another split, then the one nearest the labels file, then the first by path.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from fundus_edge.media import STILL_SUFFIXES, is_dicom_file

__all__ = ["MASK_DIR", "META_DIR", "TABLE_SUFFIXES", "FileIndex", "pick"]

#: Folder names (any case) of lesion masks and meta records: their files are not images.
MASK_DIR = "masks"
META_DIR = "meta"
#: Labels files the index lists.
TABLE_SUFFIXES = (".csv", ".xlsx")
# A folder whose name contains one of these belongs to that split ("Evaluation_Set" is val).
_SPLIT_WORDS = {"train": ("train",), "val": ("val",), "test": ("test",)}


def _bare(name: str) -> bool:
    """No suffix, or a numeric one (a UID's last component): maybe a DICOM file."""
    suffix = Path(name).suffix
    return not suffix or suffix[1:].isdigit()


class FileIndex:
    """One walk of the root: images by lower-case stem, tables, unsuffixed files by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        self.tables: list[Path] = []
        # Files without a (known) suffix, by lower-case name: DICOM only when a row names them.
        self.bare: dict[str, list[Path]] = defaultdict(list)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            # Hidden folders hold no data (and prepare's temporary files live in them).
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            self._add_folder(Path(dirpath), filenames)

    def _add_folder(self, d: Path, filenames: list[str]) -> None:
        in_aux = d.name.lower() in (MASK_DIR, META_DIR)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = d / name
            ext = p.suffix.lower()
            if ext in TABLE_SUFFIXES:
                self.tables.append(p)
            elif in_aux:
                continue
            elif ext in STILL_SUFFIXES:
                self.by_stem[p.stem.lower()].append(p)
            elif _bare(name):
                self.bare[name.lower()].append(p)

    def all_images(self) -> Iterable[Path]:
        """Every image listed by stem (unsuffixed DICOM files are not: nothing names them)."""
        for paths in self.by_stem.values():
            yield from paths

    def with_stem(self, stem: str) -> list[Path]:
        """Images whose stem is ``stem`` (any case)."""
        return self.by_stem.get(stem.lower(), [])

    def dicom_named(self, name: str) -> list[Path]:
        """Unsuffixed DICOM files named exactly ``name`` (any case), e.g. a SOP instance UID."""
        return [p for p in self.bare.get(Path(name).name.lower(), []) if is_dicom_file(p)]


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


def pick(candidates: list[Path], root: Path, split: str | None, anchor: Path) -> Path | None:
    """The best image among files of the same stem (see the module docstring for the order)."""
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
