"""The teacher: a fundus-edge checkpoint loaded for distillation, with the record a student keeps.

A student's checkpoint names its teacher (``meta["distill"]["teacher"]``): the file name, its
SHA-256, the teacher's members and its test-free validation figures, so a student can always be
traced to the exact ensemble it learned from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError

__all__ = ["Teacher", "load_teacher"]


@dataclass
class Teacher:
    """A loaded teacher ensemble and what identifies it.

    Attributes:
        model: the :class:`~fundus_edge.models.Ensemble`, in eval mode, gradients off.
        meta: its checkpoint meta.
        path: the checkpoint file.
        sha256: the checkpoint file's SHA-256 (hex).
    """

    model: Any
    meta: dict
    path: Path
    sha256: str
    config: Any = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.model.config

    @property
    def name(self) -> str:
        """The checkpoint's file name, with its run folder when it has one (``run/best.safetensors``)."""
        parent = self.path.resolve().parent.name
        return f"{parent}/{self.path.name}" if parent else self.path.name

    @property
    def label_names(self) -> list[str]:
        """The teacher's labels, in its output order (the student's too)."""
        return list(self.config.label_names)

    def record(self) -> dict:
        """The JSON-ready record a student checkpoint keeps of its teacher."""
        val = (self.meta.get("metrics") or {}).get("val") or {}
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "members": list(self.config.members),
            "views": self.config.views,
            "image_size": int(self.config.image_size),
            "epoch": self.meta.get("epoch"),
            "val_macro_auroc": val.get("val_macro_auroc"),
        }


def load_teacher(path: str | os.PathLike, device: str = "cpu") -> Teacher:
    """Load a teacher checkpoint for distillation (frozen, eval mode).

    Args:
        path: a ``.safetensors`` checkpoint written by ``fundus-edge train`` (an exported
            ONNX/TensorRT model has no class-map gradients to learn from and is refused).
        device: where the teacher runs.

    Raises:
        UserError: missing file, another kind of file, or not a fundus-edge checkpoint.
    """
    from fundus_edge.fileio import sha256_file
    from fundus_edge.models import load_checkpoint

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(f"--teacher {path}: checkpoint not found")
    if path.suffix.lower() != ".safetensors":
        raise UserError(
            f"--teacher {path}: expected a training checkpoint (.safetensors), "
            f"not a {path.suffix or 'suffix-less'} file"
        )
    model, meta = load_checkpoint(path, map_location=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model=model.eval(), meta=meta, path=path, sha256=sha256_file(path))
