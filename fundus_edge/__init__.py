"""fundus-edge: the Grad-CAM-augmented retinal multi-disease ensemble, from workstation to edge."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
