"""``fundus-edge explain``: class maps for chosen labels and methods, written as files.

Per image and per (label, method[, member]) it writes, under ``OUT/<image>/`` (``<image>`` is
the file's path under the source root, name and suffix kept: ``a/1.png/``, ``1.jpg/``; frame N
of a multi-frame DICOM object ``m.dcm.frame00N/``):

* ``<label>_<method>[_<member>].png``: the map over the ORIGINAL frame
  (:func:`fundus_edge.maps.map_on_frame`, :func:`fundus_edge.runtime.render.overlay_map`);
* ``<label>_<method>[_<member>].npy``: the map at its own grid, float32 in [0, 1];
* ``grid.png``: rows = labels, columns = methods (each followed by its members with
  ``--per-member``), captions on both;

and ``OUT/index.csv`` with one row per map (source, label, method, member, probability, png,
npy, map_max, map_min).

Methods:

* ``kernel`` (default): the model's own forward-only maps, the ones ``run`` and ``eval`` show:
  an exported graph's ``cams``, or a checkpoint's CAM kernels through the same fused forward.
* ``gradcam``, ``gradcam++``, ``layercam``, ``eigencam``, ``scorecam``: the ``grad-cam``
  package (a checkpoint and the ``train`` extra), on each member's CAM target layer; EigenCAM
  is class-agnostic (the same map for every label).

Every ensemble map is combined by :func:`fundus_edge.maps.normalise_member_maps` (each member
resampled onto the first member's grid, scaled to its peak, averaged). A member's own map
(``--per-member``) is at the member's own grid from a checkpoint; an exported graph only has
them resampled onto the first member's grid (its ``cams`` output), and says so.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fundus_edge.errors import UserError, require
from fundus_edge.fileio import atomic_write_bytes, atomic_write_text, ensure_writable_dir
from fundus_edge.log import get_logger
from fundus_edge.maps import map_on_frame, normalise_member_maps, peak_normalise

__all__ = ["GRADCAM_METHODS", "INDEX_COLUMNS", "METHODS", "explain", "parse_methods"]

log = get_logger("explain")

#: grad-cam package methods: option name -> class name in ``pytorch_grad_cam``.
GRADCAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
METHODS = ("kernel", *GRADCAM_METHODS)
INDEX_COLUMNS = (
    "source", "label", "method", "member", "probability", "png", "npy", "map_max", "map_min",
)  # fmt: skip
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
ENSEMBLE = "ensemble"


def parse_methods(text: str) -> list[str]:
    """``kernel,gradcam`` -> ``["kernel", "gradcam"]``; unknown names are a UserError."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not names:
        raise UserError(f"--method: give one or more of {', '.join(METHODS)}")
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise UserError(f"--method: unknown {', '.join(bad)} (choose from {', '.join(METHODS)})")
    return list(dict.fromkeys(names))


def parse_labels(text: str, label_names: list[str]) -> list[str] | str:
    """``all`` | ``positive`` | ``DR,MH`` -> the mode or the checked list."""
    t = str(text).strip()
    if t.lower() in ("all", "positive"):
        return t.lower()
    names = list(dict.fromkeys(s.strip() for s in t.split(",") if s.strip()))
    if not names:
        raise UserError("--labels: give all, positive or label names (DR,MH)")
    bad = [n for n in names if n not in label_names]
    if bad:
        raise UserError(
            f"--labels: unknown label {', '.join(bad)} (labels: {', '.join(label_names)})"
        )
    return names


def _labels_for(mode: list[str] | str, res) -> list[str]:
    if isinstance(mode, list):
        return mode
    if mode == "all":
        return list(res.label_names)
    pos = [n for n in res.positive if n != res.screening_label]
    if pos:
        return pos
    cand = [(p, n) for n, p in zip(res.label_names, res.probabilities, strict=True)]
    rest = [c for c in cand if c[1] != res.screening_label] or cand
    return [max(rest)[1]]  # nothing positive: the most probable finding


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("++", "pp")).strip("_") or "x"


