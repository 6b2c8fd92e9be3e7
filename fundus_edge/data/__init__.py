"""Data: the readers of every dataset and image format fundus-edge knows.

``fundus_edge.data.readers`` holds one module per format (``dicom`` for DICOM objects).
"""
