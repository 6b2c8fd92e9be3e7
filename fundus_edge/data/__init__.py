"""Data: the readers of every dataset and image format fundus-edge knows.

``fundus_edge.data.readers`` holds one module per format (``dicom`` for DICOM objects).

Layout:

* :mod:`~fundus_edge.data.dataset`: :class:`Sample`, :class:`Problem`, :class:`FundusDataset`
  and :func:`open_dataset`, which detects a folder's format and hands it to that format's
  reader; the problem reporter and the helpers every reader shares (label order, held-out
  validation splits), the image check and the orphan report;
* :mod:`~fundus_edge.data.files`: the file index (one walk of the folder; which files are
  images comes from the media table, :mod:`fundus_edge.media`) and the rule that picks one
  image among files of the same name;
* :mod:`~fundus_edge.data.tables`: labels tables (CSV, XLSX) as numbered rows, 0/1 cells;
* :mod:`~fundus_edge.data.readers`: ``rfmid`` (RFMiD), ``odir`` (ODIR-5K), ``csv`` (a generic
  labels CSV): one dataset format each, each documenting its files, columns and splits;
  ``dicom``: the pixels and identifiers of a DICOM file;
* :mod:`~fundus_edge.data.anonymise`: pseudonymised identifiers for DICOM sources.
"""

from __future__ import annotations

from fundus_edge.data.dataset import (
    FORMATS,
    SCREENING_LABEL,
    SPLITS,
    FundusDataset,
    Problem,
    Sample,
    open_dataset,
)
from fundus_edge.data.readers.odir import ODIR_LABELS
from fundus_edge.data.readers.rfmid import RFMID_LABELS_30, RFMID_LABELS_46

__all__ = [
    "FORMATS",
    "ODIR_LABELS",
    "RFMID_LABELS_30",
    "RFMID_LABELS_46",
    "SCREENING_LABEL",
    "SPLITS",
    "FundusDataset",
    "Problem",
    "Sample",
    "open_dataset",
]