def _image_key(frame) -> str:
    """The image's output folder: its path under the source root, file name and suffix kept
    (``a/1.png`` and ``b/1.png``, ``1.jpg`` and ``1.png`` never share one); frame N of a
    multi-frame DICOM object is ``<name>.frameNNN``."""
    rel = frame.rel or Path(frame.name).name
    base, _, n = rel.partition("#")
    if n:
        base = f"{base}.frame{int(n):03d}"
    parts = [_safe(p) for p in base.split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "image"


def _png(image_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 RGB
        raise UserError("could not encode a PNG")
    return buf.tobytes()


def _npy(m: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(m, dtype=np.float32))
    return buf.getvalue()


@dataclass
class _Maps:
    """One method's maps for one image: ensemble (C-indexed) and per member."""

    ensemble: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (h, w)
    members: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # member -> label


class _CheckpointMaps:
    """Per-member kernel maps and grad-cam maps from a checkpoint (the TorchBackend's model)."""

    def __init__(self, backend) -> None:
        self.torch = require("torch", purpose="maps from a checkpoint")
        self.fused = backend._model  # the FusedModel the backend runs (same weights)
        self.ensemble = self.fused.ensemble
        self.device = backend.device

    def _input(self, image: np.ndarray):
        return self.fused.normalise(self.torch.from_numpy(image[None]).to(self.device))

    def kernel_members(self, image: np.ndarray) -> list[np.ndarray]:
        """Raw per-member maps at each member's own grid: [(C, h_m, w_m)]."""
        torch, ens = self.torch, self.ensemble
        with torch.no_grad():
            x = self._input(image)
            if ens.fusion is not None:
                cams = ens.fusion.cams([m.forward_features(x) for m in ens.members])
            else:
                cams = [m.forward_with_cam(x)[1] for m in ens.members]
        return [c[0].float().cpu().numpy() for c in cams]

    def gradcam_members(
        self, method: str, image: np.ndarray, classes: list[int]
    ) -> list[np.ndarray]:
        """The package's maps per member at the member's own grid: [(L, h_m, w_m)]."""
        torch, ens = self.torch, self.ensemble
        gc = require("pytorch_grad_cam", purpose=f"--method {method}")
        targets_mod = require("pytorch_grad_cam.utils.model_targets", purpose=f"--method {method}")
        base = getattr(gc, GRADCAM_METHODS[method])

        class _FusedLogits(torch.nn.Module):  # a fusion head: x -> fused logits
            def __init__(self, e) -> None:
                super().__init__()
                self.e = e

            def forward(self, t):
                return self.e.head_logits(t)[:, 0]

        x = self._input(image)
        batch = x.repeat(len(classes), 1, 1, 1)  # one row per label: one pass for all
        targets = [targets_mod.ClassifierOutputTarget(c) for c in classes]
        out = []
        for member in ens.members:
            with torch.no_grad():
                grid = tuple(member.forward_features(x).shape[-2:])

            class _Native(base):  # the package's maps left at the layer's own grid
                def get_target_width_height(self, input_tensor, _g=grid):
                    return _g[1], _g[0]

            model = _FusedLogits(ens) if ens.fusion is not None else member
            quiet = contextlib.redirect_stderr(io.StringIO())  # Score-CAM's tqdm bars
            with quiet, _Native(model=model, target_layers=[member.target_layer]) as cam:
                maps = cam(input_tensor=batch, targets=targets)  # (L, h_m, w_m)
            out.append(np.asarray(maps, dtype=np.float32))
        return out


def _member_names(meta: dict[str, Any], m: int) -> list[str]:
    names = [str(n) for n in (meta.get("members") or [])][:m]
    names += [f"member{k}" for k in range(len(names), m)]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n}{k}" if seen[n] > 1 else n for k, n in enumerate(names)]


def _put_lines(cell: np.ndarray, lines: list[str], centre_y: bool = False) -> None:
    """White text with a dark edge, each line scaled down to fit the cell's width."""
    h, w = cell.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    base = max(0.4, min(w, 4 * h) / 420.0)
    sizes = []
    for line in lines:
        (tw, _), _ = cv2.getTextSize(line, font, base, 1)
        sizes.append(min(base, base * (w - 12) / max(tw, 1)))
    step = int(30 * base)
    y = (h - step * len(lines)) // 2 + step - 6 if centre_y else step
    for line, scale in zip(lines, sizes, strict=True):
        for colour, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            cv2.putText(cell, line, (6, y), font, scale, colour, thick, cv2.LINE_AA)
        y += step


def _grid(rows: list[tuple[str, list[np.ndarray]]], columns: list[str], tile: int) -> np.ndarray:
    """Rows of overlays (labels) under a caption row (methods[/members]); a caption column."""
    head_h, side_w = max(48, tile // 4), max(120, tile // 2)
    n_rows, n_cols = len(rows), len(columns)
    out = np.full((head_h + n_rows * tile, side_w + n_cols * tile, 3), 24, np.uint8)
    for j, name in enumerate(columns):
        _put_lines(out[:head_h, side_w + j * tile : side_w + (j + 1) * tile], name.split("/"))
    for i, (label, tiles) in enumerate(rows):
        cell = out[head_h + i * tile : head_h + (i + 1) * tile, :side_w]
        _put_lines(cell, label.split("\n"), centre_y=True)
        for j, img in enumerate(tiles):
            h, w = img.shape[:2]
            k = tile / max(h, w)
            small = cv2.resize(
                img, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA
            )
            y0 = head_h + i * tile + (tile - small.shape[0]) // 2
            x0 = side_w + j * tile + (tile - small.shape[1]) // 2
            out[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return out


def explain(
    model: str | os.PathLike,
    source: str,
    out: str | os.PathLike,
    *,
    labels: str = "positive",
    methods: str = "kernel",
    per_member: bool = False,
    device: str | None = None,
    alpha: float = 0.5,
    tile: int = 256,
) -> dict[str, Any]:
    """Write maps for ``source``'s images (see the module docstring).

    Args:
        model: a checkpoint (every method) or an exported model (``kernel`` only).
        source: an image, a folder, a glob or a DICOM file (any still source ``run`` reads).
        out: output folder (created).
        labels: ``all``, ``positive`` (default: the positive findings, leaving out the
            screening label; with none, the most probable finding) or ``DR,MH``.
        methods: comma-separated :data:`METHODS`.
        per_member: each member's map too.
        device: PyTorch device for checkpoints.
        alpha: overlay opacity at the map's peak.
        tile: grid tile side in pixels.

    Returns:
        A summary: images, maps written, the index path, skipped items and notes.

    Raises:
        UserError: an unknown label or method, a grad-cam method with an exported model, a
            source that is not stills.
        MissingDependencyError: a grad-cam method without the ``train`` extra.
    """
    from fundus_edge.runtime.predictor import Predictor
    from fundus_edge.runtime.render import overlay_map
    from fundus_edge.runtime.sources import ImageFilesSource, open_source

    chosen = parse_methods(methods)
    wants_gradcam = [m for m in chosen if m in GRADCAM_METHODS]
    is_ckpt = Path(model).suffix.lower() in CHECKPOINT_SUFFIXES
    if wants_gradcam and not is_ckpt:
        raise UserError(
            f"--method {','.join(wants_gradcam)} needs a checkpoint (.safetensors/.pt): "
            f"{Path(model).name} is an exported graph, which gives only its own maps (kernel)"
        )
    if not 0.0 < alpha <= 1.0:
        raise UserError(f"--alpha must be in (0, 1], got {alpha}")
    if wants_gradcam:
        require("pytorch_grad_cam", purpose=f"--method {wants_gradcam[0]}")
    src = open_source(source)
    if not isinstance(src, ImageFilesSource):
        raise UserError(
            f"{source}: explain reads still images (an image, a folder, a glob, DICOM), "
            "not a camera, stream or video"
        )
    out = ensure_writable_dir(out, "--out")
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    images = 0
    with Predictor(model, device=device, gate=False) as predictor:
        mode = parse_labels(labels, predictor.label_names)
        meta = predictor.metadata
        ckpt = _CheckpointMaps(predictor.backend) if is_ckpt else None
        with src:
            while (frame := src.read()) is not None:
                prepared = predictor.prepare(frame.image)
                (raw,) = predictor.infer([prepared])
                res = predictor.finish(prepared, raw)
                if "kernel" in chosen and res.cams is None:
                    raise UserError(f"{model}: the model gives no class maps (no 'cams' output)")
                wanted = _labels_for(mode, res)
                classes = [res.label_names.index(n) for n in wanted]
                n_members = res.cams.shape[0] if res.cams is not None else len(meta["members"])
                names = _member_names(meta, n_members)
                use_members = per_member and n_members > 1
                if per_member and n_members < 2 and not notes:
                    notes.append(
                        "--per-member: the model has one member; its map is the ensemble's"
                    )
                if use_members and ckpt is None and not any("first member" in n for n in notes):
                    notes.append(
                        "--per-member from an exported graph: each member's map as the graph "
                        "gives it, resampled onto the first member's grid (a checkpoint gives "
                        "each at its own grid)"
                    )
                per_method: dict[str, _Maps] = {}
                for method in chosen:
                    got = _Maps()
                    if method == "kernel":
                        got.ensemble = {
                            n: res.maps[c] for n, c in zip(wanted, classes, strict=True)
                        }
                        if use_members:
                            member_maps = (
                                ckpt.kernel_members(prepared.pre.image)
                                if ckpt is not None
                                else list(res.cams)
                            )
                            for name, mm in zip(names, member_maps, strict=True):
                                got.members[name] = {
                                    n: peak_normalise(mm[c])
                                    for n, c in zip(wanted, classes, strict=True)
                                }
                    else:
                        member_maps = ckpt.gradcam_members(method, prepared.pre.image, classes)
                        combined = normalise_member_maps(member_maps)  # (L, h, w)
                        got.ensemble = dict(zip(wanted, combined, strict=True))
                        if use_members:
                            for name, mm in zip(names, member_maps, strict=True):
                                got.members[name] = dict(
                                    zip(wanted, peak_normalise(mm), strict=True)
                                )
                    per_method[method] = got
                rows.extend(
                    _write_image(
                        frame, res, wanted, per_method, names if use_members else [], out,
                        alpha, tile, overlay_map,
                    )
                )  # fmt: skip
                images += 1
        skipped = [f"{s.item}: {s.reason}" for s in src.skipped]
    if images == 0:
        raise UserError(f"{source}: no readable image" + (f" ({skipped[0]})" if skipped else ""))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(INDEX_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    index = out / "index.csv"
    atomic_write_text(index, buf.getvalue())
    return {
        "images": images,
        "maps": len(rows),
        "index": str(index),
        "out": str(out),
        "methods": chosen,
        "skipped": skipped,
        "notes": notes,
    }


def _write_image(frame, res, wanted, per_method, members, out: Path, alpha, tile, overlay_map):
    key = _image_key(frame)
    folder = out / key
    source = frame.rel or frame.name
    rows: list[dict[str, Any]] = []
    columns = [c for m in per_method for c in [m, *[f"{m}/{n}" for n in members]]]
    grid_rows = []
    for label in wanted:
        p = res.probability(label)
        tiles = []
        for method, got in per_method.items():
            for member in [None, *members]:
                m = got.ensemble[label] if member is None else got.members[member][label]
                base = f"{_safe(label)}_{_safe(method)}" + (f"_{_safe(member)}" if member else "")
                img = overlay_map(frame.image, map_on_frame(m, res.geometry), alpha)
                atomic_write_bytes(folder / f"{base}.png", _png(img), fsync=False)
                atomic_write_bytes(folder / f"{base}.npy", _npy(m), fsync=False)
                tiles.append(img)
                rows.append(
                    {
                        "source": source,
                        "label": label,
                        "method": method,
                        "member": member or ENSEMBLE,
                        "probability": round(float(p), 6),
                        "png": f"{key}/{base}.png",
                        "npy": f"{key}/{base}.npy",
                        "map_max": round(float(np.max(m)), 6),
                        "map_min": round(float(np.min(m)), 6),
                    }
                )
        grid_rows.append((f"{label}\np={p:.2f}", tiles))
    grid = _grid(grid_rows, columns, tile)
    atomic_write_bytes(folder / "grid.png", _png(grid), fsync=False)
    return rows
