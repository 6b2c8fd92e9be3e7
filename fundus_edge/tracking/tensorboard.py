"""``--logger tensorboard``: event files that ``tensorboard --logdir`` opens, without PyTorch.

Written with the ``tensorboard`` package's own event writer and protocol buffers (what
``torch.utils.tensorboard.SummaryWriter`` wraps), so ``export`` on a machine without PyTorch
can add to a run too. What goes where in TensorBoard:

    log_metrics   scalars, one tag per metric (Scalars tab)
    log_images    PNG images, tag ``maps/<name>`` (Images tab; a step slider per tag)
    log_config    the config as YAML, tag ``config`` (Text tab)
    log_params    a table, tag ``params`` (Text tab)
    log_artifact  the file linked (or copied) into ``<logdir>/artifacts/``; its name, size and
                  SHA-256 as text, tag ``artifacts/<file name>``
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from fundus_edge.errors import UserError
from fundus_edge.tracking import Tracker, plain

__all__ = ["TensorBoardTracker"]


class TensorBoardTracker(Tracker):
    """Event files in ``logdir`` (a new file per open: a resumed run appends a file).

    Args:
        logdir: the run's folder (``tensorboard --logdir`` its parent to compare runs).

    Raises:
        UserError: ``logdir`` cannot be made.
    """

    kind = "tensorboard"

    def __init__(self, logdir: str | Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = Path(logdir).absolute()
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--logger-dir {self.logdir}: cannot be made ({exc})") from None
        self._writer = EventFileWriter(str(self.logdir))
        self._closed = False

    # -- the interface -----------------------------------------------------------------------

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = yaml.safe_dump(plain(config), sort_keys=False)
        self._text(0, "config", _code_block(text))

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in params.items())
        self._text(0, "params", "| name | value |\n| --- | --- |\n" + rows)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()
        ]
        self._add(step, values)

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        from tensorboard.compat.proto import summary_pb2

        values = []
        for name, img in images.items():
            img = np.ascontiguousarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"image {name!r}: expected (H, W, 3) uint8, got {img.shape}")
            ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
                raise RuntimeError(f"image {name!r}: PNG encoding failed")
            pic = summary_pb2.Summary.Image(
                height=img.shape[0],
                width=img.shape[1],
                colorspace=3,
                encoded_image_string=png.tobytes(),
            )
            values.append(summary_pb2.Summary.Value(tag=f"maps/{name}", image=pic))
        self._add(step, values)

    def log_artifact(self, path: str | Path) -> None:
        from fundus_edge.fileio import sha256_file

        src = Path(path)
        if not src.is_file():
            raise UserError(f"{src}: no such file to log as an artifact")
        dest = self.logdir / "artifacts" / src.name
        _link_or_copy(src, dest)
        size = src.stat().st_size
        self._text(0, f"artifacts/{src.name}", f"`{dest}`: {size} bytes, sha256 {sha256_file(src)}")

    def record(self) -> dict:
        return {"kind": self.kind, "logdir": str(self.logdir)}

    def close(self, ok: bool = True) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True

    # -- events ------------------------------------------------------------------------------

    def _add(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._closed:
            raise RuntimeError("the TensorBoard tracker is closed")
        if not values:
            return
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)
        self._writer.flush()  # an epoch's records are on disk when the epoch line prints

    def _text(self, step: int, tag: str, text: str) -> None:
        """A text summary as TensorBoard's text plugin writes it (a scalar string tensor)."""
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata

        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        value = summary_pb2.Summary.Value(
            tag=tag, metadata=metadata.create_summary_metadata(tag, ""), tensor=tensor
        )
        self._add(step, [value])


def _code_block(text: str) -> str:
    # Markdown: an indented block shows as code (the text plugin renders markdown).
    return "\n".join("    " + line for line in text.splitlines())


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _link_or_copy(src: Path, dest: Path) -> None:
    """``dest`` becomes ``src``'s content: a hard link where possible (a checkpoint costs no
    space; a later atomic rewrite of ``src`` leaves the link at this version), else a copy
    made beside ``dest`` and renamed over it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
