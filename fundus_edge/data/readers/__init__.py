"""One module per format fundus-edge reads."""
